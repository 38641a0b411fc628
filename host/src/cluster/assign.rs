//! The slot map and how the assigner changes it.
//!
//! One node at a time is the assigner: it holds a lease (a key with a
//! time to live in the `<prefix>_lease` bucket, renewed like a
//! membership). It reads the live members and the map, and writes the
//! map's next version with a compare-and-set on its revision, so two
//! assigners (one of them stale) can never both write.
//!
//! [`plan`] is the whole policy, and pure:
//! - a slot whose owner is not a live member goes to the live member with
//!   the fewest slots (all such slots at once: nobody decides them);
//! - otherwise, when the counts differ by more than one, **one** slot
//!   moves from the most loaded member to the least loaded, and only once
//!   every slot's epoch shows the owner the map names (the previous move
//!   is done). So a node that joins takes its share one slot at a time,
//!   each a short pause of one slot rather than of many.
//!
//! The map says who should own a slot; it never makes anyone the owner.
//! Only a claim of the slot's epoch does, and only the current epoch can
//! commit (`log.rs`), so a map read late or two maps briefly disagreeing
//! cost a refused commit, never a decision made twice.

use serde::{Deserialize, Serialize};

/// Who should own each slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMap {
    /// Index: slot.
    pub owners: Vec<Option<String>>,
}

impl SlotMap {
    /// The number of slots each member is given.
    pub fn load(&self, member: &str) -> usize {
        self.owners
            .iter()
            .filter(|o| o.as_deref() == Some(member))
            .count()
    }
}

/// The next map for `live` members (names), from `current` with `slots`
/// slots. `settled`: every slot's epoch is held by the owner `current`
/// names (a rebalancing move may start).
pub fn plan(current: &SlotMap, slots: u16, live: &[String], settled: bool) -> SlotMap {
    let mut owners: Vec<Option<String>> = (0..usize::from(slots))
        .map(|s| current.owners.get(s).cloned().flatten())
        .collect();
    if live.is_empty() {
        return SlotMap { owners };
    }
    let mut members: Vec<&String> = live.iter().collect();
    members.sort();
    members.dedup();
    let load = |owners: &[Option<String>], m: &str| {
        owners.iter().filter(|o| o.as_deref() == Some(m)).count()
    };
    let mut changed = false;
    for o in owners.iter_mut() {
        if o.as_ref().is_some_and(|name| !members.contains(&name)) {
            *o = None;
            changed = true;
        }
    }
    for s in 0..owners.len() {
        if owners[s].is_none() {
            let least = members
                .iter()
                .min_by_key(|m| (load(&owners, m), **m))
                .map(|m| (*m).clone());
            owners[s] = least;
            changed = true;
        }
    }
    if !changed && settled {
        let most = members
            .iter()
            .max_by_key(|m| (load(&owners, m), std::cmp::Reverse(**m)))
            .copied();
        let least = members
            .iter()
            .min_by_key(|m| (load(&owners, m), **m))
            .copied();
        if let (Some(most), Some(least)) = (most, least) {
            if load(&owners, most) > load(&owners, least) + 1 {
                // The most loaded member's last slot moves.
                if let Some(s) = owners
                    .iter()
                    .rposition(|o| o.as_deref() == Some(most.as_str()))
                {
                    owners[s] = Some((*least).clone());
                }
            }
        }
    }
    SlotMap { owners }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unowned_slots_are_spread_at_once_and_a_joiner_gets_one_slot_per_settled_round() {
        let empty = SlotMap::default();
        let m = plan(&empty, 8, &names(&["a"]), true);
        assert_eq!(m.load("a"), 8);
        // b joins: nothing moves until the previous move is done.
        let live = names(&["a", "b"]);
        assert_eq!(plan(&m, 8, &live, false), m);
        let mut cur = m;
        let mut rounds = 0;
        loop {
            let next = plan(&cur, 8, &live, true);
            if next == cur {
                break;
            }
            let moved = next
                .owners
                .iter()
                .zip(&cur.owners)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(moved, 1, "one slot per round");
            cur = next;
            rounds += 1;
        }
        assert_eq!(rounds, 4);
        assert_eq!((cur.load("a"), cur.load("b")), (4, 4));
        // a dies: all its slots go to b at once, settled or not.
        let after = plan(&cur, 8, &names(&["b"]), false);
        assert_eq!(after.load("b"), 8);
        // Three members, ten slots: counts within one of each other.
        let three = names(&["a", "b", "c"]);
        let mut m = plan(&SlotMap::default(), 10, &three, true);
        for _ in 0..20 {
            m = plan(&m, 10, &three, true);
        }
        let mut loads: Vec<usize> = three.iter().map(|n| m.load(n)).collect();
        loads.sort();
        assert_eq!(loads, vec![3, 3, 4]);
    }
}
