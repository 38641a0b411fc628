//! `nudge bench`: a load generator for the live server. Sends synthetic
//! bank-retail events through `/v1/batch` over several connections, at full
//! speed or at a fixed rate, and reports acknowledged events per second,
//! acknowledgement latency (measured here, per request) and event-to-decision
//! latency (from the server's own histogram, before and after the run).
//!
//! Without `--url` it starts a server in this process on a free loopback
//! port with a fresh store, so one command measures the whole path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Config;
use crate::event::format_ts;
pub use crate::metrics::metric_value;
use crate::metrics::{buckets, quantile};

#[derive(Clone, Debug)]
pub struct Options {
    /// A running server; none: start one in this process.
    pub url: Option<String>,
    pub write_key: Option<String>,
    pub events: usize,
    pub batch: usize,
    pub connections: usize,
    /// Events per second across all connections; none: as fast as acked.
    pub rate: Option<f64>,
    pub customers: usize,
    /// Customer ids start here (`bench-N`): runs against one server with
    /// disjoint ranges do the same work, not a replay of contacted
    /// customers.
    pub first_customer: usize,
    pub seed: u64,
    /// `GET /v1/reports` to time: during the load, one every
    /// `report_every`; without events, back to back.
    pub reports: usize,
    pub report_every: Duration,
    /// The path the probes GET: an API path (bearer token), or a dashboard
    /// page under `/ui/` (a session from logging in with the token).
    pub probe: String,
    /// API token for the reports (default: the server config's first).
    pub token: Option<String>,
    /// Serve this store instead of a fresh one (local server only).
    pub data: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub events: usize,
    pub batch: usize,
    pub connections: usize,
    pub target_rate: Option<f64>,
    pub seconds: f64,
    pub acked_events_per_sec: f64,
    /// Until the last event was decided: the rate the server sustains.
    pub decided_seconds: f64,
    pub decided_events_per_sec: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    /// Upper bounds of the histogram buckets holding the quantiles.
    pub decision_p50_ms: Option<f64>,
    pub decision_p99_ms: Option<f64>,
    /// Requests answered 503 (backpressure) and sent again.
    pub busy_retries: usize,
    /// `GET /v1/reports` timed, and their latency.
    pub reports: usize,
    pub report_p50_ms: Option<f64>,
    pub report_p99_ms: Option<f64>,
}

impl Report {
    pub fn line(&self) -> String {
        let q = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("<= {v:.2}"));
        let reports = match (self.report_p50_ms, self.report_p99_ms) {
            (Some(p50), Some(p99)) => format!(
                "; {} reports: p50 {p50:.2} ms, p99 {p99:.2} ms",
                self.reports
            ),
            _ => String::new(),
        };
        format!(
            "{} events in {:.2} s: {:.0} events/s acknowledged, {:.0} events/s decided; ack p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; event-to-decision p50 {} ms, p99 {} ms; {} busy retries{reports}",
            self.events,
            self.seconds,
            self.acked_events_per_sec,
            self.decided_events_per_sec,
            self.ack_p50_ms,
            self.ack_p99_ms,
            self.ack_max_ms,
            q(self.decision_p50_ms),
            q(self.decision_p99_ms),
            self.busy_retries,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: {0}")]
    Failed(String),
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
}

fn fail(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// xorshift64*: a deterministic stream for a given (non-zero) seed. Also
/// what the crash test draws its kill points from.
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The request bodies, built before the clock starts.
fn bodies(o: &Options, run: &str) -> Vec<Vec<u8>> {
    let mut rng = Rng(o.seed | 1);
    let now = crate::event::now_ms();
    let mut events = Vec::with_capacity(o.events);
    for i in 0..o.events {
        let c = o.first_customer as u64 + rng.below(o.customers as u64);
        let customer = format!("bench-{c}");
        let ts = format_ts(now + (i / 1000) as i64);
        let id = format!("{run}-{i}");
        let ev = match rng.below(20) {
            0 => json!({"type": "identify", "userId": customer, "messageId": id, "timestamp": ts,
                "traits": {"email": format!("{customer}@example.com"), "consent_email": rng.below(2) == 0,
                    "consent_sms": rng.below(2) == 0, "phone": "+61400000000"}}),
            1..=6 => json!({"type": "track", "userId": customer, "messageId": id, "timestamp": ts,
                "event": "Deposit Made", "properties": {"amount": (rng.below(30_000) as f64) + 0.5}}),
            7 => json!({"type": "track", "userId": customer, "messageId": id, "timestamp": ts,
                "event": "Card Declined", "properties": {"reason": if rng.below(2) == 0 { "insufficient_funds" } else { "other" }}}),
            8..=9 => json!({"type": "track", "userId": customer, "messageId": id, "timestamp": ts,
                "event": "Product Added", "properties": {"sku": rng.below(500)}}),
            _ => json!({"type": "track", "userId": customer, "messageId": id, "timestamp": ts,
                "event": "Page Viewed", "properties": {"path": if rng.below(4) == 0 { "/mortgages/rates" } else { "/home" }}}),
        };
        events.push(ev);
    }
    events
        .chunks(o.batch.max(1))
        .map(|c| serde_json::to_vec(&json!({ "batch": c })).unwrap_or_default())
        .collect()
}

fn counter(metrics: &str, name: &str) -> f64 {
    metric_value(metrics, name).unwrap_or(0.0)
}

/// The metrics of every node benchmarked.
struct Scraped(Vec<String>);

impl Scraped {
    fn counter(&self, name: &str) -> f64 {
        self.0.iter().map(|m| counter(m, name)).sum()
    }

    /// A histogram's buckets, added up over the nodes.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = Vec::new();
        for m in &self.0 {
            for (le, n) in buckets(m, name) {
                match out.iter_mut().find(|(l, _)| *l == le) {
                    Some(x) => x.1 += n,
                    None => out.push((le, n)),
                }
            }
        }
        out
    }
}

/// The `q` quantile of sorted samples (nearest rank); 0 when empty.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the load against `o.url`, or against a server started here with
/// `server` as its configuration (data and listen are replaced).
pub async fn run(o: Options, mut server: Config) -> Result<Report, BenchError> {
    let mut local = None;
    let mut _data = None;
    let url = match &o.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            match &o.data {
                Some(d) => server.server.data = d.clone(),
                None => {
                    let dir = tempfile::Builder::new()
                        .prefix("nudge-bench-")
                        .tempdir()
                        .map_err(fail)?;
                    server.server.data = dir.path().join("data");
                    _data = Some(dir);
                }
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(fail)?;
            let addr = listener.local_addr().map_err(fail)?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let handle = tokio::spawn(crate::serve::run(server.clone(), listener, async {
                let _ = stopped.await;
            }));
            local = Some((stop, handle));
            format!("http://{addr}")
        }
    };
    // Several nodes of a cluster (`--url a,b,c`): batches go round robin,
    // and what was decided is added up over all of them.
    let urls: Vec<String> = url
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    let url = urls.first().cloned().unwrap_or(url);
    let key = o
        .write_key
        .clone()
        .or_else(|| server.ingest.write_keys.first().cloned());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(o.connections)
        .build()
        .map_err(fail)?;
    // Ready?
    let started = Instant::now();
    loop {
        if let Some((_, handle)) = local.take_if(|(_, h)| h.is_finished()) {
            handle.await.map_err(fail)??;
            return Err(fail("the server stopped before it was ready"));
        }
        match client.get(format!("{url}/healthz")).send().await {
            Ok(r) if r.status().is_success() => break,
            _ if started.elapsed() > Duration::from_secs(60) => {
                return Err(fail(format!("{url}/healthz did not answer")))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let run_id = format!(
        "bench-{:x}",
        o.seed ^ started.elapsed().as_nanos() as u64 ^ std::process::id() as u64
    );
    let bodies = Arc::new(bodies(&o, &run_id));
    let scrape = |client: reqwest::Client, urls: Vec<String>| async move {
        let mut all = Vec::new();
        for u in urls {
            all.push(
                client
                    .get(format!("{u}/metrics"))
                    .send()
                    .await
                    .map_err(fail)?
                    .text()
                    .await
                    .map_err(fail)?,
            );
        }
        Ok::<_, BenchError>(Scraped(all))
    };
    let before = scrape(client.clone(), urls.clone()).await?;
    let processed_before = before.counter("nudge_events_processed_total");

    let token = o
        .token
        .clone()
        .or_else(|| server.api.all_tokens().first().map(|t| t.secret.clone()));
    let loading = Arc::new(std::sync::atomic::AtomicBool::new(o.events > 0));
    let probes = tokio::spawn(probe_reports(
        client.clone(),
        url.clone(),
        o.probe.clone(),
        token,
        o.reports,
        (o.events > 0).then_some(o.report_every),
        loading.clone(),
    ));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let per_batch = o.batch.max(1) as f64;
    let mut tasks = Vec::new();
    for _ in 0..o.connections.max(1) {
        let (client, urls, key, bodies, next) = (
            client.clone(),
            urls.clone(),
            key.clone(),
            bodies.clone(),
            next.clone(),
        );
        let rate = o.rate;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut busy = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                if let Some(r) = rate {
                    // Batch i is due at i * batch / rate seconds.
                    let due = t0 + Duration::from_secs_f64(i as f64 * per_batch / r);
                    tokio::time::sleep_until(due.into()).await;
                }
                loop {
                    let sent = Instant::now();
                    let url = &urls[i % urls.len()];
                    let mut req = client.post(format!("{url}/v1/batch")).body(body.clone());
                    if let Some(k) = &key {
                        req = req.bearer_auth(k);
                    }
                    let resp = req.send().await.map_err(fail)?;
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    if status.as_u16() == 503 {
                        busy += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    if !status.is_success() {
                        return Err(fail(format!("batch {i}: {status}: {text}")));
                    }
                    lat.push(sent.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
            }
            Ok::<_, BenchError>((lat, busy))
        }));
    }
    let mut lat = Vec::new();
    let mut busy = 0;
    for t in tasks {
        let (l, b) = t.await.map_err(fail)??;
        lat.extend(l);
        busy += b;
    }
    let seconds = t0.elapsed().as_secs_f64();
    loading.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut report_lat = probes.await.map_err(fail)??;
    report_lat.sort_by(|a, b| a.total_cmp(b));
    // Every event decided, then the decision latencies are complete.
    let want = processed_before + o.events as f64;
    let after = loop {
        let m = scrape(client.clone(), urls.clone()).await?;
        if m.counter("nudge_events_processed_total") >= want {
            break m;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(fail(
                "events were acknowledged but not decided within 10 minutes",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let decided_seconds = t0.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let name = "nudge_event_to_decision_seconds";
    let (b, a) = (before.buckets(name), after.buckets(name));
    let report = Report {
        events: o.events,
        batch: o.batch,
        connections: o.connections,
        target_rate: o.rate,
        seconds,
        acked_events_per_sec: o.events as f64 / seconds.max(1e-9),
        decided_seconds,
        decided_events_per_sec: o.events as f64 / decided_seconds.max(1e-9),
        ack_p50_ms: percentile(&lat, 0.5),
        ack_p99_ms: percentile(&lat, 0.99),
        ack_max_ms: lat.last().copied().unwrap_or(0.0),
        decision_p50_ms: quantile(&b, &a, 0.5),
        decision_p99_ms: quantile(&b, &a, 0.99),
        busy_retries: busy,
        reports: report_lat.len(),
        report_p50_ms: (!report_lat.is_empty()).then(|| percentile(&report_lat, 0.5)),
        report_p99_ms: (!report_lat.is_empty()).then(|| percentile(&report_lat, 0.99)),
    };
    if let Some((stop, handle)) = local {
        let _ = stop.send(());
        handle.await.map_err(fail)??;
    }
    Ok(report)
}

/// Times up to `n` `GET /v1/reports`: one every `every` while `loading`,
/// or back to back when there is no load.
async fn probe_reports(
    client: reqwest::Client,
    url: String,
    path: String,
    token: Option<String>,
    n: usize,
    every: Option<Duration>,
    loading: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<f64>, BenchError> {
    let mut lat = Vec::with_capacity(n);
    if n == 0 {
        return Ok(lat);
    }
    // A dashboard page: log in once, then send the session's cookie.
    let cookie = if path.starts_with("/ui/") {
        // The login answers with a redirect and the cookie: not followed.
        let once = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(fail)?;
        let resp = once
            .post(format!("{url}/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "token={}&next=/ui/",
                token.clone().unwrap_or_default()
            ))
            .send()
            .await
            .map_err(fail)?;
        let cookie = resp
            .headers()
            .get(reqwest::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_owned);
        Some(
            cookie
                .ok_or_else(|| fail(format!("logging in to the dashboard: {}", resp.status())))?,
        )
    } else {
        None
    };
    while lat.len() < n {
        if let Some(every) = every {
            tokio::time::sleep(every).await;
            if !loading.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
        }
        let sent = Instant::now();
        let mut req = client.get(format!("{url}{path}"));
        match (&cookie, &token) {
            (Some(c), _) => req = req.header(reqwest::header::COOKIE, c),
            (None, Some(t)) => req = req.bearer_auth(t),
            (None, None) => {}
        }
        let resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(fail)?;
        if !status.is_success() {
            return Err(fail(format!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        lat.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(lat)
}

/// The report as one JSON object.
pub fn to_json(r: &Report) -> Value {
    serde_json::to_value(r).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_from_bucket_deltas() {
        let before = vec![(0.001, 10.0), (0.005, 10.0), (f64::INFINITY, 10.0)];
        let after = vec![(0.001, 60.0), (0.005, 108.0), (f64::INFINITY, 110.0)];
        // 100 new observations: 50 under 1 ms, 48 under 5 ms, 2 above.
        assert_eq!(quantile(&before, &after, 0.5), Some(1.0));
        assert_eq!(quantile(&before, &after, 0.98), Some(5.0));
        assert_eq!(quantile(&before, &after, 0.99), Some(f64::INFINITY));
        assert_eq!(quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn buckets_parse_the_exposition_format() {
        let text = "nudge_event_to_decision_seconds_bucket{le=\"0.001\"} 3\nnudge_event_to_decision_seconds_bucket{le=\"+Inf\"} 4\n";
        let b = buckets(text, "nudge_event_to_decision_seconds");
        assert_eq!(b, vec![(0.001, 3.0), (f64::INFINITY, 4.0)]);
    }
}
