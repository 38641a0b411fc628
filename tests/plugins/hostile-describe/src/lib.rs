//! Test plugin: prints and naps in `describe`, as a plugin with a chatty
//! start-up would. Loading it must neither panic the host (stdout from a
//! runtime thread) nor wait for the nap.

use std::time::Duration;

use nudge_sdk::prelude::*;

pub struct Chatty;

impl Trigger for Chatty {
    fn info() -> TriggerInfo {
        println!("chatty: starting up");
        eprintln!("chatty: on stderr too");
        std::thread::sleep(Duration::from_secs(3600));
        TriggerInfo::new("hostile-describe", "0.1.0")
            .subscribes(["Deposit Made"])
            .fires(["x"])
    }

    fn on_event(_ctx: &mut Ctx, _ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        println!("chatty: deposit");
        Ok(vec![Firing::new("x")])
    }
}

export_trigger!(Chatty);
