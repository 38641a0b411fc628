//! Slots and subjects: how customers map onto the units nodes own, and
//! the JetStream subjects each unit's events and commits go to.
//!
//! A customer's virtual shard ([`crate::store::vshard_of`], 1024 of them,
//! fixed forever) is the unit of state; slots group virtual shards for
//! ownership: slot = vshard mod slots. Customer ids can contain `.`, `*`
//! and `>`, so they never appear in a subject: the subject carries the
//! slot and the virtual shard, computed at ingest.

use crate::store::{vshard_of, VSHARDS};

/// The cluster's slot layout and subject names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    slots: u16,
    prefix: String,
}

impl Layout {
    /// `slots` must divide [`VSHARDS`] (the config checks it).
    pub fn new(prefix: &str, slots: u16) -> Layout {
        Layout {
            slots: slots.max(1),
            prefix: prefix.to_owned(),
        }
    }

    pub fn slots(&self) -> u16 {
        self.slots
    }

    /// The slot that owns virtual shard `vshard`.
    pub fn slot_of_vshard(&self, vshard: usize) -> u16 {
        (vshard % usize::from(self.slots)) as u16
    }

    /// The slot of `customer`, with its virtual shard.
    pub fn place(&self, customer: &str) -> (u16, usize) {
        let v = vshard_of(customer);
        (self.slot_of_vshard(v), v)
    }

    /// The virtual shards of `slot`, in order.
    pub fn vshards(&self, slot: u16) -> impl Iterator<Item = usize> {
        (usize::from(slot)..VSHARDS).step_by(usize::from(self.slots))
    }

    /// The events stream's name.
    pub fn events_stream(&self) -> String {
        format!("{}_events", self.prefix)
    }

    /// The commit log stream's name.
    pub fn log_stream(&self) -> String {
        format!("{}_log", self.prefix)
    }

    /// Where an event of `customer` is published: `<prefix>.ev.<slot>.<vshard>`.
    pub fn event_subject(&self, customer: &str) -> String {
        let (slot, v) = self.place(customer);
        self.vshard_events(slot, v)
    }

    /// The subject of virtual shard `v`'s events (in `slot`).
    pub fn vshard_events(&self, slot: u16, v: usize) -> String {
        format!("{}.ev.{slot}.{v}", self.prefix)
    }

    /// Every event subject of `slot` (a consumer's filter).
    pub fn slot_events(&self, slot: u16) -> String {
        format!("{}.ev.{slot}.*", self.prefix)
    }

    /// The events stream's subjects.
    pub fn all_events(&self) -> String {
        format!("{}.ev.>", self.prefix)
    }

    /// Where claims of `slot` go: the last message on it is the current
    /// epoch.
    pub fn epoch_subject(&self, slot: u16) -> String {
        format!("{}.log.{slot}.epoch", self.prefix)
    }

    /// Where the commits of `slot` go.
    pub fn commit_subject(&self, slot: u16) -> String {
        format!("{}.log.{slot}.commit", self.prefix)
    }

    /// Where `slot`'s snapshot pointers go: the last message on it names
    /// the slot's latest snapshot.
    pub fn snapshot_subject(&self, slot: u16) -> String {
        format!("{}.log.{slot}.snap", self.prefix)
    }

    /// The object store of slot snapshots.
    pub fn snapshot_bucket(&self) -> String {
        format!("{}_snapshots", self.prefix)
    }

    /// The commit log stream's subjects.
    pub fn all_log(&self) -> String {
        format!("{}.log.>", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vshard_is_in_exactly_one_slot() {
        let l = Layout::new("nudge", 64);
        let mut seen = vec![0; VSHARDS];
        for slot in 0..64 {
            let vs: Vec<_> = l.vshards(slot).collect();
            assert_eq!(vs.len(), VSHARDS / 64);
            for v in vs {
                assert_eq!(l.slot_of_vshard(v), slot);
                seen[v] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn subjects_never_carry_the_customer_id() {
        let l = Layout::new("nudge", 16);
        for id in ["a.b", "x*y", "z>", "plain", "ünï", ""] {
            let s = l.event_subject(id);
            let tokens: Vec<&str> = s.split('.').collect();
            assert_eq!(tokens.len(), 4, "{s}");
            let (slot, v) = l.place(id);
            assert_eq!(tokens[2], slot.to_string());
            assert_eq!(tokens[3], v.to_string());
            assert_eq!(v, vshard_of(id));
        }
    }
}
