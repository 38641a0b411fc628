//! Reports from the measurement ledger (`crate::ledger`): what every
//! campaign achieved, computed from per-day tallies instead of the
//! decision log, so a report costs the same after a year as after a day.
//!
//! - `GET /v1/reports?from=&to=&as_of=&campaign=`: every campaign (or one),
//!   the fields of `replay --measure` without the daily rows.
//! - `GET /v1/reports/{campaign}`: one campaign, with its funnel by day
//!   and the timing curve.
//! - [`compute`]: the same for `nudge report --data`.
//!
//! # What `from` and `to` select
//!
//! Tallies are per UTC day, so a period is whole days: the funnel counts
//! the decisions made in it, and the uplift counts the customers whose
//! first matured decision of the campaign (their cohort) falls in it, with
//! all of their matured decisions. The unit of the statistics is the
//! customer, so a customer cannot be split across periods.
//!
//! # `as_of`
//!
//! Decisions mature when the worker's clock passes their window (their
//! maturity timer fires). A report as of a later time also matures, in a
//! scratch copy, those due by then whose timers have not fired yet; so the
//! answer is exact for any `as_of` at or after the latest maturity already
//! processed. An earlier one cannot be computed from the tallies and is
//! refused (read `/v1/decisions`, or `nudge report --data --as-of`, which
//! reads the log).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api::{check_api, error};
use crate::config::{Clock, Role};
use crate::event::{format_ts, now_ms};
use crate::ledger::{day_of, Ledger, Maturity, Tally, SCRATCH};
use crate::measure::{self, Measure, Settings, Totals};
use crate::rules::RuleSet;
use crate::serve::Shared;
use crate::store::{Changes, Store, StoreError};

/// What to report.
#[derive(Clone, Debug)]
pub struct Period {
    /// Decisions matured by this time (ms) count.
    pub as_of: i64,
    /// First day: the day of this time (ms, UTC).
    pub from: Option<i64>,
    /// Up to this time (ms), exclusive: through its day, or the day
    /// before when it is midnight.
    pub to: Option<i64>,
    /// One campaign, or all.
    pub campaign: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "as_of {as_of} is before {clock}, the latest maturity already counted: the tallies \
         cannot go back; read the decision log instead (nudge report --data … --as-of)"
    )]
    TooEarly { as_of: String, clock: String },
}

/// Every campaign of `rules` (or the one asked for), measured from the
/// store's tallies as of `period.as_of`.
pub fn compute(
    store: &Store,
    rules: &RuleSet,
    period: &Period,
    settings: Settings,
) -> Result<Vec<Measure>, ReportError> {
    check_clock(store, period.as_of)?;
    let (first, last) = days(period);
    let gathered = store.quiesced(|| {
        gather(
            store,
            rules,
            period.campaign.as_deref(),
            period.as_of,
            first,
            last,
        )
    })?;
    Ok(finish(gathered, rules, period, settings))
}

/// The days of a period (first, last), as tallies are kept.
fn days(period: &Period) -> (i32, i32) {
    (
        period.from.map_or(i32::MIN, day_of),
        period.to.map_or(i32::MAX, |t| day_of(t.saturating_sub(1))),
    )
}

/// Every campaign of `rules` (or the one asked for), measured from
/// gathered tallies.
fn finish(
    gathered: Gathered,
    rules: &RuleSet,
    period: &Period,
    settings: Settings,
) -> Vec<Measure> {
    let wanted = |campaign: &str| {
        period.campaign.as_deref().is_none_or(|c| c == campaign)
            && rules.campaign(campaign).is_some()
    };
    let mut sums: BTreeMap<String, Sums> = BTreeMap::new();
    for (campaign, days) in gathered {
        let s = sums.entry(campaign).or_default();
        for (day, t) in days {
            s.add(day, &t);
        }
    }
    rules
        .campaigns
        .iter()
        .filter(|c| wanted(&c.id))
        .map(|c| {
            let s = sums.remove(&c.id).unwrap_or_default();
            s.measure(rules, c, period.as_of, settings)
        })
        .collect()
}

/// One campaign day by day: its result as it stood with the customers of
/// every cohort up to each day (for the cumulative difference and its
/// band over time), the last with its days.
pub fn cumulative(
    store: &Store,
    rules: &RuleSet,
    campaign: &str,
    as_of: i64,
    settings: Settings,
) -> Result<Vec<(i64, Measure)>, ReportError> {
    check_clock(store, as_of)?;
    let gathered =
        store.quiesced(|| gather(store, rules, Some(campaign), as_of, i32::MIN, i32::MAX))?;
    Ok(cumulative_from(gathered, rules, campaign, as_of, settings))
}

/// [`cumulative`] from gathered tallies.
pub fn cumulative_from(
    mut gathered: Gathered,
    rules: &RuleSet,
    campaign: &str,
    as_of: i64,
    settings: Settings,
) -> Vec<(i64, Measure)> {
    let Some(c) = rules.campaign(campaign) else {
        return Vec::new();
    };
    let days = gathered.remove(campaign).unwrap_or_default();
    // The days' funnels are attached to the last result only: each earlier
    // one would copy every day before it.
    let mut sums = Sums::default();
    let mut out = Vec::with_capacity(days.len());
    for (day, t) in days {
        let mut daily = std::mem::take(&mut sums.totals.daily);
        sums.add(day, &t);
        daily.append(&mut sums.totals.daily);
        out.push((i64::from(day), sums.measure(rules, c, as_of, settings)));
        sums.totals.daily = daily;
    }
    if let Some((_, last)) = out.last_mut() {
        *last = sums.measure(rules, c, as_of, settings);
    }
    out
}

fn check_clock(store: &Store, as_of: i64) -> Result<(), ReportError> {
    match store.ledger_clock()? {
        Some(clock) if as_of < clock => Err(ReportError::TooEarly {
            as_of: format_ts(as_of),
            clock: format_ts(clock),
        }),
        _ => Ok(()),
    }
}

/// Every tally of the campaigns of `rules` (or of `campaign`) from day
/// `first` to `last`, merged per campaign and day, with the maturities due
/// by `as_of` that have not fired yet matured in a scratch ledger (its
/// tallies start empty, so they end as the corrections; never committed).
fn gather(
    store: &Store,
    rules: &RuleSet,
    campaign: Option<&str>,
    as_of: i64,
    first: i32,
    last: i32,
) -> Result<Gathered, ReportError> {
    gather_in(store, rules, campaign, as_of, first, last, &Scope::All)
}

/// Per campaign and day, the tallies added up.
pub type Gathered = BTreeMap<String, BTreeMap<i32, Tally>>;

/// Whose tallies a store's report counts.
pub enum Scope<'a> {
    /// Everything in the store (one server).
    All,
    /// A cluster node's share: the slots it holds (`held`, of `slots`)
    /// and its own writers (its deliverer's and agents' tallies).
    Held {
        slots: u16,
        held: &'a (dyn Fn(u16) -> bool + Sync),
    },
}

impl Scope<'_> {
    fn writer(&self, w: u16) -> bool {
        match self {
            Scope::All => true,
            Scope::Held { slots, held } => w >= *slots || held(w),
        }
    }

    fn customer(&self, c: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Held { slots, held } => {
                held((crate::store::vshard_of(c) % usize::from((*slots).max(1))) as u16)
            }
        }
    }
}

fn gather_in(
    store: &Store,
    rules: &RuleSet,
    campaign: Option<&str>,
    as_of: i64,
    first: i32,
    last: i32,
    scope: &Scope<'_>,
) -> Result<Gathered, ReportError> {
    let wanted = |c: &str| campaign.is_none_or(|w| w == c) && rules.campaign(c).is_some();
    let mut out: Gathered = BTreeMap::new();
    for r in store.tallies(campaign, first, last)? {
        if wanted(&r.campaign) && scope.writer(r.writer) {
            // One unreadable record costs its counts, not every report.
            let t = match Tally::decode(&r.bytes, &r.campaign) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(
                        day = r.day,
                        writer = r.writer,
                        "{e}: left out of the report"
                    );
                    continue;
                }
            };
            out.entry(r.campaign)
                .or_default()
                .entry(r.day)
                .or_default()
                .merge(&t);
        }
    }
    let mut scratch = Ledger::new(SCRATCH);
    let mut discard = Changes::new();
    for t in store.due_maturities(as_of)? {
        if scope.customer(&t.customer)
            && Maturity::parse(&t.key).is_some_and(|m| wanted(&m.campaign))
        {
            if let Err(e) = scratch.mature(store, &mut discard, &t) {
                tracing::error!(customer = %t.customer, key = %t.key, "{e}: left out of the report");
            }
        }
    }
    for ((c, day), t) in scratch.into_tallies() {
        if (first..=last).contains(&day) {
            out.entry(c).or_default().entry(day).or_default().merge(&t);
        }
    }
    Ok(out)
}

/// One campaign's tallies added up.
#[derive(Default)]
struct Sums {
    totals: Totals,
    matured: [u64; 2],
}

impl Sums {
    fn measure(
        &self,
        rules: &RuleSet,
        c: &crate::rules::Campaign,
        as_of: i64,
        settings: Settings,
    ) -> Measure {
        let mut totals = self.totals.clone();
        totals.immature = [
            totals.funnel.sent.saturating_sub(self.matured[0]),
            totals.funnel.control.saturating_sub(self.matured[1]),
        ];
        measure::measure(rules, c, &totals, as_of, settings)
    }

    fn add(&mut self, day: i32, t: &Tally) {
        let totals = &mut self.totals;
        totals.funnel.merge(&t.funnel);
        totals
            .daily
            .entry(i64::from(day))
            .or_default()
            .merge(&t.funnel);
        for arm in 0..2 {
            totals.arms[arm].merge(&t.arms[arm]);
            self.matured[arm] = self.matured[arm].wrapping_add(t.matured[arm]);
            let timing = &mut totals.timing[arm];
            if timing.len() < t.timing[arm].len() {
                timing.resize(t.timing[arm].len(), 0);
            }
            for (a, b) in timing.iter_mut().zip(&t.timing[arm]) {
                *a = a.wrapping_add(*b);
            }
        }
    }
}

/// `nudge report --data`: a stopped server's (or a replay's) store, from
/// its tallies; as of a time before the maturities they count, from the
/// decision log (every decision read once; no period).
pub fn from_folder(
    data: &std::path::Path,
    rules: &std::path::Path,
    period: &Period,
) -> anyhow::Result<Vec<Measure>> {
    use anyhow::Context;
    let rules = RuleSet::load(rules)
        .with_context(|| format!("loading the rules in {}", rules.display()))?;
    // Opening creates a store where there is none: a mistyped folder would
    // report zeros instead of failing.
    if !data.join("db").is_file() {
        anyhow::bail!(
            "{}: no nudge store there (no sled `db` file)",
            data.display()
        );
    }
    let store =
        Store::open(data).with_context(|| format!("opening the store in {}", data.display()))?;
    match compute(&store, &rules, period, Settings::default()) {
        Err(ReportError::TooEarly { .. }) if period.from.is_none() && period.to.is_none() => {
            let mut rows =
                measure::from_store(&store, &rules, period.as_of, Settings::default())
                    .with_context(|| format!("reading the decision log in {}", data.display()))?;
            rows.retain(|m| period.campaign.as_deref().is_none_or(|c| c == m.campaign));
            Ok(rows)
        }
        Err(e @ ReportError::TooEarly { .. }) => {
            Err(anyhow::anyhow!("{e}; --from and --to need a later --as-of"))
        }
        r => r.with_context(|| format!("reading the tallies in {}", data.display())),
    }
}

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/reports", get(list))
        .route("/v1/reports/{campaign}", get(one))
        .route("/v1/cluster/tallies", get(share))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    /// RFC 3339 or epoch ms; default now (the event clock: the latest
    /// event decided).
    as_of: Option<String>,
    /// RFC 3339 or epoch ms: its UTC day is the first.
    from: Option<String>,
    /// RFC 3339 or epoch ms, exclusive.
    to: Option<String>,
    campaign: Option<String>,
}

/// What `GET /v1/reports` answers.
#[derive(Serialize)]
struct Listing {
    as_of: String,
    from: Option<String>,
    to: Option<String>,
    campaigns: Vec<Measure>,
}

/// The server's now: the wall clock, or on the event clock the latest
/// event decided.
pub(crate) fn now(s: &Shared) -> i64 {
    match s.cfg.server.clock {
        Clock::Wall => now_ms(),
        Clock::Event => s.watermarks.latest().unwrap_or_else(now_ms),
    }
}

/// The period a query asks for, or what is wrong with it.
fn period(s: &Shared, q: ReportQuery, campaign: Option<String>) -> Result<Period, String> {
    let time = |field: &str, v: Option<String>| {
        v.map(|v| crate::results::parse_time(field, &v)).transpose()
    };
    let as_of = time("as_of", q.as_of)?.unwrap_or_else(|| now(s));
    Ok(Period {
        as_of,
        from: time("from", q.from)?,
        to: time("to", q.to)?,
        campaign: campaign.or(q.campaign),
    })
}

/// Computes off the async threads: a report reads up to a few thousand
/// tallies.
async fn run(
    s: &Arc<Shared>,
    period: Period,
    headers: &HeaderMap,
) -> Result<Vec<Measure>, Response> {
    if s.node.is_some() {
        return run_cluster(s, period, headers).await;
    }
    let store = s.store.clone();
    let gen = s.current.load();
    let n_tune = s.cfg.measure.n_tune;
    let result = tokio::task::spawn_blocking(move || {
        compute(&store, &gen.rules, &period, Settings { n_tune })
    })
    .await;
    match result {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e @ ReportError::TooEarly { .. })) => {
            Err(error(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Ok(Err(e)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("store: {e}"),
        )),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("report: {e}"),
        )),
    }
}

async fn list(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ReportQuery>,
) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        return *r;
    }
    let period = match period(&s, q, None) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (as_of, from, to) = (period.as_of, period.from, period.to);
    match run(&s, period, &headers).await {
        Ok(mut rows) => {
            for r in &mut rows {
                r.daily.clear();
            }
            Json(Listing {
                as_of: format_ts(as_of),
                from: from.map(format_ts),
                to: to.map(format_ts),
                campaigns: rows,
            })
            .into_response()
        }
        Err(r) => r,
    }
}

async fn one(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(campaign): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        return *r;
    }
    if s.current.load().rules.campaign(&campaign).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("campaign {campaign:?} is not in the active generation"),
        );
    }
    let period = match period(&s, q, Some(campaign)) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match run(&s, period, &headers).await {
        Ok(mut rows) => match rows.pop() {
            Some(m) => Json(m).into_response(),
            None => error(StatusCode::NOT_FOUND, "no such campaign".into()),
        },
        Err(r) => r,
    }
}

/// A cluster node's share of a report, as `GET /v1/cluster/tallies`
/// answers it: (campaign, day, tally bytes in base64).
type Share = Vec<(String, i32, String)>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareQuery {
    as_of: i64,
    first: i32,
    last: i32,
    campaign: Option<String>,
}

/// This node's share of the cluster's tallies: the tallies of the slots
/// it holds and its own writers', and the maturities due in its slots.
fn local_share(s: &Shared, q: &ShareQuery) -> Result<Gathered, ReportError> {
    let Some(node) = &s.node else {
        return Ok(Gathered::new());
    };
    let tenures = node.tenures();
    let held = move |slot: u16| tenures.current(slot) != 0;
    let scope = Scope::Held {
        slots: node.tenures().slots(),
        held: &held,
    };
    let gen = s.current.load();
    s.store.quiesced(|| {
        gather_in(
            &s.store,
            &gen.rules,
            q.campaign.as_deref(),
            q.as_of,
            q.first,
            q.last,
            &scope,
        )
    })
}

/// `GET /v1/cluster/tallies`: what this node adds to a report.
async fn share(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ShareQuery>,
) -> Response {
    use base64::Engine;
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        return *r;
    }
    let s2 = s.clone();
    match tokio::task::spawn_blocking(move || local_share(&s2, &q)).await {
        Ok(Ok(g)) => {
            let out: Share = g
                .into_iter()
                .flat_map(|(c, days)| {
                    days.into_iter().map(move |(d, t)| {
                        (
                            c.clone(),
                            d,
                            base64::engine::general_purpose::STANDARD.encode(t.encode()),
                        )
                    })
                })
                .collect();
            Json(out).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("report: {e}")),
    }
}

/// A report on a cluster node: its own share and every other member's,
/// added up. A member that does not answer fails the report (503) rather
/// than leave its slots out unseen.
async fn run_cluster(
    s: &Arc<Shared>,
    period: Period,
    headers: &HeaderMap,
) -> Result<Vec<Measure>, Response> {
    let token = crate::api::bearer(headers).map(str::to_owned);
    let total = gather_cluster(s, &period, token)
        .await
        .map_err(|m| error(StatusCode::SERVICE_UNAVAILABLE, m))?;
    let settings = Settings {
        n_tune: s.cfg.measure.n_tune,
    };
    Ok(finish(total, &s.current.load().rules, &period, settings))
}

/// The cluster's tallies for `period`, as a node gathers them: its own
/// share and every other member's, asked with `token` (for the dashboard,
/// none: this node's first API token, which every node shares).
pub async fn gather_cluster(
    s: &Arc<Shared>,
    period: &Period,
    token: Option<String>,
) -> Result<Gathered, String> {
    use base64::Engine;
    let Some(node) = s.node.clone() else {
        return Err("not a cluster node".into());
    };
    let token = token.or_else(|| s.cfg.api.all_tokens().first().map(|t| t.secret.clone()));
    let (first, last) = days(period);
    let q = ShareQuery {
        as_of: period.as_of,
        first,
        last,
        campaign: period.campaign.clone(),
    };
    let members = node
        .status()
        .await
        .map_err(|e| format!("cluster: {e}"))?
        .members;
    let s2 = s.clone();
    let mut total = tokio::task::spawn_blocking(move || local_share(&s2, &q))
        .await
        .map_err(|e| format!("report: {e}"))?
        .map_err(|e| format!("store: {e}"))?;
    let client = reqwest::Client::new();
    for (name, api) in members {
        if name == node.name() {
            continue;
        }
        let mut url = format!(
            "{}/v1/cluster/tallies?as_of={}&first={first}&last={last}",
            api.trim_end_matches('/'),
            period.as_of
        );
        if let Some(c) = &period.campaign {
            url.push_str("&campaign=");
            url.push_str(&escape_query(c));
        }
        let mut req = client.get(&url).timeout(std::time::Duration::from_secs(10));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let body = match req.send().await {
            Ok(r) if r.status().is_success() => r.bytes().await.ok(),
            _ => None,
        };
        let share: Share = body
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                format!(
                    "node {name} ({api}) did not give its tallies: the report would miss its slots"
                )
            })?;
        for (c, day, b64) in share {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("node {name}: tally of {c}: {e}"))?;
            let t = Tally::decode(&bytes, &c).map_err(|e| format!("node {name}: {e}"))?;
            total
                .entry(c)
                .or_default()
                .entry(day)
                .or_default()
                .merge(&t);
        }
    }
    Ok(total)
}

/// What the dashboard shows of a period: on a cluster node, the
/// cluster's.
pub async fn measure_for_ui(s: &Arc<Shared>, period: Period) -> Result<Vec<Measure>, String> {
    let settings = Settings {
        n_tune: s.cfg.measure.n_tune,
    };
    if s.node.is_some() {
        let total = gather_cluster(s, &period, None).await?;
        return Ok(finish(total, &s.current.load().rules, &period, settings));
    }
    let (store, gen) = (s.store.clone(), s.current.load());
    tokio::task::spawn_blocking(move || compute(&store, &gen.rules, &period, settings))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// One campaign day by day, for the dashboard: on a cluster node, the
/// cluster's.
pub async fn cumulative_for_ui(
    s: &Arc<Shared>,
    campaign: &str,
    as_of: i64,
) -> Result<Vec<(i64, Measure)>, String> {
    let settings = Settings {
        n_tune: s.cfg.measure.n_tune,
    };
    let gen = s.current.load();
    if s.node.is_some() {
        let period = Period {
            as_of,
            from: None,
            to: None,
            campaign: Some(campaign.to_owned()),
        };
        let total = gather_cluster(s, &period, None).await?;
        return Ok(cumulative_from(
            total, &gen.rules, campaign, as_of, settings,
        ));
    }
    let (store, cid) = (s.store.clone(), campaign.to_owned());
    tokio::task::spawn_blocking(move || cumulative(&store, &gen.rules, &cid, as_of, settings))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// `s` percent-encoded for a query string.
fn escape_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
