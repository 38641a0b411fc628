//! Generations in a cluster (`tests/cluster.rs` sets it up: three NATS
//! servers, R3, Nudge nodes as subprocesses, each with its own copy of
//! the rules folder, as on separate machines):
//!
//! - a publish on one node runs on every node, under one number;
//! - the same files copied to another node publish nothing new;
//! - a bad publish is rejected where it was made, and every node keeps
//!   running the cluster's generation;
//! - a rollback on any node applies on all.

use std::time::Duration;

use nudge_integration_tests::cluster::Run;
use nudge_integration_tests::eventually;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nudge-under-test");

fn generations(run: &Run, node: usize) -> Value {
    let (status, body) = run.http.get(run.nodes[node].port, "/v1/generations");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn active(run: &Run, node: usize) -> u64 {
    generations(run, node)["active"].as_u64().unwrap()
}

/// The active record of `node`.
fn active_record(run: &Run, node: usize) -> Value {
    let g = generations(run, node);
    let n = g["active"].as_u64().unwrap();
    g["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["number"].as_u64() == Some(n))
        .cloned()
        .unwrap_or_else(|| panic!("node {node}: no record of its active generation {n}: {g}"))
}

/// Waits until every node runs the same generation, other than `not`,
/// and returns it.
fn converged(run: &Run, not: Option<u64>, what: &str) -> u64 {
    eventually(Duration::from_secs(30), what, || {
        let all: Vec<u64> = (0..run.nodes.len()).map(|i| active(run, i)).collect();
        (all.iter().all(|n| *n == all[0]) && Some(all[0]) != not).then_some(all[0])
    })
}

fn sha_of(record: &Value, file: &str) -> Option<String> {
    record["files"]
        .as_array()?
        .iter()
        .find(|f| f["path"].as_str().is_some_and(|p| p.ends_with(file)))
        .and_then(|f| f["sha256"].as_str().map(str::to_owned))
}

#[test]
fn a_publish_on_one_node_runs_on_every_node_under_one_number() {
    let run = Run::start(BIN, "gens", 2);
    // Each node built its folders at start; the cluster's first
    // generation is the one its first node published, under a number
    // from the cluster, and both nodes adopt it.
    let first = eventually(
        Duration::from_secs(30),
        "both nodes on the cluster's first generation",
        || {
            let records: Vec<Value> = (0..2).map(|i| active_record(&run, i)).collect();
            let adopted = records.iter().all(|r| {
                r["activated_by"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("published by"))
            });
            (adopted && records[0]["number"] == records[1]["number"])
                .then(|| records[0]["number"].as_u64().unwrap())
        },
    );

    // A changed campaign file on node 0 only.
    let file = "welcome.toml";
    let text = std::fs::read_to_string(run.rules_of(0).join(file)).unwrap();
    let changed = format!("{text}\n# changed on node 0\n");
    nudge::reload::publish(&run.rules_of(0), file, changed.as_bytes()).unwrap();
    let second = converged(&run, Some(first), "the publish on node 0 to run on both");
    assert!(second > first, "numbers rise: {first} then {second}");
    let want = nudge::plugins::hex_sha256(changed.as_bytes());
    for node in 0..2 {
        let r = active_record(&run, node);
        assert_eq!(
            sha_of(&r, file).as_deref(),
            Some(want.as_str()),
            "node {node}: {r}"
        );
    }
    let adopted = active_record(&run, 1);
    assert!(
        adopted["activated_by"]
            .as_str()
            .is_some_and(|b| b.contains("published by n0")),
        "node 1 says where its generation came from: {adopted}"
    );
    eprintln!("a publish on n0 runs on both nodes as generation {second} (was {first})");

    // The same file copied to node 1: what the cluster runs already.
    nudge::reload::publish(&run.rules_of(1), file, changed.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(converged(&run, None, "still one generation"), second);
    let newest = generations(&run, 1)["generations"][0]["number"]
        .as_u64()
        .unwrap();
    assert_eq!(
        newest, second,
        "node 1 built nothing new for the same files"
    );

    // A broken campaign on node 1: rejected there, nothing changes.
    nudge::reload::publish(&run.rules_of(1), "broken.toml", b"[campaign\nname = ").unwrap();
    let rejected = eventually(Duration::from_secs(30), "node 1 to reject it", || {
        let g = generations(&run, 1);
        let r = &g["generations"][0];
        (r["status"] == "rejected").then(|| r.clone())
    });
    let errors = rejected["errors"].to_string();
    assert!(
        errors.contains("broken.toml"),
        "the error names the file: {errors}"
    );
    assert!(rejected["number"].as_u64().unwrap() > second);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(converged(&run, None, "still the good generation"), second);

    // A rollback on node 1 applies on both.
    let (status, body) = run.http.post(run.nodes[1].port, "/v1/generations/rollback");
    assert_eq!(status, 200, "{body}");
    let back = converged(&run, Some(second), "the rollback to reach node 0");
    assert_eq!(back, first, "rolled back to the first generation");
    eprintln!("a rollback on n1 runs on both nodes: generation {back}");
}
