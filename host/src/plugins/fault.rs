//! Why a plugin call failed, as the host counts it.

use std::time::Duration;

use super::host::OverLimit;
use super::Limits;

/// Why one plugin call produced nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("trap: {0}")]
    Trap(String),
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    #[error("memory cap exceeded: {0}")]
    Memory(String),
    #[error("plugin returned an error: {0}")]
    Returned(String),
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    /// Over a budget of the host's (bytes returned, state written, timers):
    /// charged to the plugin whose output broke it.
    #[error("over a limit: {0}")]
    Limit(String),
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Trap(_) => "trap",
            Fault::Deadline(_) => "deadline",
            Fault::Memory(_) => "memory",
            Fault::Returned(_) => "error",
            Fault::Instantiate(_) => "instantiate",
            Fault::Limit(_) => "limit",
        }
    }
}

pub(super) fn classify(e: wasmtime::Error, limits: &Limits) -> Fault {
    if let Some(over) = e.downcast_ref::<OverLimit>() {
        return Fault::Limit(over.0.clone());
    }
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return Fault::Deadline(limits.deadline);
        }
    }
    let text = format!("{e:#}");
    if text.contains("memory") && (text.contains("grow") || text.contains("limit")) {
        return Fault::Memory(text);
    }
    Fault::Trap(text)
}
