//! Test plugin: traps (unreachable) on every `Deposit Made`.

use nudge_sdk::prelude::*;

pub struct Trap;

impl Trigger for Trap {
    fn info() -> TriggerInfo {
        TriggerInfo::new("fault-trap", "0.1.0")
            .subscribes(["Deposit Made"])
            .fires(["x"])
    }
    fn on_event(_ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        if ev.name == "Deposit Made" {
            // A panic in a wasm32 guest aborts: the call traps.
            panic!("deliberate trap for {}", ev.message_id);
        }
        Ok(vec![Firing::new("x")])
    }
}

export_trigger!(Trap);
