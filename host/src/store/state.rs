//! A plugin's state for one customer, kept as one record.
//!
//! One sled value per (customer, plugin) instead of one per key: a plugin's
//! first `state.get` for a customer reads everything it keeps for them, and
//! the state quota is the record's own size, so no separate size key has to
//! be read and written with every change (it was a quarter of the keys a
//! replay wrote, and of the store's first reads).
//!
//! Encoding: a format byte, then entries in key order, each a little-endian
//! `u32` key length, the key, a `u32` value length, the value.

use std::collections::BTreeMap;

const FORMAT: u8 = 1;

/// The keys and values one plugin keeps for one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateRecord {
    entries: BTreeMap<String, Vec<u8>>,
    /// Sum of key and value lengths: what the state quota counts.
    bytes: usize,
}

impl StateRecord {
    /// Decodes a stored record; the error says what is wrong with it.
    pub fn decode(mut bytes: &[u8]) -> Result<StateRecord, String> {
        match bytes.split_first() {
            Some((&FORMAT, rest)) => bytes = rest,
            Some((f, _)) => return Err(format!("unknown state record format {f}")),
            None => return Err("empty state record".into()),
        }
        fn take<'a>(bytes: &mut &'a [u8], what: &str) -> Result<&'a [u8], String> {
            let short = || format!("state record cut short in a {what}");
            let len = bytes.get(..4).ok_or_else(short)?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let body = bytes.get(4..4 + len).ok_or_else(short)?;
            *bytes = &bytes[4 + len..];
            Ok(body)
        }
        let mut record = StateRecord::default();
        while !bytes.is_empty() {
            let key = take(&mut bytes, "key")?;
            let key = std::str::from_utf8(key)
                .map_err(|_| "state record key is not UTF-8".to_string())?;
            let value = take(&mut bytes, "value")?;
            record.set(key, Some(value.to_vec()));
        }
        Ok(record)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + self.bytes + 8 * self.entries.len());
        v.push(FORMAT);
        for (k, val) in &self.entries {
            v.extend_from_slice(&(k.len() as u32).to_le_bytes());
            v.extend_from_slice(k.as_bytes());
            v.extend_from_slice(&(val.len() as u32).to_le_bytes());
            v.extend_from_slice(val);
        }
        v
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// Sets (`Some`) or deletes (`None`) one key.
    pub fn set(&mut self, key: &str, value: Option<Vec<u8>>) {
        let old = match value {
            Some(v) => {
                self.bytes += key.len() + v.len();
                self.entries.insert(key.to_owned(), v)
            }
            None => self.entries.remove(key),
        };
        if let Some(old) = old {
            self.bytes -= key.len() + old.len();
        }
    }

    /// Bytes of keys and values: what counts against the state quota.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Rewrites a store written before records (one sled key per plugin state
/// key, `c` customer `\0` `s` len plugin key, and a size key per plugin
/// and customer) into records. Returns how many records it wrote.
pub(super) fn migrate(db: &sled::Db) -> sled::Result<usize> {
    /// `(record key, plugin key)` of an old state key.
    fn split(k: &[u8]) -> Option<(Vec<u8>, &[u8])> {
        let nul = k.iter().position(|&b| b == 0)?;
        if k.get(nul + 1) != Some(&b's') {
            return None;
        }
        let len = usize::from(*k.get(nul + 2)?);
        let end = nul + 3 + len;
        let mut record = k.get(..end)?.to_vec();
        record[nul + 1] = b'p';
        Some((record, &k[end..]))
    }
    let mut written = 0;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    let mut current: Option<(Vec<u8>, StateRecord)> = None;
    let mut flush = |current: Option<(Vec<u8>, StateRecord)>, batch: &mut sled::Batch| {
        if let Some((k, record)) = current {
            if !record.is_empty() {
                batch.insert(k, record.encode());
                written += 1;
            }
        }
    };
    for kv in db.scan_prefix(b"c") {
        let (k, v) = kv?;
        let Some((record_key, key)) = split(&k) else {
            continue;
        };
        if current.as_ref().is_none_or(|(ck, _)| *ck != record_key) {
            flush(current.take(), &mut batch);
            // Batches end between records, so a crash part way leaves
            // every record either converted whole or still in old keys
            // (the next open converts those).
            if in_batch >= 10_000 {
                db.apply_batch(std::mem::take(&mut batch))?;
                super::reclaim(in_batch);
                in_batch = 0;
            }
            current = Some((record_key, StateRecord::default()));
        }
        batch.remove(k.as_ref());
        in_batch += 1;
        // The old size key: records count their own bytes.
        if key.first() == Some(&0) {
            continue;
        }
        if let (Some((_, record)), Ok(key)) = (current.as_mut(), std::str::from_utf8(key)) {
            record.set(key, Some(v.to_vec()));
        }
    }
    flush(current.take(), &mut batch);
    db.apply_batch(batch)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_counts_bytes() {
        let mut r = StateRecord::default();
        r.set("b", Some(b"two".to_vec()));
        r.set("a", Some(vec![]));
        r.set("", Some(b"\0\xff".to_vec()));
        assert_eq!(r.bytes(), 1 + 3 + 1 + 2);
        r.set("b", Some(b"x".to_vec()));
        assert_eq!(r.bytes(), 1 + 1 + 1 + 2);
        r.set("a", None);
        r.set("missing", None);
        assert_eq!((r.bytes(), r.len()), (4, 2));
        let back = StateRecord::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.get("b"), Some(&b"x"[..]));
        assert_eq!(back.get("a"), None);
        assert_eq!(
            StateRecord::decode(&StateRecord::default().encode()).unwrap(),
            StateRecord::default()
        );
    }

    #[test]
    fn refuses_damaged_records() {
        let mut r = StateRecord::default();
        r.set("key", Some(b"value".to_vec()));
        let good = r.encode();
        // (The format byte alone is the empty record.)
        for cut in 2..good.len() {
            let e = StateRecord::decode(&good[..cut]).unwrap_err();
            assert!(e.contains("cut short"), "{cut}: {e}");
        }
        assert!(StateRecord::decode(&[]).unwrap_err().contains("empty"));
        assert!(StateRecord::decode(&[9]).unwrap_err().contains("format 9"));
        let mut bad = good.clone();
        bad[5] = 0xff;
        assert!(StateRecord::decode(&bad).unwrap_err().contains("UTF-8"));
    }
}
