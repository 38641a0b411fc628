//! A plugin's view of its host.

use serde::{de::DeserializeOwned, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// What a host provides. In WASM these are the contract's imports; in native
/// tests, [`crate::testing::TestHost`].
pub trait Host {
    fn state_get(&mut self, key: &str) -> Option<Vec<u8>>;
    fn state_set(&mut self, key: &str, value: &[u8]);
    fn state_delete(&mut self, key: &str);
    fn timer_set(&mut self, key: &str, due_ms: i64);
    fn timer_cancel(&mut self, key: &str);
    fn now_ms(&mut self) -> i64;
    fn log(&mut self, level: Level, message: &str);
}

/// Handed to every plugin call: state and timers of this plugin for the
/// customer being handled, the host clock and the log.
pub struct Ctx<'a> {
    host: &'a mut dyn Host,
}

impl<'a> Ctx<'a> {
    pub fn new(host: &'a mut dyn Host) -> Self {
        Ctx { host }
    }

    /// Reads a value stored with [`Ctx::set`]. A value that no longer decodes
    /// (its type changed between plugin versions) reads as absent.
    pub fn get<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let bytes = self.host.state_get(key)?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                self.log(
                    Level::Warn,
                    &format!("state {key:?} does not decode, ignoring it: {e}"),
                );
                None
            }
        }
    }

    pub fn set<T: Serialize>(&mut self, key: &str, value: &T) {
        match serde_json::to_vec(value) {
            Ok(bytes) => self.host.state_set(key, &bytes),
            Err(e) => self.log(Level::Error, &format!("state {key:?} does not encode: {e}")),
        }
    }

    pub fn get_raw(&mut self, key: &str) -> Option<Vec<u8>> {
        self.host.state_get(key)
    }

    pub fn set_raw(&mut self, key: &str, value: &[u8]) {
        self.host.state_set(key, value)
    }

    pub fn delete(&mut self, key: &str) {
        self.host.state_delete(key)
    }

    /// Fires `on_timer(key)` at `due_ms`, replacing a pending timer of that key.
    pub fn set_timer(&mut self, key: &str, due_ms: i64) {
        self.host.timer_set(key, due_ms)
    }

    pub fn cancel_timer(&mut self, key: &str) {
        self.host.timer_cancel(key)
    }

    /// The host's clock: event time in replay, wall-clock time live.
    pub fn now_ms(&mut self) -> i64 {
        self.host.now_ms()
    }

    pub fn log(&mut self, level: Level, message: &str) {
        self.host.log(level, message)
    }
}
