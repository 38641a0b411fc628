//! Trigger: every `Deposit Made`, with what the customer deposited in the
//! 90 days before it, so a campaign can tell a large deposit from a usual one.
//!
//! Fires `deposit` with `amount`, `prior_count` (deposits in [t−90d, t)) and
//! `prior_mean` (their mean: amounts summed one by one in event order, then
//! divided by the count, in f64; 0.0 when there are none).

use nudge_sdk::prelude::*;
use serde::{Deserialize, Serialize};

const WINDOW: i64 = 90 * DAY;

#[derive(Default, Serialize, Deserialize)]
struct History {
    /// (timestamp ms, amount) of deposits still inside the window, in order.
    deposits: Vec<(i64, f64)>,
}

pub struct DepositHistory;

impl Trigger for DepositHistory {
    fn info() -> TriggerInfo {
        TriggerInfo::new("deposit-history", "0.1.0")
            .subscribes(["Deposit Made"])
            .fires(["deposit"])
    }

    fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        let Some(amount) = ev.properties.f64("amount") else {
            return Err(format!(
                "{}: Deposit Made without a numeric amount",
                ev.message_id
            ));
        };
        let mut h: History = ctx.get("h").unwrap_or_default();
        let from = ev.ts - WINDOW;
        h.deposits.retain(|(ts, _)| *ts >= from);
        let (mut sum, mut n) = (0.0f64, 0u32);
        for (_, a) in h.deposits.iter().filter(|(ts, _)| *ts < ev.ts) {
            sum += a;
            n += 1;
        }
        let mean = if n == 0 { 0.0 } else { sum / f64::from(n) };
        h.deposits.push((ev.ts, amount));
        ctx.set("h", &h);
        Ok(vec![Firing::new("deposit")
            .with("amount", amount)
            .with("prior_count", n)
            .with("prior_mean", mean)])
    }
}

export_trigger!(DepositHistory);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    fn deposit(h: &mut TestHost, ts: i64, amount: f64) -> Firing {
        let ev = Event::track(
            "c1",
            "Deposit Made",
            ts,
            [("amount", amount)].into_iter().collect(),
        );
        let mut out = h
            .event::<DepositHistory>(&ev, &Customer::default())
            .unwrap();
        assert_eq!(out.len(), 1);
        out.remove(0).1
    }

    #[test]
    fn mean_covers_the_90_days_before() {
        let mut h = TestHost::new();
        let f = deposit(&mut h, 0, 100.0);
        assert_eq!(f.data.i64("prior_count"), Some(0));
        deposit(&mut h, DAY, 300.0);
        let f = deposit(&mut h, 90 * DAY, 5000.0);
        // The deposit at t=0 is exactly 90 days old: still inside [t-90d, t).
        assert_eq!(f.data.i64("prior_count"), Some(2));
        assert_eq!(f.data.f64("prior_mean"), Some(200.0));
        let f = deposit(&mut h, 90 * DAY + 1, 1.0);
        assert_eq!(f.data.i64("prior_count"), Some(2));
        assert_eq!(f.data.f64("prior_mean"), Some((300.0 + 5000.0) / 2.0));
    }

    #[test]
    fn missing_amount_is_an_error() {
        let mut h = TestHost::new();
        let ev = Event::track("c1", "Deposit Made", 0, Fields::new());
        assert!(h
            .event::<DepositHistory>(&ev, &Customer::default())
            .is_err());
    }
}
