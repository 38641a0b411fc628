//! Test plugin: misbehaves on every `Deposit Made`, in the way its manifest's
//! `mode` names, the way a careless or hostile team's plugin would. Every
//! mode but the ones a host must stop still fires `x`, so a test can tell
//! "contained" from "never ran".
//!
//! | mode | on every deposit |
//! |---|---|
//! | `sleep` | `std::thread::sleep` for an hour, then fires |
//! | `nap-loop` | sleeps 1 ms in a loop that never ends |
//! | `print` | prints 256 KiB to stdout and to stderr, with forged log lines, then fires |
//! | `log-flood` | logs 500 lines of 32 KiB (16 MiB), then fires |
//! | `log-forge` | logs one line with a newline and a fake host line in it, then fires |
//! | `timer-now` | sets a timer due now + 1 h whose `on-timer` re-arms it at its own due time |
//! | `timer-past` | as `timer-now`, re-arming 1 ms in the past |
//! | `timer-step` | as `timer-now`, re-arming 1 s later, for ever |
//! | `state-flood` | writes 100 state values of 1 MiB |
//! | `state-grow` | adds one 512 KiB state value per deposit, under a new key |
//! | `big-firing` | fires with a 4 MiB JSON array in its data |
//! | `random` | fires with a random number and a `HashMap`'s iteration order |

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Duration;

use nudge_sdk::prelude::*;

pub struct Hostile;

fn mode() -> String {
    config("mode").unwrap_or_default()
}

fn fire() -> Result<Vec<Firing>, String> {
    Ok(vec![Firing::new("x")])
}

impl Trigger for Hostile {
    fn info() -> TriggerInfo {
        TriggerInfo::new("hostile", "0.1.0")
            .subscribes(["Deposit Made"])
            .fires(["x"])
    }

    fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
        match mode().as_str() {
            "sleep" => {
                std::thread::sleep(Duration::from_secs(3600));
                fire()
            }
            "nap-loop" => loop {
                std::thread::sleep(Duration::from_millis(1));
            },
            "print" => {
                let line = format!(
                    "{}\n2026-01-01T00:00:00Z ERROR nudge: forged\n",
                    "o".repeat(1000)
                );
                for _ in 0..(256 << 10) / line.len() {
                    print!("{line}");
                    eprint!("{line}");
                }
                fire()
            }
            "log-flood" => {
                let line = "l".repeat(32 << 10);
                for _ in 0..500 {
                    ctx.log(nudge_sdk::Level::Info, &line);
                }
                fire()
            }
            "log-forge" => {
                ctx.log(
                    nudge_sdk::Level::Info,
                    "ok\n2026-01-01T00:00:00.000000Z ERROR nudge: forged by a plugin\x1b[2J",
                );
                fire()
            }
            "timer-now" | "timer-past" | "timer-step" => {
                ctx.set_timer("loop", ev.ts + HOUR);
                Ok(vec![])
            }
            "state-flood" => {
                let value = vec![7u8; 1 << 20];
                for i in 0..100 {
                    ctx.set_raw(&format!("k{i}"), &value);
                }
                fire()
            }
            "state-grow" => {
                let n: u64 = ctx.get("n").unwrap_or(0);
                ctx.set("n", &(n + 1));
                ctx.set_raw(&format!("k{n}"), &vec![1u8; 512 << 10]);
                fire()
            }
            "big-firing" => {
                let big = format!("[{}1]", "1e15,".repeat(800_000));
                Ok(vec![Firing::new("x").with("big", Value::Json(big))])
            }
            "random" => {
                // A hasher's keys come from WASI randomness, as in any crate
                // that seeds itself from the host.
                let r = std::collections::hash_map::RandomState::new().hash_one("x");
                let mut m = HashMap::new();
                for k in ["a", "b", "c", "d", "e", "f", "g", "h"] {
                    m.insert(k, ());
                }
                let order: String = m.keys().copied().collect();
                Ok(vec![Firing::new("x")
                    .with("r", Value::Int((r >> 1) as i64))
                    .with("order", Value::Text(order))])
            }
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn on_timer(ctx: &mut Ctx, key: &str, _c: &Customer) -> Result<Vec<Firing>, String> {
        let now = ctx.now_ms();
        match mode().as_str() {
            "timer-now" => ctx.set_timer(key, now),
            "timer-past" => ctx.set_timer(key, now - 1),
            "timer-step" => ctx.set_timer(key, now + SECOND),
            _ => {}
        }
        fire()
    }
}

export_trigger!(Hostile);
