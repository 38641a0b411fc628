//! Test plugin: never returns from `Deposit Made`.

use nudge_sdk::prelude::*;

pub struct Spin;

impl Trigger for Spin {
    fn info() -> TriggerInfo {
        TriggerInfo::new("fault-spin", "0.1.0")
            .subscribes(["Deposit Made"])
            .fires(["x"])
    }
    fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        let mut n: u64 = 0;
        // black_box keeps the optimiser from proving the loop endless and
        // deleting it.
        while std::hint::black_box(ev.ts) != i64::MIN {
            n = n.wrapping_add(1);
            if n == u64::MAX {
                ctx.log(nudge_sdk::Level::Info, "wrapped");
            }
        }
        Ok(vec![Firing::new("x")])
    }
}

export_trigger!(Spin);
