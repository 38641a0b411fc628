//! Tooling for plugin authors: `nudge plugin new`, `nudge plugin build`,
//! `nudge plugin test`. The test runs one plugin against a file of events
//! with the same worker the server uses (event-time clock, a throw-away
//! store) and prints its firings, so an author sees what the plugin does
//! without a server or campaigns.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::event::Event;
use crate::generation::Generation;
use crate::plugins::{Limits, Runtime};
use crate::reload::{load_once, Sources};
use crate::replay::PluginSource;
use crate::rules::RuleSet;
use crate::store::Store;
use crate::worker::{FiringRecord, Worker};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Trigger,
    Response,
    Channel,
}

const TARGET: &str = "wasm32-wasip2";

/// The SDK this binary was built with, file by file: `nudge plugin new`
/// writes it into the new crate when no `--sdk` is given, so a team's
/// plugin repository builds anywhere, with the contract this host speaks.
const SDK_FILES: &[(&str, &str)] = &[
    ("src/lib.rs", include_str!("../../sdk/src/lib.rs")),
    ("src/ctx.rs", include_str!("../../sdk/src/ctx.rs")),
    ("src/guest.rs", include_str!("../../sdk/src/guest.rs")),
    ("src/testing.rs", include_str!("../../sdk/src/testing.rs")),
    ("src/types.rs", include_str!("../../sdk/src/types.rs")),
    ("src/value.rs", include_str!("../../sdk/src/value.rs")),
    (
        "wit/since_v0.1.0/nudge.wit",
        include_str!("../../sdk/wit/since_v0.1.0/nudge.wit"),
    ),
];

/// The vendored SDK's manifest: the workspace's inherited settings spelled
/// out, the same dependencies.
fn sdk_manifest() -> String {
    format!(
        r#"[package]
name = "nudge-sdk"
description = "Write Nudge plugins in Rust (vendored by `nudge plugin new`, nudge {version})"
version = "{version}"
edition = "2021"
license = "Apache-2.0"
publish = false

[dependencies]
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = {{ version = "0.61", default-features = false, features = ["macros", "realloc", "std"] }}
"#,
        version = env!("CARGO_PKG_VERSION")
    )
}

/// Writes the SDK into `dir` (a new folder).
fn vendor_sdk(dir: &Path) -> anyhow::Result<()> {
    for (rel, text) in SDK_FILES {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    let p = dir.join("Cargo.toml");
    std::fs::write(&p, sdk_manifest()).with_context(|| format!("writing {}", p.display()))
}

/// `to` relative to the folder `from` (both absolute), so a crate that
/// points at an SDK beside it still builds once the two move together.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to_c: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to_c).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to_c[common..] {
        out.push(c);
    }
    out
}

/// An `sdk/` folder holding `nudge-sdk` in `dir` or one of its parents
/// (this repository's layout).
fn find_sdk(dir: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(dir).ok()?;
    dir.ancestors().find_map(|a| {
        let manifest = a.join("sdk/Cargo.toml");
        let text = std::fs::read_to_string(&manifest).ok()?;
        text.contains("name = \"nudge-sdk\"").then(|| a.join("sdk"))
    })
}

fn valid_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!("plugin name {name:?}: use lowercase letters, digits and '-', starting with a letter (it is also the crate's name)");
    }
    Ok(())
}

fn camel(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn source(kind: Kind, name: &str) -> String {
    let ty = camel(name);
    match kind {
        Kind::Trigger => format!(
            r#"//! Trigger `{name}`: fires `{name}` when a customer's `Order Completed` is
//! worth at least 100. Campaigns listen for it with
//! `trigger = {{ plugin = "{name}", firing = "{name}" }}`.

use nudge_sdk::prelude::*;

pub struct {ty};

impl Trigger for {ty} {{
    fn info() -> TriggerInfo {{
        TriggerInfo::new("{name}", "0.1.0")
            .subscribes(["Order Completed"])
            .fires(["{name}"])
    }}

    fn on_event(ctx: &mut Ctx, ev: &Event, _customer: &Customer) -> Result<Vec<Firing>, String> {{
        let total = ev.properties.f64("total").unwrap_or(0.0);
        // State is per customer and per plugin: count this customer's orders.
        let orders: u64 = ctx.get("orders").unwrap_or(0) + 1;
        ctx.set("orders", &orders);
        if total < 100.0 {{
            return Ok(vec![]);
        }}
        Ok(vec![Firing::new("{name}")
            .with("total", total)
            .with("orders", orders as i64)])
    }}
}}

export_trigger!({ty});

#[cfg(test)]
mod tests {{
    use super::*;
    use nudge_sdk::testing::TestHost;

    fn order(ts: i64, total: f64) -> Event {{
        let mut p = Fields::new();
        p.insert("total", total);
        Event::track("c-1", "Order Completed", ts, p)
    }}

    #[test]
    fn fires_on_large_orders_only() {{
        let mut host = TestHost::new();
        let c = Customer::default();
        assert!(host.event::<{ty}>(&order(1, 20.0), &c).unwrap().is_empty());
        let fired = host.event::<{ty}>(&order(2, 250.0), &c).unwrap();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].1.name, "{name}");
        assert_eq!(fired[0].1.data.i64("orders"), Some(2));
    }}
}}
"#
        ),
        Kind::Response => format!(
            r#"//! Response `{name}`: pre-thinks the action for a decided campaign:
//! the message for the customer and the script for the contact centre.
//! Campaigns use it with `response = "{name}"`.

use nudge_sdk::prelude::*;

pub struct {ty};

impl Response for {ty} {{
    fn info() -> (String, String) {{
        ("{name}".into(), "0.1.0".into())
    }}

    fn respond(_ctx: &mut Ctx, action: &Action, customer: &Customer) -> Result<Treatment, String> {{
        let who = customer.traits.str("name").unwrap_or("there");
        Ok(Treatment {{
            subject: format!("News for you ({{}})", action.campaign),
            body: format!("Hi {{who}},\n\nwe have something for you.\n"),
            agent_script: format!("Call {{who}} about {{}}.", action.campaign),
            variables: Fields::new(),
        }})
    }}
}}

export_response!({ty});

#[cfg(test)]
mod tests {{
    use super::*;
    use nudge_sdk::testing::TestHost;

    #[test]
    fn names_the_customer() {{
        let action = Action {{
            campaign: "welcome".into(),
            channel: "email".into(),
            ts: 0,
            trigger: "m-1".into(),
            firing: Firing::new("x"),
        }};
        let mut traits = Fields::new();
        traits.insert("name", "Ada");
        let customer = Customer {{ id: "c-1".into(), traits }};
        let mut host = TestHost::new();
        let t = {ty}::respond(&mut Ctx::new(&mut host), &action, &customer).unwrap();
        assert!(t.body.contains("Ada"), "{{}}", t.body);
        assert!(t.agent_script.contains("welcome"));
    }}
}}
"#
        ),
        Kind::Channel => format!(
            r#"//! Channel `{name}`: renders a treatment into what the host sends. The
//! host does the sending, and only what `nudge-plugin.toml` asks for and
//! the operator grants (here: HTTP to the URL's host).
//! Policies route a channel to it with `[channels.NAME] plugin = "{name}"`.

use nudge_sdk::prelude::*;

pub struct {ty};

impl Channel for {ty} {{
    fn info() -> (String, String) {{
        ("{name}".into(), "0.1.0".into())
    }}

    fn deliver(
        _ctx: &mut Ctx,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, String> {{
        let url = config("url").ok_or("no `url` in the plugin's [config]")?;
        let body = serde_json::json!({{
            "customer": recipient.customer_id,
            "subject": treatment.subject,
            "text": treatment.body,
        }});
        Ok(vec![Outbound::Http {{
            method: "POST".into(),
            url,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }}])
    }}
}}

export_channel!({ty});

#[cfg(test)]
mod tests {{
    use super::*;
    use nudge_sdk::testing::TestHost;

    #[test]
    fn posts_the_treatment_to_the_configured_url() {{
        // Natively, `config` reads the process environment.
        std::env::set_var("url", "https://hooks.example.com/nudge");
        let mut host = TestHost::new();
        let r = Recipient {{
            customer_id: "c-1".into(),
            email: None,
            phone: None,
        }};
        let t = Treatment {{
            subject: "Hello".into(),
            ..Treatment::default()
        }};
        let out = {ty}::deliver(&mut Ctx::new(&mut host), &t, &r).unwrap();
        match &out[..] {{
            [Outbound::Http {{ url, body, .. }}] => {{
                assert_eq!(url, "https://hooks.example.com/nudge");
                let body = String::from_utf8_lossy(body);
                assert!(body.contains("c-1") && body.contains("Hello"), "{{body}}");
            }}
            other => panic!("expected one HTTP request, got {{other:?}}"),
        }}
    }}
}}
"#
        ),
    }
}

/// `nudge plugin new`: a crate in `dir/NAME` that builds as is.
pub fn new_plugin(
    kind: Kind,
    name: &str,
    dir: &Path,
    sdk: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    valid_name(name)?;
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let sdk = match sdk {
        Some(s) => {
            Some(std::fs::canonicalize(s).with_context(|| format!("--sdk {}", s.display()))?)
        }
        None => find_sdk(dir),
    };
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("creating {}", root.display()))?;
    // The SDK as a path relative to the crate: this repository's, or the
    // one `--sdk` names, or else a copy of the binary's own inside the crate.
    let sdk_path = match sdk {
        Some(s) => {
            let here =
                std::fs::canonicalize(&root).with_context(|| format!("{}", root.display()))?;
            relative(&here, &s)
        }
        None => {
            vendor_sdk(&root.join("nudge-sdk"))?;
            PathBuf::from("nudge-sdk")
        }
    };
    let serde = if kind == Kind::Channel {
        "serde_json = \"1\"\n"
    } else {
        ""
    };
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

# cdylib is the plugin (`nudge plugin build` compiles it for {TARGET});
# rlib lets `cargo test` run its tests natively against nudge_sdk::testing.
[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
nudge-sdk = {{ path = "{}" }}
{serde}
# A crate of its own, not a member of the folder's workspace.
[workspace]

[profile.release]
opt-level = "s"
strip = true
"#,
        sdk_path.display()
    );
    let write = |rel: &str, text: &str| -> anyhow::Result<()> {
        let p = root.join(rel);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write("Cargo.toml", &cargo)?;
    write("src/lib.rs", &source(kind, name))?;
    let manifest = match kind {
        Kind::Channel => "# What this plugin may ask the host to do; the operator's [plugins.NAME]\n# in nudge.toml can narrow it or redirect it.\n[capabilities]\nhttp = [\"hooks.example.com\"]\n\n[config]\nurl = \"https://hooks.example.com/nudge\"\n",
        _ => "# What this plugin may ask the host to do: nothing beyond its own state\n# and timers.\n[capabilities]\n",
    };
    write("nudge-plugin.toml", manifest)?;
    write(".gitignore", "/target\n")?;
    Ok(root)
}

/// `nudge plugin build`: compiles the crate at `dir` for wasm32-wasip2 and,
/// with `out`, publishes it there as `NAME.wasm` with its manifest as
/// `NAME.toml` (written under a temporary name and renamed, so a watching
/// server never reads half a file). Returns the published (or built) path.
pub fn build_plugin(dir: &Path, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(dir)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo} in {}", dir.display()))?;
    if !output.status.success() {
        bail!(
            "building {} failed (is the target installed? `rustup target add {TARGET}`)",
            dir.display()
        );
    }
    let mut wasm = None;
    for line in output.stdout.split(|b| *b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" {
            for f in v["filenames"].as_array().into_iter().flatten() {
                if let Some(f) = f.as_str().filter(|f| f.ends_with(".wasm")) {
                    wasm = Some((
                        PathBuf::from(f),
                        v["target"]["name"]
                            .as_str()
                            .unwrap_or("plugin")
                            .replace('_', "-"),
                    ));
                }
            }
        }
    }
    let (wasm, name) = wasm.context("cargo built no .wasm (is the crate a cdylib?)")?;
    let Some(out) = out else { return Ok(wasm) };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let publish = |from: &Path, to: &str| -> anyhow::Result<()> {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        crate::reload::publish(out, to, &bytes)
            .with_context(|| format!("publishing {}", out.join(to).display()))
    };
    // The manifest first: a watcher that wakes between the two renames sees
    // the new manifest with the old component, never the reverse.
    let manifest = dir.join("nudge-plugin.toml");
    if manifest.is_file() {
        publish(&manifest, &format!("{name}.toml"))?;
    }
    publish(&wasm, &format!("{name}.wasm"))?;
    let target = out.join(format!("{name}.wasm"));
    Ok(target)
}

/// What `nudge plugin test` did.
pub struct TestRun {
    pub events: usize,
    pub firings: Vec<FiringRecord>,
    pub faults: Vec<String>,
}

/// `nudge plugin test`: `plugin` is a name among `plugins` (a folder, or
/// the built-in examples) or a path to a `.wasm`. Events are decided in file
/// order on an event-time clock; timers still pending after the last event
/// fire if they fall due before `until` (ms).
pub fn test_plugin(
    plugin: &str,
    plugins: &PluginSource,
    events: &Path,
    until: Option<i64>,
    limits: Limits,
    cache: Option<PathBuf>,
) -> anyhow::Result<TestRun> {
    let runtime = Arc::new(Runtime::new(limits, cache)?);
    let empty = tempfile::tempdir().context("temporary folder")?;
    let p = if plugin.ends_with(".wasm") {
        // Just this file (its folder may hold others, even other versions
        // of it), with the manifest beside it.
        let path = Path::new(plugin);
        let bytes = std::fs::read(path).with_context(|| format!("reading {plugin}"))?;
        let mut p = runtime.load(plugin, &bytes)?;
        p.set_manifest(
            crate::manifest::Manifest::beside(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        p
    } else {
        let sources = Sources {
            plugins: plugins.clone(),
            rules: empty.path().to_owned(),
            grants: Default::default(),
        };
        let all = load_once(&runtime, 1, &sources)
            .map_err(|e| anyhow::anyhow!("loading plugins:\n  {}", e.join("\n  ")))?;
        let Some(p) = all.plugin(plugin).cloned() else {
            let names: Vec<&str> = all.plugins.iter().map(|p| p.name.as_str()).collect();
            bail!("no plugin named {plugin:?} (loaded: {})", names.join(", "));
        };
        p
    };
    let name = p.name.clone();
    if p.trigger_info().is_none() {
        bail!("{name} is not a trigger plugin: only triggers see events");
    }
    let rules =
        RuleSet::from_files(empty.path(), Vec::new()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let gen = Generation::build(1, vec![p], rules).map_err(|e| anyhow::anyhow!("{e}"))?;
    let data = tempfile::tempdir().context("temporary folder")?;
    let store = Store::open(data.path())?;
    let mut worker = Worker::new(store, runtime, 0)?;
    worker.firings = Some(Vec::new());
    let file =
        std::fs::File::open(events).with_context(|| format!("reading {}", events.display()))?;
    let mut out = Vec::new();
    let mut n = 0;
    let mut last = i64::MIN;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", events.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let ev = Event::parse(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", events.display(), i + 1))?;
        last = last.max(ev.ts);
        worker.handle(&gen, &ev, &mut out)?;
        n += 1;
    }
    if let Some(u) = until {
        worker.run_timers(&gen, u, &mut out)?;
    }
    let faults = worker
        .stats
        .fault_log
        .iter()
        .map(|f| format!("{} on {} ({}): {}", f.plugin, f.event, f.customer, f.fault))
        .collect();
    Ok(TestRun {
        events: n,
        firings: worker.firings.take().unwrap_or_default(),
        faults,
    })
}

/// Prints a test run: firings as JSON lines on stdout, a summary on stderr.
pub fn print_test(run: &TestRun) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    for f in &run.firings {
        serde_json::to_writer(&mut stdout, f)?;
        writeln!(stdout)?;
    }
    for f in &run.faults {
        eprintln!("fault: {f}");
    }
    eprintln!(
        "{} events, {} firings, {} faults",
        run.events,
        run.firings.len(),
        run.faults.len()
    );
    Ok(())
}
