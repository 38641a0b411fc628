//! The ledger's records: a campaign's day ([`Tally`], with its
//! [`Funnel`]), a customer's unit ([`Unit`]) and a maturity timer's key
//! ([`Maturity`]), and how they are stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::decide::Outcome;
use crate::stats::ArmStats;
use crate::store::StoreError;

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
        self.fired = self.fired.wrapping_add(o.fired);
        self.qualified = self.qualified.wrapping_add(o.qualified);
        self.suppressed_consent = self.suppressed_consent.wrapping_add(o.suppressed_consent);
        self.suppressed_frequency = self
            .suppressed_frequency
            .wrapping_add(o.suppressed_frequency);
        self.suppressed_policy = self.suppressed_policy.wrapping_add(o.suppressed_policy);
        self.suppressed_arbitration = self
            .suppressed_arbitration
            .wrapping_add(o.suppressed_arbitration);
        for (k, n) in &o.arbitration_lost_to {
            let e = self.arbitration_lost_to.entry(k.clone()).or_default();
            *e = e.wrapping_add(*n);
        }
        self.sent = self.sent.wrapping_add(o.sent);
        self.control = self.control.wrapping_add(o.control);
        self.delivered = self.delivered.wrapping_add(o.delivered);
        self.delivery_failed = self.delivery_failed.wrapping_add(o.delivery_failed);
        self.dead_lettered = self.dead_lettered.wrapping_add(o.dead_lettered);
        self.accepted = self.accepted.wrapping_add(o.accepted);
        self.declined = self.declined.wrapping_add(o.declined);
        self.converted_treated = self.converted_treated.wrapping_add(o.converted_treated);
        self.converted_control = self.converted_control.wrapping_add(o.converted_control);
    }

    /// How many plain counts a funnel has ([`Funnel::counts`]).
    pub const COUNTS: usize = 15;

    /// Every count but `arbitration_lost_to`, in a fixed order (the
    /// stored one: append, never reorder).
    pub fn counts(&self) -> [u64; Funnel::COUNTS] {
        [
            self.fired,
            self.qualified,
            self.suppressed_consent,
            self.suppressed_frequency,
            self.suppressed_policy,
            self.suppressed_arbitration,
            self.sent,
            self.control,
            self.delivered,
            self.delivery_failed,
            self.dead_lettered,
            self.accepted,
            self.declined,
            self.converted_treated,
            self.converted_control,
        ]
    }

    pub fn from_counts(c: [u64; Funnel::COUNTS]) -> Funnel {
        let [fired, qualified, suppressed_consent, suppressed_frequency, suppressed_policy, suppressed_arbitration, sent, control, delivered, delivery_failed, dead_lettered, accepted, declined, converted_treated, converted_control] =
            c;
        Funnel {
            fired,
            qualified,
            suppressed_consent,
            suppressed_frequency,
            suppressed_policy,
            suppressed_arbitration,
            arbitration_lost_to: BTreeMap::new(),
            sent,
            control,
            delivered,
            delivery_failed,
            dead_lettered,
            accepted,
            declined,
            converted_treated,
            converted_control,
        }
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
            self.matured[arm] = self.matured[arm].wrapping_add(o.matured[arm]);
            self.arms[arm].merge(&o.arms[arm]);
            let t = &mut self.timing[arm];
            if t.len() < o.timing[arm].len() {
                t.resize(o.timing[arm].len(), 0);
            }
            for (a, b) in t.iter_mut().zip(&o.timing[arm]) {
                *a = a.wrapping_add(*b);
            }
        }
    }

    pub(super) fn timed(&mut self, arm: usize, delay: i64) {
        let bucket = timing_bucket(delay);
        let t = &mut self.timing[arm];
        if t.len() <= bucket {
            t.resize(bucket + 1, 0);
        }
        t[bucket] += 1;
    }

    /// The stored form: a format byte, then every count as an unsigned
    /// LEB128 varint (the sums' bits as they are, modulo 2⁶⁴ or 2¹²⁸). A
    /// tally is rewritten in the commit of every event that touches it,
    /// so this is on the decision path: a tenth of JSON's cost.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96);
        b.push(TALLY_FORMAT);
        let f = &self.funnel;
        for v in f.counts() {
            put(&mut b, u128::from(v));
        }
        put(&mut b, f.arbitration_lost_to.len() as u128);
        for (winner, n) in &f.arbitration_lost_to {
            put(&mut b, winner.len() as u128);
            b.extend_from_slice(winner.as_bytes());
            put(&mut b, u128::from(*n));
        }
        for arm in 0..2 {
            put(&mut b, u128::from(self.matured[arm]));
            put(&mut b, self.timing[arm].len() as u128);
            for t in &self.timing[arm] {
                put(&mut b, u128::from(*t));
            }
            let a = &self.arms[arm];
            for v in [a.n, a.d, a.m, a.dd, a.mm, a.md] {
                put(&mut b, u128::from(v));
            }
            for v in [a.v, a.vv, a.vd] {
                put(&mut b, v as u128);
            }
        }
        b
    }

    pub fn decode(bytes: &[u8], campaign: &str) -> Result<Tally, StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            what: "tally",
            customer: String::new(),
            problem: format!("campaign {campaign:?}: {problem}"),
        };
        match bytes.first() {
            Some(&TALLY_FORMAT) => {
                let mut r = Reader(&bytes[1..]);
                let t = r
                    .tally()
                    .ok_or_else(|| corrupt("truncated or out of range".into()))?;
                if !r.0.is_empty() {
                    return Err(corrupt(format!("{} bytes past its end", r.0.len())));
                }
                Ok(t)
            }
            // The first tallies were JSON.
            Some(b'{') => serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string())),
            other => Err(corrupt(format!("unknown format {other:?}"))),
        }
    }
}

/// The binary tally layout [`Tally::encode`] writes.
const TALLY_FORMAT: u8 = 1;

fn put(b: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

/// Reads what [`Tally::encode`] wrote; `None` on anything else.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u128(&mut self) -> Option<u128> {
        let mut v: u128 = 0;
        for i in 0..19 {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u128::from(byte & 0x7f).checked_shl(7 * i)?;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn u64(&mut self) -> Option<u64> {
        u64::try_from(self.u128()?).ok()
    }

    fn len(&mut self, most: usize) -> Option<usize> {
        usize::try_from(self.u128()?).ok().filter(|n| *n <= most)
    }

    fn tally(&mut self) -> Option<Tally> {
        let mut t = Tally::default();
        let mut counts = [0u64; Funnel::COUNTS];
        for c in &mut counts {
            *c = self.u64()?;
        }
        t.funnel = Funnel::from_counts(counts);
        for _ in 0..self.len(10_000)? {
            let n = self.len(4096)?;
            let (name, rest) = self.0.split_at_checked(n)?;
            self.0 = rest;
            let name = std::str::from_utf8(name).ok()?.to_owned();
            t.funnel.arbitration_lost_to.insert(name, self.u64()?);
        }
        for arm in 0..2 {
            t.matured[arm] = self.u64()?;
            for _ in 0..self.len(TIMING.len() + 1)? {
                let v = self.u64()?;
                t.timing[arm].push(v);
            }
            let a = &mut t.arms[arm];
            for v in [
                &mut a.n, &mut a.d, &mut a.m, &mut a.dd, &mut a.mm, &mut a.md,
            ] {
                *v = self.u64()?;
            }
            for v in [&mut a.v, &mut a.vv, &mut a.vd] {
                *v = self.u128()? as i128;
            }
        }
        Some(t)
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

    pub(super) fn encode(&self) -> Vec<u8> {
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

    #[test]
    fn tallies_round_trip_their_encoding_and_refuse_garbage() {
        let mut t = Tally {
            funnel: Funnel::from_counts(std::array::from_fn(|i| (i as u64 + 1) * 1000)),
            ..Tally::default()
        };
        t.funnel
            .arbitration_lost_to
            .insert("large-deposit".into(), 7);
        t.matured = [5, u64::MAX];
        t.timed(1, 40 * DAY);
        t.arms[0].add_customer(3, 2, 1_250_000);
        // A correction on its own: negative sums, kept modulo 2^64.
        t.arms[1].remove_customer(2, 1, -99);
        let bytes = t.encode();
        assert_eq!(bytes[0], TALLY_FORMAT);
        assert_eq!(Tally::decode(&bytes, "c").unwrap(), t);
        assert_eq!(
            Tally::decode(&Tally::default().encode(), "c").unwrap(),
            Tally::default()
        );
        for cut in 1..bytes.len() {
            assert!(Tally::decode(&bytes[..cut], "c").is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Tally::decode(&long, "c")
            .unwrap_err()
            .to_string()
            .contains("past its end"));
        assert!(Tally::decode(&[9, 1, 2], "c").is_err());
        assert!(Tally::decode(&[], "c").is_err());
        // A varint longer than any count.
        let mut huge = vec![TALLY_FORMAT];
        huge.extend([0xff; 20]);
        assert!(Tally::decode(&huge, "c").is_err());
    }
}
