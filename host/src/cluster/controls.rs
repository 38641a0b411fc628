//! Pause, resume and quarantine apply cluster-wide.
//!
//! The controls live in a KV bucket (`<prefix>_controls`), one key per
//! paused campaign and per quarantined plugin (`controls.rs`, [`Change`]),
//! so two nodes changing different entries at once never overwrite each
//! other. A node publishes its own changes (an operator's pause on its
//! API, a quarantine its workers tripped) and reads the bucket twice a
//! second: every node adopts what the bucket holds, its own changes
//! included, so all nodes converge on the same view within a second.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::controls::{unhex, Change, Controls, Paused, Quarantine};

/// Opens (or creates) the controls bucket.
pub async fn open(
    js: &jetstream::Context,
    prefix: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    super::ensure_kv(
        js,
        kv::Config {
            bucket: format!("{prefix}_controls"),
            history: 1,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await
}

/// Shares `controls` through `kv` until the process ends: publishes this
/// node's changes and adopts everyone's.
pub fn share(kv: kv::Store, controls: Arc<Controls>) {
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Change>>();
    let sync = Arc::new(Sync::default());
    let counted = sync.clone();
    controls.share_with(Box::new(move |changes| {
        counted.pending.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(changes);
    }));
    tokio::spawn(publish(kv.clone(), rx, sync.clone()));
    tokio::spawn(watch(kv, controls, sync));
}

/// This node's own changes not yet in the bucket: while there are any, a
/// read of the bucket is older than this node's view and is not adopted.
#[derive(Default)]
struct Sync {
    pending: AtomicU64,
    published: AtomicU64,
}

async fn publish(kv: kv::Store, mut rx: mpsc::UnboundedReceiver<Vec<Change>>, sync: Arc<Sync>) {
    while let Some(changes) = rx.recv().await {
        for (key, value) in changes {
            // Kept trying: a change an operator made must reach the others.
            for attempt in 0.. {
                let done = match &value {
                    Some(v) => kv
                        .put(&key, v.clone().into())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => kv.delete(&key).await.map_err(|e| e.to_string()),
                };
                match done {
                    Ok(()) => break,
                    Err(e) => {
                        if attempt % 20 == 0 {
                            tracing::warn!(key, "control not shared yet (trying again): {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
        sync.published.fetch_add(1, Ordering::SeqCst);
        sync.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often a node reads the cluster's controls.
const READ_EVERY: Duration = Duration::from_millis(500);

/// Reads the bucket every [`READ_EVERY`] and adopts what it holds. Read
/// afresh each time rather than watched: a watch's consumer can stall
/// unseen when its NATS server goes away (found by the test that kills
/// one), and the bucket holds a handful of keys.
async fn watch(kv: kv::Store, controls: Arc<Controls>, sync: Arc<Sync>) {
    loop {
        let before = sync.published.load(Ordering::SeqCst);
        let quiet = sync.pending.load(Ordering::SeqCst) == 0;
        match read_all(&kv).await {
            // Adopted only if no change of this node's was on its way
            // while the bucket was read.
            Ok((paused, quarantined))
                if quiet
                    && sync.pending.load(Ordering::SeqCst) == 0
                    && sync.published.load(Ordering::SeqCst) == before =>
            {
                controls.adopt(paused, quarantined)
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("controls not read (trying again): {e}"),
        }
        tokio::time::sleep(READ_EVERY).await;
    }
}

async fn read_all(
    kv: &kv::Store,
) -> Result<(BTreeMap<String, Paused>, BTreeMap<String, Quarantine>), String> {
    let keys: Vec<String> = kv
        .keys()
        .await
        .map_err(|e| e.to_string())?
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    let mut paused = BTreeMap::new();
    let mut quarantined = BTreeMap::new();
    for key in keys {
        let Some((tag, name)) = key.split_once('.').and_then(|(t, h)| Some((t, unhex(h)?))) else {
            continue;
        };
        let Some(value) = kv.get(&key).await.map_err(|e| e.to_string())? else {
            continue;
        };
        match tag {
            "paused" => {
                if let Ok(p) = serde_json::from_slice::<Paused>(&value) {
                    paused.insert(name, p);
                }
            }
            "quarantined" => {
                if let Ok(q) = serde_json::from_slice::<Quarantine>(&value) {
                    quarantined.insert(name, q);
                }
            }
            _ => {}
        }
    }
    Ok((paused, quarantined))
}
