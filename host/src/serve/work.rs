//! A serve worker's loop: events from ingest through its reorder buffer
//! into the worker, and timers on its clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Clock;
use crate::event::now_ms;
use crate::generation::{Current, Generation};
use crate::inbox::Work;
use crate::metrics::Metrics;
use crate::reorder::{Released, Reorder};
use crate::store::vshard_of;
use crate::worker::Worker;

use super::{BATCH, IDLE};

/// One worker's loop: takes what ingest accepted into its reorder buffer,
/// decides what the buffer releases, and runs timers on its clock.
pub(super) fn work(
    mut worker: Worker,
    rx: Receiver<Work>,
    current: Arc<Current>,
    clock: Clock,
    mut held: Reorder,
    inflight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let mut out = Vec::new();
    let mut decide = |worker: &mut Worker, held: &mut Reorder, gen: &Generation, r: Released| {
        let ev = &r.work.event;
        let mark = held.decided(vshard_of(&ev.customer), r.work.seq);
        if let Some(late_ms) = r.late_ms {
            metrics.events_late.inc();
            tracing::warn!(message_id = %ev.message_id, customer = %ev.customer, late_ms, "event arrived late: decided on arrival");
        }
        let mut result = Ok(());
        if clock == Clock::Event {
            result = worker.run_timers(gen, ev.ts, &mut out);
        }
        let result =
            result.and_then(|_| worker.handle_event(gen, ev, Some(&mark), r.late_ms, &mut out));
        if let Err(e) = result {
            // Not committed: the event stays in the inbox and is decided
            // again at the next start.
            tracing::error!(message_id = %ev.message_id, customer = %ev.customer, "event not decided: {e}");
        }
        out.clear();
        inflight.fetch_sub(1, Ordering::AcqRel);
        metrics.events_processed.inc();
        if let Some(at) = r.work.received {
            metrics
                .event_to_decision_seconds
                .observe(at.elapsed().as_secs_f64());
        }
    };
    let mut timer_out = Vec::new();
    let mut counted = 0;
    // Wall clock: timers run at now less the window, so a timer never
    // fires ahead of an event that was sent before it fell due and is
    // still held.
    let hold = held.window().as_millis() as i64;
    let timer_clock = || now_ms() - hold;
    loop {
        let mut wait = match (clock, worker.next_due()) {
            (Clock::Wall, Some(due)) => {
                Duration::from_millis((due - timer_clock()).clamp(0, IDLE.as_millis() as i64) as u64)
            }
            _ => IDLE,
        };
        if let Some(w) = held.next_wake(Instant::now()) {
            wait = wait.min(w);
        }
        let received = rx.recv_timeout(wait);
        // Loaded after the wait: an event that arrives after a swap is
        // decided by the new generation.
        let gen = current.load();
        worker.begin(&gen);
        let stopping = match received {
            Ok(first) => {
                // Whatever else is queued goes in the same pass: one
                // generation load and one timer check per pass, not per
                // event.
                let now = Instant::now();
                for w in std::iter::once(first).chain(rx.try_iter().take(BATCH - 1)) {
                    if let Some(late) = held.push(w, now) {
                        decide(&mut worker, &mut held, &gen, late);
                    }
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if clock == Clock::Wall {
            if let Err(e) = worker.run_timers(&gen, timer_clock(), &mut timer_out) {
                tracing::error!("timers not run: {e}");
            }
            timer_out.clear();
        }
        let now = Instant::now();
        while let Some(r) = held.pop(now) {
            decide(&mut worker, &mut held, &gen, r);
        }
        if stopping {
            // Shutdown: what is held is decided now, in order.
            for r in held.drain() {
                decide(&mut worker, &mut held, &gen, r);
            }
        }
        let n = held.len() as i64;
        metrics.events_held.inc_by(n - counted);
        counted = n;
        if stopping {
            return;
        }
    }
}
