//! The WASM plugin runtime. The only module that imports wasmtime.
//!
//! - Plugins are components built against `nudge:plugin@0.1.0`
//!   (`sdk/wit/since_v0.1.0`). Bindings per contract version live in
//!   [`v0_1_0`]; a later contract gets its own module converting into the
//!   host's types, so old plugins keep loading beside new ones.
//! - Compiled once: artifacts are cached on disk, keyed by the SHA-256 of the
//!   component and the engine's compatibility hash.
//! - Sandboxed: WASI with no preopened directories, no network, frozen
//!   clocks, and no environment but the `[config]` of the plugin's manifest (time comes only from the `clock` import); a
//!   memory cap per instance and a deadline per call (epoch interruption).
//! - Contained: a trap, a deadline or a memory bomb ends that call only; the
//!   poisoned instance is dropped and the next call gets a fresh one from the
//!   `InstancePre`.

//! # Layout
//!
//! - [`v0_1_0`]: the bindings of contract 0.1.0 and conversions to host types.
//! - `plugin`: a loaded, validated plugin and what it says about itself.
//! - `host`: the per-call context and the `nudge:plugin` host capabilities.
//! - `sandbox`: the WASI a plugin gets (frozen clocks, nothing else).
//! - `runtime`: the engine, linker, compile cache and loading.
//! - `instances`: one worker's live instances, the calls, and faults.
//! - `types`: what plugins and the host exchange, as host types.

mod fault;
mod host;
mod instances;
mod limits;
mod plugin;
mod runtime;
mod sandbox;
mod types;
pub mod v0_1_0;

pub use fault::Fault;
pub use host::{Call, HostState, TimerOps};
pub use instances::{CallInput, Effects, Instances};
pub use limits::Limits;
pub use plugin::{Plugin, PluginKind, TriggerInfo};
pub use runtime::{hex_sha256, Runtime};
pub use types::{Action, Firing, Outbound, Recipient, Treatment};

/// Runs `f` where plugin code may run: on this thread, unless it is an
/// async runtime's, and then on a scoped thread of its own. WASI's
/// synchronous host calls drive futures with `block_on`, which panics on a
/// runtime thread, and plugin time must never hold up async tasks.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The contract versions this host loads.
pub const SUPPORTED_CONTRACTS: &[&str] = &["0.1.0"];

/// Why loading a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{source_name}: not a loadable component: {message}")]
    Compile {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: does not fit contract nudge:plugin@0.1.0 as a trigger, response or channel: {message}")]
    Contract {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error("plugin runtime: {0}")]
    Runtime(String),
}
