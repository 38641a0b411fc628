//! What `nudge serve` does differently as a cluster node: the persister
//! commits through the slots' log before it writes, and the deliverer
//! sends only for slots the node holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::cluster::node::Node;
use crate::deliver;
use crate::store::Store;

use super::PERSIST_EVERY;

/// Whether the node holds a customer's slot (the deliverer asks).
pub(super) fn owns(node: &Arc<Node>, store: &Store) -> deliver::Owns {
    let tenures = node.tenures();
    let slots = store.cluster_slots().unwrap_or(1);
    Arc::new(move |customer: &str| {
        let slot = (crate::store::vshard_of(customer) % usize::from(slots.max(1))) as u16;
        tenures.current(slot) != 0
    })
}

/// When the node takes a slot, the slot's pending deliveries (intents
/// committed by an earlier owner without a recorded result) go to the
/// deliverer: a new owner sends only what has no result.
pub(super) fn hand_over_deliveries(node: &Arc<Node>, store: &Store, tx: &Sender<deliver::Input>) {
    let (store, tx) = (store.clone(), tx.clone());
    let slots = store.cluster_slots().unwrap_or(1);
    let tx = std::sync::Mutex::new(tx);
    node.on_taken(Arc::new(move |slot: u16| {
        let entries = match store.outbox() {
            Ok(all) => all
                .into_iter()
                .filter(|v| crate::store::slot_of_key(b"O", Some(v), slots) == Some(slot))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(slot, "outbox not read: {e}");
                return;
            }
        };
        if !entries.is_empty() {
            tracing::info!(
                slot,
                deliveries = entries.len(),
                "pending deliveries of the slot taken over"
            );
            let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(deliver::Input::New(entries));
        }
    }));
}

/// One persist through the slots' commit log: what the log stored is
/// written to sled.
fn persist(
    store: &Store,
    node: &Arc<Node>,
    rt: &tokio::runtime::Handle,
) -> crate::store::Result<crate::store::Persisted> {
    store.persist_gated(|by_slot| Ok(rt.block_on(node.commit(by_slot))))
}

/// The cluster's persister: every [`PERSIST_EVERY`], what the workers and
/// the deliverer changed goes to the slots' commit log, then what the log
/// stored to sled and disk; only then are new deliveries handed on.
pub(super) fn persist_loop(
    store: Store,
    stop: Arc<AtomicBool>,
    deliver: Sender<deliver::Input>,
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
    dedupe_window: std::time::Duration,
    retention: Retention,
) {
    let mut next_sweep = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if std::time::Instant::now() >= next_sweep {
            next_sweep = std::time::Instant::now() + super::DEDUPE_SWEEP_EVERY;
            forget_seen(&store, &node, dedupe_window, &rt);
            retention.sweep(&store, &node, &rt);
        }
        let stopping = stop.load(Ordering::Acquire);
        let persisted = persist(&store, &node, &rt);
        match persisted.and_then(|p| store.sync().map(|()| p)) {
            Ok(p) => {
                if !p.outbox.is_empty() {
                    let _ = deliver.send(deliver::Input::New(p.outbox));
                }
            }
            Err(e) => tracing::error!("persist failed (retrying): {e}"),
        }
        // Between commits: a slot never has two fenced writes in flight.
        rt.block_on(node.commit_snapshots());
        if stopping {
            return;
        }
        std::thread::sleep(PERSIST_EVERY);
    }
}

/// Forgets the message ids of the held slots decided longer ago than the
/// de-duplication window, through the commit log like any change.
fn forget_seen(
    store: &Store,
    node: &Arc<Node>,
    window: std::time::Duration,
    rt: &tokio::runtime::Handle,
) {
    let tenures = node.tenures();
    let slots = usize::from(tenures.slots().max(1));
    let before = crate::event::now_ms() - window.as_millis() as i64;
    let held = |vshard: usize| tenures.current((vshard % slots) as u16) != 0;
    let mut total = 0;
    loop {
        match store.seen_before(before, held, 10_000) {
            Ok(keys) if keys.is_empty() => break,
            Ok(keys) => {
                total += keys.len();
                let mut changes = crate::store::Changes::new();
                for k in keys {
                    changes.forget_seen(k);
                }
                store.commit(changes);
                // Written before the next page is read, so it is not
                // listed again.
                if let Err(e) = persist(store, node, rt) {
                    tracing::warn!("message ids not forgotten: {e}");
                    break;
                }
            }
            Err(e) => {
                tracing::warn!("message id sweep failed: {e}");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            forgotten = total,
            "message ids past the de-duplication window"
        );
    }
}

/// What a cluster node needs to forget old decision rows.
pub(super) struct Retention {
    pub keep: std::time::Duration,
    pub current: Arc<crate::generation::Current>,
    pub clock: crate::config::Clock,
}

impl Retention {
    /// Deletes the decision rows of the held slots past retention, through
    /// the commit log like any change, a chunk at a time.
    fn sweep(&self, store: &Store, node: &Arc<Node>, rt: &tokio::runtime::Handle) {
        let now = match self.clock {
            crate::config::Clock::Wall => crate::event::now_ms(),
            // Event time: a backtest keeps its past; now is the latest
            // decision this node holds.
            crate::config::Clock::Event => match store.last_decision() {
                Ok(Some(t)) => t,
                _ => return,
            },
        };
        let before = crate::ledger::retention_cutoff(&self.current.load().rules, now, self.keep);
        let tenures = node.tenures();
        let slots = usize::from(tenures.slots().max(1));
        let held = |customer: &str| {
            tenures.current((crate::store::vshard_of(customer) % slots) as u16) != 0
        };
        let mut total = 0;
        loop {
            match store.forget_decisions_of(before, 10_000, held) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    if let Err(e) = persist(store, node, rt) {
                        tracing::warn!("decision retention sweep not committed: {e}");
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("decision retention sweep failed: {e}");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(forgotten = total, before = %crate::event::format_ts(before), "decision rows past retention");
        }
    }
}
