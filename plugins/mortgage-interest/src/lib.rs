//! Trigger: a customer reading about mortgages. Each `Page Viewed` whose path
//! starts with `/mortgages` fires `browsing` with `count`, the number of such
//! views in (t−7d, t], this one included.

use nudge_sdk::prelude::*;

const PREFIX: &str = "/mortgages";
const WINDOW: i64 = 7 * DAY;

pub struct MortgageInterest;

impl Trigger for MortgageInterest {
    fn info() -> TriggerInfo {
        TriggerInfo::new("mortgage-interest", "0.1.0")
            .subscribes(["Page Viewed"])
            .fires(["browsing"])
    }

    fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        if !ev
            .properties
            .str("path")
            .is_some_and(|p| p.starts_with(PREFIX))
        {
            return Ok(vec![]);
        }
        let mut views: Vec<i64> = ctx.get("views").unwrap_or_default();
        views.retain(|ts| *ts > ev.ts - WINDOW);
        views.push(ev.ts);
        ctx.set("views", &views);
        Ok(vec![Firing::new("browsing").with("count", views.len())])
    }
}

export_trigger!(MortgageInterest);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    fn view(h: &mut TestHost, path: &str, ts: i64) -> Option<i64> {
        let ev = Event::track(
            "c1",
            "Page Viewed",
            ts,
            [("path", path)].into_iter().collect(),
        );
        let out = h
            .event::<MortgageInterest>(&ev, &Customer::default())
            .unwrap();
        out.first().and_then(|(_, f)| f.data.i64("count"))
    }

    #[test]
    fn counts_mortgage_views_in_the_last_7_days() {
        let mut h = TestHost::new();
        assert_eq!(view(&mut h, "/mortgages/rates", 0), Some(1));
        assert_eq!(view(&mut h, "/mortgage-news", 1), None);
        assert_eq!(view(&mut h, "/mortgages/apply", DAY), Some(2));
        // The view at 0 is exactly 7 days old: outside (t-7d, t].
        assert_eq!(view(&mut h, "/mortgages", 7 * DAY), Some(2));
    }
}
