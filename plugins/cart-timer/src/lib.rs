//! Trigger: a cart left alone. Each `Product Added` (re)sets a 30-minute
//! timer; `Order Completed` cancels it; when it falls due, fires `abandoned`.

use nudge_sdk::prelude::*;

const DELAY: i64 = 30 * MINUTE;

pub struct CartTimer;

impl Trigger for CartTimer {
    fn info() -> TriggerInfo {
        TriggerInfo::new("cart-timer", "0.1.0")
            .subscribes(["Product Added", "Order Completed"])
            .fires(["abandoned"])
    }

    fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        match ev.name.as_str() {
            "Product Added" => ctx.set_timer("cart", ev.ts + DELAY),
            "Order Completed" => ctx.cancel_timer("cart"),
            _ => {}
        }
        Ok(vec![])
    }

    fn on_timer(_ctx: &mut Ctx, key: &str, _c: &Customer) -> Result<Vec<Firing>, String> {
        Ok(match key {
            "cart" => vec![Firing::new("abandoned")],
            _ => vec![],
        })
    }
}

export_trigger!(CartTimer);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    fn track(name: &str, ts: i64) -> Event {
        Event::track("c1", name, ts, Fields::new())
    }

    #[test]
    fn fires_30_minutes_after_the_last_product() {
        let mut h = TestHost::new();
        let c = Customer::default();
        assert!(h
            .event::<CartTimer>(&track("Product Added", 0), &c)
            .unwrap()
            .is_empty());
        assert!(h
            .event::<CartTimer>(&track("Product Added", 10 * MINUTE), &c)
            .unwrap()
            .is_empty());
        let fired = h
            .event::<CartTimer>(&track("Login", 40 * MINUTE), &c)
            .unwrap();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].0, 40 * MINUTE);
        assert_eq!(fired[0].1.name, "abandoned");
    }

    #[test]
    fn an_order_cancels() {
        let mut h = TestHost::new();
        let c = Customer::default();
        h.event::<CartTimer>(&track("Product Added", 0), &c)
            .unwrap();
        h.event::<CartTimer>(&track("Order Completed", 29 * MINUTE), &c)
            .unwrap();
        assert!(h
            .event::<CartTimer>(&track("Login", DAY), &c)
            .unwrap()
            .is_empty());
    }
}
