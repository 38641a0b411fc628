//! The statistics of a campaign's result: treated against control, with
//! the customer as the unit. Pure functions over sufficient statistics.
//!
//! # Definitions
//!
//! The holdout puts a customer in one arm per campaign, so customers, not
//! decisions, are independent. For an arm, customer i has D_i matured
//! decisions, M_i of which converted, worth V_i. The rate is ΣM / ΣD (the
//! decision-level rate people expect); its variance comes from the delta
//! method for a ratio of means, with the sample (n − 1) variances and
//! covariance over the arm's customers:
//!
//! Var(p) = (s²_M/m_D² − 2·m_M·s_MD/m_D³ + m_M²·s²_D/m_D⁴) / n
//!
//! [`ArmStats`] keeps integer sums (D, M, D², M², MD and the value sums in
//! micro-units), so stats merge exactly, in any order, across shards,
//! workers and days, and give identical numbers however they were summed.
//!
//! # Layout
//!
//! - [`ArmStats`]: one arm's sums; [`ArmStats::add_customer`], [`ArmStats::merge`].
//! - [`ratio`]: a rate and its variance from sums.
//! - [`Comparison`]: treated against control: difference, intervals
//!   (fixed-horizon and always-valid), relative lift, incremental counts.
//! - [`srm_p`]: the sample-ratio-mismatch check; [`Status`]: the verdict.

use serde::{Deserialize, Serialize};

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// α of every interval here.
pub const ALPHA: f64 = 0.05;

/// N_tune of the always-valid interval when none is configured.
pub const DEFAULT_N_TUNE: f64 = 5000.0;

/// Customers each arm needs before a verdict is given.
pub const MIN_CUSTOMERS: u64 = 30;

/// An SRM p-value under this flags the holdout as broken.
pub const SRM_ALERT_P: f64 = 0.001;

/// Values are summed in millionths, as integers, so that sums do not
/// depend on the order they were added in.
pub const VALUE_SCALE: f64 = 1_000_000.0;

/// A value in micro-units (rounded; non-finite values count as 0).
pub fn micros(value: f64) -> i64 {
    if value.is_finite() {
        // `as` saturates, so an absurd value cannot wrap.
        (value * VALUE_SCALE).round() as i64
    } else {
        0
    }
}

/// One arm's sufficient statistics over its customers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmStats {
    /// Customers with at least one matured decision in the arm.
    pub n: u64,
    /// ΣD: matured decisions.
    pub d: u64,
    /// ΣM: of them converted.
    pub m: u64,
    pub dd: u64,
    pub mm: u64,
    pub md: u64,
    /// ΣV, in micro-units.
    pub v: i128,
    pub vv: i128,
    pub vd: i128,
}

impl ArmStats {
    /// Adds one customer with `d` matured decisions, `m` of them converted,
    /// worth `v` micro-units. A customer with no decision is not a unit.
    pub fn add_customer(&mut self, d: u64, m: u64, v: i64) {
        self.apply(d, m, v, false);
    }

    /// Removes a customer added before (to replace its totals).
    pub fn remove_customer(&mut self, d: u64, m: u64, v: i64) {
        self.apply(d, m, v, true);
    }

    /// Sums are kept modulo 2⁶⁴ (2¹²⁸ for values): a record may hold a
    /// correction that is negative on its own (a customer removed from a
    /// cohort whose addition is in another record), and the total of all
    /// records is exact whenever it fits.
    fn apply(&mut self, d: u64, m: u64, v: i64, remove: bool) {
        if d == 0 {
            return;
        }
        let v = i128::from(v);
        let terms = ArmStats {
            n: 1,
            d,
            m,
            dd: d.wrapping_mul(d),
            mm: m.wrapping_mul(m),
            md: m.wrapping_mul(d),
            v,
            vv: v.wrapping_mul(v),
            vd: v.wrapping_mul(i128::from(d)),
        };
        if remove {
            self.subtract(&terms);
        } else {
            self.merge(&terms);
        }
    }

    pub fn merge(&mut self, o: &ArmStats) {
        self.n = self.n.wrapping_add(o.n);
        self.d = self.d.wrapping_add(o.d);
        self.m = self.m.wrapping_add(o.m);
        self.dd = self.dd.wrapping_add(o.dd);
        self.mm = self.mm.wrapping_add(o.mm);
        self.md = self.md.wrapping_add(o.md);
        self.v = self.v.wrapping_add(o.v);
        self.vv = self.vv.wrapping_add(o.vv);
        self.vd = self.vd.wrapping_add(o.vd);
    }

    fn subtract(&mut self, o: &ArmStats) {
        self.n = self.n.wrapping_sub(o.n);
        self.d = self.d.wrapping_sub(o.d);
        self.m = self.m.wrapping_sub(o.m);
        self.dd = self.dd.wrapping_sub(o.dd);
        self.mm = self.mm.wrapping_sub(o.mm);
        self.md = self.md.wrapping_sub(o.md);
        self.v = self.v.wrapping_sub(o.v);
        self.vv = self.vv.wrapping_sub(o.vv);
        self.vd = self.vd.wrapping_sub(o.vd);
    }

    /// The conversion rate and its variance.
    pub fn conversion(&self) -> Ratio {
        ratio(
            self.n,
            self.d as f64,
            self.m as f64,
            self.dd as f64,
            self.mm as f64,
            self.md as f64,
        )
    }

    /// Value per decision (in the value's unit) and its variance.
    pub fn value(&self) -> Ratio {
        let s = VALUE_SCALE;
        ratio(
            self.n,
            self.d as f64,
            self.v as f64 / s,
            self.dd as f64,
            self.vv as f64 / (s * s),
            self.vd as f64 / s,
        )
    }
}

/// A ratio of sums and its delta-method variance (`None` when n < 2 or
/// nothing was decided).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratio {
    pub rate: Option<f64>,
    pub var: Option<f64>,
}

/// ΣY/ΣX over n units, from the sums of X, Y, X², Y², XY.
pub fn ratio(n: u64, sx: f64, sy: f64, sxx: f64, syy: f64, sxy: f64) -> Ratio {
    if n == 0 || sx <= 0.0 {
        return Ratio {
            rate: None,
            var: None,
        };
    }
    let rate = sy / sx;
    if n < 2 {
        return Ratio {
            rate: Some(rate),
            var: None,
        };
    }
    let nf = n as f64;
    let (mx, my) = (sx / nf, sy / nf);
    // Centred sums as n·Σx² − (Σx)² over n(n−1): exact for integer sums up
    // to 2^53, and never negative from rounding.
    let denom = nf * (nf - 1.0);
    let vx = ((nf * sxx - sx * sx) / denom).max(0.0);
    let vy = ((nf * syy - sy * sy) / denom).max(0.0);
    let cxy = (nf * sxy - sx * sy) / denom;
    let var = (vy / (mx * mx) - 2.0 * my * cxy / mx.powi(3) + my * my * vx / mx.powi(4)) / nf;
    Ratio {
        rate: Some(rate),
        var: Some(var.max(0.0)),
    }
}

/// An interval `[lo, hi]`.
pub type Interval = [f64; 2];

fn around(centre: f64, half: f64) -> Interval {
    [centre - half, centre + half]
}

/// Half-width factor of the always-valid (confidence sequence) interval,
/// times the standard error: GrowthBook's and Eppo's asymptotic sequence,
/// tuned to be tightest near `n_tune` units.
pub fn always_valid_factor(n: f64, n_tune: f64) -> Option<f64> {
    if !(n > 0.0 && n_tune > 0.0) {
        return None;
    }
    let rho2 = (-2.0 * ALPHA.ln() + (1.0 - 2.0 * ALPHA.ln()).ln()) / n_tune;
    let nr = n * rho2;
    Some(((1.0 + nr) / nr * ((1.0 + nr) / (ALPHA * ALPHA)).ln()).sqrt())
}

/// Treated against control, from both arms' sums.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Comparison {
    pub rate_treated: Option<f64>,
    pub rate_control: Option<f64>,
    pub var_treated: Option<f64>,
    pub var_control: Option<f64>,
    pub diff: Option<f64>,
    pub se: Option<f64>,
    pub diff_ci95: Option<Interval>,
    pub diff_always_valid_ci95: Option<Interval>,
    pub rel_lift: Option<f64>,
    pub rel_lift_ci95: Option<Interval>,
    /// diff · ΣD of the treated arm.
    pub incremental: Option<f64>,
    pub incremental_ci95: Option<Interval>,
    pub incremental_always_valid_ci95: Option<Interval>,
}

impl Comparison {
    /// Compares the rates `t` and `c`; `treated_decisions` scales the
    /// difference to incremental counts, `units` (n_t + n_c) sets the
    /// always-valid width.
    pub fn new(t: Ratio, c: Ratio, treated_decisions: u64, units: u64, n_tune: f64) -> Comparison {
        let mut out = Comparison {
            rate_treated: t.rate,
            rate_control: c.rate,
            var_treated: t.var,
            var_control: c.var,
            ..Comparison::default()
        };
        let (Some(pt), Some(pc)) = (t.rate, c.rate) else {
            return out;
        };
        let diff = pt - pc;
        let scale = treated_decisions as f64;
        out.diff = Some(diff);
        out.incremental = Some(diff * scale);
        if pc != 0.0 {
            out.rel_lift = Some(diff / pc);
        }
        let (Some(vt), Some(vc)) = (t.var, c.var) else {
            return out;
        };
        let se = (vt + vc).sqrt();
        out.se = Some(se);
        let ci = around(diff, Z95 * se);
        out.diff_ci95 = Some(ci);
        out.incremental_ci95 = Some([ci[0] * scale, ci[1] * scale]);
        if let Some(f) = always_valid_factor(units as f64, n_tune) {
            let av = around(diff, f * se);
            out.diff_always_valid_ci95 = Some(av);
            out.incremental_always_valid_ci95 = Some([av[0] * scale, av[1] * scale]);
        }
        if pc != 0.0 {
            let var = vt / (pc * pc) + pt * pt * vc / pc.powi(4);
            out.rel_lift_ci95 = Some(around(diff / pc, Z95 * var.sqrt()));
        }
        out
    }
}

/// Sample-ratio mismatch: χ² (one degree of freedom) of the customers per
/// arm against the holdout share, and its p-value. `None` without a
/// control arm to expect or without customers.
pub fn srm(treated: u64, control: u64, holdout_pct: u32) -> Option<(f64, f64)> {
    let h = f64::from(holdout_pct) / 100.0;
    let total = (treated + control) as f64;
    if !(h > 0.0 && h < 1.0) || total == 0.0 {
        return None;
    }
    let (ec, et) = (h * total, (1.0 - h) * total);
    let chi2 = (control as f64 - ec).powi(2) / ec + (treated as f64 - et).powi(2) / et;
    Some((chi2, libm::erfc((chi2 / 2.0).sqrt())))
}

/// The p-value of [`srm`] alone.
pub fn srm_p(treated: u64, control: u64, holdout_pct: u32) -> Option<f64> {
    srm(treated, control, holdout_pct).map(|(_, p)| p)
}

/// A campaign's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// No holdout: nothing to compare with.
    NoControl,
    /// Fewer than [`MIN_CUSTOMERS`] customers in an arm.
    Collecting,
    /// The always-valid interval of the difference is above zero.
    Win,
    /// ... below zero.
    Loss,
    /// ... contains zero.
    Inconclusive,
}

impl Status {
    pub fn of(holdout_pct: u32, n_t: u64, n_c: u64, always_valid: Option<Interval>) -> Status {
        if holdout_pct == 0 {
            return Status::NoControl;
        }
        if n_t < MIN_CUSTOMERS || n_c < MIN_CUSTOMERS {
            return Status::Collecting;
        }
        match always_valid {
            Some([lo, _]) if lo > 0.0 => Status::Win,
            Some([_, hi]) if hi < 0.0 => Status::Loss,
            _ => Status::Inconclusive,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::NoControl => "no_control",
            Status::Collecting => "collecting",
            Status::Win => "win",
            Status::Loss => "loss",
            Status::Inconclusive => "inconclusive",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} is not {b} (±{tol})");
    }

    fn close_iv(a: Option<Interval>, b: [f64; 2], tol: f64) {
        let a = a.expect("an interval");
        close(a[0], b[0], tol);
        close(a[1], b[1], tol);
    }

    fn arm(units: &[(u64, u64)]) -> ArmStats {
        let mut s = ArmStats::default();
        for &(d, m) in units {
            s.add_customer(d, m, 0);
        }
        s
    }

    /// Issue 11's first vector: one decision per customer.
    #[test]
    fn one_decision_per_customer() {
        let mut t = vec![(1, 1); 82];
        t.extend(vec![(1, 0); 145 - 82]);
        let mut c = vec![(1, 1); 14];
        c.extend(vec![(1, 0); 26 - 14]);
        let (t, c) = (arm(&t), arm(&c));
        let cmp = Comparison::new(t.conversion(), c.conversion(), t.d, t.n + c.n, 5000.0);
        close(cmp.rate_treated.unwrap(), 0.5655172414, 1e-8);
        close(cmp.rate_control.unwrap(), 0.5384615385, 1e-8);
        close(cmp.var_treated.unwrap(), 0.001706302021, 1e-8);
        close(cmp.var_control.unwrap(), 0.009940828402, 1e-8);
        close(cmp.diff.unwrap(), 0.0270557029, 1e-8);
        close(cmp.se.unwrap(), 0.1079218719, 1e-8);
        close_iv(cmp.diff_ci95, [-0.1844672791, 0.2385786849], 1e-8);
        close_iv(
            cmp.diff_always_valid_ci95,
            [-0.5560334023, 0.6101448081],
            1e-8,
        );
        close(cmp.rel_lift.unwrap(), 0.0502463054, 1e-8);
        close_iv(cmp.rel_lift_ci95, [-0.3594880771, 0.4599806879], 1e-8);
        close(cmp.incremental.unwrap(), 3.923077, 1e-6);
        let (chi2, p) = srm(145, 26, 10).unwrap();
        close(chi2, 5.146849, 1e-6);
        close(p, 0.023289, 1e-6);
        assert_eq!(
            Status::of(10, 145, 26, cmp.diff_always_valid_ci95),
            Status::Collecting
        );
    }

    /// Issue 11's second vector: several decisions per customer.
    #[test]
    fn several_decisions_per_customer() {
        let t = arm(&[(3, 2), (1, 0), (2, 2), (4, 1), (1, 1), (2, 0)]);
        let c = arm(&[(2, 1), (1, 0), (3, 0), (1, 1)]);
        let cmp = Comparison::new(t.conversion(), c.conversion(), t.d, t.n + c.n, 5000.0);
        close(cmp.rate_treated.unwrap(), 0.4615384615, 1e-8);
        close(cmp.rate_control.unwrap(), 0.2857142857, 1e-8);
        close(cmp.var_treated.unwrap(), 0.02562935471, 1e-8);
        close(cmp.var_control.unwrap(), 0.04109398862, 1e-8);
        close(cmp.diff.unwrap(), 0.1758241758, 1e-8);
        close(cmp.se.unwrap(), 0.2583086203, 1e-8);
        close_iv(cmp.diff_ci95, [-0.3304514169, 0.6820997685], 1e-8);
        close(cmp.rel_lift.unwrap(), 0.6153846154, 1e-8);
        close_iv(cmp.rel_lift_ci95, [-1.8850632509, 3.1158324817], 1e-8);
        close(cmp.incremental.unwrap(), 2.285714, 1e-6);
    }

    #[test]
    fn undefined_cases_are_null_not_zero() {
        // One customer per arm: rates, but no variance, so no interval.
        let t = arm(&[(2, 1)]);
        let c = arm(&[(1, 0)]);
        let cmp = Comparison::new(t.conversion(), c.conversion(), t.d, 2, 5000.0);
        assert_eq!(cmp.diff, Some(0.5));
        assert_eq!(cmp.se, None);
        assert_eq!(cmp.diff_ci95, None);
        // p_c = 0: no relative lift (never 0, never infinite).
        assert_eq!(cmp.rel_lift, None);
        assert_eq!(cmp.rel_lift_ci95, None);
        // No control at all.
        let none = Comparison::new(
            t.conversion(),
            ArmStats::default().conversion(),
            2,
            1,
            5000.0,
        );
        assert_eq!(none.rate_control, None);
        assert_eq!(none.diff, None);
        assert_eq!(none.incremental, None);
        assert_eq!(srm_p(10, 0, 0), None);
        assert_eq!(srm_p(0, 0, 10), None);
        assert_eq!(Status::of(0, 500, 0, None), Status::NoControl);
    }

    #[test]
    fn verdicts_follow_the_always_valid_interval() {
        assert_eq!(Status::of(10, 30, 29, Some([0.1, 0.2])), Status::Collecting);
        assert_eq!(Status::of(10, 30, 30, Some([0.1, 0.2])), Status::Win);
        assert_eq!(Status::of(10, 30, 30, Some([-0.2, -0.1])), Status::Loss);
        assert_eq!(
            Status::of(10, 30, 30, Some([-0.1, 0.1])),
            Status::Inconclusive
        );
        assert_eq!(Status::of(10, 30, 30, None), Status::Inconclusive);
    }

    #[test]
    fn sums_merge_in_any_order_to_the_same_numbers() {
        let units = [
            (3u64, 2u64, 1_500_000i64),
            (1, 0, 0),
            (2, 2, 7_250_000),
            (4, 1, 10),
        ];
        let mut whole = ArmStats::default();
        for &(d, m, v) in &units {
            whole.add_customer(d, m, v);
        }
        let (mut a, mut b) = (ArmStats::default(), ArmStats::default());
        for &(d, m, v) in units.iter().rev().take(2) {
            a.add_customer(d, m, v);
        }
        for &(d, m, v) in units.iter().take(2) {
            b.add_customer(d, m, v);
        }
        b.merge(&a);
        assert_eq!(whole, b);
        // Replacing a customer's totals is remove + add.
        b.remove_customer(1, 0, 0);
        b.add_customer(2, 1, 3);
        let mut direct = ArmStats::default();
        for &(d, m, v) in &[(3, 2, 1_500_000), (2, 1, 3), (2, 2, 7_250_000), (4, 1, 10)] {
            direct.add_customer(d, m, v);
        }
        assert_eq!(direct, b);
    }

    #[test]
    fn value_rate_uses_the_same_delta_method() {
        // Value 1.0 per conversion makes the value rate the conversion rate.
        let mut s = ArmStats::default();
        for &(d, m) in &[(3u64, 2u64), (1, 0), (2, 2), (4, 1), (1, 1), (2, 0)] {
            s.add_customer(d, m, micros(m as f64));
        }
        let (c, v) = (s.conversion(), s.value());
        close(v.rate.unwrap(), c.rate.unwrap(), 1e-12);
        close(v.var.unwrap(), c.var.unwrap(), 1e-12);
        assert_eq!(micros(f64::NAN), 0);
        assert_eq!(micros(0.0000005), 1);
    }
}
