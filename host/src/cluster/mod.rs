//! Several `nudge serve` nodes on NATS JetStream (`[cluster]`).
//!
//! Built so far: the slot layout and subjects, and the fenced commit log
//! that ownership rests on. See ARCHITECTURE.md, "The cluster", for the
//! whole design and what is not built yet.
//!
//! # Layout
//!
//! - [`slots`]: customers → virtual shards → slots; subject and stream names.
//! - [`log`]: claims (compare-and-set epochs) and fenced atomic commits.
//! - [`connect`]: a NATS connection and JetStream context from `[cluster]`.

pub mod log;
pub mod slots;

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
