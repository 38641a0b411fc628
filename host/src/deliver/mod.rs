//! Delivery: the outbox to the channels.
//!
//! A `sent` decision's [`Delivery`] is written to the outbox in the same
//! commit as the decision, and handed here only once that commit is on
//! disk. Here the channel plugin renders it into outbound messages, and the
//! host sends them, checking each against the capabilities the plugin was
//! granted: email through the SMTP relay, HTTP only to allowlisted hosts,
//! actions onto the contact centre's queue. A delivery leaves the outbox
//! when every message of it went out; a failure is retried with exponential
//! backoff, and one that fails for good goes to the dead letters.
//!
//! Every message carries the delivery's idempotency key (the SMTP
//! `Message-ID`, the HTTP `Idempotency-Key`), derived from the decision, so
//! a retry after a crash is recognisable by the receiver.

mod backlog;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lettre::message::header::ContentType;
use lettre::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config;
use crate::controls::Controls;
use crate::event::{format_ts, now_ms};
use crate::generation::Current;
use crate::ledger::{direct_edit, DELIVERER};
use crate::mail::{MailError, Mailer};
use crate::metrics::Metrics;
use crate::plugins::{Call, Fault, Instances, Outbound, Plugin, Recipient, Runtime, Treatment};
use crate::rules::Campaign;
use crate::store::Store;

/// Whether this node holds a customer's slot (a cluster node).
pub type Owns = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// One `sent` decision's delivery, as kept in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Idempotency key: the same decision always gets the same id.
    pub id: String,
    pub customer: String,
    pub campaign: String,
    pub channel: String,
    /// The channel plugin that renders it.
    pub plugin: String,
    /// Decision time.
    pub ts: i64,
    /// `messageId` of the event behind the decision.
    pub trigger: String,
    /// Why the customer is contacted: the campaign's description.
    pub why: String,
    /// After this the action is stale: not delivered, not shown to agents.
    pub expires_at: Option<i64>,
    /// Set when the decision came from a timer that fired late.
    pub late_ms: Option<i64>,
    pub treatment: Treatment,
    pub recipient: Recipient,
    #[serde(default)]
    pub attempts: u32,
    /// Not before (ms since the epoch).
    #[serde(default)]
    pub next_at: i64,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub failed_at: Option<i64>,
}

impl Delivery {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        campaign: &Campaign,
        plugin: &str,
        customer: &str,
        ts: i64,
        trigger: &str,
        late_ms: Option<i64>,
        treatment: Treatment,
        recipient: Recipient,
    ) -> Delivery {
        let mut h = Sha256::new();
        for part in [customer, &campaign.id, &ts.to_string(), trigger] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let digest = h.finalize();
        let id: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Delivery {
            id: format!("nd-{id}"),
            customer: customer.to_owned(),
            campaign: campaign.id.clone(),
            channel: campaign.channel.clone(),
            plugin: plugin.to_owned(),
            ts,
            trigger: trigger.to_owned(),
            why: campaign.description.clone(),
            expires_at: campaign.expires_ms.map(|e| ts.saturating_add(e)),
            late_ms,
            treatment,
            recipient,
            attempts: 0,
            next_at: 0,
            last_error: None,
            failed_at: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Key of the `n`th message of this delivery (most have one).
    fn key(&self, n: usize) -> String {
        if n == 0 {
            self.id.clone()
        } else {
            format!("{}-{n}", self.id)
        }
    }
}

/// An action on the contact centre's queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentAction {
    pub id: String,
    pub customer: String,
    pub campaign: String,
    /// What to do ("Update client on new term deposit rates").
    pub script: String,
    pub subject: String,
    pub body: String,
    /// Why this customer, why now.
    pub why: String,
    pub trigger: String,
    /// When the decision was made (RFC 3339).
    pub decided_at: String,
    pub expires_at: Option<String>,
    /// Expiry, ms since the epoch (for filtering).
    pub expires_ms: Option<i64>,
    pub late_ms: Option<i64>,
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// `accepted` or `declined`, once an agent recorded it.
    pub outcome: Option<String>,
    pub outcome_at: Option<String>,
    pub outcome_note: Option<String>,
}

/// How one attempt ended.
#[derive(Debug)]
enum Attempt {
    Done(Option<Box<AgentAction>>),
    /// Worth retrying (network, 5xx, a plugin trap).
    Retry(String),
    /// Will fail the same way again (refused capability, 4xx, plugin error).
    Permanent(String),
}

/// The host's side of sending: SMTP, HTTP and the capability checks.
struct Senders {
    smtp: Mailer,
    from: lettre::message::Mailbox,
    message_id_domain: String,
    http: reqwest::Client,
}

/// An outbox entry, or `None` (logged) if it cannot be read.
fn parse(bytes: &[u8]) -> Option<Delivery> {
    match serde_json::from_slice::<Delivery>(bytes) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!("unreadable outbox entry skipped: {e}");
            None
        }
    }
}

/// How long a delivery of a quarantined channel plugin waits before it is
/// looked at again.
const HOLD_MS: i64 = 5_000;

pub struct Deliverer {
    store: Store,
    current: Arc<Current>,
    instances: Instances,
    /// The generation the instances belong to: a change drops instances
    /// of channel plugins it no longer has.
    gen_number: u64,
    /// Channel plugin faults count towards quarantine; deliveries of a
    /// quarantined plugin wait (no attempt used) until it is released.
    pub controls: Option<Arc<Controls>>,
    /// In a cluster: whether this node holds the slot of a customer. A
    /// delivery of a slot it does not hold waits (no attempt used): the
    /// slot's owner sends it.
    pub owns: Option<Owns>,
    senders: Senders,
    cfg: config::Delivery,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Runtime,
    /// Pending deliveries held in memory, a bounded window onto the outbox.
    backlog: backlog::Backlog,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("smtp: {0}")]
    Smtp(String),
    #[error("http client: {0}")]
    Http(String),
    #[error("delivery runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What the persister and the API hand the deliverer.
pub enum Input {
    /// Outbox entries now durable.
    New(Vec<Vec<u8>>),
}

impl Deliverer {
    pub fn new(
        store: Store,
        current: Arc<Current>,
        runtime: Arc<Runtime>,
        smtp: &config::Smtp,
        cfg: config::Delivery,
        metrics: Arc<Metrics>,
    ) -> Result<Deliverer, DeliverError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let from = smtp
            .from
            .parse()
            .map_err(|e| DeliverError::Smtp(format!("[smtp] from {:?}: {e}", smtp.from)))?;
        let http = reqwest::Client::builder()
            .timeout(cfg.http_timeout.0)
            // A redirect could lead past the allowlist.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DeliverError::Http(e.to_string()))?;
        let senders = Senders {
            smtp: Mailer::new(smtp),
            from,
            message_id_domain: smtp.message_id_domain.clone(),
            http,
        };
        let backlog = backlog::Backlog::new(store.budget().deliveries() / backlog::ENTRY_BYTES);
        Ok(Deliverer {
            store,
            current,
            instances: Instances::new(runtime),
            gen_number: 0,
            controls: None,
            owns: None,
            senders,
            cfg,
            metrics,
            rt,
            backlog,
        })
    }

    fn add(&mut self, bytes: &[u8]) {
        if let Some(d) = parse(bytes) {
            let spilled = self.backlog.spilled();
            self.backlog.offer(d, now_ms());
            if !spilled && self.backlog.spilled() {
                tracing::warn!(
                    window = self.backlog.cap(),
                    "deliveries are behind: pending deliveries past the window wait in the outbox on disk"
                );
            }
        }
    }

    /// Brings waiting outbox entries into the window when it has room.
    fn refill(&mut self) -> Result<(), DeliverError> {
        let now = now_ms();
        if self.backlog.pass_at().is_some_and(|t| t <= now) {
            self.backlog.refill(&self.store, now, parse)?;
            if !self.backlog.spilled() {
                tracing::info!("deliveries caught up: every pending delivery is in memory again");
            }
        }
        Ok(())
    }

    /// Delivers until `input` closes, then returns (what is left stays in
    /// the outbox for the next start).
    pub fn run(mut self, input: Receiver<Input>) -> Result<(), DeliverError> {
        // The runtime is entered only to send (`block_on`) and to drop the
        // pooled SMTP connections (tokio sockets) at the end: channel
        // plugins render outside it, since plugin code never runs on a
        // runtime thread.
        let result = self.deliver_until_closed(input);
        let handle = self.rt.handle().clone();
        let _in_rt = handle.enter();
        drop(self);
        result
    }

    fn deliver_until_closed(&mut self, input: Receiver<Input>) -> Result<(), DeliverError> {
        self.backlog.resume();
        self.refill()?;
        if !self.backlog.is_empty() {
            tracing::info!(
                pending = self.backlog.len(),
                more_on_disk = self.backlog.spilled(),
                "resuming deliveries from the outbox"
            );
        }
        loop {
            self.metrics
                .set_queue_depth("outbox", self.backlog.len() as i64);
            let now = now_ms();
            let next = match (self.backlog.next_due(), self.backlog.pass_at()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = match next {
                Some(t) if t <= now => Duration::ZERO,
                Some(t) => Duration::from_millis((t - now).min(1000) as u64),
                None => Duration::from_secs(1),
            };
            match input.recv_timeout(wait) {
                Ok(Input::New(entries)) => {
                    for e in entries {
                        self.add(&e);
                    }
                    while let Ok(Input::New(entries)) = input.try_recv() {
                        for e in entries {
                            self.add(&e);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            self.refill()?;
            self.round()?;
        }
    }

    /// One round: every due delivery (up to the concurrency), at once.
    fn round(&mut self) -> Result<(), DeliverError> {
        let now = now_ms();
        let mut due: Vec<Delivery> = Vec::new();
        while due.len() < self.cfg.concurrency.max(1) {
            match self.backlog.pop_due(now) {
                Some(d) => due.push(d),
                None => break,
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        let gen = self.current.load();
        if gen.number != self.gen_number {
            self.gen_number = gen.number;
            self.instances.retain(gen.plugins.iter());
        }
        let view = self.controls.as_ref().map(|c| c.view());
        // Render everything first (plugin calls are synchronous), then send
        // everything concurrently.
        let mut jobs = Vec::with_capacity(due.len());
        for mut d in due {
            let expired = d.expires_at.is_some_and(|exp| exp < now);
            let held = !expired
                && gen
                    .plugin(&d.plugin)
                    .is_some_and(|p| view.as_ref().is_some_and(|v| v.plugin_quarantined(p)));
            let elsewhere = self.owns.as_ref().is_some_and(|owns| !owns(&d.customer));
            if elsewhere {
                d.next_at = now + HOLD_MS;
                self.backlog.offer(d, now);
                continue;
            }
            if held {
                // Not an attempt: it goes once a fixed version is published
                // or the quarantine is lifted.
                d.next_at = now + HOLD_MS;
                self.metrics.delivery(&d.channel, "held");
                self.backlog.offer(d, now);
                continue;
            }
            let rendered = match (d.expires_at, gen.plugin(&d.plugin)) {
                (Some(exp), _) if exp < now => Err(Attempt::Permanent(format!(
                    "expired at {} before it could be delivered",
                    format_ts(exp)
                ))),
                (_, None) => Err(Attempt::Retry(format!(
                    "channel plugin {:?} is not loaded",
                    d.plugin
                ))),
                (_, Some(p)) => self.render(p, &d),
            };
            jobs.push((d, rendered));
        }
        let senders = &self.senders;
        let store = &self.store;
        let results: Vec<(Delivery, Attempt)> = self.rt.block_on(async {
            let mut sends: FuturesUnordered<_> = jobs
                .into_iter()
                .map(|(d, rendered)| async move {
                    let attempt = match rendered {
                        Err(a) => a,
                        Ok((plugin, out)) => senders.send(&plugin, &d, out).await,
                    };
                    (d, attempt)
                })
                .collect();
            let mut results = Vec::new();
            while let Some(first) = sends.next().await {
                // Marked delivered, on disk, as soon as the receiver has
                // it: a crash re-sends only what was in flight. Whatever
                // completed meanwhile shares the one fsync.
                let mut ready = vec![first];
                while let Some(Some(more)) = sends.next().now_or_never() {
                    ready.push(more);
                }
                let marked = ready
                    .iter()
                    .filter_map(|(d, a)| match a {
                        Attempt::Done(action) => Some((d, action.as_deref())),
                        _ => None,
                    })
                    .try_for_each(|(d, action)| mark_done(store, d, action))
                    .and_then(|()| store.sync());
                for (d, attempt) in ready {
                    let attempt = match (attempt, &marked) {
                        (Attempt::Done(_), Err(e)) => {
                            Attempt::Retry(format!("delivered, but not marked: {e}"))
                        }
                        (a, _) => a,
                    };
                    results.push((d, attempt));
                }
            }
            results
        });
        for (mut d, attempt) in results {
            match attempt {
                Attempt::Done(_) => {
                    self.metrics.delivery(&d.channel, "ok");
                    tracing::info!(id = %d.id, customer = %d.customer, campaign = %d.campaign, channel = %d.channel, "delivered");
                    self.backlog.remove(&d.id);
                }
                Attempt::Retry(e) if d.attempts + 1 < self.cfg.max_attempts => {
                    d.attempts += 1;
                    let backoff = self
                        .cfg
                        .backoff_initial
                        .0
                        .saturating_mul(1 << (d.attempts - 1).min(20))
                        .min(self.cfg.backoff_max.0);
                    d.next_at = now_ms() + backoff.as_millis() as i64;
                    tracing::warn!(id = %d.id, channel = %d.channel, attempt = d.attempts, retry_in_ms = backoff.as_millis() as u64, "delivery failed, will retry: {e}");
                    d.last_error = Some(e);
                    self.metrics.delivery(&d.channel, "retry");
                    let failed =
                        direct_edit(&d.campaign, d.ts, DELIVERER, |f| f.delivery_failed += 1);
                    self.store
                        .outbox_update(&d.id, &d.to_json(), Some(failed))?;
                    self.backlog.retry(d, now_ms());
                }
                Attempt::Retry(e) | Attempt::Permanent(e) => {
                    d.attempts += 1;
                    d.failed_at = Some(now_ms());
                    tracing::error!(id = %d.id, channel = %d.channel, attempts = d.attempts, "delivery failed for good, moved to dead letters: {e}");
                    d.last_error = Some(e);
                    self.metrics.delivery(&d.channel, "dead");
                    let dead = direct_edit(&d.campaign, d.ts, DELIVERER, |f| {
                        f.delivery_failed += 1;
                        f.dead_lettered += 1;
                    });
                    self.store.dead_letter(&d.id, &d.to_json(), Some(dead))?;
                    self.backlog.remove(&d.id);
                }
            }
        }
        Ok(())
    }

    fn render(
        &mut self,
        plugin: &Plugin,
        d: &Delivery,
    ) -> Result<(Plugin, Vec<Outbound>), Attempt> {
        let call = Call::new(&plugin.name, &d.customer, now_ms(), None);
        let started = std::time::Instant::now();
        let result = self
            .instances
            .deliver(plugin, call, &d.treatment, &d.recipient);
        self.metrics.plugin_call(&plugin.name, started.elapsed());
        match result {
            Ok(out) if out.is_empty() => Err(Attempt::Permanent(format!(
                "channel plugin {} returned nothing to send",
                plugin.name
            ))),
            Ok(out) => match check_outbound(&out) {
                Ok(()) => Ok((plugin.clone(), out)),
                Err(e) => self.refuse(plugin, d, Fault::Limit(e)),
            },
            Err(fault) => self.refuse(plugin, d, fault),
        }
    }

    /// Counts a channel plugin's fault against it and says what becomes of
    /// the delivery.
    fn refuse(
        &mut self,
        plugin: &Plugin,
        d: &Delivery,
        fault: Fault,
    ) -> Result<(Plugin, Vec<Outbound>), Attempt> {
        self.metrics.plugin_fault(&plugin.name, fault.kind());
        // A refusal (no address, say) does not count towards
        // quarantine: see Controls::fault.
        if let Some(c) = &self.controls {
            let what = format!("{} on delivery {}: {fault}", fault.kind(), d.id);
            c.fault(plugin, &fault, &what);
        }
        match fault {
            // The plugin looked at this delivery and said no: it
            // will say no again.
            Fault::Returned(m) => Err(Attempt::Permanent(format!(
                "channel plugin {} refused: {m}",
                plugin.name
            ))),
            // What it asked for breaks a rule of the host: so would
            // the next rendering.
            Fault::Limit(m) => Err(Attempt::Permanent(format!(
                "channel plugin {}: {m}",
                plugin.name
            ))),
            other => Err(Attempt::Retry(format!(
                "channel plugin {}: {other}",
                plugin.name
            ))),
        }
    }
}

/// Headers the host sets or that belong to the connection, not to the
/// message: a plugin setting `Host` could reach a host off its allowlist
/// through a shared proxy, a second `Idempotency-Key` would defeat the
/// receiver's de-duplication, and the hop-by-hop ones are the transport's.
const HOST_HEADERS: &[&str] = &[
    "host",
    "idempotency-key",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Refuses what a channel plugin may not ask for, before any connection:
/// headers the host owns, and header names or values HTTP cannot carry.
fn check_outbound(out: &[Outbound]) -> Result<(), String> {
    for o in out {
        let Outbound::Http { headers, .. } = o else {
            continue;
        };
        for (name, value) in headers {
            let lower = name.to_ascii_lowercase();
            if HOST_HEADERS.contains(&lower.as_str()) {
                return Err(format!(
                    "header {name:?} is set by the host; plugins may set only ordinary headers"
                ));
            }
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("header name {name:?} is not a valid HTTP token"));
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                return Err(format!(
                    "header {name:?}: the value has a line break or another control character"
                ));
            }
        }
    }
    Ok(())
}

impl Senders {
    async fn send(&self, plugin: &Plugin, d: &Delivery, out: Vec<Outbound>) -> Attempt {
        let mut action = None;
        for (n, o) in out.into_iter().enumerate() {
            let key = d.key(n);
            let result = match o {
                Outbound::Email { to, subject, body } => {
                    self.email(plugin, &key, to, subject, body).await
                }
                Outbound::Http {
                    method,
                    url,
                    headers,
                    body,
                } => self.http(plugin, &key, method, url, headers, body).await,
                Outbound::AgentQueue(t) => {
                    if !plugin.manifest().capabilities.agent_queue {
                        Err(Attempt::Permanent(format!(
                            "plugin {} is not granted agent_queue",
                            plugin.name
                        )))
                    } else {
                        action = Some(Box::new(agent_action(d, key, t)));
                        Ok(())
                    }
                }
            };
            if let Err(a) = result {
                return a;
            }
        }
        Attempt::Done(action)
    }

    async fn email(
        &self,
        plugin: &Plugin,
        key: &str,
        to: String,
        subject: String,
        body: String,
    ) -> Result<(), Attempt> {
        if !plugin.manifest().capabilities.email {
            return Err(Attempt::Permanent(format!(
                "plugin {} is not granted email",
                plugin.name
            )));
        }
        let to = to
            .parse()
            .map_err(|e| Attempt::Permanent(format!("recipient {to:?}: {e}")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{key}@{}>", self.message_id_domain)))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| Attempt::Permanent(format!("message: {e}")))?;
        match self
            .smtp
            .send(message.envelope(), &message.formatted())
            .await
        {
            Ok(()) => Ok(()),
            Err(MailError::Permanent(e)) => Err(Attempt::Permanent(e)),
            Err(MailError::Transient(e)) => Err(Attempt::Retry(e)),
        }
    }

    async fn http(
        &self,
        plugin: &Plugin,
        key: &str,
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<(), Attempt> {
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| Attempt::Permanent(format!("url {url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Attempt::Permanent(format!(
                "url {url:?}: only http and https"
            )));
        }
        let host = parsed.host_str().unwrap_or_default();
        let port = parsed.port_or_known_default().unwrap_or(0);
        if !plugin.manifest().allows_http(host, port) {
            return Err(Attempt::Permanent(format!(
                "plugin {} may not send HTTP to {host}:{port} (allowed: {})",
                plugin.name,
                if plugin.manifest().capabilities.http.is_empty() {
                    "none".to_owned()
                } else {
                    plugin.manifest().capabilities.http.join(", ")
                }
            )));
        }
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| Attempt::Permanent(format!("HTTP method {method:?}")))?;
        let mut req = self.http.request(method, parsed);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req
            .header("Idempotency-Key", key)
            .body(body)
            .send()
            .await
            .map_err(|e| Attempt::Retry(format!("http {url}: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            Err(Attempt::Permanent(format!("http {url}: {status}")))
        } else {
            Err(Attempt::Retry(format!("http {url}: {status}")))
        }
    }
}

/// Out of the outbox (and the action onto the agent queue); durable at the
/// next sync.
fn mark_done(
    store: &Store,
    d: &Delivery,
    action: Option<&AgentAction>,
) -> Result<(), crate::store::StoreError> {
    let json = action.map(|a| serde_json::to_vec(a).unwrap_or_default());
    let action_ref = action
        .zip(json.as_deref())
        .map(|(a, j)| (a.customer.as_str(), a.id.as_str(), j));
    let delivered = direct_edit(&d.campaign, d.ts, DELIVERER, |f| f.delivered += 1);
    store.outbox_done(&d.id, action_ref, Some(delivered))
}

fn agent_action(d: &Delivery, id: String, t: Treatment) -> AgentAction {
    AgentAction {
        id,
        customer: d.customer.clone(),
        campaign: d.campaign.clone(),
        script: t.agent_script,
        subject: t.subject,
        body: t.body,
        why: d.why.clone(),
        trigger: d.trigger.clone(),
        decided_at: format_ts(d.ts),
        expires_at: d.expires_at.map(format_ts),
        expires_ms: d.expires_at,
        late_ms: d.late_ms,
        variables: t.variables,
        outcome: None,
        outcome_at: None,
        outcome_note: None,
    }
}
