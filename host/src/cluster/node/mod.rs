//! One `nudge serve` node of a cluster: its membership, the assigner role,
//! taking and giving up slots, and committing through the slots' log.
//!
//! # Layout
//!
//! - [`Node::open`]: connects, opens the streams and buckets, joins.
//! - [`Node::run`]: the node's tasks until shutdown: renewing the
//!   membership, the assigner (when it holds the lease), and the slot
//!   manager, which follows the slot map: claims a slot given to this node
//!   (its epoch), catches the store up from the slot's commit log, and
//!   starts a feeder ([`super::feed`]); and gives up a slot the map moved
//!   away or whose commit was fenced.
//! - [`Node::commit`]: the persister's gate: each held slot's changes as
//!   one fenced commit, all slots at once.
//! - [`snapshotting`]: snapshots of the held slots, their pointers and
//!   compaction; restoring a snapshot when taking a slot.
//! - [`Node::stop`]: stops reading events, then (after the last persist)
//!   [`Node::leave`] lets the others take the slots at once.

mod snapshotting;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use super::assign::{plan, SlotMap};
use super::feed::Feed;
use super::ingest::Publisher;
use super::log::{Epoch, LogError, SlotLog};
use super::members::{Member, MemberError, Members, Membership};
use super::slots::Layout;
use super::snapshot::{Pointer, Snapshots};
use super::tenure::Tenures;
use crate::config::ClusterConfig;
use crate::inbox::Work;
use crate::store::{decode_ops, encode_ops, Admission, Op, Store};

/// How often the slot manager looks at the map.
const MANAGE_EVERY: Duration = Duration::from_millis(100);

/// How often the assigner plans.
const ASSIGN_EVERY: Duration = Duration::from_millis(250);

/// Bytes of changes per record of a commit (NATS's default largest
/// message is 1 MiB).
const RECORD_BYTES: usize = 256 << 10;

/// How long start-up waits for NATS JetStream to answer.
const OPEN_PATIENCE: Duration = Duration::from_secs(60);

/// Runs `attempt` until it succeeds, `retry` refuses its error, or
/// [`OPEN_PATIENCE`] has passed since `started`: a NATS cluster that is
/// starting (or electing) times requests out for a while. Each failure is
/// logged as `what`.
async fn patiently<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    started: Instant,
    retry: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E> {
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if retry(&e) && started.elapsed() < OPEN_PATIENCE => {
                tracing::warn!("{what} (trying again): {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a slot change waits for the workers to let go of the slot.
const SETTLE_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Connect(#[from] super::ConnectError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Ingest(#[from] super::ingest::IngestError),
    #[error(transparent)]
    Members(#[from] MemberError),
    #[error("slot map bucket: {0}")]
    Map(String),
}

/// A cluster node.
pub struct Node {
    me: Member,
    layout: Layout,
    js: jetstream::Context,
    log: SlotLog,
    publisher: Publisher,
    members: Members,
    lease: Members,
    maps: kv::Store,
    store: Store,
    tenures: Arc<Tenures>,
    /// Slots this node holds, with the epoch it claimed.
    held: Mutex<HashMap<u16, Epoch>>,
    /// Slots given up whose pending changes are still to be discarded.
    lost: Mutex<Vec<u16>>,
    workers: Mutex<Option<Vec<Sender<Work>>>>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
    membership: tokio::sync::Mutex<Option<Membership>>,
    assigner: tokio::sync::Mutex<Option<Membership>>,
    commits: AtomicU64,
    stop_feeding: Arc<AtomicBool>,
    stopping: AtomicBool,
    feeders: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Called with each slot taken, once the store caught up (the server
    /// hands the slot's pending deliveries to its deliverer).
    on_taken: Mutex<Option<TakenHook>>,
    client: async_nats::Client,
    /// Per slot: events stored and not yet read by this node's feeder.
    lag: Arc<[AtomicU64]>,
    /// Slots whose commits are failing: attempts so far.
    failing: Mutex<HashMap<u16, u64>>,
    /// The map and the members' API addresses as last read (forwarding).
    routes: Mutex<Routes>,
    snapshots: Snapshots,
    /// Held slots' latest snapshots.
    snapped: Mutex<HashMap<u16, snapshotting::Snapped>>,
    /// Snapshots stored whose pointers are still to be committed.
    pointers: Mutex<Vec<Pointer>>,
    /// Snapshot restores allowed at once.
    restoring: tokio::sync::Semaphore,
    cfg: ClusterConfig,
}

type TakenHook = Arc<dyn Fn(u16) + Send + Sync>;

/// Where requests about a slot's customers go.
#[derive(Default)]
struct Routes {
    map: SlotMap,
    /// Member name → API address.
    apis: HashMap<String, String>,
    /// When the members were last read.
    read: Option<Instant>,
}

/// How often the members' addresses are read again.
const ROUTES_EVERY: Duration = Duration::from_secs(1);

/// The slot map's key in its bucket.
pub(crate) const MAP_KEY: &str = "map";

/// The assigner's lease: its key in the lease bucket.
pub(crate) const ASSIGNER_KEY: &str = "assigner";

impl Node {
    /// Connects and joins the cluster as `cfg.node`, answering its API at
    /// `api`. `workers`: the worker threads' queues, slot `s` going to
    /// worker `s % workers`.
    pub async fn open(
        cfg: &ClusterConfig,
        api: String,
        store: Store,
        workers: Vec<Sender<Work>>,
        tenures: Arc<Tenures>,
        inflight: Arc<AtomicUsize>,
        max_inflight: usize,
    ) -> Result<Arc<Node>, NodeError> {
        let (client, js) = super::connect(cfg, |k| std::env::var(k).ok()).await?;
        let layout = Layout::new(&cfg.prefix, cfg.slots);
        // A NATS cluster that is starting (or electing) times requests
        // out for a while: the streams and buckets are tried again until
        // it answers, for up to a minute.
        let started = Instant::now();
        let (log, publisher, members, lease, maps, snapshots) = patiently(
            "NATS JetStream not ready",
            started,
            |_| true,
            || Node::streams(&client, &js, &layout, cfg),
        )
        .await?;
        store.join_cluster(cfg.slots);
        let me = Member {
            node: cfg.node.clone(),
            api,
        };
        let membership = patiently(
            "joining the cluster",
            started,
            |e| matches!(e, MemberError::Nats(_)),
            || members.join(me.clone()),
        )
        .await?;
        tracing::info!(node = %me.node, slots = cfg.slots, "joined the cluster");
        Ok(Arc::new(Node {
            me,
            layout,
            js,
            log,
            publisher,
            members,
            lease,
            maps,
            store,
            tenures,
            held: Mutex::new(HashMap::new()),
            lost: Mutex::new(Vec::new()),
            workers: Mutex::new(Some(workers)),
            inflight,
            max_inflight,
            membership: tokio::sync::Mutex::new(Some(membership)),
            assigner: tokio::sync::Mutex::new(None),
            commits: AtomicU64::new(0),
            stop_feeding: Arc::new(AtomicBool::new(false)),
            stopping: AtomicBool::new(false),
            feeders: Mutex::new(Vec::new()),
            on_taken: Mutex::new(None),
            client,
            lag: (0..cfg.slots).map(|_| AtomicU64::new(0)).collect(),
            failing: Mutex::new(HashMap::new()),
            routes: Mutex::new(Routes::default()),
            snapshots,
            snapped: Mutex::new(HashMap::new()),
            pointers: Mutex::new(Vec::new()),
            restoring: tokio::sync::Semaphore::new(2),
            cfg: cfg.clone(),
        }))
    }

    /// Opens (creating if need be) the streams and buckets.
    async fn streams(
        client: &async_nats::Client,
        js: &jetstream::Context,
        layout: &Layout,
        cfg: &ClusterConfig,
    ) -> Result<(SlotLog, Publisher, Members, Members, kv::Store, Snapshots), NodeError> {
        let log = SlotLog::open(client.clone(), js.clone(), layout.clone(), cfg.replicas).await?;
        let publisher = Publisher::open(js.clone(), layout.clone(), cfg.replicas).await?;
        let members = Members::open(js.clone(), &cfg.prefix, cfg.replicas, cfg.lease.0).await?;
        let lease = Members::open_bucket(
            js.clone(),
            &format!("{}_lease", cfg.prefix),
            cfg.replicas,
            cfg.lease.0,
        )
        .await?;
        let maps = super::ensure_kv(
            js,
            kv::Config {
                bucket: format!("{}_slots", cfg.prefix),
                history: 1,
                num_replicas: cfg.replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(NodeError::Map)?;
        let snapshots = Snapshots::open(js.clone(), layout.clone(), cfg.replicas).await?;
        Ok((log, publisher, members, lease, maps, snapshots))
    }

    pub fn tenures(&self) -> Arc<Tenures> {
        self.tenures.clone()
    }

    /// Shares `controls` with the other nodes (pause, resume and
    /// quarantine apply cluster-wide).
    pub async fn share_controls(
        &self,
        controls: Arc<crate::controls::Controls>,
    ) -> Result<(), NodeError> {
        let kv = patiently(
            "controls bucket not ready",
            Instant::now(),
            |_| true,
            || super::controls::open(&self.js, &self.cfg.prefix, self.cfg.replicas),
        )
        .await
        .map_err(NodeError::Map)?;
        super::controls::share(kv, controls);
        Ok(())
    }

    /// Shares `reloader`'s generations with the other nodes: numbers
    /// come from the cluster, and a publish on any node runs on all.
    pub async fn share_generations(
        &self,
        reloader: Arc<crate::reload::Reloader>,
    ) -> Result<(), NodeError> {
        let shared = patiently(
            "generations bucket not ready",
            Instant::now(),
            |_| true,
            || {
                super::generations::SharedGenerations::open(
                    &self.js,
                    &self.cfg.prefix,
                    self.cfg.replicas,
                    &self.me.node,
                )
            },
        )
        .await
        .map_err(NodeError::Map)?;
        super::generations::share(reloader, Arc::new(shared));
        Ok(())
    }

    /// The cluster's status as JetStream holds it, with the lag of the
    /// slots this node holds.
    pub async fn status(&self) -> Result<super::status::Status, String> {
        let mut st = super::status::read(&self.js, self.client.clone(), &self.cfg).await?;
        let lags = self.lags();
        for s in st.slots.iter_mut() {
            if let Some(l) = lags.get(&s.slot) {
                s.lag = Some(*l);
            }
        }
        Ok(st)
    }

    /// Slot → events stored and not yet read, for the slots held.
    pub fn lags(&self) -> BTreeMap<u16, u64> {
        self.held()
            .into_iter()
            .map(|s| (s, self.lag[usize::from(s)].load(Ordering::Relaxed)))
            .collect()
    }

    /// Sets what is called with each slot taken.
    pub fn on_taken(&self, hook: TakenHook) {
        *self.on_taken.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn name(&self) -> &str {
        &self.me.node
    }

    /// The slots held now.
    pub fn held(&self) -> Vec<u16> {
        let mut h: Vec<u16> = self.lock_held().keys().copied().collect();
        h.sort();
        h
    }

    fn lock_routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn routes_due(&self) -> bool {
        let mut r = self.lock_routes();
        let due = r.read.is_none_or(|t| t.elapsed() >= ROUTES_EVERY);
        if due {
            r.read = Some(Instant::now());
        }
        due
    }

    /// Whether this node decides `customer` now.
    pub fn holds_customer(&self, customer: &str) -> bool {
        self.tenures.current(self.layout.place(customer).0) != 0
    }

    /// The API address of the node the map gives `customer`'s slot to,
    /// unless that is this node or unknown.
    pub fn owner_api(&self, customer: &str) -> Option<String> {
        let slot = usize::from(self.layout.place(customer).0);
        let r = self.lock_routes();
        let owner = r.map.owners.get(slot)?.as_ref()?;
        if owner == &self.me.node {
            return None;
        }
        r.apis.get(owner).cloned()
    }

    fn lock_failing(&self) -> std::sync::MutexGuard<'_, HashMap<u16, u64>> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Epoch>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the node's tasks until [`Node::stop`].
    pub async fn run(self: Arc<Self>) {
        let renew = tokio::spawn(self.clone().renew_loop());
        let assign = tokio::spawn(self.clone().assign_loop());
        let snapshot = tokio::spawn(self.clone().snapshot_loop());
        self.clone().manage_loop().await;
        renew.abort();
        assign.abort();
        snapshot.abort();
    }

    async fn renew_loop(self: Arc<Self>) {
        let every = self.members.ttl() / 3;
        loop {
            tokio::time::sleep(every).await;
            let mut guard = self.membership.lock().await;
            let Some(m) = guard.as_mut() else {
                return;
            };
            match self.members.renew(m).await {
                Ok(()) => {}
                Err(MemberError::Expired { .. }) => {
                    tracing::warn!(node = %self.me.node, "membership expired (this node did not renew in time, e.g. it was frozen): its slots go to others; joining again");
                    match self.members.join(self.me.clone()).await {
                        Ok(n) => *m = n,
                        Err(e) => tracing::warn!("joining again failed (trying again): {e}"),
                    }
                }
                Err(e) => tracing::warn!("membership not renewed (trying again): {e}"),
            }
        }
    }

    async fn read_map(&self) -> Result<(SlotMap, Option<u64>), String> {
        match self.maps.entry(MAP_KEY).await.map_err(|e| e.to_string())? {
            Some(e) if e.operation == kv::Operation::Put => {
                let map = serde_json::from_slice(&e.value).map_err(|e| e.to_string())?;
                Ok((map, Some(e.revision)))
            }
            Some(e) => Ok((SlotMap::default(), Some(e.revision))),
            None => Ok((SlotMap::default(), None)),
        }
    }

    async fn assign_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(ASSIGN_EVERY).await;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = self.assign_once().await {
                tracing::debug!("assigner: {e}");
            }
        }
    }

    /// One round of the assigner: take or renew the lease; if held, plan
    /// and write the map.
    async fn assign_once(&self) -> Result<(), String> {
        {
            let mut lease = self.assigner.lock().await;
            match lease.as_mut() {
                None => match self.lease.try_claim(ASSIGNER_KEY, self.me.clone()).await {
                    Ok(Some(m)) => {
                        tracing::info!(node = %self.me.node, "this node is the slot assigner");
                        *lease = Some(m);
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                },
                Some(m) => {
                    // Renewed every round: a third of the lease is far
                    // longer than a round.
                    if let Err(e) = self.lease.renew(m).await {
                        tracing::info!("no longer the slot assigner: {e}");
                        *lease = None;
                        return Ok(());
                    }
                }
            }
        }
        let live: Vec<String> = self
            .members
            .list()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|m| m.node)
            .collect();
        let (map, revision) = self.read_map().await?;
        let slots = self.layout.slots();
        let mut next = plan(&map, slots, &live, false);
        if next == map {
            let loads: Vec<usize> = live.iter().map(|m| map.load(m)).collect();
            let uneven = loads
                .iter()
                .max()
                .zip(loads.iter().min())
                .is_some_and(|(a, b)| a > &(b + 1));
            if !uneven || !self.claims_match(&map).await? {
                return Ok(());
            }
            next = plan(&map, slots, &live, true);
            if next == map {
                return Ok(());
            }
        }
        let body = Bytes::from(serde_json::to_vec(&next).map_err(|e| e.to_string())?);
        let written = match revision {
            Some(r) => self
                .maps
                .update(MAP_KEY, body, r)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => self
                .maps
                .create(MAP_KEY, body)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => {
                let moved = next
                    .owners
                    .iter()
                    .zip(map.owners.iter().chain(std::iter::repeat(&None)))
                    .filter(|(a, b)| a != b)
                    .count();
                tracing::info!(moved, members = live.len(), "slot map written");
                Ok(())
            }
            // Another assigner wrote first: plan again from its map.
            Err(e) => Err(format!("slot map not written: {e}")),
        }
    }

    /// Whether every slot's epoch is held by the owner the map names.
    async fn claims_match(&self, map: &SlotMap) -> Result<bool, String> {
        for (s, owner) in map.owners.iter().enumerate() {
            let epoch = self.log.epoch(s as u16).await.map_err(|e| e.to_string())?;
            if epoch.map(|e| e.node) != *owner {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn manage_loop(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            self.discard_lost().await;
            if self.routes_due() {
                if let Ok(members) = self.members.list().await {
                    self.lock_routes().apis =
                        members.into_iter().map(|m| (m.node, m.api)).collect();
                }
            }
            match self.read_map().await {
                Ok((map, _)) => {
                    self.lock_routes().map = map.clone();
                    let mine: HashSet<u16> = map
                        .owners
                        .iter()
                        .enumerate()
                        .filter(|(_, o)| o.as_deref() == Some(self.me.node.as_str()))
                        .map(|(s, _)| s as u16)
                        .collect();
                    for s in self.held() {
                        if !mine.contains(&s) {
                            tracing::info!(slot = s, "slot moved to another node: giving it up");
                            self.give_up(s);
                        }
                    }
                    self.discard_lost().await;
                    let held: HashSet<u16> = self.held().into_iter().collect();
                    let mut wanted: Vec<u16> = mine.difference(&held).copied().collect();
                    wanted.sort();
                    if !wanted.is_empty() && !self.stopping.load(Ordering::Acquire) {
                        self.take(wanted).await;
                    }
                }
                Err(e) => tracing::debug!("slot map not read: {e}"),
            }
            tokio::time::sleep(MANAGE_EVERY).await;
        }
    }

    /// Stops deciding `slot` at once; its pending changes are discarded
    /// by the manager once no worker decides for it.
    fn give_up(&self, slot: u16) {
        if self.lock_held().remove(&slot).is_some() {
            self.tenures.end(slot);
            self.lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(slot);
        }
    }

    async fn discard_lost(&self) {
        let lost = std::mem::take(&mut *self.lost.lock().unwrap_or_else(|e| e.into_inner()));
        if lost.is_empty() {
            return;
        }
        let version = self.tenures.bump();
        if !self.tenures.settled(version, SETTLE_PATIENCE).await {
            tracing::warn!("workers slow to let go of slots given up");
        }
        for s in lost {
            if self.tenures.current(s) == 0 {
                self.store.discard_slot(s);
            }
        }
    }

    /// Claims `slots`, all at once; catches the store up on each one won
    /// from its commit log, and starts feeding its events.
    async fn take(&self, slots: Vec<u16>) {
        let started = Instant::now();
        let claims = futures_util::future::join_all(slots.iter().map(|s| self.claim(*s))).await;
        let mut won = Vec::new();
        for (slot, c) in slots.iter().zip(claims) {
            match c {
                Ok(Some(c)) => won.push((*slot, c)),
                Ok(None) => {}
                Err(e) => tracing::warn!(slot, "slot not claimed (trying again): {e}"),
            }
        }
        if won.is_empty() {
            return;
        }
        // Nobody decides these slots here now; what was pending of an
        // earlier tenure goes before the store catches up.
        let mut version = 0;
        for (slot, _) in &won {
            version = self.tenures.end(*slot);
        }
        self.tenures.settled(version, SETTLE_PATIENCE).await;
        for (slot, _) in &won {
            self.store.discard_slot(*slot);
        }
        let slots: Vec<u16> = won.iter().map(|(s, _)| *s).collect();
        let mut restore = match self.snapshots_to_restore(&slots).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    ?slots,
                    "slots claimed but their snapshots not read (trying again): {e}"
                );
                return;
            }
        };
        let results =
            futures_util::future::join_all(won.into_iter().map(|(slot, (replaced, epoch))| {
                let snapshot = restore.remove(&slot);
                self.start(slot, epoch, replaced, snapshot, started)
            }))
            .await;
        for r in results {
            if let Err(e) = r {
                tracing::warn!(
                    "slot claimed but not started (its epoch stays ours; trying again): {e}"
                );
            }
        }
    }

    /// Claims `slot` from its current epoch: the epoch replaced and ours,
    /// or `None` when another node claimed first.
    async fn claim(&self, slot: u16) -> Result<Option<(Option<Epoch>, Epoch)>, NodeError> {
        let current = self.log.epoch(slot).await?;
        match self.log.claim(slot, &self.me.node, current.as_ref()).await {
            Ok(e) => Ok(Some((current, e))),
            // Someone claimed since we read: the next round reads again.
            Err(LogError::Lost { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Catches the store up on a claimed slot and starts feeding it.
    async fn start(
        &self,
        slot: u16,
        epoch: Epoch,
        current: Option<Epoch>,
        snapshot: Option<Pointer>,
        started: Instant,
    ) -> Result<(), NodeError> {
        let restored = match &snapshot {
            Some(p) => Some(self.restore(p).await?),
            None => None,
        };
        let from = self
            .store
            .applied(slot)
            .map_err(|e| LogError::Nats(e.to_string()))?;
        let mut after = from;
        let mut records = 0;
        loop {
            let batch = self.log.commits(slot, after, 1000).await?;
            if batch.is_empty() {
                break;
            }
            for r in batch {
                let ops: Vec<Op> = decode_ops(&r.payload).ok_or_else(|| {
                    LogError::Nats(format!("slot {slot}: commit record {} unreadable", r.seq))
                })?;
                self.store
                    .apply_commit(slot, r.seq, &ops)
                    .map_err(|e| LogError::Nats(e.to_string()))?;
                after = r.seq;
                records += 1;
            }
        }
        let vshards: Vec<usize> = self.layout.vshards(slot).collect();
        let (watermarks, above) = self
            .store
            .marks(&vshards)
            .map_err(|e| LogError::Nats(e.to_string()))?;
        let Some(worker) = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|w| w[self.tenures.worker_of(slot)].clone())
        else {
            return Ok(());
        };
        let tenure = self.tenures.begin(slot);
        self.lock_held().insert(slot, epoch.clone());
        let feed = Feed {
            js: self.js.clone(),
            layout: self.layout.clone(),
            slot,
            tenure,
            tenures: self.tenures.clone(),
            watermarks,
            above: above.into_iter().collect(),
            worker,
            inflight: self.inflight.clone(),
            max_inflight: self.max_inflight,
            stop: self.stop_feeding.clone(),
            lag: self.lag.clone(),
        };
        let handle = tokio::spawn(feed.run());
        self.feeders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
        let hook = self
            .on_taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(slot);
        }
        tracing::info!(
            slot,
            epoch = epoch.seq,
            replaced = current.map(|e| e.node).unwrap_or_default(),
            snapshot = snapshot.map(|p| p.position),
            restored,
            records,
            ms = started.elapsed().as_millis() as u64,
            "slot taken"
        );
        Ok(())
    }

    /// The persister's gate: commits each held slot's changes, all slots
    /// at once, each fenced by the slot's epoch.
    pub async fn commit(&self, by_slot: &BTreeMap<u16, Vec<Op>>) -> Admission {
        let held = self.lock_held().clone();
        let attempts = by_slot.iter().filter_map(|(slot, ops)| {
            let epoch = held.get(slot)?.clone();
            let n = self.commits.fetch_add(1, Ordering::Relaxed);
            let id = format!("{}.{}.{}.{n}", self.me.node, slot, epoch.seq);
            let records: Vec<Bytes> = encode_ops(ops, RECORD_BYTES)
                .into_iter()
                .map(Bytes::from)
                .collect();
            Some(async move {
                let r = self.log.commit(&epoch, &id, &records).await;
                (*slot, r)
            })
        });
        let results = futures_util::future::join_all(attempts).await;
        let mut out = Admission::default();
        for (slot, r) in results {
            match r {
                Ok(c) => {
                    out.admitted.insert(slot, c.last_seq);
                    if let Some(n) = self.lock_failing().remove(&slot) {
                        tracing::info!(slot, attempts = n, "commits stored again");
                    }
                }
                Err(LogError::Fenced { epoch, .. }) => {
                    tracing::warn!(slot, epoch, "fenced: another node claimed the slot; its uncommitted decisions are dropped (the new owner makes them)");
                    self.give_up(slot);
                }
                Err(e) => {
                    // Once per streak (and every 100th), not every 50 ms
                    // while JetStream elects a leader.
                    let n = {
                        let mut failing = self.lock_failing();
                        let n = failing.entry(slot).or_default();
                        *n += 1;
                        *n
                    };
                    if n == 1 || n % 100 == 0 {
                        tracing::warn!(slot, attempts = n, "commit not stored (trying again): {e}");
                    }
                    out.retry.insert(slot);
                }
            }
        }
        out
    }

    /// Ingest on this node: publishes `events` to the events stream and
    /// answers once JetStream acknowledged every one (any node takes any
    /// customer's events; the slot's owner decides them).
    pub async fn submit(
        &self,
        events: Vec<crate::ingest::Incoming>,
    ) -> Result<crate::inbox::Ack, crate::ingest::IngestError> {
        use crate::ingest::IngestError;
        if self.stopping.load(Ordering::Acquire) {
            return Err(IngestError::Unavailable("shutting down".into()));
        }
        let batch: Vec<super::ingest::Event<'_>> = events
            .iter()
            .map(|i| super::ingest::Event {
                customer: &i.event.customer,
                message_id: &i.event.message_id,
                body: Bytes::from(i.raw.clone()),
            })
            .collect();
        match self.publisher.publish(&batch).await {
            Ok(stored) => {
                let duplicates = stored.iter().filter(|s| s.duplicate).count();
                Ok(crate::inbox::Ack {
                    accepted: stored.len() - duplicates,
                    duplicates,
                })
            }
            Err(e) => Err(IngestError::Busy {
                message: e.to_string(),
                retry_after: 1,
            }),
        }
    }

    /// Stops reading events (shutdown); held slots stay held until
    /// [`Node::leave`], so what was read is decided and committed.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop_feeding.store(true, Ordering::Release);
        let feeders = std::mem::take(&mut *self.feeders.lock().unwrap_or_else(|e| e.into_inner()));
        for f in feeders {
            let _ = f.await;
        }
        // The workers' queues close once the feeders' copies are gone.
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Leaves the cluster (after the last persist): the others take this
    /// node's slots without waiting for its lease to run out.
    pub async fn leave(&self) {
        for s in self.held() {
            self.give_up(s);
        }
        if let Some(m) = self.assigner.lock().await.take() {
            let _ = self.lease.leave(&m).await;
        }
        if let Some(m) = self.membership.lock().await.take() {
            if let Err(e) = self.members.leave(&m).await {
                tracing::warn!("leaving the cluster: {e} (the others wait out the lease)");
            }
        }
        tracing::info!(node = %self.me.node, "left the cluster");
    }
}
