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
//! - `records.rs`: [`Funnel`], [`Tally`], [`Unit`], [`Maturity`] (a
//!   maturity timer's key, both ways), and their encodings.
//! - here: [`Ledger`], one writer's tallies in memory and the bookkeeping;
//!   tallies written outside the workers ([`direct_edit`]); retention.

use std::collections::HashMap;

use serde::Deserialize;

use crate::decide::Outcome;
use crate::store::{Changes, DueTimer, Store, StoreError};

mod records;
pub use crate::store::MATURITY;
pub use records::*;

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
            t.encode()
        }),
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
    /// The latest due time of a maturity this writer processed, as stored
    /// (`None`: not read yet), and a later one to store with the next
    /// commit.
    clock: Option<i64>,
    clock_dirty: Option<i64>,
    /// By campaign, then day.
    tallies: HashMap<String, HashMap<i32, Tally>>,
    /// Touched since the last commit (a few per event).
    dirty: Vec<(String, i32)>,
    units: HashMap<UnitId, Unit>,
    /// Other writers' clocks and tallies, kept while this ledger writes as
    /// another ([`Ledger::set_writer`]).
    others: HashMap<u16, Parked>,
}

/// A writer's state while its ledger writes as another.
type Parked = (Option<i64>, HashMap<String, HashMap<i32, Tally>>);

impl Ledger {
    pub fn new(writer: u16) -> Ledger {
        Ledger {
            writer,
            clock: None,
            clock_dirty: None,
            tallies: HashMap::new(),
            dirty: Vec::new(),
            units: HashMap::new(),
            others: HashMap::new(),
        }
    }

    /// Writes as `writer` from now on (a cluster's worker writes each
    /// slot's tallies as that slot). Call between commits only.
    pub fn set_writer(&mut self, writer: u16) {
        if writer == self.writer {
            return;
        }
        let (clock, tallies) = self.others.remove(&writer).unwrap_or_default();
        let parked = (
            std::mem::replace(&mut self.clock, clock),
            std::mem::replace(&mut self.tallies, tallies),
        );
        self.others.insert(self.writer, parked);
        self.writer = writer;
    }

    /// Forgets every writer's cached clock and tallies, to be read again
    /// from the store (the store's copy of a slot changed under it).
    pub fn forget(&mut self) {
        self.discard();
        self.clock = None;
        self.tallies.clear();
        self.others.clear();
    }

    /// The tally of `campaign` on `day`, marked as changed. Allocates
    /// only the first time in a commit: this runs for every firing.
    fn tally(&mut self, store: &Store, campaign: &str, day: i32) -> Result<&mut Tally, StoreError> {
        if !self.dirty.iter().any(|(c, d)| *d == day && c == campaign) {
            self.dirty.push((campaign.to_owned(), day));
        }
        let days = if self.tallies.contains_key(campaign) {
            self.tallies.get_mut(campaign)
        } else {
            Some(self.tallies.entry(campaign.to_owned()).or_default())
        };
        let days = days.ok_or_else(|| StoreError::Corrupt {
            what: "tally cache",
            customer: String::new(),
            problem: format!("campaign {campaign:?} vanished"),
        })?;
        if let std::collections::hash_map::Entry::Vacant(e) = days.entry(day) {
            let t = match store.tally(campaign, day, self.writer)? {
                Some(b) => Tally::decode(&b, campaign)?,
                None => Tally::default(),
            };
            e.insert(t);
        }
        Ok(days.entry(day).or_default())
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
                changes.host_timer(due, customer, &key, Some(trigger));
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
        changes.host_timer(t.due, &t.customer, &t.key, None);
        let stored = match self.clock {
            Some(c) => c,
            None => {
                let c = store.ledger_clock_of(self.writer)?.unwrap_or(i64::MIN);
                self.clock = Some(c);
                c
            }
        };
        // Never backwards: a late decision's overdue timer after a
        // restart does not lower what reports may rely on.
        if t.due > self.clock_dirty.unwrap_or(stored) {
            self.clock_dirty = Some(t.due);
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

    /// A goal event converted the decision (`ts`, `campaign`, maturing at
    /// `until`) at `at`. Usually the decision has not matured yet and its
    /// maturity will read the conversion; if it has, its unit is corrected
    /// here.
    #[allow(clippy::too_many_arguments)]
    pub fn converted(
        &mut self,
        store: &Store,
        changes: &mut Changes,
        customer: &str,
        campaign: &str,
        ts: i64,
        until: i64,
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
            if store.host_timer_pending(until, customer, &key)? {
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
        if let Some(c) = self.clock_dirty.take() {
            changes.ledger_clock(self.writer, c);
            self.clock = Some(c);
        }
        for (campaign, day) in self.dirty.drain(..) {
            if let Some(t) = self.tallies.get(&campaign).and_then(|d| d.get(&day)) {
                changes.tally(&campaign, day, self.writer, t.encode());
            }
        }
        self.units.clear();
        // Committed tallies are read back from the store when touched
        // again: the ones held here are a cache, bounded like the others.
        if self.tallies.values().map(HashMap::len).sum::<usize>() > MAX_HELD_TALLIES {
            self.tallies.clear();
        }
    }

    /// Every tally touched, with its campaign and day (a scratch ledger's
    /// are the changes it made).
    pub fn into_tallies(self) -> impl Iterator<Item = ((String, i32), Tally)> {
        self.tallies.into_iter().flat_map(|(campaign, days)| {
            days.into_iter()
                .map(move |(day, t)| ((campaign.clone(), day), t))
        })
    }

    /// Forgets everything not yet flushed (the commit was abandoned), so
    /// the next read comes from the store again.
    pub fn discard(&mut self) {
        self.clock_dirty = None;
        for (campaign, day) in self.dirty.drain(..) {
            if let Some(days) = self.tallies.get_mut(&campaign) {
                days.remove(&day);
            }
        }
        self.units.clear();
    }
}
