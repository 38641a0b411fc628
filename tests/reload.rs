//! Hot reload, rollback, pause and quarantine on a live server, with the
//! plugins and rules published as files into folders the server watches.
//!
//! The plugin `echo` exists in two versions (tests/plugins/echo-v1, -v2):
//! 1.0.0 fires `pong` on Pings with an even `n`, 2.0.0 on every Ping; both
//! trap on a Ping with `boom: true`. The campaign `echo` decides on every
//! pong, so which version ran is visible in the decisions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nudge::event::now_ms;
use nudge_integration_tests::*;
use serde_json::{json, Value};

const API: &str = "Bearer api_test";

const POLICIES: &str = "[channels.log]\n";

const CAMPAIGN: &str = r#"id = "echo"
owner = "tests"
description = "Every pong"
trigger = { plugin = "echo", firing = "pong" }
channel = "log"
priority = 1
frequency = "0s"
holdout = 0
"#;

/// A plugins folder and a rules folder, published into as a team would:
/// written beside, then renamed into place.
struct Folders {
    _dir: tempfile::TempDir,
    plugins: PathBuf,
    rules: PathBuf,
    data: PathBuf,
}

impl Folders {
    fn new() -> Folders {
        let dir = tempfile::tempdir().unwrap();
        let (plugins, rules, data) = (
            dir.path().join("plugins"),
            dir.path().join("rules"),
            dir.path().join("data"),
        );
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(&rules).unwrap();
        let f = Folders {
            _dir: dir,
            plugins,
            rules,
            data,
        };
        f.publish_rule("policies.toml", POLICIES);
        f.publish_rule("echo.toml", CAMPAIGN);
        f.publish_plugin("test-echo-v1");
        f
    }

    fn publish(dir: &Path, name: &str, bytes: &[u8]) {
        nudge::reload::publish(dir, name, bytes).unwrap();
    }

    /// Publishes a build of `echo` (`test-echo-v1` or `-v2`) as echo.wasm.
    fn publish_plugin(&self, build: &str) {
        let bytes = std::fs::read(test_plugin(build)).unwrap();
        Folders::publish(&self.plugins, "echo.wasm", &bytes);
    }

    fn publish_rule(&self, name: &str, text: &str) {
        Folders::publish(&self.rules, name, text.as_bytes());
    }

    fn config(&self) -> nudge::config::Config {
        let mut cfg = test_config(&self.data);
        cfg.server.rules = self.rules.clone();
        cfg.server.plugins = Some(self.plugins.clone());
        cfg.api.tokens = vec!["api_test".into()];
        cfg.reload.debounce = nudge::config::Dur(Duration::from_millis(50));
        cfg.reload.rescan = nudge::config::Dur(Duration::ZERO);
        cfg
    }
}

fn ping(customer: &str, id: &str, n: i64, ts: i64, boom: bool) -> Value {
    json!({
        "type": "track",
        "userId": customer,
        "event": "Ping",
        "messageId": id,
        "timestamp": nudge::event::format_ts(ts),
        "properties": { "n": n, "boom": boom },
    })
}

/// Sends one Ping and waits until it is decided.
fn send(server: &Server, id: &str, n: i64, boom: bool) {
    let before = server.metric("nudge_events_processed_total");
    let body = serde_json::to_vec(&ping("c-1", id, n, now_ms(), boom)).unwrap();
    let r = server.post("/v1/track", None, &[], body);
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(20), "the event to be decided", || {
        (server.metric("nudge_events_processed_total") > before).then_some(())
    });
}

fn sent(server: &Server) -> f64 {
    server.metric("nudge_decisions_total{outcome=\"sent\"}")
}

fn generations(server: &Server) -> Value {
    let r = server.get("/v1/generations", Some(API));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn active(server: &Server) -> u64 {
    generations(server)["active"].as_u64().unwrap()
}

/// Waits for a generation newer than `after` to be built; returns its
/// record.
fn next_generation(server: &Server, after: u64) -> Value {
    eventually(Duration::from_secs(30), "a new generation", || {
        generations(server)["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["number"].as_u64().unwrap() > after)
            .cloned()
    })
}

fn latest(server: &Server) -> u64 {
    generations(server)["generations"][0]["number"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_new_plugin_version_is_used_for_the_next_event() {
    let f = Folders::new();
    let server = Server::start(f.config());
    let g = generations(&server);
    assert_eq!(g["active"], 1);
    let first = &g["generations"][0];
    assert_eq!(first["status"], "active");
    assert_eq!(first["cause"], "start");
    assert_eq!(first["plugins"][0]["name"], "echo");
    assert_eq!(first["plugins"][0]["version"], "1.0.0");
    // Who and when, from the files.
    let files = first["files"].as_array().unwrap();
    assert!(files
        .iter()
        .any(|f| f["path"].as_str().unwrap().ends_with("echo.toml")
            && f["sha256"].as_str().unwrap().len() == 64
            && f["modified"].is_string()
            && f["owner"].is_string()));

    send(&server, "odd-1", 1, false);
    assert_eq!(sent(&server), 0.0, "1.0.0 ignores odd pings");

    f.publish_plugin("test-echo-v2");
    let g2 = next_generation(&server, 1);
    assert_eq!(g2["status"], "active", "{g2}");
    assert_eq!(g2["plugins"][0]["version"], "2.0.0");
    assert!(g2["cause"].as_str().unwrap().contains("echo.wasm"), "{g2}");
    assert_eq!(server.metric("nudge_generation_active"), 2.0);

    send(&server, "odd-3", 3, false);
    assert_eq!(sent(&server), 1.0, "2.0.0 decides the very next event");
    server.stop().unwrap();
    let d = decisions(&f.data);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["trigger"], "odd-3");
}

#[test]
fn a_file_written_in_pieces_is_built_once_complete() {
    let f = Folders::new();
    let mut cfg = f.config();
    cfg.reload.debounce = nudge::config::Dur(Duration::from_millis(1000));
    let server = Server::start(cfg);
    // Written in place, in two pieces with a pause shorter than the
    // debounce: the half-written component is never loaded.
    let bytes = std::fs::read(test_plugin("test-echo-v2")).unwrap();
    let (a, b) = bytes.split_at(bytes.len() / 2);
    {
        use std::io::Write;
        let mut file = std::fs::File::create(f.plugins.join("echo.wasm")).unwrap();
        file.write_all(a).unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        file.write_all(b).unwrap();
    }
    let g = next_generation(&server, 1);
    assert_eq!(g["status"], "active", "{g}");
    assert_eq!(g["plugins"][0]["version"], "2.0.0");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(latest(&server), 2, "one build, not one per write");
    server.stop().unwrap();
}

#[test]
fn broken_plugins_and_rules_are_rejected_while_the_old_generation_keeps_deciding() {
    let f = Folders::new();
    let server = Server::start(f.config());

    // Not a component at all.
    Folders::publish(&f.plugins, "broken.wasm", b"\0asm but not really");
    let g = next_generation(&server, 1);
    assert_eq!(g["status"], "rejected", "{g}");
    let errors = g["errors"].to_string();
    assert!(errors.contains("broken.wasm"), "{errors}");
    assert_eq!(active(&server), 1);
    send(&server, "even-2", 2, false);
    assert_eq!(sent(&server), 1.0, "generation 1 still decides");

    std::fs::remove_file(f.plugins.join("broken.wasm")).unwrap();
    let g = next_generation(&server, 2);
    assert_eq!(g["status"], "active", "{g}");

    // An expression that does not compile, on line 6.
    let bad = CAMPAIGN.replace("id = \"echo\"", "id = \"bad\"").replace(
        "channel = \"log\"",
        "channel = \"log\"\nwhen = \"traits.x >\"",
    );
    f.publish_rule("bad.toml", &bad);
    let g = next_generation(&server, 3);
    assert_eq!(g["status"], "rejected", "{g}");
    let errors = g["errors"].to_string();
    assert!(
        errors.contains("bad.toml:6"),
        "names file and line: {errors}"
    );
    assert!(errors.contains("when"), "names the field: {errors}");

    // A campaign on a firing the plugin does not have.
    let wrong = CAMPAIGN
        .replace("id = \"echo\"", "id = \"bad\"")
        .replace("firing = \"pong\"", "firing = \"ping\"");
    f.publish_rule("bad.toml", &wrong);
    let g = next_generation(&server, 4);
    assert_eq!(g["status"], "rejected", "{g}");
    let errors = g["errors"].to_string();
    assert!(
        errors.contains("bad.toml") && errors.contains("no firing \\\"ping\\\""),
        "{errors}"
    );
    assert_eq!(active(&server), 3);
    send(&server, "even-4", 4, false);
    assert_eq!(sent(&server), 2.0, "the last good generation still decides");
    assert!(server.metric("nudge_reloads_total{result=\"rejected\"}") >= 3.0);
    // A rejected generation cannot be activated.
    let r = server.post("/v1/generations/5/activate", Some(API), &[], vec![]);
    assert_eq!(r.status, 409, "{}", r.body);
    server.stop().unwrap();
}

#[test]
fn rollback_and_activation_from_memory_and_after_a_restart() {
    let f = Folders::new();
    let server = Server::start(f.config());
    f.publish_plugin("test-echo-v2");
    assert_eq!(next_generation(&server, 1)["status"], "active");

    // The CLI, as an operator would run it.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge-under-test"))
            .args(args)
            .args(["--url", &server.url(""), "--token", "api_test"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rolled = cli(&["rollback"]);
    assert!(rolled.contains("active now"), "{rolled}");
    assert_eq!(active(&server), 1);
    send(&server, "odd-1", 1, false);
    assert_eq!(sent(&server), 0.0, "1.0.0 is back");
    let status = cli(&["status"]);
    assert!(status.contains("active generation: 1"), "{status}");
    assert!(status.contains("echo@2.0.0"), "{status}");

    let r = server.post("/v1/generations/2/activate", Some(API), &[], vec![]);
    assert_eq!(r.status, 200, "{}", r.body);
    send(&server, "odd-3", 3, false);
    assert_eq!(sent(&server), 1.0, "2.0.0 again");
    assert_eq!(
        server
            .post("/v1/generations/99/activate", Some(API), &[], vec![])
            .status,
        404
    );
    assert_eq!(server.get("/v1/generations", None).status, 401);
    server.stop().unwrap();

    // After a restart generation 1 is no longer in memory: it is rebuilt
    // from the store's archive, even though echo.wasm on disk is 2.0.0.
    let server = Server::start(f.config());
    assert_eq!(active(&server), 2, "the same files: the same generation");
    let r = server.post("/v1/generations/1/activate", Some(API), &[], vec![]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["plugins"][0]["version"], "1.0.0");
    send(&server, "odd-5", 5, false);
    assert_eq!(sent(&server), 0.0, "1.0.0, rebuilt from the archive");
    server.stop().unwrap();

    // An operator's choice stands across a restart, though the folders
    // (2.0.0) differ from it, until the folders change.
    let server = Server::start(f.config());
    assert_eq!(active(&server), 1, "the rollback stands");
    send(&server, "odd-7", 7, false);
    assert_eq!(sent(&server), 0.0);
    f.publish_rule(
        "echo.toml",
        &CAMPAIGN.replace("Every pong", "Every pong, edited"),
    );
    let g = next_generation(&server, 2);
    assert_eq!(g["status"], "active", "{g}");
    assert_eq!(
        g["plugins"][0]["version"], "2.0.0",
        "built from the folders"
    );
    server.stop().unwrap();
}

#[test]
fn a_half_done_publish_is_rejected_unless_forced() {
    let f = Folders::new();
    Folders::publish(&f.plugins, "echo.toml", b"[capabilities]\n");
    let server = Server::start(f.config());
    std::fs::remove_file(f.plugins.join("echo.toml")).unwrap();
    let g = next_generation(&server, 1);
    assert_eq!(g["status"], "rejected", "{g}");
    assert!(
        g["errors"]
            .to_string()
            .contains("echo.toml: the manifest of"),
        "{g}"
    );
    std::fs::remove_file(f.rules.join("echo.toml")).unwrap();
    let g = next_generation(&server, 2);
    assert_eq!(g["status"], "rejected", "{g}");
    assert!(g["errors"].to_string().contains("no campaign left"), "{g}");
    assert_eq!(active(&server), 1);
    // Meant: forced.
    let r = server.post("/v1/generations/reload?force=true", Some(API), &[], vec![]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"], "activated");
    assert_eq!(r.json()["generation"]["campaigns"], json!([]));
    // Nothing changed since: not built again unless forced.
    let r = server.post("/v1/generations/reload", Some(API), &[], vec![]);
    assert_eq!(r.json()["result"], "unchanged");
    server.stop().unwrap();
}

#[test]
fn a_rollback_does_not_lift_a_quarantine() {
    let f = Folders::new();
    let mut cfg = f.config();
    cfg.quarantine.faults = 2;
    let server = Server::start(cfg);
    f.publish_plugin("test-echo-v2");
    assert_eq!(next_generation(&server, 1)["status"], "active");
    send(&server, "boom-0", 0, true);
    send(&server, "boom-1", 0, true);
    assert_eq!(
        generations(&server)["quarantined"]["echo"]["version"],
        "2.0.0"
    );
    let r = server.post("/v1/generations/rollback", Some(API), &[], vec![]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(active(&server), 1);
    // 1.0.0 is another version: it runs. 2.0.0 stays quarantined.
    send(&server, "even-2", 2, false);
    assert_eq!(sent(&server), 1.0);
    assert_eq!(
        generations(&server)["quarantined"]["echo"]["version"],
        "2.0.0"
    );
    let r = server.post("/v1/generations/2/activate", Some(API), &[], vec![]);
    assert_eq!(r.status, 200, "{}", r.body);
    send(&server, "even-4", 4, false);
    assert_eq!(sent(&server), 1.0, "2.0.0 is still quarantined");
    server.stop().unwrap();
}

#[test]
fn old_generations_and_files_only_they_used_are_pruned() {
    let f = Folders::new();
    let mut cfg = f.config();
    cfg.reload.keep = 1;
    cfg.reload.history = 3;
    let server = Server::start(cfg);
    let v1 = generations(&server)["generations"][0]["plugins"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    f.publish_plugin("test-echo-v2");
    let mut last = next_generation(&server, 1)["number"].as_u64().unwrap();
    for edit in 0..3 {
        f.publish_rule(
            "echo.toml",
            &CAMPAIGN.replace("Every pong", &format!("edit {edit}")),
        );
        last = next_generation(&server, last)["number"].as_u64().unwrap();
    }
    let g = generations(&server);
    let numbers: Vec<u64> = g["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [5, 4, 3]);
    assert_eq!(g["total"], 3);
    assert_eq!(
        server
            .post("/v1/generations/1/activate", Some(API), &[], vec![])
            .status,
        404
    );
    server.stop().unwrap();
    // Archived: policies.toml, three echo.toml edits, echo 2.0.0. Not the
    // files only generations 1 and 2 had (echo 1.0.0, the first echo.toml).
    let store = nudge::store::Store::open(&f.data).unwrap();
    let blobs = store.meta_keys("blob/").unwrap();
    assert_eq!(blobs.len(), 5, "{blobs:?}");
    assert!(!blobs.iter().any(|b| b.ends_with(&v1)));
}

#[test]
fn a_campaign_pauses_and_resumes_without_editing_its_file() {
    let f = Folders::new();
    let mut cfg = f.config();
    let named = |name: &str, role, secret: &str| nudge::config::NamedToken {
        name: name.into(),
        role,
        secret: secret.into(),
    };
    cfg.api.token = vec![
        named("ops-ann", nudge::config::Role::Operator, "op_secret"),
        named("desk", nudge::config::Role::Agent, "agent_secret"),
        named("board", nudge::config::Role::Viewer, "viewer_secret"),
    ];
    let server = Server::start(cfg);
    // The contact centre's and the viewer's tokens cannot pause; the
    // viewer's reads; the Bearer scheme is case-insensitive.
    for token in ["Bearer agent_secret", "bearer viewer_secret"] {
        let r = server.post("/v1/campaigns/echo/pause", Some(token), &[], vec![]);
        assert_eq!(r.status, 403, "{token}: {}", r.body);
        assert!(r.json()["error"]
            .as_str()
            .unwrap()
            .contains("needs role operator"));
    }
    assert_eq!(
        server
            .get("/v1/campaigns", Some("BEARER viewer_secret"))
            .status,
        200
    );
    assert_eq!(
        server
            .get("/v1/campaigns", Some("Bearer agent_secret"))
            .status,
        403
    );
    // The record names the token, not what the client says it is.
    let r = server.post(
        "/v1/campaigns/echo/pause",
        Some("Bearer op_secret"),
        &[("x-nudge-user", "someone-else")],
        vec![],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["paused"]["by"], "ops-ann");
    assert_eq!(server.metric("nudge_campaigns_paused"), 1.0);
    send(&server, "even-2", 2, false);
    assert_eq!(sent(&server), 0.0, "paused");
    let list = server.get("/v1/campaigns", Some(API)).json();
    assert_eq!(list["campaigns"][0]["blocked"], "paused");
    assert_eq!(
        server
            .post("/v1/campaigns/nope/pause", Some(API), &[], vec![])
            .status,
        404
    );
    server.stop().unwrap();

    // The pause survives a restart, and a reload.
    let server = Server::start(f.config());
    send(&server, "even-4", 4, false);
    assert_eq!(sent(&server), 0.0, "still paused after a restart");
    let r = server.post("/v1/campaigns/echo/resume", Some(API), &[], vec![]);
    assert_eq!(r.status, 200, "{}", r.body);
    send(&server, "even-6", 6, false);
    assert_eq!(sent(&server), 1.0);
    server.stop().unwrap();
}

#[test]
fn quarantine_trips_on_repeated_faults_and_clears_on_a_new_version() {
    let f = Folders::new();
    let mut cfg = f.config();
    cfg.quarantine.faults = 3;
    cfg.quarantine.window = nudge::config::Dur(Duration::from_secs(60));
    let server = Server::start(cfg);
    let faults = |s: &Server| s.metric("nudge_plugin_faults_total{plugin=\"echo\",kind=\"trap\"}");
    for i in 0..2 {
        send(&server, &format!("boom-{i}"), 0, true);
    }
    assert_eq!(faults(&server), 2.0);
    assert!(generations(&server)["quarantined"]["echo"].is_null());
    send(&server, "boom-2", 0, true);
    let g = generations(&server);
    let q = &g["quarantined"]["echo"];
    assert_eq!(q["version"], "1.0.0", "{g}");
    assert_eq!(q["faults"], 3);
    assert!(q["last_fault"].as_str().unwrap().contains("boom-2"), "{q}");
    assert_eq!(
        server.metric("nudge_plugin_quarantined{plugin=\"echo\"}"),
        1.0
    );
    // Quarantined: the plugin is not called and its campaign not decided.
    send(&server, "boom-3", 0, true);
    send(&server, "even-2", 2, false);
    assert_eq!(faults(&server), 3.0, "not called");
    assert_eq!(sent(&server), 0.0);

    f.publish_plugin("test-echo-v2");
    assert_eq!(next_generation(&server, 1)["status"], "active");
    assert!(generations(&server)["quarantined"]["echo"].is_null());
    assert_eq!(
        server.metric("nudge_plugin_quarantined{plugin=\"echo\"}"),
        0.0
    );
    send(&server, "odd-3", 3, false);
    assert_eq!(sent(&server), 1.0, "2.0.0 runs");
    server.stop().unwrap();
}

#[test]
fn a_faulting_channel_plugin_is_quarantined_and_its_deliveries_wait() {
    let f = Folders::new();
    let bytes = std::fs::read(test_plugin("fault-channel")).unwrap();
    Folders::publish(&f.plugins, "fault-channel.wasm", &bytes);
    f.publish_rule(
        "policies.toml",
        "[channels.log]\nplugin = \"fault-channel\"\n",
    );
    let mut cfg = f.config();
    cfg.quarantine.faults = 2;
    let server = Server::start(cfg);
    let faults =
        |s: &Server| s.metric("nudge_plugin_faults_total{plugin=\"fault-channel\",kind=\"trap\"}");
    send(&server, "even-2", 2, false);
    assert_eq!(sent(&server), 1.0);
    // The delivery traps, is retried (100 ms backoff in tests), traps again.
    eventually(Duration::from_secs(20), "the channel quarantined", || {
        generations(&server)["quarantined"]["fault-channel"]
            .is_object()
            .then_some(())
    });
    assert_eq!(faults(&server), 2.0);
    // Its campaigns are not decided; its delivery waits without using
    // attempts, and is not dead-lettered.
    send(&server, "even-4", 4, false);
    assert_eq!(sent(&server), 1.0);
    eventually(Duration::from_secs(20), "the delivery held", || {
        (server.metric("nudge_deliveries_total{channel=\"log\",result=\"held\"}") >= 1.0)
            .then_some(())
    });
    assert_eq!(faults(&server), 2.0, "not called while quarantined");
    let dead = server.get("/v1/dead-letters", Some(API)).json();
    assert_eq!(dead["dead_letters"].as_array().unwrap().len(), 0);
    // Released by hand: the held delivery is tried again (and traps again).
    let r = server.delete("/v1/plugins/fault-channel/quarantine", Some(API));
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(30), "the delivery tried again", || {
        (faults(&server) >= 3.0).then_some(())
    });
    server.stop().unwrap();
}

/// Events stream in while generations are swapped many times (plugin
/// versions, rule edits, and rejected publishes); every event sent is
/// decided exactly once.
#[test]
fn reload_under_load_processes_every_event_exactly_once() {
    const EVENTS: usize = 4000;
    const BATCH: usize = 50;
    let f = Folders::new();
    let server = Server::start(f.config());
    let url = server.url("/v1/batch");
    let base = now_ms();
    let sender = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = reqwest::Client::new();
        let mut ids = Vec::with_capacity(EVENTS);
        for chunk in 0..EVENTS / BATCH {
            let batch: Vec<Value> = (0..BATCH)
                .map(|j| {
                    let i = chunk * BATCH + j;
                    let id = format!("m-{i}");
                    ids.push(id.clone());
                    // Even n: both versions fire; distinct times per customer.
                    ping(
                        &format!("c-{}", i % 97),
                        &id,
                        2 * i as i64,
                        base + i as i64,
                        false,
                    )
                })
                .collect();
            let body = serde_json::to_vec(&json!({ "batch": batch })).unwrap();
            loop {
                let status = rt.block_on(async {
                    client
                        .post(&url)
                        .body(body.clone())
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                });
                match status {
                    Ok(200) => break,
                    Ok(503) => std::thread::sleep(Duration::from_millis(20)),
                    other => panic!("batch {chunk}: {other:?}"),
                }
            }
            // Paced, so the stream spans many swaps.
            std::thread::sleep(Duration::from_millis(30));
        }
        ids
    });

    let mut swaps = 0;
    let mut rejected = 0;
    let mut last = latest(&server);
    while !sender.is_finished() {
        match swaps % 4 {
            0 => f.publish_plugin("test-echo-v2"),
            1 => f.publish_rule(
                "echo.toml",
                &CAMPAIGN.replace("Every pong", &format!("Every pong, edit {swaps}")),
            ),
            2 => f.publish_plugin("test-echo-v1"),
            _ => f.publish_rule("broken.toml", "id = \"broken\"\nthis is not toml"),
        }
        let g = next_generation(&server, last);
        last = g["number"].as_u64().unwrap();
        if g["status"] == "rejected" {
            rejected += 1;
            let _ = std::fs::remove_file(f.rules.join("broken.toml"));
            last = next_generation(&server, last)["number"].as_u64().unwrap();
        }
        swaps += 1;
    }
    let ids = sender.join().unwrap();
    eventually(Duration::from_secs(60), "every event decided", || {
        (server.metric("nudge_events_processed_total") >= EVENTS as f64).then_some(())
    });
    assert!(swaps >= 15, "only {swaps} swaps happened during the stream");
    assert!(rejected >= 1);
    assert_eq!(server.metric("nudge_events_processed_total"), EVENTS as f64);
    // Every decision made, counted as it was made: a duplicate would show
    // here even where the log's key would hide it.
    assert_eq!(sent(&server), EVENTS as f64);
    server.stop().unwrap();

    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for d in decisions(&f.data) {
        *seen
            .entry(d["trigger"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let missing: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} events without a decision: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(seen.values().all(|n| *n == 1));
    assert_eq!(seen.len(), EVENTS, "no decision for an event not sent");
    eprintln!("{swaps} swaps ({rejected} rejected) during {EVENTS} events");
}

#[test]
fn a_grant_for_a_plugin_that_is_not_loaded_is_an_error_naming_it() {
    let runtime = nudge::plugins::Runtime::new(Default::default(), Some(cache_dir())).unwrap();
    let mut grants = std::collections::BTreeMap::new();
    grants.insert("webhok".to_string(), nudge::config::PluginGrant::default());
    let sources = nudge::reload::Sources {
        plugins: nudge::replay::PluginSource::Embedded,
        rules: root().join("rules"),
        grants,
    };
    let errors = nudge::reload::load_once(&runtime, 1, &sources).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("config [plugins.webhok]: no plugin named \"webhok\" is loaded")
            && errors[0].contains("webhook"),
        "{errors:?}"
    );
}

#[test]
fn start_up_rebuilds_from_the_archive_after_the_rules_folder_moved() {
    let f = Folders::new();
    let server = Server::start(f.config());
    let first = active(&server);
    send(&server, "even-2", 2, false);
    assert_eq!(sent(&server), 1.0);
    server.stop().unwrap();
    // The operator points the server at a new rules folder whose files are
    // broken: start-up falls back to the generation active last, rebuilt
    // from the archive alone (its policies.toml included).
    let moved = tempfile::tempdir().unwrap();
    std::fs::write(moved.path().join("policies.toml"), "[channels.log]\n").unwrap();
    std::fs::write(moved.path().join("echo.toml"), "id = \"echo\"\ntrigger = {").unwrap();
    let mut cfg = f.config();
    cfg.server.rules = moved.path().to_owned();
    let server = Server::start(cfg);
    assert_eq!(active(&server), first, "the archived generation runs");
    send(&server, "even-4", 4, false);
    assert_eq!(
        sent(&server),
        1.0,
        "and decides: a new process, a new count"
    );
    server.stop().unwrap();
}
