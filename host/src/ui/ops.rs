//! Operations: is the server keeping up, are plugins healthy, was the last
//! publish good. Numbers come from the server's own Prometheus metrics,
//! sampled every few seconds by [`Sampler`] so the page can draw them over
//! time; the live part of the page is re-fetched by the script.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::charts::{self, Series};
use super::html::{self, esc, short, Nav, Viewer};
use super::{back_to, checked, html_response, plain, session, viewer, Need};
use crate::event::{format_ts, now_ms};
use crate::metrics::{buckets, metric_value, quantile};
use crate::serve::Shared;

/// How often the sampler reads the metrics.
pub const EVERY: Duration = Duration::from_secs(5);
/// Samples kept: an hour at [`EVERY`].
const KEEP: usize = 720;

/// What one look at the metrics gave, against the one before.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: i64,
    pub decided_per_s: f64,
    pub accepted_per_s: f64,
    pub decision_p50_ms: Option<f64>,
    pub decision_p99_ms: Option<f64>,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
}

/// The metrics over the last hour.
#[derive(Default)]
pub struct Sampler {
    inner: Mutex<SamplerInner>,
}

#[derive(Default)]
struct SamplerInner {
    last: Option<(i64, String)>,
    samples: VecDeque<Sample>,
}

impl Sampler {
    /// Reads `metrics` (the exposition text) now, and keeps the rates and
    /// quantiles since the previous read.
    pub fn take(&self, metrics: String) {
        let at = now_ms();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t0, before)) = &g.last {
            let secs = ((at - t0) as f64 / 1000.0).max(1e-3);
            let rate = |name: &str| {
                (metric_value(&metrics, name).unwrap_or(0.0)
                    - metric_value(before, name).unwrap_or(0.0))
                .max(0.0)
                    / secs
            };
            let q =
                |name: &str, p: f64| quantile(&buckets(before, name), &buckets(&metrics, name), p);
            let sample = Sample {
                at,
                decided_per_s: rate("nudge_events_processed_total"),
                accepted_per_s: rate("nudge_events_accepted_total"),
                decision_p50_ms: q("nudge_event_to_decision_seconds", 0.5),
                decision_p99_ms: q("nudge_event_to_decision_seconds", 0.99),
                ack_p50_ms: q("nudge_ingest_ack_seconds", 0.5),
                ack_p99_ms: q("nudge_ingest_ack_seconds", 0.99),
            };
            g.samples.push_back(sample);
            if g.samples.len() > KEEP {
                g.samples.pop_front();
            }
        }
        g.last = Some((at, metrics));
    }

    pub fn samples(&self) -> Vec<Sample> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.samples.iter().cloned().collect()
    }
}

/// Samples the server's metrics every [`EVERY`] until the task is dropped.
pub async fn sample(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        s.ui.sampler.take(s.metrics.render());
    }
}

pub async fn page(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let sess = match session(&s, &headers, Need::Operator, "/ui/operations") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let live = render_live(s.clone(), &sess).await;
    let v = viewer(&sess);
    let body = format!(
        r#"<p class="hint">Refreshes every few seconds.</p><div id="live" data-src="/ui/operations/live" aria-live="polite">{live}</div>"#
    );
    html_response(html::page("Operations", Nav::Operations, Some(&v), &body))
}

/// The live part alone (what the script fetches).
pub async fn live(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let sess = match session(&s, &headers, Need::Operator, "/ui/operations") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    html_response(render_live(s, &sess).await)
}

/// The live part, rendered off the async threads (it reads the store).
async fn render_live(s: Arc<Shared>, sess: &super::session::Session) -> String {
    let sess = sess.clone();
    tokio::task::spawn_blocking(move || live_body(&s, &viewer(&sess)))
        .await
        .unwrap_or_else(|e| format!("<p class=\"error\">{}</p>", esc(&e.to_string())))
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_infinite() => "over the top bucket".into(),
        Some(v) => format!("≤ {v:.1} ms"),
        None => "no events".into(),
    }
}

/// Labelled series of one counter family: (labels, value).
fn family(metrics: &str, name: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (labels, v) = rest.split_once("} ")?;
            Some((labels.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

fn label<'a>(labels: &'a str, key: &str) -> &'a str {
    labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v.trim_matches('"'))
}

fn live_body(s: &Shared, v: &Viewer<'_>) -> String {
    let metrics = s.metrics.render();
    let samples = s.ui.sampler.samples();
    let mut out = String::new();
    let latest = samples.last();
    let value = |name: &str| metric_value(&metrics, name).unwrap_or(0.0);
    let _ = write!(
        out,
        r#"<section class="cards" aria-label="Now">
<div class="card"><h2>Decided</h2><p><span class="big" id="decided-rate">{}</span> events/s</p><p class="iv">{} in all</p></div>
<div class="card"><h2>Event to decision</h2><p>p50 <span id="decision-p50">{}</span></p><p>p99 <span id="decision-p99">{}</span></p></div>
<div class="card"><h2>Acknowledgement</h2><p>p50 {}</p><p>p99 {}</p></div>
<div class="card"><h2>Queues</h2><p>in flight {}</p><p>held {}, outbox {}</p></div>
</section>"#,
        latest.map_or("–".into(), |x| short(x.decided_per_s)),
        short(value("nudge_events_processed_total")),
        esc(&ms(latest.and_then(|x| x.decision_p50_ms))),
        esc(&ms(latest.and_then(|x| x.decision_p99_ms))),
        esc(&ms(latest.and_then(|x| x.ack_p50_ms))),
        esc(&ms(latest.and_then(|x| x.ack_p99_ms))),
        short(value("nudge_queue_depth{queue=\"inflight_events\"}")),
        short(value("nudge_events_held")),
        short(value("nudge_queue_depth{queue=\"outbox\"}")),
    );
    if samples.len() >= 2 {
        let steps: Vec<String> = samples
            .iter()
            .map(|x| format_ts(x.at)[11..19].to_owned())
            .collect();
        let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
        out.push_str(&charts::lines(
            "Event to decision, p50 and p99 (ms), over the last hour",
            &steps,
            &[
                Series {
                    label: "p50",
                    class: "treated",
                    points: samples.iter().map(|x| finite(x.decision_p50_ms)).collect(),
                },
                Series {
                    label: "p99",
                    class: "control",
                    points: samples.iter().map(|x| finite(x.decision_p99_ms)).collect(),
                },
            ],
            None,
            true,
            |v| format!("{v:.0} ms"),
        ));
        out.push_str(&charts::lines(
            "Events per second, accepted and decided",
            &steps,
            &[
                Series {
                    label: "accepted",
                    class: "control",
                    points: samples.iter().map(|x| Some(x.accepted_per_s)).collect(),
                },
                Series {
                    label: "decided",
                    class: "treated",
                    points: samples.iter().map(|x| Some(x.decided_per_s)).collect(),
                },
            ],
            None,
            true,
            short,
        ));
    }
    out.push_str(r#"<h2>Deliveries</h2><table class="data" id="deliveries"><thead><tr><th scope="col">Channel</th><th scope="col">Result</th><th scope="col">Count</th></tr></thead><tbody>"#);
    for (labels, n) in family(&metrics, "nudge_deliveries_total") {
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{}</td><td class="num">{}</td></tr>"#,
            esc(label(&labels, "channel")),
            esc(label(&labels, "result")),
            short(n)
        );
    }
    out.push_str("</tbody></table>");
    // Dead letters, with retry.
    // The first hundred; how many there are comes from the metrics.
    let dead: Vec<serde_json::Value> = s
        .store
        .dead_letters_first(100)
        .unwrap_or_default()
        .iter()
        .filter_map(|b| serde_json::from_slice(b).ok())
        .collect();
    let dead_total = value("nudge_queue_depth{queue=\"dead_letters\"}").max(dead.len() as f64);
    let _ = write!(
        out,
        r#"<h2>Dead letters ({})</h2><table class="data" id="dead-letters"><thead><tr><th scope="col">Delivery</th><th scope="col">Campaign</th><th scope="col">Channel</th><th scope="col">Last error</th><th scope="col"></th></tr></thead><tbody>"#,
        short(dead_total)
    );
    for d in dead.iter().take(100) {
        let id = d["id"].as_str().unwrap_or_default();
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><form method="post" action="/ui/operations/dead-letters/retry">{}<input type="hidden" name="id" value="{}"><button type="submit">Retry</button></form></td></tr>"#,
            esc(id),
            esc(d["campaign"].as_str().unwrap_or_default()),
            esc(d["channel"].as_str().unwrap_or_default()),
            esc(d["last_error"].as_str().unwrap_or_default()),
            v.csrf_field(),
            esc(id)
        );
    }
    out.push_str("</tbody></table>");
    // Plugins: faults and quarantines.
    out.push_str(r#"<h2>Plugin faults</h2><table class="data" id="faults"><thead><tr><th scope="col">Plugin</th><th scope="col">Kind</th><th scope="col">Count</th></tr></thead><tbody>"#);
    for (labels, n) in family(&metrics, "nudge_plugin_faults_total") {
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{}</td><td class="num">{}</td></tr>"#,
            esc(label(&labels, "plugin")),
            esc(label(&labels, "kind")),
            short(n)
        );
    }
    out.push_str("</tbody></table>");
    let quarantined: Vec<String> = family(&metrics, "nudge_plugin_quarantined")
        .into_iter()
        .filter(|(_, n)| *n > 0.0)
        .map(|(l, _)| label(&l, "plugin").to_owned())
        .collect();
    let _ = write!(
        out,
        r#"<h2>Quarantined plugins ({})</h2><ul id="quarantined">"#,
        quarantined.len()
    );
    for p in &quarantined {
        let _ = write!(
            out,
            r#"<li>{} <form method="post" action="/ui/operations/quarantine/release" class="inline">{}<input type="hidden" name="plugin" value="{}"><button type="submit">Release</button></form></li>"#,
            esc(p),
            v.csrf_field(),
            esc(p)
        );
    }
    out.push_str("</ul>");
    // Generations, newest first, with what a rejected one said.
    let active = s.reloader.active();
    let mut gens = s.reloader.list();
    gens.sort_by_key(|g| std::cmp::Reverse(g.number));
    out.push_str(r#"<h2>Generations</h2><table class="data" id="generations"><thead><tr><th scope="col">Number</th><th scope="col">Status</th><th scope="col">Created</th><th scope="col">Cause</th><th scope="col">Errors</th><th scope="col"></th></tr></thead><tbody>"#);
    for g in gens.iter().take(20) {
        let status = serde_json::to_value(g.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let button = if g.number != active && status != "rejected" {
            format!(
                r#"<form method="post" action="/ui/operations/generations/activate">{}<input type="hidden" name="number" value="{}"><button type="submit">Activate</button></form>"#,
                v.csrf_field(),
                g.number
            )
        } else if g.number == active {
            "active".into()
        } else {
            String::new()
        };
        let errors: Vec<String> = g.errors.iter().map(|e| esc(e)).collect();
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="errors">{}</td><td>{button}</td></tr>"#,
            g.number,
            esc(&status),
            esc(&g.created_at),
            esc(&g.cause),
            errors.join("<br>")
        );
    }
    out.push_str("</tbody></table>");
    out
}

#[derive(Deserialize)]
pub struct Retry {
    csrf: String,
    id: String,
}

pub async fn retry(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(f): Form<Retry>,
) -> Response {
    if let Err(r) = checked(&s, &headers, Need::Operator, &f.csrf) {
        return *r;
    }
    match crate::actions::retry_dead_letter(&s.store, &s.deliver, &f.id) {
        Ok(()) => back_to("/ui/operations"),
        Err((status, message)) => plain(status, &message),
    }
}

#[derive(Deserialize)]
pub struct Release {
    csrf: String,
    plugin: String,
}

pub async fn release(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(f): Form<Release>,
) -> Response {
    let sess = match checked(&s, &headers, Need::Operator, &f.csrf) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match s
        .reloader
        .controls()
        .release(&f.plugin, &format!("{} (dashboard)", sess.name))
    {
        Ok(_) => back_to("/ui/operations"),
        Err(e) => plain(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

#[derive(Deserialize)]
pub struct Activate {
    csrf: String,
    number: u64,
}

pub async fn activate(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(f): Form<Activate>,
) -> Response {
    let sess = match checked(&s, &headers, Need::Operator, &f.csrf) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let r = s.reloader.clone();
    let by = format!("activated by {} (dashboard)", sess.name);
    match tokio::task::spawn_blocking(move || r.activate(f.number, &by)).await {
        Ok(Ok(_)) => back_to("/ui/operations"),
        Ok(Err(e)) => plain(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
