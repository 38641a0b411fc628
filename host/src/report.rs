//! Measurement: per campaign, what was decided, and how many `sent` and
//! `control` customers reached the campaign's goal within its window.
//!
//! Conversions are found when the goal event arrives (the worker matches it
//! against the customer's open decisions), so no event needs to be kept.

use serde::Serialize;

use crate::decide::Outcome;
use crate::rules::RuleSet;
use crate::worker::Decision;

/// One campaign's line of the report, fields in the order of SPEC §4.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Row {
    pub campaign: String,
    pub sent: u64,
    pub sent_converted: u64,
    pub control: u64,
    pub control_converted: u64,
    pub suppressed_consent: u64,
    pub suppressed_frequency: u64,
    pub suppressed_policy: u64,
    pub suppressed_arbitration: u64,
}

/// The report counted one decision at a time, so that a replay need not
/// hold its decisions.
pub struct Tally {
    rows: Vec<Row>,
}

impl Tally {
    pub fn new(rules: &RuleSet) -> Tally {
        let mut rows: Vec<Row> = rules
            .campaigns
            .iter()
            .map(|c| Row {
                campaign: c.id.clone(),
                ..Row::default()
            })
            .collect();
        rows.sort_by(|a, b| a.campaign.cmp(&b.campaign));
        Tally { rows }
    }

    /// Counts decision `d`; `converted`: its goal event followed within
    /// its window.
    pub fn add(&mut self, d: &Decision, converted: bool) {
        let Ok(i) = self
            .rows
            .binary_search_by(|r| r.campaign.as_str().cmp(&d.campaign))
        else {
            return;
        };
        let conv = u64::from(converted);
        let r = &mut self.rows[i];
        match d.outcome {
            Outcome::Sent => {
                r.sent += 1;
                r.sent_converted += conv;
            }
            Outcome::Control => {
                r.control += 1;
                r.control_converted += conv;
            }
            Outcome::SuppressedConsent => r.suppressed_consent += 1,
            Outcome::SuppressedFrequency => r.suppressed_frequency += 1,
            Outcome::SuppressedPolicy => r.suppressed_policy += 1,
            Outcome::SuppressedArbitration => r.suppressed_arbitration += 1,
        }
    }

    /// Every campaign's row, sorted by campaign id.
    pub fn rows(self) -> Vec<Row> {
        self.rows
    }
}

/// JSON Lines, one row per campaign.
pub fn to_jsonl(rows: &[Row]) -> String {
    let mut s = String::new();
    for r in rows {
        // A struct of strings and integers always serialises.
        s.push_str(&serde_json::to_string(r).unwrap_or_default());
        s.push('\n');
    }
    s
}
