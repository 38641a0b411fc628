//! Trigger: fires `first-identify` on a customer's first `identify` ever.

use nudge_sdk::prelude::*;

pub struct FirstIdentify;

impl Trigger for FirstIdentify {
    fn info() -> TriggerInfo {
        TriggerInfo::new("first-identify", "0.1.0")
            .subscribes(["identify"])
            .fires(["first-identify"])
    }

    fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        if !ev.is_identify() || ctx.get_raw("seen").is_some() {
            return Ok(vec![]);
        }
        ctx.set_raw("seen", &ev.ts.to_le_bytes());
        Ok(vec![Firing::new("first-identify")])
    }
}

export_trigger!(FirstIdentify);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    #[test]
    fn fires_once() {
        let mut h = TestHost::new();
        let c = Customer::default();
        let first = h
            .event::<FirstIdentify>(&Event::identify("c1", 1, Fields::new()), &c)
            .unwrap();
        let second = h
            .event::<FirstIdentify>(&Event::identify("c1", 2, Fields::new()), &c)
            .unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].1.name, "first-identify");
        assert!(second.is_empty());
    }
}
