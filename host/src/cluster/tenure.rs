//! Which slots this node decides right now, as the workers see it.
//!
//! Each time the node takes a slot it opens a new **tenure** (a number
//! never used before in this process); events read for the slot carry it
//! ([`crate::inbox::Work::tenure`]), and a worker decides an event only
//! while its tenure is the slot's current one. When the node gives a slot
//! up (the slot map moved it, or a commit was fenced) the tenure ends at
//! once, so workers drop what they hold of it, even events read before.
//!
//! Before the store's copy of a slot changes under the workers (catching
//! up, or discarding what a fenced owner had pending) the node waits for
//! every worker to have passed the top of its loop since the tenure ended
//! ([`Tenures::settled`]): from then on none is still deciding for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The current tenure of every slot, and what each worker has seen.
pub struct Tenures {
    current: Vec<AtomicU64>,
    next: AtomicU64,
    /// Bumped at every change of `current`.
    version: AtomicU64,
    /// Per worker: the version at the top of its loop.
    seen: Vec<AtomicU64>,
}

impl Tenures {
    pub fn new(slots: u16, workers: usize) -> Tenures {
        Tenures {
            current: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicU64::new(1),
            version: AtomicU64::new(0),
            seen: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn slots(&self) -> u16 {
        self.current.len() as u16
    }

    /// The worker that decides `slot`'s customers.
    pub fn worker_of(&self, slot: u16) -> usize {
        usize::from(slot) % self.seen.len()
    }

    /// The slot's current tenure; 0 when this node does not hold it.
    pub fn current(&self, slot: u16) -> u64 {
        self.current
            .get(usize::from(slot))
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// Whether `tenure` of `slot` is still current.
    pub fn holds(&self, slot: u16, tenure: u64) -> bool {
        tenure != 0 && self.current(slot) == tenure
    }

    /// The slots this node holds, in order.
    pub fn held(&self) -> Vec<u16> {
        (0..self.slots())
            .filter(|s| self.current(*s) != 0)
            .collect()
    }

    /// Opens a new tenure of `slot` and returns it.
    pub fn begin(&self, slot: u16) -> u64 {
        let t = self.next.fetch_add(1, Ordering::SeqCst);
        if let Some(c) = self.current.get(usize::from(slot)) {
            c.store(t, Ordering::SeqCst);
        }
        self.version.fetch_add(1, Ordering::SeqCst);
        t
    }

    /// Ends `slot`'s tenure; returns the version to wait for.
    pub fn end(&self, slot: u16) -> u64 {
        if let Some(c) = self.current.get(usize::from(slot)) {
            c.store(0, Ordering::SeqCst);
        }
        self.version.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A new version with no change: to wait for every worker to pass the
    /// top of its loop from now.
    pub fn bump(&self) -> u64 {
        self.version.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A worker at the top of its loop: records the version it now works
    /// under.
    pub fn top(&self, worker: usize) {
        let v = self.version.load(Ordering::SeqCst);
        if let Some(s) = self.seen.get(worker) {
            s.store(v, Ordering::SeqCst);
        }
    }

    /// Waits until every worker has passed the top of its loop at
    /// `version` or later (at most `patience`: a worker that stopped never
    /// will). Returns whether they all did.
    pub async fn settled(&self, version: u64, patience: Duration) -> bool {
        let started = Instant::now();
        loop {
            if self
                .seen
                .iter()
                .all(|s| s.load(Ordering::SeqCst) >= version)
            {
                return true;
            }
            if started.elapsed() > patience {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_tenure_is_settled_once_every_worker_passed_the_top() {
        let t = Tenures::new(4, 2);
        let a = t.begin(1);
        assert!(t.holds(1, a));
        assert_eq!(t.held(), vec![1]);
        let v = t.end(1);
        assert!(!t.holds(1, a));
        t.top(0);
        assert!(!t.settled(v, Duration::from_millis(20)).await);
        t.top(1);
        assert!(t.settled(v, Duration::from_millis(20)).await);
        let b = t.begin(1);
        assert_ne!(a, b, "a new tenure never repeats an old one");
        assert_eq!(t.worker_of(3), 1);
    }
}
