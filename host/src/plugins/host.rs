//! The per-call context and the host capabilities of `nudge:plugin`
//! (`state`, `timers`, `clock`, `log`), one `impl` per interface.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::sandbox::{Output, Seeds};
use super::v0_1_0;
use super::Limits;
use crate::store::{StateRecord, Store};

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
    /// What the plugin keeps for the customer, read at its first state
    /// access in the call.
    record: Option<StateRecord>,
    /// State writes: key → new value (`None` = deleted).
    pub state: HashMap<String, Option<Vec<u8>>>,
    /// Timer changes in call order: key → new due (`None` = cancelled).
    pub timers: TimerOps,
    pub(super) limits: Limits,
    ops: usize,
    /// State bytes written so far (keys and values).
    state_bytes: usize,
    /// Log bytes written so far through `log`, and bytes dropped past the
    /// budget.
    log_bytes: usize,
    pub(super) log_dropped: u64,
    /// When the call started, and how long it has spent blocked in host
    /// imports (a store read waiting on disk): the deadline limits the
    /// plugin's own time, not the host's.
    pub(super) started: Option<Instant>,
    pub(super) host_time: Duration,
}

/// A budget of the host's that a call went over: a fault of the plugin
/// whose output broke it ([`super::Fault::Limit`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct OverLimit(pub(super) String);

fn over(msg: String) -> wasmtime::Error {
    wasmtime::Error::new(OverLimit(msg))
}

/// Longest state or timer key.
const MAX_KEY: usize = 1024;

fn check_key(what: &str, key: &str) -> wasmtime::Result<()> {
    if key.len() > MAX_KEY {
        return Err(over(format!(
            "{what}: a key of {} bytes is over the {MAX_KEY}-byte limit",
            key.len()
        )));
    }
    if key.starts_with('\0') {
        return Err(over(format!(
            "{what}({key:?}): keys starting with NUL are the host's"
        )));
    }
    Ok(())
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
        if self.ops > self.limits.max_ops_per_call {
            return Err(over(format!(
                "more than {} state, timer and log operations in one call",
                self.limits.max_ops_per_call
            )));
        }
        Ok(())
    }

    /// The plugin's stored state for the customer (read once per call).
    fn record(&mut self) -> wasmtime::Result<&mut StateRecord> {
        if self.record.is_none() {
            let record = match &self.store {
                None => StateRecord::default(),
                Some(store) => {
                    let t = Instant::now();
                    let r = store
                        .plugin_record(&self.customer, &self.plugin)
                        .map_err(|e| wasmtime::format_err!("state: {e}"));
                    self.host_time += t.elapsed();
                    r?
                }
            };
            self.record = Some(record);
        }
        Ok(self.record.get_or_insert_default())
    }

    fn stored(&mut self, key: &str) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(self.record()?.get(key).map(<[u8]>::to_vec))
    }

    /// After a successful call that wrote state: the state the plugin now
    /// keeps for the customer, checked against the quota. `None` when the
    /// call wrote nothing.
    pub(super) fn settle_quota(&mut self) -> Result<Option<StateRecord>, String> {
        if self.state.is_empty() {
            return Ok(None);
        }
        let quota = self.limits.state_quota;
        let customer = self.customer.clone();
        let edits = std::mem::take(&mut self.state);
        let record = self.record().map_err(|e| e.to_string())?;
        let before = record.bytes();
        for (k, v) in &edits {
            record.set(k, v.clone());
        }
        let total = record.bytes();
        self.state = edits;
        // Only growth is refused: a plugin over a quota lowered since
        // may still shrink its state.
        if total > quota && total > before {
            return Err(format!(
                "state quota: the plugin would keep {total} bytes for customer {customer:?}, over the {quota}-byte quota"
            ));
        }
        Ok(self.record.take())
    }

    /// `message` cut to the longest log line, within the call's log budget.
    fn log_line(&mut self, message: String) -> Option<String> {
        let left = self.limits.max_log_bytes.saturating_sub(self.log_bytes);
        if left == 0 {
            self.log_dropped += message.len() as u64;
            return None;
        }
        let line = cut(message, self.limits.max_log_line.min(left));
        self.log_bytes += line.len();
        Some(line)
    }
}

/// `text` cut at a character boundary to at most `max` bytes, with a marker
/// saying how much was cut.
pub(super) fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!(" …[cut: {} of {total} bytes]", total - end));
    text
}

/// Per-instance host data.
pub struct HostState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limits: StoreLimits,
    pub(super) call: Call,
    /// The seeds of the instance's random generators, reseeded per call.
    pub(super) seeds: Seeds,
    /// What the instance writes to stdout and stderr.
    pub(super) output: Output,
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
        if key.starts_with('\0') {
            return Ok(None);
        }
        if let Some(v) = self.call.state.get(&key) {
            return Ok(v.clone());
        }
        self.call.stored(&key)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.call.count_op()?;
        check_key("state.set", &key)?;
        let max = self.call.limits.max_state_value;
        if value.len() > max {
            return Err(over(format!(
                "state.set({key:?}): {} bytes is over the {max}-byte limit",
                value.len()
            )));
        }
        self.call.state_bytes += key.len() + value.len();
        let max = self.call.limits.max_state_write;
        if self.call.state_bytes > max {
            return Err(over(format!(
                "state.set({key:?}): more than {max} bytes of state written in one call"
            )));
        }
        self.call.state.insert(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.call.count_op()?;
        check_key("state.delete", &key)?;
        self.call.state.insert(key, None);
        Ok(())
    }
}

impl v0_1_0::trigger::nudge::plugin::timers::Host for HostState {
    fn set(&mut self, key: String, due_ms: i64) -> wasmtime::Result<()> {
        self.call.count_op()?;
        check_key("timers.set", &key)?;
        // A timer due at or before the time of the call that set it would
        // fire again at once, for ever: refused, and the call with it.
        let min = self.call.limits.min_timer_delay.as_millis() as i64;
        let earliest = self.call.now.saturating_add(min);
        if due_ms < earliest {
            return Err(over(format!(
                "timers.set({key:?}): due at {}, earlier than the call's time {} plus the minimum delay of {min} ms",
                crate::event::format_ts(due_ms),
                crate::event::format_ts(self.call.now)
            )));
        }
        self.call.timers.push((key, Some(due_ms)));
        Ok(())
    }

    fn cancel(&mut self, key: String) -> wasmtime::Result<()> {
        self.call.count_op()?;
        check_key("timers.cancel", &key)?;
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
        let Some(message) = self.call.log_line(message) else {
            return Ok(());
        };
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
