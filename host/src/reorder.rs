//! Event-time order within a bounded lateness, for `nudge serve`.
//!
//! SDKs send batches concurrently, so requests overtake each other and a
//! customer's `Order Completed` can arrive before the `Product Added` it
//! follows. Each worker therefore holds every event for `window` after it
//! arrived and releases held events in (timestamp, messageId) order: the
//! first in that order goes once its own hold is over. So any two events of
//! a customer that arrive within `window` of each other are decided in
//! timestamp order, whatever order their requests came in, and no event
//! waits much longer than `window`.
//!
//! The window is measured in arrival (wall) time on both clocks, not in
//! event time: how far requests overtake each other depends on the network
//! and the SDK, not on how dense the events are, and what is held is then
//! bounded by the arrival rate times the window. Past `max_held` events,
//! the earliest is released at once, so memory is bounded whatever the
//! rate.
//!
//! The clock timers see is the watermark: on the event clock the
//! timestamp of the event being released, on the wall clock now less the
//! window, so a timer never fires ahead of an event still held.
//!
//! An event that should have come before something already decided is
//! **late**: it is not held but handed back to be decided at once, and
//! marked. On the event clock that is anything older than the worker's
//! watermark (timers up to it have fired); on the wall clock, where timers
//! run on the wall clock, anything older than its customer's last released
//! event. The wall clock's per-customer memory is bounded: past
//! [`CUSTOMERS`] entries the older half is dropped, and an event older than
//! the dropped ones counts as late.
//!
//! # Durability
//!
//! Held events are acknowledged and in the inbox. The inbox watermark of a
//! virtual shard says every event up to it is decided; with reordering, an
//! event can be decided while an earlier one of its shard is still held.
//! So the watermark is the earliest held sequence number less one, and an
//! event decided above it is recorded on its own ([`InboxMark::above`]),
//! until the watermark passes it; start-up skips both, and releases the
//! rest in the same order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Clock;
use crate::inbox::Work;

/// Customers whose last released timestamp one worker remembers (wall
/// clock), at most.
pub const CUSTOMERS: usize = 200_000;

/// Each worker's watermark (the latest timestamp it released), for
/// ingest to refuse what is already late (`server.late = "refuse"`).
#[derive(Clone)]
pub struct Watermarks(Arc<[AtomicI64]>);

impl Watermarks {
    pub fn new(workers: usize) -> Watermarks {
        Watermarks(
            (0..workers.max(1))
                .map(|_| AtomicI64::new(i64::MIN))
                .collect(),
        )
    }

    /// The watermark of the worker that decides `customer`.
    pub fn of(&self, customer: &str) -> Option<i64> {
        let w = self.0[crate::store::shard_of(customer, self.0.len())].load(Ordering::Acquire);
        (w != i64::MIN).then_some(w)
    }

    /// The latest time any worker released (the event clock's now).
    pub fn latest(&self) -> Option<i64> {
        self.0
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .filter(|w| *w != i64::MIN)
            .max()
    }

    pub fn set(&self, shard: usize, ts: i64) {
        if let Some(w) = self.0.get(shard) {
            w.fetch_max(ts, Ordering::AcqRel);
        }
    }
}

/// How a worker's events are held and released.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub clock: Clock,
    /// How long after its arrival an event is held. Zero: none is.
    pub window: Duration,
    /// Most events held by one worker.
    pub max_held: usize,
}

/// Where the inbox stands for one virtual shard after an event of it was
/// decided: committed with the event's effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMark {
    pub vshard: usize,
    /// Every event of the shard up to this sequence number is decided
    /// (`None`: not even the first yet).
    pub watermark: Option<u64>,
    /// This event's sequence number, when it is above the watermark.
    pub above: Option<u64>,
    /// Sequence numbers recorded above an earlier watermark that this one
    /// has passed: their records go.
    pub forget: Vec<u64>,
}

/// An event let out of the buffer.
pub struct Released {
    pub work: Work,
    /// How far behind the worker's watermark it arrived (late events only).
    pub late_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    ts: i64,
    message_id: String,
    seq: u64,
}

struct Held {
    work: Work,
    /// Wall clock: when it may go.
    until: Instant,
}

/// One worker's held events and its shards' inbox marks.
pub struct Reorder {
    policy: Policy,
    held: BTreeMap<Key, Held>,
    /// Timestamp of the last event released: on the event clock, older
    /// ones are late.
    released: Option<i64>,
    /// Wall clock: each customer's last released timestamp, and below what
    /// timestamp entries were dropped.
    last: HashMap<String, i64>,
    floor: i64,
    /// Per virtual shard: sequence numbers held, the highest received, and
    /// those decided above the watermark.
    held_seqs: HashMap<usize, BTreeSet<u64>>,
    highest: HashMap<usize, u64>,
    above: HashMap<usize, BTreeSet<u64>>,
    /// Where this worker's watermark is published for ingest.
    published: Option<(Watermarks, usize)>,
}

impl Reorder {
    pub fn new(policy: Policy) -> Reorder {
        Reorder {
            policy,
            held: BTreeMap::new(),
            released: None,
            last: HashMap::new(),
            floor: i64::MIN,
            held_seqs: HashMap::new(),
            highest: HashMap::new(),
            above: HashMap::new(),
            published: None,
        }
    }

    /// Publishes the watermark as worker `shard`'s in `marks`.
    pub fn publish(&mut self, marks: Watermarks, shard: usize) {
        self.published = Some((marks, shard));
    }

    /// Sequence numbers decided above their shard's watermark before the
    /// last stop (start-up): forgotten once the watermark passes them.
    pub fn restore_above(&mut self, vshard: usize, seqs: impl IntoIterator<Item = u64>) {
        self.above.entry(vshard).or_default().extend(seqs);
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn window(&self) -> Duration {
        self.policy.window
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The event clock's watermark: timers up to it may fire.
    pub fn watermark(&self) -> Option<i64> {
        self.released
    }

    /// Takes one event in; returns it at once when it is late (older than
    /// what was already released).
    pub fn push(&mut self, work: Work, now: Instant) -> Option<Released> {
        let v = crate::store::vshard_of(&work.event.customer);
        let seq = work.seq;
        self.held_seqs.entry(v).or_default().insert(seq);
        let h = self.highest.entry(v).or_insert(seq);
        *h = (*h).max(seq);
        let ts = work.event.ts;
        let passed = match self.policy.clock {
            Clock::Event => self.released,
            Clock::Wall => Some(
                self.last
                    .get(&work.event.customer)
                    .map_or(self.floor, |l| (*l).max(self.floor)),
            ),
        };
        if let Some(p) = passed.filter(|p| ts < *p) {
            return Some(Released {
                work,
                late_ms: Some(p.saturating_sub(ts)),
            });
        }
        let until = now + self.policy.window;
        let key = Key {
            ts,
            message_id: work.event.message_id.clone(),
            seq,
        };
        self.held.insert(key, Held { work, until });
        None
    }

    /// The next event due out, if any is.
    pub fn pop(&mut self, now: Instant) -> Option<Released> {
        let (_, held) = self.held.first_key_value()?;
        if held.until > now && self.held.len() <= self.policy.max_held {
            return None;
        }
        let (key, held) = self.held.pop_first()?;
        self.release(&key, &held.work);
        Some(Released {
            work: held.work,
            late_ms: None,
        })
    }

    fn release(&mut self, key: &Key, work: &Work) {
        self.released = Some(self.released.map_or(key.ts, |r| r.max(key.ts)));
        if let Some((marks, shard)) = &self.published {
            marks.set(*shard, key.ts);
        }
        if self.policy.clock == Clock::Wall {
            let last = self
                .last
                .entry(work.event.customer.clone())
                .or_insert(key.ts);
            *last = (*last).max(key.ts);
            if self.last.len() > CUSTOMERS {
                // Keep the newer half; what was dropped raises the floor.
                let mut all: Vec<i64> = self.last.values().copied().collect();
                let mid = all.len() / 2;
                let (_, cut, _) = all.select_nth_unstable(mid);
                let cut = *cut;
                self.last.retain(|_, ts| *ts >= cut);
                self.floor = self.floor.max(cut);
            }
        }
    }

    /// Everything still held, in order (shutdown).
    pub fn drain(&mut self) -> Vec<Released> {
        let held = std::mem::take(&mut self.held);
        let mut out = Vec::with_capacity(held.len());
        for (key, h) in held {
            self.release(&key, &h.work);
            out.push(Released {
                work: h.work,
                late_ms: None,
            });
        }
        out
    }

    /// How long until [`Reorder::pop`] may have something, if anything is
    /// held.
    pub fn next_wake(&self, now: Instant) -> Option<Duration> {
        let (_, held) = self.held.first_key_value()?;
        Some(held.until.saturating_duration_since(now))
    }

    /// Records that the event `seq` of virtual shard `vshard` is being
    /// decided, and returns the inbox mark to commit with it.
    pub fn decided(&mut self, vshard: usize, seq: u64) -> InboxMark {
        let held = self.held_seqs.entry(vshard).or_default();
        held.remove(&seq);
        // Sequence number 0 still held: no watermark can be claimed yet.
        let watermark = match held.first() {
            Some(first) => first.checked_sub(1),
            None => Some(self.highest.get(&vshard).copied().unwrap_or(seq)),
        };
        if held.is_empty() {
            self.held_seqs.remove(&vshard);
        }
        let passed = |s: u64| watermark.is_some_and(|w| s <= w);
        let above = self.above.entry(vshard).or_default();
        let mut forget: Vec<u64> = Vec::new();
        while let Some(&s) = above.first().filter(|s| passed(**s)) {
            above.remove(&s);
            forget.push(s);
        }
        let this = (!passed(seq)).then(|| {
            above.insert(seq);
            seq
        });
        if above.is_empty() {
            self.above.remove(&vshard);
        }
        InboxMark {
            vshard,
            watermark,
            above: this,
            forget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn work(seq: u64, customer: &str, ts: i64, id: &str) -> Work {
        let line = format!(
            r#"{{"type":"track","event":"E","userId":"{customer}","messageId":"{id}","timestamp":"{}"}}"#,
            crate::event::format_ts(ts)
        );
        Work {
            seq,
            event: Event::parse(&line).unwrap(),
            received: None,
            tenure: 0,
        }
    }

    fn policy(clock: Clock, window_ms: u64) -> Policy {
        Policy {
            clock,
            window: Duration::from_millis(window_ms),
            max_held: 1000,
        }
    }

    fn ids(out: &[Released]) -> Vec<String> {
        out.iter()
            .map(|r| r.work.event.message_id.clone())
            .collect()
    }

    fn pop_all(r: &mut Reorder, now: Instant) -> Vec<Released> {
        std::iter::from_fn(|| r.pop(now)).collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn held_events_go_in_time_order_once_their_hold_is_over() {
        let t0 = Instant::now();
        let mut r = Reorder::new(policy(Clock::Event, 100));
        assert!(r.push(work(1, "u", 5_000, "b"), t0).is_none());
        assert!(r.push(work(2, "u", 1_000, "a"), t0 + ms(10)).is_none());
        assert!(r.push(work(3, "v", 5_000, "c"), t0 + ms(20)).is_none());
        assert_eq!(
            r.next_wake(t0),
            Some(ms(110)),
            "the first in order waits its own hold"
        );
        assert!(
            pop_all(&mut r, t0 + ms(100)).is_empty(),
            "`a` is first and still held"
        );
        assert_eq!(ids(&pop_all(&mut r, t0 + ms(110))), ["a", "b"]);
        assert_eq!(r.watermark(), Some(5_000));
        // On the event clock, older than what was released is late, for
        // any customer.
        let late = r
            .push(work(4, "w", 4_000, "z"), t0 + ms(110))
            .expect("late");
        assert_eq!(late.late_ms, Some(1_000));
        assert_eq!(ids(&pop_all(&mut r, t0 + ms(120))), ["c"]);
        assert!(r.is_empty() && r.next_wake(t0).is_none());
    }

    #[test]
    fn a_zero_window_holds_nothing() {
        let t0 = Instant::now();
        let mut r = Reorder::new(policy(Clock::Wall, 0));
        assert!(r.push(work(1, "u", 5_000, "b"), t0).is_none());
        assert_eq!(ids(&pop_all(&mut r, t0)), ["b"]);
    }

    #[test]
    fn wall_clock_lateness_is_per_customer() {
        let t0 = Instant::now();
        let now_ms = 1_000_000;
        let mut r = Reorder::new(policy(Clock::Wall, 50));
        // Arrival reversed: the later timestamp first.
        assert!(r.push(work(1, "u", now_ms, "order"), t0).is_none());
        assert!(r
            .push(work(2, "u", now_ms - 1000, "added"), t0 + ms(5))
            .is_none());
        assert_eq!(ids(&pop_all(&mut r, t0 + ms(55))), ["added", "order"]);
        assert!(r.push(work(4, "w", now_ms - 2000, "other"), t0).is_none());
        let late = r.push(work(5, "u", now_ms - 500, "again"), t0);
        assert_eq!(late.map(|l| l.late_ms), Some(Some(500)));
        assert_eq!(ids(&pop_all(&mut r, t0 + ms(50))), ["other"]);
    }

    #[test]
    fn a_full_buffer_releases_the_earliest() {
        let t0 = Instant::now();
        let mut r = Reorder::new(Policy {
            max_held: 2,
            ..policy(Clock::Event, 3_600_000)
        });
        for (seq, ts) in [(1, 30), (2, 10), (3, 20)] {
            r.push(work(seq, "u", ts, &format!("m{seq}")), t0);
        }
        assert_eq!(ids(&pop_all(&mut r, t0)), ["m2"]);
        assert_eq!(r.len(), 2);
        assert_eq!(ids(&r.drain()), ["m3", "m1"]);
    }

    #[test]
    fn inbox_marks_never_claim_a_held_event() {
        let t0 = Instant::now();
        let mut r = Reorder::new(policy(Clock::Event, 3_600_000));
        let v = crate::store::vshard_of("u");
        for (seq, ts) in [(10, 3), (11, 1), (12, 2)] {
            r.push(work(seq, "u", ts, &format!("m{seq}")), t0);
        }
        // Released by time: 11, 12, then 10.
        assert_eq!(
            r.decided(v, 11),
            InboxMark {
                vshard: v,
                watermark: Some(9),
                above: Some(11),
                forget: vec![]
            }
        );
        assert_eq!(
            r.decided(v, 12),
            InboxMark {
                vshard: v,
                watermark: Some(9),
                above: Some(12),
                forget: vec![]
            }
        );
        assert_eq!(
            r.decided(v, 10),
            InboxMark {
                vshard: v,
                watermark: Some(12),
                above: None,
                forget: vec![11, 12]
            }
        );
        // In order: no records above.
        r.push(work(13, "u", 5, "m13"), t0);
        assert_eq!(
            r.decided(v, 13),
            InboxMark {
                vshard: v,
                watermark: Some(13),
                above: None,
                forget: vec![]
            }
        );
    }
}
