//! One event's way through the house: due timers first, then traits, trigger
//! plugins, campaign conditions, the decision pipeline, and one atomic commit
//! of everything the event changed.
//!
//! The same worker serves replay (clock = event time) and the live server
//! (clock = wall time): only the clock and the source of events differ.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::controls::{Controls, View};
use crate::decide::{self, Candidate, Outcome};
use crate::deliver::Delivery;
use crate::event::{format_ts, Event, Kind};
use crate::generation::{Generation, IDENTIFY};
use crate::ledger::{Ledger, MATURITY};
use crate::metrics::Metrics;
use crate::plugins::{
    Action, Call, CallInput, Effects, Fault, Firing, Instances, Plugin, Recipient, Runtime,
    Treatment,
};
use crate::reorder::InboxMark;
use crate::rules::{EvalScope, Facts};
use crate::store::{Changes, DueTimer, History, Store, StoreError, Timer};

/// One decision, as written to the decision log and the output file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub ts: i64,
    pub customer: String,
    pub campaign: String,
    pub outcome: Outcome,
    pub channel: String,
    /// `messageId` of the triggering event.
    pub trigger: String,
    /// Live server: the triggering event arrived this late (milliseconds
    /// behind what was already decided; see `reorder`).
    pub late_ms: Option<i64>,
}

/// The output shape, fields in the order of SPEC §4.
#[derive(Serialize)]
struct DecisionLine<'a> {
    ts: String,
    customer: &'a str,
    campaign: &'a str,
    outcome: &'static str,
    channel: &'a str,
    trigger: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    late_ms: Option<i64>,
}

/// A decision as the customer's timeline keeps it: the output line's
/// fields and why it came out so.
#[derive(Serialize)]
struct Explained<'a> {
    ts: String,
    campaign: &'a str,
    outcome: &'static str,
    channel: &'a str,
    trigger: &'a str,
    /// One line for people.
    reason: String,
    why: &'a decide::Why,
}

impl Decision {
    /// The decision with its explanation, as `GET /v1/customers/{id}`
    /// shows it.
    pub fn explained(&self, why: &decide::Why) -> Vec<u8> {
        serde_json::to_vec(&Explained {
            ts: format_ts(self.ts),
            campaign: &self.campaign,
            outcome: self.outcome.as_str(),
            channel: &self.channel,
            trigger: &self.trigger,
            reason: format!("{}: {}", self.outcome.as_str(), why.describe(self.ts)),
            why,
        })
        .unwrap_or_default()
    }

    /// Compact JSON, non-ASCII as itself.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&DecisionLine {
            ts: format_ts(self.ts),
            customer: &self.customer,
            campaign: &self.campaign,
            outcome: self.outcome.as_str(),
            channel: &self.channel,
            trigger: &self.trigger,
            late_ms: self.late_ms,
        })
        .unwrap_or_default()
    }
}

fn text_trait(traits: &Map<String, Value>, key: &str) -> Option<String> {
    traits
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A plugin call that produced nothing, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    pub plugin: String,
    pub version: String,
    /// `messageId` of the event (for a timer, of the event that set it).
    pub event: String,
    pub customer: String,
    pub fault: Fault,
}

/// One firing of a trigger plugin, as `nudge plugin test` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FiringRecord {
    pub ts: String,
    pub customer: String,
    pub plugin: String,
    pub firing: String,
    pub data: Map<String, Value>,
    /// `messageId` of the event, or `timer:KEY` for a timer.
    pub cause: String,
}

/// Counters of what the worker did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub timers_fired: u64,
    /// Timers fired more than [`LATE_MS`] after they fell due (live only).
    pub timers_late: u64,
    pub decisions: u64,
    /// (plugin, fault kind) → count.
    pub faults: BTreeMap<(String, &'static str), u64>,
    /// The first faults in full (at most [`Stats::KEEP_FAULTS`]).
    pub fault_log: Vec<FaultRecord>,
    /// Rule conditions or priorities that failed to evaluate.
    pub rule_errors: u64,
    /// Campaign → [reached by a firing or event, `when` true]: the top of
    /// its funnel.
    pub funnel: BTreeMap<String, [u64; 2]>,
}

impl Stats {
    pub const KEEP_FAULTS: usize = 1000;

    /// Adds another worker's counts.
    pub fn merge(&mut self, other: Stats) {
        self.events += other.events;
        self.timers_fired += other.timers_fired;
        self.timers_late += other.timers_late;
        self.decisions += other.decisions;
        self.rule_errors += other.rule_errors;
        for (k, [f, q]) in other.funnel {
            let e = self.funnel.entry(k).or_default();
            e[0] += f;
            e[1] += q;
        }
        for (k, n) in other.faults {
            *self.faults.entry(k).or_default() += n;
        }
        let room = Self::KEEP_FAULTS.saturating_sub(self.fault_log.len());
        self.fault_log
            .extend(other.fault_log.into_iter().take(room));
    }
}

/// A timer fired this much after it fell due counts as late.
pub const LATE_MS: i64 = 1000;

/// How long a due timer of a quarantined plugin is put off each time.
const QUARANTINE_HOLD_MS: i64 = 60_000;

/// Decoded traits of a shard's customers, up to a byte budget (its share
/// of [`crate::store::Budget::traits_cache`]); starts over when full.
struct TraitsCache {
    map: HashMap<String, Arc<Map<String, Value>>>,
    bytes: usize,
    budget: usize,
}

/// About what a decoded JSON value holds in memory: its text plus the
/// headers of the strings, vectors and map nodes that own it.
fn approx_bytes(v: &Value) -> usize {
    48 + match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(approx_bytes).sum(),
        Value::Object(o) => map_bytes(o),
        _ => 0,
    }
}

fn map_bytes(m: &Map<String, Value>) -> usize {
    m.iter().map(|(k, v)| 24 + k.len() + approx_bytes(v)).sum()
}

impl TraitsCache {
    fn new(budget: usize) -> TraitsCache {
        TraitsCache {
            map: HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    fn get(&self, customer: &str) -> Option<&Arc<Map<String, Value>>> {
        self.map.get(customer)
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    fn insert(&mut self, customer: &str, traits: Arc<Map<String, Value>>) {
        let cost = 64 + customer.len() + map_bytes(&traits);
        if self.bytes + cost > self.budget {
            // Crude but cheap; the store's read cache still has the bytes.
            self.map.clear();
            self.bytes = 0;
        }
        // A replaced entry's bytes stay counted until the next start-over:
        // an overestimate, never an overrun.
        self.bytes += cost;
        self.map.insert(customer.to_owned(), traits);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Processes the events of the customers of its shard, in order. Each
/// customer belongs to exactly one worker ([`crate::store::shard_of`]), so
/// workers never touch each other's customers and need no coordination.
pub struct Worker {
    store: Store,
    shard: usize,
    instances: Instances,
    /// Decoded traits of this shard's customers; the worker is their only
    /// writer, so the cache never goes stale.
    traits: TraitsCache,
    /// Earliest pending timer (a lower bound: it may have been cancelled).
    next_due: Option<i64>,
    /// Other timer queues' earliest timers, while the worker works on
    /// another ([`Worker::set_slot`]).
    parked_dues: HashMap<usize, Option<i64>>,
    pub stats: Stats,
    /// Live server: `sent` decisions get a pre-thought treatment and an
    /// outbox entry, and late timers are marked.
    pub live: bool,
    /// Wall-clock timers: one that fires more than [`LATE_MS`] after it
    /// fell due is marked late.
    pub mark_late: bool,
    pub metrics: Option<Arc<Metrics>>,
    /// How late the timer being handled fired (live only).
    late_ms: Option<i64>,
    /// How late the event being handled arrived (live only).
    event_late_ms: Option<i64>,
    /// Paused campaigns and quarantined plugins; faults are reported here.
    pub controls: Option<Arc<Controls>>,
    /// A cluster node: message ids are remembered with the events' effects
    /// (past JetStream's own two-minute window), and a repeat is not
    /// decided again.
    pub dedupe: bool,
    /// The controls as of this batch.
    view: Arc<View>,
    /// The generation of the last batch: when it changes, instances of
    /// plugins it no longer has are dropped.
    gen_number: u64,
    /// When set, every firing is recorded here (`nudge plugin test`).
    pub firings: Option<Vec<FiringRecord>>,
    /// The measurement's tallies and units (`None`: not kept, for
    /// measuring what keeping them costs).
    pub ledger: Option<Ledger>,
}

/// One firing's worth of qualified campaigns.
struct Qualified {
    campaign: usize,
    priority: i64,
    /// What fired it, for the response plugin.
    firing: Arc<Firing>,
}

impl Worker {
    /// The worker of `shard` (use 0 with a store opened unsharded).
    pub fn new(store: Store, runtime: Arc<Runtime>, shard: usize) -> Result<Worker, WorkerError> {
        let next_due = store.first_timer(shard)?.map(|t| t.due);
        let traits = TraitsCache::new(store.budget().traits_cache() / store.shards());
        Ok(Worker {
            store,
            shard,
            instances: Instances::new(runtime),
            traits,
            next_due,
            parked_dues: HashMap::new(),
            stats: Stats::default(),
            live: false,
            mark_late: false,
            metrics: None,
            late_ms: None,
            event_late_ms: None,
            controls: None,
            dedupe: false,
            view: Arc::new(View::default()),
            gen_number: 0,
            firings: None,
            ledger: Some(Ledger::new(crate::ledger::writer_of(shard))),
        })
    }

    /// Called before each batch of events: takes the operator controls as
    /// they are now, and after a generation change drops instances of
    /// plugins no longer in it.
    pub fn begin(&mut self, gen: &Generation) {
        if let Some(c) = &self.controls {
            self.view = c.view();
        }
        if gen.number != self.gen_number {
            self.gen_number = gen.number;
            self.instances.retain(gen.plugins.iter());
        }
    }

    /// Works on cluster slot `slot` from now on: its timer queue (the
    /// store of a cluster node has one queue per slot) and its tallies.
    /// Call between events only.
    pub fn set_slot(&mut self, slot: u16) -> Result<(), WorkerError> {
        let q = usize::from(slot);
        if let Some(l) = &mut self.ledger {
            l.set_writer(slot);
        }
        if q == self.shard {
            return Ok(());
        }
        let due = match self.parked_dues.remove(&q) {
            Some(d) => d,
            None => self.store.first_timer(q)?.map(|t| t.due),
        };
        self.parked_dues
            .insert(self.shard, std::mem::replace(&mut self.next_due, due));
        self.shard = q;
        Ok(())
    }

    /// Forgets what the worker holds of the store's state (its slots were
    /// taken or given up, and the store's copy changed under it).
    pub fn forget_cached(&mut self) -> Result<(), WorkerError> {
        self.traits.clear();
        if let Some(l) = &mut self.ledger {
            l.forget();
        }
        self.parked_dues.clear();
        self.next_due = self.store.first_timer(self.shard)?.map(|t| t.due);
        Ok(())
    }

    /// The share of the traits cache this worker may use, of `workers`.
    pub fn share_traits(&mut self, workers: usize) {
        self.traits = TraitsCache::new(self.store.budget().traits_cache() / workers.max(1));
    }

    /// The earliest pending timer of this shard (a lower bound).
    pub fn next_due(&self) -> Option<i64> {
        self.next_due
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Commits one event's or timer's changes with the tallies they moved.
    fn commit(&mut self, mut changes: Changes) {
        if let Some(l) = &mut self.ledger {
            l.flush(&mut changes);
        }
        self.store.commit(changes);
    }

    /// After an error the changes being built are dropped: so are the
    /// tallies' uncommitted counts.
    fn abandon<T>(&mut self, r: Result<T, WorkerError>) -> Result<T, WorkerError> {
        if r.is_err() {
            if let Some(l) = &mut self.ledger {
                l.discard();
            }
        }
        r
    }

    /// Fires due timers, then processes `ev`. Decisions are appended to `out`.
    pub fn handle(
        &mut self,
        gen: &Generation,
        ev: &Event,
        out: &mut Vec<Decision>,
    ) -> Result<(), WorkerError> {
        self.run_timers(gen, ev.ts, out)?;
        self.handle_event(gen, ev, None, None, out)
    }

    /// Fires every timer due at or before `now`, in (due, customer) order.
    ///
    /// A plugin may fire at most `max_timer_firings` timers per customer
    /// in one advance of the clock: a timer that keeps re-arming itself
    /// (each time at least the minimum delay later) is dropped past that,
    /// and the plugin charged with a fault, so the clock always gets to
    /// `now`.
    pub fn run_timers(
        &mut self,
        gen: &Generation,
        now: i64,
        out: &mut Vec<Decision>,
    ) -> Result<(), WorkerError> {
        let cap = self.instances.limits().max_timer_firings;
        let mut fired: HashMap<(String, String), usize> = HashMap::new();
        while self.next_due.is_some_and(|d| d <= now) {
            match self.store.first_timer(self.shard)? {
                Some(t) if t.due <= now && t.plugin == MATURITY => {
                    let r = self.mature(&t);
                    self.abandon(r)?;
                }
                Some(t) if t.due <= now => {
                    let n = fired
                        .entry((t.customer.clone(), t.plugin.clone()))
                        .or_default();
                    *n += 1;
                    if *n > cap {
                        self.drop_looping_timer(gen, t, cap);
                    } else {
                        let r = self.fire_timer(gen, t, now, out);
                        self.abandon(r)?;
                    }
                }
                next => {
                    self.next_due = next.map(|t| t.due);
                    break;
                }
            }
        }
        Ok(())
    }

    /// A decision's goal window closed: it enters the measurement.
    fn mature(&mut self, t: &DueTimer) -> Result<(), WorkerError> {
        let mut changes = Changes::new();
        match &mut self.ledger {
            Some(l) => match l.mature(&self.store, &mut changes, t) {
                Ok(()) => {}
                // An unreadable unit or tally must not stop this shard's
                // timers for good: the decision is left out of the
                // measurement, and the timer is used up.
                Err(e @ StoreError::Corrupt { .. }) => {
                    l.discard();
                    tracing::error!(customer = %t.customer, key = %t.key, "{e}: a maturity left out of the measurement");
                    changes = Changes::new();
                    changes.host_timer(t.due, &t.customer, &t.key, None);
                }
                Err(e) => return Err(e.into()),
            },
            None => changes.host_timer(t.due, &t.customer, &t.key, None),
        }
        self.commit(changes);
        Ok(())
    }

    /// Deletes a timer that fired too often in one advance of the clock,
    /// and charges its plugin.
    fn drop_looping_timer(&mut self, gen: &Generation, t: DueTimer, cap: usize) {
        let mut changes = Changes::new();
        let fired = Timer {
            due: t.due,
            trigger: t.trigger.clone(),
        };
        changes.timer(&t.customer, &t.plugin, &t.key, Some(&fired), None);
        self.commit(changes);
        if let Some(plugin) = gen.plugin_index(&t.plugin).map(|i| &gen.plugins[i]) {
            let fault = Fault::Limit(format!(
                "timer {:?} fired more than {cap} times for one customer before the clock reached {}: dropped",
                t.key,
                format_ts(t.due)
            ));
            self.fault(plugin, &t.trigger, &t.customer, fault);
        }
    }

    fn fault(&mut self, p: &Plugin, event: &str, customer: &str, fault: Fault) {
        let (plugin, version) = (p.name.as_str(), p.version.as_str());
        if let Some(c) = &self.controls {
            if c.fault(p, &fault, &format!("{} on {event}: {fault}", fault.kind())) {
                self.view = c.view();
            }
        }
        tracing::warn!(
            plugin,
            version,
            event,
            customer,
            "plugin call failed: {fault}"
        );
        *self
            .stats
            .faults
            .entry((plugin.to_owned(), fault.kind()))
            .or_default() += 1;
        if let Some(m) = &self.metrics {
            m.plugin_fault(plugin, fault.kind());
        }
        if self.stats.fault_log.len() < Stats::KEEP_FAULTS {
            self.stats.fault_log.push(FaultRecord {
                plugin: plugin.to_owned(),
                version: version.to_owned(),
                event: event.to_owned(),
                customer: customer.to_owned(),
                fault,
            });
        }
    }

    fn record_firings(
        &mut self,
        plugin: &str,
        customer: &str,
        ts: i64,
        cause: &str,
        firings: &[Firing],
    ) {
        if let Some(log) = &mut self.firings {
            log.extend(firings.iter().map(|f| FiringRecord {
                ts: format_ts(ts),
                customer: customer.to_owned(),
                plugin: plugin.to_owned(),
                firing: f.name.clone(),
                data: f.data.clone(),
                cause: cause.to_owned(),
            }));
        }
    }

    /// The customer's traits, from the cache or the store.
    fn traits(&mut self, customer: &str) -> Result<Arc<Map<String, Value>>, WorkerError> {
        if let Some(t) = self.traits.get(customer) {
            return Ok(t.clone());
        }
        let t = Arc::new(self.store.traits(customer)?);
        self.traits.insert(customer, t.clone());
        Ok(t)
    }

    /// Adds a successful call's state and timer changes to `changes`.
    fn apply(
        &mut self,
        changes: &mut Changes,
        customer: &str,
        plugin: &str,
        trigger: &str,
        fx: Effects,
    ) -> Result<(), WorkerError> {
        if let Some(record) = fx.record {
            let edits = fx.state.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
            changes.plugin_state(customer, plugin, record, edits);
        }
        // The last change of each key is what stands.
        let mut timers: BTreeMap<&str, Option<i64>> = BTreeMap::new();
        for (key, due) in &fx.timers {
            timers.insert(key, *due);
        }
        for (key, due) in timers {
            let old = self.store.timer(customer, plugin, key)?;
            let new = due.map(|due| Timer {
                due,
                trigger: trigger.to_owned(),
            });
            if old.is_none() && new.is_none() {
                continue;
            }
            changes.timer(customer, plugin, key, old.as_ref(), new.as_ref());
            if let Some(d) = due {
                self.next_due = Some(self.next_due.map_or(d, |n| n.min(d)));
            }
        }
        Ok(())
    }

    fn fire_timer(
        &mut self,
        gen: &Generation,
        t: DueTimer,
        now: i64,
        out: &mut Vec<Decision>,
    ) -> Result<(), WorkerError> {
        self.stats.timers_fired += 1;
        self.late_ms = None;
        if let Some(m) = &self.metrics {
            m.timers_fired.inc();
        }
        if self.mark_late && now - t.due > LATE_MS {
            // Fell due while the server was down or overloaded: fire it now
            // and say so, rather than drop it.
            self.stats.timers_late += 1;
            self.late_ms = Some(now - t.due);
            if let Some(m) = &self.metrics {
                m.timers_late.inc();
            }
            tracing::warn!(customer = %t.customer, plugin = %t.plugin, key = %t.key, late_ms = now - t.due, "timer fired late");
        }
        let mut changes = Changes::new();
        let fired = Timer {
            due: t.due,
            trigger: t.trigger.clone(),
        };
        changes.timer(&t.customer, &t.plugin, &t.key, Some(&fired), None);
        let Some((pi, plugin)) = gen.plugin_index(&t.plugin).map(|i| (i, &gen.plugins[i])) else {
            tracing::warn!(plugin = %t.plugin, customer = %t.customer, "timer of a plugin no longer loaded: dropped");
            self.commit(changes);
            return Ok(());
        };
        if self.view.plugin_quarantined(plugin) {
            // Postponed, not dropped: it fires once the plugin is released
            // or a fixed version is published.
            let later = Timer {
                due: now + QUARANTINE_HOLD_MS,
                trigger: t.trigger.clone(),
            };
            let mut changes = Changes::new();
            changes.timer(&t.customer, &t.plugin, &t.key, Some(&fired), Some(&later));
            self.next_due = Some(self.next_due.map_or(later.due, |n| n.min(later.due)));
            self.commit(changes);
            return Ok(());
        }
        let traits = self.traits(&t.customer)?;
        let input = CallInput::new(None, &t.customer, &traits);
        let call = Call::new(&plugin.name, &t.customer, t.due, Some(self.store.clone()));
        let mut qualified = Vec::new();
        let started = std::time::Instant::now();
        let result = self.instances.on_timer(plugin, call, &t.key, &input);
        if let Some(m) = &self.metrics {
            m.plugin_call(&plugin.name, started.elapsed());
        }
        match result {
            Ok((firings, fx)) => {
                self.apply(&mut changes, &t.customer, &plugin.name, &t.trigger, fx)?;
                if self.firings.is_some() {
                    let cause = format!("timer:{}", t.key);
                    self.record_firings(&plugin.name, &t.customer, t.due, &cause, &firings);
                }
                for f in firings {
                    let campaigns = gen.campaigns_for_firing(pi, &f.name);
                    self.qualify(
                        gen,
                        campaigns,
                        Arc::new(f),
                        None,
                        &t.customer,
                        t.due,
                        &traits,
                        &mut qualified,
                    )?;
                }
            }
            Err(fault) => self.fault(plugin, &t.trigger, &t.customer, fault),
        }
        self.decide(
            gen,
            &t.customer,
            t.due,
            &t.trigger,
            &traits,
            qualified,
            None,
            &mut changes,
            out,
        )?;
        self.late_ms = None;
        self.commit(changes);
        Ok(())
    }

    /// Processes `ev` without firing timers first (the caller runs them on
    /// its clock). `inbox`: where the event's inbox shard stands once it is
    /// decided, committed with its effects. `late_ms`: the event arrived
    /// late, by this much (marked on its decisions).
    pub fn handle_event(
        &mut self,
        gen: &Generation,
        ev: &Event,
        inbox: Option<&InboxMark>,
        late_ms: Option<i64>,
        out: &mut Vec<Decision>,
    ) -> Result<(), WorkerError> {
        let r = self.decide_event(gen, ev, inbox, late_ms, out);
        self.abandon(r)
    }

    fn decide_event(
        &mut self,
        gen: &Generation,
        ev: &Event,
        inbox: Option<&InboxMark>,
        late_ms: Option<i64>,
        out: &mut Vec<Decision>,
    ) -> Result<(), WorkerError> {
        self.stats.events += 1;
        self.event_late_ms = late_ms;
        let mut changes = Changes::new();
        if let Some(m) = inbox {
            if let Some(w) = m.watermark {
                changes.inbox_watermark(m.vshard, w);
            }
            if let Some(seq) = m.above {
                changes.inbox_above(m.vshard, seq, false);
            }
            for &seq in &m.forget {
                changes.inbox_above(m.vshard, seq, true);
            }
            if self.dedupe {
                if self.store.message_seen(m.vshard, &ev.message_id)? {
                    // Sent again after JetStream forgot its id: only the
                    // inbox mark moves.
                    self.commit(changes);
                    if let Some(mx) = &self.metrics {
                        mx.events_duplicate.inc();
                    }
                    return Ok(());
                }
                changes.message_seen(m.vshard, &ev.message_id, crate::event::now_ms());
            }
        }
        let key = match ev.kind {
            Kind::Identify => {
                // Shallow merge: each key carried replaces the old value.
                let mut traits = (*self.traits(&ev.customer)?).clone();
                for (k, v) in &ev.traits {
                    traits.insert(k.clone(), v.clone());
                }
                changes.set_traits(&ev.customer, &traits);
                self.traits.insert(&ev.customer, Arc::new(traits));
                IDENTIFY
            }
            Kind::Track => ev.name.as_str(),
        };
        // A goal event converts the customer's open decisions first: a
        // decision this event makes cannot be converted by it.
        let mut history = None;
        if ev.kind == Kind::Track && gen.is_goal(&ev.name) {
            let mut h = self.store.history(&ev.customer)?;
            if let Some(converted) = decide::convert(&mut h, &ev.name, ev.ts) {
                changes.set_history(&ev.customer, &h);
                for o in converted {
                    let value = self.goal_value(gen, &o.campaign, ev)?;
                    changes.conversion(o.ts, &ev.customer, &o.campaign, ev.ts, value);
                    if let Some(l) = &mut self.ledger {
                        l.converted(
                            &self.store,
                            &mut changes,
                            &ev.customer,
                            &o.campaign,
                            o.ts,
                            o.until,
                            ev.ts,
                            value,
                        )?;
                    }
                }
            }
            history = Some(h);
        }
        let subs = gen.subscribers(key);
        let direct = gen.campaigns_for_event(key);
        if subs.is_empty() && direct.is_empty() {
            // Nothing listens: no need to read the customer at all.
            self.commit(changes);
            return Ok(());
        }
        let traits = self.traits(&ev.customer)?;
        let mut qualified = Vec::new();
        if !subs.is_empty() {
            let input = CallInput::new(Some(ev), &ev.customer, &traits);
            for &pi in subs {
                let plugin = &gen.plugins[pi];
                if self.view.plugin_quarantined(plugin) {
                    continue;
                }
                let call = Call::new(&plugin.name, &ev.customer, ev.ts, Some(self.store.clone()));
                let started = std::time::Instant::now();
                let result = self.instances.on_event(plugin, call, &input);
                if let Some(m) = &self.metrics {
                    m.plugin_call(&plugin.name, started.elapsed());
                }
                match result {
                    Ok((firings, fx)) => {
                        self.apply(&mut changes, &ev.customer, &plugin.name, &ev.message_id, fx)?;
                        self.record_firings(
                            &plugin.name,
                            &ev.customer,
                            ev.ts,
                            &ev.message_id,
                            &firings,
                        );
                        for f in firings {
                            let campaigns = gen.campaigns_for_firing(pi, &f.name);
                            self.qualify(
                                gen,
                                campaigns,
                                Arc::new(f),
                                Some(ev),
                                &ev.customer,
                                ev.ts,
                                &traits,
                                &mut qualified,
                            )?;
                        }
                    }
                    Err(fault) => self.fault(plugin, &ev.message_id, &ev.customer, fault),
                }
            }
        }
        if !direct.is_empty() {
            let none = Firing {
                name: String::new(),
                data: Map::new(),
            };
            self.qualify(
                gen,
                direct,
                Arc::new(none),
                Some(ev),
                &ev.customer,
                ev.ts,
                &traits,
                &mut qualified,
            )?;
        }
        self.decide(
            gen,
            &ev.customer,
            ev.ts,
            &ev.message_id,
            &traits,
            qualified,
            history,
            &mut changes,
            out,
        )?;
        self.commit(changes);
        Ok(())
    }

    /// What goal event `ev` is worth to `campaign` (micro-units). A value
    /// that does not evaluate counts as a rule error and as 0.
    fn goal_value(
        &mut self,
        gen: &Generation,
        campaign: &str,
        ev: &Event,
    ) -> Result<i64, WorkerError> {
        let Some(c) = gen.rules.campaign(campaign) else {
            return Ok(0);
        };
        if c.goal.as_ref().is_none_or(|g| g.value.is_none()) {
            return Ok(0);
        }
        let traits = self.traits(&ev.customer)?;
        let firing = Map::new();
        let mut scope = EvalScope::new(&Facts {
            customer: &ev.customer,
            now: ev.ts,
            event: Some(ev),
            traits: &traits,
            firing: &firing,
        });
        match gen.rules.goal_value(c, &mut scope) {
            Ok(v) => Ok(crate::stats::micros(v)),
            Err(e) => {
                self.stats.rule_errors += 1;
                if let Some(m) = &self.metrics {
                    m.rule_error(&c.id);
                }
                tracing::warn!(campaign = %c.id, customer = %ev.customer, "goal value did not evaluate: {e}");
                Ok(0)
            }
        }
    }

    /// Evaluates `when` and `priority` of `campaigns` for one firing.
    #[allow(clippy::too_many_arguments)]
    fn qualify(
        &mut self,
        gen: &Generation,
        campaigns: &[usize],
        firing: Arc<Firing>,
        event: Option<&Event>,
        customer: &str,
        now: i64,
        traits: &Map<String, Value>,
        out: &mut Vec<Qualified>,
    ) -> Result<(), WorkerError> {
        if campaigns.is_empty() {
            return Ok(());
        }
        let mut scope = EvalScope::new(&Facts {
            customer,
            now,
            event,
            traits,
            firing: &firing.data,
        });
        for &ci in campaigns {
            // A campaign gets one decision per firing, however many of its
            // signals arrived.
            if out.iter().any(|q| q.campaign == ci) {
                continue;
            }
            let c = gen.campaign(ci);
            if self.view.blocked(gen, c).is_some() {
                continue;
            }
            let result = gen.rules.qualifies(c, &mut scope).and_then(|ok| match ok {
                true => gen.rules.priority(c, &mut scope).map(Some),
                false => Ok(None),
            });
            let funnel = match self.stats.funnel.get_mut(&c.id) {
                Some(f) => f,
                None => self.stats.funnel.entry(c.id.clone()).or_default(),
            };
            funnel[0] += 1;
            funnel[1] += u64::from(matches!(result, Ok(Some(_))));
            if let Some(l) = &mut self.ledger {
                l.reached(&self.store, &c.id, now, matches!(result, Ok(Some(_))))?;
            }
            match result {
                Ok(Some(priority)) => out.push(Qualified {
                    campaign: ci,
                    priority,
                    firing: firing.clone(),
                }),
                Ok(None) => {}
                Err(e) => {
                    self.stats.rule_errors += 1;
                    if let Some(m) = &self.metrics {
                        m.rule_error(&c.id);
                    }
                    tracing::warn!(campaign = %c.id, customer, "rule did not evaluate: {e}");
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        gen: &Generation,
        customer: &str,
        now: i64,
        trigger: &str,
        traits: &Map<String, Value>,
        qualified: Vec<Qualified>,
        history: Option<History>,
        changes: &mut Changes,
        out: &mut Vec<Decision>,
    ) -> Result<(), WorkerError> {
        if qualified.is_empty() {
            return Ok(());
        }
        let candidates: Vec<Candidate<'_>> = qualified
            .iter()
            .map(|q| {
                let c = gen.campaign(q.campaign);
                Candidate {
                    campaign: &c.id,
                    channel: &c.channel,
                    priority: q.priority,
                    frequency_ms: c.frequency_ms,
                    holdout_pct: c.holdout_pct,
                    goal: c.goal.as_ref().map(|g| (g.event.as_str(), g.window_ms)),
                }
            })
            .collect();
        let policies = &gen.rules.policies;
        let channel_plugins: Vec<Option<&str>> = candidates
            .iter()
            .map(|c| gen.channel_plugin(c.channel).map(|p| p.name.as_str()))
            .collect();
        let mut history = match history {
            Some(h) => h,
            None => self.store.history(customer)?,
        };
        let outcomes = decide::decide(now, customer, &candidates, traits, &history, policies);
        let channel_of = |campaign: &str| gen.rules.campaign(campaign).map(|c| c.channel.clone());
        // The live server keeps why each decision came out so, for the
        // customer's timeline; replay writes the SPEC's outputs only, and
        // explaining cost it a fifth of its throughput.
        let why = if self.live {
            decide::explain(
                now,
                customer,
                &candidates,
                &outcomes,
                traits,
                &history,
                policies,
                &channel_of,
            )
        } else {
            Vec::new()
        };
        decide::record(&mut history, now, &candidates, &outcomes, policies);
        changes.set_history(customer, &history);
        let winner = candidates
            .iter()
            .zip(&outcomes)
            .find(|(_, o)| o.counts())
            .map(|(c, _)| c.campaign);
        for (i, (c, o)) in candidates.iter().zip(outcomes).enumerate() {
            if let Some(m) = &self.metrics {
                m.decision(o.as_str());
            }
            if let Some(l) = &mut self.ledger {
                let window = c.goal.map(|(_, w)| w);
                let due = l.decided(
                    &self.store,
                    changes,
                    customer,
                    c.campaign,
                    now,
                    o,
                    window,
                    trigger,
                    winner,
                )?;
                if let Some(d) = due {
                    self.next_due = Some(self.next_due.map_or(d, |n| n.min(d)));
                }
            }
            if let (true, Outcome::Sent, Some(plugin)) = (self.live, o, channel_plugins[i]) {
                let campaign = gen.campaign(qualified[i].campaign);
                let delivery = self.delivery(
                    gen,
                    campaign,
                    plugin,
                    customer,
                    now,
                    trigger,
                    traits,
                    &qualified[i].firing,
                );
                changes.outbox(&delivery.id, delivery.to_json());
            }
            let d = Decision {
                ts: now,
                customer: customer.to_owned(),
                campaign: c.campaign.to_owned(),
                outcome: o,
                channel: c.channel.to_owned(),
                trigger: trigger.to_owned(),
                late_ms: self.event_late_ms,
            };
            changes.decision(now, customer, c.campaign, d.to_json());
            if let Some(why) = why.get(i) {
                changes.explanation(now, customer, c.campaign, &d.explained(why));
            }
            out.push(d);
            self.stats.decisions += 1;
        }
        Ok(())
    }

    /// The delivery of a `sent` decision: the response plugin's treatment
    /// (or, if it has none or fails, the campaign's description) to the
    /// customer's addresses, keyed for idempotency by the decision.
    #[allow(clippy::too_many_arguments)]
    fn delivery(
        &mut self,
        gen: &Generation,
        campaign: &crate::rules::Campaign,
        plugin: &str,
        customer: &str,
        now: i64,
        trigger: &str,
        traits: &Map<String, Value>,
        firing: &Firing,
    ) -> Delivery {
        let fallback = || Treatment {
            subject: campaign.description.clone(),
            body: campaign.description.clone(),
            agent_script: campaign.description.clone(),
            variables: Map::new(),
        };
        let treatment = match campaign.response.as_deref().and_then(|r| gen.plugin(r)) {
            None => fallback(),
            Some(rp) => {
                let action = Action {
                    campaign: campaign.id.clone(),
                    channel: campaign.channel.clone(),
                    ts: now,
                    trigger: trigger.to_owned(),
                    firing: firing.clone(),
                };
                let input = CallInput::new(None, customer, traits);
                let call = Call::new(&rp.name, customer, now, None);
                let started = std::time::Instant::now();
                let result = self.instances.respond(rp, call, &action, &input);
                if let Some(m) = &self.metrics {
                    m.plugin_call(&rp.name, started.elapsed());
                }
                match result {
                    Ok(t) => t,
                    Err(fault) => {
                        self.fault(rp, trigger, customer, fault);
                        fallback()
                    }
                }
            }
        };
        Delivery::new(
            campaign,
            plugin,
            customer,
            now,
            trigger,
            self.late_ms,
            treatment,
            Recipient {
                customer: customer.to_owned(),
                email: text_trait(traits, "email"),
                phone: text_trait(traits, "phone"),
            },
        )
    }
}
