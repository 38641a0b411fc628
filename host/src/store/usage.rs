//! What a store holds, by kind of key: how many keys and how many bytes of
//! keys and values, against what sled takes on disk (`nudge store-usage`).
//! An operator sizing a disk reads it; so does whoever works on the
//! encodings, to tell content from sled's amplification.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Result, Store};

/// One kind of key.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub keys: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

/// The kind of `key`, named as in the store's module docs.
fn kind(key: &[u8]) -> &'static str {
    match key.first() {
        Some(b'c') => {
            // Customer keys: `c` customer `\0` sub-kind.
            match key
                .iter()
                .position(|&b| b == 0)
                .and_then(|i| key.get(i + 1))
            {
                Some(b't') => "customer traits",
                Some(b'h') => "customer history",
                Some(b'p') => "customer plugin state",
                Some(b'm') => "customer timers",
                Some(b'e') => "customer timeline",
                Some(b'u') => "customer measurement units",
                _ => "customer (other)",
            }
        }
        Some(b'T') => "timer queue",
        Some(b'D') => "decision log",
        Some(b'V') => "conversions",
        Some(b'W' | b'X') => "inbox watermarks",
        Some(b'O') => "outbox",
        Some(b'L') => "dead letters",
        Some(b'A') => "actions",
        Some(b'R') => "report tallies",
        Some(b'Q') => "ledger clocks",
        Some(b'I') => "inbox events",
        Some(b'M') => "message ids",
        _ => "other",
    }
}

/// Adds up `tree`'s keys by kind into `into`.
fn tally(tree: &sled::Tree, into: &mut BTreeMap<&'static str, Usage>) -> Result<()> {
    for kv in tree.iter() {
        let (k, v) = kv?;
        let u = into.entry(kind(&k)).or_default();
        u.keys += 1;
        u.key_bytes += k.len() as u64;
        u.value_bytes += v.len() as u64;
    }
    Ok(())
}

/// Bytes the files under `dir` take on disk.
pub fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => on_disk(&m),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(unix)]
fn on_disk(m: &std::fs::Metadata) -> u64 {
    // Allocated blocks, not the length: sled's files can be sparse.
    std::os::unix::fs::MetadataExt::blocks(m) * 512
}

#[cfg(not(unix))]
fn on_disk(m: &std::fs::Metadata) -> u64 {
    m.len()
}

impl Store {
    /// Every key of the store and of the inbox, by kind. Reads sled, not
    /// the write-back layer: on a live store, what is persisted.
    pub fn usage(&self) -> Result<BTreeMap<&'static str, Usage>> {
        let mut out = BTreeMap::new();
        tally(&self.db, &mut out)?;
        tally(&self.inbox, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_key_layout() {
        assert_eq!(kind(b"cann\0t"), "customer traits");
        assert_eq!(kind(b"cann\0p\x03abc"), "customer plugin state");
        assert_eq!(kind(b"D\x80\0\0\0\0\0\0\0ann\0c"), "decision log");
        assert_eq!(kind(b"M1234"), "message ids");
        assert_eq!(kind(b""), "other");
        assert_eq!(kind(b"cno-nul"), "customer (other)");
    }

    #[test]
    fn usage_counts_what_was_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut c = super::super::Changes::new();
        c.set_traits("ann", &serde_json::from_str(r#"{"a":1}"#).unwrap());
        c.set_traits("bob", &serde_json::from_str("{}").unwrap());
        store.commit(c);
        // Committed, not yet persisted: not in sled.
        assert_eq!(store.usage().unwrap().get("customer traits"), None);
        store.flush().unwrap();
        let usage = store.usage().unwrap();
        let traits = usage.get("customer traits").cloned().unwrap_or_default();
        assert_eq!((traits.keys, traits.key_bytes), (2, 12));
        assert!(traits.value_bytes >= 2, "{traits:?}");
        assert!(disk_bytes(dir.path()) > 0);
    }
}
