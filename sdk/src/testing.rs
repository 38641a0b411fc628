//! An in-memory host, so plugin authors can unit-test their logic natively
//! with `cargo test`, exactly as the WASM build will run it.

use std::collections::BTreeMap;

use crate::{Ctx, Customer, Event, Firing, Host, Level, Trigger};

/// State, timers and log of one customer, kept in memory.
#[derive(Debug, Default)]
pub struct TestHost {
    pub now_ms: i64,
    pub state: BTreeMap<String, Vec<u8>>,
    /// Pending timers: key → due time.
    pub timers: BTreeMap<String, i64>,
    pub logs: Vec<(Level, String)>,
    /// A timer refused during the call in progress (due too soon), as the
    /// host refuses it: the call then fails.
    refused: Option<String>,
}

impl Host for TestHost {
    fn state_get(&mut self, key: &str) -> Option<Vec<u8>> {
        self.state.get(key).cloned()
    }
    fn state_set(&mut self, key: &str, value: &[u8]) {
        self.state.insert(key.to_owned(), value.to_vec());
    }
    fn state_delete(&mut self, key: &str) {
        self.state.remove(key);
    }
    fn timer_set(&mut self, key: &str, due_ms: i64) {
        if due_ms < self.now_ms.saturating_add(crate::MIN_TIMER_DELAY) {
            self.refused.get_or_insert_with(|| {
                format!(
                    "timers.set({key:?}): due at {due_ms}, earlier than the call's time {} plus the minimum delay of {} ms",
                    self.now_ms,
                    crate::MIN_TIMER_DELAY
                )
            });
            return;
        }
        self.timers.insert(key.to_owned(), due_ms);
    }
    fn timer_cancel(&mut self, key: &str) {
        self.timers.remove(key);
    }
    fn now_ms(&mut self) -> i64 {
        self.now_ms
    }
    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_owned()));
    }
}

impl TestHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the call that just ran if the host would have.
    fn check(&mut self) -> Result<(), String> {
        match self.refused.take() {
            Some(m) => Err(m),
            None => Ok(()),
        }
    }

    /// Runs the trigger on one event, first firing timers due at or before
    /// the event's time as the host would. Returns every firing, timers'
    /// first, each with the time it fired.
    pub fn event<T: Trigger>(
        &mut self,
        event: &Event,
        customer: &Customer,
    ) -> Result<Vec<(i64, Firing)>, String> {
        let mut out = self.advance::<T>(event.ts, customer)?;
        self.now_ms = event.ts;
        let firings = T::on_event(&mut Ctx::new(self), event, customer)?;
        self.check()?;
        out.extend(firings.into_iter().map(|f| (event.ts, f)));
        Ok(out)
    }

    /// Moves the clock to `now`, firing due timers in due order.
    pub fn advance<T: Trigger>(
        &mut self,
        now: i64,
        customer: &Customer,
    ) -> Result<Vec<(i64, Firing)>, String> {
        let mut out = Vec::new();
        while let Some((key, due)) = self
            .timers
            .iter()
            .filter(|(_, due)| **due <= now)
            .min_by_key(|(k, due)| (**due, (*k).clone()))
            .map(|(k, d)| (k.clone(), *d))
        {
            self.timers.remove(&key);
            self.now_ms = due;
            let firings = T::on_timer(&mut Ctx::new(self), &key, customer)?;
            self.check()?;
            out.extend(firings.into_iter().map(|f| (due, f)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventKind, Fields, TriggerInfo};

    /// Re-arms its timer at its own due time, for ever if let.
    struct Loop;

    impl Trigger for Loop {
        fn info() -> TriggerInfo {
            TriggerInfo::new("loop", "0.1.0")
        }
        fn on_event(ctx: &mut Ctx, ev: &Event, _c: &Customer) -> Result<Vec<Firing>, String> {
            ctx.set_timer("t", ev.ts + crate::MINUTE);
            Ok(vec![])
        }
        fn on_timer(ctx: &mut Ctx, key: &str, _c: &Customer) -> Result<Vec<Firing>, String> {
            let now = ctx.now_ms();
            ctx.set_timer(key, now);
            Ok(vec![Firing::new("x")])
        }
    }

    #[test]
    fn a_timer_due_too_soon_fails_the_call_as_the_host_does() {
        let mut host = TestHost::new();
        let c = Customer {
            id: "c".into(),
            traits: Fields::new(),
        };
        let ev = Event {
            message_id: "m".into(),
            customer_id: "c".into(),
            kind: EventKind::Track,
            name: "E".into(),
            ts: 0,
            properties: Fields::new(),
            traits: Fields::new(),
        };
        host.event::<Loop>(&ev, &c).unwrap();
        let e = host.advance::<Loop>(crate::HOUR, &c).unwrap_err();
        assert!(e.contains("minimum delay"), "{e}");
        assert!(host.timers.is_empty(), "the loop ended");
    }
}
