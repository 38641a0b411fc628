//! The deliverer's window onto the outbox: the pending deliveries it holds
//! in memory, at most [`Backlog::cap`] of them, ordered by when each may
//! next be attempted.
//!
//! Every pending delivery is in the outbox on disk (`O` keys); memory holds
//! a bounded window of it, so a channel that is down for an hour, or
//! decisions that outpace delivery, grow the outbox on disk and not the
//! process. Past the cap a new entry is left on disk and the backlog is
//! *spilled*; passes over the outbox (in key order, a page at a time, from
//! a cursor) bring entries back as the window drains. A delivery backing
//! off for longer than [`HORIZON_MS`] while others wait on disk leaves the
//! window, and a delivery due now takes the place of the one due last when
//! that one backs off past it, so retries of a channel that is down do not
//! hold back the others; passes skip such entries until they are nearly
//! due. The backlog
//! is whole again after a pass over the entire outbox that found room for
//! everything due and skipped nothing.

use std::collections::{BTreeSet, HashMap};

use super::Delivery;
use crate::store::{Result, Store};

/// Deliveries due later than this (ms) are not brought back from disk, and
/// leave the window when it is spilled.
pub const HORIZON_MS: i64 = 5_000;

/// Outbox entries read per page of a pass.
const PAGE: usize = 512;

/// Bytes a pending delivery takes in memory, for sizing the window: its
/// strings, the treatment's JSON and the maps' entries.
pub const ENTRY_BYTES: usize = 2048;

pub struct Backlog {
    cap: usize,
    /// Pending deliveries by id.
    pending: HashMap<String, Delivery>,
    /// (not before, id) of every pending delivery: the next due is first.
    schedule: BTreeSet<(i64, String)>,
    /// Some outbox entries are on disk only.
    spilled: bool,
    /// Where the current pass over the outbox goes on: after a key, or at
    /// it (`true`); `None`: the next pass starts at the beginning.
    cursor: Option<(Vec<u8>, bool)>,
    /// Nothing was left behind since the current pass began.
    clean: bool,
    /// The earliest `next_at` a pass skipped as not yet due.
    skipped_due: i64,
    /// No pass before this (ms): nothing on disk is due earlier.
    next_pass: i64,
}

impl Backlog {
    /// A window of at most `cap` deliveries (at least 16).
    pub fn new(cap: usize) -> Backlog {
        Backlog {
            cap: cap.max(16),
            pending: HashMap::new(),
            schedule: BTreeSet::new(),
            spilled: false,
            cursor: None,
            clean: true,
            skipped_due: i64::MAX,
            next_pass: i64::MIN,
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Deliveries held in memory.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether some pending deliveries are on disk only.
    pub fn spilled(&self) -> bool {
        self.spilled
    }

    /// Adds or replaces a pending delivery that is in the outbox on disk.
    /// A new one past the cap takes the place of the delivery due last if
    /// that one is not due before `now` + [`HORIZON_MS`] (it waits on disk
    /// instead), and otherwise stays on disk itself: a window full of
    /// retries backing off never holds back deliveries due now.
    pub fn offer(&mut self, d: Delivery, now: i64) {
        if let Some(old) = self.pending.get(&d.id) {
            self.schedule.remove(&(old.next_at, old.id.clone()));
        } else if self.pending.len() >= self.cap {
            let latest = self.schedule.last().cloned();
            match latest {
                Some((at, id)) if at > now + HORIZON_MS && at > d.next_at => {
                    self.set_aside(&id, at);
                }
                _ => {
                    self.left_on_disk();
                    return;
                }
            }
        }
        self.schedule.insert((d.next_at, d.id.clone()));
        self.pending.insert(d.id.clone(), d);
    }

    /// Puts back a delivery just attempted, to be tried again at its
    /// `next_at` (already written to the outbox). While others wait on
    /// disk, one that is not due soon waits there too.
    pub fn retry(&mut self, d: Delivery, now: i64) {
        if self.spilled && d.next_at > now + HORIZON_MS {
            self.set_aside(&d.id, d.next_at);
            return;
        }
        self.offer(d, now);
    }

    /// Leaves delivery `id`, not due before `next_at`, to wait on disk: a
    /// pass brings it back when it is nearly due.
    fn set_aside(&mut self, id: &str, next_at: i64) {
        self.remove(id);
        self.spilled = true;
        self.clean = false;
        self.next_pass = self.next_pass.min(next_at - HORIZON_MS);
    }

    /// Forgets a delivery (done, dead-lettered, or left on disk).
    pub fn remove(&mut self, id: &str) {
        if let Some(d) = self.pending.remove(id) {
            self.schedule.remove(&(d.next_at, d.id));
        }
    }

    /// A delivery due now stays on disk: a pass as soon as there is room.
    fn left_on_disk(&mut self) {
        self.spilled = true;
        self.clean = false;
        self.next_pass = i64::MIN;
    }

    /// After a restart: the outbox is on disk only.
    pub fn resume(&mut self) {
        self.left_on_disk();
    }

    /// When the next delivery in memory is due.
    pub fn next_due(&self) -> Option<i64> {
        self.schedule.first().map(|(t, _)| *t)
    }

    /// Takes the next delivery due by `now` off the schedule (it stays
    /// pending until [`Backlog::remove`] or a new `offer`/`retry`).
    pub fn pop_due(&mut self, now: i64) -> Option<Delivery> {
        loop {
            match self.schedule.first() {
                Some((t, _)) if *t <= now => {}
                _ => return None,
            }
            let (_, id) = self.schedule.pop_first()?;
            if let Some(d) = self.pending.get(&id) {
                return Some(d.clone());
            }
        }
    }

    /// When a pass over the outbox is next worth making: while entries
    /// wait on disk and the window has room for many.
    pub fn pass_at(&self) -> Option<i64> {
        (self.spilled && self.pending.len() < self.cap / 2).then_some(self.next_pass)
    }

    /// Brings outbox entries back into the window, from the cursor on,
    /// until it is full or the outbox ends; returns how many. `parse`
    /// reads an entry (`None`: unreadable, skipped and logged by it).
    pub fn refill(
        &mut self,
        store: &Store,
        now: i64,
        parse: impl Fn(&[u8]) -> Option<Delivery>,
    ) -> Result<usize> {
        // What a pass reads must be durable: the persister writes its
        // batch to sled before it flushes it, and a delivery must never
        // go out for a decision a crash could still lose.
        store.sync()?;
        let mut added = 0;
        loop {
            if self.cursor.is_none() {
                // A pass begins.
                self.clean = true;
                self.skipped_due = i64::MAX;
                self.next_pass = i64::MAX;
            }
            let from = self.cursor.as_ref().map(|(k, at)| (k.as_slice(), *at));
            let page = store.outbox_page(from, PAGE)?;
            let Some((last, _)) = page.last() else {
                // The pass is over.
                self.cursor = None;
                if self.clean {
                    self.spilled = false;
                } else {
                    // Again when the earliest entry skipped is nearly due
                    // (sooner if one is left on disk meanwhile).
                    let skipped = self.skipped_due.saturating_sub(HORIZON_MS).max(now + 100);
                    self.next_pass = self.next_pass.min(skipped);
                }
                return Ok(added);
            };
            self.cursor = Some((last.clone(), false));
            for (key, value) in &page {
                let id = String::from_utf8_lossy(key.get(1..).unwrap_or_default());
                if self.pending.contains_key(id.as_ref()) {
                    continue;
                }
                let Some(d) = parse(value) else { continue };
                if d.next_at > now + HORIZON_MS {
                    self.clean = false;
                    self.skipped_due = self.skipped_due.min(d.next_at);
                    continue;
                }
                if self.pending.len() >= self.cap {
                    // Full: this pass goes on from here next time, and
                    // this entry is read again then.
                    self.clean = false;
                    self.cursor = Some((key.clone(), true));
                    self.next_pass = i64::MIN;
                    return Ok(added);
                }
                self.offer(d, now);
                added += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Changes;
    use std::collections::HashSet;

    fn delivery(n: usize, next_at: i64) -> Delivery {
        Delivery {
            id: format!("nd-{n:04}"),
            customer: format!("c{n}"),
            campaign: "camp".into(),
            channel: "email".into(),
            plugin: "email".into(),
            ts: 0,
            trigger: format!("m{n}"),
            why: String::new(),
            expires_at: None,
            late_ms: None,
            treatment: Default::default(),
            recipient: Default::default(),
            attempts: 0,
            next_at,
            last_error: None,
            failed_at: None,
        }
    }

    fn parse(bytes: &[u8]) -> Option<Delivery> {
        serde_json::from_slice(bytes).ok()
    }

    /// Writes deliveries to the outbox as the workers do, durably.
    fn enqueue(store: &Store, ds: &[Delivery]) {
        let mut c = Changes::new();
        for d in ds {
            c.outbox(&d.id, d.to_json());
        }
        store.commit(c);
        store.flush().unwrap();
    }

    /// Delivers everything due in the window; returns the ids.
    fn deliver_due(store: &Store, b: &mut Backlog, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = b.pop_due(now) {
            store.outbox_done(&d.id, None, None).unwrap();
            b.remove(&d.id);
            out.push(d.id);
        }
        out
    }

    #[test]
    fn a_backlog_past_the_window_waits_on_disk_and_every_delivery_goes_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = 1_000_000;
        enqueue(
            &store,
            &(0..100).map(|n| delivery(n, 0)).collect::<Vec<_>>(),
        );
        let mut b = Backlog::new(16);
        b.resume();
        let mut delivered = Vec::new();
        let mut rounds = 0;
        while b.spilled() || !b.is_empty() {
            if b.pass_at().is_some_and(|t| t <= now) {
                b.refill(&store, now, parse).unwrap();
            }
            assert!(b.len() <= 16, "window holds {}", b.len());
            // New deliveries keep arriving while it catches up; the ones
            // past the window stay on disk.
            if rounds < 5 {
                let fresh: Vec<_> = (0..10)
                    .map(|n| delivery(1000 + rounds * 10 + n, 0))
                    .collect();
                enqueue(&store, &fresh);
                for d in fresh {
                    b.offer(d, now);
                }
                assert!(b.len() <= 16);
            }
            delivered.extend(deliver_due(&store, &mut b, now));
            rounds += 1;
            assert!(rounds < 100, "never caught up");
        }
        let unique: HashSet<_> = delivered.iter().collect();
        assert_eq!(delivered.len(), 150, "every delivery once");
        assert_eq!(unique.len(), 150);
        assert!(store.outbox_page(None, 10).unwrap().is_empty());
    }

    #[test]
    fn retries_of_a_channel_that_is_down_leave_room_for_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = 1_000_000;
        // 16 failing deliveries fill the window; 20 more wait on disk.
        enqueue(&store, &(0..36).map(|n| delivery(n, 0)).collect::<Vec<_>>());
        let mut b = Backlog::new(16);
        b.resume();
        b.refill(&store, now, parse).unwrap();
        assert_eq!((b.len(), b.spilled()), (16, true));
        while let Some(mut d) = b.pop_due(now) {
            // The attempt failed: back off a minute, on disk first.
            d.next_at = now + 60_000;
            d.attempts = 1;
            store.outbox_update(&d.id, &d.to_json(), None).unwrap();
            b.retry(d, now);
        }
        assert!(b.is_empty(), "backing-off deliveries left the window");
        assert_eq!(b.pass_at(), Some(i64::MIN), "the others are due now");
        b.refill(&store, now, parse).unwrap();
        let others = deliver_due(&store, &mut b, now);
        assert_eq!(others.len(), 16);
        b.refill(&store, now, parse).unwrap();
        let rest = deliver_due(&store, &mut b, now);
        assert_eq!(rest.len(), 4);
        // Only the backing-off ones are left, not due: no pass until they
        // nearly are, and then they come back.
        b.refill(&store, now, parse).unwrap();
        assert!(b.is_empty() && b.spilled());
        assert_eq!(b.pass_at(), Some(now + 60_000 - HORIZON_MS));
        let later = now + 60_000;
        b.refill(&store, later, parse).unwrap();
        assert_eq!(deliver_due(&store, &mut b, later).len(), 16);
        assert!(!b.spilled());
    }

    #[test]
    fn deliveries_due_now_displace_retries_backing_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = 1_000_000;
        // The window fills with retries backing off ten minutes (a channel
        // that is down), before anything was spilled.
        let mut b = Backlog::new(16);
        let retrying: Vec<_> = (0..16).map(|n| delivery(n, now + 600_000)).collect();
        enqueue(&store, &retrying);
        for d in retrying {
            b.offer(d, now);
        }
        assert!(!b.spilled());
        // Deliveries due now arrive: each takes a backing-off one's place.
        let fresh: Vec<_> = (100..110).map(|n| delivery(n, 0)).collect();
        enqueue(&store, &fresh);
        for d in fresh {
            b.offer(d, now);
        }
        assert_eq!(b.len(), 16);
        assert!(b.spilled(), "the displaced ones wait on disk");
        assert_eq!(deliver_due(&store, &mut b, now).len(), 10);
        // The displaced retries come back when nearly due, and go once.
        let later = now + 600_000;
        assert!(b.pass_at().is_some_and(|t| t <= later));
        b.refill(&store, later, parse).unwrap();
        assert_eq!(deliver_due(&store, &mut b, later).len(), 16);
        assert!(store.outbox_page(None, 100).unwrap().is_empty());
    }
}
