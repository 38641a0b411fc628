//! A Nudge cluster on loopback for the tests: three NATS JetStream nodes
//! (R3), a real SMTP server, Nudge nodes as subprocesses of the test
//! binary, seed1 moved to end an hour ago, and what the tests check,
//! read back from the commit log itself.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nudge::cluster::log::SlotLog;
use nudge::cluster::slots::Layout;
use nudge::config::ClusterConfig;
use serde_json::{json, Value};

use crate::nats::NatsCluster;
use crate::*;

pub const SLOTS: u16 = 16;
pub const LEASE_S: u64 = 2;

/// A Nudge node, killed if the test ends early.
pub struct NudgeNode {
    bin: PathBuf,
    pub name: String,
    pub port: u16,
    config: PathBuf,
    log: PathBuf,
    pub child: Option<Child>,
    /// Stopped by SIGSTOP (not sent requests until SIGCONT).
    pub frozen: bool,
}

impl NudgeNode {
    pub fn start(
        bin: &Path,
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
reorder_window = "0s"
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
snapshot_every = "1s"
"#,
                data = data.display().to_string(),
                rules = rules.display().to_string(),
                cache = cache_dir().display().to_string(),
                servers = servers.join(", "),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut n = NudgeNode {
            bin: bin.to_owned(),
            name,
            port,
            config,
            log,
            child: None,
            frozen: false,
        };
        n.spawn();
        n
    }

    pub fn spawn(&mut self) {
        let mut child = Command::new(&self.bin)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env(
                "NUDGE_LOG",
                std::env::var("CLUSTER_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .expect("node log"),
            ))
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

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    pub fn signal(&mut self, signal: &str) {
        self.frozen = signal == "STOP";
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &c.id().to_string()])
                .status();
        }
    }

    /// What the node logged so far.
    pub fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and waits for the orderly stop.
    pub fn stop(&mut self) {
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
pub struct Http {
    pub rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Default for Http {
    fn default() -> Http {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
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

    /// `GET` of `path` on the node at `port` (the API token), as text.
    pub fn get(&self, port: u16, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{port}{path}");
        self.rt.block_on(async {
            match self.client.get(&url).bearer_auth("api").send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        })
    }

    /// `POST` to `path` on the node at `port` (the API token).
    pub fn post(&self, port: u16, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{port}{path}");
        self.rt.block_on(async {
            match self.client.post(&url).bearer_auth("api").send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        })
    }

    pub fn batch(&self, port: u16, events: &[Value]) -> u16 {
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
pub struct LogReader {
    pub log: SlotLog,
    pub snapshots: nudge::cluster::snapshot::Snapshots,
    cfg: ClusterConfig,
}

impl LogReader {
    pub fn open(http: &Http, nats: &NatsCluster, prefix: &str) -> LogReader {
        let cfg = ClusterConfig {
            servers: nats.urls(),
            node: "reader".into(),
            prefix: prefix.into(),
            slots: SLOTS,
            lease: nudge::config::Dur(Duration::from_secs(LEASE_S)),
            ..ClusterConfig::default()
        };
        let (log, snapshots) = http.rt.block_on(async {
            let (client, js) = nudge::cluster::connect(&cfg, |_| None)
                .await
                .expect("connect");
            let layout = Layout::new(prefix, SLOTS);
            let log = SlotLog::open(client, js.clone(), layout.clone(), 3)
                .await
                .expect("log stream");
            let snapshots = nudge::cluster::snapshot::Snapshots::open(js, layout, 3)
                .await
                .expect("snapshots");
            (log, snapshots)
        });
        LogReader {
            log,
            snapshots,
            cfg,
        }
    }

    /// Stores `events` in the events stream again under other JetStream
    /// message ids: what a client sending them again after JetStream's
    /// two-minute window looks like to the owners.
    pub fn republish(&self, http: &Http, events: &[Value]) {
        http.rt.block_on(async {
            let (_, js) = nudge::cluster::connect(&self.cfg, |_| None)
                .await
                .expect("connect");
            let publisher = nudge::cluster::ingest::Publisher::open(
                js,
                Layout::new(&self.cfg.prefix, SLOTS),
                3,
            )
            .await
            .expect("events stream");
            let batch: Vec<(String, String, Vec<u8>)> = events
                .iter()
                .map(|e| {
                    (
                        e["userId"].as_str().unwrap_or_default().to_owned(),
                        format!("again-{}", e["messageId"].as_str().unwrap_or_default()),
                        serde_json::to_vec(e).unwrap(),
                    )
                })
                .collect();
            let events: Vec<nudge::cluster::ingest::Event<'_>> = batch
                .iter()
                .map(|(c, id, body)| nudge::cluster::ingest::Event {
                    customer: c,
                    message_id: id,
                    body: body.clone().into(),
                })
                .collect();
            let stored = publisher.publish(&events).await.expect("published");
            assert!(stored.iter().all(|s| !s.duplicate));
        })
    }

    /// Members, the map, epochs, as any node would read them.
    pub fn status(&self, http: &Http) -> nudge::cluster::status::Status {
        http.rt
            .block_on(nudge::cluster::status::read_with(&self.cfg))
            .expect("cluster status")
    }

    /// Panics unless every commit stored was made under the epoch current
    /// at its place in the log: only the slot's current epoch commits.
    pub fn assert_fenced(&self, http: &Http) {
        http.rt.block_on(async {
            for s in 0..SLOTS {
                let claims: Vec<u64> = self
                    .log
                    .claims(s)
                    .await
                    .expect("claims")
                    .iter()
                    .map(|r| r.seq)
                    .collect();
                for r in self.log.commits(s, 0, usize::MAX).await.expect("commits") {
                    let id = r.message_id.clone().unwrap_or_default();
                    let epoch = nudge::cluster::log::epoch_of_record(&id)
                        .unwrap_or_else(|| panic!("commit {} of slot {s}: id {id:?}", r.seq));
                    let current = claims.iter().copied().filter(|c| *c < r.seq).max();
                    assert_eq!(
                        Some(epoch),
                        current,
                        "slot {s}: commit at {} made under epoch {epoch}, but the slot's epoch was then {current:?}",
                        r.seq
                    );
                }
            }
        })
    }

    /// Slot → the node whose epoch it is.
    pub fn owners(&self, http: &Http) -> Vec<Option<String>> {
        http.rt.block_on(async {
            let mut out = Vec::new();
            for s in 0..SLOTS {
                out.push(self.log.epoch(s).await.ok().flatten().map(|e| e.node));
            }
            out
        })
    }

    /// Every slot's state as the log holds it: its latest snapshot and
    /// the commits after it, applied in order.
    pub fn state(&self, http: &Http) -> BTreeMap<Vec<u8>, Vec<u8>> {
        http.rt.block_on(async {
            let mut state = BTreeMap::new();
            for s in 0..SLOTS {
                // Read again while NATS recovers (a test kills a server).
                let started = Instant::now();
                let slot = loop {
                    match self.snapshots.slot_state(&self.log, s).await {
                        Ok(slot) => break slot,
                        Err(e) if started.elapsed() < Duration::from_secs(30) => {
                            eprintln!("slot {s}'s state not read yet: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => panic!("slot {s}'s state: {e}"),
                    }
                };
                state.extend(slot);
            }
            state
        })
    }

    /// The slots with a snapshot whose log still holds a commit at or
    /// below the snapshot's position (compaction not done), and how many
    /// slots have a snapshot; an error while NATS recovers.
    pub fn uncompacted(&self, http: &Http) -> Result<(Vec<u16>, usize), String> {
        http.rt.block_on(async {
            let (mut behind, mut snapshotted) = (Vec::new(), 0);
            for s in 0..SLOTS {
                let Some(p) = self.snapshots.latest(s).await.map_err(|e| e.to_string())? else {
                    continue;
                };
                snapshotted += 1;
                let first = self.log.commits(s, 0, 1).await.map_err(|e| e.to_string())?;
                if first.first().is_some_and(|r| r.seq <= p.position) {
                    behind.push(s);
                }
            }
            Ok((behind, snapshotted))
        })
    }

    /// The decision log as the cluster committed it, as replay writes it.
    pub fn decisions(&self, http: &Http) -> String {
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

pub const DAY: i64 = 86_400_000;

/// A decision line of seed1 with its time moved by `shift` ms.
pub fn shifted(line: &str, shift: i64) -> String {
    let v: Value = serde_json::from_str(line).unwrap();
    let ts = v["ts"].as_str().unwrap();
    let moved = nudge::event::format_ts(nudge::event::parse_ts(ts).unwrap() + shift);
    line.replacen(&format!(r#""ts":"{ts}""#), &format!(r#""ts":"{moved}""#), 1)
}

pub fn first_difference(got: &str, want: &str) -> String {
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

/// A cluster run: NATS, SMTP, the example rules (actions valid 400 days),
/// Nudge nodes, and seed1 moved to end an hour ago.
pub struct Run {
    bin: PathBuf,
    pub http: Http,
    pub nats: NatsCluster,
    pub smtp: SmtpServer,
    pub dir: tempfile::TempDir,
    rules: tempfile::TempDir,
    pub prefix: String,
    pub nodes: Vec<NudgeNode>,
    pub reader: LogReader,
    pub events: Vec<Value>,
    pub shift: i64,
}

impl Drop for Run {
    /// A failed test keeps the nodes' logs, in the temporary folder.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                let to = std::env::temp_dir()
                    .join(format!("nudge-cluster-{}-{}.log", self.prefix, node.name));
                let _ = std::fs::write(&to, node.logged());
                eprintln!("{}'s log kept in {}", node.name, to.display());
            }
        }
    }
}

impl Run {
    /// Starts NATS, SMTP and `n` Nudge nodes (the binary `bin`), and
    /// waits until the slots are spread over all of them.
    pub fn start(bin: &str, prefix: &str, n: usize) -> Run {
        let http = Http::new();
        let nats = NatsCluster::start(3);
        let smtp = SmtpServer::start();
        let dir = tempfile::tempdir().unwrap();
        // The example campaigns with their actions valid for 400 days
        // instead of one to seven: decisions are the same, and a month of
        // history still gets its emails sent.
        let rules = rules_copy();
        for e in std::fs::read_dir(rules.path()).unwrap().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let text: Vec<&str> = text
                .lines()
                .map(|l| {
                    if l.starts_with("expires") {
                        "expires = \"400d\""
                    } else {
                        l
                    }
                })
                .collect();
            std::fs::write(e.path(), text.join("\n") + "\n").unwrap();
        }
        // seed1 moved forward by whole days, to end an hour ago: decisions
        // move by as much and are otherwise the same.
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
        let reader = LogReader::open(&http, &nats, prefix);
        let mut run = Run {
            bin: PathBuf::from(bin),
            http,
            nats,
            smtp,
            dir,
            rules,
            prefix: prefix.into(),
            nodes: Vec::new(),
            reader,
            events,
            shift,
        };
        for _ in 0..n {
            run.add_node();
        }
        run.wait_spread(n);
        run
    }

    /// Starts one more Nudge node; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        // Each node its own copy of the rules, as on separate machines.
        let rules = self.rules_of(i);
        std::fs::create_dir_all(&rules).unwrap();
        for e in std::fs::read_dir(self.rules.path()).unwrap().flatten() {
            std::fs::copy(e.path(), rules.join(e.file_name())).unwrap();
        }
        let node = NudgeNode::start(
            &self.bin,
            self.dir.path(),
            &rules,
            i,
            &self.nats,
            &self.prefix,
            self.smtp.port,
        );
        self.nodes.push(node);
        i
    }

    /// Node `i`'s rules folder.
    pub fn rules_of(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}-rules"))
    }

    /// Waits until every slot is claimed and each of `n` nodes holds a
    /// fair share.
    pub fn wait_spread(&self, n: usize) {
        let fair = usize::from(SLOTS) / n;
        let started = Instant::now();
        loop {
            let owners = self.reader.owners(&self.http);
            let mut load: HashMap<String, usize> = HashMap::new();
            for o in owners.iter().flatten() {
                *load.entry(o.clone()).or_default() += 1;
            }
            if owners.iter().all(Option::is_some)
                && load.len() == n
                && load.values().all(|c| *c >= fair)
            {
                return;
            }
            if started.elapsed() > Duration::from_secs(90) {
                panic!("slots not spread over {n} nodes after 90 s: {owners:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The events in batches of 50, in file order.
    pub fn batches(&self) -> Vec<Vec<Value>> {
        self.events.chunks(50).map(<[Value]>::to_vec).collect()
    }

    /// Posts batch number `b` to one of the live nodes (round robin),
    /// again until it is acknowledged; returns how long that took.
    pub fn post(&self, b: usize, batch: &[Value]) -> Duration {
        let live: Vec<&NudgeNode> = self.live().collect();
        let started = Instant::now();
        let mut i = b;
        loop {
            let node = live[i % live.len()];
            match self.http.batch(node.port, batch) {
                200 => return started.elapsed(),
                s if started.elapsed() < Duration::from_secs(60) => {
                    eprintln!("batch {b} to {}: {s}, again", node.name);
                    std::thread::sleep(Duration::from_millis(200));
                    // A node that does not answer (frozen): try the next.
                    i += 1;
                }
                s => panic!("batch {b} to {}: {s}", node.name),
            }
        }
    }

    /// The node holding the most slots.
    pub fn busiest(&self) -> usize {
        let owners = self.reader.owners(&self.http);
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some() && !self.nodes[*i].frozen)
            .max_by_key(|i| {
                owners
                    .iter()
                    .filter(|o| o.as_deref() == Some(self.nodes[*i].name.as_str()))
                    .count()
            })
            .unwrap()
    }

    /// Waits until no slot's epoch is `node`'s; returns how long after
    /// `since` that was.
    pub fn wait_taken_from(&self, node: usize, since: Instant) -> Duration {
        let name = self.nodes[node].name.clone();
        eventually(
            Duration::from_secs(60),
            "the node's slots taken over",
            || {
                let owners = self.reader.owners(&self.http);
                owners
                    .iter()
                    .all(|o| o.as_deref().is_some_and(|n| n != name))
                    .then(|| since.elapsed())
            },
        )
    }

    /// seed1's decisions, moved as the events were.
    pub fn want(&self) -> String {
        std::fs::read_to_string(fixture("seed1/decisions.jsonl"))
            .unwrap()
            .lines()
            .map(|l| shifted(l, self.shift) + "\n")
            .collect()
    }

    /// Waits until the decisions committed are replay's, exactly.
    pub fn assert_decides_as_replay(&self) {
        let want = self.want();
        let started = Instant::now();
        loop {
            let got = self.reader.decisions(&self.http);
            if got == want {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the cluster did not decide as replay: {}",
                first_difference(&got, &want)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every `sent` email was delivered, or expired before it could be (a
    /// dead letter, in the log); none is left pending; repeats only under
    /// the same Message-ID. Returns (delivered, repeats).
    pub fn assert_emails(&self) -> (usize, usize) {
        let want = self.want();
        let sent_email = want
            .lines()
            .filter(|l| l.contains(r#""outcome":"sent""#) && l.contains(r#""channel":"email""#))
            .count();
        let (mails, expired) =
            eventually(Duration::from_secs(60), "every sent email settled", || {
                let state = self.reader.state(&self.http);
                let email = |k: &[u8], v: &[u8], tag: u8| {
                    k.first() == Some(&tag)
                        && String::from_utf8_lossy(v).contains(r#""channel":"email""#)
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
                for m in self.smtp.messages() {
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
        let repeats = mails.values().map(|c| c.len() - 1).sum();
        (mails.len(), repeats)
    }

    /// The nodes running and not frozen.
    pub fn live(&self) -> impl Iterator<Item = &NudgeNode> {
        self.nodes.iter().filter(|n| n.child.is_some() && !n.frozen)
    }

    /// `GET path` on every live node: (node, status, body).
    pub fn ask_live(&self, path: &str) -> Vec<(String, u16, String)> {
        self.live()
            .map(|n| {
                let (code, body) = self.http.get(n.port, path);
                (n.name.clone(), code, body)
            })
            .collect()
    }

    /// A metric added up over the live nodes.
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.live()
            .map(|n| {
                let (_, text) = self.http.get(n.port, "/metrics");
                nudge::metrics::metric_value(&text, name).unwrap_or(0.0)
            })
            .sum()
    }

    /// `GET /v1/customers/{id}` answers the same on every live node (the
    /// slot's owner answers, wherever it is asked).
    pub fn assert_customer_anywhere(&self, customer: &str) {
        let path = format!("/v1/customers/{customer}");
        let answers = self.ask_live(&path);
        let (first, code, body) = &answers[0];
        assert_eq!(*code, 200, "{first}: {body}");
        assert!(body.contains("traits"), "{first}: {body}");
        for (name, c, b) in &answers[1..] {
            assert_eq!(
                (c, b),
                (code, body),
                "{name} answers otherwise than {first}"
            );
        }
    }

    /// `GET /v1/reports` answers the same on every live node, and its
    /// funnel is seed1's report: every slot's tallies, added up over the
    /// nodes, once.
    pub fn assert_reports(&self) {
        let as_of = nudge::event::now_ms();
        let path = format!("/v1/reports?as_of={as_of}");
        let answers = self.ask_live(&path);
        // Deliveries still going on (the sms channel has nowhere to go
        // and retries) move their counts between two requests.
        let stable = |body: &str| -> Value {
            let mut v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            for m in v["campaigns"].as_array_mut().into_iter().flatten() {
                if let Some(f) = m["funnel"].as_object_mut() {
                    for k in ["delivered", "delivery_failed", "dead_lettered"] {
                        f.remove(k);
                    }
                }
                m.as_object_mut().map(|o| o.remove("daily"));
            }
            v
        };
        let (first, code, body) = &answers[0];
        assert_eq!(*code, 200, "{first}: {body}");
        let listing = stable(body);
        for (name, c, b) in &answers[1..] {
            assert_eq!(*c, 200, "{name}: {b}");
            let other = stable(b);
            for (x, y) in listing["campaigns"]
                .as_array()
                .unwrap()
                .iter()
                .zip(other["campaigns"].as_array().unwrap())
            {
                assert_eq!(x, y, "{name}'s report differs from {first}'s");
            }
        }
        let want = std::fs::read_to_string(fixture("seed1/report.jsonl")).unwrap();
        for line in want.lines() {
            let w: Value = serde_json::from_str(line).unwrap();
            let got = listing["campaigns"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["campaign"] == w["campaign"])
                .unwrap_or_else(|| panic!("{} missing from the report", w["campaign"]));
            for k in [
                "sent",
                "control",
                "suppressed_consent",
                "suppressed_frequency",
                "suppressed_policy",
                "suppressed_arbitration",
            ] {
                assert_eq!(
                    got["funnel"][k], w[k],
                    "{} {k}: the cluster's report against seed1's",
                    w["campaign"]
                );
            }
        }
    }

    /// A campaign paused on one node is paused on every node; resumed on
    /// another, resumed everywhere.
    pub fn assert_controls_shared(&self) {
        let live: Vec<&NudgeNode> = self.live().collect();
        let paused_on = |n: &NudgeNode| -> bool {
            let (_, body) = self.http.get(n.port, "/v1/campaigns");
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            v["campaigns"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["id"] == "welcome" && !c["paused"].is_null())
        };
        let (code, body) = self.http.post(live[0].port, "/v1/campaigns/welcome/pause");
        assert_eq!(code, 200, "{body}");
        eventually(Duration::from_secs(10), "the pause on every node", || {
            live.iter().all(|n| paused_on(n)).then_some(())
        });
        let (code, body) = self
            .http
            .post(live[live.len() - 1].port, "/v1/campaigns/welcome/resume");
        assert_eq!(code, 200, "{body}");
        eventually(Duration::from_secs(10), "the resume on every node", || {
            live.iter().all(|n| !paused_on(n)).then_some(())
        });
    }

    pub fn stop_all(&mut self) {
        for n in self.nodes.iter_mut() {
            n.stop();
        }
    }
}
