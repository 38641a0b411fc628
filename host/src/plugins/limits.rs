//! Limits every plugin call runs under.

use std::time::Duration;

/// The limits of one plugin call.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Linear memory cap per instance.
    pub memory_bytes: usize,
    /// Wall-clock deadline per call.
    pub deadline: Duration,
    /// Largest state value a plugin may store.
    pub max_state_value: usize,
    /// Most state writes, timer changes and log lines per call.
    pub max_ops_per_call: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_millis(200),
            max_state_value: 1 << 20,
            max_ops_per_call: 1000,
        }
    }
}
