//! One worker shard's timer queue, held in memory up to a byte budget.
//!
//! The queue's keys sort by (due, customer, plugin, key), so the next due
//! timer is the first key. Within its budget the queue holds every pending
//! timer of the shard; past it, only a prefix: the earliest timers, all of
//! them up to a `horizon` key. Later ones live only in the store's pending
//! layers and sled, and are read back ([`TimerQueue::refill`]) when the
//! prefix has drained. So memory is bounded whatever the number of pending
//! timers (a million customers with a reminder each), and the common case,
//! a queue that fits, never reads sled.

use std::collections::BTreeMap;

/// What one entry costs besides its key and value: the B-tree node slot
/// and two vector headers.
const ENTRY_OVERHEAD: usize = 64;

/// What one timer costs the queue's budget.
pub(super) fn cost(k: &[u8], v: &[u8]) -> usize {
    k.len() + v.len() + ENTRY_OVERHEAD
}

#[derive(Clone, Debug)]
pub(super) struct TimerQueue {
    mem: BTreeMap<Vec<u8>, Vec<u8>>,
    bytes: usize,
    budget: usize,
    /// `None`: `mem` holds every pending timer of the shard. `Some(h)`:
    /// it holds every one whose key is at most `h`; later ones may exist
    /// outside it.
    horizon: Option<Vec<u8>>,
}

impl TimerQueue {
    pub(super) fn new(budget: usize) -> TimerQueue {
        TimerQueue {
            mem: BTreeMap::new(),
            bytes: 0,
            budget,
            horizon: None,
        }
    }

    /// A queue that holds nothing yet and reads every timer back when
    /// first looked at (a slot taken over: sled has its timers).
    pub(super) fn unloaded(budget: usize) -> TimerQueue {
        TimerQueue {
            horizon: Some(b"T".to_vec()),
            ..TimerQueue::new(budget)
        }
    }

    /// Whether `mem` is authoritative for `k`: a timer with that key, if
    /// any, is in it.
    fn covers(&self, k: &[u8]) -> bool {
        self.horizon.as_deref().is_none_or(|h| k <= h)
    }

    /// Adds or replaces a pending timer. Returns true when the key is
    /// known not to have existed before (nowhere in the store), which lets
    /// the caller skip writing a timer that is removed before it persists.
    pub(super) fn insert(&mut self, k: Vec<u8>, v: Vec<u8>) -> bool {
        if !self.covers(&k) {
            return false;
        }
        self.bytes += cost(&k, &v);
        let new = match self.mem.insert(k.clone(), v) {
            Some(old) => {
                self.bytes -= cost(&k, &old);
                false
            }
            None => true,
        };
        self.shrink();
        new
    }

    pub(super) fn remove(&mut self, k: &[u8]) {
        if let Some(v) = self.mem.remove(k) {
            self.bytes -= cost(k, &v);
        }
    }

    /// Drops the latest timers from memory until within budget (always
    /// keeping one, so the queue can make progress).
    fn shrink(&mut self) {
        while self.bytes > self.budget && self.mem.len() > 1 {
            if let Some((k, v)) = self.mem.pop_last() {
                self.bytes -= cost(&k, &v);
            }
            self.horizon = self.mem.last_key_value().map(|(k, _)| k.clone());
        }
    }

    /// The earliest pending timer, unless memory has drained and the rest
    /// must be read back first ([`TimerQueue::needs_refill`]).
    pub(super) fn first(&self) -> Option<(&Vec<u8>, &Vec<u8>)> {
        self.mem.first_key_value()
    }

    pub(super) fn needs_refill(&self) -> bool {
        self.mem.is_empty() && self.horizon.is_some()
    }

    /// The key after which timers must be read back.
    pub(super) fn horizon(&self) -> Option<&[u8]> {
        self.horizon.as_deref()
    }

    /// Loads the earliest timers after the horizon, from `later`: the
    /// pending timers of the shard with a key past the horizon, in key
    /// order, all of them if `complete`, else the first of them. Takes as
    /// many as the budget holds.
    pub(super) fn refill(
        &mut self,
        later: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
        complete: bool,
    ) {
        self.horizon = None;
        for (k, v) in later {
            let c = cost(&k, &v);
            if !self.mem.is_empty() && self.bytes + c > self.budget {
                self.horizon = self.mem.last_key_value().map(|(k, _)| k.clone());
                return;
            }
            self.bytes += c;
            self.mem.insert(k, v);
        }
        if !complete {
            self.horizon = self.mem.last_key_value().map(|(k, _)| k.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Vec<u8> {
        vec![b'T', n]
    }

    #[test]
    fn past_its_budget_the_queue_keeps_the_earliest_and_knows_what_it_dropped() {
        let mut q = TimerQueue::new(3 * cost(&key(0), b"v"));
        for n in [5, 1, 4, 2, 3] {
            assert!(q.insert(key(n), b"v".to_vec()), "{n} is new");
        }
        // 1, 2, 3 fit; 4 and 5 were dropped after being inserted.
        assert_eq!(
            q.mem.keys().cloned().collect::<Vec<_>>(),
            vec![key(1), key(2), key(3)]
        );
        assert_eq!(q.horizon(), Some(&key(3)[..]));
        // A key past the horizon is not held and not known new.
        assert!(!q.insert(key(6), b"v".to_vec()));
        assert_eq!(q.mem.len(), 3);
        // Replacing a held key is not new.
        assert!(!q.insert(key(2), b"v".to_vec()));
        for n in [1, 2, 3] {
            assert_eq!(q.first().map(|(k, _)| k.clone()), Some(key(n)));
            q.remove(&key(n));
        }
        assert!(q.needs_refill());
        q.refill([4, 5, 6].into_iter().map(|n| (key(n), b"v".to_vec())), true);
        assert!(!q.needs_refill());
        assert_eq!(q.horizon(), None, "everything fit");
        assert_eq!(q.first().map(|(k, _)| k.clone()), Some(key(4)));
        assert_eq!(q.bytes, 3 * cost(&key(0), b"v"));
    }

    #[test]
    fn one_timer_is_held_whatever_the_budget() {
        let mut q = TimerQueue::new(0);
        q.insert(key(2), b"v".to_vec());
        q.insert(key(1), b"v".to_vec());
        assert_eq!(q.mem.len(), 1);
        assert_eq!(q.first().map(|(k, _)| k.clone()), Some(key(1)));
        q.remove(&key(1));
        q.refill([2, 3].into_iter().map(|n| (key(n), b"v".to_vec())), true);
        assert_eq!(q.first().map(|(k, _)| k.clone()), Some(key(2)));
        assert_eq!(q.horizon(), Some(&key(2)[..]));
        // Handed only the first of what is left: the rest is past the
        // horizon even though all it was given fit.
        let mut q = TimerQueue::new(1 << 20);
        q.horizon = Some(key(0));
        q.refill([1, 2].into_iter().map(|n| (key(n), b"v".to_vec())), false);
        assert_eq!(q.horizon(), Some(&key(2)[..]));
    }
}
