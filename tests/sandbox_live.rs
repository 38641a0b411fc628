//! The sandbox's promise on a live server: plugin code that prints and
//! naps at load, a channel plugin that naps on every delivery, and one
//! that sets headers the host owns. The server starts, reloads, delivers
//! on time and refuses what it must, naming why.

use std::path::PathBuf;
use std::time::Duration;

use nudge::event::now_ms;
use nudge_integration_tests::*;
use serde_json::{json, Value};

const API: &str = "Bearer api_test";

/// `echo` (tests/plugins/echo-v1) fires `pong` on every Ping with an even
/// `n`; the campaign sends each pong on the channel `hook`.
const CAMPAIGN: &str = r#"id = "echo"
owner = "tests"
description = "Every pong"
trigger = { plugin = "echo", firing = "pong" }
channel = "hook"
priority = 1
frequency = "0s"
holdout = 0
"#;

struct Folders {
    _dir: tempfile::TempDir,
    plugins: PathBuf,
    rules: PathBuf,
    data: PathBuf,
}

/// Plugins `echo` and the given ones (with their manifests), rules with the
/// echo campaign, channel `hook` delivered by `channel` (or, `None`, just
/// recorded).
fn folders(extra: &[(&str, &str)], channel: Option<&str>) -> Folders {
    let dir = tempfile::tempdir().unwrap();
    let (plugins, rules, data) = (
        dir.path().join("plugins"),
        dir.path().join("rules"),
        dir.path().join("data"),
    );
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    let echo = std::fs::read(test_plugin("test-echo-v1")).unwrap();
    nudge::reload::publish(&plugins, "echo.wasm", &echo).unwrap();
    for (name, manifest) in extra {
        let bytes = std::fs::read(test_plugin(name)).unwrap();
        nudge::reload::publish(&plugins, &format!("{name}.toml"), manifest.as_bytes()).unwrap();
        nudge::reload::publish(&plugins, &format!("{name}.wasm"), &bytes).unwrap();
    }
    let policies = match channel {
        Some(c) => format!("[channels.hook]\nplugin = \"{c}\"\n"),
        None => "[channels.hook]\n".to_owned(),
    };
    nudge::reload::publish(&rules, "policies.toml", policies.as_bytes()).unwrap();
    nudge::reload::publish(&rules, "echo.toml", CAMPAIGN.as_bytes()).unwrap();
    Folders {
        _dir: dir,
        plugins,
        rules,
        data,
    }
}

fn config(f: &Folders) -> nudge::config::Config {
    let mut cfg = test_config(&f.data);
    cfg.server.rules = f.rules.clone();
    cfg.server.plugins = Some(f.plugins.clone());
    cfg.api.tokens = vec!["api_test".into()];
    cfg.reload.debounce = nudge::config::Dur(Duration::from_millis(50));
    cfg.reload.rescan = nudge::config::Dur(Duration::ZERO);
    cfg
}

/// Sends `n` even Pings for different customers in one batch.
fn pings(server: &Server, prefix: &str, n: usize) {
    let batch: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "type": "track",
                "userId": format!("c-{prefix}-{i}"),
                "event": "Ping",
                "messageId": format!("m-{prefix}-{i}"),
                "timestamp": nudge::event::format_ts(now_ms()),
                "properties": { "n": 2 * i },
            })
        })
        .collect();
    let body = serde_json::to_vec(&json!({ "batch": batch })).unwrap();
    let r = server.post("/v1/batch", None, &[], body);
    assert_eq!(r.status, 200, "{}", r.body);
}

fn hostile_channel(mode: &str, receiver: &HttpReceiver) -> String {
    format!(
        "[capabilities]\nhttp = [\"127.0.0.1:{port}\"]\n[config]\nmode = \"{mode}\"\nurl = \"http://127.0.0.1:{port}/hook\"\n",
        port = receiver.port
    )
}

#[test]
fn a_chatty_describe_neither_panics_start_up_nor_stalls_reload() {
    // hostile-describe prints to stdout and stderr and sleeps an hour in
    // `describe`. Start-up loads it on an async runtime thread.
    let f = folders(&[("hostile-describe", "")], None);
    let cfg = config(&f);
    let server = Server::start(cfg.clone());
    let g = server.get("/v1/generations", Some(API)).json();
    let active = g["active"].as_u64().unwrap();
    let plugins = g["generations"][0]["plugins"].to_string();
    assert!(plugins.contains("hostile-describe"), "{g}");
    // A publish builds and activates: the builder is not stuck.
    let edited = CAMPAIGN.replace("Every pong", "Every pong, edited");
    nudge::reload::publish(&f.rules, "echo.toml", edited.as_bytes()).unwrap();
    eventually(Duration::from_secs(20), "the edit to be active", || {
        let g = server.get("/v1/generations", Some(API)).json();
        (g["active"].as_u64().unwrap() > active).then_some(())
    });
    let r = server.post("/v1/generations/reload", Some(API), &[], vec![]);
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop().unwrap();
    // And a restart on the same files comes up too.
    let server = Server::start(cfg);
    assert_eq!(server.get("/healthz", None).status, 200);
    server.stop().unwrap();
}

#[test]
fn a_napping_channel_plugin_does_not_stop_deliveries() {
    let receiver = HttpReceiver::start();
    let manifest = hostile_channel("nap", &receiver);
    let f = folders(&[("hostile-channel", &manifest)], Some("hostile-channel"));
    let server = Server::start(config(&f));
    pings(&server, "nap", 20);
    eventually(Duration::from_secs(30), "all 20 deliveries", || {
        let got = receiver
            .requests()
            .iter()
            .filter(|r| r["path"] == "/hook")
            .count();
        (got == 20).then_some(())
    });
    assert_eq!(
        server.metric("nudge_plugin_faults_total{plugin=\"hostile-channel\",kind=\"deadline\"}"),
        0.0
    );
    server.stop().unwrap();
}

#[test]
fn headers_the_host_owns_are_refused_before_any_connection() {
    let receiver = HttpReceiver::start();
    let manifest = hostile_channel("headers", &receiver);
    let f = folders(&[("hostile-channel", &manifest)], Some("hostile-channel"));
    let server = Server::start(config(&f));
    pings(&server, "hdr", 1);
    let dead = eventually(Duration::from_secs(20), "the dead letter", || {
        let r = server.get("/v1/dead-letters", Some(API));
        r.json()["dead_letters"]
            .as_array()
            .and_then(|l| l.first().cloned())
    });
    let error = dead["last_error"].as_str().unwrap();
    assert!(
        error.contains("\"Host\" is set by the host"),
        "the refusal names the header: {error}"
    );
    assert_eq!(
        server.metric("nudge_plugin_faults_total{plugin=\"hostile-channel\",kind=\"limit\"}"),
        1.0,
        "charged to the channel plugin"
    );
    assert!(receiver.requests().is_empty(), "nothing was sent");
    server.stop().unwrap();
}
