//! Members: which nodes are alive, as keys with a time to live in a
//! JetStream key-value bucket (`<prefix>_members`).
//!
//! A node joins by creating its key with a TTL (so two live nodes can
//! never share a name) and renews it well within the TTL. A renewal
//! names the revision it replaces, so a node whose key expired (it was
//! frozen or cut off past the TTL) learns it from its next renewal
//! ([`MemberError::Expired`]) instead of silently writing itself back.
//! JetStream removes an expired key by itself and tells watchers, so the
//! others see a node leave within the TTL plus a moment.
//!
//! Membership is for liveness only (who should own what); exclusive
//! ownership comes from the fenced log ([`super::log`]).

use std::time::Duration;

use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_TTL};
use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures_util::TryStreamExt;

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("another live node is named {node:?}: node names must be unique")]
    NameTaken { node: String },
    /// Our key expired or was replaced: rejoin, and own nothing meanwhile.
    #[error("membership of {node:?} expired")]
    Expired { node: String },
    #[error("members bucket: {0}")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> MemberError {
    MemberError::Nats(e.to_string())
}

/// What a member says of itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub node: String,
    /// Where its API answers (for forwarding), e.g. `http://10.0.0.1:8080`.
    pub api: String,
}

/// The members bucket.
#[derive(Clone)]
pub struct Members {
    js: jetstream::Context,
    kv: kv::Store,
    bucket: String,
    ttl: Duration,
}

/// This node's membership: its key's revision, renewed by [`Members::renew`].
#[derive(Clone, Debug)]
pub struct Membership {
    pub member: Member,
    /// Its key in the bucket (the member's name, or a role's name).
    pub key: String,
    pub revision: u64,
}

impl Members {
    /// Opens (or creates) the bucket; keys live `ttl` (whole seconds, at
    /// least 1) unless renewed.
    pub async fn open(
        js: jetstream::Context,
        prefix: &str,
        replicas: usize,
        ttl: Duration,
    ) -> Result<Members, MemberError> {
        Members::open_bucket(js, &format!("{prefix}_members"), replicas, ttl).await
    }

    /// [`Members::open`] on the bucket named `bucket` (the assigner's
    /// lease is a member of a bucket of its own).
    pub async fn open_bucket(
        js: jetstream::Context,
        bucket: &str,
        replicas: usize,
        ttl: Duration,
    ) -> Result<Members, MemberError> {
        let bucket = bucket.to_owned();
        let ttl = ttl.max(Duration::from_secs(1));
        let kv = super::ensure_kv(
            &js,
            kv::Config {
                bucket: bucket.clone(),
                history: 1,
                num_replicas: replicas,
                // Per-key TTLs, and a marker that tells watchers when a
                // key expired.
                limit_markers: Some(ttl),
                ..Default::default()
            },
        )
        .await
        .map_err(MemberError::Nats)?;
        Ok(Members {
            js,
            kv,
            bucket,
            ttl,
        })
    }

    /// How long a member's key lives unless renewed.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Joins as `member`. A key of the same name that is still alive
    /// (another node, or this node's previous life not yet expired) is
    /// waited out for one TTL, then refused.
    pub async fn join(&self, member: Member) -> Result<Membership, MemberError> {
        let value = Bytes::from(serde_json::to_vec(&member).map_err(nats)?);
        let started = std::time::Instant::now();
        loop {
            match self
                .kv
                .create_with_ttl(&member.node, value.clone(), self.ttl)
                .await
            {
                Ok(revision) => {
                    return Ok(Membership {
                        key: member.node.clone(),
                        member,
                        revision,
                    })
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if started.elapsed() > self.ttl + Duration::from_secs(1) {
                        return Err(MemberError::NameTaken { node: member.node });
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(nats(e)),
            }
        }
    }

    /// Takes `key` for `member` if no live key has that name, without
    /// waiting: `None` when one does (a role someone else holds, such as
    /// the assigner's lease).
    pub async fn try_claim(
        &self,
        key: &str,
        member: Member,
    ) -> Result<Option<Membership>, MemberError> {
        let value = Bytes::from(serde_json::to_vec(&member).map_err(nats)?);
        match self.kv.create_with_ttl(key, value, self.ttl).await {
            Ok(revision) => Ok(Some(Membership {
                member,
                key: key.to_owned(),
                revision,
            })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// The member under `name`, if its key is alive.
    pub async fn get(&self, name: &str) -> Result<Option<Member>, MemberError> {
        Ok(self
            .kv
            .get(name)
            .await
            .map_err(nats)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Renews the membership's key for another TTL. [`MemberError::Expired`]
    /// when it is no longer ours (expired, or taken over after expiry).
    pub async fn renew(&self, m: &mut Membership) -> Result<(), MemberError> {
        // A KV update would drop the TTL; a raw publish keeps it, and the
        // expected sequence makes it a compare-and-set on our revision.
        let mut h = HeaderMap::new();
        h.insert(NATS_MESSAGE_TTL, format!("{}s", self.ttl.as_secs()));
        h.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            HeaderValue::from(m.revision),
        );
        let value = Bytes::from(serde_json::to_vec(&m.member).map_err(nats)?);
        let subject = format!("$KV.{}.{}", self.bucket, m.key);
        let ack = self
            .js
            .publish_with_headers(subject, h, value)
            .await
            .map_err(nats)?
            .await;
        match ack {
            Ok(ack) => {
                m.revision = ack.sequence;
                Ok(())
            }
            Err(e) if super::refused_as_stale(&e) => Err(MemberError::Expired {
                node: m.key.clone(),
            }),
            Err(e) => Err(nats(e)),
        }
    }

    /// Leaves at once (a clean shutdown), so nobody waits out the TTL.
    pub async fn leave(&self, m: &Membership) -> Result<(), MemberError> {
        self.kv.purge(&m.key).await.map_err(nats)
    }

    /// The live members, by name. Listing creates a consumer, which needs
    /// the cluster's meta leader: it is tried again while one is elected.
    pub async fn list(&self) -> Result<Vec<Member>, MemberError> {
        let started = std::time::Instant::now();
        loop {
            match self.list_once().await {
                Err(MemberError::Nats(e)) if started.elapsed() < super::READ_PATIENCE => {
                    tracing::debug!("listing members, trying again: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    async fn list_once(&self) -> Result<Vec<Member>, MemberError> {
        let mut names: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(nats)?
            .try_collect()
            .await
            .map_err(nats)?;
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(v) = self.kv.get(&name).await.map_err(nats)? {
                if let Ok(m) = serde_json::from_slice::<Member>(&v) {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }
}
