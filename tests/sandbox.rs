//! The sandbox's promise, class by class, with a hostile plugin the
//! examples never load (`tests/plugins/hostile`, its misbehaviour chosen
//! by its manifest's `mode`): a blocking call, a flood of output, a timer
//! that re-arms itself, state and return values past their budgets, and
//! randomness. Each runs in a replay beside the example campaigns; the
//! replay ends, the fault is named and charged to the hostile plugin, and
//! the other campaigns decide exactly as without it.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nudge::plugins::Limits;
use nudge::replay::{self, Options, PluginSource, Summary};
use nudge_integration_tests::{cache_dir, copy_examples, fixture, test_plugin};

/// Enough of seed1 for a few dozen deposits per run.
const LINES: usize = 3000;

/// Longest a replay of [`LINES`] may take before the test calls it hung:
/// far above the second or so it takes, far below "for ever".
const HUNG: Duration = Duration::from_secs(120);

/// The hostile plugin's campaign. `when` decides whether it ever
/// qualifies: `false` lets the plugin run without changing any decision.
fn campaign(when: &str) -> String {
    format!(
        r#"id = "hostile"
trigger = {{ plugin = "hostile", firing = "x" }}
channel = "agent"
priority = 1000
frequency = "1d"
when = '{when}'
"#
    )
}

struct Setup {
    /// `[config] mode = …` of the hostile plugin; `None`: not loaded.
    mode: Option<&'static str>,
    when: &'static str,
    limits: Limits,
}

fn events(dir: &Path) -> PathBuf {
    let events = dir.join("events.jsonl");
    if !events.exists() {
        let all = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
        let head: Vec<&str> = all.lines().take(LINES).collect();
        std::fs::write(&events, head.join("\n")).unwrap();
    }
    events
}

fn options(dir: &Path, label: &str, s: &Setup) -> Options {
    let sub = dir.join(label);
    let plugins = sub.join("plugins");
    let rules = sub.join("rules");
    copy_examples(&plugins, &rules);
    if let Some(mode) = s.mode {
        std::fs::copy(test_plugin("hostile"), plugins.join("hostile.wasm")).unwrap();
        std::fs::write(
            plugins.join("hostile.toml"),
            format!("[config]\nmode = \"{mode}\"\n"),
        )
        .unwrap();
        std::fs::write(rules.join("hostile.toml"), campaign(s.when)).unwrap();
    }
    Options {
        events: events(dir),
        decisions: sub.join("decisions.jsonl"),
        report: sub.join("report.jsonl"),
        rules,
        plugins: PluginSource::Dir(plugins),
        data: None,
        cache: Some(cache_dir()),
        skip_invalid: false,
        progress: false,
        limits: s.limits.clone(),
        workers: 2,
        budget: nudge::store::Budget::default(),
        sort: false,
        measure: None,
        ledger: true,
        compress: false,
    }
}

/// Replays on a thread of its own, so a hang fails the test instead of
/// stalling the suite.
fn replay(opts: Options) -> (Summary, String) {
    let (tx, rx) = mpsc::channel();
    let decisions = opts.decisions.clone();
    std::thread::spawn(move || {
        let _ = tx.send(replay::run(&opts).map_err(|e| e.to_string()));
    });
    let summary = rx
        .recv_timeout(HUNG)
        .expect("the replay ended")
        .expect("the replay succeeded");
    (summary, std::fs::read_to_string(decisions).unwrap())
}

fn healthy(dir: &Path) -> String {
    let s = Setup {
        mode: None,
        when: "false",
        limits: Limits::default(),
    };
    let (summary, decisions) = replay(options(dir, "healthy", &s));
    assert!(summary.stats.faults.is_empty());
    assert!(decisions.lines().count() > 50, "the baseline decides");
    decisions
}

fn deposits(dir: &Path) -> u64 {
    std::fs::read_to_string(events(dir))
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""event":"Deposit Made""#))
        .count() as u64
}

/// What faults a mode should cause.
enum Expect {
    /// None at all.
    Clean,
    /// Every deposit call faults as this kind, saying this.
    Every(&'static str, &'static str),
    /// Some calls fault as this kind, the first saying this.
    Some(&'static str, &'static str),
}

/// Runs `mode` beside the examples and checks the outcome: the faults
/// expected, charged to the hostile plugin alone, and the other campaigns
/// deciding exactly as without it.
fn contained(mode: &'static str, expect: Expect, limits: Limits) -> Summary {
    let dir = tempfile::tempdir().unwrap();
    let want = healthy(dir.path());
    let s = Setup {
        mode: Some(mode),
        when: "false",
        limits,
    };
    let (summary, got) = replay(options(dir.path(), mode, &s));
    let faults = &summary.stats.faults;
    let (kind, what) = match expect {
        Expect::Clean => {
            assert!(faults.is_empty(), "{mode}: no faults: {faults:?}");
            ("", "")
        }
        Expect::Every(kind, what) => {
            assert_eq!(
                faults.get(&("hostile".to_string(), kind)).copied(),
                Some(deposits(dir.path())),
                "{mode}: every deposit call of the hostile plugin faults as {kind}: {faults:?}"
            );
            (kind, what)
        }
        Expect::Some(kind, what) => {
            assert!(
                faults
                    .get(&("hostile".to_string(), kind))
                    .is_some_and(|&n| n > 0),
                "{mode}: some calls fault as {kind}: {faults:?}"
            );
            (kind, what)
        }
    };
    if !kind.is_empty() {
        let first = &summary.stats.fault_log[0];
        assert_eq!(first.plugin, "hostile");
        let text = first.fault.to_string();
        assert!(
            text.contains(what),
            "{mode}: the fault says {what:?}: {text}"
        );
    }
    assert!(
        faults.keys().all(|(p, _)| p == "hostile"),
        "{mode}: only the hostile plugin is charged: {faults:?}"
    );
    assert!(
        got == want,
        "{mode}: the other campaigns decided differently"
    );
    summary
}

#[test]
fn a_sleep_returns_at_once_on_the_frozen_clock() {
    // An hour's sleep per deposit: the replay would take days if a sleep
    // blocked the host thread.
    contained("sleep", Expect::Clean, Limits::default());
}

#[test]
fn a_napping_loop_is_stopped_by_the_deadline() {
    let limits = Limits {
        deadline: Duration::from_millis(50),
        ..Limits::default()
    };
    contained(
        "nap-loop",
        Expect::Every("deadline", "deadline of 50ms"),
        limits,
    );
}

#[test]
fn stdout_and_stderr_are_captured_within_the_log_budget() {
    // 256 KiB to each stream per call: dropped past the 64 KiB budget,
    // never a fault, never written to the host's stdout.
    contained("print", Expect::Clean, Limits::default());
}

#[test]
fn a_log_flood_is_cut_to_the_budget() {
    contained("log-flood", Expect::Clean, Limits::default());
}

#[test]
fn a_timer_re_armed_at_its_own_due_time_is_refused() {
    // The deposit calls set the timer; its firing re-arms it at its own due
    // time, which is refused: a fault per timer, and the replay ends.
    contained(
        "timer-now",
        Expect::Some("limit", "minimum delay"),
        Limits::default(),
    );
}

#[test]
fn a_timer_re_armed_in_the_past_is_refused() {
    contained(
        "timer-past",
        Expect::Some("limit", "minimum delay"),
        Limits::default(),
    );
}

#[test]
fn a_timer_stepping_a_second_at_a_time_is_capped_per_advance() {
    let limits = Limits {
        max_timer_firings: 20,
        ..Limits::default()
    };
    contained(
        "timer-step",
        Expect::Some("limit", "fired more than 20 times for one customer"),
        limits,
    );
}

#[test]
fn state_past_the_per_call_budget_is_a_fault() {
    contained(
        "state-flood",
        Expect::Every("limit", "bytes of state written in one call"),
        Limits::default(),
    );
}

#[test]
fn state_past_the_quota_is_a_fault() {
    // 512 KiB a deposit under a 2 MiB quota: the customers with more than
    // three deposits go over it.
    let limits = Limits {
        state_quota: 2 << 20,
        ..Limits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let s = Setup {
        mode: Some("state-grow"),
        when: "false",
        limits,
    };
    let (summary, _) = replay(options(dir.path(), "grow", &s));
    let over = summary
        .stats
        .fault_log
        .iter()
        .find(|f| f.fault.to_string().contains("state quota"));
    assert!(over.is_some(), "{:?}", summary.stats.faults);
    let limit_faults = summary.stats.faults[&("hostile".to_string(), "limit")];
    assert!(
        limit_faults < deposits(dir.path()),
        "only the calls past the quota fault"
    );
}

#[test]
fn a_firing_past_the_output_budget_is_charged_to_its_producer() {
    // 4 MiB of JSON in one firing: the trigger plugin is charged, and the
    // response plugin never sees it.
    contained(
        "big-firing",
        Expect::Every("limit", "over the 1048576-byte limit"),
        Limits::default(),
    );
}

#[test]
fn randomness_and_hash_order_are_the_same_in_every_replay() {
    let dir = tempfile::tempdir().unwrap();
    // The campaign decides on the random number, so the decisions show it.
    let s = Setup {
        mode: Some("random"),
        when: "firing.r % 2 == 0",
        limits: Limits::default(),
    };
    let (_, first) = replay(options(dir.path(), "random-1", &s));
    let (_, second) = replay(options(dir.path(), "random-2", &s));
    let ours = first
        .lines()
        .filter(|l| l.contains(r#""campaign":"hostile""#))
        .count() as u64;
    assert!(
        ours > 0 && ours < deposits(dir.path()),
        "{ours} of the deposits qualify"
    );
    assert!(
        first == second,
        "two replays of the same input decide the same"
    );
}
