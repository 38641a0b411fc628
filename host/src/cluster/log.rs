//! The slots' commit log on JetStream, fenced by epochs.
//!
//! Each slot has two subjects in the log stream: `…log.<slot>.epoch`,
//! where an owner claims the slot, and `…log.<slot>.commit`, where the
//! owner's commits go. A claim is a compare-and-set: it names the epoch it
//! replaces (the stream sequence of the last claim, 0 for none) as its
//! expected last subject sequence, so of two nodes claiming from the same
//! epoch exactly one wins. The claim's stream sequence is the new owner's
//! fencing token ([`Epoch::seq`]).
//!
//! A commit is one JetStream atomic batch (all of its records are stored,
//! or none). Its first message expects the epoch subject's last sequence
//! to be the committer's token, so once a newer claim exists, JetStream
//! refuses the stale owner's commits: **only the slot's current epoch can
//! commit**. That, not leases or consumer pinning, is what makes ownership
//! exclusive: a node that was frozen past its lease learns it was replaced
//! from its first refused commit ([`LogError::Fenced`]).
//!
//! Every record carries a message id derived from the commit's id, so a
//! commit retried after a lost acknowledgement is refused as a duplicate
//! (JetStream's de-duplication window) and reported as committed, never
//! stored twice. A slot has at most one commit in flight: a replicated
//! stream refuses a second fenced write on the same subject while one is
//! pending.

use std::time::Duration;

use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::{self, publish::PublishAck, response::Response, stream};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use super::slots::Layout;
pub use super::Record;

/// JetStream's header naming the subject whose last sequence
/// `Nats-Expected-Last-Subject-Sequence` checks (server 2.11+; async-nats
/// has no constant for it).
const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// JetStream's error code for an atomic batch that held a message id
/// already stored.
const BATCH_DUPLICATE: u64 = 10201;

/// Records in one commit at most (JetStream's limit for an atomic batch).
pub const MAX_RECORDS: usize = 1000;

/// How long stored commits are de-duplicated by message id.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A newer claim exists: this node no longer owns the slot and must
    /// drop it (nothing of the refused commit was stored).
    #[error("slot {slot}: fenced, epoch {epoch} was replaced by a newer claim")]
    Fenced { slot: u16, epoch: u64 },
    /// Another node claimed the slot first (from the same epoch).
    #[error("slot {slot}: claimed by another node first")]
    Lost { slot: u16 },
    #[error("commit of {records} records: at most {MAX_RECORDS}")]
    TooLarge { records: usize },
    #[error("a commit needs at least one record")]
    Empty,
    /// JetStream refused or did not answer; the same call may be retried.
    #[error("jetstream: {0}")]
    Nats(String),
}

pub(super) type Result<T> = std::result::Result<T, LogError>;

pub(super) fn nats(e: impl std::fmt::Display) -> LogError {
    LogError::Nats(e.to_string())
}

/// A node's ownership of a slot: the stream sequence of its claim.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Epoch {
    pub slot: u16,
    pub seq: u64,
    pub node: String,
}

/// The outcome of a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Stream sequence of the commit's last record; `None` when it was a
    /// retry of a commit already stored.
    pub last_seq: Option<u64>,
}

/// The log of every slot of one cluster.
#[derive(Clone)]
pub struct SlotLog {
    client: async_nats::Client,
    js: jetstream::Context,
    layout: Layout,
}

impl SlotLog {
    /// Opens the log stream, creating it (with `replicas`) if it does not
    /// exist.
    pub async fn open(
        client: async_nats::Client,
        js: jetstream::Context,
        layout: Layout,
        replicas: usize,
    ) -> Result<SlotLog> {
        super::ensure_stream(
            &js,
            stream::Config {
                name: layout.log_stream(),
                subjects: vec![layout.all_log()],
                num_replicas: replicas,
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                allow_atomic_publish: true,
                ..Default::default()
            },
        )
        .await
        .map_err(nats)?;
        Ok(SlotLog { client, js, layout })
    }

    /// The NATS server that leads the log stream's replicas (`nudge
    /// status` shows it; the tests kill it).
    pub async fn leader(&self) -> Result<Option<String>> {
        let info = self
            .js
            .get_stream_no_info(self.layout.log_stream())
            .await
            .map_err(nats)?
            .get_info()
            .await
            .map_err(nats)?;
        Ok(info.cluster.and_then(|c| c.leader))
    }

    /// The slot's current epoch, if it was ever claimed.
    pub async fn epoch(&self, slot: u16) -> Result<Option<Epoch>> {
        let stream = self
            .js
            .get_stream_no_info(self.layout.log_stream())
            .await
            .map_err(nats)?;
        match stream
            .get_last_raw_message_by_subject(&self.layout.epoch_subject(slot))
            .await
        {
            Ok(m) => {
                let node = serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .ok()
                    .and_then(|v| v["node"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                Ok(Some(Epoch {
                    slot,
                    seq: m.sequence,
                    node,
                }))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Claims `slot` for `node`, replacing epoch `replaces` (`None`: the
    /// slot was never claimed). Exactly one of several nodes claiming from
    /// the same epoch gets it; the others get [`LogError::Lost`].
    pub async fn claim(&self, slot: u16, node: &str, replaces: Option<&Epoch>) -> Result<Epoch> {
        let mut h = HeaderMap::new();
        h.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            HeaderValue::from(replaces.map_or(0, |e| e.seq)),
        );
        let body = serde_json::json!({ "node": node, "replaces": replaces.map(|e| e.seq) });
        let ack = self
            .js
            .publish_with_headers(
                self.layout.epoch_subject(slot),
                h,
                Bytes::from(body.to_string()),
            )
            .await
            .map_err(nats)?
            .await;
        match ack {
            Ok(ack) => Ok(Epoch {
                slot,
                seq: ack.sequence,
                node: node.to_owned(),
            }),
            Err(e) if super::refused_as_stale(&e) => Err(LogError::Lost { slot }),
            Err(e) => Err(nats(e)),
        }
    }

    /// Stores `records` as one commit of `epoch`'s slot, all or none.
    /// `id` names the commit uniquely and stably (a retry of the same
    /// commit passes the same id and records).
    pub async fn commit(&self, epoch: &Epoch, id: &str, records: &[Bytes]) -> Result<Committed> {
        let subject = self.layout.commit_subject(epoch.slot);
        self.commit_on(subject, epoch, id, records).await
    }

    /// Stores `records` on `subject` (a subject of the log stream) as one
    /// batch fenced by `epoch`, like [`SlotLog::commit`]: how a slot's
    /// snapshot pointer is written, so that a stale owner's is refused.
    pub async fn commit_on(
        &self,
        subject: String,
        epoch: &Epoch,
        id: &str,
        records: &[Bytes],
    ) -> Result<Committed> {
        if records.is_empty() {
            return Err(LogError::Empty);
        }
        if records.len() > MAX_RECORDS {
            return Err(LogError::TooLarge {
                records: records.len(),
            });
        }
        // A fresh batch id per attempt: an abandoned attempt's batch never
        // mixes with the retry's.
        let batch = batch_id();
        let last = records.len();
        for (i, payload) in records.iter().enumerate() {
            let n = i + 1;
            let mut h = HeaderMap::new();
            h.insert(NATS_BATCH_ID, batch.as_str());
            h.insert(NATS_BATCH_SEQUENCE, HeaderValue::from(n as u64));
            h.insert(NATS_MESSAGE_ID, format!("{id}:{n}"));
            if n == 1 {
                h.insert(
                    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    HeaderValue::from(epoch.seq),
                );
                h.insert(
                    HeaderName::from_static(EXPECTED_SUBJECT),
                    self.layout.epoch_subject(epoch.slot),
                );
            }
            if n == last {
                h.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
            }
            if n == 1 || n == last {
                // The first message is answered (empty, or an error such
                // as the fence); the last with the batch's acknowledgement.
                let reply = self
                    .client
                    .request_with_headers(subject.clone(), h, payload.clone())
                    .await
                    .map_err(nats)?;
                if reply.payload.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Response<PublishAck>>(&reply.payload) {
                    Ok(Response::Ok(ack)) => {
                        return Ok(Committed {
                            last_seq: Some(ack.sequence),
                        })
                    }
                    Ok(Response::Err { error }) => {
                        let code = error.error_code().0;
                        return if super::wrong_last_sequence(code) {
                            Err(LogError::Fenced {
                                slot: epoch.slot,
                                epoch: epoch.seq,
                            })
                        } else if code == BATCH_DUPLICATE {
                            Ok(Committed { last_seq: None })
                        } else {
                            Err(nats(error))
                        };
                    }
                    Err(e) => return Err(nats(format!("unreadable reply to a commit: {e}"))),
                }
            } else {
                self.client
                    .publish_with_headers(subject.clone(), h, payload.clone())
                    .await
                    .map_err(nats)?;
            }
        }
        Err(nats("the commit's last message was not acknowledged"))
    }

    /// The slot's commits stored after stream sequence `after`, in order,
    /// at most `limit`.
    pub async fn commits(&self, slot: u16, after: u64, limit: usize) -> Result<Vec<Record>> {
        super::read(
            &self.js,
            &self.layout.log_stream(),
            &self.layout.commit_subject(slot),
            after,
            limit,
        )
        .await
        .map_err(nats)
    }
}

impl SlotLog {
    /// Every claim of `slot` still in the log, in order (`nudge status`
    /// and the tests check commits against them).
    pub async fn claims(&self, slot: u16) -> Result<Vec<Record>> {
        super::read(
            &self.js,
            &self.layout.log_stream(),
            &self.layout.epoch_subject(slot),
            0,
            usize::MAX,
        )
        .await
        .map_err(nats)
    }
}

/// The epoch a commit record was made under, from its message id
/// (`<node>.<slot>.<epoch>.<n>:<record>`, as nodes name their commits).
pub fn epoch_of_record(message_id: &str) -> Option<u64> {
    let head = message_id.rsplit_once(':')?.0;
    let mut parts = head.rsplitn(3, '.');
    let _n = parts.next()?;
    parts.next()?.parse().ok()
}

/// A batch id: 32 random hex digits (JetStream allows up to 64 bytes).
fn batch_id() -> String {
    let mut b = [0u8; 16];
    // Without entropy, the time still makes ids of one process distinct.
    if getrandom::fill(&mut b).is_err() {
        b = crate::event::now_ms()
            .to_be_bytes()
            .repeat(2)
            .try_into()
            .unwrap_or([7; 16]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
