//! What every campaign achieved: customers treated against control, with
//! intervals, value, cost and net value, the funnel and the timing of
//! conversions (`nudge replay --measure`).
//!
//! A `sent` or `control` decision at t is *matured* when t + the goal
//! window ≤ as_of: only then is it known whether it converted, so only
//! matured decisions enter the headline numbers; the others are counted as
//! immature. The statistics themselves are in [`crate::stats`].
//!
//! # Layout
//!
//! - [`Measurer`]: fed every decision once (any order), with its
//!   conversion; [`Measurer::rows`] gives one [`Measure`] per campaign.
//! - [`Measure`]: one campaign's result, the JSON a page draws from.
//! - [`to_jsonl`], [`to_table`]: the outputs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::decide::{fnv1a64, Outcome};
use crate::event::format_ts;
pub use crate::ledger::Funnel;
use crate::ledger::{timing_bucket, DAY, TIMING};
use crate::rules::RuleSet;
use crate::stats::{self, ArmStats, Comparison, Interval, Status};
use crate::store::{Conversion, StoreError};

/// How a report is computed.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// N_tune of the always-valid interval.
    pub n_tune: f64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            n_tune: stats::DEFAULT_N_TUNE,
        }
    }
}

/// One day (UTC) of a campaign.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Day {
    pub day: String,
    #[serde(flatten)]
    pub funnel: Funnel,
}

/// One point of the timing curve: the share of matured decisions that had
/// converted within `after_ms` of being made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimingPoint {
    pub after: String,
    pub after_ms: i64,
    pub treated: Option<f64>,
    pub control: Option<f64>,
}

/// One campaign's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    pub campaign: String,
    pub owner: String,
    pub channel: String,
    pub holdout: u32,
    pub goal: Option<String>,
    pub goal_window_ms: Option<i64>,
    pub as_of: String,
    pub customers_treated: u64,
    pub customers_control: u64,
    pub matured_decisions_treated: u64,
    pub matured_decisions_control: u64,
    pub immature_decisions_treated: u64,
    pub immature_decisions_control: u64,
    pub converted_treated: u64,
    pub converted_control: u64,
    pub rate_treated: Option<f64>,
    pub rate_control: Option<f64>,
    pub diff: Option<f64>,
    pub diff_ci95: Option<Interval>,
    pub diff_always_valid_ci95: Option<Interval>,
    pub rel_lift: Option<f64>,
    pub rel_lift_ci95: Option<Interval>,
    pub incremental_conversions: Option<f64>,
    pub incremental_conversions_ci95: Option<Interval>,
    pub incremental_conversions_always_valid_ci95: Option<Interval>,
    pub value_treated: f64,
    pub value_control: f64,
    pub value_rate_treated: Option<f64>,
    pub value_rate_control: Option<f64>,
    pub incremental_value: Option<f64>,
    pub incremental_value_ci95: Option<Interval>,
    pub incremental_value_always_valid_ci95: Option<Interval>,
    /// Per-contact cost of the channel times matured treated decisions.
    pub cost: f64,
    pub net_value: Option<f64>,
    pub net_value_ci95: Option<Interval>,
    pub iroi: Option<f64>,
    pub srm_chi2: Option<f64>,
    pub srm_p: Option<f64>,
    /// The holdout looks broken (p < 0.001).
    pub srm_alert: bool,
    pub status: Status,
    pub funnel: Funnel,
    pub timing: Vec<TimingPoint>,
    /// Per day (absent from `GET /v1/reports`'s list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub daily: Vec<Day>,
}

/// One customer's matured decisions in one arm: (D, M, V in micro-units).
#[derive(Clone, Copy, Default)]
struct Unit {
    d: u64,
    m: u64,
    v: i64,
}

#[derive(Default)]
struct Acc {
    totals: Totals,
    /// Arm (0 treated, 1 control) and customer (a 64-bit hash: two
    /// customers of a campaign collide with odds of about n²/2⁶⁵) → unit.
    units: [HashMap<u64, Unit>; 2],
}

/// Everything one campaign's result is computed from.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub funnel: Funnel,
    /// By day (days since 1970, UTC).
    pub daily: BTreeMap<i64, Funnel>,
    /// The units' sufficient statistics, treated and control.
    pub arms: [ArmStats; 2],
    /// `sent` and `control` decisions not matured yet.
    pub immature: [u64; 2],
    /// Converted matured decisions per arm by timing bucket (index into
    /// [`TIMING`] of the first point at or after the delay).
    pub timing: [Vec<u64>; 2],
}

/// A decision as the measurement needs it.
pub struct Decided<'a> {
    pub ts: i64,
    pub customer: &'a str,
    pub campaign: &'a str,
    pub outcome: Outcome,
    /// When its goal event came, and what it was worth (micro-units).
    pub conversion: Option<(i64, i64)>,
}

/// Collects every decision of a period and reports per campaign.
pub struct Measurer<'r> {
    rules: &'r RuleSet,
    settings: Settings,
    as_of: i64,
    /// By campaign id; campaigns not in the rules are not measured.
    accs: BTreeMap<String, Acc>,
}

impl<'r> Measurer<'r> {
    /// Measures at `as_of` (ms): decisions matured by then count.
    pub fn new(rules: &'r RuleSet, as_of: i64, settings: Settings) -> Measurer<'r> {
        let accs = rules
            .campaigns
            .iter()
            .map(|c| (c.id.clone(), Acc::default()))
            .collect();
        Measurer {
            rules,
            settings,
            as_of,
            accs,
        }
    }

    /// Campaign `id` was reached by `fired` firings, `qualified` of which
    /// passed its `when` (from the workers' counts).
    pub fn add_funnel(&mut self, id: &str, fired: u64, qualified: u64) {
        if let Some(acc) = self.accs.get_mut(id) {
            acc.totals.funnel.fired += fired;
            acc.totals.funnel.qualified += qualified;
        }
    }

    pub fn add(&mut self, d: &Decided<'_>) {
        let Some(campaign) = self.rules.campaign(d.campaign) else {
            return;
        };
        let window = campaign.goal.as_ref().map(|g| g.window_ms);
        let Some(acc) = self.accs.get_mut(d.campaign) else {
            return;
        };
        let totals = &mut acc.totals;
        totals.funnel.count(d.outcome);
        let day = totals.daily.entry(d.ts.div_euclid(DAY)).or_default();
        day.count(d.outcome);
        let arm = match d.outcome {
            Outcome::Sent => 0,
            Outcome::Control => 1,
            _ => return,
        };
        // Without a goal nothing can convert: every decision counts as
        // matured and unconverted, so reach is still reported.
        let matured = window.is_none_or(|w| d.ts.saturating_add(w) <= self.as_of);
        if !matured {
            totals.immature[arm] += 1;
            return;
        }
        let unit = acc.units[arm]
            .entry(fnv1a64(&[d.customer.as_bytes()]))
            .or_default();
        unit.d += 1;
        if let Some((at, value)) = d.conversion {
            unit.m += 1;
            unit.v = unit.v.saturating_add(value);
            let bucket = timing_bucket(at - d.ts);
            let timing = &mut totals.timing[arm];
            if timing.len() <= bucket {
                timing.resize(bucket + 1, 0);
            }
            timing[bucket] += 1;
            totals.funnel.converted(arm);
            day.converted(arm);
        }
    }

    /// Every campaign's result, sorted by campaign id.
    pub fn rows(self) -> Vec<Measure> {
        let Measurer {
            rules,
            settings,
            as_of,
            accs,
        } = self;
        rules
            .campaigns
            .iter()
            .filter_map(|c| {
                let acc = accs.get(&c.id)?;
                let mut totals = acc.totals.clone();
                totals.arms = [arm_stats(&acc.units[0]), arm_stats(&acc.units[1])];
                Some(measure(rules, c, &totals, as_of, settings))
            })
            .collect()
    }
}

fn arm_stats(units: &HashMap<u64, Unit>) -> ArmStats {
    let mut s = ArmStats::default();
    for u in units.values() {
        s.add_customer(u.d, u.m, u.v);
    }
    s
}

/// One campaign's result from its totals.
pub fn measure(
    rules: &RuleSet,
    c: &crate::rules::Campaign,
    totals: &Totals,
    as_of: i64,
    settings: Settings,
) -> Measure {
    let cost_per = rules
        .policies
        .channels
        .get(&c.channel)
        .map_or(0.0, |p| p.cost);
    let [t, k] = totals.arms;
    let units = t.n + k.n;
    let conv = Comparison::new(t.conversion(), k.conversion(), t.d, units, settings.n_tune);
    let value = Comparison::new(t.value(), k.value(), t.d, units, settings.n_tune);
    let cost = cost_per * t.d as f64;
    let net = value.incremental.map(|v| v - cost);
    let (srm_chi2, srm_p) = match stats::srm(t.n, k.n, c.holdout_pct) {
        Some((chi2, p)) => (Some(chi2), Some(p)),
        None => (None, None),
    };
    let window = c.goal.as_ref().map(|g| g.window_ms);
    let timing = window.map_or_else(Vec::new, |w| timing_curve(totals, w, t.d, k.d));
    Measure {
        campaign: c.id.clone(),
        owner: c.owner.clone(),
        channel: c.channel.clone(),
        holdout: c.holdout_pct,
        goal: c.goal.as_ref().map(|g| g.event.clone()),
        goal_window_ms: window,
        as_of: format_ts(as_of),
        customers_treated: t.n,
        customers_control: k.n,
        matured_decisions_treated: t.d,
        matured_decisions_control: k.d,
        immature_decisions_treated: totals.immature[0],
        immature_decisions_control: totals.immature[1],
        converted_treated: t.m,
        converted_control: k.m,
        rate_treated: conv.rate_treated,
        rate_control: conv.rate_control,
        diff: conv.diff,
        diff_ci95: conv.diff_ci95,
        diff_always_valid_ci95: conv.diff_always_valid_ci95,
        rel_lift: conv.rel_lift,
        rel_lift_ci95: conv.rel_lift_ci95,
        incremental_conversions: conv.incremental,
        incremental_conversions_ci95: conv.incremental_ci95,
        incremental_conversions_always_valid_ci95: conv.incremental_always_valid_ci95,
        value_treated: t.v as f64 / stats::VALUE_SCALE,
        value_control: k.v as f64 / stats::VALUE_SCALE,
        value_rate_treated: value.rate_treated,
        value_rate_control: value.rate_control,
        incremental_value: value.incremental,
        incremental_value_ci95: value.incremental_ci95,
        incremental_value_always_valid_ci95: value.incremental_always_valid_ci95,
        cost,
        net_value: net,
        net_value_ci95: value
            .incremental_ci95
            .map(|[lo, hi]| [lo - cost, hi - cost]),
        iroi: net.filter(|_| cost > 0.0).map(|n| n / cost),
        srm_chi2,
        srm_p,
        srm_alert: srm_p.is_some_and(|p| p < stats::SRM_ALERT_P),
        status: Status::of(c.holdout_pct, t.n, k.n, conv.diff_always_valid_ci95),
        funnel: totals.funnel.clone(),
        timing,
        daily: totals
            .daily
            .iter()
            .map(|(day, f)| Day {
                day: format_ts(day * DAY)[..10].to_owned(),
                funnel: f.clone(),
            })
            .collect(),
    }
}

/// Cumulative share converted by each point up to the window, and at the
/// window itself.
fn timing_curve(totals: &Totals, window: i64, treated: u64, control: u64) -> Vec<TimingPoint> {
    let mut points: Vec<(i64, String)> = TIMING
        .iter()
        .filter(|(t, _)| *t < window)
        .map(|(t, l)| (*t, (*l).to_owned()))
        .collect();
    points.push((window, "window".to_owned()));
    let share = |arm: usize, upto: i64, n: u64| -> Option<f64> {
        (n > 0).then(|| {
            let converted: u64 = totals.timing[arm]
                .iter()
                .enumerate()
                .filter(|(i, _)| TIMING.get(*i).is_none_or(|(t, _)| *t <= upto))
                .map(|(_, c)| c)
                .sum();
            converted as f64 / n as f64
        })
    };
    points
        .into_iter()
        .map(|(ms, label)| TimingPoint {
            treated: share(0, ms, treated),
            control: share(1, ms, control),
            after: label,
            after_ms: ms,
        })
        .collect()
}

/// Each decision's conversion, from a store's conversions read in the
/// decision log's own order (time, customer, campaign of the decision):
/// decisions asked in that order are joined in one pass over both.
pub struct ConversionJoin<I: Iterator<Item = Result<Conversion, StoreError>>> {
    conversions: std::iter::Peekable<I>,
}

impl<I: Iterator<Item = Result<Conversion, StoreError>>> ConversionJoin<I> {
    pub fn new(conversions: I) -> Self {
        ConversionJoin {
            conversions: conversions.peekable(),
        }
    }

    /// When decision (`ts`, `customer`, `campaign`) converted and what it
    /// was worth; calls must come in the log's order.
    pub fn find(
        &mut self,
        ts: i64,
        customer: &str,
        campaign: &str,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let key = (ts, customer.as_bytes(), campaign.as_bytes());
        while let Some(next) = self.conversions.peek() {
            let order = match next {
                Ok(c) => (c.ts, c.customer.as_bytes(), c.campaign.as_bytes()).cmp(&key),
                Err(_) => return self.conversions.next().transpose().map(|_| None),
            };
            match order {
                std::cmp::Ordering::Greater => break,
                std::cmp::Ordering::Less => {
                    self.conversions.next();
                }
                std::cmp::Ordering::Equal => {
                    return Ok(self
                        .conversions
                        .next()
                        .transpose()?
                        .map(|c| (c.at, c.value)));
                }
            }
        }
        Ok(None)
    }
}

/// The decision log's fields a measurement reads.
#[derive(serde::Deserialize)]
struct Logged<'a> {
    #[serde(borrow)]
    ts: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    customer: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    campaign: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    outcome: std::borrow::Cow<'a, str>,
}

/// Measures a store's decision log as of `as_of` (`nudge report --data`):
/// the decisions and their conversions, both in log order, joined in one
/// pass. The store keeps no firing counts, so `fired` and `qualified` are
/// 0 in the funnel.
pub fn from_store(
    store: &crate::store::Store,
    rules: &RuleSet,
    as_of: i64,
    settings: Settings,
) -> Result<Vec<Measure>, crate::store::StoreError> {
    let mut measurer = Measurer::new(rules, as_of, settings);
    let mut join = ConversionJoin::new(store.conversions());
    for line in store.decisions() {
        let line = line?;
        let corrupt = |problem: String| StoreError::Corrupt {
            what: "decision log",
            customer: String::new(),
            problem,
        };
        let d: Logged<'_> = serde_json::from_slice(&line).map_err(|e| corrupt(e.to_string()))?;
        let ts = crate::event::parse_ts(&d.ts).ok_or_else(|| corrupt(format!("ts {:?}", d.ts)))?;
        let outcome = Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == d.outcome)
            .ok_or_else(|| corrupt(format!("outcome {:?}", d.outcome)))?;
        let conversion = join.find(ts, &d.customer, &d.campaign)?;
        measurer.add(&Decided {
            ts,
            customer: &d.customer,
            campaign: &d.campaign,
            outcome,
            conversion,
        });
    }
    Ok(measurer.rows())
}

/// Comma-separated values of the headline fields, one campaign a row.
pub fn to_csv(rows: &[Measure]) -> String {
    let num = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    let lo = |v: Option<Interval>| num(v.map(|i| i[0]));
    let hi = |v: Option<Interval>| num(v.map(|i| i[1]));
    let mut s = String::from(
        "campaign,as_of,customers_treated,customers_control,matured_decisions_treated,\
         matured_decisions_control,converted_treated,converted_control,rate_treated,\
         rate_control,diff,diff_ci95_lo,diff_ci95_hi,diff_always_valid_lo,\
         diff_always_valid_hi,rel_lift,incremental_conversions,incremental_value,cost,\
         net_value,srm_p,status\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.campaign,
            r.as_of,
            r.customers_treated,
            r.customers_control,
            r.matured_decisions_treated,
            r.matured_decisions_control,
            r.converted_treated,
            r.converted_control,
            num(r.rate_treated),
            num(r.rate_control),
            num(r.diff),
            lo(r.diff_ci95),
            hi(r.diff_ci95),
            lo(r.diff_always_valid_ci95),
            hi(r.diff_always_valid_ci95),
            num(r.rel_lift),
            num(r.incremental_conversions),
            num(r.incremental_value),
            r.cost,
            num(r.net_value),
            num(r.srm_p),
            r.status.as_str(),
        );
    }
    s
}

/// JSON Lines, one campaign a line.
pub fn to_jsonl(rows: &[Measure]) -> String {
    let mut s = String::new();
    for r in rows {
        // Numbers, strings and options of them always serialise; a
        // non-finite float would become null.
        s.push_str(&serde_json::to_string(r).unwrap_or_default());
        s.push('\n');
    }
    s
}

/// A percentage point difference with its interval, for people.
fn pts(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{:+.1}pt", v * 100.0))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The table `nudge replay` prints: reach, rates, the difference with its
/// always-valid interval, incremental conversions, and the verdict.
pub fn to_table(rows: &[Measure]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>19} {:>16} {:<12}",
        "campaign",
        "treated",
        "control",
        "immature",
        "conv(t)",
        "conv(c)",
        "diff",
        "95% always-valid",
        "incr. conv.",
        "status"
    );
    for r in rows {
        let iv = r.diff_always_valid_ci95.map_or("n/a".into(), |[lo, hi]| {
            format!("[{:+.1}, {:+.1}]pt", lo * 100.0, hi * 100.0)
        });
        let incr = match (r.incremental_conversions, r.incremental_conversions_ci95) {
            (Some(v), Some([lo, hi])) => format!("{v:.1} ±{:.1}", (hi - lo) / 2.0),
            (Some(v), None) => format!("{v:.1}"),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "{:<20} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>19} {:>16} {:<12}",
            r.campaign,
            r.customers_treated,
            r.customers_control,
            r.immature_decisions_treated + r.immature_decisions_control,
            pct(r.rate_treated),
            pct(r.rate_control),
            pts(r.diff),
            iv,
            incr,
            r.status.as_str(),
        );
    }
    let _ = writeln!(
        s,
        "(treated, control: customers with decisions whose goal window has closed; \
         immature: decisions still inside it, not counted yet; rates per decision; \
         'collecting' until {} customers per arm)",
        stats::MIN_CUSTOMERS
    );
    s
}
