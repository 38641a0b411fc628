//! Replay of the bank-retail seed1 fixture against its expected outputs.

use nudge::plugins::Limits;
use nudge::replay::{self, Options, PluginSource, ReplayError};
use nudge_integration_tests::{cache_dir, fixture, root};

fn options(events: std::path::PathBuf, out: &std::path::Path) -> Options {
    Options {
        events,
        decisions: out.join("decisions.jsonl"),
        report: out.join("report.jsonl"),
        rules: root().join("rules"),
        plugins: PluginSource::Embedded,
        data: None,
        cache: Some(cache_dir()),
        skip_invalid: false,
        progress: false,
        limits: Limits::default(),
        workers: 2,
    }
}

#[test]
fn seed1_decisions_and_report_are_byte_identical() {
    // Sharding customers over workers must not change a single byte.
    for workers in [1, 3] {
        seed1_with(workers);
    }
}

fn seed1_with(workers: usize) {
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(fixture("seed1/events.jsonl"), out.path());
    opts.workers = workers;
    let summary = replay::run(&opts).unwrap();
    assert_eq!(summary.events, 17977);
    assert!(
        summary.stats.faults.is_empty(),
        "{:?}",
        summary.stats.fault_log
    );
    let got = std::fs::read(&opts.decisions).unwrap();
    let want = std::fs::read(fixture("seed1/decisions.jsonl")).unwrap();
    assert!(
        got == want,
        "decisions differ from the expected file ({workers} workers)"
    );
    let got = std::fs::read_to_string(&opts.report).unwrap();
    let want = std::fs::read_to_string(fixture("seed1/report.jsonl")).unwrap();
    assert_eq!(got, want);
}

#[test]
fn state_persists_across_runs_in_a_data_folder() {
    // The first half of the input, then the second half in a second run on
    // the same store, must decide exactly what one run over all of it does.
    let events = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
    let lines: Vec<&str> = events.lines().collect();
    let (a, b) = lines.split_at(lines.len() / 2);
    let dir = tempfile::tempdir().unwrap();
    let (fa, fb) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(&fa, a.join("\n")).unwrap();
    std::fs::write(&fb, b.join("\n")).unwrap();
    let data = dir.path().join("data");
    let mut all = Vec::new();
    for (i, f) in [fa, fb].into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let mut opts = options(f, &out);
        opts.data = Some(data.clone());
        replay::run(&opts).unwrap();
        all.extend(
            std::fs::read_to_string(&opts.decisions)
                .unwrap()
                .lines()
                .map(String::from),
        );
    }
    let want: Vec<String> = std::fs::read_to_string(fixture("seed1/decisions.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(all.len(), want.len());
    assert!(all == want, "split replay decided differently");
}

fn write_events(dir: &std::path::Path, lines: &[&str]) -> std::path::PathBuf {
    let f = dir.join("events.jsonl");
    std::fs::write(&f, lines.join("\n")).unwrap();
    f
}

const GOOD1: &str = r#"{"messageId":"m-1","type":"track","userId":"c-1","timestamp":"2026-03-01T00:00:00.000Z","event":"Loan Payout Requested","properties":{}}"#;
const GOOD2: &str = r#"{"messageId":"m-3","type":"track","userId":"c-2","timestamp":"2026-03-01T00:00:02.000Z","event":"Loan Payout Requested","properties":{}}"#;

#[test]
fn bad_lines_stop_replay_with_line_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, needle) in [
        ("{not json", "not valid JSON"),
        (
            r#"{"type":"track","userId":"c-1","timestamp":"2026-03-01T00:00:01.000Z","event":"X"}"#,
            "field `messageId`: missing",
        ),
        (
            r#"{"messageId":"m-2","type":"track","userId":"c-1","timestamp":"2026-02-01T00:00:00.000Z","event":"X"}"#,
            "before the previous event",
        ),
    ] {
        let f = write_events(dir.path(), &[GOOD1, bad, GOOD2]);
        let err = replay::run(&options(f, &dir.path().join("out"))).unwrap_err();
        match &err {
            ReplayError::Invalid { line, message, .. } => {
                assert_eq!(*line, 2, "{err}");
                assert!(message.contains(needle), "{err}");
            }
            other => panic!("expected an invalid-line error, got {other}"),
        }
        assert!(err.to_string().contains("events.jsonl:2:"), "{err}");
    }
}

#[test]
fn skip_invalid_counts_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_events(dir.path(), &[GOOD1, "{not json", GOOD2]);
    let mut opts = options(f, &dir.path().join("out"));
    opts.skip_invalid = true;
    let s = replay::run(&opts).unwrap();
    assert_eq!(s.events, 2);
    assert_eq!(s.skipped, 1);
    assert_eq!(s.skipped_lines[0].0, 2);
    let decisions = std::fs::read_to_string(&opts.decisions).unwrap();
    assert_eq!(decisions.lines().count(), 2, "{decisions}");
}
