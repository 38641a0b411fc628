//! Results for managers: the Overview (what the programme added, in
//! total), Campaigns (the leaderboard and its forest plot) and one
//! campaign (funnel, timing, days, its file), all from the reports' tallies
//! (`crate::reports`). `nudge report --html` writes the first two as one
//! file.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::charts::{self, Row, Series};
use super::html::{
    self, esc, interval, opt, pct, plus_minus, pts, short, signed, status_class, Nav, Viewer,
};
use super::{back_to, checked, html_response, plain, session, viewer, Need};
use crate::event::{format_ts, parse_ts};
use crate::ledger::DAY;
use crate::measure::Measure;
use crate::reports::{self, Period};
use crate::serve::Shared;

/// The period a page shows: last N days, all time, or from/to dates.
#[derive(Deserialize, Default)]
pub struct PeriodQuery {
    /// 7, 30, 90 or "all".
    days: Option<String>,
    /// YYYY-MM-DD, inclusive.
    from: Option<String>,
    /// YYYY-MM-DD, inclusive.
    to: Option<String>,
}

impl PeriodQuery {
    /// The period, and its words for the page.
    fn period(&self, now: i64) -> Result<(Option<i64>, Option<i64>, String), String> {
        let date = |field: &str, v: &str| {
            parse_ts(&format!("{v}T00:00:00Z"))
                .ok_or_else(|| format!("{field}: {v:?} is not a date (YYYY-MM-DD)"))
        };
        if self.from.as_deref().is_some_and(|v| !v.is_empty())
            || self.to.as_deref().is_some_and(|v| !v.is_empty())
        {
            let from = self
                .from
                .as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| date("from", v))
                .transpose()?;
            let to = self
                .to
                .as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| date("to", v).map(|t| t + DAY))
                .transpose()?;
            let words = format!(
                "{} to {}",
                from.map_or("the start".into(), |t| format_ts(t)[..10].to_owned()),
                to.map_or("now".into(), |t| format_ts(t - DAY)[..10].to_owned())
            );
            return Ok((from, to, words));
        }
        match self.days.as_deref().unwrap_or("30") {
            "all" => Ok((None, None, "all time".into())),
            d => {
                let n: i64 = d
                    .parse()
                    .ok()
                    .filter(|n| (1..=3650).contains(n))
                    .ok_or_else(|| format!("days: {d:?} (a number of days, or all)"))?;
                Ok((Some(now - n * DAY), None, format!("the last {n} days")))
            }
        }
    }
}

/// The period picker, the same on both pages.
fn picker(action: &str, q: &PeriodQuery, words: &str) -> String {
    let mut s = String::from(r#"<nav class="periods" aria-label="Period"><ul>"#);
    let current = q.days.as_deref().unwrap_or("30");
    let custom = q.from.as_deref().is_some_and(|v| !v.is_empty())
        || q.to.as_deref().is_some_and(|v| !v.is_empty());
    for (d, label) in [
        ("7", "7 days"),
        ("30", "30 days"),
        ("90", "90 days"),
        ("all", "All time"),
    ] {
        let cur = if !custom && current == d {
            r#" aria-current="true""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<li><a href="{action}?days={d}"{cur}>{label}</a></li>"#
        );
    }
    let _ = write!(
        s,
        r#"</ul><form method="get" action="{action}"><label for="from">From</label> <input type="date" id="from" name="from" value="{}"> <label for="to">to</label> <input type="date" id="to" name="to" value="{}"> <button type="submit">Show</button></form></nav><p class="period">Decisions of {}, measured as of now: customers count once their first decision's goal window has closed.</p>"#,
        esc(q.from.as_deref().unwrap_or("")),
        esc(q.to.as_deref().unwrap_or("")),
        esc(words)
    );
    s
}

/// The reports for a period, off the async threads.
async fn measure(
    s: &Arc<Shared>,
    from: Option<i64>,
    to: Option<i64>,
    campaign: Option<String>,
) -> Result<Vec<Measure>, String> {
    let period = Period {
        as_of: reports::now(s),
        from,
        to,
        campaign,
    };
    reports::measure_for_ui(s, period).await
}

/// A sum of campaigns' estimates with a 95% interval, the campaigns taken
/// as independent (their intervals' half-widths add in quadrature).
#[derive(Default)]
struct Total {
    value: f64,
    half_sq: f64,
    with_interval: usize,
}

impl Total {
    fn add(&mut self, v: Option<f64>, iv: Option<[f64; 2]>) {
        if let (Some(v), Some([lo, hi])) = (v, iv) {
            self.value += v;
            self.half_sq += ((hi - lo) / 2.0).powi(2);
            self.with_interval += 1;
        }
    }

    /// The sum with its interval; the attribute carries the exact sum.
    fn show(&self, id: &str, f: impl Fn(f64) -> String) -> String {
        let half = self.half_sq.sqrt();
        format!(
            r#"<p id="{id}" data-value="{}"><span class="big">{}</span> <span class="iv">95% interval {}</span></p>"#,
            self.value,
            esc(&f(self.value)),
            esc(&interval(Some([self.value - half, self.value + half]), &f))
        )
    }
}

/// The Overview and Campaigns pages' common part: the period's reports.
pub struct Board {
    pub rows: Vec<Measure>,
    pub words: String,
}

/// What the executive reads: totals with intervals, a word per campaign.
pub fn overview_body(b: &Board, link: &dyn Fn(&str) -> String) -> String {
    let (mut conv, mut value, mut net) = (Total::default(), Total::default(), Total::default());
    let mut cost = 0.0;
    let mut without = 0;
    for m in &b.rows {
        if m.incremental_conversions_ci95.is_none() {
            without += 1;
            continue;
        }
        conv.add(m.incremental_conversions, m.incremental_conversions_ci95);
        value.add(m.incremental_value, m.incremental_value_ci95);
        net.add(m.net_value, m.net_value_ci95);
        cost += m.cost;
    }
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<section class="cards" aria-label="Totals">
<div class="card"><h2>Incremental conversions</h2>{}</div>
<div class="card"><h2>Incremental value</h2>{}</div>
<div class="card"><h2>Cost</h2><p id="total-cost"><span class="big">{}</span></p></div>
<div class="card"><h2>Net value</h2>{}</div>
</section>
<p class="hint">Over the {} campaigns with a control group and enough customers to compare; {} more are not in these totals (no control group, or still collecting). What the treated customers did beyond the control group's: the conversions and value the campaigns caused.</p>"#,
        conv.show("total-conversions", signed),
        value.show("total-value", signed),
        esc(&short(cost)),
        net.show("total-net", signed),
        conv.with_interval,
        without
    );
    s.push_str(r#"<table class="data"><caption>Campaigns, by net value</caption><thead><tr><th scope="col">Campaign</th><th scope="col">Status</th><th scope="col">Net value</th><th scope="col">Incremental conversions</th></tr></thead><tbody>"#);
    for m in sorted(&b.rows) {
        let _ = write!(
            s,
            r#"<tr><th scope="row">{}</th><td><span class="status {}">{}</span></td><td class="num">{}</td><td class="num">{}</td></tr>"#,
            link(&m.campaign),
            status_class(m.status.as_str()),
            words(m.status.as_str()),
            esc(&plus_minus(m.net_value, m.net_value_ci95)),
            esc(&plus_minus(
                m.incremental_conversions,
                m.incremental_conversions_ci95
            )),
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// Campaigns by net value, those without one last.
fn sorted(rows: &[Measure]) -> Vec<&Measure> {
    let mut v: Vec<&Measure> = rows.iter().collect();
    v.sort_by(|a, b| match (a.net_value, b.net_value) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.campaign.cmp(&b.campaign),
    });
    v
}

/// A verdict in words.
fn words(status: &str) -> &'static str {
    match status {
        "win" => "win",
        "loss" => "loss",
        "inconclusive" => "inconclusive",
        "collecting" => "collecting",
        _ => "no control",
    }
}

/// The leaderboard: every campaign with its numbers, and the forest plot.
pub fn campaigns_body(
    b: &Board,
    badges: &dyn Fn(&Measure) -> String,
    link: &dyn Fn(&str) -> String,
) -> String {
    let order = sorted(&b.rows);
    let rows: Vec<Row> = order
        .iter()
        .map(|m| Row {
            label: m.campaign.clone(),
            point: m.diff_always_valid_ci95.and(m.diff),
            interval: m.diff_always_valid_ci95,
            class: status_class(m.status.as_str()),
        })
        .collect();
    let mut s = String::new();
    s.push_str(&charts::forest(
        "Difference in conversion rate, treated minus control, with its always-valid 95% interval",
        &rows,
        // Differences of rates: never past ±100 points.
        (-1.0, 1.0),
        pts,
    ));
    s.push_str(r#"<p class="hint">Each line is a campaign's always-valid 95% interval of the difference in conversion rate (safe to look at every day); right of zero, the campaign adds conversions.</p>"#);
    s.push_str(r#"<div class="scroll"><table class="data" id="leaderboard"><caption>Leaderboard: campaigns by net incremental value</caption><thead><tr>
<th scope="col">Campaign</th><th scope="col">Owner</th><th scope="col">Channel</th><th scope="col">Customers (treated / control)</th><th scope="col">Conversion (treated / control)</th><th scope="col">Difference, always-valid 95%</th><th scope="col">Incremental conversions</th><th scope="col">Incremental value</th><th scope="col">Cost</th><th scope="col">Net value</th><th scope="col">Status</th></tr></thead><tbody>"#);
    for m in order {
        let srm = if m.srm_alert {
            r#" <span class="badge bad" title="The control group does not have the share the holdout promised (sample-ratio mismatch): distrust these numbers until it is explained.">SRM</span>"#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<tr data-campaign="{id}"><th scope="row">{link}{badges}</th><td>{owner}</td><td>{channel}</td><td class="num">{ct} / {cc}</td><td class="num">{rt} / {rc}</td><td class="num">{diff} <span class="iv">{iv}</span></td><td class="num">{ic}</td><td class="num">{iv2}</td><td class="num">{cost}</td><td class="num net">{net}</td><td><span class="status {sc}">{st}</span>{srm}</td></tr>"#,
            id = esc(&m.campaign),
            link = link(&m.campaign),
            badges = badges(m),
            owner = esc(&m.owner),
            channel = esc(&m.channel),
            ct = short(m.customers_treated as f64),
            cc = short(m.customers_control as f64),
            rt = opt(m.rate_treated, pct),
            rc = opt(m.rate_control, pct),
            diff = esc(&opt(m.diff, pts)),
            iv = esc(&interval(m.diff_always_valid_ci95, pts)),
            ic = esc(&plus_minus(
                m.incremental_conversions,
                m.incremental_conversions_ci95
            )),
            iv2 = esc(&plus_minus(m.incremental_value, m.incremental_value_ci95)),
            cost = esc(&short(m.cost)),
            net = esc(&plus_minus(m.net_value, m.net_value_ci95)),
            sc = status_class(m.status.as_str()),
            st = words(m.status.as_str()),
        );
    }
    s.push_str("</tbody></table></div>");
    s
}

fn campaign_link(id: &str) -> String {
    format!(
        r#"<a href="/ui/campaigns/{}">{}</a>"#,
        html::url(id),
        esc(id)
    )
}

/// Paused and quarantined, as the operators set them.
fn badges(s: &Shared) -> impl Fn(&Measure) -> String {
    let gen = s.current.load();
    let view = s.reloader.controls().view();
    move |m: &Measure| {
        let Some(c) = gen.rules.campaign(&m.campaign) else {
            return String::new();
        };
        match view.blocked(&gen, c) {
            Some(why) if why.contains("quarantin") => {
                r#" <span class="badge bad">quarantined</span>"#.into()
            }
            Some(_) => r#" <span class="badge warn">paused</span>"#.into(),
            None => String::new(),
        }
    }
}

async fn board(s: &Arc<Shared>, q: &PeriodQuery) -> Result<Board, Response> {
    let (from, to, words) = q
        .period(reports::now(s))
        .map_err(|e| plain(StatusCode::BAD_REQUEST, &e))?;
    let rows = measure(s, from, to, None)
        .await
        .map_err(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, &e))?;
    Ok(Board { rows, words })
}

pub async fn overview(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<PeriodQuery>,
) -> Response {
    let sess = match session(&s, &headers, Need::Results, "/ui/overview") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let b = match board(&s, &q).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body = format!(
        "{}{}",
        picker("/ui/overview", &q, &b.words),
        overview_body(&b, &campaign_link)
    );
    html_response(html::page(
        "Overview",
        Nav::Overview,
        Some(&viewer(&sess)),
        &body,
    ))
}

pub async fn campaigns(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<PeriodQuery>,
) -> Response {
    let sess = match session(&s, &headers, Need::Results, "/ui/campaigns") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let b = match board(&s, &q).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body = format!(
        "{}{}",
        picker("/ui/campaigns", &q, &b.words),
        campaigns_body(&b, &badges(&s), &campaign_link)
    );
    html_response(html::page(
        "Campaigns",
        Nav::Campaigns,
        Some(&viewer(&sess)),
        &body,
    ))
}

/// One campaign: its facts, funnel, timing, days, and its file.
pub async fn campaign(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let here = format!("/ui/campaigns/{}", html::url(&id));
    let sess = match session(&s, &headers, Need::Results, &here) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let gen = s.current.load();
    let Some(c) = gen.rules.campaign(&id).cloned() else {
        return plain(
            StatusCode::NOT_FOUND,
            &format!("campaign {id:?} is not in the active generation"),
        );
    };
    let days = match reports::cumulative_for_ui(&s, &id, reports::now(&s)).await {
        Ok(d) => d,
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let file = s
        .store
        .meta(&format!("{}{}", crate::reload::BLOB_PREFIX, c.hash))
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let v = viewer(&sess);
    let blocked = s
        .reloader
        .controls()
        .view()
        .blocked(&gen, &c)
        .map(str::to_owned);
    let body = campaign_body(
        &c,
        gen.number,
        days,
        file.as_deref(),
        blocked.as_deref(),
        &v,
    );
    html_response(html::page(
        &format!("Campaign {id}"),
        Nav::Campaigns,
        Some(&v),
        &body,
    ))
}

fn campaign_body(
    c: &crate::rules::Campaign,
    generation: u64,
    days: Vec<(i64, Measure)>,
    file: Option<&str>,
    blocked: Option<&str>,
    v: &Viewer<'_>,
) -> String {
    let mut s = String::new();
    let last = days.last().map(|(_, m)| m.clone());
    let _ = write!(
        s,
        r#"<dl class="facts"><dt>Owner</dt><dd>{}</dd><dt>Channel</dt><dd>{}</dd><dt>Holdout</dt><dd>{}%</dd><dt>Goal</dt><dd>{}</dd><dt>Generation</dt><dd>{generation}</dd><dt>File</dt><dd>{}</dd><dt>State</dt><dd id="campaign-state">{}</dd></dl>"#,
        esc(&c.owner),
        esc(&c.channel),
        c.holdout_pct,
        esc(&c.goal.as_ref().map_or("none".into(), |g| format!(
            "{} within {} h",
            g.event,
            g.window_ms / 3_600_000
        ))),
        esc(&c.file.display().to_string()),
        esc(blocked.unwrap_or("deciding")),
    );
    if v.is_operator() {
        let (action, label) = if blocked.is_some_and(|b| b.contains("paused")) {
            ("resume", "Resume")
        } else {
            ("pause", "Pause")
        };
        let _ = write!(
            s,
            r#"<form method="post" action="/ui/campaigns/{}/{action}" class="inline">{}<button type="submit" id="campaign-{action}">{label} this campaign</button></form>"#,
            html::url(&c.id),
            v.csrf_field()
        );
    }
    let Some(m) = last else {
        s.push_str("<p>No decisions yet.</p>");
        return s;
    };
    let f = &m.funnel;
    let _ = write!(
        s,
        r#"<h2>Result</h2><p>Difference in conversion rate <strong>{}</strong>, always-valid 95% interval {}; incremental conversions {}; net value {}; status <span class="status {}">{}</span>.</p>"#,
        esc(&opt(m.diff, pts)),
        esc(&interval(m.diff_always_valid_ci95, pts)),
        esc(&plus_minus(
            m.incremental_conversions,
            m.incremental_conversions_ci95
        )),
        esc(&plus_minus(m.net_value, m.net_value_ci95)),
        status_class(m.status.as_str()),
        words(m.status.as_str())
    );
    s.push_str(r#"<h2>Funnel</h2><table class="data funnel" id="funnel"><caption>Every step, all time</caption><tbody>"#);
    let lost: Vec<String> = f
        .arbitration_lost_to
        .iter()
        .map(|(w, n)| format!("{n} to {w}"))
        .collect();
    let mut row = |step: &str, key: &str, n: u64, note: String| {
        let _ = write!(
            s,
            r#"<tr data-step="{key}"><th scope="row">{step}</th><td class="num">{n}</td><td>{}</td></tr>"#,
            esc(&note)
        );
    };
    row(
        "Fired (a firing or event reached it)",
        "fired",
        f.fired,
        String::new(),
    );
    row(
        "Qualified (its rule was true)",
        "qualified",
        f.qualified,
        String::new(),
    );
    row(
        "Suppressed: no consent",
        "suppressed_consent",
        f.suppressed_consent,
        String::new(),
    );
    row(
        "Suppressed: frequency cap",
        "suppressed_frequency",
        f.suppressed_frequency,
        String::new(),
    );
    row(
        "Suppressed: contact policy",
        "suppressed_policy",
        f.suppressed_policy,
        String::new(),
    );
    row(
        "Suppressed: lost arbitration",
        "suppressed_arbitration",
        f.suppressed_arbitration,
        lost.join(", "),
    );
    row("Sent (treated)", "sent", f.sent, String::new());
    row("Control (held out)", "control", f.control, String::new());
    row(
        "Delivered",
        "delivered",
        f.delivered,
        format!(
            "{} failed attempts, {} dead letters",
            f.delivery_failed, f.dead_lettered
        ),
    );
    row(
        "Agents accepted",
        "accepted",
        f.accepted,
        format!("{} declined", f.declined),
    );
    row(
        "Converted (matured, treated / control)",
        "converted",
        f.converted_treated,
        format!("{} in control", f.converted_control),
    );
    s.push_str("</tbody></table>");
    if !m.timing.is_empty() {
        let steps: Vec<String> = m.timing.iter().map(|t| t.after.clone()).collect();
        let series = [
            Series {
                label: "treated",
                class: "treated",
                points: m.timing.iter().map(|t| t.treated).collect(),
            },
            Series {
                label: "control",
                class: "control",
                points: m.timing.iter().map(|t| t.control).collect(),
            },
        ];
        s.push_str("<h2>Timing</h2>");
        s.push_str(&charts::lines(
            "Share of matured decisions converted, by time since the decision",
            &steps,
            &series,
            None,
            false,
            pct,
        ));
    }
    let labels: Vec<String> = days
        .iter()
        .map(|(d, _)| format_ts(d * DAY)[5..10].to_owned())
        .collect();
    let daily: Vec<f64> = m
        .daily
        .iter()
        .map(|d| (d.funnel.sent + d.funnel.control) as f64)
        .collect();
    let daily_labels: Vec<String> = m.daily.iter().map(|d| d.day[5..].to_owned()).collect();
    s.push_str("<h2>Day by day</h2>");
    s.push_str(&charts::bars(
        "Decisions per day (sent and control)",
        &daily_labels,
        &daily,
    ));
    let diffs: Vec<Option<f64>> = days.iter().map(|(_, m)| m.diff).collect();
    let band: Vec<Option<[f64; 2]>> = days.iter().map(|(_, m)| m.diff_always_valid_ci95).collect();
    s.push_str(&charts::lines(
        "Cumulative difference in conversion rate, with its always-valid 95% band",
        &labels,
        &[Series {
            label: "difference",
            class: "treated",
            points: diffs,
        }],
        Some(&band),
        true,
        pts,
    ));
    if let Some(text) = file {
        let _ = write!(
            s,
            r#"<h2>The campaign's file</h2><pre class="file">{}</pre>"#,
            esc(text)
        );
    }
    s
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn pause(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    set_paused(s, headers, id, f.csrf, true).await
}

pub async fn resume(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    set_paused(s, headers, id, f.csrf, false).await
}

async fn set_paused(
    s: Arc<Shared>,
    headers: HeaderMap,
    id: String,
    csrf: String,
    pause: bool,
) -> Response {
    let sess = match checked(&s, &headers, Need::Operator, &csrf) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let gen = s.current.load();
    let controls = s.reloader.controls();
    let by = format!("{} (dashboard)", sess.name);
    let result = if pause {
        controls.pause(&gen, &id, &by)
    } else {
        controls.resume(&gen, &id, &by)
    };
    match result {
        Ok(_) => back_to(&format!("/ui/campaigns/{}", html::url(&id))),
        Err(e) => plain(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// `nudge report --html`: the Overview and Campaigns of `rows` as one
/// self-contained page (styles inline, charts inline, no links out).
pub fn standalone(rows: Vec<Measure>, title: &str) -> String {
    let words = rows.first().map_or("no decisions".into(), |m| {
        format!("measured as of {}", m.as_of)
    });
    let b = Board { rows, words };
    let plain_name = |id: &str| esc(id);
    let none = |_: &Measure| String::new();
    let body = format!(
        "<p class=\"period\">{}</p><h2>Overview</h2>{}<h2>Campaigns</h2>{}",
        esc(&b.words),
        overview_body(&b, &plain_name),
        campaigns_body(&b, &none, &plain_name)
    );
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{t}</title><style>{css}</style></head>
<body><main id="main"><h1>{t}</h1>{body}</main></body></html>
"#,
        t = esc(title),
        css = include_str!("assets/style.css")
    )
}
