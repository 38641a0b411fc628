//! `nudge serve` configuration: one TOML file (every field documented in
//! `nudge.toml` at the repository root), secrets overridable from the
//! environment so they need not sit in the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::rules::parse_duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}{line}: {message}")]
    Invalid {
        path: PathBuf,
        /// `:N` when the line is known.
        line: String,
        message: String,
    },
}

/// A duration written as `"250ms"`, `"30s"`, `"5m"`, `"24h"` or `"7d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let s = String::deserialize(d)?;
        let ms = parse_duration(&s).map_err(serde::de::Error::custom)?;
        Ok(Dur(Duration::from_millis(ms.max(0) as u64)))
    }
}

/// Which clock timers run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    /// Timers fire when the wall clock reaches them (production).
    #[default]
    Wall,
    /// Timers fire when event time passes them, as in `nudge replay`: for
    /// backfilling a historical stream through the live API.
    Event,
}

/// What becomes of a late event (`reorder`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Late {
    /// Decided on arrival, counted, and marked `late_ms` in its decisions.
    #[default]
    Decide,
    /// Refused at ingest (400 naming the event) when ingest can tell: on
    /// the event clock, an event older than its worker's watermark. One
    /// that becomes late between ingest and its worker is decided and
    /// marked.
    Refuse,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub store: StoreConfig,
    pub ingest: Ingest,
    pub api: Api,
    pub limits: PluginLimits,
    pub smtp: Smtp,
    pub delivery: Delivery,
    pub reload: Reload,
    pub quarantine: Quarantine,
    pub measure: MeasureConfig,
    /// Several nodes on NATS JetStream; absent: one process, as always.
    pub cluster: Option<ClusterConfig>,
    /// Per-plugin grants and settings that override the plugin's manifest.
    pub plugins: BTreeMap<String, PluginGrant>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub rules: PathBuf,
    /// Plugins folder; unset: the example plugins built into the binary.
    pub plugins: Option<PathBuf>,
    pub cache: PathBuf,
    /// Worker threads; 0: one per CPU.
    pub workers: usize,
    pub clock: Clock,
    /// How long each event is held after it arrives, so that events whose
    /// requests overtook each other are still decided in timestamp order
    /// (`reorder`). Unset: 50ms on the wall clock, 10s on the event clock.
    /// "0s": decide in arrival order.
    pub reorder_window: Option<Dur>,
    /// An event older than what it should have preceded, already decided:
    /// "decide" it on arrival, marked late, or (event clock only)
    /// "refuse" it at ingest with 400 naming it.
    pub late: Late,
    pub log_format: LogFormat,
    /// How long graceful shutdown waits for deliveries in flight.
    pub shutdown_grace: Dur,
    /// Open HTTP connections at most; more wait in the kernel's backlog.
    /// Each takes a file descriptor: keep it under the process's limit
    /// (`ulimit -n`) less about 100 for the store, plugins and channels.
    pub max_connections: usize,
    /// A request's headers must arrive within this.
    pub header_read_timeout: Dur,
    /// A connection that moves no byte for this long is closed (idle
    /// keep-alive, a client stalled halfway through a request).
    pub idle_timeout: Dur,
}

impl Server {
    /// The reorder window in force: the configured one, or the clock's
    /// default.
    pub fn reorder_window(&self) -> Duration {
        self.reorder_window.map_or(
            match self.clock {
                // Real-time decisions stay within tens of milliseconds;
                // enough for the requests of one SDK flush.
                Clock::Wall => Duration::from_millis(50),
                // A backfill through concurrent SDK batches, retries after
                // a 503 included; what is held is the rate times this.
                Clock::Event => Duration::from_secs(10),
            },
            |d| d.0,
        )
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// MiB that every cache of the store shares (sled's page caches, the
    /// read cache, decoded traits, the in-memory timer queue, changes not
    /// yet persisted). The process's resident memory is this plus the
    /// plugins' instances (`[limits] memory_mib` each) plus requests in
    /// flight; it does not grow with customers or events. At least 16.
    pub memory_mib: usize,
    /// zstd on what sled writes, for a store created from now on (an
    /// existing one keeps what it was created with): about 40% less on
    /// disk, at about 30% of replay throughput (BENCHMARKS.md).
    pub compression: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            memory_mib: crate::store::Budget::DEFAULT_MIB,
            compression: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ingest {
    /// Write keys accepted on `/v1/*` ingest (HTTP Basic user name, as the
    /// Segment SDKs send it, or a bearer token). Environment:
    /// `NUDGE_WRITE_KEYS`, comma-separated, replaces this list.
    pub write_keys: Vec<String>,
    /// Events accepted but not yet decided, across all requests. Past it,
    /// ingest answers 503 with `Retry-After`.
    pub max_inflight_events: usize,
    /// Segment's limits.
    pub max_event_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_message_id: usize,
    /// How long a `messageId` is remembered for de-duplication.
    pub dedupe_window: Dur,
    /// How far after the server's clock an event's `timestamp` may be.
    /// One further ahead is corrected by the client's `sentAt` (the
    /// timestamp plus received − sentAt, as Segment does) if that brings
    /// it within the bound, and refused with 400 naming the field
    /// otherwise.
    pub max_clock_skew: Dur,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Bearer tokens with every right (role `operator`), named `token-1`,
    /// `token-2`, … in audit records. Prefer [`Api::token`].
    pub tokens: Vec<String>,
    /// Named tokens, each with one role. Environment: `NUDGE_API_TOKENS`,
    /// comma-separated `name:role:secret` (a bare secret is an operator
    /// token), replaces both lists.
    pub token: Vec<NamedToken>,
}

/// Who may call the API with one token, and under what name the audit
/// records it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    pub name: String,
    pub role: Role,
    pub secret: String,
}

impl std::fmt::Debug for NamedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NamedToken({}: {:?})", self.name, self.role)
    }
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: generations, campaigns, dead letters.
    Viewer,
    /// The contact centre: customers' actions and their outcomes.
    Agent,
    /// Everything: generations, campaigns, quarantine, dead letters, and
    /// what agents and viewers do.
    Operator,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }
}

/// A TOML error without the values it quotes: a type error on a secret
/// (`write_keys = "secret"`) must not print the secret.
fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

impl Api {
    /// Every token the API accepts, named.
    pub fn all_tokens(&self) -> Vec<NamedToken> {
        let mut out = self.token.clone();
        for (i, t) in self.tokens.iter().enumerate() {
            out.push(NamedToken {
                name: format!("token-{}", i + 1),
                role: Role::Operator,
                secret: t.clone(),
            });
        }
        out
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// Linear memory per plugin instance.
    pub memory_mib: usize,
    /// Deadline per call: the plugin's own time.
    pub deadline: Dur,
    /// Largest state value.
    pub max_state_value_kib: usize,
    /// State bytes (keys and values) one call may write.
    pub max_state_write_kib: usize,
    /// State one plugin may keep per customer.
    pub state_quota_kib: usize,
    /// Bytes one call may return (firings, a treatment, messages).
    pub max_output_kib: usize,
    /// Bytes one call may log (`log`, stdout and stderr together).
    pub max_log_kib: usize,
    /// Longest log line before it is cut.
    pub max_log_line: usize,
    /// State writes, timer changes and log lines per call.
    pub max_ops_per_call: usize,
    /// Shortest delay of a timer after the call's time.
    pub min_timer_delay: Dur,
    /// Timer firings per plugin and customer each time the clock advances.
    pub max_timer_firings: usize,
}

impl PluginLimits {
    /// The limits every plugin call runs under (manifests may lower them).
    pub fn to_limits(&self) -> crate::plugins::Limits {
        crate::plugins::Limits {
            memory_bytes: self.memory_mib << 20,
            deadline: self.deadline.0,
            max_state_value: self.max_state_value_kib << 10,
            max_ops_per_call: self.max_ops_per_call,
            max_state_write: self.max_state_write_kib << 10,
            state_quota: self.state_quota_kib << 10,
            max_output: self.max_output_kib << 10,
            max_log_bytes: self.max_log_kib << 10,
            max_log_line: self.max_log_line,
            min_timer_delay: self.min_timer_delay.0,
            max_timer_firings: self.max_timer_firings,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (a relay on loopback or a private network).
    #[default]
    None,
    /// Plain connection upgraded with STARTTLS (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    /// Environment: `NUDGE_SMTP_PASSWORD`.
    pub password: Option<String>,
    /// The `From` of every message.
    pub from: String,
    /// Domain part of generated `Message-ID`s.
    pub message_id_domain: String,
    pub timeout: Dur,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// Attempts before a delivery goes to the dead letters.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max`.
    pub backoff_initial: Dur,
    pub backoff_max: Dur,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    pub http_timeout: Dur,
}

/// Hot reload of the plugins and rules folders.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reload {
    /// Watch the folders and reload on change. Off: reload only on
    /// `POST /v1/generations/reload`.
    pub watch: bool,
    /// How long the folders must be quiet before a change is built.
    pub debounce: Dur,
    /// Reload check however quiet the watcher is ("0s": never), for file
    /// systems without reliable change notices.
    pub rescan: Dur,
    /// Good generations kept in memory besides the active one (instant
    /// rollback); older ones are rebuilt from the store's archive.
    pub keep: usize,
    /// Generation records kept (with the archived files only they use);
    /// older ones are deleted.
    pub history: usize,
}

/// When a plugin that keeps faulting is quarantined with its campaigns.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quarantine {
    /// Faults (traps, deadlines, memory, instantiation; not errors the
    /// plugin returns) of one plugin
    /// version within `window`; 0: never quarantine.
    pub faults: usize,
    pub window: Dur,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: true,
            debounce: Dur(Duration::from_millis(250)),
            rescan: Dur(Duration::from_secs(60)),
            keep: 10,
            history: 1000,
        }
    }
}

/// `[cluster]`: the nodes share a NATS JetStream cluster (ARCHITECTURE.md,
/// "The cluster"). Credentials come from the environment, never from this
/// file: `NUDGE_NATS_CREDS` (a `.creds` file), or `NUDGE_NATS_USER` and
/// `NUDGE_NATS_PASSWORD`, or `NUDGE_NATS_TOKEN`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URLs, e.g. `["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]`.
    pub servers: Vec<String>,
    /// This node's name, unique in the cluster (members, slot owners and
    /// audit records show it). Letters, digits, `-` and `_`.
    pub node: String,
    /// Slots: the units of ownership, each a fixed set of the 1024 virtual
    /// shards. Set when the cluster is created and never changed (a node
    /// configured otherwise refuses to join). A divisor of 1024.
    pub slots: u16,
    /// JetStream replicas of the event and commit streams: 3 in
    /// production (an acknowledged event is on a majority), 1 for a
    /// single NATS server.
    pub replicas: usize,
    /// Prefix of the streams, buckets and subjects, so that several Nudge
    /// clusters can share one NATS cluster.
    pub prefix: String,
    /// How long a JetStream request (a publish's acknowledgement, a
    /// commit) may take before it is retried with the same message id.
    pub request_timeout: Dur,
    /// How long a node stays a member (and the assigner keeps its role)
    /// without renewing: a node silent this long loses its slots to the
    /// others. It renews every third of it. Whole seconds, 1s to 5min.
    pub lease: Dur,
    /// How often a held slot with new commits is snapshotted to the
    /// `<prefix>_snapshots` object store, after which its log below the
    /// snapshot is purged. A new owner restores the latest snapshot and
    /// replays only the commits after it, so this bounds what a takeover
    /// replays (and the log's size) to about this much of the slot's
    /// traffic. From 1s to 1 day.
    pub snapshot_every: Dur,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            servers: vec!["nats://127.0.0.1:4222".into()],
            node: String::new(),
            slots: 64,
            replicas: 3,
            prefix: "nudge".into(),
            request_timeout: Dur(Duration::from_secs(2)),
            lease: Dur(Duration::from_secs(6)),
            snapshot_every: Dur(Duration::from_secs(60)),
        }
    }
}

impl ClusterConfig {
    /// What is wrong with this section, if anything.
    pub fn problem(&self) -> Option<String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if self.servers.is_empty() {
            return Some("cluster.servers: at least one NATS URL".into());
        }
        if !name_ok(&self.node) {
            return Some(format!(
                "cluster.node = {:?}: a name of 1 to 64 letters, digits, '-' or '_', unique in the cluster",
                self.node
            ));
        }
        if self.slots == 0 || !crate::store::VSHARDS.is_multiple_of(usize::from(self.slots)) {
            return Some(format!(
                "cluster.slots = {}: a divisor of {} (e.g. 16, 64, 256)",
                self.slots,
                crate::store::VSHARDS
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Some(format!("cluster.replicas = {}: 1 to 5", self.replicas));
        }
        if !name_ok(&self.prefix) {
            return Some(format!(
                "cluster.prefix = {:?}: letters, digits, '-' or '_'",
                self.prefix
            ));
        }
        let every = self.snapshot_every.0;
        if every < Duration::from_secs(1) || every > Duration::from_secs(86_400) {
            return Some(format!(
                "cluster.snapshot_every = {every:?}: from 1s to 1 day"
            ));
        }
        let lease = self.lease.0;
        if lease < Duration::from_secs(1)
            || lease > Duration::from_secs(300)
            || lease.subsec_nanos() != 0
        {
            return Some(format!(
                "cluster.lease = {lease:?}: whole seconds, from 1s to 5min"
            ));
        }
        None
    }
}

/// How results are measured (`GET /v1/reports`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeasureConfig {
    /// N_tune of the always-valid interval: the number of customers (both
    /// arms) at which it is narrowest relative to the fixed one. Positive.
    pub n_tune: f64,
    /// How long decisions keep their rows (the log behind
    /// `/v1/decisions`, conversions, explanations). Older ones are deleted
    /// hourly (and soon after start-up); the reports' tallies keep what
    /// they counted. Never less than the longest goal window plus a day.
    pub retention: Dur,
}

impl Default for MeasureConfig {
    fn default() -> Self {
        MeasureConfig {
            n_tune: crate::stats::DEFAULT_N_TUNE,
            retention: Dur(Duration::from_secs(400 * 86_400)),
        }
    }
}

impl Default for Quarantine {
    fn default() -> Self {
        let p = crate::controls::QuarantinePolicy::default();
        Quarantine {
            faults: p.faults,
            window: Dur(p.window),
        }
    }
}

/// What the operator grants one plugin, over its manifest.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginGrant {
    /// Replaces the manifest's HTTP allowlist (`host` or `host:port`).
    pub http: Option<Vec<String>>,
    /// Merged over the manifest's `[config]`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data: "nudge-serve-data".into(),
            rules: "rules".into(),
            plugins: None,
            cache: ".nudge-cache".into(),
            workers: 0,
            clock: Clock::Wall,
            reorder_window: None,
            late: Late::Decide,
            log_format: LogFormat::Text,
            shutdown_grace: Dur(Duration::from_secs(10)),
            max_connections: 1024,
            header_read_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(60)),
        }
    }
}

impl Default for Ingest {
    fn default() -> Self {
        Ingest {
            write_keys: Vec::new(),
            max_inflight_events: 200_000,
            max_event_bytes: 32 << 10,
            max_batch_bytes: 500 << 10,
            max_message_id: 100,
            dedupe_window: Dur(Duration::from_secs(7 * 86_400)),
            max_clock_skew: Dur(Duration::from_secs(300)),
        }
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        let l = crate::plugins::Limits::default();
        PluginLimits {
            memory_mib: l.memory_bytes >> 20,
            deadline: Dur(l.deadline),
            max_state_value_kib: l.max_state_value >> 10,
            max_state_write_kib: l.max_state_write >> 10,
            state_quota_kib: l.state_quota >> 10,
            max_output_kib: l.max_output >> 10,
            max_log_kib: l.max_log_bytes >> 10,
            max_log_line: l.max_log_line,
            max_ops_per_call: l.max_ops_per_call,
            min_timer_delay: Dur(l.min_timer_delay),
            max_timer_firings: l.max_timer_firings,
        }
    }
}

impl Default for Smtp {
    fn default() -> Self {
        Smtp {
            host: "127.0.0.1".into(),
            port: 25,
            tls: SmtpTls::None,
            username: None,
            password: None,
            from: "Nudge <nudge@localhost>".into(),
            message_id_domain: "nudge.localhost".into(),
            timeout: Dur(Duration::from_secs(10)),
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            max_attempts: 8,
            backoff_initial: Dur(Duration::from_secs(1)),
            backoff_max: Dur(Duration::from_secs(600)),
            concurrency: 32,
            http_timeout: Dur(Duration::from_secs(10)),
        }
    }
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Config {
    /// Reads `path`, then applies the environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut c = Config::parse(path, &text)?;
        c.apply_env(|k| std::env::var(k).ok());
        Ok(c)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let c: Config = Config::parse_toml(path, text)?;
        if !(c.measure.n_tune.is_finite() && c.measure.n_tune > 0.0) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: String::new(),
                message: format!(
                    "measure.n_tune = {}: must be a positive number (customers)",
                    c.measure.n_tune
                ),
            });
        }
        if let Some(problem) = c.cluster.as_ref().and_then(ClusterConfig::problem) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: String::new(),
                message: problem,
            });
        }
        if c.server.late == Late::Refuse && c.server.clock == Clock::Wall {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: String::new(),
                message: "server.late = \"refuse\" needs clock = \"event\": on the wall clock an event is late only against its customer's last decided event, which ingest cannot see".into(),
            });
        }
        Ok(c)
    }

    fn parse_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(":{}", crate::rules::line_of(text, s.start)))
                .unwrap_or_default();
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                message: redact(e.message()),
            }
        })
    }

    /// Secrets from the environment replace the file's.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(v) = var("NUDGE_WRITE_KEYS") {
            self.ingest.write_keys = list(&v);
        }
        if let Some(v) = var("NUDGE_API_TOKENS") {
            self.api.tokens.clear();
            self.api.token.clear();
            for entry in list(&v) {
                let parts: Vec<&str> = entry.splitn(3, ':').collect();
                let role = |r: &str| match r {
                    "viewer" => Some(Role::Viewer),
                    "agent" => Some(Role::Agent),
                    "operator" => Some(Role::Operator),
                    _ => None,
                };
                match parts.as_slice() {
                    [name, r, secret] if role(r).is_some() => self.api.token.push(NamedToken {
                        name: (*name).to_owned(),
                        role: role(r).unwrap_or(Role::Viewer),
                        secret: (*secret).to_owned(),
                    }),
                    _ => self.api.tokens.push(entry),
                }
            }
        }
        if let Some(v) = var("NUDGE_SMTP_PASSWORD") {
            self.smtp.password = Some(v);
        }
        if let Some(v) = var("NUDGE_SMTP_USERNAME") {
            self.smtp.username = Some(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_example_parses_and_documents_every_section() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nudge.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&path, &text).unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.store.memory_mib, crate::store::Budget::DEFAULT_MIB);
        for section in [
            "[server]",
            "[store]",
            "[ingest]",
            "[api]",
            "[limits]",
            "[smtp]",
            "[delivery]",
            "[reload]",
            "[quarantine]",
            "[measure]",
        ] {
            assert!(text.contains(section), "nudge.toml lacks {section}");
        }
        assert!(c.cluster.is_none(), "the example is one process");
        // The commented [cluster] block, uncommented, is a valid section
        // naming every field.
        let block: String = text
            .lines()
            .skip_while(|l| *l != "#[cluster]")
            .filter(|l| l.starts_with('#') && !l.starts_with("##"))
            .map(|l| format!("{}\n", &l[1..]))
            .collect();
        let c = Config::parse(&path, &block).unwrap();
        let cluster = c.cluster.expect("[cluster] in nudge.toml");
        assert_eq!(
            (cluster.node.as_str(), cluster.slots, cluster.replicas),
            ("nudge-1", 64, 3)
        );
        for field in [
            "servers",
            "node",
            "slots",
            "replicas",
            "prefix",
            "request_timeout",
        ] {
            assert!(
                block.contains(&format!("{field} =")),
                "[cluster] lacks {field}"
            );
        }
    }

    #[test]
    fn cluster_section_refuses_what_cannot_work() {
        for (toml, wanted) in [
            ("[cluster]\nnode = \"a.b\"\n", "cluster.node"),
            (
                "[cluster]\nnode = \"a\"\nslots = 48\n",
                "cluster.slots = 48",
            ),
            ("[cluster]\nnode = \"a\"\nservers = []\n", "cluster.servers"),
            (
                "[cluster]\nnode = \"a\"\nreplicas = 0\n",
                "cluster.replicas",
            ),
        ] {
            let e = Config::parse(Path::new("n.toml"), toml)
                .unwrap_err()
                .to_string();
            assert!(e.contains(wanted), "{toml}: {e}");
        }
        let ok = Config::parse(Path::new("n.toml"), "[cluster]\nnode = \"n1\"\n").unwrap();
        assert_eq!(ok.cluster.map(|c| c.slots), Some(64));
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = Config::parse(
            Path::new("x.toml"),
            "[server]\nworkers = 2\nclok = \"wall\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("x.toml:3:"), "{e}");
        assert!(e.contains("clok"), "{e}");
    }

    #[test]
    fn environment_replaces_secrets() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "NUDGE_WRITE_KEYS" => Some("a, b".into()),
            "NUDGE_SMTP_PASSWORD" => Some("pw".into()),
            _ => None,
        });
        assert_eq!(c.ingest.write_keys, ["a", "b"]);
        assert_eq!(c.smtp.password.as_deref(), Some("pw"));
        assert!(c.api.tokens.is_empty());
    }
}
