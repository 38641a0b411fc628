// The plugin `echo`, shared by its two versions (each crate sets VERSION
// and EVERY). Subscribes to `Ping`, fires `pong` with the event's `n` and
// the version that fired; traps on a Ping with `boom: true`.

use nudge_sdk::prelude::*;

pub struct Echo;

impl Trigger for Echo {
    fn info() -> TriggerInfo {
        TriggerInfo::new("echo", VERSION)
            .subscribes(["Ping"])
            .fires(["pong"])
    }

    fn on_event(_ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        if ev.properties.is_true("boom") {
            // A panic in a wasm32 guest aborts: the call traps.
            panic!("boom on {}", ev.message_id);
        }
        let n = ev.properties.i64("n").unwrap_or(0);
        if !EVERY && n % 2 != 0 {
            return Ok(vec![]);
        }
        Ok(vec![Firing::new("pong")
            .with("n", n)
            .with("version", VERSION)])
    }
}

export_trigger!(Echo);
