//! Contained plugin faults: a plugin that traps, one that loops forever and
//! one that allocates without bound, each loaded next to the healthy example
//! campaigns. The faulty campaign decides nothing, its faults are recorded
//! (plugin, version, event, error), and every other campaign decides exactly
//! as it does without the faulty plugin.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nudge::plugins::Limits;
use nudge::replay::{self, Options, PluginSource, Summary};
use nudge_integration_tests::{cache_dir, copy_examples, fixture, test_plugin};

/// The first lines of seed1: enough deposits to hit the faulty plugin a few
/// hundred times, few enough that a deadline per call stays cheap.
const LINES: usize = 3000;

fn setup(dir: &Path, fault: Option<&str>) -> (PathBuf, PathBuf) {
    let plugins = dir.join("plugins");
    let rules = dir.join("rules");
    copy_examples(&plugins, &rules);
    if let Some(fault) = fault {
        std::fs::copy(test_plugin(fault), plugins.join(format!("{fault}.wasm"))).unwrap();
        // Highest priority, agent channel (no consent needed): if it ever
        // fired it would win arbitration and change other decisions.
        std::fs::write(
            rules.join("faulty.toml"),
            format!(
                r#"id = "faulty"
trigger = {{ plugin = "{fault}", firing = "x" }}
channel = "agent"
priority = 1000
frequency = "1d"
"#
            ),
        )
        .unwrap();
    }
    (plugins, rules)
}

fn run(dir: &Path, fault: Option<&str>, deadline: Duration) -> (Summary, String) {
    let events = dir.join("events.jsonl");
    if !events.exists() {
        let all = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
        let head: Vec<&str> = all.lines().take(LINES).collect();
        std::fs::write(&events, head.join("\n")).unwrap();
    }
    let sub = dir.join(fault.unwrap_or("healthy"));
    let (plugins, rules) = setup(&sub, fault);
    let opts = Options {
        events,
        decisions: sub.join("decisions.jsonl"),
        report: sub.join("report.jsonl"),
        rules,
        plugins: PluginSource::Dir(plugins),
        data: None,
        cache: Some(cache_dir()),
        skip_invalid: false,
        progress: false,
        limits: Limits {
            deadline,
            memory_bytes: 32 << 20,
            ..Limits::default()
        },
        workers: 2,
        budget: nudge::store::Budget::default(),
        sort: false,
        measure: None,
        ledger: true,
        compress: false,
    };
    let summary = replay::run(&opts).unwrap();
    let decisions = std::fs::read_to_string(&opts.decisions).unwrap();
    (summary, decisions)
}

fn check(fault: &str, kind: &str, deadline: Duration) {
    let dir = tempfile::tempdir().unwrap();
    // The healthy baseline is about decisions, not deadlines: with the
    // spin test hogging the other core, a 200 ms wall-clock deadline
    // sometimes caught a healthy call of a debug build.
    let (healthy, want) = run(dir.path(), None, deadline.max(Duration::from_secs(5)));
    assert!(
        healthy.stats.faults.is_empty(),
        "the healthy baseline faulted: {:?}",
        healthy.stats.fault_log
    );
    assert!(
        want.lines().count() > 50,
        "the healthy baseline decides something"
    );

    let (s, got) = run(dir.path(), Some(fault), deadline);
    let deposits = std::fs::read_to_string(dir.path().join("events.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""event":"Deposit Made""#))
        .count() as u64;
    assert!(deposits > 20);
    assert_eq!(
        s.stats.faults.get(&(fault.to_string(), kind)).copied(),
        Some(deposits),
        "every call of {fault} is recorded as {kind}: {:?}",
        s.stats.faults
    );
    let first = &s.stats.fault_log[0];
    assert_eq!(first.plugin, fault);
    assert_eq!(first.version, "0.1.0");
    assert!(first.event.starts_with("m-"), "{first:?}");
    assert!(!got.contains(r#""campaign":"faulty""#));
    assert!(
        got == want,
        "healthy campaigns decided differently next to {fault}"
    );
}

#[test]
fn a_trapping_plugin_is_contained() {
    // A trap is immediate: no deadline pressure needed.
    check("fault-trap", "trap", Duration::from_secs(5));
}

#[test]
fn an_endless_loop_hits_the_deadline() {
    // The deadline applies to every plugin alike: short enough to keep the
    // test quick, long enough that a healthy call preempted by a busy CI
    // machine still makes it.
    check("fault-spin", "deadline", Duration::from_millis(50));
}

#[test]
fn a_memory_bomb_hits_the_cap() {
    check("fault-membomb", "memory", Duration::from_millis(1000));
}
