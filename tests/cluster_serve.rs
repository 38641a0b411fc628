//! `nudge serve` as a cluster: three Nudge nodes (subprocesses) on a real
//! three-node NATS JetStream cluster (R3), a real SMTP server, and seed1's
//! events posted over every node's ingest in file order.
//!
//! - **Owner killed**: a third of the way through, the node holding the
//!   most slots gets SIGKILL. Its slots are taken over within a bound
//!   (measured, printed), and once every event is decided, the cluster's
//!   decisions, read back from the commit log, are exactly replay's; every
//!   `sent` email arrived, repeats only under the same Message-ID.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nudge::cluster::log::SlotLog;
use nudge::cluster::slots::Layout;
use nudge::config::ClusterConfig;
use nudge_integration_tests::nats::NatsCluster;
use nudge_integration_tests::*;
use serde_json::{json, Value};

/// One NATS cluster at a time: two on two cores turn elections into
/// timeouts.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SLOTS: u16 = 16;
const LEASE_S: u64 = 2;

/// A Nudge node, killed if the test ends early.
struct NudgeNode {
    name: String,
    port: u16,
    config: PathBuf,
    child: Option<Child>,
}

impl NudgeNode {
    fn start(
        dir: &Path,
        rules: &Path,
        i: usize,
        nats: &NatsCluster,
        prefix: &str,
        smtp: u16,
    ) -> NudgeNode {
        let name = format!("n{i}");
        let port = free_port();
        let data = dir.join(&name);
        let config = dir.join(format!("{name}.toml"));
        let servers: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
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
shutdown_grace = "2s"

[ingest]
write_keys = ["wk"]

[api]
tokens = ["api"]

[smtp]
port = {smtp}

[delivery]
backoff_initial = "50ms"
backoff_max = "200ms"

[cluster]
servers = [{servers}]
node = "{name}"
slots = {SLOTS}
replicas = 3
prefix = "{prefix}"
lease = "{LEASE_S}s"
"#,
                data = data.display().to_string(),
                rules = rules.display().to_string(),
                cache = cache_dir().display().to_string(),
                servers = servers.join(", "),
            ),
        )
        .unwrap();
        let mut n = NudgeNode {
            name,
            port,
            config,
            child: None,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nudge-under-test"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env(
                "NUDGE_LOG",
                std::env::var("CLUSTER_LOG").unwrap_or("error".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting nudge serve");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{}: nudge serve exited at start-up: {status}", self.name);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}: nudge serve did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the orderly stop.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for NudgeNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking HTTP client.
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Http {
        Http {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
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

/// Reads the cluster's state from the commit log itself.
struct LogReader {
    log: SlotLog,
}

impl LogReader {
    fn open(http: &Http, nats: &NatsCluster, prefix: &str) -> LogReader {
        let cfg = ClusterConfig {
            servers: nats.urls(),
            node: "reader".into(),
            prefix: prefix.into(),
            ..ClusterConfig::default()
        };
        let log = http.rt.block_on(async {
            let (client, js) = nudge::cluster::connect(&cfg, |_| None)
                .await
                .expect("connect");
            SlotLog::open(client, js, Layout::new(prefix, SLOTS), 3)
                .await
                .expect("log stream")
        });
        LogReader { log }
    }

    /// Slot → the node whose epoch it is.
    fn owners(&self, http: &Http) -> Vec<Option<String>> {
        http.rt.block_on(async {
            let mut out = Vec::new();
            for s in 0..SLOTS {
                out.push(self.log.epoch(s).await.ok().flatten().map(|e| e.node));
            }
            out
        })
    }

    /// Every key and value the slots' commits wrote, applied in order.
    fn state(&self, http: &Http) -> BTreeMap<Vec<u8>, Vec<u8>> {
        http.rt.block_on(async {
            let mut state = BTreeMap::new();
            for s in 0..SLOTS {
                let records = self.log.commits(s, 0, usize::MAX).await.expect("commits");
                for r in records {
                    for (k, v) in nudge::store::decode_ops(&r.payload).expect("a commit record") {
                        match v {
                            Some(v) => state.insert(k, v),
                            None => state.remove(&k),
                        };
                    }
                }
            }
            state
        })
    }

    /// The decision log as the cluster committed it, as replay writes it.
    fn decisions(&self, http: &Http) -> String {
        let mut out = String::new();
        for (k, v) in self.state(http) {
            if k.first() == Some(&b'D') {
                out.push_str(&String::from_utf8_lossy(&v));
                out.push('\n');
            }
        }
        out
    }
}

const DAY: i64 = 86_400_000;

/// A decision line of seed1 with its time moved by `shift` ms.
fn shifted(line: &str, shift: i64) -> String {
    let v: Value = serde_json::from_str(line).unwrap();
    let ts = v["ts"].as_str().unwrap();
    let moved = nudge::event::format_ts(nudge::event::parse_ts(ts).unwrap() + shift);
    line.replacen(&format!(r#""ts":"{ts}""#), &format!(r#""ts":"{moved}""#), 1)
}

fn first_difference(got: &str, want: &str) -> String {
    let i = got
        .lines()
        .zip(want.lines())
        .position(|(g, w)| g != w)
        .unwrap_or(got.lines().count().min(want.lines().count()));
    format!(
        "{} vs {} decisions; first difference at {i}:\n  got  {}\n  want {}",
        got.lines().count(),
        want.lines().count(),
        got.lines().nth(i).unwrap_or("(none)"),
        want.lines().nth(i).unwrap_or("(none)")
    )
}

#[test]
fn an_owner_killed_mid_stream_loses_nothing_and_the_cluster_decides_as_replay() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let http = Http::new();
    let nats = NatsCluster::start(3);
    let smtp = SmtpServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = "kill";
    // The example campaigns, their actions valid for 400 days instead of
    // one to seven: decisions are the same, and a month of history still
    // gets its emails sent.
    let rules = rules_copy();
    for e in std::fs::read_dir(rules.path()).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("expires") {
                    "expires = \"400d\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(e.path(), text + "\n").unwrap();
    }
    let mut nodes: Vec<NudgeNode> = (0..3)
        .map(|i| NudgeNode::start(dir.path(), rules.path(), i, &nats, prefix, smtp.port))
        .collect();
    let reader = LogReader::open(&http, &nats, prefix);
    // Every slot claimed, by every node, before events flow.
    eventually(
        Duration::from_secs(90),
        "slots spread over the nodes",
        || {
            let owners = reader.owners(&http);
            let mut load: HashMap<String, usize> = HashMap::new();
            for o in owners.iter().flatten() {
                *load.entry(o.clone()).or_default() += 1;
            }
            (owners.iter().all(Option::is_some)
                && load.len() == 3
                && load.values().all(|n| *n >= 4))
            .then_some(())
        },
    );

    // seed1 moved forward by whole days, to end an hour ago: decisions
    // move by as much and are otherwise the same, and the last week's
    // deliveries have not expired, so they are sent.
    let text = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
    let mut events: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ts_of = |e: &Value| nudge::event::parse_ts(e["timestamp"].as_str().unwrap_or_default());
    let last = events.iter().filter_map(ts_of).max().unwrap();
    let shift = (nudge::event::now_ms() - 3_600_000 - last).div_euclid(DAY) * DAY;
    for e in events.iter_mut() {
        if let Some(ts) = ts_of(e) {
            e["timestamp"] = json!(nudge::event::format_ts(ts + shift));
        }
    }
    let batches: Vec<&[Value]> = events.chunks(50).collect();
    let kill_at = batches.len() / 3;
    let mut killed: Option<(usize, Instant)> = None;
    for (b, batch) in batches.iter().enumerate() {
        if b == kill_at {
            let owners = reader.owners(&http);
            let victim = (0..3)
                .max_by_key(|i| {
                    owners
                        .iter()
                        .filter(|o| o.as_deref() == Some(nodes[*i].name.as_str()))
                        .count()
                })
                .unwrap();
            nodes[victim].kill();
            killed = Some((victim, Instant::now()));
        }
        // Round robin over the live nodes, each batch acknowledged before
        // the next is sent: the stream holds the file's order.
        let live: Vec<usize> = (0..3).filter(|i| nodes[*i].child.is_some()).collect();
        let node = &nodes[live[b % live.len()]];
        let started = Instant::now();
        loop {
            match http.batch(node.port, batch) {
                200 => break,
                s if started.elapsed() < Duration::from_secs(30) => {
                    eprintln!("batch {b} to {}: {s}, again", node.name);
                    std::thread::sleep(Duration::from_millis(200));
                }
                s => panic!("batch {b} to {}: {s}", node.name),
            }
        }
    }
    let (victim, at) = killed.expect("a node was killed");
    let victim_name = nodes[victim].name.clone();
    let takeover = eventually(
        Duration::from_secs(60),
        "the killed node's slots taken over",
        || {
            let owners = reader.owners(&http);
            owners
                .iter()
                .all(|o| o.as_deref().is_some_and(|n| n != victim_name))
                .then(|| at.elapsed())
        },
    );
    eprintln!("takeover after SIGKILL: every slot of {victim_name} claimed by another node within {takeover:?} (lease {LEASE_S}s)");

    let want: String = std::fs::read_to_string(fixture("seed1/decisions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| shifted(l, shift) + "\n")
        .collect();
    let started = Instant::now();
    loop {
        let got = reader.decisions(&http);
        if got == want {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the cluster did not decide as replay: {}",
            first_difference(&got, &want)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        takeover < Duration::from_secs(LEASE_S + 8),
        "takeover took {takeover:?}"
    );

    // Every `sent` email was delivered, or expired before it could be
    // (a dead letter, in the log); none is left pending; repeats only
    // under the same Message-ID.
    let sent_email = want
        .lines()
        .filter(|l| l.contains(r#""outcome":"sent""#) && l.contains(r#""channel":"email""#))
        .count();
    let (mails, expired) = eventually(Duration::from_secs(60), "every sent email settled", || {
        let state = reader.state(&http);
        let email = |k: &[u8], v: &[u8], tag: u8| {
            k.first() == Some(&tag) && String::from_utf8_lossy(v).contains(r#""channel":"email""#)
        };
        if state.iter().any(|(k, v)| email(k, v, b'O')) {
            return None;
        }
        let expired: Vec<String> = state
            .iter()
            .filter(|(k, v)| email(k, v, b'L'))
            .map(|(k, _)| String::from_utf8_lossy(&k[1..]).into_owned())
            .collect();
        let mut ids: HashMap<String, Vec<Mail>> = HashMap::new();
        for m in smtp.messages() {
            ids.entry(m.message_id.clone()).or_default().push(m);
        }
        (ids.len() + expired.len() >= sent_email).then_some((ids, expired))
    });
    assert!(
        mails.len() >= sent_email / 2,
        "only {} of {sent_email} emails were sent: the test shows little",
        mails.len()
    );
    assert_eq!(
        mails.len() + expired.len(),
        sent_email,
        "each sent email delivered or expired, once"
    );
    for id in &expired {
        assert!(
            !mails.keys().any(|m| m.contains(id.as_str())),
            "{id} both expired and delivered"
        );
    }
    for (id, copies) in &mails {
        assert!(
            copies
                .iter()
                .all(|m| m.to == copies[0].to && m.body == copies[0].body),
            "Message-ID {id} repeated with other content"
        );
    }
    let repeats: usize = mails.values().map(|c| c.len() - 1).sum();
    eprintln!(
        "emails: {sent_email} sent decisions, {} delivered ({repeats} repeats under the same Message-ID), {} expired",
        mails.len(),
        expired.len()
    );
    for n in nodes.iter_mut() {
        n.stop();
    }
}
