//! The measurement ledger: what a campaign achieved, kept up to date as
//! decisions are made, convert and mature, so that a report is a sum of a
//! few hundred records instead of a pass over the decision log.
//!
//! Two kinds of record, both written in the commit of the event (or timer)
//! that changed them, so a crash loses or keeps them with the decision:
//!
//! - a **unit**: one customer's matured decisions of one campaign in one
//!   arm (D, M, V: decisions, conversions, value) and its *cohort day*, the
//!   day of the decision that made the customer a unit;
//! - a **tally**: per campaign, day and writer, the funnel of the day's
//!   decisions, how many of them matured and converted, their conversion
//!   timing, and the sufficient statistics ([`ArmStats`]) of the units of
//!   that cohort day. When a unit changes, its old contribution is
//!   subtracted from its cohort's sums and the new one added: integer sums,
//!   so tallies merge exactly across writers and days, in any order.
//!
//! A decision with a goal matures when its window closes: the worker sets
//! one of the host's own timers ([`MATURITY`]) at decision time + window,
//! and when it fires reads whether the decision converted. A goal event
//! that arrives after that (at the window's last instant, or late) updates
//! the unit it already counted in. A decision without a goal matures at
//! once, unconverted.
//!
//! # Layout
//!
//! - [`Funnel`], [`Tally`]: the records, as JSON.
//! - [`Ledger`]: one writer's tallies in memory, and the bookkeeping.
//! - [`Maturity`]: a maturity timer's key, both ways.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::decide::Outcome;
use crate::stats::ArmStats;
use crate::store::{Changes, DueTimer, Store, StoreError, Timer};

pub use crate::store::MATURITY;

pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 24 * HOUR;

/// Points of the timing curve (time since the decision), up to the window.
pub const TIMING: [(i64, &str); 9] = [
    (HOUR, "1h"),
    (6 * HOUR, "6h"),
    (DAY, "1d"),
    (2 * DAY, "2d"),
    (3 * DAY, "3d"),
    (7 * DAY, "7d"),
    (14 * DAY, "14d"),
    (30 * DAY, "30d"),
    (90 * DAY, "90d"),
];

/// The timing bucket of a conversion `delay` ms after its decision: the
/// index of the first point at or after it ([`TIMING`]'s length past all).
pub fn timing_bucket(delay: i64) -> usize {
    TIMING
        .iter()
        .position(|(t, _)| delay <= *t)
        .unwrap_or(TIMING.len())
}

/// The writer id of the deliverer's tallies (workers use their shard).
pub const DELIVERER: u16 = u16::MAX - 1;
/// The writer id of the contact centre's outcomes.
pub const AGENTS: u16 = u16::MAX;
/// The writer id of a report's scratch ledger: never stored, so its
/// tallies start empty and end as the report's corrections.
pub const SCRATCH: u16 = u16::MAX - 2;

/// The writer id of worker shard `shard` (shards are far fewer than the
/// ids reserved above them).
pub fn writer_of(shard: usize) -> u16 {
    u16::try_from(shard).map_or(SCRATCH - 1, |s| s.min(SCRATCH - 1))
}

/// The UTC day of a time in ms.
pub fn day_of(ts: i64) -> i32 {
    ts.div_euclid(DAY)
        .clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

/// The funnel of one campaign: counts of every step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Funnel {
    /// A firing (or event) the campaign listens to reached it.
    pub fired: u64,
    /// Its `when` was true.
    pub qualified: u64,
    pub suppressed_consent: u64,
    pub suppressed_frequency: u64,
    pub suppressed_policy: u64,
    pub suppressed_arbitration: u64,
    /// Which campaign won the arbitrations this one lost, and how often.
    pub arbitration_lost_to: BTreeMap<String, u64>,
    pub sent: u64,
    pub control: u64,
    /// Live: deliveries the channel accepted, failed attempts (retried),
    /// and deliveries given up on (dead letters).
    pub delivered: u64,
    pub delivery_failed: u64,
    pub dead_lettered: u64,
    /// Live, agent channel: what agents recorded on the pre-thought actions.
    pub accepted: u64,
    pub declined: u64,
    /// Matured decisions that converted, per arm.
    pub converted_treated: u64,
    pub converted_control: u64,
}

impl Funnel {
    pub fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Sent => self.sent += 1,
            Outcome::Control => self.control += 1,
            Outcome::SuppressedConsent => self.suppressed_consent += 1,
            Outcome::SuppressedFrequency => self.suppressed_frequency += 1,
            Outcome::SuppressedPolicy => self.suppressed_policy += 1,
            Outcome::SuppressedArbitration => self.suppressed_arbitration += 1,
        }
    }

    pub fn merge(&mut self, o: &Funnel) {
        self.fired += o.fired;
        self.qualified += o.qualified;
        self.suppressed_consent += o.suppressed_consent;
        self.suppressed_frequency += o.suppressed_frequency;
        self.suppressed_policy += o.suppressed_policy;
        self.suppressed_arbitration += o.suppressed_arbitration;
        for (k, n) in &o.arbitration_lost_to {
            *self.arbitration_lost_to.entry(k.clone()).or_default() += n;
        }
        self.sent += o.sent;
        self.control += o.control;
        self.delivered += o.delivered;
        self.delivery_failed += o.delivery_failed;
        self.dead_lettered += o.dead_lettered;
        self.accepted += o.accepted;
        self.declined += o.declined;
        self.converted_treated += o.converted_treated;
        self.converted_control += o.converted_control;
    }

    pub fn converted(&mut self, arm: usize) {
        if arm == 0 {
            self.converted_treated += 1;
        } else {
            self.converted_control += 1;
        }
    }
}

/// One campaign's day, from one writer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tally {
    /// The decisions made this day, step by step.
    pub funnel: Funnel,
    /// Of this day's `sent` (0) and `control` (1) decisions, how many have
    /// matured.
    pub matured: [u64; 2],
    /// Converted matured decisions of this day per arm by timing bucket.
    pub timing: [Vec<u64>; 2],
    /// The units whose cohort is this day, per arm.
    pub arms: [ArmStats; 2],
}

impl Tally {
    pub fn merge(&mut self, o: &Tally) {
        self.funnel.merge(&o.funnel);
        for arm in 0..2 {
            self.matured[arm] += o.matured[arm];
            self.arms[arm].merge(&o.arms[arm]);
            let t = &mut self.timing[arm];
            if t.len() < o.timing[arm].len() {
                t.resize(o.timing[arm].len(), 0);
            }
            for (a, b) in t.iter_mut().zip(&o.timing[arm]) {
                *a += b;
            }
        }
    }

    fn timed(&mut self, arm: usize, delay: i64) {
        let bucket = timing_bucket(delay);
        let t = &mut self.timing[arm];
        if t.len() <= bucket {
            t.resize(bucket + 1, 0);
        }
        t[bucket] += 1;
    }

    pub fn decode(bytes: &[u8], campaign: &str) -> Result<Tally, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            what: "tally",
            customer: String::new(),
            problem: format!("campaign {campaign:?}: {e}"),
        })
    }
}

/// Decisions made before this time may be forgotten (`[measure]
/// retention`): `keep` before `now`, and never less than the longest goal
/// window (plus a day), so no decision loses its row before it matured.
/// Frequency caps and contact policies read the customer's history, not
/// these rows.
pub fn retention_cutoff(rules: &crate::rules::RuleSet, now: i64, keep: std::time::Duration) -> i64 {
    let longest = rules
        .campaigns
        .iter()
        .filter_map(|c| c.goal.as_ref().map(|g| g.window_ms))
        .max()
        .unwrap_or(0);
    let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    now.saturating_sub(keep.max(longest).saturating_add(DAY))
}

/// A change of `writer`'s tally of `campaign` on the day of `ts`, made
/// outside the workers (deliveries, agents' answers).
pub fn direct_edit(
    campaign: &str,
    ts: i64,
    writer: u16,
    change: impl FnOnce(&mut Funnel) + Send + 'static,
) -> crate::store::TallyEdit {
    let name = campaign.to_owned();
    crate::store::TallyEdit {
        campaign: campaign.to_owned(),
        day: day_of(ts),
        writer,
        edit: Box::new(move |current: Option<&[u8]>| {
            let mut t = match current.map(|b| Tally::decode(b, &name)) {
                Some(Ok(t)) => t,
                None => Tally::default(),
                Some(Err(e)) => {
                    // Counting on from zero loses the old counts of this
                    // day; refusing would lose the delivery's record.
                    tracing::error!("{e}: counted again from zero");
                    Tally::default()
                }
            };
            change(&mut t.funnel);
            serde_json::to_vec(&t).unwrap_or_default()
        }),
    }
}

/// A unit: one customer's matured decisions of a campaign in one arm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unit {
    pub cohort_day: i32,
    pub d: u64,
    pub m: u64,
    pub v: i64,
}

impl Unit {
    pub fn decode(bytes: &[u8], customer: &str) -> Result<Unit, StoreError> {
        let (cohort_day, d, m, v) =
            crate::store::decode_unit(bytes).ok_or_else(|| StoreError::Corrupt {
                what: "measurement unit",
                customer: customer.to_owned(),
                problem: format!("{} bytes", bytes.len()),
            })?;
        Ok(Unit {
            cohort_day,
            d,
            m,
            v,
        })
    }

    fn encode(&self) -> Vec<u8> {
        crate::store::encode_unit(self.cohort_day, self.d, self.m, self.v)
    }
}

/// What a maturity timer's key says: the decision's arm, time and campaign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Maturity {
    pub arm: u8,
    pub ts: i64,
    pub campaign: String,
}

impl Maturity {
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.arm, self.ts, self.campaign)
    }

    pub fn parse(key: &str) -> Option<Maturity> {
        let (arm, rest) = key.split_once(':')?;
        let (ts, campaign) = rest.split_once(':')?;
        let arm = match arm {
            "0" => 0,
            "1" => 1,
            _ => return None,
        };
        Some(Maturity {
            arm,
            ts: ts.parse().ok()?,
            campaign: campaign.to_owned(),
        })
    }
}

/// The arm of an outcome that has one: treated 0, control 1.
pub fn arm_of(outcome: Outcome) -> Option<u8> {
    match outcome {
        Outcome::Sent => Some(0),
        Outcome::Control => Some(1),
        _ => None,
    }
}

/// The field of a logged decision this module reads.
#[derive(Deserialize)]
struct Logged {
    outcome: String,
}

/// A unit's place in the working set: customer, campaign, arm.
type UnitId = (String, String, u8);

/// Maturity of one decision as [`Ledger::mature_into`] needs it.
pub struct Matured<'a> {
    pub customer: &'a str,
    pub campaign: &'a str,
    pub arm: u8,
    pub ts: i64,
    /// When it converted and what it was worth (micro-units).
    pub conversion: Option<(i64, i64)>,
}

/// Most tallies a writer holds decoded between commits (a year of days of
/// a dozen campaigns); past it they are dropped and read again.
const MAX_HELD_TALLIES: usize = 4096;

/// One writer's tallies, loaded as they are first touched, and the units
/// changed since the last commit.
pub struct Ledger {
    writer: u16,
    /// The latest due time of a maturity this writer processed.
    clock: i64,
    tallies: HashMap<(String, i32), Tally>,
    dirty: BTreeSet<(String, i32)>,
    units: HashMap<UnitId, Unit>,
}

impl Ledger {
    pub fn new(writer: u16) -> Ledger {
        Ledger {
            writer,
            clock: i64::MIN,
            tallies: HashMap::new(),
            dirty: BTreeSet::new(),
            units: HashMap::new(),
        }
    }

    /// The tally of `campaign` on `day`, marked as changed.
    fn tally(&mut self, store: &Store, campaign: &str, day: i32) -> Result<&mut Tally, StoreError> {
        let id = (campaign.to_owned(), day);
        if !self.tallies.contains_key(&id) {
            let t = match store.tally(campaign, day, self.writer)? {
                Some(b) => Tally::decode(&b, campaign)?,
                None => Tally::default(),
            };
            self.tallies.insert(id.clone(), t);
        }
        self.dirty.insert(id.clone());
        Ok(self.tallies.entry(id).or_default())
    }

    fn unit(
        &mut self,
        store: &Store,
        customer: &str,
        campaign: &str,
        arm: u8,
    ) -> Result<Option<Unit>, StoreError> {
        let id = (customer.to_owned(), campaign.to_owned(), arm);
        if let Some(u) = self.units.get(&id) {
            return Ok(Some(*u));
        }
        store
            .unit(customer, campaign, arm)?
            .map(|b| Unit::decode(&b, customer))
            .transpose()
    }

    /// A firing (or event) reached `campaign` at `now`; `passed`: its
    /// `when` was true.
    pub fn reached(
        &mut self,
        store: &Store,
        campaign: &str,
        now: i64,
        passed: bool,
    ) -> Result<(), StoreError> {
        let t = self.tally(store, campaign, day_of(now))?;
        t.funnel.fired += 1;
        t.funnel.qualified += u64::from(passed);
        Ok(())
    }

    /// Counts a decision. A `sent` or `control` one with a goal window
    /// gets its maturity timer (returned, for the caller's next due
    /// time); without a goal it matures at once.
    #[allow(clippy::too_many_arguments)]
    pub fn decided(
        &mut self,
        store: &Store,
        changes: &mut Changes,
        customer: &str,
        campaign: &str,
        ts: i64,
        outcome: Outcome,
        window: Option<i64>,
        trigger: &str,
        lost_to: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let t = self.tally(store, campaign, day_of(ts))?;
        t.funnel.count(outcome);
        if let (Outcome::SuppressedArbitration, Some(w)) = (outcome, lost_to) {
            *t.funnel
                .arbitration_lost_to
                .entry(w.to_owned())
                .or_default() += 1;
        }
        let Some(arm) = arm_of(outcome) else {
            return Ok(None);
        };
        match window {
            Some(w) => {
                let due = ts.saturating_add(w);
                let key = Maturity {
                    arm,
                    ts,
                    campaign: campaign.to_owned(),
                }
                .key();
                let timer = Timer {
                    due,
                    trigger: trigger.to_owned(),
                };
                changes.timer(customer, MATURITY, &key, None, Some(&timer));
                Ok(Some(due))
            }
            None => {
                let m = Matured {
                    customer,
                    campaign,
                    arm,
                    ts,
                    conversion: None,
                };
                self.mature_into(store, changes, &m)?;
                Ok(None)
            }
        }
    }

    /// A maturity timer fired: the decision's window has closed.
    pub fn mature(
        &mut self,
        store: &Store,
        changes: &mut Changes,
        t: &DueTimer,
    ) -> Result<(), StoreError> {
        let fired = Timer {
            due: t.due,
            trigger: t.trigger.clone(),
        };
        changes.timer(&t.customer, MATURITY, &t.key, Some(&fired), None);
        if t.due > self.clock {
            self.clock = t.due;
            changes.ledger_clock(self.writer, t.due);
        }
        let Some(m) = Maturity::parse(&t.key) else {
            tracing::warn!(customer = %t.customer, key = %t.key, "unreadable maturity timer: dropped");
            return Ok(());
        };
        let conversion = store.conversion(m.ts, &t.customer, &m.campaign)?;
        self.mature_into(
            store,
            changes,
            &Matured {
                customer: &t.customer,
                campaign: &m.campaign,
                arm: m.arm,
                ts: m.ts,
                conversion,
            },
        )
    }

    /// Adds a matured decision to its unit and to the tallies.
    pub fn mature_into(
        &mut self,
        store: &Store,
        changes: &mut Changes,
        m: &Matured<'_>,
    ) -> Result<(), StoreError> {
        let arm = usize::from(m.arm);
        let old = self.unit(store, m.customer, m.campaign, m.arm)?;
        let mut unit = old.unwrap_or(Unit {
            cohort_day: day_of(m.ts),
            ..Unit::default()
        });
        unit.d += 1;
        if let Some((at, value)) = m.conversion {
            unit.m += 1;
            unit.v = unit.v.saturating_add(value);
            let day = self.tally(store, m.campaign, day_of(m.ts))?;
            day.funnel.converted(arm);
            day.timed(arm, at - m.ts);
        }
        self.tally(store, m.campaign, day_of(m.ts))?.matured[arm] += 1;
        self.replace_unit(store, changes, m.customer, m.campaign, m.arm, old, unit)
    }

    /// A goal event converted the decision (`ts`, `campaign`) at `at`.
    /// Usually the decision has not matured yet and its maturity will read
    /// the conversion; if it has, its unit is corrected here.
    #[allow(clippy::too_many_arguments)]
    pub fn converted(
        &mut self,
        store: &Store,
        changes: &mut Changes,
        customer: &str,
        campaign: &str,
        ts: i64,
        at: i64,
        value: i64,
    ) -> Result<(), StoreError> {
        for arm in [0u8, 1] {
            let key = Maturity {
                arm,
                ts,
                campaign: campaign.to_owned(),
            }
            .key();
            if store.timer(customer, MATURITY, &key)?.is_some() {
                return Ok(());
            }
        }
        let outcome = store
            .decision(ts, customer, campaign)?
            .and_then(|json| serde_json::from_slice::<Logged>(&json).ok())
            .and_then(|l| Outcome::ALL.into_iter().find(|o| o.as_str() == l.outcome));
        let Some(arm) = outcome.and_then(arm_of) else {
            return Ok(());
        };
        let Some(old) = self.unit(store, customer, campaign, arm)? else {
            return Ok(());
        };
        let mut unit = old;
        unit.m += 1;
        unit.v = unit.v.saturating_add(value);
        let day = self.tally(store, campaign, day_of(ts))?;
        day.funnel.converted(usize::from(arm));
        day.timed(usize::from(arm), at - ts);
        self.replace_unit(store, changes, customer, campaign, arm, Some(old), unit)
    }

    #[allow(clippy::too_many_arguments)]
    fn replace_unit(
        &mut self,
        store: &Store,
        changes: &mut Changes,
        customer: &str,
        campaign: &str,
        arm: u8,
        old: Option<Unit>,
        new: Unit,
    ) -> Result<(), StoreError> {
        let cohort = self.tally(store, campaign, new.cohort_day)?;
        let stats = &mut cohort.arms[usize::from(arm)];
        if let Some(o) = old {
            stats.remove_customer(o.d, o.m, o.v);
        }
        stats.add_customer(new.d, new.m, new.v);
        changes.unit(customer, campaign, arm, new.encode());
        self.units
            .insert((customer.to_owned(), campaign.to_owned(), arm), new);
        Ok(())
    }

    /// Writes the tallies changed since the last call into `changes` (the
    /// commit that changed them).
    pub fn flush(&mut self, changes: &mut Changes) {
        for id in std::mem::take(&mut self.dirty) {
            if let Some(t) = self.tallies.get(&id) {
                // Counts and integer sums always serialise.
                let bytes = serde_json::to_vec(t).unwrap_or_default();
                changes.tally(&id.0, id.1, self.writer, bytes);
            }
        }
        self.units.clear();
        // Committed tallies are read back from the store when touched
        // again: the ones held here are a cache, bounded like the others.
        if self.tallies.len() > MAX_HELD_TALLIES {
            self.tallies.clear();
        }
    }

    /// Every tally touched, with its campaign and day (a scratch ledger's
    /// are the changes it made).
    pub fn into_tallies(self) -> HashMap<(String, i32), Tally> {
        self.tallies
    }

    /// Forgets everything not yet flushed (the commit was abandoned), so
    /// the next read comes from the store again.
    pub fn discard(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            self.tallies.remove(&id);
        }
        self.units.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maturity_keys_round_trip() {
        for m in [
            Maturity {
                arm: 0,
                ts: 1_700_000_000_000,
                campaign: "big-deposit".into(),
            },
            Maturity {
                arm: 1,
                ts: -5,
                campaign: "a_b-c".into(),
            },
        ] {
            assert_eq!(Maturity::parse(&m.key()), Some(m.clone()));
        }
        assert_eq!(Maturity::parse("2:1:x"), None);
        assert_eq!(Maturity::parse("0:x:y"), None);
    }

    #[test]
    fn days_are_utc_and_floor_before_1970() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(DAY - 1), 0);
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(DAY), 1);
    }

    #[test]
    fn timing_buckets_are_the_first_point_at_or_after() {
        assert_eq!(timing_bucket(0), 0);
        assert_eq!(timing_bucket(HOUR), 0);
        assert_eq!(timing_bucket(HOUR + 1), 1);
        assert_eq!(timing_bucket(100 * DAY), TIMING.len());
    }

    #[test]
    fn tallies_merge_in_any_order() {
        let mut a = Tally::default();
        a.funnel.sent = 3;
        a.arms[0].add_customer(2, 1, 5);
        a.timed(0, HOUR * 2);
        let mut b = Tally::default();
        b.funnel.sent = 1;
        b.funnel.arbitration_lost_to.insert("x".into(), 2);
        b.arms[0].add_customer(1, 1, -3);
        b.timed(0, DAY * 40);
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.funnel.sent, 4);
        assert_eq!(ab.arms[0].n, 2);
        let json = serde_json::to_vec(&ab).unwrap();
        assert_eq!(Tally::decode(&json, "c").unwrap(), ab);
    }
}
