//! `nudge serve` as a cluster (`tests/cluster.rs` sets it up): Nudge nodes
//! as subprocesses on a real three-node NATS JetStream cluster (R3), a
//! real SMTP server, and seed1 (moved to end an hour ago) posted over
//! every node's ingest in file order, each batch acknowledged before the
//! next. Each scenario ends with the same checks, read back from the
//! commit log itself:
//!
//! - the cluster's committed decisions are replay's, exactly;
//! - every stored commit was made under the slot's epoch at that point of
//!   the log (only the current epoch commits);
//! - every `sent` email was delivered or expired (a dead letter), none is
//!   pending, repeats only under the same Message-ID.
//!
//! Scenarios: an owner SIGKILLed, an owner frozen past its lease
//! (SIGSTOP, then SIGCONT), the leader of the log stream's NATS node
//! SIGKILLed, and a node joining mid-stream. Each prints what it measured.

use std::time::{Duration, Instant};

use nudge_integration_tests::cluster::{Run, LEASE_S};
use nudge_integration_tests::eventually;

/// One NATS cluster at a time: two on two cores turn elections into
/// timeouts.
const BIN: &str = env!("CARGO_BIN_EXE_nudge-under-test");

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn finish(run: &mut Run, what: &str) {
    // Slots are snapshotted every second and their logs compacted below.
    let snapshotted = eventually(Duration::from_secs(30), "logs compacted", || {
        match run.reader.uncompacted(&run.http) {
            Ok((behind, snapshotted)) => {
                (behind.is_empty() && snapshotted > 0).then_some(snapshotted)
            }
            Err(e) => {
                eprintln!("compaction not checked yet: {e}");
                None
            }
        }
    });
    run.assert_decides_as_replay();
    run.assert_customer_anywhere("c-000042");
    run.reader.assert_fenced(&run.http);
    let (delivered, repeats) = run.assert_emails();
    run.assert_reports();
    run.assert_controls_shared();
    let events = run
        .reader
        .status(&run.http)
        .streams
        .iter()
        .find(|s| s.name.ends_with("_events"))
        .map_or(0, |s| s.messages);
    eprintln!("{what}: decisions as replay (from {snapshotted} slots' snapshots and the commits after them); {delivered} emails delivered, {repeats} repeats under the same Message-ID; {events} of {} events left in the events stream after compaction", run.events.len());
    run.stop_all();
}

#[test]
fn an_owner_killed_mid_stream_loses_nothing_and_the_cluster_decides_as_replay() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut run = Run::start(BIN, "kill", 3);
    let batches = run.batches();
    let mut killed = None;
    for (b, batch) in batches.iter().enumerate() {
        if b == batches.len() / 3 {
            let victim = run.busiest();
            run.nodes[victim].kill();
            killed = Some((victim, Instant::now()));
        }
        run.post(b, batch);
    }
    let (victim, at) = killed.expect("a node was killed");
    let takeover = run.wait_taken_from(victim, at);
    eprintln!(
        "SIGKILL: every slot of {} claimed by another node {takeover:?} after the kill (lease {LEASE_S}s)",
        run.nodes[victim].name
    );
    assert!(
        takeover < Duration::from_secs(LEASE_S + 8),
        "takeover took {takeover:?}"
    );
    // The slots taken over were restored from their snapshots. A node logs
    // a slot as taken once it caught up, after its claim (which
    // `wait_taken_from` saw), so the logs are read until they say so.
    let restores = eventually(
        Duration::from_secs(30),
        "a slot taken over restored from a snapshot",
        || {
            let n = run
                .nodes
                .iter()
                .map(|n| n.logged().matches(" restored=").count())
                .sum::<usize>();
            (n > 0).then_some(n)
        },
    );
    eprintln!("SIGKILL: {restores} slots restored from snapshots");
    // The first batch, sent again past JetStream's de-duplication: the
    // owners remember the message ids and decide none of it again.
    run.assert_decides_as_replay();
    let before = run.metric_sum("nudge_events_duplicate_total");
    run.reader.republish(&run.http, &batches[0]);
    eventually(Duration::from_secs(30), "the repeats dropped", || {
        (run.metric_sum("nudge_events_duplicate_total") - before >= batches[0].len() as f64)
            .then_some(())
    });
    finish(&mut run, "SIGKILL");
}

#[test]
fn an_owner_frozen_past_its_lease_is_fenced_and_rejoins() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut run = Run::start(BIN, "freeze", 3);
    let batches = run.batches();
    let mut frozen = None;
    for (b, batch) in batches.iter().enumerate() {
        if b == batches.len() / 3 {
            let victim = run.busiest();
            run.nodes[victim].signal("STOP");
            let at = Instant::now();
            // Its slots go to the others while it sleeps; meanwhile the
            // rest of the stream goes to the others too.
            let takeover = run.wait_taken_from(victim, at);
            eprintln!(
                "SIGSTOP: every slot of {} claimed by another node {takeover:?} after the freeze",
                run.nodes[victim].name
            );
            frozen = Some(victim);
        }
        if b == 2 * batches.len() / 3 {
            if let Some(v) = frozen {
                run.nodes[v].signal("CONT");
            }
        }
        // A frozen node does not answer: its batches go to the next.
        run.post(b, batch);
    }
    let victim = frozen.expect("a node was frozen");
    // Woken, it learns it lost its slots, and joins again: the assigner
    // gives it slots back, one at a time.
    let name = run.nodes[victim].name.clone();
    eventually(
        Duration::from_secs(60),
        "the woken node owns slots again",
        || {
            let owners = run.reader.owners(&run.http);
            owners
                .iter()
                .any(|o| o.as_deref() == Some(name.as_str()))
                .then_some(())
        },
    );
    let logged = run.nodes[victim].logged();
    assert!(
        logged.contains("membership expired") || logged.contains("fenced"),
        "the woken node did not log that it was replaced:\n{logged}"
    );
    finish(&mut run, "SIGSTOP");
}

#[test]
fn a_nats_node_killed_under_load_stalls_ingest_and_commits_at_most_an_election() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut run = Run::start(BIN, "natskill", 3);
    let batches = run.batches();
    let mut stall = Duration::ZERO;
    let mut killed = None;
    for (b, batch) in batches.iter().enumerate() {
        if b == batches.len() / 3 {
            // The NATS node leading the events stream: ingest (and the
            // commit log, if it leads that too) waits for an election.
            let st = run.reader.status(&run.http);
            let leader = st
                .streams
                .iter()
                .find(|s| s.name.ends_with("_events"))
                .and_then(|s| s.leader.clone())
                .expect("the events stream has a leader");
            let i = run.nats.index_of(&leader).expect("leader is one of ours");
            run.nats.kill(i);
            killed = Some(leader);
        }
        let took = run.post(b, batch);
        if killed.is_some() {
            stall = stall.max(took);
        }
    }
    eprintln!(
        "NATS node {} killed: the slowest acknowledgement after it took {stall:?}",
        killed.unwrap_or_default()
    );
    assert!(stall < Duration::from_secs(20), "ingest stalled {stall:?}");
    finish(&mut run, "NATS node killed");
}

#[test]
fn a_node_joining_takes_slots_one_at_a_time_and_nothing_is_lost() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut run = Run::start(BIN, "join", 2);
    let batches = run.batches();
    let metric = "nudge_event_to_decision_seconds";
    let scrape = |run: &Run| -> Vec<(f64, f64)> {
        let mut all: Vec<(f64, f64)> = Vec::new();
        for n in run.nodes.iter().filter(|n| n.child.is_some()) {
            let (_, text) = run.http.get(n.port, "/metrics");
            for (le, c) in nudge::metrics::buckets(&text, metric) {
                match all.iter_mut().find(|(l, _)| *l == le) {
                    Some(x) => x.1 += c,
                    None => all.push((le, c)),
                }
            }
        }
        all
    };
    let mut before = Vec::new();
    let mut most_moving = 0;
    for (b, batch) in batches.iter().enumerate() {
        if b == batches.len() / 3 {
            before = scrape(&run);
            run.add_node();
        }
        run.post(b, batch);
        if b >= batches.len() / 3 && b % 10 == 0 {
            most_moving = most_moving.max(run.reader.status(&run.http).moving());
        }
    }
    run.wait_spread(3);
    run.assert_decides_as_replay();
    let after = scrape(&run);
    let p99 = nudge::metrics::quantile(&before, &after, 0.99);
    let p50 = nudge::metrics::quantile(&before, &after, 0.5);
    eprintln!("join: at most {most_moving} slot(s) moving at once; decision latency from the join on: p50 ≤ {p50:?} ms, p99 ≤ {p99:?} ms");
    assert!(most_moving <= 1, "{most_moving} slots moved at once");
    finish(&mut run, "join");
}
