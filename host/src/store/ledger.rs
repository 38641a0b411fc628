//! The measurement ledger's keys: what the live reports are computed from
//! without reading the decision log (see `crate::ledger` for what the
//! records mean).
//!
//! | key | value |
//! |---|---|
//! | `c` customer `\0` `u` arm campaign | the customer's matured decisions of the campaign in the arm (a unit) |
//! | `R` campaign `\0` day writer | one writer's tally of the campaign for one day (UTC) |
//! | `Q` writer | the latest due time of a maturity the writer processed (its clock) |
//!
//! A tally key carries its writer (a worker shard, the deliverer, the
//! contact centre's API) so that every key has one writer and writers
//! never read-modify-write each other's sums; a report adds them up.
//! Days and writers are big-endian (days with the sign bit flipped), so a
//! campaign's tallies are one range in day order.

use std::collections::BTreeMap;

use super::{customer_key, decode_conversion, log_key, time_bytes, Changes, Result};
use super::{DueTimer, Op, Store, StoreError};

/// The plugin name of the host's own timers: a decision's goal window
/// closes (it matures). Plugin names are never empty (checked at load).
pub const MATURITY: &str = "";

fn unit_key(customer: &str, campaign: &str, arm: u8) -> Vec<u8> {
    let mut k = customer_key(customer, b'u');
    k.push(arm);
    k.extend_from_slice(campaign.as_bytes());
    k
}

fn day_bytes(day: i32) -> [u8; 4] {
    ((day as u32) ^ (1 << 31)).to_be_bytes()
}

fn tally_prefix(campaign: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(campaign.len() + 8);
    k.push(b'R');
    k.extend_from_slice(campaign.as_bytes());
    k.push(0);
    k
}

fn tally_key(campaign: &str, day: i32, writer: u16) -> Vec<u8> {
    let mut k = tally_prefix(campaign);
    k.extend_from_slice(&day_bytes(day));
    k.extend_from_slice(&writer.to_be_bytes());
    k
}

/// A change to a tally kept outside the workers (the deliverer, the
/// contact centre's API): applied to sled directly, in the batch of the
/// change it counts.
pub struct TallyEdit {
    pub campaign: String,
    pub day: i32,
    pub writer: u16,
    /// The new record from the current one (`None`: none yet).
    pub edit: Edit,
}

/// How a direct tally changes: its new record from the current one.
pub type Edit = Box<dyn FnOnce(Option<&[u8]>) -> Vec<u8> + Send>;

/// One stored tally: campaign, day, writer, and the record.
pub struct TallyRecord {
    pub campaign: String,
    pub day: i32,
    pub writer: u16,
    pub bytes: Vec<u8>,
}

fn parse_tally(k: &[u8], v: Vec<u8>) -> Option<TallyRecord> {
    let rest = k.get(1..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let tail = rest.get(nul + 1..)?;
    let day: [u8; 4] = tail.get(..4)?.try_into().ok()?;
    let writer: [u8; 2] = tail.get(4..6)?.try_into().ok()?;
    Some(TallyRecord {
        campaign: std::str::from_utf8(&rest[..nul]).ok()?.to_owned(),
        day: (u32::from_be_bytes(day) ^ (1 << 31)) as i32,
        writer: u16::from_be_bytes(writer),
        bytes: v,
    })
}

impl Store {
    /// Applies `batch` with `tally`'s change, the tally read and written
    /// under one lock so that concurrent writers of direct tallies never
    /// lose each other's counts. Not through the write-back layer: these
    /// keys are never read through it.
    ///
    /// In a cluster, the ops that belong to a slot are also journalled for
    /// its next commit (before they are applied: a removed outbox entry's
    /// value names its slot).
    pub(super) fn apply_direct(&self, ops: Vec<Op>, tally: Option<TallyEdit>) -> Result<()> {
        let _only = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_direct_locked(ops, tally)
    }

    /// [`Store::apply_direct`] with the lock of direct writes held.
    fn apply_direct_locked(&self, mut ops: Vec<Op>, tally: Option<TallyEdit>) -> Result<()> {
        if let Some(t) = tally {
            let k = tally_key(&t.campaign, t.day, t.writer);
            let current = self.db.get(&k)?;
            let v = (t.edit)(current.as_deref());
            ops.push((k, Some(v)));
        }
        self.journal(&ops);
        self.db.apply_batch(super::batch_of(ops))?;
        Ok(())
    }

    /// Reads an action, lets `f` decide its new value and the tally change
    /// that counts it, and writes both, all under the lock of direct
    /// writes: two answers to one action cannot both see it unanswered.
    /// Durable before it returns.
    pub fn update_action<T, E: From<StoreError>>(
        &self,
        customer: &str,
        id: &str,
        f: impl FnOnce(Option<Vec<u8>>) -> std::result::Result<(Vec<u8>, T, Option<TallyEdit>), E>,
    ) -> std::result::Result<T, E> {
        let _only = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let key = super::action_key(customer, id);
        let current = self
            .db
            .get(&key)
            .map_err(StoreError::from)?
            .map(|v| v.to_vec());
        let (json, out, tally) = f(current)?;
        self.apply_direct_locked(vec![(key, Some(json))], tally)?;
        self.db.flush().map_err(StoreError::from)?;
        Ok(out)
    }

    /// The time of the latest decision persisted.
    pub fn last_decision(&self) -> Result<Option<i64>> {
        Ok(self
            .db
            .range(b"D".to_vec()..b"E".to_vec())
            .keys()
            .next_back()
            .transpose()?
            .and_then(|k| super::time_from(&k[1..])))
    }

    /// Deletes up to `limit` decisions made before `before` (ms): their log
    /// rows, conversions and explanations (the tallies and units keep what
    /// the reports need). Through the write-back layer, so a reader never
    /// sees half of it. Returns how many went.
    pub fn forget_decisions(&self, before: i64, limit: usize) -> Result<usize> {
        self.forget_decisions_of(before, limit, |_| true)
    }

    /// [`Store::forget_decisions`] for the customers `keep` accepts (a
    /// cluster node: those of the slots it holds, whose deletions it can
    /// commit).
    pub fn forget_decisions_of(
        &self,
        before: i64,
        limit: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize> {
        let mut end = vec![b'D'];
        end.extend_from_slice(&time_bytes(before));
        let mut changes = Changes::new();
        let mut n = 0;
        for k in self.db.range(b"D".to_vec()..end).keys() {
            if n >= limit {
                break;
            }
            let k = k?;
            let (Some(ts), Some(rest)) = (super::time_from(&k[1..]), k.get(9..)) else {
                continue;
            };
            let Some(nul) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let (customer, campaign) = (
                String::from_utf8_lossy(&rest[..nul]),
                String::from_utf8_lossy(&rest[nul + 1..]),
            );
            if !keep(&customer) {
                continue;
            }
            changes.del(k.to_vec());
            changes.del(log_key(b'V', ts, &customer, &campaign));
            let mut e = customer_key(&customer, b'e');
            e.extend_from_slice(&time_bytes(ts));
            e.extend_from_slice(campaign.as_bytes());
            changes.del(e);
            n += 1;
        }
        self.commit(changes);
        Ok(n)
    }

    /// A customer's unit of `campaign` in `arm` (0 treated, 1 control).
    pub fn unit(&self, customer: &str, campaign: &str, arm: u8) -> Result<Option<Vec<u8>>> {
        self.get(&unit_key(customer, campaign, arm))
    }

    /// One writer's tally of `campaign` on `day`, as committed.
    pub fn tally(&self, campaign: &str, day: i32, writer: u16) -> Result<Option<Vec<u8>>> {
        self.get(&tally_key(campaign, day, writer))
    }

    /// Whether the host timer (`due`, `customer`, `key`) is pending.
    pub fn host_timer_pending(&self, due: i64, customer: &str, key: &str) -> Result<bool> {
        Ok(self
            .get(&super::queue_key(due, customer, MATURITY, key))?
            .is_some())
    }

    /// When the decision (`ts`, `customer`, `campaign`) converted and what
    /// it was worth (micro-units), if it did.
    pub fn conversion(
        &self,
        ts: i64,
        customer: &str,
        campaign: &str,
    ) -> Result<Option<(i64, i64)>> {
        Ok(self
            .get(&log_key(b'V', ts, customer, campaign))?
            .and_then(|v| decode_conversion(&v)))
    }

    /// The decision (`ts`, `customer`, `campaign`) as logged (JSON).
    pub fn decision(&self, ts: i64, customer: &str, campaign: &str) -> Result<Option<Vec<u8>>> {
        self.get(&log_key(b'D', ts, customer, campaign))
    }

    /// Every tally of `campaign` (every campaign's when `None`) from day
    /// `from` to day `to` inclusive, committed ones included: sled's, under
    /// what is being persisted, under what is committed.
    pub fn tallies(&self, campaign: Option<&str>, from: i32, to: i32) -> Result<Vec<TallyRecord>> {
        let prefix = campaign.map_or_else(|| vec![b'R'], tally_prefix);
        let in_days =
            |k: &[u8]| parse_tally(k, Vec::new()).is_some_and(|t| (from..=to).contains(&t.day));
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.db.scan_prefix(&prefix) {
            let (k, v) = kv?;
            if in_days(&k) {
                merged.insert(k.to_vec(), Some(v.to_vec()));
            }
        }
        merged.extend(
            self.lock()
                .overlay(|k| k.starts_with(&prefix) && in_days(k)),
        );
        merged
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .map(|(k, v)| {
                parse_tally(&k, v).ok_or_else(|| StoreError::Corrupt {
                    what: "tally key",
                    customer: String::new(),
                    problem: format!("{k:?}"),
                })
            })
            .collect()
    }

    /// The latest due time of any maturity processed: a report as of an
    /// earlier time cannot be computed from the tallies.
    pub fn ledger_clock(&self) -> Result<Option<i64>> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.db.scan_prefix(b"Q") {
            let (k, v) = kv?;
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        merged.extend(self.lock().overlay(|k| k.first() == Some(&b'Q')));
        Ok(merged
            .into_values()
            .filter_map(|v| super::time_from(&v?))
            .max())
    }

    /// Writer `writer`'s own ledger clock, as committed.
    pub fn ledger_clock_of(&self, writer: u16) -> Result<Option<i64>> {
        let mut k = vec![b'Q'];
        k.extend_from_slice(&writer.to_be_bytes());
        Ok(self.get(&k)?.and_then(|v| super::time_from(&v)))
    }

    /// The host's maturity timers due at or before `upto` that have not
    /// fired yet (a worker's clock is behind `upto`), in due order.
    pub fn due_maturities(&self, upto: i64) -> Result<Vec<DueTimer>> {
        let end = {
            let mut k = vec![b'T'];
            k.extend_from_slice(&time_bytes(upto.saturating_add(1)));
            k
        };
        let in_range = |k: &[u8]| k.first() == Some(&b'T') && k < end.as_slice();
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.db.range(b"T".to_vec()..end.clone()) {
            let (k, v) = kv?;
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        merged.extend(self.lock().overlay(in_range));
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| super::parse_queue_key(&k, &v?))
            .filter(|t| t.plugin == MATURITY)
            .collect())
    }
}

impl Changes {
    /// Sets (`Some(trigger)`) or removes a host timer: its queue key only,
    /// without the per-customer index plugin timers have (nothing lists
    /// or replaces the host's timers, and they are one per decision).
    pub fn host_timer(&mut self, due: i64, customer: &str, key: &str, trigger: Option<&str>) {
        let k = super::queue_key(due, customer, MATURITY, key);
        match trigger {
            Some(t) => self.put(k, t.as_bytes().to_vec()),
            None => self.del(k),
        }
    }

    pub fn ledger_clock(&mut self, writer: u16, due: i64) {
        let mut k = vec![b'Q'];
        k.extend_from_slice(&writer.to_be_bytes());
        self.put(k, time_bytes(due).to_vec());
    }

    pub fn unit(&mut self, customer: &str, campaign: &str, arm: u8, bytes: Vec<u8>) {
        self.put(unit_key(customer, campaign, arm), bytes);
    }

    pub fn tally(&mut self, campaign: &str, day: i32, writer: u16, bytes: Vec<u8>) {
        self.put(tally_key(campaign, day, writer), bytes);
    }
}

/// A unit's record: cohort day, decisions, conversions, value.
pub fn encode_unit(cohort_day: i32, d: u64, m: u64, v: i64) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&cohort_day.to_be_bytes());
    b.extend_from_slice(&d.to_be_bytes());
    b.extend_from_slice(&m.to_be_bytes());
    b.extend_from_slice(&v.to_be_bytes());
    b
}

pub fn decode_unit(b: &[u8]) -> Option<(i32, u64, u64, i64)> {
    let day = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    let d = u64::from_be_bytes(b.get(4..12)?.try_into().ok()?);
    let m = u64::from_be_bytes(b.get(12..20)?.try_into().ok()?);
    let v = i64::from_be_bytes(b.get(20..28)?.try_into().ok()?);
    Some((day, d, m, v))
}
