//! The decision pipeline: consent, campaign frequency, contact policy,
//! arbitration, holdout. Pure: values in, values out, no I/O and no clock.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::rules::Policies;
use crate::store::{History, Open};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Sent,
    Control,
    SuppressedConsent,
    SuppressedFrequency,
    SuppressedPolicy,
    SuppressedArbitration,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Sent,
        Outcome::Control,
        Outcome::SuppressedConsent,
        Outcome::SuppressedFrequency,
        Outcome::SuppressedPolicy,
        Outcome::SuppressedArbitration,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Control => "control",
            Outcome::SuppressedConsent => "suppressed_consent",
            Outcome::SuppressedFrequency => "suppressed_frequency",
            Outcome::SuppressedPolicy => "suppressed_policy",
            Outcome::SuppressedArbitration => "suppressed_arbitration",
        }
    }

    /// Whether the decision counts for frequency and for measurement.
    pub fn counts(self) -> bool {
        matches!(self, Outcome::Sent | Outcome::Control)
    }
}

/// A campaign that fired and qualified, with what the pipeline needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub campaign: &'a str,
    pub channel: &'a str,
    pub priority: i64,
    pub frequency_ms: i64,
    pub holdout_pct: u32,
    /// Goal event and window, for measuring conversion.
    pub goal: Option<(&'a str, i64)>,
}

/// FNV-1a 64 of the concatenated `parts`.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The holdout bucket: FNV-1a 64 of `customer:campaign`, modulo 100.
pub fn bucket(customer: &str, campaign: &str) -> u64 {
    fnv1a64(&[customer.as_bytes(), b":", campaign.as_bytes()]) % 100
}

fn consented(channel: &str, traits: &Map<String, Value>, policies: &Policies) -> bool {
    match policies.channels.get(channel) {
        // A channel the rules never defined has no consent to rely on.
        None => false,
        Some(p) => match &p.consent_trait {
            None => true,
            Some(t) => traits.get(t) == Some(&Value::Bool(true)),
        },
    }
}

fn policy_allows(now: i64, channel: &str, history: &History, policies: &Policies) -> bool {
    policies
        .contact
        .iter()
        .filter(|p| p.channels.iter().any(|c| c == channel))
        .all(|p| {
            let recent: usize = p
                .channels
                .iter()
                .filter_map(|c| history.sent.get(c))
                .map(|times| {
                    times
                        .iter()
                        .filter(|&&ts| within(now, ts, p.window_ms))
                        .count()
                })
                .sum();
            recent < p.limit
        })
}

/// Whether a decision at `ts` is recent at `now`: less than `window` away,
/// on either side. A decision dated after `now` (events that arrived out
/// of order) counts as recent only as long as it would in the past, so no
/// decision, however far in the future, silences a customer for ever.
fn within(now: i64, ts: i64, window: i64) -> bool {
    now.abs_diff(ts) < window.max(0) as u64
}

/// Decides every candidate of one firing (one customer, one time). Returns
/// one outcome per candidate, in the candidates' order. Candidates must be
/// distinct campaigns.
pub fn decide(
    now: i64,
    customer: &str,
    candidates: &[Candidate<'_>],
    traits: &Map<String, Value>,
    history: &History,
    policies: &Policies,
) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = candidates
        .iter()
        .map(|c| {
            if !consented(c.channel, traits, policies) {
                Some(Outcome::SuppressedConsent)
            } else if history
                .last
                .get(c.campaign)
                .is_some_and(|&ts| within(now, ts, c.frequency_ms))
            {
                Some(Outcome::SuppressedFrequency)
            } else if !policy_allows(now, c.channel, history, policies) {
                Some(Outcome::SuppressedPolicy)
            } else {
                None
            }
        })
        .collect();
    let winner = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| outcomes[*i].is_none())
        .min_by(|(_, a), (_, b)| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.campaign.as_bytes().cmp(b.campaign.as_bytes()))
        })
        .map(|(i, _)| i);
    for (i, o) in outcomes.iter_mut().enumerate() {
        if o.is_none() {
            *o = Some(if Some(i) != winner {
                Outcome::SuppressedArbitration
            } else if bucket(customer, candidates[i].campaign)
                < u64::from(candidates[i].holdout_pct)
            {
                Outcome::Control
            } else {
                Outcome::Sent
            });
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::SuppressedArbitration))
        .collect()
}

/// Why a decision came out as it did: the check that decided it and its
/// evidence. Stored with the decision; `GET /v1/customers/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case")]
pub enum Why {
    /// The channel's consent trait is not the JSON value `true`.
    Consent {
        channel: String,
        /// The trait that must be `true` (none: the channel is not defined).
        consent_trait: Option<String>,
        /// What the customer's trait was (null when missing).
        value: Value,
    },
    /// The campaign decided for this customer within its frequency.
    Frequency {
        /// The earlier counted decision of the campaign.
        previous: i64,
        frequency_ms: i64,
    },
    /// A contact policy's limit was reached on the channel.
    Policy {
        policy: String,
        channel: String,
        limit: usize,
        window_ms: i64,
        /// The contacts it counted, most recent last.
        counted: Vec<i64>,
        /// The campaign whose latest decision was the most recent counted
        /// contact, when the history still shows it.
        by: Option<String>,
    },
    /// Another campaign of the same firing won arbitration.
    Arbitration {
        winner: String,
        winner_priority: i64,
        priority: i64,
    },
    /// It won every check; the holdout bucket put it in an arm.
    Holdout {
        /// FNV-1a 64 of `customer:campaign` modulo 100.
        bucket: u64,
        /// Buckets under this are control.
        holdout_pct: u32,
    },
}

impl Why {
    /// One line for people: "suppressed_policy: one-message-a-day, email
    /// sent 3h ago by cart-abandon".
    pub fn describe(&self, now: i64) -> String {
        let ago = |ts: i64| {
            let ms = now - ts;
            match ms.abs() {
                m if m < 60_000 => format!("{}s", ms / 1000),
                m if m < 3_600_000 => format!("{}m", ms / 60_000),
                m if m < 86_400_000 => format!("{}h", ms / 3_600_000),
                _ => format!("{}d", ms / 86_400_000),
            }
        };
        match self {
            Why::Consent {
                channel,
                consent_trait: Some(t),
                value,
            } => format!("no consent on {channel}: trait {t} is {value}, not true"),
            Why::Consent { channel, .. } => format!("channel {channel} is not defined"),
            Why::Frequency {
                previous,
                frequency_ms,
            } => format!(
                "decided {} ago, within its frequency of {}h",
                ago(*previous),
                frequency_ms / 3_600_000
            ),
            Why::Policy {
                policy,
                channel,
                counted,
                by,
                ..
            } => {
                let last = counted
                    .last()
                    .map_or(String::new(), |t| format!(" {} ago", ago(*t)));
                let by = by.as_ref().map_or(String::new(), |b| format!(" by {b}"));
                format!("{policy}: {channel} sent{last}{by}")
            }
            Why::Arbitration {
                winner,
                winner_priority,
                priority,
            } => format!("{winner} won arbitration (priority {winner_priority} over {priority})"),
            Why::Holdout {
                bucket,
                holdout_pct,
            } => format!("holdout bucket {bucket} (control under {holdout_pct})"),
        }
    }
}

/// Explains each outcome [`decide`] gave for `candidates`, from the same
/// inputs (the history as it was before [`record`]). `channels` maps a
/// campaign to its channel, to name who made a counted contact.
#[allow(clippy::too_many_arguments)]
pub fn explain(
    now: i64,
    customer: &str,
    candidates: &[Candidate<'_>],
    outcomes: &[Outcome],
    traits: &Map<String, Value>,
    history: &History,
    policies: &Policies,
    channels: &dyn Fn(&str) -> Option<String>,
) -> Vec<Why> {
    let winner = candidates
        .iter()
        .zip(outcomes)
        .find(|(_, o)| o.counts())
        .map(|(c, _)| c);
    candidates
        .iter()
        .zip(outcomes)
        .map(|(c, o)| match o {
            Outcome::SuppressedConsent => {
                let consent_trait = policies
                    .channels
                    .get(c.channel)
                    .and_then(|p| p.consent_trait.clone());
                Why::Consent {
                    channel: c.channel.to_owned(),
                    value: consent_trait
                        .as_ref()
                        .and_then(|t| traits.get(t).cloned())
                        .unwrap_or(Value::Null),
                    consent_trait,
                }
            }
            Outcome::SuppressedFrequency => Why::Frequency {
                previous: history.last.get(c.campaign).copied().unwrap_or(now),
                frequency_ms: c.frequency_ms,
            },
            Outcome::SuppressedPolicy => {
                let full = policies.contact.iter().find(|p| {
                    p.channels.iter().any(|ch| ch == c.channel)
                        && p.channels
                            .iter()
                            .filter_map(|ch| history.sent.get(ch))
                            .flatten()
                            .filter(|&&ts| within(now, ts, p.window_ms))
                            .count()
                            >= p.limit
                });
                match full {
                    Some(p) => {
                        let mut counted: Vec<(i64, &str)> = p
                            .channels
                            .iter()
                            .filter_map(|ch| Some((ch, history.sent.get(ch)?)))
                            .flat_map(|(ch, times)| times.iter().map(move |t| (*t, ch.as_str())))
                            .filter(|(ts, _)| within(now, *ts, p.window_ms))
                            .collect();
                        counted.sort();
                        let last = counted.last().copied();
                        let by = last.and_then(|(ts, ch)| {
                            history
                                .last
                                .iter()
                                .find(|(campaign, t)| {
                                    **t == ts && channels(campaign).as_deref() == Some(ch)
                                })
                                .map(|(campaign, _)| campaign.clone())
                        });
                        Why::Policy {
                            policy: p.name.clone(),
                            channel: last.map_or(c.channel, |(_, ch)| ch).to_owned(),
                            limit: p.limit,
                            window_ms: p.window_ms,
                            counted: counted.iter().map(|(ts, _)| *ts).collect(),
                            by,
                        }
                    }
                    None => Why::Policy {
                        policy: String::new(),
                        channel: c.channel.to_owned(),
                        limit: 0,
                        window_ms: 0,
                        counted: Vec::new(),
                        by: None,
                    },
                }
            }
            Outcome::SuppressedArbitration => Why::Arbitration {
                winner: winner.map_or(String::new(), |w| w.campaign.to_owned()),
                winner_priority: winner.map_or(0, |w| w.priority),
                priority: c.priority,
            },
            Outcome::Sent | Outcome::Control => Why::Holdout {
                bucket: bucket(customer, c.campaign),
                holdout_pct: c.holdout_pct,
            },
        })
        .collect()
}

/// Adds a firing's outcomes to the history that later firings read, and
/// forgets what no policy can look at any more.
pub fn record(
    history: &mut History,
    now: i64,
    candidates: &[Candidate<'_>],
    outcomes: &[Outcome],
    policies: &Policies,
) {
    for (c, o) in candidates.iter().zip(outcomes) {
        if o.counts() {
            history.last.insert(c.campaign.to_owned(), now);
            if let Some((goal, window)) = c.goal {
                history.open.push(Open {
                    campaign: c.campaign.to_owned(),
                    ts: now,
                    goal: goal.to_owned(),
                    until: now.saturating_add(window),
                });
            }
        }
        if *o == Outcome::Sent
            && policies
                .contact
                .iter()
                .any(|p| p.channels.iter().any(|ch| ch == c.channel))
        {
            history
                .sent
                .entry(c.channel.to_owned())
                .or_default()
                .push(now);
        }
    }
    let window = policies.max_window_ms();
    let keep = policies.max_limit();
    for times in history.sent.values_mut() {
        times.retain(|&ts| within(now, ts, window));
        if times.len() > keep {
            times.drain(..times.len() - keep);
        }
    }
    history.sent.retain(|_, t| !t.is_empty());
}

/// A `track` event `event` at `now`: returns the open decisions it
/// converts (goal event in (decision time, decision time + window]) and
/// forgets them and those whose window has closed. Returns `None` when the
/// history did not change.
pub fn convert(history: &mut History, event: &str, now: i64) -> Option<Vec<Open>> {
    if history.open.is_empty() {
        return None;
    }
    let before = history.open.len();
    let mut converted = Vec::new();
    history.open.retain(|o| {
        if o.goal == event && o.ts < now && now <= o.until {
            converted.push(o.clone());
            false
        } else {
            now <= o.until
        }
    });
    (history.open.len() != before).then_some(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{ChannelPolicy, ContactPolicy};

    const DAY: i64 = 86_400_000;

    fn policies() -> Policies {
        let mut p = Policies::default();
        p.channels.insert(
            "email".into(),
            ChannelPolicy {
                consent_trait: Some("consent_email".into()),
                plugin: None,
                cost: 0.0,
            },
        );
        p.channels.insert(
            "sms".into(),
            ChannelPolicy {
                consent_trait: Some("consent_sms".into()),
                plugin: None,
                cost: 0.0,
            },
        );
        p.channels.insert("agent".into(), ChannelPolicy::default());
        p.contact.push(ContactPolicy {
            name: "daily".into(),
            channels: vec!["email".into(), "sms".into()],
            limit: 1,
            window_ms: DAY,
        });
        p
    }

    fn cand<'a>(campaign: &'a str, channel: &'a str, priority: i64) -> Candidate<'a> {
        Candidate {
            campaign,
            channel,
            priority,
            frequency_ms: 7 * DAY,
            holdout_pct: 0,
            goal: Some(("Goal", DAY)),
        }
    }

    fn traits(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn fnv_bucket_matches_reference() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(&[b""]), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(&[b"foo", b"bar"]), 0x85944171f73967e8);
        assert!(bucket("c-000042", "welcome") < 100);
        assert_eq!(bucket("u", "c"), bucket("u", "c"));
        assert_ne!(bucket("u1", "c"), bucket("u2", "c"));
    }

    #[test]
    fn a_decision_dated_in_the_future_is_recent_only_within_its_window() {
        let p = policies();
        let t = traits(r#"{"consent_email":true}"#);
        let far = 4_000_000_000_000; // 2096
        let mut h = History::default();
        h.last.insert("a".into(), far);
        h.sent.insert("email".into(), vec![far]);
        let o = decide(0, "u", &[cand("a", "email", 1)], &t, &h, &p);
        assert_eq!(
            o,
            vec![Outcome::Sent],
            "2096 is not within a day or a week of 1970"
        );
        // An hour ahead (events out of order) still counts.
        h.last.insert("a".into(), 3_600_000);
        let o = decide(0, "u", &[cand("a", "email", 1)], &t, &h, &p);
        assert_eq!(o, vec![Outcome::SuppressedFrequency]);
    }

    #[test]
    fn consent_only_by_json_true() {
        let p = policies();
        for (t, want) in [
            (r#"{"consent_email":true}"#, Outcome::Sent),
            (r#"{"consent_email":"true"}"#, Outcome::SuppressedConsent),
            (r#"{"consent_email":1}"#, Outcome::SuppressedConsent),
            (r#"{}"#, Outcome::SuppressedConsent),
        ] {
            let o = decide(
                0,
                "u",
                &[cand("a", "email", 1)],
                &traits(t),
                &History::default(),
                &p,
            );
            assert_eq!(o, vec![want], "{t}");
        }
        let o = decide(
            0,
            "u",
            &[cand("a", "agent", 1)],
            &traits("{}"),
            &History::default(),
            &p,
        );
        assert_eq!(o, vec![Outcome::Sent]);
    }

    #[test]
    fn frequency_policy_and_arbitration() {
        let p = policies();
        let t = traits(r#"{"consent_email":true,"consent_sms":true}"#);
        let mut h = History::default();
        let first = [
            cand("a", "email", 10),
            cand("b", "agent", 20),
            cand("c", "agent", 20),
        ];
        let o = decide(0, "u", &first, &t, &h, &p);
        // b and c tie on priority: the smaller id wins.
        assert_eq!(
            o,
            vec![
                Outcome::SuppressedArbitration,
                Outcome::Sent,
                Outcome::SuppressedArbitration
            ]
        );
        record(&mut h, 0, &first, &o, &p);
        // b again within its frequency; a is free, and a sent email earlier
        // than 24h would block it, but none was sent.
        let second = [cand("a", "email", 10), cand("b", "agent", 20)];
        let o = decide(DAY, "u", &second, &t, &h, &p);
        assert_eq!(o, vec![Outcome::Sent, Outcome::SuppressedFrequency]);
        record(&mut h, DAY, &second, &o, &p);
        // sms within 24h of that email: the contact policy stops it.
        let third = [cand("s", "sms", 1)];
        let o = decide(2 * DAY - 1, "u", &third, &t, &h, &p);
        assert_eq!(o, vec![Outcome::SuppressedPolicy]);
        let o = decide(2 * DAY, "u", &third, &t, &h, &p);
        assert_eq!(o, vec![Outcome::Sent]);
    }

    #[test]
    fn holdout_gives_control() {
        let p = policies();
        let t = traits("{}");
        let mut c = cand("x", "agent", 1);
        c.holdout_pct = 100;
        assert_eq!(
            decide(0, "u", &[c.clone()], &t, &History::default(), &p),
            vec![Outcome::Control]
        );
        c.holdout_pct = 0;
        assert_eq!(
            decide(0, "u", &[c], &t, &History::default(), &p),
            vec![Outcome::Sent]
        );
    }

    #[test]
    fn goal_events_convert_within_the_window_only() {
        let p = policies();
        let mut h = History::default();
        let c = [cand("a", "agent", 1), cand("b", "agent", 1)];
        record(
            &mut h,
            100,
            &c,
            &[Outcome::Sent, Outcome::SuppressedArbitration],
            &p,
        );
        assert_eq!(h.open.len(), 1, "only counted decisions wait for a goal");
        // Same millisecond: not after the decision.
        assert_eq!(convert(&mut h, "Goal", 100), None);
        assert_eq!(convert(&mut h, "Other", 200), None);
        let got = convert(&mut h, "Goal", 100 + DAY).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].campaign, "a");
        assert!(h.open.is_empty());
        record(&mut h, 0, &c[..1], &[Outcome::Control], &p);
        // Past the window: forgotten, not converted.
        assert_eq!(convert(&mut h, "Goal", DAY + 1), Some(vec![]));
        assert!(h.open.is_empty());
    }

    #[test]
    fn record_keeps_only_what_policies_read() {
        let p = policies();
        let mut h = History::default();
        let c = [cand("a", "email", 1)];
        for day in 0..5 {
            record(&mut h, day * DAY, &c, &[Outcome::Sent], &p);
        }
        assert_eq!(h.sent["email"], vec![4 * DAY]);
        assert_eq!(h.last["a"], 4 * DAY);
    }

    #[test]
    fn every_outcome_is_explained_with_its_evidence() {
        let p = policies();
        let consented = traits(r#"{"consent_email":true,"consent_sms":"yes"}"#);
        let mut h = History::default();
        // An earlier email by cart-abandon, 3 hours ago; "low" decided
        // for this customer an hour ago.
        record(
            &mut h,
            0,
            &[cand("cart-abandon", "email", 1)],
            &[Outcome::Sent],
            &p,
        );
        record(
            &mut h,
            2 * 3_600_000,
            &[cand("low", "agent", 1)],
            &[Outcome::Control],
            &p,
        );
        let now = 3 * 3_600_000;
        let mut control = cand("agent-call", "agent", 50);
        control.holdout_pct = 100;
        let c = [
            cand("sms-offer", "sms", 90),
            cand("low", "agent", 80),
            cand("email-offer", "email", 70),
            control,
            cand("loser", "agent", 10),
        ];
        let outcomes = decide(now, "u", &c, &consented, &h, &p);
        assert_eq!(
            outcomes,
            vec![
                Outcome::SuppressedConsent,
                Outcome::SuppressedFrequency,
                Outcome::SuppressedPolicy,
                Outcome::Control,
                Outcome::SuppressedArbitration
            ]
        );
        let channel_of = |campaign: &str| {
            Some(
                if campaign == "cart-abandon" {
                    "email"
                } else {
                    "agent"
                }
                .to_owned(),
            )
        };
        let why = explain(now, "u", &c, &outcomes, &consented, &h, &p, &channel_of);
        assert_eq!(
            why[0],
            Why::Consent {
                channel: "sms".into(),
                consent_trait: Some("consent_sms".into()),
                value: Value::String("yes".into()),
            }
        );
        assert_eq!(
            why[1],
            Why::Frequency {
                previous: 2 * 3_600_000,
                frequency_ms: 7 * DAY
            }
        );
        assert_eq!(
            why[2],
            Why::Policy {
                policy: "daily".into(),
                channel: "email".into(),
                limit: 1,
                window_ms: DAY,
                counted: vec![0],
                by: Some("cart-abandon".into()),
            }
        );
        assert_eq!(
            why[2].describe(now),
            "daily: email sent 3h ago by cart-abandon"
        );
        assert_eq!(
            why[3],
            Why::Holdout {
                bucket: bucket("u", "agent-call"),
                holdout_pct: 100
            }
        );
        assert_eq!(
            why[4],
            Why::Arbitration {
                winner: "agent-call".into(),
                winner_priority: 50,
                priority: 10
            }
        );
        // The stored form names the check.
        let json = serde_json::to_value(&why[4]).unwrap();
        assert_eq!(json["check"], "arbitration");
    }
}
