//! A node's part in slot snapshots ([`crate::cluster::snapshot`]): taking
//! the held slots' snapshots, committing their pointers (fenced, from the
//! persister, so that a slot never has two fenced writes in flight), and
//! compacting the log below them; and, when it takes a slot, restoring the
//! latest snapshot if it is ahead of its own copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Node;
use crate::cluster::log::LogError;
use crate::cluster::snapshot::Pointer;

/// A held slot's latest snapshot as this node knows it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Snapped {
    pub position: u64,
    /// When it was taken, or when this node took the slot.
    pub at: Instant,
}

fn store_err(e: impl std::fmt::Display) -> LogError {
    LogError::Nats(e.to_string())
}

impl Node {
    fn lock_snapped(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Snapped>> {
        self.snapped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_pointers(&self) -> std::sync::MutexGuard<'_, Vec<Pointer>> {
        self.pointers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Snapshots the held slots that are due, every quarter of
    /// `[cluster] snapshot_every`, until the node stops.
    pub(super) async fn snapshot_loop(self: Arc<Self>) {
        let every = self.cfg.snapshot_every.0;
        let tick = (every / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
        loop {
            tokio::time::sleep(tick).await;
            if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            if let Err(e) = self.snapshot_due(every).await {
                tracing::warn!("slot snapshots not taken (trying again): {e}");
            }
        }
    }

    /// Snapshots (one scan of the store) the held slots with commits since
    /// their latest snapshot, taken at least `every` ago, and stores them;
    /// their pointers wait for the persister.
    async fn snapshot_due(&self, every: Duration) -> Result<(), LogError> {
        let held = self.lock_held().clone();
        let due: Vec<u16> = {
            let snapped = self.lock_snapped();
            held.keys()
                .copied()
                .filter(|s| {
                    let last = snapped.get(s).copied();
                    let applied = self.store.applied(*s).unwrap_or(0);
                    last.is_some_and(|l| applied > l.position && l.at.elapsed() >= every)
                })
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let store = self.store.clone();
        let images = tokio::task::spawn_blocking(move || store.snapshot_slots(&due))
            .await
            .map_err(store_err)?
            .map_err(store_err)?;
        let scanned = started.elapsed();
        for (slot, image) in images {
            let Some(epoch) = held.get(&slot) else {
                continue;
            };
            let object = self.snapshots.put(slot, &image).await?;
            self.lock_pointers().push(Pointer {
                slot,
                position: image.position,
                object,
                keys: image.keys,
                bytes: image.body.len() as u64,
                events_decided: image.events_decided,
                unmarked: image.unmarked,
                node: self.me.node.clone(),
                epoch: epoch.seq,
                at_ms: crate::event::now_ms(),
            });
        }
        tracing::debug!(
            scan_ms = scanned.as_millis() as u64,
            ms = started.elapsed().as_millis() as u64,
            "slot snapshots stored"
        );
        Ok(())
    }

    /// The persister's second step: commits the pointers of the snapshots
    /// stored, each fenced by its slot's epoch (never beside another of
    /// the slot's commits), then compacts each slot's log in the
    /// background.
    pub async fn commit_snapshots(self: &Arc<Self>) {
        let pointers = std::mem::take(&mut *self.lock_pointers());
        for p in pointers {
            let Some(epoch) = self.lock_held().get(&p.slot).cloned() else {
                continue;
            };
            if epoch.seq != p.epoch {
                continue;
            }
            let n = self
                .commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = format!("{}.{}.{}.{n}", self.me.node, p.slot, epoch.seq);
            let body = match serde_json::to_vec(&p) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    tracing::error!(slot = p.slot, "snapshot pointer not written: {e}");
                    continue;
                }
            };
            let subject = self.layout.snapshot_subject(p.slot);
            match self.log.commit_on(subject, &epoch, &id, &[body]).await {
                Ok(_) => {
                    self.lock_snapped().insert(
                        p.slot,
                        Snapped {
                            position: p.position,
                            at: Instant::now(),
                        },
                    );
                    let node = self.clone();
                    tokio::spawn(async move {
                        match node.snapshots.compact(&p).await {
                            Ok(c) => tracing::info!(
                                slot = p.slot,
                                position = p.position,
                                keys = p.keys,
                                bytes = p.bytes,
                                commits_purged = c.commits,
                                events_purged = c.events,
                                old_snapshots = c.objects,
                                "slot snapshotted; log compacted below it"
                            ),
                            // The next snapshot compacts what this one left.
                            Err(e) => tracing::warn!(slot = p.slot, "log not compacted: {e}"),
                        }
                    });
                }
                Err(LogError::Fenced { epoch, .. }) => {
                    tracing::warn!(
                        slot = p.slot,
                        epoch,
                        "fenced: another node claimed the slot; its snapshot is not used"
                    );
                    self.give_up(p.slot);
                }
                Err(e) => {
                    tracing::warn!(
                        slot = p.slot,
                        "snapshot pointer not stored (trying again): {e}"
                    );
                    self.lock_pointers().push(p);
                }
            }
        }
    }

    /// Before `slots` just won are caught up: their latest snapshots, and
    /// for those ahead of this node's copy the copy is cleared (one scan)
    /// so that the snapshot restores onto nothing stale.
    pub(super) async fn snapshots_to_restore(
        &self,
        slots: &[u16],
    ) -> Result<HashMap<u16, Pointer>, LogError> {
        let latest =
            futures_util::future::join_all(slots.iter().map(|s| self.snapshots.latest(*s))).await;
        let mut restore = HashMap::new();
        for (slot, p) in slots.iter().zip(latest) {
            let p = p?;
            let applied = self.store.applied(*slot).map_err(store_err)?;
            self.lock_snapped().insert(
                *slot,
                Snapped {
                    position: p.as_ref().map_or(0, |p| p.position),
                    at: Instant::now(),
                },
            );
            if let Some(p) = p.filter(|p| p.position > applied) {
                restore.insert(*slot, p);
            }
        }
        if !restore.is_empty() {
            tracing::info!(
                slots = restore.len(),
                "restoring slots from their snapshots (ahead of this node's copies)"
            );
            let store = self.store.clone();
            let clear: Vec<u16> = restore.keys().copied().collect();
            let removed = tokio::task::spawn_blocking(move || store.clear_slots(&clear))
                .await
                .map_err(store_err)?
                .map_err(store_err)?;
            if removed > 0 {
                tracing::info!(
                    slots = ?restore.keys().collect::<Vec<_>>(),
                    removed,
                    "stale copies cleared before their snapshots are restored"
                );
            }
        }
        Ok(restore)
    }

    /// Restores `p` into the store: the slot's position becomes the
    /// snapshot's. Returns the keys restored.
    pub(super) async fn restore(&self, p: &Pointer) -> Result<u64, LogError> {
        // Two at a time: restoring dozens of slots at once on a small
        // machine starved the membership renewals (measured: a survivor's
        // lease ran out while it restored 45 slots in parallel).
        let _permit = self.restoring.acquire().await.map_err(store_err)?;
        let body = self.snapshots.fetch(p).await?;
        let store = self.store.clone();
        let (slot, position) = (p.slot, p.position);
        tokio::task::spawn_blocking(move || store.restore_slot(slot, position, &body))
            .await
            .map_err(store_err)?
            .map_err(store_err)
    }
}
