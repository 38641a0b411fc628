//! Event-time order in `nudge serve` (`reorder`): real SDKs that send
//! batches concurrently, a shuffled send, late events, and the wall clock's
//! reversed arrivals. Node and the SDKs come from `tests/servers/package.json`
//! (installed on first use, see `node()`).

use std::path::Path;
use std::time::{Duration, Instant};

use nudge::config::Clock;
use nudge::event::now_ms;
use nudge_integration_tests::*;
use serde_json::{json, Value};

const WRITE_KEY: &str = "wk_order";
const AUTH: &str = "Bearer wk_order";

fn config(data: &Path, clock: Clock) -> nudge::config::Config {
    let mut cfg = test_config(data);
    cfg.ingest.write_keys = vec![WRITE_KEY.into()];
    cfg.server.clock = clock;
    cfg
}

fn seed1() -> Vec<Value> {
    std::fs::read_to_string(fixture("seed1/events.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn wait_processed(server: &Server, n: f64) {
    eventually(Duration::from_secs(120), "events to be decided", || {
        (server.metric("nudge_events_processed_total") >= n).then_some(())
    });
}

/// seed1 through a real Node SDK with its defaults, to serve on the event
/// clock with its defaults: the same decisions as replay, byte for byte.
fn backfill_through(sdk: &str) {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(config(data.path(), Clock::Event));
    let events = fixture("seed1/events.jsonl");
    let out = node()
        .arg(root().join("tests/servers/sdk_client.js"))
        .args([sdk, &server.url(""), WRITE_KEY])
        .arg(&events)
        .output()
        .expect("node sdk_client.js");
    assert!(
        out.status.success(),
        "{sdk} client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors"], json!([]), "{sdk} reported errors");
    let n = seed1().len() as f64;
    assert_eq!(report["sent"], json!(n as u64));
    wait_processed(&server, n);
    assert_eq!(server.metric("nudge_events_accepted_total"), n);
    assert_eq!(server.metric("nudge_events_late_total"), 0.0);
    server.stop().unwrap();
    assert_decides_as_replay(data.path(), sdk);
}

#[test]
fn segment_node_sdk_backfill_decides_as_replay() {
    backfill_through("segment");
}

#[test]
fn rudderstack_node_sdk_backfill_decides_as_replay() {
    backfill_through("rudder");
}

/// A tiny deterministic generator, so a failure can be reproduced.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

#[test]
fn batches_posted_in_random_order_by_concurrent_connections_decide_as_replay() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), Clock::Event);
    // The whole send must fit in the window; a slow CI machine gets room.
    cfg.server.reorder_window = Some(nudge::config::Dur(Duration::from_secs(30)));
    let server = Server::start(cfg);
    let events = seed1();
    let mut batches: Vec<&[Value]> = events.chunks(40).collect();
    shuffle(&mut batches, 0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    std::thread::scope(|s| {
        for part in batches.chunks(batches.len().div_ceil(4)) {
            let server = &server;
            s.spawn(move || {
                for b in part {
                    let body = serde_json::to_vec(&json!({ "batch": b })).unwrap();
                    let r = server.post("/v1/batch", Some(AUTH), &[], body);
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            });
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the send took longer than the window: the test proves nothing"
    );
    wait_processed(&server, events.len() as f64);
    assert_eq!(server.metric("nudge_events_late_total"), 0.0);
    server.stop().unwrap();
    assert_decides_as_replay(data.path(), "shuffled batches");
}

#[test]
fn an_event_later_than_the_window_is_decided_on_arrival_and_marked_late() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), Clock::Event);
    cfg.server.reorder_window = Some(nudge::config::Dur(Duration::from_millis(100)));
    // On the event clock lateness is against the worker's watermark (its
    // timers have run up to it): one worker, so both customers share it.
    cfg.server.workers = 1;
    let server = Server::start(cfg);
    let t = 1_780_000_000_000; // 2026-05-28
    let welcome = |customer: &str, ts: i64| {
        json!({"type": "identify", "userId": customer, "messageId": format!("m-{customer}"),
               "timestamp": nudge::event::format_ts(ts),
               "traits": {"email": format!("{customer}@example.com"), "consent_email": true}})
    };
    let post = |evs: Value| {
        let r = server.post(
            "/v1/batch",
            Some(AUTH),
            &[],
            serde_json::to_vec(&json!({ "batch": evs })).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    };
    post(json!([welcome("c-early", t + 3_600_000)]));
    wait_processed(&server, 1.0);
    // An hour older than what was already decided, long after the window.
    post(json!([welcome("c-late", t)]));
    wait_processed(&server, 2.0);
    assert_eq!(server.metric("nudge_events_late_total"), 1.0);
    server.stop().unwrap();
    let d = decisions(data.path());
    let of = |c: &str| d.iter().find(|d| d["customer"] == c).cloned();
    let late = of("c-late").expect("the late event was decided");
    assert_eq!(late["late_ms"], json!(3_600_000), "{late}");
    assert_eq!(late["ts"], json!(nudge::event::format_ts(t)));
    let early = of("c-early").expect("the first event was decided");
    assert!(early.get("late_ms").is_none(), "{early}");
}

/// Wall clock: `Order Completed` posted before the `Product Added` it
/// follows (timestamps 1 s apart). Held and reordered, the cart timer is
/// set and then cancelled; in arrival order it would be set after the
/// cancel and, being past due, fire at once.
fn reversed_cart(window: Duration) -> Vec<Value> {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), Clock::Wall);
    cfg.server.reorder_window = Some(nudge::config::Dur(window));
    let server = Server::start(cfg);
    let now = now_ms();
    // The cart timer is 30 minutes after the product: due 2 s ago.
    let added = now - 30 * 60_000 - 2_000;
    let track = |id: &str, name: &str, ts: i64| {
        json!({"type": "track", "userId": "c-cart", "messageId": id, "event": name,
               "timestamp": nudge::event::format_ts(ts), "properties": {"sku": "sku-1", "price": 10.0, "total": 10.0}})
    };
    // The campaign needs an email address.
    let identify = json!({"type": "identify", "userId": "c-cart", "messageId": "m-id",
        "timestamp": nudge::event::format_ts(added - 60_000),
        "traits": {"email": "c-cart@example.com", "consent_email": true}});
    let r = server.post(
        "/v1/identify",
        Some(AUTH),
        &[],
        serde_json::to_vec(&identify).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_processed(&server, 1.0);
    for ev in [
        track("m-order", "Order Completed", added + 1_000),
        track("m-added", "Product Added", added),
    ] {
        let r = server.post(
            "/v1/track",
            Some(AUTH),
            &[],
            serde_json::to_vec(&ev).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    wait_processed(&server, 3.0);
    // A timer due in the past fires within a worker pass or two.
    std::thread::sleep(Duration::from_millis(1500));
    server.stop().unwrap();
    decisions(data.path())
        .into_iter()
        .filter(|d| d["campaign"] == "cart-abandon")
        .collect()
}

#[test]
fn on_the_wall_clock_a_product_added_that_arrives_after_its_order_does_not_fire_the_cart() {
    // A window wider than the default 50ms: between the two requests lies
    // one group commit's fsync, which a slow CI disk can stretch.
    let held = reversed_cart(Duration::from_millis(1000));
    assert_eq!(held, Vec::<Value>::new(), "reordered: no abandoned cart");
    // The same requests in arrival order do fire it: what the window buys.
    let unheld = reversed_cart(Duration::ZERO);
    assert_eq!(
        unheld.len(),
        1,
        "in arrival order the cart fires: {unheld:?}"
    );
}

#[test]
fn with_late_refuse_ingest_answers_400_naming_the_late_event() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path(), Clock::Event);
    cfg.server.reorder_window = Some(nudge::config::Dur(Duration::from_millis(100)));
    cfg.server.late = nudge::config::Late::Refuse;
    cfg.server.workers = 1;
    let server = Server::start(cfg);
    let t = 1_780_000_000_000;
    let track = |id: &str, ts: i64| {
        serde_json::to_vec(
            &json!({"batch": [{"type": "track", "userId": "c-1", "messageId": id,
            "event": "Login", "timestamp": nudge::event::format_ts(ts)}]}),
        )
        .unwrap()
    };
    let r = server.post("/v1/batch", Some(AUTH), &[], track("m-new", t + 3_600_000));
    assert_eq!(r.status, 200, "{}", r.body);
    wait_processed(&server, 1.0);
    let r = server.post("/v1/batch", Some(AUTH), &[], track("m-old", t));
    assert_eq!(r.status, 400, "{}", r.body);
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("\"m-old\"") && error.contains("server.late"),
        "{error}"
    );
    assert_eq!(server.metric("nudge_events_late_total"), 1.0);
    // A retry of the accepted one is acknowledged as a duplicate.
    let r = server.post("/v1/batch", Some(AUTH), &[], track("m-new", t + 3_600_000));
    assert_eq!(
        (r.status, r.json()["duplicates"].clone()),
        (200, json!(1)),
        "{}",
        r.body
    );
    server.stop().unwrap();
    assert_eq!(
        decisions(data.path())
            .iter()
            .filter(|d| d["trigger"] == "m-old")
            .count(),
        0
    );
    // On the wall clock ingest cannot tell: the setting is refused, named.
    let e = nudge::config::Config::parse(
        Path::new("nudge.toml"),
        "[server]\nclock = \"wall\"\nlate = \"refuse\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nudge.toml") && e.contains("late"), "{e}");
}
