//! The store as a cluster node's materialised copy of the slots it owns.
//!
//! In a cluster every change of a slot's state reaches this store only
//! through the slot's commit log: [`Store::persist_gated`] hands the
//! changes committed since the last persist to the caller, grouped by slot
//! ([`slot_of_key`]), and writes to sled only those of the slots whose
//! commit JetStream accepted, with each slot's log position (`S` slot →
//! sequence of its last commit applied here). Changes of a slot whose
//! commit was refused (this node was fenced) are dropped, never written.
//! A node taking a slot over applies the commits above its position
//! ([`Store::apply_commit`]) before it decides anything of that slot.
//!
//! Writers that go to sled directly (the deliverer marking a delivery
//! done, an agent's answer) keep doing so, and their slot-bound writes
//! are also journalled here to ride in the slot's next commit, so that a
//! new owner does not send again what was delivered.
//!
//! | key | value |
//! |---|---|
//! | `S` slot | sequence in the commit log of the slot's last commit applied here (node-local) |
//! | `N` vshard messageId | when the event was decided (ms): repeats past JetStream's two-minute window are not decided again; kept for `[ingest] dedupe_window` |
//!
//! Keys without a slot (operator metadata, the format, the deliverer's
//! and agents' tallies, which are per node) stay local to the node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::{entry_cost, queue::TimerQueue, reclaim, KeyValues, Persisted, Result, Store};
use super::{StoreError, VSHARDS};

/// A key and its new value (`None`: deleted).
pub type Op = (Vec<u8>, Option<Vec<u8>>);

/// What the store keeps for the cluster.
pub(super) struct Side {
    slots: u16,
    /// Direct writes of slot-bound keys since the last persist, in order.
    journal: Mutex<Vec<(u16, Op)>>,
}

pub(super) fn applied_key(slot: u16) -> [u8; 3] {
    let s = slot.to_be_bytes();
    [b'S', s[0], s[1]]
}

/// The customer id at the start of `rest`, up to its NUL.
fn customer_in(rest: &[u8]) -> Option<&str> {
    let end = rest.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

pub(super) fn slot_of_customer(customer: &str, slots: u16) -> u16 {
    (super::vshard_of(customer) % usize::from(slots.max(1))) as u16
}

/// The slot whose state key `k` is, if it is a slot's (`v`: its value,
/// which names the customer of an outbox entry or dead letter); `None`:
/// the key is the node's own. Tallies and ledger clocks belong to the slot
/// their writer id names (a cluster's workers write as their slot).
pub fn slot_of_key(k: &[u8], v: Option<&[u8]>, slots: u16) -> Option<u16> {
    let slots_usize = usize::from(slots.max(1));
    let vshard = |b: &[u8]| -> Option<u16> {
        let v = usize::from(u16::from_be_bytes(b.get(..2)?.try_into().ok()?));
        (v < VSHARDS).then_some((v % slots_usize) as u16)
    };
    let writer = |b: &[u8]| -> Option<u16> {
        let w = u16::from_be_bytes(b.try_into().ok()?);
        (w < slots).then_some(w)
    };
    match k.first()? {
        b'c' | b'A' => Some(slot_of_customer(customer_in(k.get(1..)?)?, slots)),
        b'T' | b'D' | b'V' => Some(slot_of_customer(customer_in(k.get(9..)?)?, slots)),
        b'W' | b'X' | b'N' => vshard(k.get(1..)?),
        b'O' | b'L' => {
            #[derive(serde::Deserialize)]
            struct Owner {
                customer: String,
            }
            let o: Owner = serde_json::from_slice(v?).ok()?;
            Some(slot_of_customer(&o.customer, slots))
        }
        b'R' => writer(k.get(k.len().checked_sub(2)?..)?),
        b'Q' => writer(k.get(1..3)?),
        _ => None,
    }
}

/// Packs `ops` into records of at most about `max` bytes each (an op
/// larger than that gets a record of its own). Each record decodes alone.
pub fn encode_ops<'a>(ops: impl IntoIterator<Item = &'a Op>, max: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    for (k, v) in ops {
        let size = 9 + k.len() + v.as_ref().map_or(0, Vec::len);
        if !cur.is_empty() && cur.len() + size > max {
            out.push(std::mem::take(&mut cur));
        }
        put_op(&mut cur, k, v.as_deref());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Appends one op as [`encode_ops`] writes it: key length (u32), key, 1
/// and value length (u32) and value, or 0 for a deletion.
pub(super) fn put_op(out: &mut Vec<u8>, k: &[u8], v: Option<&[u8]>) {
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(k);
    match v {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        None => out.push(0),
    }
}

/// The ops of one record; `None` if it is not one [`encode_ops`] wrote.
pub fn decode_ops(mut b: &[u8]) -> Option<Vec<Op>> {
    let mut out = Vec::new();
    let take = |b: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head.to_vec())
    };
    while !b.is_empty() {
        let klen = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
        let k = take(&mut b, klen)?;
        let present = take(&mut b, 1)?;
        let v = match present[0] {
            1 => {
                let vlen = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
                Some(take(&mut b, vlen)?)
            }
            0 => None,
            _ => return None,
        };
        out.push((k, v));
    }
    Some(out)
}

/// The slots whose commits the log accepted in one persist, with the
/// sequence of each commit's last record (`None`: it was a retry the log
/// had already stored).
pub type Admitted = HashMap<u16, Option<u64>>;

/// What the commit log did with a persist's changes: the slots whose
/// commits it stored, and those to try again (their changes stay
/// pending). Changes of any other slot are dropped: the node does not
/// hold it.
#[derive(Debug, Default)]
pub struct Admission {
    pub admitted: Admitted,
    pub retry: std::collections::HashSet<u16>,
}

/// Virtual shards' inbox watermarks, and the events decided above them:
/// (virtual shard, seq).
pub type Marks = (HashMap<usize, u64>, Vec<(usize, u64)>);

impl Store {
    /// Makes this store a cluster node's copy of `slots` slots: from now
    /// on, writes reach sled only through [`Store::persist_gated`].
    pub fn join_cluster(&self, slots: u16) {
        let _ = self.side.set(Side {
            slots,
            journal: Mutex::new(Vec::new()),
        });
    }

    /// The number of slots, in a cluster.
    pub fn cluster_slots(&self) -> Option<u16> {
        self.side.get().map(|s| s.slots)
    }

    /// Records direct writes that belong to a slot, to ride in its next
    /// commit. `current`: the value a deleted key had, for its slot.
    pub(super) fn journal(&self, ops: &[Op]) {
        let Some(side) = self.side.get() else {
            return;
        };
        let mut journal = side.journal.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in ops {
            let found = match v {
                Some(v) => slot_of_key(k, Some(v), side.slots),
                None => match slot_of_key(k, None, side.slots) {
                    Some(s) => Some(s),
                    // An outbox entry or dead letter being removed: its
                    // value (still in sled) names the customer.
                    None => self
                        .db
                        .get(k)
                        .ok()
                        .flatten()
                        .and_then(|old| slot_of_key(k, Some(&old), side.slots)),
                },
            };
            if let Some(slot) = found {
                journal.push((slot, (k.clone(), v.clone())));
            }
        }
    }

    /// Persists through the commit log: everything committed since the
    /// last persist, and the journal, grouped by slot, go to `log`, which
    /// returns the slots whose commits JetStream accepted. Their changes,
    /// the node-local ones and each accepted slot's log position are then
    /// written to sled as one batch; the changes of other slots are
    /// dropped. If `log` fails, nothing is written or lost: the changes are
    /// persisted with the next call. Calls must not overlap.
    pub fn persist_gated(
        &self,
        log: impl FnOnce(&BTreeMap<u16, Vec<Op>>) -> std::result::Result<Admission, String>,
    ) -> Result<Persisted> {
        let Some(side) = self.side.get() else {
            return self.persist();
        };
        let journal = std::mem::take(&mut *side.journal.lock().unwrap_or_else(|e| e.into_inner()));
        let dirty = {
            let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
            let mut pending = self.lock();
            if pending.dirty.is_empty() && journal.is_empty() {
                return Ok(Persisted::default());
            }
            let dirty = std::sync::Arc::new(std::mem::take(&mut pending.dirty));
            pending.dirty_bytes = 0;
            pending.persisting = Some(dirty.clone());
            pending.fresh.clear();
            dirty
        };
        // By slot: the workers' changes, then the direct writes after them
        // (a delivery is marked done only after its entry was persisted).
        let mut by_slot: BTreeMap<u16, Vec<Op>> = BTreeMap::new();
        for (k, v) in dirty.iter() {
            let slot = match v {
                Some(v) => slot_of_key(k, Some(v), side.slots),
                None => slot_of_key(k, None, side.slots).or_else(|| {
                    let old = self.db.get(k).ok().flatten()?;
                    slot_of_key(k, Some(&old), side.slots)
                }),
            };
            if let Some(s) = slot {
                by_slot.entry(s).or_default().push((k.clone(), v.clone()));
            }
        }
        // The workers' changes of each slot come first in its list.
        let from_dirty: HashMap<u16, usize> = by_slot.iter().map(|(s, o)| (*s, o.len())).collect();
        let journalled: Vec<u16> = journal.iter().map(|(s, _)| *s).collect();
        for (s, op) in journal.iter().cloned() {
            by_slot.entry(s).or_default().push(op);
        }
        let Admission { admitted, retry } = match log(&by_slot) {
            Ok(a) => a,
            Err(e) => {
                self.restore(dirty);
                let mut j = side.journal.lock().unwrap_or_else(|e| e.into_inner());
                let newer = std::mem::replace(&mut *j, journal);
                j.extend(newer);
                return Err(StoreError::Log(e));
            }
        };
        let started = std::time::Instant::now();
        let workers_ops = |pick: &dyn Fn(u16) -> bool| -> std::collections::HashSet<&[u8]> {
            by_slot
                .iter()
                .filter(|(s, _)| pick(**s))
                .flat_map(|(s, ops)| ops[..from_dirty.get(s).copied().unwrap_or(0)].iter())
                .map(|(k, _)| k.as_slice())
                .collect()
        };
        let held_back = workers_ops(&|s| retry.contains(&s));
        let dropped_keys = workers_ops(&|s| !admitted.contains_key(&s) && !retry.contains(&s));
        let kept = |k: &[u8]| !dropped_keys.contains(k) && !held_back.contains(k);
        if !retry.is_empty() {
            let again: Vec<(u16, Op)> = journal
                .iter()
                .filter(|(s, _)| retry.contains(s))
                .cloned()
                .collect();
            let mut j = side.journal.lock().unwrap_or_else(|e| e.into_inner());
            let newer = std::mem::replace(&mut *j, again);
            j.extend(newer);
        }
        let mut batch = sled::Batch::default();
        let mut keys = 0;
        for (k, v) in dirty.iter().filter(|(k, _)| kept(k)) {
            keys += 1;
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        for (slot, seq) in &admitted {
            if let Some(seq) = seq {
                batch.insert(&applied_key(*slot)[..], &seq.to_be_bytes()[..]);
            }
        }
        let dropped: Vec<u16> = by_slot
            .keys()
            .filter(|s| !admitted.contains_key(s) && !retry.contains(s))
            .copied()
            .collect();
        if !dropped.is_empty() {
            let direct = journalled.iter().filter(|s| dropped.contains(s)).count();
            tracing::warn!(slots = ?dropped, direct, "changes of slots this node does not own were dropped");
        }
        let applied = self.db.apply_batch(batch);
        reclaim(keys);
        let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.lock();
        pending.persisting = None;
        let dirty = std::sync::Arc::try_unwrap(dirty).unwrap_or_else(|shared| (*shared).clone());
        if let Err(e) = applied {
            // Committed to the log but not written here: the slots'
            // positions did not move, so taking them again re-applies
            // those commits. Until then the changes stay pending.
            drop(pending);
            self.restore(std::sync::Arc::new(dirty));
            return Err(e.into());
        }
        let mut persisted = Persisted::default();
        for (k, v) in dirty {
            if held_back.contains(k.as_slice()) {
                // Not stored by the log: pending again, under anything
                // committed since.
                let pending = &mut *pending;
                if let std::collections::hash_map::Entry::Vacant(e) = pending.dirty.entry(k) {
                    pending.dirty_bytes += entry_cost(e.key(), &v);
                    e.insert(v);
                }
            } else if kept(&k) {
                self.settle(&mut pending, &mut persisted, k, v);
            }
        }
        tracing::debug!(
            keys,
            slots = admitted.len(),
            micros = started.elapsed().as_micros() as u64,
            "persisted through the commit log"
        );
        Ok(persisted)
    }

    /// Puts changes that were not written back under what was committed
    /// since.
    fn restore(&self, dirty: std::sync::Arc<KeyValues>) {
        let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.lock();
        pending.persisting = None;
        let dirty = std::sync::Arc::try_unwrap(dirty).unwrap_or_else(|shared| (*shared).clone());
        let pending = &mut *pending;
        for (k, v) in dirty {
            if let std::collections::hash_map::Entry::Vacant(e) = pending.dirty.entry(k) {
                pending.dirty_bytes += entry_cost(e.key(), &v);
                e.insert(v);
            }
        }
    }

    /// Where this node's copy of `slot` stands in the commit log (0:
    /// nothing applied).
    pub fn applied(&self, slot: u16) -> Result<u64> {
        Ok(self
            .db
            .get(applied_key(slot))?
            .and_then(|v| v.as_ref().try_into().ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Applies one record of `slot`'s commit log, stored at `seq`, to sled,
    /// with the slot's new position, and forgets what the caches held of
    /// its keys. Only for a slot no worker is deciding (being taken over).
    pub fn apply_commit(&self, slot: u16, seq: u64, ops: &[Op]) -> Result<()> {
        let mut batch = super::batch_of(ops.iter().cloned());
        batch.insert(&applied_key(slot)[..], &seq.to_be_bytes()[..]);
        self.db.apply_batch(batch)?;
        reclaim(ops.len());
        let mut pending = self.lock();
        for (k, _) in ops {
            if let Some(old) = pending.clean.remove(k) {
                pending.clean_bytes = pending.clean_bytes.saturating_sub(entry_cost(k, &old));
            }
        }
        Ok(())
    }

    /// Forgets everything pending of `slot` (this node lost it, or is about
    /// to catch up on it) and its timer queue, which is read back from sled
    /// when next used.
    pub fn discard_slot(&self, slot: u16) {
        let Some(side) = self.side.get() else {
            return;
        };
        side.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _)| *s != slot);
        let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.lock();
        let pending = &mut *pending;
        let mut freed = 0;
        pending.dirty.retain(|k, v| {
            let s = slot_of_key(k, v.as_deref(), side.slots);
            let keep = s != Some(slot);
            if !keep {
                freed += entry_cost(k, v);
            }
            keep
        });
        pending.dirty_bytes = pending.dirty_bytes.saturating_sub(freed);
        let q = usize::from(slot);
        if q < pending.timers.len() {
            let budget = pending.budget.timers() / pending.timers.len();
            pending.timers[q] = TimerQueue::unloaded(budget);
        }
    }

    /// Whether message id `id` of `vshard` was decided (a cluster node).
    pub fn message_seen(&self, vshard: usize, id: &str) -> Result<bool> {
        // Not through the read cache: it is for customer keys, which the
        // persist keeps current; a cached absence of this key would be
        // read for ever after it was written.
        let key = super::seen_key(vshard, id);
        {
            let pending = self.lock();
            let found = pending
                .dirty
                .get(&key)
                .or_else(|| pending.persisting.as_ref().and_then(|p| p.get(&key)));
            if let Some(v) = found {
                return Ok(v.is_some());
            }
        }
        Ok(self.db.contains_key(&key)?)
    }

    /// Keys of remembered message ids decided before `before` (ms), of the
    /// virtual shards `keep` accepts, at most `limit`.
    pub fn seen_before(
        &self,
        before: i64,
        keep: impl Fn(usize) -> bool,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"N") {
            let (k, v) = kv?;
            let vshard = k.get(1..3).map_or(usize::MAX, |b| {
                usize::from(u16::from_be_bytes([b[0], b[1]]))
            });
            if keep(vshard) && super::time_from(&v).is_some_and(|t| t < before) {
                out.push(k.to_vec());
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The inbox marks of `vshards`: each one's watermark, and the events
    /// decided above it (persisted).
    pub fn marks(&self, vshards: &[usize]) -> Result<Marks> {
        let (watermarks, above) = self.inbox_marks()?;
        let wanted: std::collections::HashSet<usize> = vshards.iter().copied().collect();
        Ok((
            watermarks
                .into_iter()
                .filter(|(v, _)| wanted.contains(v))
                .collect(),
            above
                .into_iter()
                .filter(|(v, _)| wanted.contains(v))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_route_to_their_customers_slot_and_node_keys_stay_local() {
        let slots = 64;
        let c = "cust.with.dots";
        let s = slot_of_customer(c, slots);
        let mut k = vec![b'c'];
        k.extend_from_slice(c.as_bytes());
        k.extend_from_slice(b"\0t");
        assert_eq!(slot_of_key(&k, None, slots), Some(s));
        let mut t = vec![b'T'];
        t.extend_from_slice(&[0; 8]);
        t.extend_from_slice(c.as_bytes());
        t.push(0);
        assert_eq!(slot_of_key(&t, None, slots), Some(s));
        let v = super::super::vshard_of(c) as u16;
        let mut w = vec![b'W'];
        w.extend_from_slice(&v.to_be_bytes());
        assert_eq!(slot_of_key(&w, None, slots), Some(s));
        let json = format!(r#"{{"id":"nd-1","customer":"{c}"}}"#);
        assert_eq!(slot_of_key(b"Ond-1", Some(json.as_bytes()), slots), Some(s));
        assert_eq!(slot_of_key(b"Ond-1", None, slots), None);
        assert_eq!(slot_of_key(b"Ggeneration", None, slots), None);
        // A tally of writer 5 is slot 5's; the deliverer's is the node's.
        let mut r = b"Rcampaign\0".to_vec();
        r.extend_from_slice(&[0, 0, 0, 0, 0, 5]);
        assert_eq!(slot_of_key(&r, None, slots), Some(5));
        let len = r.len();
        r[len - 2..].copy_from_slice(&(u16::MAX - 1).to_be_bytes());
        assert_eq!(slot_of_key(&r, None, slots), None);
    }

    #[test]
    fn what_the_log_stored_is_written_and_what_it_refused_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.join_cluster(16);
        let (a, b) = ("cust-a", "cust-b");
        let (sa, sb) = (slot_of_customer(a, 16), slot_of_customer(b, 16));
        assert_ne!(sa, sb, "two customers of two slots");
        // Asked before it was written (every first decision asks).
        assert!(!store
            .message_seen(super::super::vshard_of(a), "m-1")
            .unwrap());
        let mut c = super::super::Changes::new();
        c.message_seen(super::super::vshard_of(a), "m-1", 5);
        c.message_seen(super::super::vshard_of(b), "m-2", 5);
        store.commit(c);
        let mut seen_slots = Vec::new();
        store
            .persist_gated(|by_slot| {
                seen_slots = by_slot.keys().copied().collect();
                Ok(Admission {
                    admitted: [(sa, Some(7))].into_iter().collect(),
                    retry: Default::default(),
                })
            })
            .unwrap();
        assert_eq!(seen_slots, {
            let mut v = vec![sa, sb];
            v.sort();
            v
        });
        assert!(store
            .message_seen(super::super::vshard_of(a), "m-1")
            .unwrap());
        assert!(!store
            .message_seen(super::super::vshard_of(b), "m-2")
            .unwrap());
        assert_eq!(store.applied(sa).unwrap(), 7);
        assert_eq!(store.applied(sb).unwrap(), 0);
    }

    #[test]
    fn a_key_read_absent_then_written_is_read_as_written() {
        // A tally read before its first write (the read caches the
        // absence), written and persisted: the next read sees the write.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.tally("c", 1, 3).unwrap(), None);
        let mut c = super::super::Changes::new();
        c.tally("c", 1, 3, b"v1".to_vec());
        store.commit(c);
        store.persist().unwrap();
        assert_eq!(store.tally("c", 1, 3).unwrap(), Some(b"v1".to_vec()));
        let mut c = super::super::Changes::new();
        c.tally("c", 1, 3, b"v2".to_vec());
        store.commit(c);
        store.persist().unwrap();
        assert_eq!(store.tally("c", 1, 3).unwrap(), Some(b"v2".to_vec()));
    }

    #[test]
    fn retention_forgets_only_the_customers_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut c = super::super::Changes::new();
        for (ts, who) in [(1, "a"), (2, "b"), (3, "a"), (50, "a")] {
            c.decision(ts, who, "camp", format!("{ts}{who}").into_bytes());
        }
        store.commit(c);
        store.persist().unwrap();
        // Only a's rows before 10 go; b's stay (another node's slot).
        assert_eq!(store.forget_decisions_of(10, 100, |c| c == "a").unwrap(), 2);
        store.persist().unwrap();
        let left: Vec<Vec<u8>> = store.decisions().map(|d| d.unwrap()).collect();
        assert_eq!(left, vec![b"2b".to_vec(), b"50a".to_vec()]);
        // The limit counts rows forgotten, not rows skipped.
        assert_eq!(store.forget_decisions_of(100, 1, |c| c == "a").unwrap(), 1);
    }

    #[test]
    fn ops_survive_encoding_in_records_of_bounded_size() {
        let ops: Vec<Op> = (0..100u32)
            .map(|i| {
                (
                    format!("k{i}").into_bytes(),
                    (i % 3 != 0).then(|| vec![i as u8; (i as usize) * 10]),
                )
            })
            .collect();
        let records = encode_ops(&ops, 2000);
        assert!(records.len() > 1);
        assert!(records.iter().all(|r| r.len() <= 2000 + 9 + 1000));
        let back: Vec<Op> = records
            .iter()
            .flat_map(|r| decode_ops(r).expect("decodes"))
            .collect();
        assert_eq!(back, ops);
        assert_eq!(decode_ops(&[0, 0, 0, 9, 1]), None);
    }
}
