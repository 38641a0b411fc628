//! # nudge-sdk
//!
//! Write Nudge plugins in plain Rust. A trigger plugin is a type that
//! implements [`Trigger`] plus one line, [`export_trigger!`]:
//!
//! ```
//! use nudge_sdk::prelude::*;
//!
//! struct CartTimer;
//! impl Trigger for CartTimer {
//!     fn info() -> TriggerInfo {
//!         TriggerInfo::new("cart-timer", "0.1.0")
//!             .subscribes(["Product Added", "Order Completed"])
//!             .fires(["abandoned"])
//!     }
//!     fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
//!         match ev.name.as_str() {
//!             "Product Added" => ctx.set_timer("cart", ev.ts + 30 * MINUTE),
//!             "Order Completed" => ctx.cancel_timer("cart"),
//!             _ => {}
//!         }
//!         Ok(vec![])
//!     }
//!     fn on_timer(_ctx: &mut Ctx, _key: &str, _c: &Customer) -> Result<Vec<Firing>, String> {
//!         Ok(vec![Firing::new("abandoned")])
//!     }
//! }
//! export_trigger!(CartTimer);
//! ```
//!
//! Built for `wasm32-wasip2` the macro exports the plugin through the WIT
//! contract (`wit/since_v0.1.0/nudge.wit`). Built natively it does nothing,
//! and [`testing::TestHost`] runs the same code in unit tests.
//!
//! # The sandbox
//!
//! A plugin runs under WASI with no files, no network and no environment
//! but its manifest's `[config]` ([`config`]). What that means for code:
//!
//! - Time: WASI clocks read zero; use [`Ctx::now_ms`] (event time in replay
//!   and on the event clock, the wall clock live). A sleep returns at once;
//!   a loop that waits for the clock to move never ends and hits the
//!   call's deadline.
//! - Randomness (`wasi:random`, what `getrandom` and `rand` read) comes
//!   from a generator the host seeds per call from the plugin, the
//!   customer, the call's time and the event's `messageId` (or the timer's
//!   key), and `HashMap`s are keyed from a fixed seed: the same input
//!   gives the same output in every replay.
//! - Not deterministic, so keep decisions off them: whether a call near its
//!   deadline finishes (that depends on the machine), and anything kept in
//!   globals between calls (one instance serves many customers, in an
//!   order that depends on the host's worker count). Keep what must last
//!   in [`Ctx::set`].
//! - stdout and stderr go to the host's log, cut to the call's log budget;
//!   prefer [`Ctx::log`].
//! - Budgets (the operator's `[limits]`, lowered by the manifest's own):
//!   bytes returned, state written per call and kept per customer, log
//!   bytes, operations per call; a timer must be due at least the minimum
//!   delay (1 s by default) after the call's time. Going over one fails
//!   the call (its firings, state and timer changes are dropped) and
//!   counts as the plugin's fault. The README's "What a plugin may do"
//!   lists every limit and its default.
//!
//! # Layout
//!
//! - `value`: [`Value`] and [`Fields`], the JSON-like data plugins read.
//! - `types`: events, customers, firings and the other records of the contract.
//! - `ctx`: [`Ctx`], a plugin's view of its host (state, timers, clock, log).
//! - `testing`: an in-memory host for native unit tests.
//! - `guest` (wasm32 only): the WIT bindings and the glue the macros use.

mod ctx;
pub mod testing;
mod types;
mod value;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

pub use ctx::{Ctx, Host, Level};
/// For plugins that build JSON documents (webhooks, gateways).
pub use serde_json;
pub use types::*;
pub use value::{Fields, Value};

/// The WIT contract version this SDK builds plugins against.
pub const CONTRACT_VERSION: &str = "0.1.0";

pub const SECOND: i64 = 1000;
pub const MINUTE: i64 = 60 * SECOND;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;

/// How long after the call's time a timer must fall due at the soonest,
/// by default (the operator's `min_timer_delay`): one due earlier fails the
/// call, since a timer re-armed at its own due time would fire for ever.
pub const MIN_TIMER_DELAY: i64 = SECOND;

/// A setting from the plugin's manifest (`[config]`), as the operator
/// granted it. Plugins have no other environment.
pub fn config(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

pub mod prelude {
    pub use crate::{
        config, export_channel, export_response, export_trigger, Action, Channel, Ctx, Customer,
        Event, EventKind, Fields, Firing, Outbound, Recipient, Response, Treatment, Trigger,
        TriggerInfo, Value, DAY, HOUR, MINUTE, SECOND,
    };
}

/// A trigger plugin: sees a customer's subscribed events in order, keeps
/// state, sets timers, and fires signals that campaigns listen for.
pub trait Trigger {
    fn info() -> TriggerInfo;
    fn on_event(ctx: &mut Ctx, event: &Event, customer: &Customer) -> Result<Vec<Firing>, String>;
    /// One of this plugin's timers for `customer` fell due.
    fn on_timer(ctx: &mut Ctx, key: &str, customer: &Customer) -> Result<Vec<Firing>, String> {
        let _ = (ctx, key, customer);
        Ok(Vec::new())
    }
}

/// A response plugin: pre-thinks the action for a decided campaign.
pub trait Response {
    /// (name, version)
    fn info() -> (String, String);
    fn respond(ctx: &mut Ctx, action: &Action, customer: &Customer) -> Result<Treatment, String>;
}

/// A channel plugin: renders a treatment into what the host sends.
pub trait Channel {
    /// (name, version)
    fn info() -> (String, String);
    fn deliver(
        ctx: &mut Ctx,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, String>;
}

/// Exports a [`Trigger`] implementation as the plugin's entry point.
#[macro_export]
macro_rules! export_trigger {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct NudgeExport;
            impl $crate::guest::TriggerGuest for NudgeExport {
                fn describe() -> $crate::guest::WitTriggerInfo {
                    $crate::guest::trigger_describe::<$t>()
                }
                fn on_event(
                    e: $crate::guest::WitEvent,
                    c: $crate::guest::WitCustomer,
                ) -> Result<Vec<$crate::guest::WitFiring>, String> {
                    $crate::guest::trigger_on_event::<$t>(e, c)
                }
                fn on_timer(
                    k: String,
                    c: $crate::guest::WitCustomer,
                ) -> Result<Vec<$crate::guest::WitFiring>, String> {
                    $crate::guest::trigger_on_timer::<$t>(k, c)
                }
            }
            $crate::__nudge_unsupported_response!(NudgeExport, "trigger");
            $crate::__nudge_unsupported_channel!(NudgeExport, "trigger");
    $crate::guest::export!(NudgeExport with_types_in $crate::guest);
        };
    };
}

/// Exports a [`Response`] implementation as the plugin's entry point.
#[macro_export]
macro_rules! export_response {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct NudgeExport;
            impl $crate::guest::ResponseGuest for NudgeExport {
                fn describe() -> (String, String) {
                    <$t as $crate::Response>::info()
                }
                fn respond(
                    a: $crate::guest::WitAction,
                    c: $crate::guest::WitCustomer,
                ) -> Result<$crate::guest::WitTreatment, String> {
                    $crate::guest::respond::<$t>(a, c)
                }
            }
            $crate::__nudge_unsupported_trigger!(NudgeExport, "response");
            $crate::__nudge_unsupported_channel!(NudgeExport, "response");
    $crate::guest::export!(NudgeExport with_types_in $crate::guest);
        };
    };
}

/// Exports a [`Channel`] implementation as the plugin's entry point.
#[macro_export]
macro_rules! export_channel {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct NudgeExport;
            impl $crate::guest::ChannelGuest for NudgeExport {
                fn describe() -> (String, String) {
                    <$t as $crate::Channel>::info()
                }
                fn deliver(
                    t: $crate::guest::WitTreatment,
                    r: $crate::guest::WitRecipient,
                ) -> Result<Vec<$crate::guest::WitOutbound>, String> {
                    $crate::guest::deliver::<$t>(t, r)
                }
            }
            $crate::__nudge_unsupported_trigger!(NudgeExport, "channel");
            $crate::__nudge_unsupported_response!(NudgeExport, "channel");
    $crate::guest::export!(NudgeExport with_types_in $crate::guest);
        };
    };
}

// The SDK builds every plugin against one world with all three exports; the
// kinds a plugin does not implement answer with an error the host reports.
#[doc(hidden)]
#[macro_export]
macro_rules! __nudge_unsupported_trigger {
    ($s:ident, $kind:literal) => {
        impl $crate::guest::TriggerGuest for $s {
            fn describe() -> $crate::guest::WitTriggerInfo {
                $crate::guest::WitTriggerInfo {
                    name: String::new(),
                    version: String::new(),
                    subscribes: Vec::new(),
                    firings: Vec::new(),
                }
            }
            fn on_event(
                _: $crate::guest::WitEvent,
                _: $crate::guest::WitCustomer,
            ) -> Result<Vec<$crate::guest::WitFiring>, String> {
                Err(concat!("this plugin is a ", $kind, " plugin, not a trigger").into())
            }
            fn on_timer(
                _: String,
                _: $crate::guest::WitCustomer,
            ) -> Result<Vec<$crate::guest::WitFiring>, String> {
                Err(concat!("this plugin is a ", $kind, " plugin, not a trigger").into())
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __nudge_unsupported_response {
    ($s:ident, $kind:literal) => {
        impl $crate::guest::ResponseGuest for $s {
            fn describe() -> (String, String) {
                (String::new(), String::new())
            }
            fn respond(
                _: $crate::guest::WitAction,
                _: $crate::guest::WitCustomer,
            ) -> Result<$crate::guest::WitTreatment, String> {
                Err(concat!("this plugin is a ", $kind, " plugin, not a response").into())
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __nudge_unsupported_channel {
    ($s:ident, $kind:literal) => {
        impl $crate::guest::ChannelGuest for $s {
            fn describe() -> (String, String) {
                (String::new(), String::new())
            }
            fn deliver(
                _: $crate::guest::WitTreatment,
                _: $crate::guest::WitRecipient,
            ) -> Result<Vec<$crate::guest::WitOutbound>, String> {
                Err(concat!("this plugin is a ", $kind, " plugin, not a channel").into())
            }
        }
    };
}
