//! Prometheus metrics of the live server (`GET /metrics`).

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Latency buckets in seconds, fine where the targets are (milliseconds).
fn latency() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
        0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_owned(), v.to_owned())]
}

pub struct Metrics {
    registry: Registry,
    pub events_accepted: Counter,
    pub events_duplicate: Counter,
    pub events_unattributed: Counter,
    pub events_processed: Counter,
    rejected: Family<Labels, Counter>,
    pub timers_fired: Counter,
    pub timers_late: Counter,
    pub events_late: Counter,
    pub events_held: Gauge<i64, AtomicI64>,
    decisions: Family<Labels, Counter>,
    deliveries: Family<Labels, Counter>,
    plugin_faults: Family<Labels, Counter>,
    rule_errors: Family<Labels, Counter>,
    plugin_calls: HistogramFamily,
    pub ack_seconds: Histogram,
    pub event_to_decision_seconds: Histogram,
    pub group_commit_events: Histogram,
    queue_depth: Family<Labels, Gauge<i64, AtomicI64>>,
    /// The number of the active generation.
    pub generation_active: Gauge<i64, AtomicI64>,
    reloads: Family<Labels, Counter>,
    reload_seconds: Histogram,
    campaigns_paused: Gauge<i64, AtomicI64>,
    plugins_quarantined: Family<Labels, Gauge<i64, AtomicI64>>,
    /// Plugins last reported quarantined, so a release sets theirs to 0.
    quarantined_names: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("nudge");
        let m = Metrics {
            events_accepted: Counter::default(),
            events_duplicate: Counter::default(),
            events_unattributed: Counter::default(),
            events_processed: Counter::default(),
            rejected: Family::default(),
            timers_fired: Counter::default(),
            timers_late: Counter::default(),
            events_late: Counter::default(),
            events_held: Gauge::default(),
            decisions: Family::default(),
            deliveries: Family::default(),
            plugin_faults: Family::default(),
            rule_errors: Family::default(),
            plugin_calls: Family::new_with_constructor(latency),
            ack_seconds: latency(),
            event_to_decision_seconds: latency(),
            group_commit_events: Histogram::new([
                1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0, 100000.0,
            ]),
            queue_depth: Family::default(),
            generation_active: Gauge::default(),
            reloads: Family::default(),
            reload_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            campaigns_paused: Gauge::default(),
            plugins_quarantined: Family::default(),
            quarantined_names: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_accepted",
            "Events durably accepted by ingest",
            m.events_accepted.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events whose messageId was already accepted (acknowledged, not processed again)",
            m.events_duplicate.clone(),
        );
        registry.register(
            "events_unattributed",
            "Events acknowledged but not decided: only an anonymousId, or a page, screen, group or alias call",
            m.events_unattributed.clone(),
        );
        registry.register(
            "events_processed",
            "Events decided by the workers",
            m.events_processed.clone(),
        );
        registry.register(
            "ingest_rejected_requests",
            "Ingest requests refused, by HTTP status",
            m.rejected.clone(),
        );
        registry.register(
            "timers_fired",
            "Plugin timers fired",
            m.timers_fired.clone(),
        );
        registry.register(
            "timers_late",
            "Timers fired more than a second after they fell due (e.g. after downtime)",
            m.timers_late.clone(),
        );
        registry.register(
            "events_late",
            "Events that arrived after what they should have preceded was decided (see server.reorder_window): decided on arrival and marked",
            m.events_late.clone(),
        );
        registry.register(
            "events_held",
            "Acknowledged events held for event-time order, not yet decided",
            m.events_held.clone(),
        );
        registry.register("decisions", "Decisions, by outcome", m.decisions.clone());
        registry.register(
            "deliveries",
            "Delivery attempts, by channel and result",
            m.deliveries.clone(),
        );
        registry.register(
            "plugin_faults",
            "Plugin calls that trapped, timed out, ran out of memory or returned an error",
            m.plugin_faults.clone(),
        );
        registry.register(
            "rule_errors",
            "Campaign expressions (`when`, `priority`) that did not evaluate, by campaign",
            m.rule_errors.clone(),
        );
        registry.register(
            "plugin_call_seconds",
            "Plugin call latency, by plugin",
            m.plugin_calls.clone(),
        );
        registry.register(
            "ingest_ack_seconds",
            "From request received to acknowledgement (durable)",
            m.ack_seconds.clone(),
        );
        registry.register(
            "event_to_decision_seconds",
            "From request received to the event decided",
            m.event_to_decision_seconds.clone(),
        );
        registry.register(
            "group_commit_events",
            "Events per inbox group commit",
            m.group_commit_events.clone(),
        );
        registry.register(
            "queue_depth",
            "Items waiting, by queue (inflight events, outbox, dead letters)",
            m.queue_depth.clone(),
        );
        registry.register(
            "generation_active",
            "Number of the generation (plugins and rules) in force",
            m.generation_active.clone(),
        );
        registry.register(
            "reloads",
            "Reload attempts, by result (activated, rejected, unchanged)",
            m.reloads.clone(),
        );
        registry.register(
            "reload_seconds",
            "Time to read, build and validate a generation",
            m.reload_seconds.clone(),
        );
        registry.register(
            "campaigns_paused",
            "Campaigns paused by an operator",
            m.campaigns_paused.clone(),
        );
        registry.register(
            "plugin_quarantined",
            "1 while a plugin version is quarantined for repeated faults",
            m.plugins_quarantined.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn rejected(&self, status: u16) {
        self.rejected
            .get_or_create(&label("status", &status.to_string()))
            .inc();
    }

    pub fn decision(&self, outcome: &str) {
        self.decisions
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    pub fn delivery(&self, channel: &str, result: &str) {
        self.deliveries
            .get_or_create(&vec![
                ("channel".to_owned(), channel.to_owned()),
                ("result".to_owned(), result.to_owned()),
            ])
            .inc();
    }

    pub fn plugin_call(&self, plugin: &str, took: Duration) {
        self.plugin_calls
            .get_or_create(&label("plugin", plugin))
            .observe(took.as_secs_f64());
    }

    pub fn plugin_fault(&self, plugin: &str, kind: &str) {
        self.plugin_faults
            .get_or_create(&vec![
                ("plugin".to_owned(), plugin.to_owned()),
                ("kind".to_owned(), kind.to_owned()),
            ])
            .inc();
    }

    pub fn rule_error(&self, campaign: &str) {
        self.rule_errors
            .get_or_create(&label("campaign", campaign))
            .inc();
    }

    pub fn set_queue_depth(&self, queue: &str, depth: i64) {
        self.queue_depth
            .get_or_create(&label("queue", queue))
            .set(depth);
    }

    pub fn reload(&self, result: &str, took: Duration) {
        self.reloads.get_or_create(&label("result", result)).inc();
        if result != "unchanged" {
            self.reload_seconds.observe(took.as_secs_f64());
        }
    }

    pub fn set_controls<'a>(&self, paused: usize, quarantined: impl Iterator<Item = &'a str>) {
        self.campaigns_paused.set(paused as i64);
        let now: std::collections::BTreeSet<String> = quarantined.map(str::to_owned).collect();
        let mut last = self
            .quarantined_names
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for gone in last.difference(&now) {
            self.plugins_quarantined
                .get_or_create(&label("plugin", gone))
                .set(0);
        }
        for name in &now {
            self.plugins_quarantined
                .get_or_create(&label("plugin", name))
                .set(1);
        }
        *last = now;
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

// Reading the exposition text back: the load generator and the dashboard's
// sampler compare two scrapes.

/// Cumulative bucket counts of one histogram: (upper bound, count).
pub fn buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

/// The value of the sample named exactly `name` (labels included, e.g.
/// `nudge_queue_depth{queue="outbox"}`) in Prometheus text, if present.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

/// The upper bound (in ms) of the bucket holding quantile `q` of the
/// observations between two scrapes.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - b)
        })
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    deltas
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| le * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.events_accepted.inc_by(3);
        m.decision("sent");
        m.delivery("email", "ok");
        m.plugin_call("cart-timer", Duration::from_micros(300));
        let text = m.render();
        assert!(text.contains("nudge_events_accepted_total 3"), "{text}");
        assert!(
            text.contains("nudge_decisions_total{outcome=\"sent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nudge_deliveries_total{channel=\"email\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "nudge_plugin_call_seconds_bucket{le=\"0.0005\",plugin=\"cart-timer\"} 1"
            ) || text.contains(
                "nudge_plugin_call_seconds_bucket{plugin=\"cart-timer\",le=\"0.0005\"} 1"
            ),
            "{text}"
        );
    }
}
