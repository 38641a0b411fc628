//! A cluster slot's state as one snapshot body, and back.
//!
//! A snapshot is taken while the node goes on deciding and committing: it
//! reads each slot's log position first, then scans the store once. The
//! scan may see changes of commits after that position, but every change
//! reaches sled as a whole value (a set or a deletion) that the log stored
//! first, so restoring the body and applying the slot's commits after the
//! position, in order, gives exactly the state at the end of the log: a
//! key changed after the position ends at its last committed value
//! whatever the scan saw, and a key not changed since is as the scan saw
//! it. The one exception is the journal of direct writes (a delivery
//! marked done, an agent's answer): they reach sled before the slot's
//! next commit carries them, so a snapshot may hold one a little early,
//! or (if the node loses the slot first) hold one the log never gets. In
//! both cases the snapshot holds what really happened.
//!
//! The body is gzip of a magic line and the slot's keys and values in
//! the format of a commit record ([`super::encode_ops`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};

use flate2::{read::GzDecoder, write::GzEncoder, Compression};

use super::cluster::{applied_key, put_op, slot_of_key};
use super::{entry_cost, reclaim, Result, Store, StoreError, VSHARDS};

/// First bytes of a snapshot body (after decompression).
const MAGIC: &[u8] = b"nudge-slot-snapshot 1\n";

/// Keys written (or deleted) per sled batch while restoring or clearing.
const BATCH_KEYS: usize = 10_000;

/// One slot's snapshot, ready to store.
#[derive(Debug)]
pub struct SlotImage {
    /// The slot's log position before the scan: the commits after it, and
    /// only those, must be applied on top.
    pub position: u64,
    /// Compressed body.
    pub body: Vec<u8>,
    pub keys: u64,
    /// The lowest watermark of the slot's virtual shards that have one
    /// (0: none has): their events at or below it are never read again.
    pub events_decided: u64,
    /// The slot's virtual shards without a watermark (nothing of them
    /// decided yet): whoever purges events must check they have none
    /// below.
    pub unmarked: Vec<usize>,
}

fn corrupt(problem: String) -> StoreError {
    StoreError::Corrupt {
        what: "slot snapshot",
        customer: String::new(),
        problem,
    }
}

struct Building {
    position: u64,
    gz: GzEncoder<Vec<u8>>,
    buf: Vec<u8>,
    keys: u64,
    watermarks: HashMap<usize, u64>,
}

impl Store {
    /// Snapshots of `slots`, from one scan of the store.
    pub fn snapshot_slots(&self, slots: &[u16]) -> Result<BTreeMap<u16, SlotImage>> {
        let Some(n) = self.cluster_slots() else {
            return Ok(BTreeMap::new());
        };
        let mut building: HashMap<u16, Building> = HashMap::new();
        for slot in slots {
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(MAGIC).map_err(|e| corrupt(e.to_string()))?;
            building.insert(
                *slot,
                Building {
                    // Before the scan: see the module's comment.
                    position: self.applied(*slot)?,
                    gz,
                    buf: Vec::new(),
                    keys: 0,
                    watermarks: HashMap::new(),
                },
            );
        }
        for kv in self.db.iter() {
            let (k, v) = kv?;
            let Some(slot) = slot_of_key(&k, Some(&v), n) else {
                continue;
            };
            let Some(b) = building.get_mut(&slot) else {
                continue;
            };
            if let ([b'W', x, y], Ok(seq)) = (&k[..], <[u8; 8]>::try_from(v.as_ref())) {
                b.watermarks.insert(
                    usize::from(u16::from_be_bytes([*x, *y])),
                    u64::from_be_bytes(seq),
                );
            }
            put_op(&mut b.buf, &k, Some(&v));
            b.keys += 1;
            if b.buf.len() >= 64 << 10 {
                b.gz.write_all(&b.buf).map_err(|e| corrupt(e.to_string()))?;
                b.buf.clear();
            }
        }
        let mut out = BTreeMap::new();
        for (slot, mut b) in building {
            b.buf.extend_from_slice(&END.to_be_bytes());
            b.buf.extend_from_slice(&b.keys.to_be_bytes());
            b.gz.write_all(&b.buf).map_err(|e| corrupt(e.to_string()))?;
            let body = b.gz.finish().map_err(|e| corrupt(e.to_string()))?;
            let events_decided = b.watermarks.values().copied().min().unwrap_or(0);
            let unmarked = (usize::from(slot)..VSHARDS)
                .step_by(usize::from(n.max(1)))
                .filter(|v| !b.watermarks.contains_key(v))
                .collect();
            out.insert(
                slot,
                SlotImage {
                    position: b.position,
                    body,
                    keys: b.keys,
                    events_decided,
                    unmarked,
                },
            );
        }
        Ok(out)
    }

    /// Deletes every key of `slots` and their log positions (before a
    /// snapshot is restored over an older copy: a key the log deleted since
    /// must not survive). One scan of the store. Only for slots no worker
    /// is deciding.
    pub fn clear_slots(&self, slots: &[u16]) -> Result<u64> {
        let Some(n) = self.cluster_slots() else {
            return Ok(0);
        };
        // The positions go first: a crash part-way leaves the slots at 0,
        // which a new owner restores again.
        let mut batch = sled::Batch::default();
        for s in slots {
            batch.remove(&applied_key(*s)[..]);
        }
        self.db.apply_batch(batch)?;
        let mut doomed = Vec::new();
        let mut removed = 0;
        for kv in self.db.iter() {
            let (k, v) = kv?;
            if slot_of_key(&k, Some(&v), n).is_some_and(|s| slots.contains(&s)) {
                doomed.push(k);
            }
            if doomed.len() >= BATCH_KEYS {
                removed += self.remove_keys(std::mem::take(&mut doomed))?;
            }
        }
        removed += self.remove_keys(doomed)?;
        self.forget_clean(|s| slots.contains(&s));
        Ok(removed)
    }

    fn remove_keys(&self, keys: Vec<sled::IVec>) -> Result<u64> {
        let n = keys.len();
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.db.apply_batch(batch)?;
        reclaim(n);
        Ok(n as u64)
    }

    /// Writes a snapshot body of `slot` (as [`Store::snapshot_slots`] made
    /// it) to sled, then the slot's position, so that the slot's commits
    /// after `position` apply next. Returns the keys written. A body that
    /// is not a slot's snapshot, or holds a key of another slot, is refused
    /// (what was written of it is left to [`Store::clear_slots`]: the
    /// position is not moved).
    pub fn restore_slot(&self, slot: u16, position: u64, body: &[u8]) -> Result<u64> {
        let n = self.cluster_slots().unwrap_or(1);
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let keys = each_op(body, |k, v| {
            if slot_of_key(&k, v.as_deref(), n) != Some(slot) {
                return Err(corrupt(format!(
                    "slot {slot}: holds a key of another slot ({:?})",
                    String::from_utf8_lossy(&k[..k.len().min(40)])
                )));
            }
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
            in_batch += 1;
            if in_batch >= BATCH_KEYS {
                self.db.apply_batch(std::mem::take(&mut batch))?;
                reclaim(in_batch);
                in_batch = 0;
            }
            Ok(())
        })?;
        batch.insert(&applied_key(slot)[..], &position.to_be_bytes()[..]);
        self.db.apply_batch(batch)?;
        reclaim(in_batch);
        self.forget_clean(|s| s == slot);
        Ok(keys)
    }

    /// Drops the read cache's entries of the slots `which` accepts.
    fn forget_clean(&self, which: impl Fn(u16) -> bool) {
        let n = self.cluster_slots().unwrap_or(1);
        let mut pending = self.lock();
        let pending = &mut *pending;
        let mut freed = 0;
        pending.clean.retain(|k, v| {
            let drop = slot_of_key(k, v.as_deref(), n).is_some_and(&which);
            if drop {
                freed += entry_cost(k, v);
            }
            !drop
        });
        pending.clean_bytes = pending.clean_bytes.saturating_sub(freed);
    }
}

/// Calls `f` with each key and value of a snapshot body, in order;
/// returns how many. A body that is not a complete snapshot is refused.
pub fn each_op(
    body: &[u8],
    mut f: impl FnMut(Vec<u8>, Option<Vec<u8>>) -> Result<()>,
) -> Result<u64> {
    let mut r = GzDecoder::new(body);
    let mut magic = vec![0; MAGIC.len()];
    r.read_exact(&mut magic)
        .map_err(|e| corrupt(format!("not a slot snapshot: {e}")))?;
    if magic != MAGIC {
        return Err(corrupt("not a slot snapshot".into()));
    }
    let mut keys = 0;
    while let Some((k, v)) = read_op(&mut r, keys).map_err(|e| corrupt(e.to_string()))? {
        f(k, v)?;
        keys += 1;
    }
    Ok(keys)
}

/// Key length that marks the end of a body; the number of keys follows
/// (a body cut short is told from a complete one).
const END: u32 = u32::MAX;

/// The next op of a body, `None` at its end marker (checked against
/// `keys`, the ops read before it).
fn read_op(r: &mut impl Read, keys: u64) -> std::io::Result<Option<super::Op>> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    if u32::from_be_bytes(len) == END {
        let mut n = [0u8; 8];
        r.read_exact(&mut n)?;
        let n = u64::from_be_bytes(n);
        return if n == keys {
            Ok(None)
        } else {
            Err(bad(format!("{keys} keys read, the body says {n}")))
        };
    }
    let mut k = vec![0; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut k)?;
    let mut flag = [0u8; 1];
    r.read_exact(&mut flag)?;
    let v = match flag[0] {
        0 => None,
        1 => {
            r.read_exact(&mut len)?;
            let mut v = vec![0; u32::from_be_bytes(len) as usize];
            r.read_exact(&mut v)?;
            Some(v)
        }
        x => return Err(bad(format!("op flag {x}"))),
    };
    Ok(Some((k, v)))
}

#[cfg(test)]
mod tests {
    use super::super::Changes;
    use super::*;

    fn customer_of_slot(slot: u16, slots: u16, skip: usize) -> String {
        (0..)
            .map(|i| format!("cust-{i}"))
            .filter(|c| super::super::cluster::slot_of_customer(c, slots) == slot)
            .nth(skip)
            .unwrap_or_default()
    }

    fn admit_all(store: &Store, seq: u64) {
        store
            .persist_gated(|by_slot| {
                Ok(super::super::Admission {
                    admitted: by_slot.keys().map(|s| (*s, Some(seq))).collect(),
                    retry: Default::default(),
                })
            })
            .unwrap();
    }

    fn slot_state(store: &Store, slot: u16) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let n = store.cluster_slots().unwrap();
        store
            .db
            .iter()
            .map(|kv| kv.unwrap())
            .filter(|(k, v)| slot_of_key(k, Some(v), n) == Some(slot))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn a_restored_snapshot_holds_the_slot_and_only_it_and_clears_what_was_there() {
        let slots = 8;
        let a = tempfile::tempdir().unwrap();
        let owner = Store::open(a.path()).unwrap();
        owner.join_cluster(slots);
        let (mine, other) = (customer_of_slot(3, slots, 0), customer_of_slot(5, slots, 0));
        let mut c = Changes::new();
        for (i, who) in [&mine, &other, &mine].into_iter().enumerate() {
            c.decision(i as i64, who, "camp", format!("{i}{who}").into_bytes());
            c.message_seen(super::super::vshard_of(who), &format!("m{i}"), 5);
        }
        owner.commit(c);
        admit_all(&owner, 42);
        let images = owner.snapshot_slots(&[3]).unwrap();
        let image = &images[&3];
        assert_eq!(image.position, 42);
        assert_eq!(image.keys as usize, slot_state(&owner, 3).len());
        assert!(image.keys >= 4, "two decisions and two message ids");

        // Another node had an old copy of slot 3 with a key since deleted.
        let b = tempfile::tempdir().unwrap();
        let taker = Store::open(b.path()).unwrap();
        taker.join_cluster(slots);
        let stale = customer_of_slot(3, slots, 1);
        let mut c = Changes::new();
        c.decision(99, &stale, "camp", b"stale".to_vec());
        c.decision(7, &other, "camp", b"kept".to_vec());
        taker.commit(c);
        admit_all(&taker, 10);
        let removed = taker.clear_slots(&[3]).unwrap();
        assert_eq!(removed, 1);
        assert_eq!(taker.applied(3).unwrap(), 0);
        assert_eq!(
            taker.restore_slot(3, image.position, &image.body).unwrap(),
            image.keys
        );
        assert_eq!(slot_state(&taker, 3), slot_state(&owner, 3));
        assert_eq!(taker.applied(3).unwrap(), 42);
        // The other slot's key is untouched.
        assert_eq!(slot_state(&taker, 5).len(), 1);
    }

    #[test]
    fn a_body_of_another_slot_or_not_a_snapshot_is_refused_and_the_position_stays() {
        let slots = 8;
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        store.join_cluster(slots);
        let mut c = Changes::new();
        let who = customer_of_slot(2, slots, 0);
        c.decision(1, &who, "camp", b"x".to_vec());
        store.commit(c);
        admit_all(&store, 9);
        let image = store.snapshot_slots(&[2]).unwrap().remove(&2).unwrap();
        let err = store.restore_slot(4, 100, &image.body).unwrap_err();
        assert!(err.to_string().contains("another slot"), "{err}");
        assert_eq!(store.applied(4).unwrap(), 0);
        let err = store.restore_slot(2, 100, b"not gzip at all").unwrap_err();
        assert!(err.to_string().contains("not a slot snapshot"), "{err}");
        assert_eq!(store.applied(2).unwrap(), 9);
        // Cut short anywhere, even between two ops: refused.
        let mut raw = Vec::new();
        GzDecoder::new(&image.body[..])
            .read_to_end(&mut raw)
            .unwrap();
        for cut in [MAGIC.len() + 1, raw.len() - 12, raw.len() - 1] {
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&raw[..cut]).unwrap();
            let body = gz.finish().unwrap();
            assert!(store.restore_slot(2, 100, &body).is_err(), "cut at {cut}");
            assert_eq!(store.applied(2).unwrap(), 9);
        }
    }
}
