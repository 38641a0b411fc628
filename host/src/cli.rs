//! The `nudge` command line. The binary's `main` only sets the allocator and
//! calls [`main`], so tests can run the very same CLI as a subprocess.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::plugins::{Limits, Runtime};
use crate::reload::load_once;
use crate::remote::Remote;
use crate::replay::{self, PluginSource};

#[derive(Parser)]
#[command(name = "nudge", version, about = "Real-time trigger-marketing engine")]
struct Cli {
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `nudge=debug`.
    #[arg(long, env = "NUDGE_LOG", default_value = "warn", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Sources {
    /// Campaigns and policies folder.
    #[arg(long, default_value = "rules")]
    rules: PathBuf,
    /// Plugins folder (`*.wasm`); default: the example plugins built in.
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Where compiled plugins are cached between runs.
    #[arg(long, default_value = ".nudge-cache")]
    cache: PathBuf,
    /// Memory cap per plugin instance, in MiB.
    #[arg(long, default_value_t = 64)]
    plugin_memory_mib: usize,
    /// Deadline per plugin call, in milliseconds.
    #[arg(long, default_value_t = 200)]
    plugin_deadline_ms: u64,
}

impl Sources {
    fn plugin_source(&self) -> PluginSource {
        match &self.plugins {
            Some(d) => PluginSource::Dir(d.clone()),
            None => PluginSource::Embedded,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.plugin_memory_mib << 20,
            deadline: Duration::from_millis(self.plugin_deadline_ms),
            ..Limits::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Replay a file of events (JSON Lines, Segment Spec) on an event-time
    /// clock and write the decisions and the report.
    Replay {
        /// Events, one JSON object per line.
        #[arg(long)]
        events: PathBuf,
        /// Where to write the decisions (JSON Lines).
        #[arg(long)]
        decisions: PathBuf,
        /// Where to write the report (JSON Lines, one row per campaign).
        #[arg(long)]
        report: PathBuf,
        /// Store folder (sled); kept afterwards. Default: a temporary folder.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Skip invalid lines (counted and reported) instead of stopping.
        #[arg(long)]
        skip_invalid: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Worker threads (customers are sharded over them); default: one
        /// per CPU.
        #[arg(long)]
        workers: Option<usize>,
        /// Replay in (timestamp, messageId) order, for an export that is not
        /// in time order (sorted on disk: memory stays bounded).
        #[arg(long)]
        sort: bool,
        /// MiB the store's caches share (as `[store] memory_mib`).
        #[arg(long, default_value_t = crate::store::Budget::DEFAULT_MIB)]
        memory_mib: usize,
        /// Where to write each campaign's measured result: customers
        /// treated and control, rates, the difference with its intervals,
        /// incremental conversions and value, cost, net value, SRM, status,
        /// funnel and timing (JSON Lines, one campaign a line).
        #[arg(long)]
        measure: Option<PathBuf>,
        /// Benchmarks only: keep no measurement tallies (a store replayed
        /// so cannot answer `nudge report --data` as of its end).
        #[arg(long, hide = true)]
        no_ledger: bool,
        /// zstd on what the store writes (a new `--data` folder only):
        /// about 40% less on disk, at about 30% of the throughput.
        #[arg(long)]
        compress: bool,
        #[command(flatten)]
        sources: Sources,
    },
    /// Run the live server: Segment-compatible ingest, decisions within
    /// milliseconds, delivery to the channels.
    Serve {
        /// Configuration file (every field documented in the repository's
        /// `nudge.toml`). Without one, the defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overrides `server.listen`, e.g. `127.0.0.1:0` for any free port.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `server.data`.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Load generator for the live server: acknowledged events per second,
    /// acknowledgement and event-to-decision latency.
    Bench {
        /// A running server; default: start one here on a free port with a
        /// fresh store (and `--config`, if given). Nodes of a cluster,
        /// comma-separated: batches go to each in turn, and what they
        /// decided is added up.
        #[arg(long)]
        url: Option<String>,
        /// Write key for `--url` (default: the config's first).
        #[arg(long, env = "NUDGE_WRITE_KEY")]
        write_key: Option<String>,
        /// Configuration of the server started here.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Events per `/v1/batch` request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Concurrent connections.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Fixed rate in events per second; default: as fast as acknowledged.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 20_000)]
        customers: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also time this many `GET /v1/reports` while the load runs (one
        /// every `--report-every-ms`), or back to back with `--events 0`.
        #[arg(long, default_value_t = 0)]
        reports: usize,
        #[arg(long, default_value_t = 200)]
        report_every_ms: u64,
        /// What `--reports` times: an API path, or a dashboard page
        /// (`/ui/…`: the token logs in first).
        #[arg(long, default_value = "/v1/reports")]
        probe: String,
        /// API token for the reports (default: the config's first).
        #[arg(long, env = "NUDGE_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Serve this existing store (a replay's `--data`, say) instead of
        /// a fresh one (without `--url`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What hot reload costs: file written to generation active (changed
    /// rule, changed plugin cached or not), and throughput with reloads
    /// against without, in one run.
    BenchReload {
        /// Rules to copy in and edit.
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// Measured reloads per kind of change.
        #[arg(long, default_value_t = 30)]
        iterations: usize,
        /// The watcher's debounce, in milliseconds (the server's default: 250).
        #[arg(long, default_value_t = 250)]
        debounce_ms: u64,
        /// Events per throughput round (0: skip the throughput comparison).
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Rounds of each, alternating (no reloads, reloads).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// How often a file changes during the reload rounds, in ms.
        #[arg(long, default_value_t = 500)]
        reload_every_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// What every campaign achieved: customers treated and control, rates,
    /// the difference with its intervals, incremental conversions and
    /// value, cost, net value, SRM and status, as a table, JSON Lines or
    /// CSV; from a stopped server's (or a replay's) store, or from a
    /// running server.
    Report {
        /// The store folder (`server.data`, or replay's `--data`). A
        /// running server holds it: stop it first, or use `--url`.
        #[arg(long, required_unless_present_any = ["url", "measured"], conflicts_with_all = ["url", "measured"])]
        data: Option<PathBuf>,
        /// A running server's base URL (reads `GET /v1/reports`).
        #[arg(long, conflicts_with = "measured")]
        url: Option<String>,
        /// What `nudge replay --measure` wrote (JSON Lines).
        #[arg(long)]
        measured: Option<PathBuf>,
        /// Write the Overview and Campaigns pages as one self-contained
        /// HTML file, to mail a backtest to an executive.
        #[arg(long, conflicts_with_all = ["json", "csv"])]
        html: Option<PathBuf>,
        /// An API token of the server (viewer or operator), with `--url`.
        #[arg(long, env = "NUDGE_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The rules whose campaigns are measured (holdouts, goals, costs),
        /// with `--data`.
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// Measure as of this time (RFC 3339 or epoch ms): decisions whose
        /// goal window has closed by then count. Default: now.
        #[arg(long)]
        as_of: Option<String>,
        /// The first day (UTC) of the period (RFC 3339 or epoch ms).
        #[arg(long)]
        from: Option<String>,
        /// The end of the period, exclusive (RFC 3339 or epoch ms).
        #[arg(long)]
        to: Option<String>,
        /// One campaign only.
        #[arg(long)]
        campaign: Option<String>,
        /// JSON Lines, one campaign a line (the fields of `replay --measure`).
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Comma-separated values of the headline fields.
        #[arg(long)]
        csv: bool,
    },
    /// What a stopped server's (or a replay's) store holds, by kind of
    /// key (keys, bytes of keys and values), against its size on disk.
    StoreUsage {
        /// The store folder (`server.data`, or replay's `--data`).
        #[arg(long)]
        data: PathBuf,
        /// One JSON object: kinds, totals and bytes on disk.
        #[arg(long)]
        json: bool,
    },
    /// Rules: validate campaigns and policies against the plugins.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Plugin authoring: scaffold, build, and test a plugin against events.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// A running server's generations, paused campaigns and quarantined
    /// plugins.
    Status {
        /// List every generation, not the latest ten.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Make the generation that was active before the current one active
    /// again (or `--to N`).
    Rollback {
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Ask a running server to read its plugins and rules folders now.
    Reload {
        /// Build even if nothing changed, and let a publish through that
        /// looks half-done (a manifest gone, no campaign left).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Pause, resume or list a running server's campaigns (without editing
    /// their files).
    Campaign {
        #[command(subcommand)]
        command: CampaignCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Release a quarantined plugin without publishing a new version.
    Release {
        plugin: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Check a rules folder as the server would load it: every campaign and
    /// the policies, against the plugins. Exit status 1 on any error.
    Check {
        /// The rules folder (default: `--rules`, i.e. `rules`).
        dir: Option<PathBuf>,
        #[command(flatten)]
        sources: Sources,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create a plugin crate using the SDK, with a test.
    New {
        #[arg(long, value_enum)]
        kind: crate::authoring::Kind,
        name: String,
        /// Where to create the crate folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The nudge-sdk crate (default: an `sdk/` folder above `--dir`).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin crate for wasm32-wasip2; with `--out`, publish it
    /// there (a server's plugins folder) as NAME.wasm and NAME.toml.
    Build {
        /// The crate folder.
        #[arg(default_value = ".")]
        path: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run one trigger plugin against a file of events (JSON Lines) and print
    /// its firings, without a server or campaigns.
    Test {
        /// A plugin name (from `--plugins`, or the built-in examples) or a
        /// path to a `.wasm`.
        name: String,
        #[arg(long)]
        events: PathBuf,
        /// Also fire timers due up to this time (RFC 3339) after the last
        /// event.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        sources: Sources,
    },
}

#[derive(Subcommand)]
enum CampaignCommand {
    Pause { id: String },
    Resume { id: String },
    List,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli.log, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime of `serve` and `bench`: two threads for HTTP; the
/// workers, inbox and persister run on threads of their own.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The config file, or the defaults; either way with environment overrides.
fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => {
            let mut c = Config::default();
            c.apply_env(|k| std::env::var(k).ok());
            c
        }
    })
}

fn serve(
    log: &str,
    config: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    data: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut cfg = load_config(config.as_deref())?;
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    if let Some(d) = data {
        cfg.server.data = d;
    }
    // The server logs what it does at info unless told otherwise.
    let filter = if log == "warn" && std::env::var_os("NUDGE_LOG").is_none() {
        "info"
    } else {
        log
    };
    crate::logging::init(filter, cfg.server.log_format == LogFormat::Json);
    if cfg.ingest.write_keys.is_empty() {
        tracing::warn!("no write keys configured: ingest accepts every request");
    }
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.server.listen)
            .await
            .with_context(|| format!("listening on {}", cfg.server.listen))?;
        // One line on stdout once start-up is through, for scripts and
        // tests that start the server on port 0.
        crate::serve::run_with(cfg, listener, crate::serve::shutdown_signal(), |addr| {
            println!("nudge listening on http://{addr}")
        })
        .await
        .context("serving")
    })
}

fn run(log: &str, command: Command) -> anyhow::Result<()> {
    // The server sets up its logs from its config file.
    if !matches!(command, Command::Serve { .. }) {
        crate::logging::init(log, false);
    }
    match command {
        Command::Serve {
            config,
            listen,
            data,
        } => serve(log, config, listen, data),
        Command::Bench {
            url,
            write_key,
            config,
            events,
            batch,
            connections,
            rate,
            customers,
            seed,
            reports,
            report_every_ms,
            probe,
            token,
            data,
            json,
        } => {
            let cfg = load_config(config.as_deref())?;
            let opts = crate::bench::Options {
                url,
                write_key,
                events,
                batch,
                connections,
                rate,
                customers,
                first_customer: 0,
                seed,
                reports,
                report_every: std::time::Duration::from_millis(report_every_ms),
                probe,
                token,
                data,
            };
            let report = runtime()?.block_on(crate::bench::run(opts, cfg))?;
            if json {
                println!("{}", crate::bench::to_json(&report));
            } else {
                println!("{}", report.line());
            }
            Ok(())
        }
        Command::BenchReload {
            rules,
            iterations,
            debounce_ms,
            events,
            rounds,
            reload_every_ms,
            json,
        } => {
            let o = crate::bench_reload::Options {
                rules,
                iterations,
                debounce: Duration::from_millis(debounce_ms),
                events,
                rounds,
                reload_every: Duration::from_millis(reload_every_ms),
            };
            let report = runtime()?.block_on(crate::bench_reload::run(o))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(())
        }
        Command::Replay {
            events,
            decisions,
            report,
            data,
            skip_invalid,
            quiet,
            workers,
            sort,
            memory_mib,
            measure,
            no_ledger,
            compress,
            sources,
        } => {
            let opts = replay::Options {
                sort,
                measure,
                ledger: !no_ledger,
                compress,
                budget: crate::store::Budget::mib(memory_mib),
                events: events.clone(),
                decisions,
                report,
                rules: sources.rules.clone(),
                plugins: sources.plugin_source(),
                data,
                cache: Some(sources.cache.clone()),
                skip_invalid,
                progress: !quiet,
                limits: sources.limits(),
                workers: workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            };
            let summary =
                replay::run(&opts).with_context(|| format!("replaying {}", events.display()))?;
            for (line, problem) in &summary.skipped_lines {
                eprintln!("skipped line {line}: {problem}");
            }
            for ((plugin, kind), n) in &summary.stats.faults {
                eprintln!("plugin {plugin}: {n} calls failed ({kind})");
            }
            eprint!("{}", crate::measure::to_table(&summary.measures));
            eprintln!("{}", summary.line());
            Ok(())
        }
        Command::Report {
            data,
            url,
            measured,
            html,
            token,
            rules,
            as_of,
            from,
            to,
            campaign,
            json,
            csv,
        } => {
            let time = |field: &str, v: Option<String>| {
                v.map(|v| crate::results::parse_time(field, &v).map_err(anyhow::Error::msg))
                    .transpose()
            };
            let period = crate::reports::Period {
                as_of: time("--as-of", as_of.clone())?.unwrap_or_else(crate::event::now_ms),
                from: time("--from", from.clone())?,
                to: time("--to", to.clone())?,
                campaign: campaign.clone(),
            };
            let rows = match (data, url) {
                (Some(data), _) => crate::reports::from_folder(&data, &rules, &period)?,
                (None, None) if measured.is_some() => {
                    let path = measured.as_deref().unwrap_or(std::path::Path::new(""));
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    text.lines()
                        .enumerate()
                        .filter(|(_, l)| !l.trim().is_empty())
                        .map(|(i, l)| {
                            serde_json::from_str(l).with_context(|| {
                                format!(
                                    "{}:{}: not a line of replay --measure",
                                    path.display(),
                                    i + 1
                                )
                            })
                        })
                        .collect::<anyhow::Result<Vec<crate::measure::Measure>>>()?
                }
                (None, Some(url)) => {
                    let mut query = Vec::new();
                    for (k, v) in [
                        ("as_of", as_of),
                        ("from", from),
                        ("to", to),
                        ("campaign", campaign),
                    ] {
                        if let Some(v) = v {
                            query.push((k, v));
                        }
                    }
                    // The operator commands' client: auth, errors naming
                    // the server's message.
                    let mut path = reqwest::Url::parse("http://nudge/v1/reports")?;
                    path.query_pairs_mut().extend_pairs(&query);
                    let remote = crate::remote::Remote {
                        url,
                        token,
                        json: false,
                    };
                    let answer = runtime()?.block_on(remote.call(
                        reqwest::Method::GET,
                        &format!("/v1/reports?{}", path.query().unwrap_or("")),
                    ))?;
                    serde_json::from_value::<Vec<crate::measure::Measure>>(
                        answer["campaigns"].clone(),
                    )
                    .context("the server's report is not one this version of nudge reads")?
                }
                (None, None) => anyhow::bail!("give --data DIR or --url URL"),
            };
            if let Some(out) = html {
                let page = crate::ui::results::standalone(rows, "What the campaigns achieved");
                std::fs::write(&out, page).with_context(|| format!("writing {}", out.display()))?;
                eprintln!("wrote {}", out.display());
            } else if json {
                print!("{}", crate::measure::to_jsonl(&rows));
            } else if csv {
                print!("{}", crate::measure::to_csv(&rows));
            } else {
                print!("{}", crate::measure::to_table(&rows));
            }
            Ok(())
        }
        Command::Rules {
            command: RulesCommand::Check { dir, sources },
        } => {
            let runtime = Runtime::new(sources.limits(), Some(sources.cache.clone()))?;
            let rules = dir.unwrap_or_else(|| sources.rules.clone());
            let src = crate::reload::Sources {
                plugins: sources.plugin_source(),
                rules: rules.clone(),
                grants: Default::default(),
            };
            let gen = load_once(&runtime, 1, &src).map_err(|errors| {
                anyhow::anyhow!(
                    "{} does not validate ({} errors):\n  {}",
                    rules.display(),
                    errors.len(),
                    errors.join("\n  ")
                )
            })?;
            println!(
                "{}: {} campaigns, {} plugins, {} contact policies",
                if gen.rules.campaigns.is_empty() {
                    "refused"
                } else {
                    "ok"
                },
                gen.rules.campaigns.len(),
                gen.plugins.len(),
                gen.rules.policies.contact.len()
            );
            for p in &gen.plugins {
                println!(
                    "  plugin {} {} ({:?}) from {}",
                    p.name,
                    p.version,
                    p.kind.name(),
                    p.source
                );
            }
            for c in &gen.rules.campaigns {
                println!(
                    "  campaign {} ({}) on {} from {}",
                    c.id,
                    c.owner,
                    c.channel,
                    c.file.display()
                );
            }
            if gen.rules.campaigns.is_empty() {
                // The server takes it only as a forced publish over a
                // generation with campaigns: nothing would decide.
                anyhow::bail!(
                    "{}: no campaign (only policies): nothing would decide",
                    rules.display()
                );
            }
            Ok(())
        }
        Command::Plugin { command } => match command {
            PluginCommand::New {
                kind,
                name,
                dir,
                sdk,
            } => {
                let root = crate::authoring::new_plugin(kind, &name, &dir, sdk.as_deref())?;
                println!("created {}", root.display());
                println!("  test:    cd {} && cargo test", root.display());
                println!(
                    "  build:   nudge plugin build {} --out PLUGINS_FOLDER",
                    root.display()
                );
                Ok(())
            }
            PluginCommand::Build { path, out } => {
                let built = crate::authoring::build_plugin(&path, out.as_deref())?;
                println!("{}", built.display());
                Ok(())
            }
            PluginCommand::Test {
                name,
                events,
                until,
                sources,
            } => {
                let until = match until {
                    Some(u) => Some(
                        crate::event::parse_ts(&u)
                            .with_context(|| format!("--until {u:?}: not an RFC 3339 time"))?,
                    ),
                    None => None,
                };
                let run = crate::authoring::test_plugin(
                    &name,
                    &sources.plugin_source(),
                    &events,
                    until,
                    sources.limits(),
                    Some(sources.cache.clone()),
                )?;
                crate::authoring::print_test(&run)
            }
        },
        Command::StoreUsage { data, json } => store_usage(&data, json),
        Command::Status { all, remote } => runtime()?.block_on(crate::remote::status(&remote, all)),
        Command::Rollback { to, remote } => {
            runtime()?.block_on(crate::remote::rollback(&remote, to))
        }
        Command::Reload { force, remote } => {
            runtime()?.block_on(crate::remote::reload(&remote, force))
        }
        Command::Campaign { command, remote } => {
            let (action, id) = match &command {
                CampaignCommand::Pause { id } => ("pause", Some(id.as_str())),
                CampaignCommand::Resume { id } => ("resume", Some(id.as_str())),
                CampaignCommand::List => ("list", None),
            };
            runtime()?.block_on(crate::remote::campaign(&remote, action, id))
        }
        Command::Release { plugin, remote } => {
            runtime()?.block_on(crate::remote::release(&remote, &plugin))
        }
    }
}

/// `nudge store-usage`.
fn store_usage(data: &Path, json: bool) -> anyhow::Result<()> {
    if !data.join("db").exists() {
        anyhow::bail!("{}: not a nudge store (no `db` in it)", data.display());
    }
    let store = crate::store::Store::open(data)
        .with_context(|| format!("opening the store {}", data.display()))?;
    let usage = store
        .usage()
        .with_context(|| format!("reading the store {}", data.display()))?;
    drop(store);
    let disk = crate::store::disk_bytes(data);
    let (keys, bytes) = usage.values().fold((0, 0), |(k, b), u| {
        (k + u.keys, b + u.key_bytes + u.value_bytes)
    });
    if json {
        let out = serde_json::json!({
            "kinds": usage,
            "keys": keys,
            "content_bytes": bytes,
            "disk_bytes": disk,
        });
        println!("{out}");
        return Ok(());
    }
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>9}",
        "kind", "keys", "key bytes", "value bytes", "per key"
    );
    for (kind, u) in &usage {
        println!(
            "{:<28} {:>12} {:>12} {:>12} {:>9}",
            kind,
            u.keys,
            mb(u.key_bytes),
            mb(u.value_bytes),
            format!("{} B", (u.key_bytes + u.value_bytes) / u.keys.max(1)),
        );
    }
    println!(
        "content {} in {keys} keys; on disk {} ({:.2}x)",
        mb(bytes),
        mb(disk),
        disk as f64 / bytes.max(1) as f64
    );
    Ok(())
}
