//! Slot snapshots in a JetStream object store, and compacting the log
//! below them.
//!
//! A slot's owner snapshots it every `[cluster] snapshot_every` (when it
//! has new commits): the body ([`crate::store::SlotImage`]) goes to the
//! `<prefix>_snapshots` object store under a name of the slot and log
//! position, then a **pointer** naming it goes to the log's
//! `…log.<slot>.snap` subject as a batch fenced by the owner's epoch, like
//! a commit. Only then is the log compacted ([`Snapshots::compact`]): the
//! slot's commits at or below the position, its older pointers and
//! objects, and its events every virtual shard of the slot has decided
//! are purged.
//!
//! A new owner reads the latest pointer after its claim. If the pointer is
//! ahead of its own copy, it clears its copy of the slot, restores the
//! snapshot and applies the commits after the pointer's position;
//! otherwise it applies the commits after its own position, as before.
//!
//! Why compaction never loses a commit a new owner needs: a pointer is
//! stored only under the slot's current epoch, so every pointer was
//! stored before the claim the new owner made, and the new owner reads
//! the latest one after it. A stale owner that compacts late purges only
//! below a pointer that is at or under the one the new owner read.

use std::time::Duration;

use async_nats::jetstream::{self, object_store, stream};
use futures_util::StreamExt;

use super::log::{nats, Result};
use super::slots::Layout;

/// What a slot's latest snapshot is, as stored on its pointer subject.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pointer {
    pub slot: u16,
    /// The slot's log position the snapshot covers: the commits after it
    /// apply on top.
    pub position: u64,
    /// Its object in the snapshots store.
    pub object: String,
    pub keys: u64,
    /// Size of the (compressed) body.
    pub bytes: u64,
    /// The lowest watermark of the slot's virtual shards that have one:
    /// their events at or below it were decided.
    pub events_decided: u64,
    /// The slot's virtual shards that had decided nothing: compaction
    /// purges events only below the first of theirs.
    #[serde(default)]
    pub unmarked: Vec<usize>,
    /// Who took it, under which epoch, when (ms since the epoch).
    pub node: String,
    pub epoch: u64,
    pub at_ms: i64,
}

impl Pointer {
    /// The object name of `slot`'s snapshot at `position` (sorted by slot,
    /// then position).
    pub fn object_name(slot: u16, position: u64) -> String {
        format!("slot-{slot:05}-{position:020}")
    }

    /// The slot and position an object's name holds.
    fn parse_name(name: &str) -> Option<(u16, u64)> {
        let rest = name.strip_prefix("slot-")?;
        let (slot, position) = rest.split_once('-')?;
        Some((slot.parse().ok()?, position.parse().ok()?))
    }
}

/// What compacting after a snapshot removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    pub commits: u64,
    pub events: u64,
    pub objects: u64,
}

/// The snapshots of every slot of one cluster.
#[derive(Clone)]
pub struct Snapshots {
    js: jetstream::Context,
    layout: Layout,
    objects: object_store::ObjectStore,
}

impl Snapshots {
    /// Opens the snapshots object store, creating it (with `replicas`) if
    /// it does not exist.
    pub async fn open(
        js: jetstream::Context,
        layout: Layout,
        replicas: usize,
    ) -> Result<Snapshots> {
        let objects = super::ensure_objects(
            &js,
            object_store::Config {
                bucket: layout.snapshot_bucket(),
                description: Some("Nudge: slot snapshots".into()),
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            },
        )
        .await
        .map_err(nats)?;
        Ok(Snapshots {
            js,
            layout,
            objects,
        })
    }

    /// The slot's latest snapshot, if it has one.
    pub async fn latest(&self, slot: u16) -> Result<Option<Pointer>> {
        let stream = self
            .js
            .get_stream_no_info(self.layout.log_stream())
            .await
            .map_err(nats)?;
        match stream
            .get_last_raw_message_by_subject(&self.layout.snapshot_subject(slot))
            .await
        {
            Ok(m) => serde_json::from_slice(&m.payload)
                .map(Some)
                .map_err(|e| nats(format!("slot {slot}: unreadable snapshot pointer: {e}"))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Stores a snapshot body of `slot` at `position`; the returned
    /// pointer is still to be committed (fenced) before it counts.
    pub async fn put(&self, slot: u16, image: &crate::store::SlotImage) -> Result<String> {
        let name = Pointer::object_name(slot, image.position);
        let mut body: &[u8] = &image.body;
        self.objects
            .put(name.as_str(), &mut body)
            .await
            .map_err(|e| nats(format!("storing snapshot {name}: {e}")))?;
        Ok(name)
    }

    /// The body a pointer names (its digest checked by the client).
    pub async fn fetch(&self, p: &Pointer) -> Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut object = self
            .objects
            .get(&p.object)
            .await
            .map_err(|e| nats(format!("slot {}: snapshot {}: {e}", p.slot, p.object)))?;
        let mut body = Vec::with_capacity(p.bytes as usize);
        object.read_to_end(&mut body).await.map_err(|e| {
            nats(format!(
                "slot {}: reading snapshot {}: {e}",
                p.slot, p.object
            ))
        })?;
        Ok(body)
    }

    /// After `p` was committed: purges the slot's commits at or below its
    /// position, its older pointers, its older snapshot objects, and its
    /// events every virtual shard has decided.
    pub async fn compact(&self, p: &Pointer) -> Result<Compacted> {
        let log = self
            .js
            .get_stream_no_info(self.layout.log_stream())
            .await
            .map_err(nats)?;
        let commits = log
            .purge()
            .filter(self.layout.commit_subject(p.slot))
            .sequence(p.position + 1)
            .await
            .map_err(nats)?
            .purged;
        log.purge()
            .filter(self.layout.snapshot_subject(p.slot))
            .keep(1)
            .await
            .map_err(nats)?;
        let mut events = 0;
        let stream = self
            .js
            .get_stream_no_info(self.layout.events_stream())
            .await
            .map_err(nats)?;
        // Below the watermarks, and below every event of a virtual shard
        // that has decided nothing yet (such an event may be in flight).
        let mut below = p.events_decided;
        for v in &p.unmarked {
            if below == 0 {
                break;
            }
            match stream
                .get_first_raw_message_by_subject(self.layout.vshard_events(p.slot, *v), 1)
                .await
            {
                Ok(m) => below = below.min(m.sequence.saturating_sub(1)),
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(nats(e)),
            }
        }
        if below > 0 {
            events = stream
                .purge()
                .filter(self.layout.slot_events(p.slot))
                .sequence(below + 1)
                .await
                .map_err(nats)?
                .purged;
        }
        let mut objects = 0;
        for name in self.names().await? {
            if let Some((slot, position)) = Pointer::parse_name(&name) {
                if slot == p.slot && position < p.position {
                    self.objects.delete(&name).await.map_err(nats)?;
                    objects += 1;
                }
            }
        }
        Ok(Compacted {
            commits,
            events,
            objects,
        })
    }

    /// A slot's state as the log holds it: its latest snapshot with the
    /// commits after it applied in order (what a new owner restores; the
    /// tests compare it with a replay). Read again if the slot is
    /// snapshotted meanwhile.
    pub async fn slot_state(
        &self,
        log: &super::log::SlotLog,
        slot: u16,
    ) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut tries = 0;
        loop {
            tries += 1;
            let p = self.latest(slot).await?;
            let mut state = std::collections::BTreeMap::new();
            let fetched = match &p {
                Some(p) => self.fetch(p).await.map(Some),
                None => Ok(None),
            };
            let body = match fetched {
                Ok(b) => b,
                // Deleted by a newer snapshot since the pointer was read.
                Err(_) if tries < 5 => continue,
                Err(e) => return Err(e),
            };
            if let Some(body) = body {
                crate::store::each_snapshot_op(&body, |k, v| {
                    if let Some(v) = v {
                        state.insert(k, v);
                    }
                    Ok(())
                })
                .map_err(nats)?;
            }
            let after = p.as_ref().map_or(0, |p| p.position);
            let commits = match log.commits(slot, after, usize::MAX).await {
                Ok(c) => c,
                // Compacted meanwhile: read the newer snapshot.
                Err(_) if tries < 5 => continue,
                Err(e) => return Err(e),
            };
            for r in commits {
                let ops = crate::store::decode_ops(&r.payload)
                    .ok_or_else(|| nats(format!("slot {slot}: commit {} unreadable", r.seq)))?;
                for (k, v) in ops {
                    match v {
                        Some(v) => state.insert(k, v),
                        None => state.remove(&k),
                    };
                }
            }
            if self.latest(slot).await? == p || tries >= 5 {
                return Ok(state);
            }
        }
    }

    /// The names of the stored snapshot objects.
    pub async fn names(&self) -> Result<Vec<String>> {
        let mut list = self.objects.list().await.map_err(nats)?;
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), list.next()).await {
                Ok(Some(Ok(info))) if !info.deleted => out.push(info.name),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(nats(e)),
                Ok(None) => break,
                Err(_) => return Err(nats("listing snapshots timed out")),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_sort_by_slot_then_position_and_parse_back() {
        let a = Pointer::object_name(3, 99);
        let b = Pointer::object_name(3, 1000);
        let c = Pointer::object_name(12, 5);
        assert!(a < b && b < c);
        assert_eq!(Pointer::parse_name(&b), Some((3, 1000)));
        assert_eq!(Pointer::parse_name("other"), None);
    }
}
