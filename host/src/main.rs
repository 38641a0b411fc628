//! The `nudge` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use nudge::plugins::{Limits, Runtime};

// Events allocate many small, short-lived strings and maps across threads;
// mimalloc handles that pattern markedly faster than glibc's malloc
// (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use nudge::replay::{self, PluginSource};

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
        #[command(flatten)]
        sources: Sources,
    },
    /// Rules: validate campaigns and policies against the plugins.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Check a rules folder as the server would load it.
    Check {
        #[command(flatten)]
        sources: Sources,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Replay {
            events,
            decisions,
            report,
            data,
            skip_invalid,
            quiet,
            workers,
            sources,
        } => {
            let opts = replay::Options {
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
            print!("{}", nudge::report::to_table(&summary.report));
            eprintln!("{}", summary.line());
            Ok(())
        }
        Command::Rules {
            command: RulesCommand::Check { sources },
        } => {
            let runtime = Runtime::new(sources.limits(), Some(sources.cache.clone()))?;
            let gen =
                replay::load_generation(&runtime, 1, &sources.plugin_source(), &sources.rules)
                    .with_context(|| format!("checking {}", sources.rules.display()))?;
            println!(
                "ok: {} campaigns, {} plugins, {} contact policies",
                gen.rules.campaigns.len(),
                gen.plugins.len(),
                gen.rules.policies.contact.len()
            );
            for p in &gen.plugins {
                println!(
                    "  plugin {} {} ({:?}) from {}",
                    p.name,
                    p.version,
                    kind_name(&p.kind),
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
            Ok(())
        }
    }
}

fn kind_name(k: &nudge::plugins::PluginKind) -> &'static str {
    match k {
        nudge::plugins::PluginKind::Trigger(_) => "trigger",
        nudge::plugins::PluginKind::Response => "response",
        nudge::plugins::PluginKind::Channel => "channel",
    }
}
