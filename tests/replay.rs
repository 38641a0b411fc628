//! Replay of the bank-retail seed1 fixture against its expected outputs.

use nudge::replay::{self, Options, ReplayError};
use nudge_integration_tests::{fixture, replay_options};

fn options(events: std::path::PathBuf, out: &std::path::Path) -> Options {
    replay_options(events, out)
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
fn sort_replays_a_shuffled_export_as_the_ordered_one() {
    // seed1 is in (timestamp, messageId) order; shuffled, `--sort` must
    // give back exactly its decisions (runs on disk are the unit test's).
    let events = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
    let mut lines: Vec<&str> = events.lines().collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..lines.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lines.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let dir = tempfile::tempdir().unwrap();
    let shuffled = dir.path().join("shuffled.jsonl");
    std::fs::write(&shuffled, lines.join("\n")).unwrap();
    let mut opts = options(shuffled, dir.path());
    opts.sort = true;
    let summary = replay::run(&opts).unwrap();
    assert_eq!(summary.events, 17977);
    let got = std::fs::read(&opts.decisions).unwrap();
    let want = std::fs::read(fixture("seed1/decisions.jsonl")).unwrap();
    assert!(got == want, "a sorted replay of the shuffled file differs");
    // Without --sort the same file is refused (events go backwards).
    opts.sort = false;
    assert!(replay::run(&opts).is_err());
}

#[test]
fn a_tiny_memory_budget_decides_the_same() {
    // 256 KiB for every cache: the timer queues hold a few dozen timers
    // and read the rest back from sled, the read and traits caches start
    // over every few hundred customers, and the persister writes every
    // few hundred changes. None of it may change a byte of the output.
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(fixture("seed1/events.jsonl"), out.path());
    opts.budget = nudge::store::Budget { total: 256 << 10 };
    opts.data = Some(out.path().join("data"));
    // And compressed: what sled writes is zstd, what it gives back is not.
    opts.compress = true;
    replay::run(&opts).unwrap();
    let got = std::fs::read(&opts.decisions).unwrap();
    let want = std::fs::read(fixture("seed1/decisions.jsonl")).unwrap();
    assert!(got == want, "decisions differ within a 256 KiB budget");
    let conf = std::fs::read(out.path().join("data/conf")).unwrap();
    assert!(String::from_utf8_lossy(&conf).contains("use_compression: true"));
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

/// The seed1 events with `edit` applied to the raw bytes of the file,
/// replayed with `--skip-invalid`: the summary and the decisions.
fn seed1_edited(edit: impl FnOnce(Vec<Vec<u8>>) -> Vec<Vec<u8>>) -> (replay::Summary, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read(fixture("seed1/events.jsonl")).unwrap();
    let lines: Vec<Vec<u8>> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.to_vec())
        .collect();
    let f = dir.path().join("events.jsonl");
    std::fs::write(&f, edit(lines).join(&b'\n')).unwrap();
    let mut opts = options(f, &dir.path().join("out"));
    opts.skip_invalid = true;
    let s = replay::run(&opts).unwrap();
    (s, std::fs::read(&opts.decisions).unwrap())
}

fn expected_decisions() -> Vec<u8> {
    std::fs::read(fixture("seed1/decisions.jsonl")).unwrap()
}

#[test]
fn an_outlier_timestamp_is_skipped_not_adopted_as_the_clock() {
    // One line dated 9999 in the middle of the file.
    let (s, got) = seed1_edited(|mut lines| {
        let far = br#"{"messageId":"m-outlier","type":"track","userId":"c-far","timestamp":"9999-12-31T00:00:00Z","event":"Deposit Made","properties":{"amount":100}}"#;
        lines.insert(9000, far.to_vec());
        lines
    });
    assert_eq!(s.skipped, 1, "{:?}", s.skipped_lines);
    assert_eq!(s.skipped_lines[0].0, 9001);
    assert!(
        s.skipped_lines[0].1.contains("outlier"),
        "{:?}",
        s.skipped_lines
    );
    assert_eq!(s.events, 17977);
    assert!(
        got == expected_decisions(),
        "the rest decided as without it"
    );
}

#[test]
fn invalid_utf8_is_a_skippable_line_and_a_bom_is_stripped() {
    let (s, got) = seed1_edited(|mut lines| {
        let mut first = b"\xef\xbb\xbf".to_vec();
        first.extend_from_slice(&lines[0]);
        lines[0] = first;
        lines.insert(5000, b"{\"messageId\":\"\xff\xfe\"}".to_vec());
        lines
    });
    assert_eq!(s.skipped, 1, "{:?}", s.skipped_lines);
    assert_eq!(s.skipped_lines[0].0, 5001);
    assert!(
        s.skipped_lines[0].1.contains("not UTF-8"),
        "{:?}",
        s.skipped_lines
    );
    assert_eq!(s.events, 17977, "the first event, behind a BOM, is decided");
    assert!(got == expected_decisions());
}

#[test]
fn a_repeated_message_id_is_decided_once_as_the_server_does() {
    let (s, got) = seed1_edited(|lines| {
        // Every line of the first thousand sent twice, as a retrying
        // exporter would.
        let mut out = Vec::new();
        for (i, l) in lines.into_iter().enumerate() {
            if i < 1000 {
                out.push(l.clone());
            }
            out.push(l);
        }
        out
    });
    assert_eq!(s.duplicates, 1000);
    assert_eq!(s.skipped, 0);
    assert_eq!(s.events, 17977);
    assert!(got == expected_decisions());
}
