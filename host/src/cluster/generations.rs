//! Generations shared by the cluster: a publish on any node reaches every
//! node, under one cluster-wide number.
//!
//! - **Numbers.** Every build on any node takes its number from the
//!   `next` key of the `<prefix>_generations` bucket (compare-and-set), so
//!   a number names one build in the whole cluster.
//! - **Publishing.** A good build's files go to the `<prefix>_files`
//!   object store by content hash (once), then its record to the bucket's
//!   `active` key. A node whose folders hold what the cluster already runs
//!   builds nothing (the same files copied to every node publish once).
//! - **Adopting.** Every node reads `active` twice a second; a generation
//!   it does not run is rebuilt from the published files (fetched into its
//!   archive, their hashes checked) and activated with the cluster's
//!   number. An operator's activate or rollback on any node publishes the
//!   chosen generation the same way.
//! - **Start-up.** A node joining a cluster that has an active generation
//!   runs it (its own folders count from their next change); the first
//!   node of a new cluster publishes the generation it started with.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use serde::{Deserialize, Serialize};

use crate::plugins::hex_sha256;
use crate::reload::{Files, GenerationRecord, Reloader, Sharing};

/// The key holding the next free number.
const NEXT: &str = "next";
/// The key holding the cluster's active generation.
const ACTIVE: &str = "active";

/// How often a node reads the cluster's active generation.
const READ_EVERY: Duration = Duration::from_millis(500);

/// How long one request to JetStream may take here.
const PATIENCE: Duration = Duration::from_secs(10);

/// The cluster's active generation, as stored under `active`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Published {
    pub record: GenerationRecord,
    /// Who published it, and why (a publish, an activation, a rollback).
    pub node: String,
    pub by: String,
    pub at: String,
}

/// The cluster's generations.
pub struct SharedGenerations {
    kv: kv::Store,
    files: object_store::ObjectStore,
    node: String,
    rt: tokio::runtime::Handle,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl SharedGenerations {
    /// Opens (creating if need be) the bucket and the files' store.
    pub async fn open(
        js: &jetstream::Context,
        prefix: &str,
        replicas: usize,
        node: &str,
    ) -> Result<SharedGenerations, String> {
        let kv = super::ensure_kv(
            js,
            kv::Config {
                bucket: format!("{prefix}_generations"),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let files = super::ensure_objects(
            js,
            object_store::Config {
                bucket: format!("{prefix}_files"),
                description: Some("Nudge: generations' files by content hash".into()),
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        Ok(SharedGenerations {
            kv,
            files,
            node: node.to_owned(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// The cluster's active generation, if one was published.
    pub async fn active(&self) -> Result<Option<Published>, String> {
        match self.kv.get(ACTIVE).await.map_err(err)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| format!("the cluster's active generation is unreadable: {e}")),
            None => Ok(None),
        }
    }

    /// A number no build in the cluster has had, at least `at_least`.
    pub async fn reserve(&self, at_least: u64) -> Result<u64, String> {
        for _ in 0..100 {
            let entry = self.kv.entry(NEXT).await.map_err(err)?;
            let current = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
                .and_then(|e| std::str::from_utf8(&e.value).ok()?.parse::<u64>().ok());
            let n = current.unwrap_or(1).max(at_least).max(1);
            let value = (n + 1).to_string().into_bytes().into();
            let stored = match &entry {
                Some(e) => self
                    .kv
                    .update(NEXT, value, e.revision)
                    .await
                    .map(|_| ())
                    .map_err(err),
                None => self.kv.create(NEXT, value).await.map(|_| ()).map_err(err),
            };
            if stored.is_ok() {
                return Ok(n);
            }
            // Another node took a number meanwhile: read again.
        }
        Err("generation numbers: the next free number kept changing".into())
    }

    /// Stores `files` (by content hash) that the store does not hold yet,
    /// then makes `record` the cluster's active generation. `first`: only
    /// if none is active yet (a new cluster's first node); returns whether
    /// it was stored.
    pub async fn publish(
        &self,
        record: &GenerationRecord,
        files: Files,
        by: &str,
        first: bool,
    ) -> Result<bool, String> {
        for (sha, bytes) in files {
            if self.files.info(&sha).await.is_ok() {
                continue;
            }
            let mut body: &[u8] = &bytes;
            self.files
                .put(sha.as_str(), &mut body)
                .await
                .map_err(|e| format!("storing file {sha}: {e}"))?;
        }
        let value = serde_json::to_vec(&Published {
            record: record.clone(),
            node: self.node.clone(),
            by: by.to_owned(),
            at: crate::event::format_ts(crate::event::now_ms()),
        })
        .map_err(err)?;
        if first {
            return Ok(self.kv.create(ACTIVE, value.into()).await.is_ok());
        }
        self.kv.put(ACTIVE, value.into()).await.map_err(err)?;
        Ok(true)
    }

    /// A published file's bytes, checked against their hash.
    pub async fn fetch(&self, sha: &str) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncReadExt;
        let mut object = self
            .files
            .get(sha)
            .await
            .map_err(|e| format!("file {sha}: {e}"))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| format!("file {sha}: {e}"))?;
        if hex_sha256(&bytes) != sha {
            return Err(format!("file {sha}: its bytes do not have that hash"));
        }
        Ok(bytes)
    }

    /// Runs `f` on the runtime from a blocking thread, within
    /// [`PATIENCE`].
    fn block<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        self.rt.block_on(async {
            tokio::time::timeout(PATIENCE, f)
                .await
                .map_err(|_| "the cluster's generations did not answer in time".to_string())?
        })
    }
}

impl Sharing for SharedGenerations {
    fn number(&self, at_least: u64) -> Result<u64, String> {
        self.block(self.reserve(at_least))
    }

    fn active_files(&self) -> Result<Option<Vec<(String, String)>>, String> {
        Ok(self.block(self.active())?.map(|p| {
            p.record
                .files
                .iter()
                .map(|f| (f.path.clone(), f.sha256.clone()))
                .collect()
        }))
    }

    fn publish(&self, record: &GenerationRecord, files: Files, by: &str) -> Result<(), String> {
        self.block(self.publish(record, files, by, false))
            .map(|_| ())
    }
}

/// Shares `reloader`'s generations through `shared` until the process
/// ends: publishes this node's generation if the cluster has none yet,
/// then adopts the cluster's active generation whenever it changes.
pub fn share(reloader: Arc<Reloader>, shared: Arc<SharedGenerations>) {
    reloader.share_with(shared.clone());
    tokio::spawn(async move {
        let mut failed: Option<(u64, std::time::Instant)> = None;
        loop {
            match shared.active().await {
                Ok(Some(p)) if p.record.number != reloader.active() => {
                    let number = p.record.number;
                    // A generation that does not build here is tried
                    // again every minute, not twice a second.
                    let retry = failed.is_none_or(|(n, at)| {
                        n != number || at.elapsed() > Duration::from_secs(60)
                    });
                    if retry {
                        match adopt(&reloader, &shared, p).await {
                            Ok(()) => failed = None,
                            Err(e) => {
                                tracing::error!(generation = number, "the cluster's active generation does not run here; this node keeps generation {}: {e}", reloader.active());
                                failed = Some((number, std::time::Instant::now()));
                            }
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if let Err(e) = publish_first(&reloader, &shared).await {
                        tracing::warn!("this node's generation not published (trying again): {e}");
                    }
                }
                Err(e) => tracing::debug!("the cluster's generation not read (trying again): {e}"),
            }
            tokio::time::sleep(READ_EVERY).await;
        }
    });
}

async fn adopt(
    reloader: &Arc<Reloader>,
    shared: &Arc<SharedGenerations>,
    p: Published,
) -> Result<(), String> {
    let (r, s) = (reloader.clone(), shared.clone());
    let by = format!("published by {} ({})", p.node, p.by);
    tokio::task::spawn_blocking(move || {
        r.adopt(p.record, &by, |sha| s.block(s.fetch(sha)))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(err)?
}

/// A new cluster's first node publishes the generation it started with,
/// under a number taken from the cluster.
async fn publish_first(
    reloader: &Arc<Reloader>,
    shared: &Arc<SharedGenerations>,
) -> Result<(), String> {
    let r = reloader.clone();
    let (mut record, files) = tokio::task::spawn_blocking(move || r.active_with_files())
        .await
        .map_err(err)?
        .map_err(|e| e.to_string())?;
    record.number = shared.reserve(reloader.next_number()).await?;
    if shared.publish(&record, files, "start", true).await? {
        tracing::info!(
            generation = record.number,
            "this node's generation published to the cluster"
        );
    }
    Ok(())
}
