//! Durable acknowledgement with group commit.
//!
//! Ingest requests queue here; one committer thread takes everything queued,
//! drops message ids already accepted, writes the rest to the store's inbox
//! in one batch, waits for it to reach disk, answers every request at once,
//! and hands the events to the workers in acceptance order. One fsync serves
//! every request that arrived while the previous one ran, so throughput
//! grows with load instead of collapsing.
//!
//! Memory is bounded: past `max_inflight_events` accepted-but-undecided
//! events, requests are refused with 503 and `Retry-After`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::event::{now_ms, Event};
use crate::ingest::{Incoming, IngestError};
use crate::metrics::Metrics;
use crate::store::{vshard_of, Store};

/// An accepted event on its way to a worker.
pub struct Work {
    pub seq: u64,
    pub event: Event,
    /// When its request arrived (none for events recovered at start-up).
    pub received: Option<Instant>,
    /// In a cluster, the tenure of the slot's ownership it was read under
    /// (see `cluster::Tenures`): a worker drops work of a tenure that
    /// ended. 0 outside a cluster.
    pub tenure: u64,
}

/// What the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub accepted: usize,
    pub duplicates: usize,
}

struct Submit {
    events: Vec<Incoming>,
    received: Instant,
    reply: oneshot::Sender<Result<Ack, IngestError>>,
}

/// The ingest side's handle.
pub struct Inbox {
    tx: Mutex<Option<SyncSender<Submit>>>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
}

/// One group commit still in the inbox: per virtual shard, the last seq of
/// that shard in it, and the store keys holding it.
struct Group {
    last: BTreeMap<usize, u64>,
    keys: Vec<u64>,
}

/// Groups of the inbox not yet deleted, by first seq.
#[derive(Clone, Default)]
pub struct Groups(Arc<Mutex<BTreeMap<u64, Group>>>);

impl Groups {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Group>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, first: u64, last: BTreeMap<usize, u64>, keys: Vec<u64>) {
        self.lock().insert(first, Group { last, keys });
    }

    /// Removes the groups whose events the durable watermarks (virtual
    /// shard → seq) have all passed, and returns their store keys.
    pub fn take_decided(&self, watermarks: &HashMap<usize, u64>) -> Vec<u64> {
        let mut groups = self.lock();
        let done: Vec<u64> = groups
            .iter()
            .filter(|(_, g)| {
                g.last
                    .iter()
                    .all(|(v, l)| watermarks.get(v).is_some_and(|w| w >= l))
            })
            .map(|(first, _)| *first)
            .collect();
        done.iter()
            .filter_map(|f| groups.remove(f))
            .flat_map(|g| g.keys)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What start-up found in the inbox.
#[derive(Default)]
pub struct Recovered {
    /// Acknowledged events not yet decided, in order.
    pub work: Vec<Work>,
    /// Above every sequence number used so far.
    pub next_seq: u64,
    pub groups: Groups,
    /// Durable watermarks, virtual shard → seq.
    pub watermarks: HashMap<usize, u64>,
    /// Events decided above their shard's watermark: (virtual shard, seq).
    pub above: Vec<(usize, u64)>,
}

/// Reads the inbox at start-up: the events acknowledged but not decided
/// before the last stop, to be decided first, in order.
pub fn recover(store: &Store) -> Result<Recovered, crate::store::StoreError> {
    let state = store.inbox()?;
    let marks: HashMap<usize, u64> = state.watermarks.iter().copied().collect();
    let above: HashSet<(usize, u64)> = state.above.iter().copied().collect();
    let last_seq = state
        .groups
        .iter()
        .filter_map(|(_, g)| g.last().map(|(s, _)| *s))
        .chain(marks.values().copied())
        .max();
    let groups = Groups::default();
    let mut work = Vec::new();
    for (first, group) in state.groups {
        let mut last = BTreeMap::new();
        for (seq, raw) in group {
            let event = match std::str::from_utf8(&raw)
                .map_err(|e| e.to_string())
                .and_then(|t| Event::parse(t).map_err(|e| e.to_string()))
            {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(seq, "inbox event unreadable, skipped: {e}");
                    continue;
                }
            };
            let v = vshard_of(&event.customer);
            if marks.get(&v).is_some_and(|w| seq <= *w) || above.contains(&(v, seq)) {
                continue;
            }
            last.insert(v, seq);
            work.push(Work {
                seq,
                event,
                received: None,
                tenure: 0,
            });
        }
        if last.is_empty() {
            store.remove_inbox_group(first)?;
        } else {
            groups.add(first, last, vec![first]);
        }
    }
    Ok(Recovered {
        work,
        next_seq: last_seq.map_or(0, |s| s + 1),
        groups,
        watermarks: marks,
        above: state.above,
    })
}

/// Requests queued for the committer, at most (each holds its events'
/// in-flight reservation, which is the real bound).
const QUEUED_REQUESTS: usize = 8192;

/// Most events one group commit takes.
const GROUP_EVENTS: usize = 50_000;

impl Inbox {
    /// Starts the committer. `workers`: one sender per worker shard.
    /// `next_seq`: above every sequence number still in the store's inbox.
    pub fn start(
        store: Store,
        workers: Vec<Sender<Work>>,
        next_seq: u64,
        groups: Groups,
        inflight: Arc<AtomicUsize>,
        max_inflight: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Inbox, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::sync_channel(QUEUED_REQUESTS);
        let committer = {
            let inflight = inflight.clone();
            std::thread::Builder::new()
                .name("nudge-inbox".into())
                .spawn(move || {
                    commit_loop(rx, store, workers, next_seq, groups, inflight, metrics)
                })?
        };
        Ok((
            Inbox {
                tx: Mutex::new(Some(tx)),
                inflight,
                max_inflight,
            },
            committer,
        ))
    }

    /// An inbox that takes nothing (a cluster node: events go to the
    /// events stream), counting `inflight` events read and not decided.
    pub fn detached(inflight: Arc<AtomicUsize>, max_inflight: usize) -> Inbox {
        Inbox {
            tx: Mutex::new(None),
            inflight,
            max_inflight,
        }
    }

    /// Records `events` durably; resolves once they are on disk.
    pub async fn submit(
        &self,
        events: Vec<Incoming>,
        received: Instant,
    ) -> Result<Ack, IngestError> {
        let n = events.len();
        if n == 0 {
            return Ok(Ack {
                accepted: 0,
                duplicates: 0,
            });
        }
        let before = self.inflight.fetch_add(n, Ordering::AcqRel);
        if before + n > self.max_inflight && before > 0 {
            self.inflight.fetch_sub(n, Ordering::AcqRel);
            return Err(IngestError::Busy {
                message: format!(
                    "{before} events are waiting to be decided (limit {})",
                    self.max_inflight
                ),
                retry_after: 1,
            });
        }
        let (reply, answer) = oneshot::channel();
        let sent = {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            match tx.as_ref() {
                None => Err(IngestError::Unavailable("shutting down".into())),
                Some(tx) => tx
                    .try_send(Submit {
                        events,
                        received,
                        reply,
                    })
                    .map_err(|e| match e {
                        TrySendError::Full(_) => IngestError::Busy {
                            message: "too many requests queued for commit".into(),
                            retry_after: 1,
                        },
                        TrySendError::Disconnected(_) => {
                            IngestError::Unavailable("the inbox has stopped".into())
                        }
                    }),
            }
        };
        if let Err(e) = sent {
            self.inflight.fetch_sub(n, Ordering::AcqRel);
            return Err(e);
        }
        answer
            .await
            .unwrap_or_else(|_| Err(IngestError::Unavailable("the inbox has stopped".into())))
    }

    /// Refuses further requests; the committer finishes what is queued and
    /// stops.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }
}

fn commit_loop(
    rx: Receiver<Submit>,
    store: Store,
    workers: Vec<Sender<Work>>,
    mut seq: u64,
    groups: Groups,
    inflight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let shards = workers.len();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        let mut events = group[0].events.len();
        while events < GROUP_EVENTS {
            match rx.try_recv() {
                Ok(s) => {
                    events += s.events.len();
                    group.push(s);
                }
                Err(_) => break,
            }
        }
        // De-duplicate against the store and within the group.
        let mut fresh: HashSet<&str> = HashSet::new();
        let mut keep: Vec<Vec<bool>> = Vec::with_capacity(group.len());
        let mut failed = None;
        for s in &group {
            let mut k = Vec::with_capacity(s.events.len());
            for inc in &s.events {
                let id = inc.event.message_id.as_str();
                let dup = !fresh.insert(id)
                    || match store.seen_message(id) {
                        Ok(seen) => seen,
                        Err(e) => {
                            failed = Some(e.to_string());
                            true
                        }
                    };
                k.push(!dup);
            }
            keep.push(k);
        }
        let mut entries = Vec::with_capacity(events);
        let first_seq = seq;
        for (s, k) in group.iter().zip(&keep) {
            for (inc, keep) in s.events.iter().zip(k) {
                if *keep {
                    entries.push((seq, inc.event.message_id.as_str(), inc.raw.as_slice()));
                    seq += 1;
                }
            }
        }
        let written = match failed {
            Some(e) => Err(e),
            None => store
                .append_inbox(&entries, now_ms())
                .map_err(|e| e.to_string()),
        };
        drop(entries);
        metrics.group_commit_events.observe(events as f64);
        let keys = match written {
            Ok(keys) => keys,
            Err(e) => {
                tracing::error!("inbox write failed, refusing {events} events: {e}");
                inflight.fetch_sub(events, Ordering::AcqRel);
                for s in group {
                    let _ = s
                        .reply
                        .send(Err(IngestError::Unavailable(format!("store: {e}"))));
                }
                seq = first_seq;
                continue;
            }
        };
        // Durable: answer everyone, then hand the events on in order.
        // Duplicates are not processed: release their reservation before
        // anyone hears back.
        let duplicates = keep.iter().flatten().filter(|k| !**k).count();
        inflight.fetch_sub(duplicates, Ordering::AcqRel);
        let mut next = first_seq;
        let mut dispatch = Vec::with_capacity(events);
        let mut duplicates_total = 0;
        for (s, k) in group.into_iter().zip(keep) {
            let mut ack = Ack {
                accepted: 0,
                duplicates: 0,
            };
            for (inc, keep) in s.events.into_iter().zip(k) {
                if keep {
                    ack.accepted += 1;
                    dispatch.push(Work {
                        seq: next,
                        event: inc.event,
                        received: Some(s.received),
                        tenure: 0,
                    });
                    next += 1;
                } else {
                    ack.duplicates += 1;
                }
            }
            duplicates_total += ack.duplicates;
            metrics
                .ack_seconds
                .observe(s.received.elapsed().as_secs_f64());
            let _ = s.reply.send(Ok(ack));
        }
        metrics.events_accepted.inc_by(dispatch.len() as u64);
        metrics.events_duplicate.inc_by(duplicates_total as u64);
        // Per virtual shard, the group's last event: once every such
        // watermark has passed it, the group can go.
        let mut last = BTreeMap::new();
        for w in dispatch {
            let v = vshard_of(&w.event.customer);
            last.insert(v, w.seq);
            let shard = v % shards;
            if workers[shard].send(w).is_err() {
                // A worker stopped (it logged why); the event stays in the
                // inbox (its shard's watermark is below it) and is decided
                // at the next start.
                inflight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if !last.is_empty() {
            groups.add(first_seq, last, keys);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::ingest::{parse, Endpoint, MessageIds};

    fn events(ids: &[&str]) -> Vec<Incoming> {
        let batch: Vec<String> = ids
            .iter()
            .map(|id| {
                format!(
                    r#"{{"type":"track","userId":"c-{id}","messageId":"{id}","timestamp":"2026-01-01T00:00:00Z","event":"E"}}"#
                )
            })
            .collect();
        let body = format!(r#"{{"batch":[{}]}}"#, batch.join(","));
        parse(
            Endpoint::Batch,
            body.as_bytes(),
            &config::Ingest::default(),
            // After the events' timestamps (2026-06-01).
            1_780_272_000_000,
            &MessageIds::new(),
        )
        .unwrap()
        .events
    }

    #[tokio::test]
    async fn durable_dedupes_and_refuses_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A worker that never takes anything: events stay in flight.
        let (tx, rx) = mpsc::channel();
        let inflight = Arc::new(AtomicUsize::new(0));
        let (inbox, committer) = Inbox::start(
            store.clone(),
            vec![tx],
            0,
            Groups::default(),
            inflight,
            3,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let ack = inbox
            .submit(events(&["a", "b"]), Instant::now())
            .await
            .unwrap();
        assert_eq!(
            ack,
            Ack {
                accepted: 2,
                duplicates: 0
            }
        );
        // On disk before the acknowledgement, in order.
        let state = store.inbox().unwrap();
        assert_eq!(state.groups.len(), 1);
        let stored: Vec<u64> = state.groups[0].1.iter().map(|(s, _)| *s).collect();
        assert_eq!(stored, vec![0, 1]);
        let busy = inbox
            .submit(events(&["c", "d"]), Instant::now())
            .await
            .unwrap_err();
        assert_eq!(busy.status(), 503);
        assert_eq!(busy.retry_after(), Some(1));
        // One more fits; a repeated id is acknowledged but not queued.
        let ack = inbox.submit(events(&["a"]), Instant::now()).await.unwrap();
        assert_eq!(
            ack,
            Ack {
                accepted: 0,
                duplicates: 1
            }
        );
        assert_eq!(inbox.inflight(), 2);
        let queued: Vec<String> = rx.try_iter().map(|w| w.event.message_id).collect();
        assert_eq!(queued, ["a", "b"]);
        inbox.close();
        let closed = inbox
            .submit(events(&["e"]), Instant::now())
            .await
            .unwrap_err();
        assert_eq!(closed.status(), 503);
        committer.join().unwrap();
        // Undecided: start-up finds both, in order.
        let r = recover(&store).unwrap();
        let again: Vec<String> = r.work.iter().map(|w| w.event.message_id.clone()).collect();
        assert_eq!(again, ["a", "b"]);
        assert!(r.next_seq >= 2);
    }

    #[test]
    fn watermarks_decide_what_start_up_replays_and_which_groups_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ids = ["a", "b", "c", "d", "e", "f"];
        let evs = events(&ids);
        let entries: Vec<(u64, &str, &[u8])> = evs
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u64, e.event.message_id.as_str(), e.raw.as_slice()))
            .collect();
        store.append_inbox(&entries, 0).unwrap();
        let v: Vec<usize> = evs.iter().map(|e| vshard_of(&e.event.customer)).collect();
        // The first event's virtual shard decided through all its events,
        // the others through none.
        let done = v[0];
        let last = (0..ids.len()).filter(|i| v[*i] == done).max().unwrap() as u64;
        let mut c = crate::store::Changes::new();
        c.inbox_watermark(done, last);
        store.commit(c);
        store.flush().unwrap();
        let r = recover(&store).unwrap();
        let want: Vec<&str> = (0..ids.len())
            .filter(|i| v[*i] != done)
            .map(|i| ids[i])
            .collect();
        assert!(!want.is_empty());
        let got: Vec<&str> = r.work.iter().map(|w| w.event.message_id.as_str()).collect();
        assert_eq!(got, want);
        assert_eq!(r.next_seq, ids.len() as u64);
        assert_eq!(r.groups.len(), 1);
        // The group goes once every other virtual shard passes its events.
        let mut marks = r.watermarks.clone();
        assert!(r.groups.take_decided(&marks).is_empty());
        for (i, vs) in v.iter().enumerate() {
            let w = marks.entry(*vs).or_insert(0);
            *w = (*w).max(i as u64);
        }
        assert_eq!(r.groups.take_decided(&marks), vec![0]);
        // Watermarks do not depend on the worker count: the same events
        // are found again, whatever the next start runs with.
        let again = recover(&store).unwrap();
        assert_eq!(again.work.len(), want.len());
    }

    #[test]
    fn events_decided_above_the_watermark_are_not_decided_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // One customer, so one virtual shard: seqs 0..4, decided out of
        // order (held and released by timestamp): 2 and 3 first.
        let raw: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                format!(r#"{{"type":"track","event":"E","userId":"u","messageId":"m{i}","timestamp":"2026-01-01T00:00:0{i}Z"}}"#).into_bytes()
            })
            .collect();
        let entries: Vec<(u64, String)> = (0..4).map(|i| (i, format!("m{i}"))).collect();
        let entries: Vec<(u64, &str, &[u8])> = entries
            .iter()
            .zip(&raw)
            .map(|((s, id), r)| (*s, id.as_str(), r.as_slice()))
            .collect();
        store.append_inbox(&entries, 0).unwrap();
        let v = vshard_of("u");
        let mut held = crate::reorder::Reorder::new(crate::reorder::Policy {
            clock: crate::config::Clock::Event,
            window: std::time::Duration::ZERO,
            max_held: 100,
        });
        let now = std::time::Instant::now();
        for seq in 0..4 {
            let event = Event::parse(std::str::from_utf8(&raw[seq as usize]).unwrap()).unwrap();
            held.push(
                Work {
                    seq,
                    event,
                    received: None,
                    tenure: 0,
                },
                now,
            );
        }
        for seq in [2, 3] {
            let m = held.decided(v, seq);
            let mut c = crate::store::Changes::new();
            if let Some(w) = m.watermark {
                c.inbox_watermark(m.vshard, w);
            }
            if let Some(s) = m.above {
                c.inbox_above(m.vshard, s, false);
            }
            store.commit(c);
        }
        store.flush().unwrap();
        // A crash here: 0 and 1 are still to decide, 2 and 3 are not.
        let r = recover(&store).unwrap();
        let got: Vec<&str> = r.work.iter().map(|w| w.event.message_id.as_str()).collect();
        assert_eq!(got, ["m0", "m1"]);
        assert_eq!(r.above.len(), 2);
        // Once 0 and 1 are decided the watermark stands at 1 (only what
        // this run received counts: a recovered event not yet received
        // must never be passed), and the records above it stay until a
        // later event of the shard takes the watermark past them.
        let mut held = crate::reorder::Reorder::new(crate::reorder::Policy {
            clock: crate::config::Clock::Event,
            window: std::time::Duration::ZERO,
            max_held: 100,
        });
        held.restore_above(v, r.above.iter().map(|(_, s)| *s));
        for w in r.work {
            held.push(w, now);
        }
        let commit = |m: crate::reorder::InboxMark| {
            let mut c = crate::store::Changes::new();
            if let Some(w) = m.watermark {
                c.inbox_watermark(m.vshard, w);
            }
            for &s in &m.forget {
                c.inbox_above(m.vshard, s, true);
            }
            store.commit(c);
            (m.watermark, m.forget)
        };
        assert_eq!(commit(held.decided(v, 0)), (Some(0), vec![]));
        assert_eq!(commit(held.decided(v, 1)), (Some(1), vec![]));
        store.flush().unwrap();
        let again = recover(&store).unwrap();
        assert!(again.work.is_empty());
        assert_eq!(again.above.len(), 2);
        let event = Event::parse(
            r#"{"type":"track","event":"E","userId":"u","messageId":"m4","timestamp":"2026-01-01T00:00:09Z"}"#,
        )
        .unwrap();
        held.push(
            Work {
                seq: 4,
                event,
                received: None,
                tenure: 0,
            },
            now,
        );
        assert_eq!(commit(held.decided(v, 4)), (Some(4), vec![2, 3]));
        store.flush().unwrap();
        let again = recover(&store).unwrap();
        assert!(again.work.is_empty() && again.above.is_empty());
    }
}
