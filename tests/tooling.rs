//! The plugin author's and the operator's tools, run as a team would run
//! them: `nudge plugin new`, `nudge plugin build`, `nudge plugin test`,
//! `nudge rules check`.

use std::path::Path;
use std::process::{Command, Output};

use nudge_integration_tests::*;
use serde_json::Value;

fn nudge(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nudge-under-test"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running nudge")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The firings `nudge plugin test` printed.
fn firings(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `nudge plugin build CRATE --out PLUGINS`, in the workspace's guest target
/// folder with the guest build's settings, so the SDK's dependencies are
/// not compiled again.
fn build(crate_dir: &Path, plugins: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nudge-under-test"))
        .args(["plugin", "build"])
        .arg(crate_dir)
        .arg("--out")
        .arg(plugins)
        .env("CARGO_TARGET_DIR", root().join("target/wasm-guests"))
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .output()
        .expect("running nudge plugin build")
}

fn write_events(dir: &Path, lines: &[&str]) -> std::path::PathBuf {
    let p = dir.join("events.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

#[test]
fn a_new_trigger_plugin_builds_tests_and_runs_against_events() {
    // Outside this repository and without --sdk: the binary writes its own
    // SDK into the crate, so the crate builds wherever it is moved.
    let dir = tempfile::tempdir().unwrap();
    let made = tempfile::tempdir().unwrap();
    let out = nudge(
        &["plugin", "new", "--kind", "trigger", "big-order"],
        made.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let crate_dir = dir.path().join("big-order");
    std::fs::rename(made.path().join("big-order"), &crate_dir).unwrap();
    for f in [
        "Cargo.toml",
        "src/lib.rs",
        "nudge-plugin.toml",
        "nudge-sdk/Cargo.toml",
        "nudge-sdk/wit/since_v0.1.0/nudge.wit",
    ] {
        assert!(crate_dir.join(f).is_file(), "{f} missing");
    }
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"nudge-sdk = { path = "nudge-sdk" }"#),
        "{manifest}"
    );
    assert!(
        !manifest.contains(made.path().to_str().unwrap()),
        "{manifest}"
    );
    // Creating it twice is refused, not overwritten.
    let again = nudge(
        &["plugin", "new", "--kind", "trigger", "big-order"],
        dir.path(),
    );
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"));
    let bad = nudge(
        &["plugin", "new", "--kind", "trigger", "Big Order"],
        dir.path(),
    );
    assert!(
        text(&bad.stderr).contains("lowercase"),
        "{}",
        text(&bad.stderr)
    );

    // Built for wasm32-wasip2 and published into a plugins folder. The
    // workspace's guest target folder is shared, so the SDK's dependencies
    // are not compiled again.
    let plugins = dir.path().join("plugins");
    let build = build(&crate_dir, &plugins);
    assert!(build.status.success(), "{}", text(&build.stderr));
    let wasm = plugins.join("big-order.wasm");
    assert!(wasm.is_file());
    assert!(
        plugins.join("big-order.toml").is_file(),
        "manifest published"
    );

    // Its firings on a file of events.
    let events = write_events(
        dir.path(),
        &[
            r#"{"type":"track","userId":"c1","event":"Order Completed","messageId":"m1","timestamp":"2026-01-01T00:00:00Z","properties":{"total":20}}"#,
            r#"{"type":"track","userId":"c1","event":"Order Completed","messageId":"m2","timestamp":"2026-01-01T00:01:00Z","properties":{"total":250}}"#,
            r#"{"type":"track","userId":"c2","event":"Order Completed","messageId":"m3","timestamp":"2026-01-01T00:02:00Z","properties":{"total":300}}"#,
        ],
    );
    let run = nudge(
        &[
            "plugin",
            "test",
            wasm.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let f = firings(&run);
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0]["firing"], "big-order");
    assert_eq!(f[0]["cause"], "m2");
    assert_eq!(f[0]["data"]["orders"], 2, "state kept per customer");
    assert_eq!(f[1]["customer"], "c2");
    assert_eq!(f[1]["data"]["orders"], 1);
    assert!(text(&run.stderr).contains("3 events, 2 firings, 0 faults"));

    // By name from a plugins folder works the same.
    let by_name = nudge(
        &[
            "plugin",
            "test",
            "big-order",
            "--plugins",
            plugins.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(by_name.status.success(), "{}", text(&by_name.stderr));
    assert_eq!(firings(&by_name), f);
}

/// Every kind's scaffold compiles for wasm32-wasip2, loads as a plugin of
/// that kind, and its own test passes natively.
#[test]
fn every_scaffold_builds_loads_and_passes_its_own_test() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = root().join("sdk");
    for (kind, name) in [
        ("trigger", "t-scaffold"),
        ("response", "r-scaffold"),
        ("channel", "c-scaffold"),
    ] {
        let out = nudge(
            &[
                "plugin",
                "new",
                "--kind",
                kind,
                name,
                "--sdk",
                sdk.to_str().unwrap(),
            ],
            dir.path(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let crate_dir = dir.path().join(name);
        // One target folder for the three, inside the workspace's, so the
        // SDK's native dependencies compile once per machine.
        let test = Command::new(env!("CARGO"))
            .args(["test", "--quiet"])
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", root().join("target/scaffold-native"))
            .output()
            .unwrap();
        assert!(
            test.status.success(),
            "{kind}: cargo test: {}{}",
            text(&test.stdout),
            text(&test.stderr)
        );
        assert!(
            text(&test.stdout).contains("1 passed"),
            "{}",
            text(&test.stdout)
        );
        let plugins = dir.path().join("plugins");
        let build = build(&crate_dir, &plugins);
        assert!(build.status.success(), "{}", text(&build.stderr));
    }
    // The three load together as a plugins folder, each as its kind.
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let check = nudge(
        &[
            "rules",
            "check",
            rules.to_str().unwrap(),
            "--plugins",
            dir.path().join("plugins").to_str().unwrap(),
        ],
        dir.path(),
    );
    // No campaign: the check lists what it loaded and refuses the folder,
    // as nothing would decide.
    assert!(!check.status.success());
    assert!(
        text(&check.stderr).contains("no campaign (only policies): nothing would decide"),
        "{}",
        text(&check.stderr)
    );
    let listed = text(&check.stdout);
    for line in [
        "plugin t-scaffold 0.1.0 (\"trigger\")",
        "plugin r-scaffold 0.1.0 (\"response\")",
        "plugin c-scaffold 0.1.0 (\"channel\")",
    ] {
        assert!(listed.contains(line), "{line} in {listed}");
    }
}

#[test]
fn plugin_test_fires_timers_and_reports_faults() {
    let dir = tempfile::tempdir().unwrap();
    // The example cart-abandonment trigger: a cart with no order within its
    // window fires from a timer.
    let events = write_events(
        dir.path(),
        &[
            r#"{"type":"track","userId":"c1","event":"Product Added","messageId":"a1","timestamp":"2026-01-01T00:00:00Z","properties":{"price":10}}"#,
        ],
    );
    let run = nudge(
        &[
            "plugin",
            "test",
            "cart-timer",
            "--events",
            events.to_str().unwrap(),
            "--until",
            "2026-01-03T00:00:00Z",
        ],
        dir.path(),
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let f = firings(&run);
    assert_eq!(f.len(), 1, "{}", text(&run.stdout));
    assert!(
        f[0]["cause"].as_str().unwrap().starts_with("timer:"),
        "{f:?}"
    );

    let trap = test_plugin("fault-trap");
    let events = write_events(
        dir.path(),
        &[
            r#"{"type":"track","userId":"c1","event":"Deposit Made","messageId":"d1","timestamp":"2026-01-01T00:00:00Z","properties":{}}"#,
        ],
    );
    let run = nudge(
        &[
            "plugin",
            "test",
            trap.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(run.status.success());
    let err = text(&run.stderr);
    assert!(
        err.contains("fault: fault-trap on d1") && err.contains("trap"),
        "{err}"
    );

    let unknown = nudge(
        &[
            "plugin",
            "test",
            "nope",
            "--events",
            events.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("no plugin named \"nope\""));
}

#[test]
fn rules_check_validates_a_folder_as_the_server_would() {
    let rules = rules_copy();
    let ok = nudge(&["rules", "check", rules.path().to_str().unwrap()], &root());
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(
        text(&ok.stdout).starts_with("ok: 7 campaigns"),
        "{}",
        text(&ok.stdout)
    );

    std::fs::write(
        rules.path().join("broken.toml"),
        "id = \"broken\"\nowner = \"x\"\ndescription = \"x\"\ntrigger = { plugin = \"cart-timer\", firing = \"nope\" }\nchannel = \"email\"\npriority = 1\nfrequency = \"1d\"\nholdout = 0\n",
    )
    .unwrap();
    let bad = nudge(&["rules", "check", rules.path().to_str().unwrap()], &root());
    assert_eq!(bad.status.code(), Some(1));
    let err = text(&bad.stderr);
    assert!(err.contains("broken.toml:4"), "{err}");
    assert!(err.contains("trigger.firing"), "{err}");
    assert!(err.contains("no firing \"nope\""), "{err}");
}
