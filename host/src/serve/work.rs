//! A serve worker's loop: events from ingest through its reorder buffer
//! into the worker, and timers on its clock. One node of a cluster runs
//! [`work_slots`] instead: a reorder buffer and a timer queue per slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::tenure::Tenures;
use crate::config::Clock;
use crate::event::now_ms;
use crate::generation::{Current, Generation};
use crate::inbox::Work;
use crate::metrics::Metrics;
use crate::reorder::{Policy, Released, Reorder};
use crate::store::vshard_of;
use crate::worker::Worker;

use super::{BATCH, IDLE};

/// Decides what a reorder buffer released.
struct Decider {
    clock: Clock,
    inflight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    out: Vec<crate::worker::Decision>,
}

impl Decider {
    fn decide(&mut self, worker: &mut Worker, held: &mut Reorder, gen: &Generation, r: Released) {
        let ev = &r.work.event;
        let mark = held.decided(vshard_of(&ev.customer), r.work.seq);
        if let Some(late_ms) = r.late_ms {
            self.metrics.events_late.inc();
            tracing::warn!(message_id = %ev.message_id, customer = %ev.customer, late_ms, "event arrived late: decided on arrival");
        }
        let mut result = Ok(());
        if self.clock == Clock::Event {
            result = worker.run_timers(gen, ev.ts, &mut self.out);
        }
        let result = result
            .and_then(|_| worker.handle_event(gen, ev, Some(&mark), r.late_ms, &mut self.out));
        if let Err(e) = result {
            // Not committed: the event stays in the inbox and is decided
            // again at the next start.
            tracing::error!(message_id = %ev.message_id, customer = %ev.customer, "event not decided: {e}");
        }
        self.out.clear();
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        self.metrics.events_processed.inc();
        if let Some(at) = r.work.received {
            self.metrics
                .event_to_decision_seconds
                .observe(at.elapsed().as_secs_f64());
        }
    }
}

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
    let mut d = Decider {
        clock,
        inflight,
        metrics: metrics.clone(),
        out: Vec::new(),
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
                        d.decide(&mut worker, &mut held, &gen, late);
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
            d.decide(&mut worker, &mut held, &gen, r);
        }
        if stopping {
            // Shutdown: what is held is decided now, in order.
            for r in held.drain() {
                d.decide(&mut worker, &mut held, &gen, r);
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

/// One held slot as a worker of a cluster node sees it: the tenure it
/// works under, and the slot's reorder buffer (each slot keeps its own
/// event clock: slots are fed independently, so one slot's events must
/// not make another's look late or fire its timers early).
struct Domain {
    tenure: u64,
    held: Reorder,
}

/// A cluster node's worker: [`work`], per slot. Events of a tenure that
/// ended are dropped, as is what the slot's buffer held; the workers'
/// caches are forgotten whenever a slot arrives (the store's copy of it
/// was caught up under them).
#[allow(clippy::too_many_arguments)]
pub(super) fn work_slots(
    mut worker: Worker,
    index: usize,
    rx: Receiver<Work>,
    current: Arc<Current>,
    policy: Policy,
    tenures: Arc<Tenures>,
    inflight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let clock = policy.clock;
    let hold = policy.window.as_millis() as i64;
    let slots = tenures.slots();
    let mut d = Decider {
        clock,
        inflight: inflight.clone(),
        metrics: metrics.clone(),
        out: Vec::new(),
    };
    let mut domains: std::collections::BTreeMap<u16, Domain> = Default::default();
    let mut timer_out = Vec::new();
    let mut counted = 0;
    // A slot's domain under its current tenure, opened (with the marks of
    // what an earlier owner decided above the watermarks) if new.
    let open = |worker: &mut Worker,
                domains: &mut std::collections::BTreeMap<u16, Domain>,
                slot: u16,
                tenure: u64| {
        if domains.get(&slot).is_some_and(|dm| dm.tenure == tenure) {
            return;
        }
        let mut held = Reorder::new(policy);
        let vshards: Vec<usize> = (usize::from(slot)..crate::store::VSHARDS)
            .step_by(usize::from(slots))
            .collect();
        match worker.store().marks(&vshards) {
            Ok((_, above)) => {
                for (v, seq) in above {
                    held.restore_above(v, [seq]);
                }
            }
            Err(e) => tracing::error!(slot, "marks above the watermarks not read: {e}"),
        }
        if let Err(e) = worker.forget_cached() {
            tracing::error!("worker caches not reset: {e}");
        }
        domains.insert(slot, Domain { tenure, held });
    };
    loop {
        tenures.top(index);
        domains.retain(|slot, dm| {
            let keep = tenures.holds(*slot, dm.tenure);
            if !keep {
                // What it held is dropped: the slot's next owner reads it
                // again from above the committed watermarks.
                inflight.fetch_sub(dm.held.len(), Ordering::AcqRel);
            }
            keep
        });
        let mine: Vec<(u16, u64)> = tenures
            .held()
            .into_iter()
            .filter(|s| tenures.worker_of(*s) == index)
            .map(|s| (s, tenures.current(s)))
            .filter(|(_, t)| *t != 0)
            .collect();
        for &(slot, tenure) in &mine {
            open(&mut worker, &mut domains, slot, tenure);
        }
        let now = Instant::now();
        let wait = domains
            .values()
            .filter_map(|dm| dm.held.next_wake(now))
            .min()
            .map_or(IDLE, |w| w.min(IDLE));
        let received = rx.recv_timeout(wait);
        let gen = current.load();
        worker.begin(&gen);
        let stopping = match received {
            Ok(first) => {
                let now = Instant::now();
                for w in std::iter::once(first).chain(rx.try_iter().take(BATCH - 1)) {
                    let slot = (vshard_of(&w.event.customer) % usize::from(slots)) as u16;
                    if !tenures.holds(slot, w.tenure) {
                        inflight.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    open(&mut worker, &mut domains, slot, w.tenure);
                    let Some(dm) = domains.get_mut(&slot) else {
                        inflight.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    };
                    if let Some(late) = dm.held.push(w, now) {
                        if let Err(e) = worker.set_slot(slot) {
                            tracing::error!(slot, "slot's timers not read: {e}");
                        }
                        d.decide(&mut worker, &mut dm.held, &gen, late);
                    }
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let now = Instant::now();
        for (slot, dm) in domains.iter_mut() {
            if let Err(e) = worker.set_slot(*slot) {
                tracing::error!(slot, "slot's timers not read: {e}");
                continue;
            }
            if clock == Clock::Wall {
                if let Err(e) = worker.run_timers(&gen, now_ms() - hold, &mut timer_out) {
                    tracing::error!(slot, "timers not run: {e}");
                }
                timer_out.clear();
            }
            while let Some(r) = dm.held.pop(now) {
                d.decide(&mut worker, &mut dm.held, &gen, r);
            }
            if stopping {
                for r in dm.held.drain() {
                    d.decide(&mut worker, &mut dm.held, &gen, r);
                }
            }
        }
        let n: i64 = domains.values().map(|dm| dm.held.len() as i64).sum();
        metrics.events_held.inc_by(n - counted);
        counted = n;
        if stopping {
            return;
        }
    }
}
