//! Test plugin: the channel `fault-channel`, which traps on every delivery.

use nudge_sdk::prelude::*;

pub struct FaultChannel;

impl Channel for FaultChannel {
    fn info() -> (String, String) {
        ("fault-channel".into(), "0.1.0".into())
    }

    fn deliver(_ctx: &mut Ctx, _t: &Treatment, r: &Recipient) -> Result<Vec<Outbound>, String> {
        // A panic in a wasm32 guest aborts: the call traps.
        panic!("deliberate trap delivering to {}", r.customer_id);
    }
}

export_channel!(FaultChannel);
