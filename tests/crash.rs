//! Crash safety: `nudge serve` runs as a subprocess and is killed with
//! SIGKILL at random moments while a client streams events at it and the
//! deliverer is sending email to a real SMTP server. Afterwards:
//!
//! - every acknowledged event is reflected in the store, though each restart
//!   runs another number of workers;
//! - every `sent` decision reached the SMTP server, once per idempotency key
//!   (`Message-ID`); none arrived that was not decided.
//!
//! And with events held for event-time order (`reorder`): seed1 posted in a
//! shuffled order, killed once with everything held and once part way
//! through their release, decides exactly as replay after the restarts.
//!
//! Delivery is at least once: a message the relay accepted in the moment
//! before the kill, not yet marked delivered, is sent again after the
//! restart, with the same `Message-ID` so the receiving side can drop it.
//! That is at most the deliveries in flight (`[delivery] concurrency`) per
//! crash, and the test holds it to that.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nudge::bench::Rng;
use nudge::store::Store;
use nudge_integration_tests::*;
use serde_json::{json, Value};

const CUSTOMERS: usize = 200;
const EVENTS_PER_CUSTOMER: usize = 10;
const BATCH: usize = 25;
const KILLS: usize = 3;
/// Deliveries in flight at once: what a kill can leave in doubt.
const CONCURRENCY: usize = 4;

/// Starts the server; `CRASH_LOG=info` shows its logs.
fn start(config: &Path, port: u16) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nudge-under-test"))
        .args(["serve", "--config"])
        .arg(config)
        .env(
            "NUDGE_LOG",
            std::env::var("CRASH_LOG").unwrap_or("warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting nudge serve");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nudge serve exited at start-up: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nudge serve did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Kills the server if the test ends early, so no orphan outlives it.
struct Guard(Arc<Mutex<Child>>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn sigkill_loses_no_acknowledged_event_and_sends_each_email_once() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let smtp = SmtpServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("nudge.toml");
    let mut f = std::fs::File::create(&config).unwrap();
    write!(
        f,
        r#"
[server]
listen = "127.0.0.1:{port}"
data = {data:?}
rules = {rules:?}
cache = {cache:?}
workers = 2
shutdown_grace = "5s"

[ingest]
write_keys = ["wk"]

[api]
tokens = ["api"]

[smtp]
port = {smtp}

[delivery]
concurrency = {concurrency}
backoff_initial = "50ms"
backoff_max = "200ms"
"#,
        data = data.display().to_string(),
        rules = root().join("rules").display().to_string(),
        cache = cache_dir().display().to_string(),
        smtp = smtp.port,
        concurrency = CONCURRENCY,
    )
    .unwrap();
    drop(f);

    // Each event is an identify setting a trait of its own, so the store
    // shows exactly which events were applied. The first identify of each
    // customer is welcomed by email.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut events = Vec::new();
    for round in 0..EVENTS_PER_CUSTOMER {
        for c in 0..CUSTOMERS {
            let mut traits = json!({ format!("e{round}"): true });
            if round == 0 {
                traits["email"] = json!(format!("c{c}@example.com"));
                traits["consent_email"] = json!(true);
            }
            events.push(json!({
                "type": "identify",
                "userId": format!("c-crash-{c}"),
                "messageId": format!("m-{round}-{c}"),
                "timestamp": nudge::event::format_ts(now + (round * 1000) as i64),
                "traits": traits,
            }));
        }
    }

    let child = Arc::new(Mutex::new(start(&config, port)));
    let _guard = Guard(child.clone());
    // Kills at random points of the stream: after a random number of
    // acknowledged batches plus a random few milliseconds, so they land
    // mid-request, mid-decision and mid-delivery alike.
    let batches = events.len().div_ceil(BATCH);
    let progress = Arc::new(AtomicUsize::new(0));
    let mut targets: Vec<(usize, u64)> = (0..KILLS)
        .map(|_| (5 + rng.below(batches as u64 - 10) as usize, rng.below(40)))
        .collect();
    targets.sort();
    let killer = {
        let (child, progress, config) = (child.clone(), progress.clone(), config.clone());
        std::thread::spawn(move || {
            for (n, (after, ms)) in targets.into_iter().enumerate() {
                while progress.load(Ordering::Acquire) < after {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(ms));
                let mut c = child.lock().unwrap();
                c.kill().expect("SIGKILL");
                c.wait().unwrap();
                // Come back with another worker count each time: the
                // inbox's watermarks must not depend on it.
                let text = std::fs::read_to_string(&config).unwrap();
                let workers = 1 + (n + 2) % 3;
                let text = text
                    .lines()
                    .map(|l| {
                        if l.starts_with("workers = ") {
                            format!("workers = {workers}")
                        } else {
                            l.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                std::fs::write(&config, text).unwrap();
                *c = start(&config, port);
            }
        })
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/batch");
    let mut acked: Vec<&Value> = Vec::new();
    let mut retries = 0;
    for chunk in events.chunks(BATCH) {
        let body = serde_json::to_vec(&json!({ "batch": chunk })).unwrap();
        loop {
            let sent = rt.block_on(async {
                client
                    .post(&url)
                    .bearer_auth("wk")
                    .body(body.clone())
                    .send()
                    .await
            });
            match sent {
                Ok(r) if r.status() == 200 => {
                    acked.extend(chunk.iter());
                    progress.fetch_add(1, Ordering::AcqRel);
                    // A steady stream rather than one burst.
                    std::thread::sleep(Duration::from_millis(5));
                    break;
                }
                // Killed mid-request, restarting, or busy: send it again,
                // as an SDK would (repeats are recognised by messageId).
                _ => {
                    retries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    killer.join().unwrap();
    let kills = KILLS;
    eprintln!("{kills} kills, {retries} retried requests");
    assert!(retries >= 1, "no request ever failed: the kills missed");

    // Quiet: everything decided and delivered.
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let start_wait = Instant::now();
    loop {
        let body = rt
            .block_on(async { client.get(&metrics_url).send().await?.text().await })
            .unwrap_or_default();
        let inflight =
            nudge::bench::metric_value(&body, "nudge_queue_depth{queue=\"inflight_events\"}");
        let outbox = nudge::bench::metric_value(&body, "nudge_queue_depth{queue=\"outbox\"}");
        if inflight == Some(0.0) && outbox == Some(0.0) {
            break;
        }
        assert!(
            start_wait.elapsed() < Duration::from_secs(60),
            "never quiet: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    {
        let mut c = child.lock().unwrap();
        let pid = c.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = c.wait().unwrap();
        assert!(status.success(), "graceful shutdown failed: {status}");
    }

    let store = Store::open(&data).unwrap();
    let undecided = nudge::inbox::recover(&store).unwrap().work;
    assert!(
        undecided.is_empty(),
        "{} events left undecided",
        undecided.len()
    );
    assert!(
        store.inbox().unwrap().groups.is_empty(),
        "decided inbox groups left behind"
    );
    assert!(
        store.outbox().unwrap().is_empty(),
        "deliveries left undelivered"
    );
    for ev in &acked {
        let customer = ev["userId"].as_str().unwrap();
        let traits = store.traits(customer).unwrap();
        for key in ev["traits"].as_object().unwrap().keys() {
            assert!(
                traits.contains_key(key),
                "acknowledged event {} lost: {customer} has no {key}",
                ev["messageId"]
            );
        }
    }
    let decisions: Vec<Value> = store
        .decisions()
        .map(|d| serde_json::from_slice(&d.unwrap()).unwrap())
        .collect();
    let sent: Vec<&Value> = decisions
        .iter()
        .filter(|d| d["outcome"] == "sent")
        .collect();
    assert_eq!(sent.len(), CUSTOMERS, "one welcome per customer");

    // The Message-ID is the delivery's idempotency key: one per decision.
    let mail = smtp.messages();
    if std::env::var_os("CRASH_KEEP").is_some() {
        let keep = std::path::PathBuf::from("/tmp/crash-mail");
        let _ = std::fs::remove_dir_all(&keep);
        let _ = Command::new("cp")
            .arg("-a")
            .arg(smtp.dir.path())
            .arg(&keep)
            .status();
    }
    let mut ids: Vec<&str> = mail.iter().map(|m| m.message_id.as_str()).collect();
    ids.sort();
    let received = ids.len();
    for w in ids.windows(2) {
        if w[0] == w[1] {
            eprintln!("repeated: {}", w[0]);
        }
    }
    ids.dedup();
    eprintln!(
        "{} sent decisions, {received} messages received, {} distinct Message-IDs",
        sent.len(),
        ids.len()
    );
    assert_eq!(ids.len(), sent.len(), "every sent decision delivered");
    let mut to: Vec<&str> = mail.iter().map(|m| m.to.as_str()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), CUSTOMERS, "each customer emailed");
    // A message is sent again only if the process died between the SMTP
    // server's acceptance and the durable mark: at most the deliveries in
    // flight per kill, and the copy carries the same Message-ID.
    assert!(
        received - ids.len() <= kills * CONCURRENCY,
        "{} repeats for {kills} kills",
        received - ids.len()
    );
}

/// One `nudge serve` run on the event clock over `data`, with the given
/// reorder window.
fn held_config(dir: &Path, port: u16, window: &str) -> std::path::PathBuf {
    let config = dir.join(format!("nudge-{window}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
data = {data:?}
rules = {rules:?}
cache = {cache:?}
workers = 2
clock = "event"
reorder_window = "{window}"

[ingest]
write_keys = ["wk"]

[smtp]
port = {smtp}
"#,
            data = dir.join("data").display().to_string(),
            rules = root().join("rules").display().to_string(),
            cache = cache_dir().display().to_string(),
            // Nothing listens: deliveries wait in the outbox, decisions are
            // what this test reads.
            smtp = free_port(),
        ),
    )
    .unwrap();
    config
}

/// A blocking HTTP client for the held-events test.
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Http {
        Http {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    fn metric(&self, port: u16, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let body = self
            .rt
            .block_on(async { self.client.get(&url).send().await?.text().await })
            .unwrap_or_default();
        nudge::bench::metric_value(&body, name).unwrap_or(-1.0)
    }

    fn batch(&self, port: u16, events: &[Value]) -> u16 {
        let url = format!("http://127.0.0.1:{port}/v1/batch");
        let body = serde_json::to_vec(&json!({ "batch": events })).unwrap();
        self.rt
            .block_on(async {
                self.client
                    .post(&url)
                    .bearer_auth("wk")
                    .body(body)
                    .send()
                    .await
            })
            .map_or(0, |r| r.status().as_u16())
    }
}

#[test]
fn sigkill_while_events_are_held_decides_each_once_in_time_order_after_restarts() {
    let http = Http::new();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Arrival order unlike time order, so the inbox's sequence numbers
    // and the decisions' order differ: decisions above the watermark.
    let mut batches: Vec<&[Value]> = events.chunks(50).collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for i in (1..batches.len()).rev() {
        batches.swap(i, rng.below(i as u64 + 1) as usize);
    }
    // Run 1: a window of an hour holds everything; killed with all of it
    // acknowledged and nothing decided.
    let child = Arc::new(Mutex::new(start(
        &held_config(dir.path(), port, "1h"),
        port,
    )));
    let _guard = Guard(child.clone());
    for b in &batches {
        assert_eq!(http.batch(port, b), 200);
    }
    eventually(Duration::from_secs(30), "every event held", || {
        (http.metric(port, "nudge_events_held") == events.len() as f64).then_some(())
    });
    assert_eq!(http.metric(port, "nudge_events_processed_total"), 0.0);
    {
        let mut c = child.lock().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
    // Run 2: released by time, killed part way through.
    *child.lock().unwrap() = start(&held_config(dir.path(), port, "200ms"), port);
    eventually(Duration::from_secs(120), "some events decided", || {
        (http.metric(port, "nudge_events_processed_total") >= events.len() as f64 / 3.0)
            .then_some(())
    });
    {
        let mut c = child.lock().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
    // Run 3: the rest, then a graceful stop.
    *child.lock().unwrap() = start(&held_config(dir.path(), port, "200ms"), port);
    let left = eventually(Duration::from_secs(10), "the metrics", || {
        let v = http.metric(port, "nudge_queue_depth{queue=\"inflight_events\"}");
        (v >= 0.0).then_some(v)
    });
    assert!(
        left > 0.0 && left < events.len() as f64,
        "run 2 was not stopped part way ({left} events left): the test proves nothing"
    );
    eventually(Duration::from_secs(120), "every event decided", || {
        let inflight = http.metric(port, "nudge_queue_depth{queue=\"inflight_events\"}");
        (inflight == 0.0).then_some(())
    });
    {
        let mut c = child.lock().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().unwrap();
    }
    assert_decides_as_replay(&dir.path().join("data"), "after two kills");
}
