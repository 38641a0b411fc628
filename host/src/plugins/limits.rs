//! The limits of one plugin call, and of what a plugin may keep.
//!
//! Every limit has a default here, an operator setting in `nudge.toml`
//! (`[limits]`), and where it makes sense a per-plugin setting in the
//! plugin's manifest (`[limits]`), which may lower the operator's value
//! but never raise it (see [`Limits::for_plugin`]).

use std::time::Duration;

use crate::manifest::ManifestLimits;

/// The limits of one plugin call.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Linear memory cap per instance.
    pub memory_bytes: usize,
    /// Wall-clock deadline per call (the plugin's own time: time blocked in
    /// host imports is not counted).
    pub deadline: Duration,
    /// Largest state value a plugin may store.
    pub max_state_value: usize,
    /// Most state writes, timer changes and log lines per call.
    pub max_ops_per_call: usize,
    /// Most bytes of state (keys and values) one call may write.
    pub max_state_write: usize,
    /// Most bytes of state one plugin may keep for one customer.
    pub state_quota: usize,
    /// Most bytes one call may return (firings, a treatment, messages).
    pub max_output: usize,
    /// Most bytes one call may log, through `log` and through stdout and
    /// stderr together; the rest is dropped and counted.
    pub max_log_bytes: usize,
    /// Longest log line; longer ones are cut with a marker.
    pub max_log_line: usize,
    /// A timer must fall due at least this long after the call's time.
    pub min_timer_delay: Duration,
    /// Most timer firings per plugin and customer each time the clock
    /// advances; past it the timer is dropped and counted as a fault.
    pub max_timer_firings: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_millis(200),
            max_state_value: 1 << 20,
            max_ops_per_call: 1000,
            max_state_write: 4 << 20,
            state_quota: 8 << 20,
            max_output: 1 << 20,
            max_log_bytes: 64 << 10,
            max_log_line: 4 << 10,
            min_timer_delay: Duration::from_secs(1),
            max_timer_firings: 100,
        }
    }
}

impl Limits {
    /// These limits, lowered where the plugin's manifest asks for less.
    pub fn for_plugin(&self, m: &ManifestLimits) -> Limits {
        let low = |op: usize, asked: Option<usize>, unit: usize| {
            asked.map_or(op, |a| op.min(a.saturating_mul(unit)))
        };
        Limits {
            memory_bytes: low(self.memory_bytes, m.memory_mib, 1 << 20),
            deadline: m.deadline.map_or(self.deadline, |ms| {
                self.deadline.min(Duration::from_millis(ms))
            }),
            max_state_value: low(self.max_state_value, m.max_state_value_kib, 1 << 10),
            max_state_write: low(self.max_state_write, m.max_state_write_kib, 1 << 10),
            state_quota: low(self.state_quota, m.state_quota_kib, 1 << 10),
            max_output: low(self.max_output, m.max_output_kib, 1 << 10),
            max_log_bytes: low(self.max_log_bytes, m.max_log_kib, 1 << 10),
            max_ops_per_call: low(self.max_ops_per_call, m.max_ops_per_call, 1),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_lowers_limits_and_never_raises_them() {
        let op = Limits::default();
        let m = ManifestLimits {
            memory_mib: Some(16),
            deadline: Some(10_000),
            state_quota_kib: Some(64),
            max_log_kib: Some(1 << 20),
            ..ManifestLimits::default()
        };
        let l = op.for_plugin(&m);
        assert_eq!(l.memory_bytes, 16 << 20);
        assert_eq!(
            l.deadline, op.deadline,
            "10 s asked, the operator's 200 ms stands"
        );
        assert_eq!(l.state_quota, 64 << 10);
        assert_eq!(l.max_log_bytes, op.max_log_bytes);
        assert_eq!(l.max_output, op.max_output);
        assert_eq!(op.for_plugin(&ManifestLimits::default()), op);
    }
}
