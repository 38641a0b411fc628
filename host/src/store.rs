//! The customer store, on sled. The only module that imports sled.
//!
//! One tree, keys by prefix, so everything of one customer is contiguous and
//! one event's changes commit as one atomic batch:
//!
//! | key | value |
//! |---|---|
//! | `c` customer `\0` `t` | traits, JSON object |
//! | `c` customer `\0` `h` | decision history (frequency, contact policy), JSON |
//! | `c` customer `\0` `p` len plugin | the plugin's state for the customer, one [`StateRecord`] |
//! | `c` customer `\0` `m` len plugin key | pending timer: due (8 bytes) + trigger id |
//! | `c` customer `\0` `e` ts campaign | a decision with its explanation (JSON), the customer's timeline |
//! | `T` due customer `\0` len plugin key | timer queue, ordered by (due, customer) |
//! | `D` ts customer `\0` campaign | decision log, ordered as the output |
//! | `V` ts customer `\0` campaign | when that decision converted (its goal event's time) and what it was worth (micro-units, i64) |
//! | `W` vshard | inbox watermark: every event of the virtual shard up to it is decided |
//! | `X` vshard seq | an event of the virtual shard decided above its watermark (held events were released out of arrival order) |
//! | `O` delivery id | outbox: a `sent` decision's delivery, until delivered |
//! | `L` delivery id | dead letters: deliveries that failed for good |
//! | `A` customer `\0` action id | the contact centre's action queue |
//! | `F` | the store's format ([`FORMAT`]); older stores are converted at open |
//!
//! Customer ids never contain NUL (ingest refuses them), so `\0` ends them and
//! byte order of keys is the order of (time, customer id). Times are encoded
//! big-endian with the sign bit flipped so negative times sort first.
//!
//! # Write-back
//!
//! Writing every event to sled costs more than deciding it. So [`Store::commit`]
//! applies an event's changes atomically to an in-memory layer that every
//! read consults first, and [`Store::persist`] writes that layer to sled as
//! one atomic batch (group commit): a crash loses whole events since the last
//! persist, never part of one. The timer queue is also kept in memory
//! (loaded at open, [`queue`]) so the next due timer is found without a scan.
//!
//! # Memory
//!
//! Every cache the store keeps (sled's, the read cache, the inbox's, the
//! timer queue's, and the workers' decoded traits) is a share of one
//! [`Budget`] (`[store] memory_mib`), so what a process holds does not
//! grow with the number of customers, events or pending timers.
//!
//! # Acknowledged events
//!
//! The live server keeps its inbox in a second sled instance (`inbox/` in
//! the store folder), so that acknowledging a request flushes only the
//! inbox, not the workers' state:
//!
//! | key | value |
//! |---|---|
//! | `I` seq | one group commit of acknowledged events (≤ 32 KB), from `seq` on |
//! | `M` messageId | when that message id was first accepted (de-duplication) |
//!
//! Each group is flushed to disk before the clients get their `200`. Events
//! get increasing sequence numbers; customers map onto [`VSHARDS`] virtual
//! shards, each decided in sequence order by one worker, so one number per
//! virtual shard says what is decided: the commit of an event's effects sets
//! its virtual shard's watermark (`W`, in the main store) in the same batch
//! as its decision and outbox entries. After a crash an event is decided
//! with all its effects (at or under the watermark) or not at all (above:
//! decided again on start-up). A group is deleted once the watermarks, on
//! disk, have passed all its events: one write per group, not per event.
//! Virtual shards do not depend on the worker count, so a restart with
//! another count reads the same watermarks.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod cluster;
mod ledger;
mod queue;
mod snapshot;
mod state;
mod usage;

pub use cluster::{decode_ops, encode_ops, slot_of_key, Admission, Admitted, Op};
pub use ledger::{decode_unit, encode_unit, TallyEdit, TallyRecord, MATURITY};
use queue::TimerQueue;
pub use snapshot::{each_op as each_snapshot_op, SlotImage};
pub use state::StateRecord;
pub use usage::{disk_bytes, Usage};

/// sled sizes its cache by what nodes take on disk; decoded in memory they
/// take about three times that (a 300k-customer replay: 250 MiB of RSS for
/// 77 MiB of nominal cache). sled gets a third of its share as its nominal
/// capacity, so that what it holds is the share.
const SLED_OVERSHOOT: usize = 3;

/// The store's memory budget and how it is shared out: a quarter for
/// sled's page cache, smaller shares for the caches of our own, a little
/// for changes not yet persisted, and the rest (about a fifth) for what sled holds
/// while it applies a batch of them ([`Budget::unpersisted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Bytes in all.
    pub total: usize,
}

impl Budget {
    /// `[store] memory_mib` when unset.
    pub const DEFAULT_MIB: usize = 512;

    pub fn mib(mib: usize) -> Budget {
        Budget {
            total: mib.max(16) << 20,
        }
    }

    fn share(&self, percent: usize) -> usize {
        self.total / 100 * percent
    }

    /// sled's page cache of the customer store, as sled counts it.
    pub fn sled_cache(&self) -> usize {
        // sled refuses a cache under 256 bytes; a tiny budget (tests)
        // still gets a working one.
        (self.share(25) / SLED_OVERSHOOT).max(1 << 20)
    }

    /// sled's page cache of the inbox (serve only), as sled counts it.
    pub fn inbox_cache(&self) -> usize {
        (self.share(5) / SLED_OVERSHOOT).max(1 << 20)
    }

    /// The write-back layer's cache of values read or persisted.
    pub fn read_cache(&self) -> usize {
        self.share(15)
    }

    /// The workers' decoded traits, all workers together.
    pub fn traits_cache(&self) -> usize {
        self.share(10)
    }

    /// The in-memory timer queues, all shards together.
    pub fn timers(&self) -> usize {
        self.share(10)
    }

    /// Replay's window of message ids held in memory (the rest is on disk,
    /// behind a filter that is part of this share).
    pub fn ids(&self) -> usize {
        self.share(10)
    }

    /// The deliverer's window of pending deliveries (serve only; the rest
    /// wait in the outbox on disk).
    pub fn deliveries(&self) -> usize {
        self.share(5)
    }

    /// Committed changes not yet persisted, before the persister should
    /// write them out. Small, because applying a batch costs sled many
    /// times its size until it ends (it holds one epoch guard for the whole
    /// batch, so every node version it replaces stays allocated): 50 MiB
    /// of changes took 2 GiB of RSS, 12 MiB about 300 MiB.
    pub fn unpersisted(&self) -> usize {
        self.share(2)
    }
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::mib(Budget::DEFAULT_MIB)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // Not a `#[from]`/source: the message already holds sled's, and a
    // source would print it a second time in an error chain.
    #[error("store: {0}")]
    Sled(sled::Error),
    #[error("store {path}: {error}")]
    Open { path: String, error: sled::Error },
    #[error("store {path}: written in format {found}, newer than this nudge reads ({FORMAT}): run a newer nudge")]
    Newer { path: String, found: u8 },
    /// The cluster's commit log did not take a persist's changes (they
    /// stay pending).
    #[error("commit log: {0}")]
    Log(String),
    #[error("store: corrupt {what} for customer {customer:?}: {problem}")]
    Corrupt {
        what: &'static str,
        customer: String,
        problem: String,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        StoreError::Sled(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What frequency and contact policies read: the latest counted decision
/// of each campaign and the recent `sent` times on each channel; and the
/// decisions still waiting for their goal event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// campaign → time of its latest `sent` or `control` decision.
    pub last: BTreeMap<String, i64>,
    /// channel → times of recent `sent` decisions, oldest first.
    pub sent: BTreeMap<String, Vec<i64>>,
    /// `sent` and `control` decisions whose goal window is still open.
    #[serde(default)]
    pub open: Vec<Open>,
}

/// A counted decision waiting for its goal event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub campaign: String,
    /// Decision time: goal events at or before it do not count.
    pub ts: i64,
    pub goal: String,
    /// Last moment a goal event counts.
    pub until: i64,
}

/// A counted decision that reached its goal, as the store recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Conversion {
    /// The decision's time, customer and campaign.
    pub ts: i64,
    pub customer: String,
    pub campaign: String,
    /// When the goal event happened.
    pub at: i64,
    /// What it was worth to the campaign (`goal.value`), in micro-units.
    pub value: i64,
}

/// A pending timer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timer {
    pub due: i64,
    /// `messageId` of the event during which it was set.
    pub trigger: String,
}

/// A timer that is due, as read from the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueTimer {
    pub due: i64,
    pub customer: String,
    pub plugin: String,
    pub key: String,
    pub trigger: String,
}

/// What a key and value cost in a hash map besides their bytes.
const ENTRY_OVERHEAD: usize = 64;

fn entry_cost(k: &[u8], v: &Option<Vec<u8>>) -> usize {
    k.len() + v.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD
}

impl Pending {
    /// Changes not yet in sled for the keys `keep` accepts, what is being
    /// persisted under what is committed since: they override sled's
    /// values (`None`: deleted).
    fn overlay(&self, keep: impl Fn(&[u8]) -> bool) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        let mut out = BTreeMap::new();
        let layers = self
            .persisting
            .iter()
            .map(|p| p.as_ref())
            .chain([&self.dirty]);
        for layer in layers {
            for (k, v) in layer.iter().filter(|(k, _)| keep(k)) {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    fn cache(&mut self, k: Vec<u8>, v: Option<Vec<u8>>) {
        if self.clean_bytes > self.budget.read_cache() {
            // Starting over is crude but cheap, and only this process
            // writes the store, so correctness never depends on the cache.
            self.clean.clear();
            self.clean_bytes = 0;
        }
        self.clean_bytes += entry_cost(&k, &v);
        self.clean.insert(k, v);
    }
}

/// Handle to the store; cheap to clone, clones share the write-back layer.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// The live server's inbox and message ids (see the module docs).
    inbox: sled::Db,
    pending: Arc<Mutex<Pending>>,
    /// Serialises the writers that bypass the write-back layer and
    /// read-modify-write (tallies of deliveries and agents' answers).
    direct: Arc<Mutex<()>>,
    /// Commits and the persister's layer swaps hold it shared; a reader
    /// that needs one state across several reads (a report) holds it
    /// exclusively ([`Store::quiesced`]).
    gate: Arc<std::sync::RwLock<()>>,
    /// Set when the store is a cluster node's copy of its slots.
    side: Arc<std::sync::OnceLock<cluster::Side>>,
}

/// A page of the decision log: the lines, and the next page's cursor.
pub type Page = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// A customer's decisions with their explanations (JSON), each with when
/// it converted and its value in micro-units.
pub type Timeline = Vec<(Vec<u8>, Option<(i64, i64)>)>;

/// Keys and their values (`None`: deleted or absent).
type KeyValues = HashMap<Vec<u8>, Option<Vec<u8>>>;

/// Committed changes not yet persisted, a read cache, and the timer queue.
struct Pending {
    budget: Budget,
    /// key → value (`None`: deleted) since the last persist.
    dirty: KeyValues,
    /// What `dirty` costs, as [`entry_cost`] counts.
    dirty_bytes: usize,
    /// Changes being written to sled by a `persist` in progress: still
    /// read from here until sled has them.
    persisting: Option<Arc<KeyValues>>,
    /// Values as persisted (`None`: absent), read or written recently. Only
    /// this process writes the store, so it never goes stale.
    clean: KeyValues,
    clean_bytes: usize,
    /// The pending timers, per shard: queue key → trigger id.
    timers: Vec<TimerQueue>,
    /// Queue keys created since the last persist (so not in sled): one
    /// removed again before the persist need not be written at all.
    fresh: std::collections::HashSet<Vec<u8>>,
}

fn time_bytes(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from(b: &[u8]) -> Option<i64> {
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(a) ^ (1 << 63)) as i64)
}

fn customer_key(customer: &str, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(customer.len() + 16);
    k.push(b'c');
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k.push(tag);
    k
}

/// Plugin names are at most 255 bytes (checked at load), so one length
/// byte separates name from key without an escape.
fn push_plugin_key(k: &mut Vec<u8>, plugin: &str, key: &str) {
    k.push(plugin.len().min(255) as u8);
    k.extend_from_slice(plugin.as_bytes());
    k.extend_from_slice(key.as_bytes());
}

/// A key of the decision log (`D`) or of its conversions (`V`): tag, time,
/// customer, NUL, campaign, so both sort in the output's order.
fn log_key(tag: u8, ts: i64, customer: &str, campaign: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + customer.len() + campaign.len());
    k.push(tag);
    k.extend_from_slice(&time_bytes(ts));
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    k.extend_from_slice(campaign.as_bytes());
    k
}

/// A conversion record's value: when the goal event came, and what it was
/// worth in micro-units (0 when recorded before values existed).
fn decode_conversion(v: &[u8]) -> Option<(i64, i64)> {
    let at = time_from(v)?;
    let value = v
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i64::from_be_bytes);
    Some((at, value))
}

/// Whether a customer key is one of their timeline's (`e`).
fn is_timeline(k: &[u8]) -> bool {
    k.iter()
        .position(|b| *b == 0)
        .and_then(|nul| k.get(nul + 1))
        == Some(&b'e')
}

fn plugin_key(customer: &str, tag: u8, plugin: &str, key: &str) -> Vec<u8> {
    let mut k = customer_key(customer, tag);
    push_plugin_key(&mut k, plugin, key);
    k
}

fn queue_key(due: i64, customer: &str, plugin: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + customer.len() + plugin.len() + key.len());
    k.push(b'T');
    k.extend_from_slice(&time_bytes(due));
    k.extend_from_slice(customer.as_bytes());
    k.push(0);
    push_plugin_key(&mut k, plugin, key);
    k
}

fn inbox_key(seq: u64) -> [u8; 9] {
    let mut k = [b'I'; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn watermark_key(vshard: usize) -> [u8; 3] {
    let s = (vshard.min(u16::MAX as usize) as u16).to_be_bytes();
    [b'W', s[0], s[1]]
}

/// Largest inbox value written (bytes).
pub const INBOX_CHUNK: usize = 32 << 10;

/// One group commit of the inbox: (seq, event JSON) in order.
pub type InboxGroup = Vec<(u64, Vec<u8>)>;

/// The inbox as found at start-up.
#[derive(Debug, Default)]
pub struct InboxState {
    /// Groups by first sequence number.
    pub groups: Vec<(u64, InboxGroup)>,
    /// Virtual shard → last decided sequence number.
    pub watermarks: Vec<(usize, u64)>,
    /// Events decided above their shard's watermark: (virtual shard, seq).
    pub above: Vec<(usize, u64)>,
}

/// What a persist wrote that others wait for.
#[derive(Debug, Default)]
pub struct Persisted {
    /// Outbox entries, now in sled.
    pub outbox: Vec<Vec<u8>>,
    /// Inbox watermarks, now in sled: (virtual shard, seq).
    pub watermarks: Vec<(usize, u64)>,
}

fn encode_group(events: &[(u64, &str, &[u8])]) -> Vec<u8> {
    let mut v = Vec::with_capacity(events.iter().map(|e| e.2.len() + 12).sum());
    for (seq, _, bytes) in events {
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        v.extend_from_slice(bytes);
    }
    v
}

fn decode_group(mut v: &[u8]) -> Option<InboxGroup> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let seq = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        let len = u32::from_be_bytes(v.get(8..12)?.try_into().ok()?) as usize;
        out.push((seq, v.get(12..12 + len)?.to_vec()));
        v = &v[12 + len..];
    }
    Some(out)
}

fn tagged(tag: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(tag);
    k.extend_from_slice(id.as_bytes());
    k
}

/// `N` vshard id: a message id a cluster node decided (see
/// `store/cluster.rs`).
fn seen_key(vshard: usize, id: &str) -> Vec<u8> {
    let mut k = vec![b'N'];
    k.extend_from_slice(&(vshard.min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn message_key(message_id: &str) -> Vec<u8> {
    tagged(b'M', message_id)
}

fn action_key(customer: &str, id: &str) -> Vec<u8> {
    let mut k = tagged(b'A', customer);
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Virtual shards of customers: watermarks are kept per virtual shard, and
/// a worker owns whole virtual shards ([`shard_of`]).
pub const VSHARDS: usize = 1024;

/// The virtual shard of `customer`: FNV-1a 64 of the id, modulo [`VSHARDS`].
pub fn vshard_of(customer: &str) -> usize {
    (crate::decide::fnv1a64(&[customer.as_bytes()]) % VSHARDS as u64) as usize
}

/// The worker shard that owns `customer`: its virtual shard modulo
/// `shards`. Every key of a customer is written by that shard's worker
/// only, and each virtual shard belongs to one worker.
pub fn shard_of(customer: &str, shards: usize) -> usize {
    vshard_of(customer) % shards.max(1)
}

fn queue_shard(k: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let rest = k.get(9..).unwrap_or_default();
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    shard_of(&String::from_utf8_lossy(&rest[..end]), shards)
}

fn parse_queue_key(k: &[u8], trigger: &[u8]) -> Option<DueTimer> {
    let due = time_from(k.get(1..)?)?;
    let rest = k.get(9..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let customer = std::str::from_utf8(&rest[..nul]).ok()?.to_owned();
    let len = usize::from(*rest.get(nul + 1)?);
    let plugin = std::str::from_utf8(rest.get(nul + 2..nul + 2 + len)?)
        .ok()?
        .to_owned();
    let key = std::str::from_utf8(rest.get(nul + 2 + len..)?)
        .ok()?
        .to_owned();
    Some(DueTimer {
        due,
        customer,
        plugin,
        key,
        trigger: String::from_utf8_lossy(trigger).into_owned(),
    })
}

/// The layout this build writes. 2: plugin state as one record per plugin
/// and customer ([`StateRecord`]); 1 (no `F` key): one key per state key.
const FORMAT: u8 = 2;
const FORMAT_KEY: &[u8] = b"F";

/// Converts a store written in an older format to [`FORMAT`].
fn upgrade(db: &sled::Db, dir: &Path) -> Result<()> {
    match db.get(FORMAT_KEY)?.as_deref() {
        Some([f]) if *f == FORMAT => return Ok(()),
        Some([f]) if *f > FORMAT => {
            return Err(StoreError::Newer {
                path: dir.display().to_string(),
                found: *f,
            })
        }
        _ => {}
    }
    let records = state::migrate(db)?;
    if records > 0 {
        tracing::info!(path = %dir.display(), records, "plugin state converted to one record per plugin and customer");
    }
    db.insert(FORMAT_KEY, &[FORMAT])?;
    Ok(())
}

/// A sled batch of `ops` (`None`: remove).
fn batch_of(ops: impl IntoIterator<Item = Op>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (k, v) in ops {
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
    batch
}

/// Frees what sled retired while it applied a batch of `keys` keys.
///
/// sled hands every node a write replaces (and every page it evicts) to
/// crossbeam-epoch's global collector, which frees garbage only as threads
/// pin: at most 8 bags of 64 objects every 128 pins. A batch pins once and
/// retires thousands of objects, so batches of more than a few hundred keys
/// outrun collection for good, and the backlog grows with every write:
/// 1.6M keys rewritten in batches of 2,000 with a 128 MiB cache reached
/// 3 GiB of RSS after 2M writes and 20 GiB after 8M (batches of 500, or
/// this after each batch: flat at 280 MiB). Each `flush` advances the
/// epoch and frees up to 8 expired bags; a batch retires at most a few
/// objects per key, so `keys / 16` rounds drain it with room to spare, and
/// a round with nothing to free costs a pin.
///
/// crossbeam-epoch 0.9 is the major version sled 0.34 uses, so this is
/// the same global collector (`Cargo.lock` holds one copy).
fn reclaim(keys: usize) {
    for _ in 0..keys / 16 + 16 {
        crossbeam_epoch::pin().flush();
    }
}

/// Whether the sled instance at `path` compresses: one that exists keeps
/// what it was created with (sled refuses to open it otherwise); a new one
/// does if `wanted`.
fn compressed(path: &Path, wanted: bool) -> bool {
    match std::fs::read(path.join("conf")) {
        Ok(conf) => String::from_utf8_lossy(&conf)
            .lines()
            .any(|l| l.trim() == "use_compression: true"),
        Err(_) => wanted,
    }
}

/// zstd's level for sled's pages: the fast end, since the persister
/// compresses every page it rewrites.
const ZSTD_LEVEL: i32 = 1;

fn open_db(path: &Path, cache_bytes: usize, compress: bool) -> Result<sled::Db> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes as u64)
        .use_compression(compressed(path, compress))
        .compression_factor(ZSTD_LEVEL)
        .flush_every_ms(Some(1000));
    // sled releases its file lock when its last background thread ends,
    // shortly after the previous handle in this process dropped: wait a
    // little for it rather than fail a restart.
    let mut tries = 0;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::Other
                    && e.to_string().contains("could not acquire lock")
                    && tries < 100 =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => {
                return other.map_err(|error| StoreError::Open {
                    path: path.display().to_string(),
                    error,
                })
            }
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, with one timer queue
    /// and the default budget.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with(dir, 1, Budget::default())
    }

    /// Opens the store with the timer queue split into `shards` by customer
    /// ([`shard_of`]), one per worker, its caches within `budget`.
    pub fn open_with(dir: &Path, shards: usize, budget: Budget) -> Result<Store> {
        Store::open_compressed(dir, shards, budget, false)
    }

    /// [`Store::open_with`], a new store compressing what it writes when
    /// `compress` (`[store] compression`); an existing one keeps what it
    /// was created with.
    pub fn open_compressed(
        dir: &Path,
        shards: usize,
        budget: Budget,
        compress: bool,
    ) -> Result<Store> {
        let shards = shards.max(1);
        // Durability comes from `persist` + `flush`; the background flush
        // only bounds how much a crash can lose between them.
        let db = open_db(dir, budget.sled_cache(), compress)?;
        upgrade(&db, dir)?;
        let inbox = open_db(&dir.join("inbox"), budget.inbox_cache(), compress)?;
        let mut timers = vec![TimerQueue::new(budget.timers() / shards); shards];
        for kv in db.scan_prefix(b"T") {
            let (k, v) = kv?;
            let shard = queue_shard(&k, shards);
            timers[shard].insert(k.to_vec(), v.to_vec());
        }
        Ok(Store {
            db,
            inbox,
            pending: Arc::new(Mutex::new(Pending {
                budget,
                dirty: KeyValues::new(),
                dirty_bytes: 0,
                persisting: None,
                clean: KeyValues::new(),
                clean_bytes: 0,
                timers,
                fresh: Default::default(),
            })),
            direct: Arc::new(Mutex::new(())),
            gate: Arc::new(std::sync::RwLock::new(())),
            side: Arc::new(std::sync::OnceLock::new()),
        })
    }

    /// The budget the store was opened with.
    pub fn budget(&self) -> Budget {
        self.lock().budget
    }

    /// How many timer queues (worker shards) it was opened with.
    pub fn shards(&self) -> usize {
        self.lock().timers.len()
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave `Pending` half-applied
        // (`commit` applies after all fallible work), so a poisoned lock is
        // still consistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        {
            let pending = self.lock();
            let found = pending
                .dirty
                .get(key)
                .or_else(|| pending.persisting.as_ref().and_then(|p| p.get(key)))
                .or_else(|| pending.clean.get(key));
            if let Some(v) = found {
                return Ok(v.clone());
            }
        }
        // Not pending anywhere, and only the worker that owns this customer
        // writes its keys (and it is here, reading), so sled's value cannot
        // change before we cache it.
        let v = self.db.get(key)?.map(|v| v.to_vec());
        self.lock().cache(key.to_vec(), v.clone());
        Ok(v)
    }

    pub fn traits(&self, customer: &str) -> Result<Map<String, Value>> {
        match self.get(&customer_key(customer, b't'))? {
            None => Ok(Map::new()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                what: "traits",
                customer: customer.into(),
                problem: e.to_string(),
            }),
        }
    }

    pub fn history(&self, customer: &str) -> Result<History> {
        match self.get(&customer_key(customer, b'h'))? {
            None => Ok(History::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                what: "decision history",
                customer: customer.into(),
                problem: e.to_string(),
            }),
        }
    }

    /// Everything `plugin` keeps for `customer`.
    pub fn plugin_record(&self, customer: &str, plugin: &str) -> Result<StateRecord> {
        match self.get(&plugin_key(customer, b'p', plugin, ""))? {
            None => Ok(StateRecord::default()),
            Some(v) => StateRecord::decode(&v).map_err(|problem| StoreError::Corrupt {
                what: "plugin state",
                customer: customer.into(),
                problem: format!("plugin {plugin:?}: {problem}"),
            }),
        }
    }

    /// One key of what `plugin` keeps for `customer`.
    pub fn plugin_state(&self, customer: &str, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .plugin_record(customer, plugin)?
            .get(key)
            .map(<[u8]>::to_vec))
    }

    pub fn timer(&self, customer: &str, plugin: &str, key: &str) -> Result<Option<Timer>> {
        let Some(v) = self.get(&plugin_key(customer, b'm', plugin, key))? else {
            return Ok(None);
        };
        let due = time_from(&v).ok_or_else(|| StoreError::Corrupt {
            what: "timer",
            customer: customer.into(),
            problem: format!("{} bytes", v.len()),
        })?;
        Ok(Some(Timer {
            due,
            trigger: String::from_utf8_lossy(&v[8..]).into_owned(),
        }))
    }

    /// Every key of `customer` with `tag` (its timeline `e`, its timers
    /// `m`), with what follows the tag, in key order: sled's, under what
    /// is being persisted, under what is committed.
    fn customer_scan(&self, customer: &str, tag: u8) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = customer_key(customer, tag);
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.db.scan_prefix(&prefix) {
            let (k, v) = kv?;
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        merged.extend(self.lock().overlay(|k| k.starts_with(&prefix)));
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| Some((k[prefix.len()..].to_vec(), v?)))
            .collect())
    }

    /// The customer's decisions with their explanations (JSON), oldest
    /// first, and for each when it converted and what it was worth.
    pub fn timeline(&self, customer: &str) -> Result<Timeline> {
        let mut out = Vec::new();
        for (rest, json) in self.customer_scan(customer, b'e')? {
            let Some(ts) = time_from(&rest) else {
                continue;
            };
            let campaign = String::from_utf8_lossy(&rest[8..]);
            let conversion = self
                .get(&log_key(b'V', ts, customer, &campaign))?
                .and_then(|c| decode_conversion(&c));
            out.push((json, conversion));
        }
        Ok(out)
    }

    /// The customer's pending timers: (plugin, key, timer).
    pub fn timers_of(&self, customer: &str) -> Result<Vec<(String, String, Timer)>> {
        let mut out = Vec::new();
        for (rest, v) in self.customer_scan(customer, b'm')? {
            let len = usize::from(*rest.first().unwrap_or(&0));
            let (Some(plugin), Some(key), Some(due)) =
                (rest.get(1..1 + len), rest.get(1 + len..), time_from(&v))
            else {
                continue;
            };
            out.push((
                String::from_utf8_lossy(plugin).into_owned(),
                String::from_utf8_lossy(key).into_owned(),
                Timer {
                    due,
                    trigger: String::from_utf8_lossy(&v[8..]).into_owned(),
                },
            ));
        }
        Ok(out)
    }

    /// The earliest pending timer of `shard`, if any.
    pub fn first_timer(&self, shard: usize) -> Result<Option<DueTimer>> {
        let mut pending = self.lock();
        if pending
            .timers
            .get(shard)
            .is_some_and(TimerQueue::needs_refill)
        {
            self.refill_timers(&mut pending, shard)?;
        }
        let Some((k, v)) = pending.timers.get(shard).and_then(TimerQueue::first) else {
            return Ok(None);
        };
        parse_queue_key(k, v)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                what: "timer queue key",
                customer: String::new(),
                problem: format!("{k:?}"),
            })
    }

    /// Reads back the timers of `shard` past its queue's horizon: sled's,
    /// under what is being persisted, under what is committed. Rare (once
    /// per budget's worth of timers fired), and the lock is held so that
    /// nothing commits in between.
    fn refill_timers(&self, pending: &mut Pending, shard: usize) -> Result<()> {
        let shards = pending.timers.len();
        let Some(horizon) = pending.timers[shard].horizon().map(<[u8]>::to_vec) else {
            return Ok(());
        };
        let later = |k: &[u8]| k.first() == Some(&b'T') && k > &horizon[..];
        // Changes not yet in sled override it, deletions included.
        let overlay = pending.overlay(|k| later(k) && queue_shard(k, shards) == shard);
        let mut added = overlay
            .iter()
            .filter_map(|(k, v)| Some((k, v.as_ref()?)))
            .peekable();
        // Collected in key order until past the queue's budget (refill
        // takes what fits), so a million timers on disk are not all read.
        let budget = pending.budget.timers() / shards;
        let (mut merged, mut bytes, mut read) = (Vec::new(), 0, 0);
        fn take(merged: &mut Vec<(Vec<u8>, Vec<u8>)>, bytes: &mut usize, k: Vec<u8>, v: Vec<u8>) {
            *bytes += queue::cost(&k, &v);
            merged.push((k, v));
        }
        let mut full = false;
        let range = (
            std::ops::Bound::Excluded(horizon),
            std::ops::Bound::Unbounded,
        );
        for kv in self.db.range::<Vec<u8>, _>(range) {
            let (k, v) = kv?;
            if k.first() != Some(&b'T') {
                break;
            }
            if queue_shard(&k, shards) != shard || overlay.contains_key(k.as_ref()) {
                continue;
            }
            while let Some((ak, av)) = added.next_if(|(ak, _)| ak.as_slice() < k.as_ref()) {
                take(&mut merged, &mut bytes, ak.clone(), av.clone());
            }
            read += 1;
            take(&mut merged, &mut bytes, k.to_vec(), v.to_vec());
            if bytes > budget {
                full = true;
                break;
            }
        }
        // Keys committed past everything sled holds; when the budget
        // stopped the scan, later ones stay out (past the new horizon).
        if !full {
            for (k, v) in added {
                take(&mut merged, &mut bytes, k.clone(), v.clone());
            }
        }
        tracing::debug!(shard, read, "timer queue read back");
        pending.timers[shard].refill(merged.into_iter(), !full);
        Ok(())
    }

    /// Applies one event's (or one timer's) changes atomically: every later
    /// read sees all of them. They reach disk at the next [`Store::persist`].
    pub fn commit(&self, changes: Changes) {
        let ops = changes.into_ops();
        if ops.is_empty() {
            return;
        }
        let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.lock();
        let shards = pending.timers.len();
        for (k, v) in ops {
            if k.first() == Some(&b'T') {
                let queue = &mut pending.timers[queue_shard(&k, shards)];
                match &v {
                    Some(v) => {
                        if queue.insert(k.clone(), v.clone())
                            && !pending.dirty.contains_key(&k)
                            && !pending
                                .persisting
                                .as_ref()
                                .is_some_and(|p| p.contains_key(&k))
                        {
                            pending.fresh.insert(k.clone());
                        }
                    }
                    None => {
                        queue.remove(&k);
                        if pending.fresh.remove(&k) {
                            if let Some(old) = pending.dirty.remove(&k) {
                                pending.dirty_bytes -= entry_cost(&k, &old);
                            }
                            continue;
                        }
                    }
                };
            }
            pending.dirty_bytes += entry_cost(&k, &v);
            if let Some(old) = pending.dirty.insert(k.clone(), v) {
                pending.dirty_bytes -= entry_cost(&k, &old);
            }
        }
    }

    /// Runs `f` with no commit and no persist in between: several reads in
    /// it see one state of the store (a report's tallies, due timers and
    /// units). Workers wait meanwhile, so `f` must be short.
    pub fn quiesced<T>(&self, f: impl FnOnce() -> T) -> T {
        let _closed = self.gate.write().unwrap_or_else(|e| e.into_inner());
        f()
    }

    /// Number of keys committed but not yet persisted.
    pub fn pending_len(&self) -> usize {
        self.lock().dirty.len()
    }

    /// Bytes committed but not yet persisted (keys, values and overhead).
    pub fn pending_bytes(&self) -> usize {
        self.lock().dirty_bytes
    }

    /// Writes everything committed so far to sled as one atomic batch, and
    /// returns the outbox entries and inbox watermarks it wrote. Workers keep
    /// committing meanwhile; reads see the changes throughout. Calls must not
    /// overlap (one thread persists).
    pub fn persist(&self) -> Result<Persisted> {
        let dirty = {
            let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
            let mut pending = self.lock();
            if pending.dirty.is_empty() {
                return Ok(Persisted::default());
            }
            let dirty = Arc::new(std::mem::take(&mut pending.dirty));
            pending.dirty_bytes = 0;
            pending.persisting = Some(dirty.clone());
            pending.fresh.clear();
            dirty
        };
        let started = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        for (k, v) in dirty.iter() {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        let applied = self.db.apply_batch(batch);
        reclaim(dirty.len());
        let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.lock();
        pending.persisting = None;
        let keys = dirty.len();
        // Readers took their clones under the lock, so this is the last
        // reference: the values move into the cache without copying.
        let dirty = Arc::try_unwrap(dirty).unwrap_or_else(|shared| (*shared).clone());
        if let Err(e) = applied {
            // Not written: back to dirty, under anything committed since.
            let pending = &mut *pending;
            for (k, v) in dirty {
                if let std::collections::hash_map::Entry::Vacant(e) = pending.dirty.entry(k) {
                    pending.dirty_bytes += entry_cost(e.key(), &v);
                    e.insert(v);
                }
            }
            return Err(e.into());
        }
        let mut persisted = Persisted::default();
        for (k, v) in dirty {
            self.settle(&mut pending, &mut persisted, k, v);
        }
        tracing::debug!(
            keys,
            micros = started.elapsed().as_micros() as u64,
            "persisted"
        );
        Ok(persisted)
    }

    /// A key just written to sled: into the read cache, or into what
    /// waits for the persist (outbox entries, watermarks).
    fn settle(
        &self,
        pending: &mut Pending,
        persisted: &mut Persisted,
        k: Vec<u8>,
        v: Option<Vec<u8>>,
    ) {
        if k.first() == Some(&b'c') && !is_timeline(&k) && !pending.dirty.contains_key(&k) {
            // Only customer keys are cached as written; the logs, inbox
            // and outbox are written here and read by scans, the timeline
            // (`e`) only by the API.
            pending.cache(k, v);
            return;
        }
        // Anything else a read cached before this write (a tally, read
        // when a worker's ledger first touched it) would be read stale
        // from now on: a ledger that starts over (a cluster node taking a
        // slot, or past its held tallies) lost counts.
        if let Some(old) = pending.clean.remove(&k) {
            pending.clean_bytes = pending.clean_bytes.saturating_sub(entry_cost(&k, &old));
        }
        match k.first() {
            Some(b'O') => persisted.outbox.extend(v),
            Some(b'W') if k.len() == 3 => {
                let vshard = usize::from(u16::from_be_bytes([k[1], k[2]]));
                if let Some(seq) = v.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes) {
                    persisted.watermarks.push((vshard, seq));
                }
            }
            _ => {}
        }
    }

    /// Persists, then waits until it is on disk. Returns what it wrote,
    /// now durable.
    pub fn flush(&self) -> Result<Persisted> {
        let persisted = self.persist()?;
        self.db.flush()?;
        Ok(persisted)
    }

    /// Waits until everything written to sled is on disk.
    pub fn sync(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Records one group commit of accepted events in the inbox, with
    /// their message ids, in one batch, and waits until it is on disk: then
    /// they may be acknowledged. Events are stored in keys of at most
    /// [`INBOX_CHUNK`] bytes (sled writes larger values as files of their
    /// own), each keyed by its first sequence number; returns those numbers.
    pub fn append_inbox(
        &self,
        events: &[(u64, &str, &[u8])],
        received_ms: i64,
    ) -> Result<Vec<u64>> {
        let mut batch = sled::Batch::default();
        let mut keys = Vec::new();
        let mut start = 0;
        while start < events.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < events.len()
                && (end == start || bytes + events[end].2.len() + 12 <= INBOX_CHUNK)
            {
                bytes += events[end].2.len() + 12;
                end += 1;
            }
            let first = events[start].0;
            batch.insert(&inbox_key(first)[..], encode_group(&events[start..end]));
            keys.push(first);
            start = end;
        }
        for (_, message_id, _) in events {
            batch.insert(message_key(message_id), &time_bytes(received_ms)[..]);
        }
        self.inbox.apply_batch(batch)?;
        reclaim(events.len() + keys.len());
        self.inbox.flush()?;
        Ok(keys)
    }

    /// Deletes a group whose events are all decided. Durable at the next
    /// flush; if lost, start-up finds it decided and deletes it again.
    pub fn remove_inbox_group(&self, first: u64) -> Result<()> {
        self.inbox.remove(inbox_key(first))?;
        Ok(())
    }

    /// Whether `message_id` was accepted before (and not yet forgotten).
    pub fn seen_message(&self, message_id: &str) -> Result<bool> {
        Ok(self.inbox.contains_key(message_key(message_id))?)
    }

    /// Forgets message ids accepted before `before_ms`; returns how many.
    pub fn forget_messages(&self, before_ms: i64) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.inbox.scan_prefix(b"M") {
            let (k, v) = kv?;
            if time_from(&v).is_some_and(|t| t < before_ms) {
                batch.remove(k);
                n += 1;
            }
        }
        self.inbox.apply_batch(batch)?;
        reclaim(n);
        Ok(n)
    }

    /// The inbox as it is on disk.
    pub fn inbox(&self) -> Result<InboxState> {
        let corrupt = |what: &'static str, k: &[u8]| StoreError::Corrupt {
            what,
            customer: String::new(),
            problem: format!("{k:?}"),
        };
        let mut state = InboxState::default();
        for kv in self.inbox.scan_prefix(b"I") {
            let (k, v) = kv?;
            let first = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| corrupt("inbox key", &k))?;
            let group = decode_group(&v).ok_or_else(|| corrupt("inbox group", &k))?;
            state.groups.push((first, group));
        }
        (state.watermarks, state.above) = self.inbox_marks()?;
        Ok(state)
    }

    /// The inbox watermarks, (virtual shard, seq), and the events decided
    /// above them, as persisted.
    #[allow(clippy::type_complexity)]
    fn inbox_marks(&self) -> Result<(Vec<(usize, u64)>, Vec<(usize, u64)>)> {
        let corrupt = |what: &'static str, k: &[u8]| StoreError::Corrupt {
            what,
            customer: String::new(),
            problem: format!("{k:?}"),
        };
        let (mut watermarks, mut above) = (Vec::new(), Vec::new());
        for kv in self.db.scan_prefix(b"W") {
            let (k, v) = kv?;
            let seq = || -> Option<u64> { Some(u64::from_be_bytes(v.as_ref().try_into().ok()?)) };
            match (&k[..], seq()) {
                ([b'W', a, b], Some(seq)) => {
                    watermarks.push((usize::from(u16::from_be_bytes([*a, *b])), seq))
                }
                _ => return Err(corrupt("inbox watermark", &k)),
            }
        }
        for k in self.db.scan_prefix(b"X").keys() {
            let k = k?;
            match (k.get(1..3), k.get(3..11)) {
                (Some(v), Some(seq)) if k.len() == 11 => above.push((
                    usize::from(u16::from_be_bytes([v[0], v[1]])),
                    u64::from_be_bytes(seq.try_into().unwrap_or_default()),
                )),
                _ => return Err(corrupt("inbox record above the watermark", &k)),
            }
        }
        Ok((watermarks, above))
    }

    /// Every pending delivery in the outbox.
    pub fn outbox(&self) -> Result<Vec<Vec<u8>>> {
        self.scan_values(b"O")
    }

    /// One page of the persisted outbox in key order: at most `limit`
    /// (key, value) pairs, after the key `from` (or at it, if `true`), or
    /// from the start.
    pub fn outbox_page(
        &self,
        from: Option<(&[u8], bool)>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        use std::ops::Bound;
        let lower = match from {
            Some((k, true)) => Bound::Included(k.to_vec()),
            Some((k, false)) => Bound::Excluded(k.to_vec()),
            None => Bound::Included(b"O".to_vec()),
        };
        self.db
            .range((lower, Bound::Excluded(b"P".to_vec())))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    /// Rewrites a pending delivery (its attempts so far).
    /// A delivery's new state (a failed attempt, counted by `tally`).
    pub fn outbox_update(&self, id: &str, json: &[u8], tally: Option<TallyEdit>) -> Result<()> {
        self.apply_direct(vec![(tagged(b'O', id), Some(json.to_vec()))], tally)
    }

    /// A delivery is done: out of the outbox and, for the agent queue, its
    /// action in, as one batch. Durable at the next [`Store::sync`].
    pub fn outbox_done(
        &self,
        id: &str,
        action: Option<(&str, &str, &[u8])>,
        tally: Option<TallyEdit>,
    ) -> Result<()> {
        let mut ops = vec![(tagged(b'O', id), None)];
        if let Some((customer, action_id, json)) = action {
            ops.push((action_key(customer, action_id), Some(json.to_vec())));
        }
        self.apply_direct(ops, tally)
    }

    /// Moves a delivery from the outbox to the dead letters.
    pub fn dead_letter(&self, id: &str, json: &[u8], tally: Option<TallyEdit>) -> Result<()> {
        let ops = vec![
            (tagged(b'O', id), None),
            (tagged(b'L', id), Some(json.to_vec())),
        ];
        self.apply_direct(ops, tally)?;
        self.db.flush()?;
        Ok(())
    }

    /// The first `n` dead letters (by id).
    pub fn dead_letters_first(&self, n: usize) -> Result<Vec<Vec<u8>>> {
        self.db
            .scan_prefix(b"L")
            .take(n)
            .map(|kv| Ok(kv?.1.to_vec()))
            .collect()
    }

    pub fn dead_letters(&self) -> Result<Vec<Vec<u8>>> {
        self.scan_values(b"L")
    }

    pub fn dead_letter_get(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(tagged(b'L', id))?.map(|v| v.to_vec()))
    }

    /// Moves a dead letter back to the outbox as `json` (attempts reset).
    pub fn retry_dead_letter(&self, id: &str, json: &[u8]) -> Result<()> {
        let ops = vec![
            (tagged(b'L', id), None),
            (tagged(b'O', id), Some(json.to_vec())),
        ];
        self.apply_direct(ops, None)?;
        self.db.flush()?;
        Ok(())
    }

    /// The customer's queued actions, by id.
    pub fn actions(&self, customer: &str) -> Result<Vec<Vec<u8>>> {
        let mut prefix = vec![b'A'];
        prefix.extend_from_slice(customer.as_bytes());
        prefix.push(0);
        self.scan_values(&prefix)
    }

    pub fn action(&self, customer: &str, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(action_key(customer, id))?.map(|v| v.to_vec()))
    }

    /// Operator metadata: generation records, paused campaigns, quarantined
    /// plugins, and the published files of each generation (by content
    /// hash, for rollback after a restart). Rare writes, each durable
    /// before it returns.
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.db.insert(tagged(b'G', key), value)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(tagged(b'G', key))?.map(|v| v.to_vec()))
    }

    pub fn has_meta(&self, key: &str) -> Result<bool> {
        Ok(self.db.contains_key(tagged(b'G', key))?)
    }

    pub fn remove_meta(&self, key: &str) -> Result<()> {
        self.db.remove(tagged(b'G', key))?;
        Ok(())
    }

    /// The keys of the metadata entries under `prefix` (values not read).
    pub fn meta_keys(&self, prefix: &str) -> Result<Vec<String>> {
        self.db
            .scan_prefix(tagged(b'G', prefix))
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[1..]).into_owned()))
            .collect()
    }

    /// Every metadata entry under `prefix`, in key order.
    pub fn meta_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.db
            .scan_prefix(tagged(b'G', prefix))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k[1..]).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn scan_values(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| Ok(kv?.1.to_vec()))
            .collect()
    }

    /// One page of the persisted decision log, in (time, customer,
    /// campaign) order: decisions at or after `from` and before `to` (ms),
    /// after the cursor `after` (a key a previous page returned), that
    /// `keep` accepts, at most `limit` of them. Returns them and, when
    /// more may follow, the cursor of the next page. Scans only the range.
    pub fn decisions_page(
        &self,
        from: Option<i64>,
        to: Option<i64>,
        after: Option<&[u8]>,
        limit: usize,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<Page> {
        let mut start = vec![b'D'];
        start.extend_from_slice(&time_bytes(from.unwrap_or(i64::MIN)));
        let lower = match after {
            Some(a) if a.first() == Some(&b'D') && a > start.as_slice() => {
                std::ops::Bound::Excluded(a.to_vec())
            }
            _ => std::ops::Bound::Included(start),
        };
        let upper = match to {
            Some(t) => {
                let mut end = vec![b'D'];
                end.extend_from_slice(&time_bytes(t));
                std::ops::Bound::Excluded(end)
            }
            None => std::ops::Bound::Excluded(vec![b'D' + 1]),
        };
        let mut out = Vec::new();
        for kv in self.db.range::<Vec<u8>, _>((lower, upper)) {
            let (k, v) = kv?;
            if !keep(&v) {
                continue;
            }
            out.push(v.to_vec());
            if out.len() >= limit {
                return Ok((out, Some(k.to_vec())));
            }
        }
        Ok((out, None))
    }

    /// Every persisted conversion, in the decision log's order (time,
    /// customer, campaign of the decision), so a reader of the log can join
    /// the two in one pass.
    pub fn conversions(&self) -> impl Iterator<Item = Result<Conversion>> + '_ {
        self.db.scan_prefix(b"V").map(|r| {
            let (k, v) = r?;
            let corrupt = || StoreError::Corrupt {
                what: "conversion",
                customer: String::new(),
                problem: format!("{:?}", &k[..]),
            };
            let ts = time_from(k.get(1..).ok_or_else(corrupt)?).ok_or_else(corrupt)?;
            let rest = k.get(9..).ok_or_else(corrupt)?;
            let nul = rest.iter().position(|b| *b == 0).ok_or_else(corrupt)?;
            let (at, value) = decode_conversion(&v).ok_or_else(corrupt)?;
            Ok(Conversion {
                ts,
                customer: String::from_utf8_lossy(&rest[..nul]).into_owned(),
                campaign: String::from_utf8_lossy(&rest[nul + 1..]).into_owned(),
                at,
                value,
            })
        })
    }

    /// Every persisted decision in the log, in (time, customer, campaign)
    /// order, as the JSON each was written with.
    pub fn decisions(&self) -> impl Iterator<Item = Result<Vec<u8>>> + '_ {
        self.db
            .scan_prefix(b"D")
            .map(|r| r.map(|(_, v)| v.to_vec()).map_err(StoreError::from))
    }
}

/// Changes of one event or timer firing, committed together.
#[derive(Default)]
pub struct Changes {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Plugin state records touched, by key: encoded at commit, so two
    /// calls of one plugin for one event both count.
    records: Vec<(Vec<u8>, StateRecord)>,
}

impl Changes {
    pub fn new() -> Changes {
        Changes::default()
    }

    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.ops.push((k, Some(v)));
    }

    fn del(&mut self, k: Vec<u8>) {
        self.ops.push((k, None));
    }

    pub fn set_traits(&mut self, customer: &str, traits: &Map<String, Value>) {
        // Serialising a Map of JSON values cannot fail.
        let v = serde_json::to_vec(traits).unwrap_or_default();
        self.put(customer_key(customer, b't'), v);
    }

    pub fn set_history(&mut self, customer: &str, history: &History) {
        let v = serde_json::to_vec(history).unwrap_or_default();
        self.put(customer_key(customer, b'h'), v);
    }

    /// Sets what `plugin` keeps for `customer` to `after`: the stored
    /// record with a call's `edits` (key → new value, `None` deletes)
    /// applied. When these changes already hold a record for the plugin and
    /// customer (an earlier call for the same event), the edits are applied
    /// to that one instead, so neither call's writes are lost.
    pub fn plugin_state<'a>(
        &mut self,
        customer: &str,
        plugin: &str,
        after: StateRecord,
        edits: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) {
        let k = plugin_key(customer, b'p', plugin, "");
        match self.records.iter_mut().find(|(rk, _)| *rk == k) {
            Some((_, record)) => {
                for (key, value) in edits {
                    record.set(key, value.map(<[u8]>::to_vec));
                }
            }
            None => self.records.push((k, after)),
        }
    }

    /// Every write, the state records encoded last.
    fn into_ops(mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        for (k, record) in std::mem::take(&mut self.records) {
            let v = (!record.is_empty()).then(|| record.encode());
            self.ops.push((k, v));
        }
        self.ops
    }

    /// Replaces timer `old` (as currently stored) with `new`.
    pub fn timer(
        &mut self,
        customer: &str,
        plugin: &str,
        key: &str,
        old: Option<&Timer>,
        new: Option<&Timer>,
    ) {
        if let Some(old) = old {
            self.del(queue_key(old.due, customer, plugin, key));
        }
        let index = plugin_key(customer, b'm', plugin, key);
        match new {
            Some(t) => {
                self.put(
                    queue_key(t.due, customer, plugin, key),
                    t.trigger.as_bytes().to_vec(),
                );
                let mut v = time_bytes(t.due).to_vec();
                v.extend_from_slice(t.trigger.as_bytes());
                self.put(index, v);
            }
            None => self.del(index),
        }
    }

    /// Records that the decision (`ts`, `customer`, `campaign`) converted
    /// at `at`, worth `value` micro-units.
    pub fn conversion(&mut self, ts: i64, customer: &str, campaign: &str, at: i64, value: i64) {
        let k = log_key(b'V', ts, customer, campaign);
        let mut v = time_bytes(at).to_vec();
        v.extend_from_slice(&value.to_be_bytes());
        self.put(k, v);
    }

    /// Every inbox event of virtual shard `vshard` up to `seq` is decided,
    /// this one's effects included in this commit.
    pub fn inbox_watermark(&mut self, vshard: usize, seq: u64) {
        self.put(watermark_key(vshard).to_vec(), seq.to_be_bytes().to_vec());
    }

    /// Records event `seq` of `vshard` as decided although its watermark is
    /// below it (`forget`: the watermark has passed it, the record goes).
    pub fn inbox_above(&mut self, vshard: usize, seq: u64, forget: bool) {
        let mut k = vec![b'X'];
        k.extend_from_slice(&(vshard.min(u16::MAX as usize) as u16).to_be_bytes());
        k.extend_from_slice(&seq.to_be_bytes());
        if forget {
            self.del(k)
        } else {
            self.put(k, Vec::new())
        }
    }

    /// A cluster node remembers message id `id` of `vshard` as decided
    /// (at `at`, ms), with the event's effects.
    pub fn message_seen(&mut self, vshard: usize, id: &str, at: i64) {
        self.put(seen_key(vshard, id), time_bytes(at).to_vec());
    }

    /// Forgets a remembered message id (its key, as listed by
    /// [`Store::seen_before`]).
    pub fn forget_seen(&mut self, key: Vec<u8>) {
        if key.first() == Some(&b'N') {
            self.del(key);
        }
    }

    /// A delivery to make once this commit is durable.
    pub fn outbox(&mut self, id: &str, json: Vec<u8>) {
        self.put(tagged(b'O', id), json);
    }

    /// The decision (`ts`, `customer`, `campaign`) with why it came out
    /// so, for the customer's timeline.
    pub fn explanation(&mut self, ts: i64, customer: &str, campaign: &str, json: &[u8]) {
        let mut k = customer_key(customer, b'e');
        k.extend_from_slice(&time_bytes(ts));
        k.extend_from_slice(campaign.as_bytes());
        self.put(k, json.to_vec());
    }

    pub fn decision(&mut self, ts: i64, customer: &str, campaign: &str, json: Vec<u8>) {
        self.put(log_key(b'D', ts, customer, campaign), json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn a_store_keeps_the_compression_it_was_created_with() {
        for created in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            {
                let s = Store::open_compressed(dir.path(), 1, Budget::default(), created).unwrap();
                let mut c = Changes::new();
                c.set_traits("c1", &serde_json::from_str(r#"{"a":"x"}"#).unwrap());
                s.commit(c);
                s.flush().unwrap();
            }
            let conf = String::from_utf8_lossy(&std::fs::read(dir.path().join("conf")).unwrap())
                .into_owned();
            assert!(
                conf.contains(&format!("use_compression: {created}")),
                "{conf}"
            );
            // Opened asking for the other: sled would refuse a change, so
            // the store keeps its own, and reads back what it holds.
            let s = Store::open_compressed(dir.path(), 1, Budget::default(), !created).unwrap();
            assert_eq!(s.traits("c1").unwrap()["a"], "x");
        }
    }

    #[test]
    fn timer_queue_orders_by_due_then_customer() {
        let (_d, s) = open();
        let mut c = Changes::new();
        let t = |due| Timer {
            due,
            trigger: format!("m{due}"),
        };
        c.timer("c-10", "p", "k", None, Some(&t(5)));
        c.timer("c-9", "p", "k", None, Some(&t(5)));
        c.timer("c-1", "p", "k", None, Some(&t(7)));
        c.timer("c-2", "p", "k", None, Some(&t(-3)));
        s.commit(c);
        let mut order = Vec::new();
        while let Some(d) = s.first_timer(0).unwrap() {
            order.push((d.due, d.customer.clone()));
            let old = s.timer(&d.customer, &d.plugin, &d.key).unwrap();
            let mut c = Changes::new();
            c.timer(&d.customer, &d.plugin, &d.key, old.as_ref(), None);
            s.commit(c);
        }
        assert_eq!(
            order,
            vec![
                (-3, "c-2".into()),
                (5, "c-10".into()),
                (5, "c-9".into()),
                (7, "c-1".into())
            ]
        );
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let mut c = Changes::new();
            set_state(&s, &mut c, "u", "p", "k", Some(b"v"));
            let mut traits = Map::new();
            traits.insert("email".into(), "a@b".into());
            c.set_traits("u", &traits);
            s.commit(c);
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.plugin_state("u", "p", "k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(s.traits("u").unwrap()["email"], "a@b");
    }

    /// One state write as a call makes it: on the stored record, unless
    /// `c` already holds one.
    fn set_state(s: &Store, c: &mut Changes, cu: &str, p: &str, k: &str, v: Option<&[u8]>) {
        let mut after = s.plugin_record(cu, p).unwrap();
        after.set(k, v.map(<[u8]>::to_vec));
        c.plugin_state(cu, p, after, [(k, v)]);
    }

    #[test]
    fn a_store_of_the_old_format_is_converted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Format 1: one key per state key, a size key, no `F`.
            let db = open_db(dir.path(), 1 << 20, false).unwrap();
            let old = |c: &str, p: &str, k: &str| plugin_key(c, b's', p, k);
            db.insert(old("u1", "p", "a"), &b"1"[..]).unwrap();
            db.insert(old("u1", "p", "b"), &b"22"[..]).unwrap();
            db.insert(old("u1", "p", "\0bytes"), &5i64.to_le_bytes()[..])
                .unwrap();
            db.insert(old("u1", "q", "a"), &b"q"[..]).unwrap();
            db.insert(old("u2", "p", ""), &b"empty key"[..]).unwrap();
            db.insert(customer_key("u1", b't'), &b"{}"[..]).unwrap();
            // More records than one conversion batch holds.
            for i in 0..12_000 {
                db.insert(old(&format!("v{i:05}"), "p", "k"), &b"x"[..])
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.plugin_state("u1", "p", "a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(
            s.plugin_state("u1", "p", "b").unwrap(),
            Some(b"22".to_vec())
        );
        assert_eq!(s.plugin_record("u1", "p").unwrap().bytes(), 1 + 1 + 1 + 2);
        assert_eq!(s.plugin_record("u1", "p").unwrap().len(), 2);
        assert_eq!(s.plugin_state("u1", "q", "a").unwrap(), Some(b"q".to_vec()));
        assert_eq!(
            s.plugin_state("u2", "p", "").unwrap(),
            Some(b"empty key".to_vec())
        );
        assert_eq!(
            s.plugin_state("v11999", "p", "k").unwrap(),
            Some(b"x".to_vec())
        );
        assert_eq!(
            s.plugin_state("v00000", "p", "k").unwrap(),
            Some(b"x".to_vec())
        );
        let left =
            s.db.scan_prefix(b"c")
                .keys()
                .filter(|k| {
                    k.as_ref()
                        .is_ok_and(|k| k.windows(2).any(|w| w == [0, b's']))
                })
                .count();
        assert_eq!(left, 0, "old state keys left behind");
        assert_eq!(s.traits("u1").unwrap(), Map::new());
        drop(s);
        // A store of a newer format is refused, naming it.
        {
            let db = open_db(dir.path(), 1 << 20, false).unwrap();
            db.insert(FORMAT_KEY, &[FORMAT + 1]).unwrap();
            db.flush().unwrap();
        }
        let e = Store::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("format 3") && e.contains("newer"), "{e}");
    }

    #[test]
    fn two_calls_of_one_plugin_for_one_event_both_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut c = Changes::new();
        set_state(&s, &mut c, "u", "p", "a", Some(b"1"));
        set_state(&s, &mut c, "u", "p", "b", Some(b"2"));
        set_state(&s, &mut c, "u", "p", "a", None);
        s.commit(c);
        assert_eq!(s.plugin_state("u", "p", "a").unwrap(), None);
        assert_eq!(s.plugin_state("u", "p", "b").unwrap(), Some(b"2".to_vec()));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u8, u8, u8, Vec<u8>),
        Del(u8, u8, u8),
        Timer(u8, u8, Option<i16>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0..3u8,
                0..3u8,
                0..4u8,
                prop::collection::vec(any::<u8>(), 0..8)
            )
                .prop_map(|(c, p, k, v)| Op::Set(c, p, k, v)),
            (0..3u8, 0..3u8, 0..4u8).prop_map(|(c, p, k)| Op::Del(c, p, k)),
            (0..3u8, 0..3u8, prop::option::of(any::<i16>()))
                .prop_map(|(c, k, d)| Op::Timer(c, k, d)),
        ]
    }

    proptest! {
        // The store against an in-memory model: plugin state and timers,
        // committed in random batches, read back the same, and the timer
        // queue drains in (due, customer) order with nothing left over.
        #[test]
        fn store_matches_model(
            batches in prop::collection::vec(prop::collection::vec(op(), 1..6), 1..12),
            persist_every in 1..4usize,
            // From a timer queue that holds one timer to one that holds
            // all: the queue reads back what its budget dropped.
            budget in prop_oneof![0..4000usize, Just(Budget::default().total)],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let budget = Budget { total: budget };
            let mut s = Store::open_with(dir.path(), 1, budget).unwrap();
            let mut state: HashMap<(String, String, String), Vec<u8>> = HashMap::new();
            let mut touched = std::collections::HashSet::new();
            let mut timers: HashMap<(String, String), i64> = HashMap::new();
            for (i, batch) in batches.into_iter().enumerate() {
                if i % persist_every == 0 {
                    s.persist().unwrap();
                }
                let mut c = Changes::new();
                let mut pending: HashMap<(String, String), Option<i64>> = HashMap::new();
                for op in batch {
                    match op {
                        Op::Set(cu, p, k, v) => {
                            let key = (format!("c{cu}"), format!("p{p}"), format!("k{k}"));
                            set_state(&s, &mut c, &key.0, &key.1, &key.2, Some(&v));
                            touched.insert(key.clone());
                            state.insert(key, v);
                        }
                        Op::Del(cu, p, k) => {
                            let key = (format!("c{cu}"), format!("p{p}"), format!("k{k}"));
                            set_state(&s, &mut c, &key.0, &key.1, &key.2, None);
                            state.remove(&key);
                            touched.insert(key);
                        }
                        Op::Timer(cu, k, due) => {
                            // One timer change per key per batch, as the
                            // runtime collapses a call's timer ops.
                            let key = (format!("c{cu}"), format!("k{k}"));
                            if pending.contains_key(&key) { continue; }
                            pending.insert(key.clone(), due.map(i64::from));
                        }
                    }
                }
                for ((cu, k), due) in pending {
                    let old = s.timer(&cu, "t", &k).unwrap();
                    let new = due.map(|d| Timer { due: d, trigger: "m".into() });
                    c.timer(&cu, "t", &k, old.as_ref(), new.as_ref());
                    match due { Some(d) => { timers.insert((cu, k), d); } None => { timers.remove(&(cu, k)); } }
                }
                s.commit(c);
            }
            for key in &touched {
                prop_assert_eq!(s.plugin_state(&key.0, &key.1, &key.2).unwrap(), state.get(key).cloned());
            }
            // Everything persisted reads back the same after a reopen.
            s.flush().unwrap();
            drop(s);
            s = Store::open_with(dir.path(), 1, budget).unwrap();
            for ((cu, p, k), v) in &state {
                prop_assert_eq!(s.plugin_state(cu, p, k).unwrap(), Some(v.clone()));
            }
            let mut expect: Vec<(i64, String, String)> = timers.iter().map(|((c, k), d)| (*d, c.clone(), k.clone())).collect();
            expect.sort();
            let mut got = Vec::new();
            while let Some(d) = s.first_timer(0).unwrap() {
                got.push((d.due, d.customer.clone(), d.key.clone()));
                let old = s.timer(&d.customer, &d.plugin, &d.key).unwrap();
                prop_assert_eq!(old.as_ref().map(|t| t.due), Some(d.due));
                let mut c = Changes::new();
                c.timer(&d.customer, &d.plugin, &d.key, old.as_ref(), None);
                s.commit(c);
            }
            prop_assert_eq!(got, expect);
        }
    }
}
