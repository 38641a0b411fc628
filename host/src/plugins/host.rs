//! The per-call context and the host capabilities of `nudge:plugin`
//! (`state`, `timers`, `clock`, `log`), one `impl` per interface.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::v0_1_0;
use crate::store::Store;

/// One pending timer change collected during a call.
pub type TimerOps = Vec<(String, Option<i64>)>;

/// The context of the call in progress: whose data, what time, and the
/// changes the plugin asked for (applied only if the call succeeds).
#[derive(Default)]
pub struct Call {
    pub plugin: String,
    pub customer: String,
    pub now: i64,
    pub(super) store: Option<Store>,
    /// State writes: key → new value (`None` = deleted).
    pub state: HashMap<String, Option<Vec<u8>>>,
    /// Timer changes in call order: key → new due (`None` = cancelled).
    pub timers: TimerOps,
    pub(super) ops: usize,
    pub(super) max_value: usize,
    pub(super) max_ops: usize,
    /// When the call started, and how long it has spent blocked in host
    /// imports (a store read waiting on disk): the deadline limits the
    /// plugin's own time, not the host's.
    pub(super) started: Option<Instant>,
    pub(super) host_time: Duration,
    pub(super) deadline: Duration,
}

impl Call {
    pub fn new(plugin: &str, customer: &str, now: i64, store: Option<Store>) -> Call {
        Call {
            plugin: plugin.to_owned(),
            customer: customer.to_owned(),
            now,
            store,
            ..Call::default()
        }
    }

    fn count_op(&mut self) -> wasmtime::Result<()> {
        self.ops += 1;
        if self.ops > self.max_ops {
            return Err(wasmtime::format_err!(
                "more than {} state, timer and log operations in one call",
                self.max_ops
            ));
        }
        Ok(())
    }
}

/// Per-instance host data.
pub struct HostState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limits: StoreLimits,
    pub(super) call: Call,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

// ---- host capabilities (one interface each) ----

impl v0_1_0::trigger::nudge::plugin::types::Host for HostState {}

impl v0_1_0::trigger::nudge::plugin::state::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(v) = self.call.state.get(&key) {
            return Ok(v.clone());
        }
        let Some(store) = &self.call.store else {
            return Ok(None);
        };
        let t = Instant::now();
        let v = store
            .plugin_state(&self.call.customer, &self.call.plugin, &key)
            .map_err(|e| wasmtime::format_err!("state.get({key:?}): {e}"));
        self.call.host_time += t.elapsed();
        v
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.call.count_op()?;
        if value.len() > self.call.max_value {
            return Err(wasmtime::format_err!(
                "state.set({key:?}): {} bytes is over the {}-byte limit",
                value.len(),
                self.call.max_value
            ));
        }
        self.call.state.insert(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.call.count_op()?;
        self.call.state.insert(key, None);
        Ok(())
    }
}

impl v0_1_0::trigger::nudge::plugin::timers::Host for HostState {
    fn set(&mut self, key: String, due_ms: i64) -> wasmtime::Result<()> {
        self.call.count_op()?;
        self.call.timers.push((key, Some(due_ms)));
        Ok(())
    }

    fn cancel(&mut self, key: String) -> wasmtime::Result<()> {
        self.call.count_op()?;
        self.call.timers.push((key, None));
        Ok(())
    }
}

impl v0_1_0::trigger::nudge::plugin::clock::Host for HostState {
    fn now_ms(&mut self) -> i64 {
        self.call.now
    }
}

impl v0_1_0::trigger::nudge::plugin::log::Host for HostState {
    fn log(
        &mut self,
        level: v0_1_0::trigger::nudge::plugin::log::Level,
        message: String,
    ) -> wasmtime::Result<()> {
        use v0_1_0::trigger::nudge::plugin::log::Level as L;
        self.call.count_op()?;
        let (p, c) = (&self.call.plugin, &self.call.customer);
        match level {
            L::Trace => tracing::trace!(plugin = %p, customer = %c, "{message}"),
            L::Debug => tracing::debug!(plugin = %p, customer = %c, "{message}"),
            L::Info => tracing::info!(plugin = %p, customer = %c, "{message}"),
            L::Warn => tracing::warn!(plugin = %p, customer = %c, "{message}"),
            L::Error => tracing::error!(plugin = %p, customer = %c, "{message}"),
        }
        Ok(())
    }
}
