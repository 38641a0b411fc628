//! # Nudge
//!
//! A real-time trigger-marketing engine: customer events in, decisions about
//! whom to contact, how and why out. See `ARCHITECTURE.md` for the
//! bird's-eye view.
//!
//! # Layout
//!
//! - [`event`]: Segment Spec events and timestamps.
//! - [`store`]: the customer store on sled (traits, plugin state, timers,
//!   decision history and log). Only `store` imports sled.
//! - [`plugins`]: the WASM component runtime: contract bindings, sandbox,
//!   compile cache, per-worker instances. Only `plugins` imports wasmtime.
//! - [`rules`]: campaign and policy files, Rhai expressions.
//! - [`generation`]: one validated set of plugins and rules, swapped atomically.
//! - [`decide`]: the pure decision pipeline. No I/O.
//! - [`worker`]: one event's way through the house.
//! - [`report`]: goals, control vs treated, uplift.
//! - [`replay`]: `nudge replay`, a file of events through a worker.

pub mod decide;
pub mod event;
pub mod generation;
pub mod plugins;
pub mod replay;
pub mod report;
pub mod rules;
pub mod store;
pub mod worker;

/// The example plugins, compiled for wasm32-wasip2 by the build script.
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}
