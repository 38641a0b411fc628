//! Feeding a held slot's events to the workers.
//!
//! One task per held slot reads the slot's subjects of the events stream
//! in order (an ordered consumer, created again from the last sequence
//! seen after any error), from above the lowest watermark of the slot's
//! virtual shards. Events at or under their virtual shard's watermark, or
//! recorded as decided above it, were decided before (by this node or an
//! earlier owner) and are skipped; the rest go to the slot's worker with
//! the slot's tenure. The task ends when the tenure does.
//!
//! Memory is bounded like ingest's: past `max_inflight` events read and
//! not yet decided, the feeder waits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures_util::StreamExt;

use super::slots::Layout;
use super::tenure::Tenures;
use crate::event::Event;
use crate::inbox::Work;
use crate::store::vshard_of;

/// How often an idle feeder checks that its tenure goes on.
const CHECK: Duration = Duration::from_millis(100);

/// One slot's feed.
pub struct Feed {
    pub js: async_nats::jetstream::Context,
    pub layout: Layout,
    pub slot: u16,
    pub tenure: u64,
    pub tenures: Arc<Tenures>,
    /// Virtual shard → its watermark (absent: nothing decided yet).
    pub watermarks: HashMap<usize, u64>,
    /// Events decided above their watermark: (virtual shard, seq).
    pub above: HashSet<(usize, u64)>,
    pub worker: Sender<Work>,
    pub inflight: Arc<AtomicUsize>,
    pub max_inflight: usize,
    /// Set at shutdown: stop reading, keep the tenure (what was read is
    /// decided and committed).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// Per slot: events stored and not yet read, as last seen.
    pub lag: Arc<[std::sync::atomic::AtomicU64]>,
}

impl Feed {
    /// The stream sequence to read after: the lowest watermark of the
    /// slot's virtual shards (0 when one has none).
    fn start(&self) -> u64 {
        self.layout
            .vshards(self.slot)
            .map(|v| self.watermarks.get(&v).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    fn set_lag(&self, n: u64) {
        if let Some(l) = self.lag.get(usize::from(self.slot)) {
            l.store(n, Ordering::Relaxed);
        }
    }

    fn live(&self) -> bool {
        !self.stop.load(Ordering::Acquire) && self.tenures.holds(self.slot, self.tenure)
    }

    /// Reads and hands on events until the tenure ends.
    pub async fn run(self) {
        let mut last = self.start();
        let (mut fed, mut skipped) = (0u64, 0u64);
        tracing::debug!(slot = self.slot, after = last, "feeding the slot");
        'consumer: while self.live() {
            let consumer = async {
                let stream = self
                    .js
                    .get_stream_no_info(self.layout.events_stream())
                    .await
                    .map_err(|e| e.to_string())?;
                stream
                    .create_consumer(OrderedConfig {
                        filter_subject: self.layout.slot_events(self.slot),
                        deliver_policy: DeliverPolicy::ByStartSequence {
                            start_sequence: last + 1,
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .messages()
                    .await
                    .map_err(|e| e.to_string())
            };
            let mut messages = match consumer.await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(slot = self.slot, "events consumer, trying again: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let next = match tokio::time::timeout(CHECK, messages.next()).await {
                    Err(_) if self.live() => {
                        // Nothing for a while: everything stored was read.
                        self.set_lag(0);
                        continue;
                    }
                    Err(_) => break 'consumer,
                    Ok(None) => continue 'consumer,
                    Ok(Some(Err(e))) => {
                        tracing::debug!(slot = self.slot, "events consumer: {e}");
                        continue 'consumer;
                    }
                    Ok(Some(Ok(m))) => m,
                };
                let Ok(info) = next.info() else {
                    continue 'consumer;
                };
                let seq = info.stream_sequence;
                self.set_lag(info.pending);
                // The client's ordered consumer starts itself over after a
                // gap or a lost server, and may deliver again what it had:
                // never hand on anything twice.
                if seq <= last {
                    skipped += 1;
                    continue;
                }
                // Its age on arrival: the decision latency counts from the
                // acknowledgement, not from this read.
                let published = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
                let age = Duration::from_millis(
                    (crate::event::now_ms() - published).clamp(0, 3_600_000) as u64,
                );
                last = seq;
                let event = match std::str::from_utf8(&next.payload)
                    .map_err(|e| e.to_string())
                    .and_then(|t| Event::parse(t).map_err(|e| e.to_string()))
                {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(
                            slot = self.slot,
                            seq,
                            "stored event unreadable, skipped: {e}"
                        );
                        continue;
                    }
                };
                let v = vshard_of(&event.customer);
                if self.watermarks.get(&v).is_some_and(|w| seq <= *w)
                    || self.above.contains(&(v, seq))
                {
                    skipped += 1;
                    continue;
                }
                while self.inflight.load(Ordering::Acquire) >= self.max_inflight {
                    if !self.live() {
                        break 'consumer;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if !self.live() {
                    break 'consumer;
                }
                self.inflight.fetch_add(1, Ordering::AcqRel);
                let work = Work {
                    seq,
                    event,
                    received: Instant::now().checked_sub(age),
                    tenure: self.tenure,
                };
                if self.worker.send(work).is_err() {
                    self.inflight.fetch_sub(1, Ordering::AcqRel);
                    break 'consumer;
                }
                fed += 1;
            }
        }
        tracing::debug!(slot = self.slot, fed, skipped, "stopped feeding the slot");
    }
}
