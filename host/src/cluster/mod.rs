//! Several `nudge serve` nodes on NATS JetStream (`[cluster]`).
//!
//! See ARCHITECTURE.md, "The cluster", for the design, the path of an
//! event and the failure cases.
//!
//! # Layout
//!
//! - [`slots`]: customers → virtual shards → slots; subject and stream names.
//! - [`ingest`]: events into the events stream, acknowledged once stored.
//! - [`log`]: claims (compare-and-set epochs) and fenced atomic commits.
//! - [`members`]: live nodes as keys with a time to live.
//! - [`assign`]: the slot map and the assigner's policy.
//! - [`controls`]: pause, resume and quarantine shared by every node.
//! - [`generations`]: generations published cluster-wide, numbered by the
//!   cluster.
//! - [`snapshot`]: slot snapshots in the object store; compacting the log.
//! - [`status`]: members, the map, epochs and streams, for `nudge status`.
//! - [`tenure`]: which slots this node decides now, as its workers see it.
//! - [`feed`]: a held slot's events to its worker.
//! - [`node`]: one node: membership, assigner, taking and giving up
//!   slots, committing through the log.
//! - [`connect`]: a NATS connection and JetStream context from `[cluster]`.

pub mod assign;
pub mod controls;
pub mod feed;
pub mod generations;
pub mod ingest;
pub mod log;
pub mod members;
pub mod node;
pub mod slots;
pub mod snapshot;
pub mod status;
pub mod tenure;

use std::time::Duration;

use crate::config::ClusterConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NATS credentials file {path} (NUDGE_NATS_CREDS): {source}")]
    Creds {
        path: String,
        source: std::io::Error,
    },
    #[error("connecting to NATS ({servers}): {message}")]
    Connect { servers: String, message: String },
}

/// Connects to `[cluster] servers` with the credentials in the environment
/// (`NUDGE_NATS_CREDS`, or `NUDGE_NATS_USER` and `NUDGE_NATS_PASSWORD`, or
/// `NUDGE_NATS_TOKEN`), and a JetStream context whose requests time out
/// after `request_timeout`.
pub async fn connect(
    cfg: &ClusterConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(async_nats::Client, async_nats::jetstream::Context), ConnectError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("nudge {}", cfg.node))
        .request_timeout(Some(cfg.request_timeout.0))
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect();
    if let Some(path) = env("NUDGE_NATS_CREDS") {
        opts = opts
            .credentials_file(&path)
            .await
            .map_err(|source| ConnectError::Creds { path, source })?;
    } else if let (Some(user), Some(password)) =
        (env("NUDGE_NATS_USER"), env("NUDGE_NATS_PASSWORD"))
    {
        opts = opts.user_and_password(user, password);
    } else if let Some(token) = env("NUDGE_NATS_TOKEN") {
        opts = opts.token(token);
    }
    let servers: Vec<&str> = cfg.servers.iter().map(String::as_str).collect();
    let client = opts
        .connect(servers.clone())
        .await
        .map_err(|e| ConnectError::Connect {
            servers: servers.join(", "),
            message: e.to_string(),
        })?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(cfg.request_timeout.0)
        .build(client.clone());
    Ok((client, js))
}

/// A message as stored in a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Stream sequence.
    pub seq: u64,
    pub subject: String,
    /// Its `Nats-Msg-Id`, if it had one.
    pub message_id: Option<String>,
    pub payload: bytes::Bytes,
}

/// How long a read keeps trying while the NATS cluster recovers (a
/// leader election takes up to about 9 s).
pub(crate) const READ_PATIENCE: Duration = Duration::from_secs(20);

/// The messages of `stream` on `filter` stored after sequence `after`, in
/// order, at most `limit`: what was there when the read began.
pub(crate) async fn read(
    js: &async_nats::jetstream::Context,
    stream: &str,
    filter: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<Record>, String> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures_util::StreamExt;
    let stream = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?;
    // Creating a consumer needs the cluster's meta leader, which a NATS
    // node's loss can take seconds to re-elect: try again meanwhile.
    let started = std::time::Instant::now();
    let consumer = loop {
        let created = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await;
        match created {
            Ok(c) => break c,
            Err(e) if started.elapsed() < READ_PATIENCE => {
                tracing::debug!("reading {filter}, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let pending = consumer.cached_info().num_pending as usize;
    if pending == 0 {
        return Ok(Vec::new());
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while out.len() < pending.min(limit) {
        // Messages purged since the read began (a snapshot's compaction)
        // are never delivered: each message says how many are left, and a
        // read that stalls fails rather than wait for ever.
        let next = tokio::time::timeout(READ_PATIENCE, messages.next())
            .await
            .map_err(|_| {
                format!(
                    "reading {filter}: stalled after {} of {pending} messages",
                    out.len()
                )
            })?;
        let Some(m) = next else {
            break;
        };
        let m = m.map_err(|e| e.to_string())?;
        let info = m.info().map_err(|e| e.to_string())?;
        let (seq, left) = (info.stream_sequence, info.pending);
        out.push(Record {
            seq,
            subject: m.subject.to_string(),
            message_id: m
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.to_string()),
            payload: m.payload.clone(),
        });
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

/// Creates `config`'s stream if it does not exist, and waits until it has
/// a leader (a new replicated stream elects one first; a publish before
/// that finds no stream).
pub(crate) async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> Result<(), String> {
    let name = config.name.clone();
    let replicated = config.num_replicas > 1;
    js.get_or_create_stream(config)
        .await
        .map_err(|e| e.to_string())?;
    if replicated {
        wait_for_leader(js, &name).await?;
    }
    Ok(())
}

/// Opens the KV bucket `config.bucket`, creating it as configured if it
/// does not exist, and (replicated) waits until it has a leader.
pub(crate) async fn ensure_kv(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::kv::Config,
) -> Result<async_nats::jetstream::kv::Store, String> {
    let (bucket, replicated) = (config.bucket.clone(), config.num_replicas > 1);
    let kv = match js.get_key_value(&bucket).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(config)
            .await
            .map_err(|e| e.to_string())?,
    };
    if replicated {
        wait_for_leader(js, &format!("KV_{bucket}")).await?;
    }
    Ok(kv)
}

/// [`ensure_kv`] for an object store.
pub(crate) async fn ensure_objects(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::object_store::Config,
) -> Result<async_nats::jetstream::object_store::ObjectStore, String> {
    let (bucket, replicated) = (config.bucket.clone(), config.num_replicas > 1);
    let objects = match js.get_object_store(&bucket).await {
        Ok(o) => o,
        Err(_) => js
            .create_object_store(config)
            .await
            .map_err(|e| e.to_string())?,
    };
    if replicated {
        wait_for_leader(js, &format!("OBJ_{bucket}")).await?;
    }
    Ok(objects)
}

/// Waits until the replicated stream `name` has a leader (a new one elects
/// it first; a request before that finds no responders).
pub(crate) async fn wait_for_leader(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    loop {
        let info = match js.get_stream_no_info(name).await {
            Ok(s) => s.get_info().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match info {
            Ok(i) if i.cluster.as_ref().is_some_and(|c| c.leader.is_some()) => return Ok(()),
            _ if started.elapsed() < READ_PATIENCE => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => {
                return Err(format!(
                    "stream {name} has no leader after {READ_PATIENCE:?}"
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether JetStream error `code` says an expected last sequence did not
/// match: 10071, or 10164 (reported without the sequence, by replicated
/// streams and for a subject with a write in flight).
pub(crate) fn wrong_last_sequence(code: u64) -> bool {
    matches!(code, 10071 | 10164)
}

/// Whether a publish was refused because its expected last sequence was
/// stale (a compare-and-set that lost).
pub(crate) fn refused_as_stale(e: &async_nats::jetstream::context::PublishError) -> bool {
    e.kind() == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence
        || error_code(e).is_some_and(wrong_last_sequence)
}

/// The JetStream API error code behind `err`, if any.
fn error_code(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(api) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(api.error_code().0);
        }
        cur = e.source();
    }
    None
}
