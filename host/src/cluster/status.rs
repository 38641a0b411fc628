//! The cluster as JetStream holds it: members, the assigner, the slot
//! map, each slot's epoch, and the streams. Any node (and `nudge status`
//! through it) reads it the same way; lag comes from each owner, which
//! alone knows how far its feeders read.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::Serialize;

use super::assign::SlotMap;
use super::log::SlotLog;
use super::members::Members;
use super::slots::Layout;
use crate::config::ClusterConfig;

/// One slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SlotStatus {
    pub slot: u16,
    /// Who the map gives it to.
    pub assigned: Option<String>,
    /// Who holds its current epoch (the only node whose commits count).
    pub owner: Option<String>,
    /// The current epoch (the claim's sequence in the log).
    pub epoch: Option<u64>,
    /// Events of the slot stored and not yet read by its owner (as the
    /// owner last saw it; `None`: no owner answered).
    pub lag: Option<u64>,
    /// The slot's latest snapshot: the log position it covers, when it was
    /// taken, its compressed size.
    #[serde(default)]
    pub snapshot: Option<SnapshotStatus>,
}

/// A slot's latest snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SnapshotStatus {
    pub position: u64,
    pub at: String,
    pub keys: u64,
    pub bytes: u64,
}

/// A stream's size and leader.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub last_seq: u64,
    pub leader: Option<String>,
}

/// The whole cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Status {
    /// Live members: name and API address.
    pub members: Vec<(String, String)>,
    pub assigner: Option<String>,
    pub slots: Vec<SlotStatus>,
    pub streams: Vec<StreamStatus>,
}

impl Status {
    /// The slot map's owners differing from the epochs' (moves under way).
    pub fn moving(&self) -> usize {
        self.slots.iter().filter(|s| s.assigned != s.owner).count()
    }
}

/// Reads the cluster's status through `js`.
pub async fn read(
    js: &jetstream::Context,
    client: async_nats::Client,
    cfg: &ClusterConfig,
) -> Result<Status, String> {
    let layout = Layout::new(&cfg.prefix, cfg.slots);
    let members = Members::open(js.clone(), &cfg.prefix, cfg.replicas, cfg.lease.0)
        .await
        .map_err(|e| e.to_string())?;
    let lease = Members::open_bucket(
        js.clone(),
        &format!("{}_lease", cfg.prefix),
        cfg.replicas,
        cfg.lease.0,
    )
    .await
    .map_err(|e| e.to_string())?;
    let log = SlotLog::open(client, js.clone(), layout.clone(), cfg.replicas)
        .await
        .map_err(|e| e.to_string())?;
    let map: SlotMap = match js.get_key_value(format!("{}_slots", cfg.prefix)).await {
        Ok(kv) => match kv.entry(super::node::MAP_KEY).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                serde_json::from_slice(&e.value).unwrap_or_default()
            }
            _ => SlotMap::default(),
        },
        Err(_) => SlotMap::default(),
    };
    let snapshots = super::snapshot::Snapshots::open(js.clone(), layout.clone(), cfg.replicas)
        .await
        .map_err(|e| e.to_string())?;
    let mut slots = Vec::new();
    for s in 0..layout.slots() {
        let epoch = log.epoch(s).await.map_err(|e| e.to_string())?;
        let snapshot = snapshots
            .latest(s)
            .await
            .map_err(|e| e.to_string())?
            .map(|p| SnapshotStatus {
                position: p.position,
                at: crate::event::format_ts(p.at_ms),
                keys: p.keys,
                bytes: p.bytes,
            });
        slots.push(SlotStatus {
            slot: s,
            assigned: map.owners.get(usize::from(s)).cloned().flatten(),
            owner: epoch.as_ref().map(|e| e.node.clone()),
            epoch: epoch.map(|e| e.seq),
            lag: None,
            snapshot,
        });
    }
    let mut streams = Vec::new();
    for name in [
        layout.events_stream(),
        layout.log_stream(),
        format!("OBJ_{}", layout.snapshot_bucket()),
    ] {
        if let Ok(mut st) = js.get_stream(&name).await {
            if let Ok(info) = st.info().await {
                streams.push(StreamStatus {
                    name,
                    messages: info.state.messages,
                    bytes: info.state.bytes,
                    last_seq: info.state.last_sequence,
                    leader: info.cluster.as_ref().and_then(|c| c.leader.clone()),
                });
            }
        }
    }
    Ok(Status {
        members: members
            .list()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|m| (m.node, m.api))
            .collect(),
        assigner: lease
            .get(super::node::ASSIGNER_KEY)
            .await
            .ok()
            .flatten()
            .map(|m| m.node),
        slots,
        streams,
    })
}

/// Connects with `cfg` and reads the status (tests, tools).
pub async fn read_with(cfg: &ClusterConfig) -> Result<Status, String> {
    let (client, js) = super::connect(cfg, |k| std::env::var(k).ok())
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(30), read(&js, client, cfg))
        .await
        .map_err(|_| "reading the cluster's status timed out".to_string())?
}
