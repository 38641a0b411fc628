//! Ingest into the cluster: accepted events go to the events stream, on
//! the subject of their customer's slot and virtual shard, with the
//! Segment `messageId` as JetStream's message id. An event counts as
//! acknowledged once JetStream acknowledged its publish (stored on a
//! majority of the stream's replicas); only then may the client get its
//! `200`.
//!
//! A publish that times out is sent again with the same message id until
//! [`PUBLISH_PATIENCE`] has passed: JetStream stores a message id once
//! within its duplicate window, so a retry after a lost acknowledgement
//! is reported as a duplicate, never stored twice. The same goes for a
//! client that sends an event again within that window; longer windows
//! (`[ingest] dedupe_window`, days) are the slot owner's to enforce.

use std::time::{Duration, Instant};

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

use super::slots::Layout;

/// How long a batch of events keeps being retried before the request
/// fails (and the client, answered 503, sends it again): a leader
/// election of the stream takes up to about 9 s.
pub const PUBLISH_PATIENCE: Duration = Duration::from_secs(15);

/// How long JetStream remembers message ids (retries after a lost
/// acknowledgement land well within it).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("events stream: {0}")]
    Nats(String),
    #[error("{unacknowledged} of {total} events not acknowledged by JetStream within {PUBLISH_PATIENCE:?}: {last}")]
    Unacknowledged {
        unacknowledged: usize,
        total: usize,
        last: String,
    },
}

/// One event to publish.
pub struct Event<'a> {
    pub customer: &'a str,
    pub message_id: &'a str,
    /// The event as accepted (JSON).
    pub body: Bytes,
}

/// Where an event was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    /// Its message id was already stored (a retry, or a repeat within the
    /// duplicate window): `seq` is the first copy's.
    pub duplicate: bool,
}

#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    layout: Layout,
}

impl Publisher {
    /// Opens the events stream, creating it (with `replicas`) if it does
    /// not exist.
    pub async fn open(
        js: jetstream::Context,
        layout: Layout,
        replicas: usize,
    ) -> Result<Publisher, IngestError> {
        super::ensure_stream(
            &js,
            stream::Config {
                name: layout.events_stream(),
                subjects: vec![layout.all_events()],
                num_replicas: replicas,
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            },
        )
        .await
        .map_err(IngestError::Nats)?;
        Ok(Publisher { js, layout })
    }

    /// Publishes `events` (pipelined) and returns, in the same order,
    /// where each was stored, once JetStream acknowledged every one.
    pub async fn publish(&self, events: &[Event<'_>]) -> Result<Vec<Stored>, IngestError> {
        let started = Instant::now();
        let mut out: Vec<Option<Stored>> = vec![None; events.len()];
        let mut last_error = String::new();
        loop {
            // Send everything not yet acknowledged, then collect the acks.
            let mut waiting: Vec<(usize, PublishAckFuture)> = Vec::new();
            for (i, e) in events.iter().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                let mut h = HeaderMap::new();
                h.insert(NATS_MESSAGE_ID, e.message_id);
                match self
                    .js
                    .publish_with_headers(self.layout.event_subject(e.customer), h, e.body.clone())
                    .await
                {
                    Ok(ack) => waiting.push((i, ack)),
                    Err(err) => last_error = err.to_string(),
                }
            }
            for (i, ack) in waiting {
                match ack.await {
                    Ok(ack) => {
                        out[i] = Some(Stored {
                            seq: ack.sequence,
                            duplicate: ack.duplicate,
                        })
                    }
                    Err(err) => last_error = err.to_string(),
                }
            }
            let missing = out.iter().filter(|s| s.is_none()).count();
            if missing == 0 {
                return Ok(out.into_iter().flatten().collect());
            }
            if started.elapsed() >= PUBLISH_PATIENCE {
                return Err(IngestError::Unacknowledged {
                    unacknowledged: missing,
                    total: events.len(),
                    last: last_error,
                });
            }
            tracing::debug!(
                missing,
                "events not acknowledged yet, publishing again: {last_error}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The events of `slot` stored after sequence `after`, in order, at
    /// most `limit`.
    pub async fn events(
        &self,
        slot: u16,
        after: u64,
        limit: usize,
    ) -> Result<Vec<super::Record>, IngestError> {
        super::read(
            &self.js,
            &self.layout.events_stream(),
            &self.layout.slot_events(slot),
            after,
            limit,
        )
        .await
        .map_err(IngestError::Nats)
    }
}
