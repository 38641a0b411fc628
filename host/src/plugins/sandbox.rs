//! The WASI a plugin gets: clocks stopped at zero, and nothing else it
//! could use to reach the world.

use std::time::Duration;

/// Wall and monotonic clocks stopped at zero: plugins read time only
/// through the `clock` import, so replay is deterministic.
pub(super) struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}
