//! Test plugin: allocates without bound on every `Deposit Made`.

use nudge_sdk::prelude::*;

pub struct MemBomb;

impl Trigger for MemBomb {
    fn info() -> TriggerInfo {
        TriggerInfo::new("fault-membomb", "0.1.0")
            .subscribes(["Deposit Made"])
            .fires(["x"])
    }
    fn on_event(_ctx: &mut Ctx, _ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; 16 << 20];
            // Touch the pages so the allocation is real.
            chunk[0] = 1;
            hoard.push(std::hint::black_box(chunk));
        }
    }
}

export_trigger!(MemBomb);
