//! Pause, resume and quarantine apply cluster-wide.
//!
//! The controls live in a KV bucket (`<prefix>_controls`), one key per
//! paused campaign and per quarantined plugin (`controls.rs`, [`Change`]),
//! so two nodes changing different entries at once never overwrite each
//! other. A node publishes its own changes (an operator's pause on its
//! API, a quarantine its workers tripped) and watches the bucket: every
//! node adopts what the bucket holds, its own changes included, so all
//! nodes converge on the same view within a watch round trip.

use std::collections::BTreeMap;
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
    let bucket = format!("{prefix}_controls");
    match js.get_key_value(&bucket).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket,
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string()),
    }
}

/// Shares `controls` through `kv` until the process ends: publishes this
/// node's changes and adopts everyone's.
pub fn share(kv: kv::Store, controls: Arc<Controls>) {
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Change>>();
    controls.share_with(Box::new(move |changes| {
        let _ = tx.send(changes);
    }));
    tokio::spawn(publish(kv.clone(), rx));
    tokio::spawn(watch(kv, controls));
}

async fn publish(kv: kv::Store, mut rx: mpsc::UnboundedReceiver<Vec<Change>>) {
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
    }
}

async fn watch(kv: kv::Store, controls: Arc<Controls>) {
    loop {
        let mut entries = match kv.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!("controls watch, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut paused: BTreeMap<String, Paused> = BTreeMap::new();
        let mut quarantined: BTreeMap<String, Quarantine> = BTreeMap::new();
        let mut seen_initial = false;
        loop {
            // The initial values come at once; adopt them together, then
            // every change as it comes.
            let next = match tokio::time::timeout(Duration::from_millis(200), entries.next()).await
            {
                Err(_) => {
                    if !seen_initial {
                        seen_initial = true;
                        controls.adopt(paused.clone(), quarantined.clone());
                    }
                    continue;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!("controls watch: {e}");
                    break;
                }
                Ok(Some(Ok(e))) => e,
            };
            let Some((tag, name)) = next
                .key
                .split_once('.')
                .and_then(|(t, h)| Some((t, unhex(h)?)))
            else {
                continue;
            };
            let present = next.operation == kv::Operation::Put;
            match tag {
                "paused" => {
                    match present
                        .then(|| serde_json::from_slice::<Paused>(&next.value).ok())
                        .flatten()
                    {
                        Some(p) => paused.insert(name, p),
                        None => paused.remove(&name),
                    };
                }
                "quarantined" => {
                    match present
                        .then(|| serde_json::from_slice::<Quarantine>(&next.value).ok())
                        .flatten()
                    {
                        Some(q) => quarantined.insert(name, q),
                        None => quarantined.remove(&name),
                    };
                }
                _ => continue,
            }
            if seen_initial || next.delta == 0 {
                seen_initial = true;
                controls.adopt(paused.clone(), quarantined.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
