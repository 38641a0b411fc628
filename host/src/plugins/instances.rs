//! One worker's live instances and the calls into them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use wasmtime::Store as WasmStore;

use super::fault::{classify, Fault};
use super::host::{cut, Call, HostState, TimerOps};
use super::plugin::{Plugin, Pre};
use super::runtime::Runtime;
use super::sandbox::Captured;
use super::types::{Action, Firing, Outbound, Recipient, Treatment};
use super::v0_1_0::{
    self, fields, firings_size, outbound_size, treatment_from_wit, treatment_size,
    treatment_to_wit, types as wit,
};
use crate::event::{Event, Kind};
use crate::store::StateRecord;

/// An event and customer converted once, for every plugin that sees them.
pub struct CallInput {
    event: Option<wit::Event>,
    customer: wit::Customer,
}

impl CallInput {
    pub fn new(event: Option<&Event>, customer: &str, traits: &Map<String, Value>) -> CallInput {
        CallInput {
            event: event.map(|e| wit::Event {
                message_id: e.message_id.clone(),
                customer_id: e.customer.clone(),
                kind: match e.kind {
                    Kind::Identify => wit::EventKind::Identify,
                    Kind::Track => wit::EventKind::Track,
                },
                name: e.name.clone(),
                timestamp_ms: e.ts,
                properties: fields(&e.properties),
                traits: fields(&e.traits),
            }),
            customer: wit::Customer {
                id: customer.to_owned(),
                traits: fields(traits),
            },
        }
    }
}

enum Live {
    Trigger(v0_1_0::trigger::Trigger),
    Response(v0_1_0::response::Response),
    Channel(v0_1_0::channel::Channel),
}

struct Instance {
    store: WasmStore<HostState>,
    live: Live,
}

/// One worker's live instances, keyed by [`Plugin::instance_key`]. Not shared: each
/// worker calls its own, so calls never wait on each other.
pub struct Instances {
    runtime: Arc<Runtime>,
    live: HashMap<String, Instance>,
}

/// What a trigger call asked for, to commit if the caller accepts it.
pub struct Effects {
    /// State writes: key → new value (`None` = deleted).
    pub state: HashMap<String, Option<Vec<u8>>>,
    /// The plugin's state for the customer with those writes applied
    /// (`None` when the call wrote none).
    pub record: Option<StateRecord>,
    pub timers: TimerOps,
}

impl Instances {
    pub fn new(runtime: Arc<Runtime>) -> Instances {
        Instances {
            runtime,
            live: HashMap::new(),
        }
    }

    /// The limits calls run under before a manifest lowers them.
    pub fn limits(&self) -> &super::Limits {
        &self.runtime.limits
    }

    /// Drops the instances of plugins no longer in `keep` (after a
    /// generation change), so old versions do not hold memory.
    pub fn retain<'a>(&mut self, keep: impl Iterator<Item = &'a Plugin>) {
        let keep: std::collections::HashSet<&str> = keep.map(|p| p.key.as_str()).collect();
        self.live.retain(|k, _| keep.contains(k.as_str()));
    }

    fn instance(&mut self, plugin: &Plugin) -> Result<&mut Instance, Fault> {
        if !self.live.contains_key(&plugin.key) {
            let mut store = self
                .runtime
                .new_store(Call::default(), Some(&plugin.manifest));
            store.set_epoch_deadline(self.runtime.setup_ticks());
            let live = match &plugin.pre {
                Pre::Trigger(p) => p.instantiate(&mut store).map(Live::Trigger),
                Pre::Response(p) => p.instantiate(&mut store).map(Live::Response),
                Pre::Channel(p) => p.instantiate(&mut store).map(Live::Channel),
            }
            .map_err(|e| Fault::Instantiate(format!("{e:#}")))?;
            self.live
                .insert(plugin.key.clone(), Instance { store, live });
        }
        self.live
            .get_mut(&plugin.key)
            .ok_or_else(|| Fault::Instantiate("instance vanished".into()))
    }

    /// Readies the plugin's instance for a call: its limits, its deadline,
    /// its log budget, and its random generators seeded from what
    /// identifies the call (`cause`), so the same input decides the same.
    fn prepare(
        &mut self,
        plugin: &Plugin,
        mut call: Call,
        cause: &str,
    ) -> Result<&mut Instance, Fault> {
        let limits = self.runtime.limits.for_plugin(&plugin.manifest.limits);
        let ticks = self.runtime.ticks_for(limits.deadline);
        let seed = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&plugin.hash, &call.customer, call.now, cause).hash(&mut h);
            h.finish()
        };
        let inst = self.instance(plugin)?;
        let data = inst.store.data_mut();
        data.seeds.reseed(seed);
        data.output.reset(limits.max_log_bytes);
        call.limits = limits;
        call.started = Some(Instant::now());
        data.call = call;
        inst.store.set_epoch_deadline(ticks);
        Ok(inst)
    }

    /// Ends a call: logs what it wrote, checks what it returned (`size`
    /// bytes) and the state it keeps against their budgets, and hands out
    /// its effects. A trapped instance is dropped.
    fn finish<T>(
        &mut self,
        plugin: &Plugin,
        result: wasmtime::Result<Result<T, String>>,
        size: impl FnOnce(&T) -> usize,
    ) -> Result<(T, Effects), Fault> {
        let Some(inst) = self.live.get_mut(&plugin.key) else {
            return Err(Fault::Instantiate("instance vanished".into()));
        };
        let data = inst.store.data_mut();
        let mut call = std::mem::take(&mut data.call);
        log_output(plugin, &call, data.output.take());
        match result {
            Ok(Ok(v)) => {
                let bytes = size(&v);
                if bytes > call.limits.max_output {
                    return Err(Fault::Limit(format!(
                        "returned {bytes} bytes, over the {}-byte limit",
                        call.limits.max_output
                    )));
                }
                let record = call.settle_quota().map_err(Fault::Limit)?;
                Ok((
                    v,
                    Effects {
                        state: call.state,
                        record,
                        timers: call.timers,
                    },
                ))
            }
            Ok(Err(msg)) => Err(Fault::Returned(cut(msg, call.limits.max_log_line))),
            Err(e) => {
                // A trapped store is poisoned: drop it, the next call gets a
                // fresh instance.
                self.live.remove(&plugin.key);
                Err(classify(e, &call.limits))
            }
        }
    }

    /// Calls a trigger's `on-event`.
    pub fn on_event(
        &mut self,
        plugin: &Plugin,
        call: Call,
        input: &CallInput,
    ) -> Result<(Vec<Firing>, Effects), Fault> {
        super::off_runtime(move || {
            let cause = input.event.as_ref().map_or("", |e| e.message_id.as_str());
            let inst = self.prepare(plugin, call, cause)?;
            let result = match (&inst.live, &input.event) {
                (Live::Trigger(t), Some(ev)) => t.nudge_plugin_trigger_handler().call_on_event(
                    &mut inst.store,
                    ev,
                    &input.customer,
                ),
                _ => Ok(Err("not a trigger plugin, or no event".into())),
            };
            let (firings, fx) = self.finish(plugin, result, |f| firings_size(f))?;
            Ok((firings.into_iter().map(Firing::from).collect(), fx))
        })
    }

    /// Calls a trigger's `on-timer`.
    pub fn on_timer(
        &mut self,
        plugin: &Plugin,
        call: Call,
        key: &str,
        input: &CallInput,
    ) -> Result<(Vec<Firing>, Effects), Fault> {
        super::off_runtime(move || {
            let inst = self.prepare(plugin, call, key)?;
            let result = match &inst.live {
                Live::Trigger(t) => t.nudge_plugin_trigger_handler().call_on_timer(
                    &mut inst.store,
                    key,
                    &input.customer,
                ),
                _ => Ok(Err("not a trigger plugin".into())),
            };
            let (firings, fx) = self.finish(plugin, result, |f| firings_size(f))?;
            Ok((firings.into_iter().map(Firing::from).collect(), fx))
        })
    }

    /// Calls a response plugin for a decided action.
    pub fn respond(
        &mut self,
        plugin: &Plugin,
        call: Call,
        action: &Action,
        input: &CallInput,
    ) -> Result<Treatment, Fault> {
        let wit_action = wit::Action {
            campaign: action.campaign.clone(),
            channel: action.channel.clone(),
            timestamp_ms: action.ts,
            trigger: action.trigger.clone(),
            firing: wit::Firing {
                name: action.firing.name.clone(),
                data: fields(&action.firing.data),
            },
        };
        super::off_runtime(move || {
            let cause = format!("{}\0{}", action.campaign, action.trigger);
            let inst = self.prepare(plugin, call, &cause)?;
            let result = match &inst.live {
                Live::Response(r) => r.nudge_plugin_response_handler().call_respond(
                    &mut inst.store,
                    &wit_action,
                    &input.customer,
                ),
                _ => Ok(Err("not a response plugin".into())),
            };
            let (t, _) = self.finish(plugin, result, treatment_size)?;
            Ok(treatment_from_wit(t))
        })
    }

    /// Calls a channel plugin: what should the host send for `treatment`?
    pub fn deliver(
        &mut self,
        plugin: &Plugin,
        call: Call,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, Fault> {
        let t = treatment_to_wit(treatment);
        let r = wit::Recipient {
            customer_id: recipient.customer.clone(),
            email: recipient.email.clone(),
            phone: recipient.phone.clone(),
        };
        super::off_runtime(move || {
            let inst = self.prepare(plugin, call, &treatment.subject)?;
            let result = match &inst.live {
                Live::Channel(c) => {
                    c.nudge_plugin_channel_handler()
                        .call_deliver(&mut inst.store, &t, &r)
                }
                _ => Ok(Err("not a channel plugin".into())),
            };
            let (out, _) = self.finish(plugin, result, |o| o.iter().map(outbound_size).sum())?;
            Ok(out
                .into_iter()
                .map(|o| match o {
                    wit::Outbound::Email(m) => Outbound::Email {
                        to: m.to,
                        subject: m.subject,
                        body: m.body,
                    },
                    wit::Outbound::Http(h) => Outbound::Http {
                        method: h.method,
                        url: h.url,
                        headers: h.headers,
                        body: h.body,
                    },
                    wit::Outbound::AgentQueue(t) => Outbound::AgentQueue(treatment_from_wit(t)),
                })
                .collect())
        })
    }
}

/// Most lines of stdout and stderr logged per call.
const MAX_OUTPUT_LINES: usize = 64;

/// Logs what a call wrote to stdout and stderr (cut, escaped by the log
/// writer), and what was dropped past the call's log budget.
fn log_output(plugin: &Plugin, call: &Call, out: Captured) {
    let (p, c) = (plugin.name.as_str(), call.customer.as_str());
    let mut lines = 0usize;
    let mut extra_lines = 0usize;
    for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        for line in String::from_utf8_lossy(bytes).lines() {
            if line.trim().is_empty() {
                continue;
            }
            if lines == MAX_OUTPUT_LINES {
                extra_lines += 1;
                continue;
            }
            lines += 1;
            let line = cut(line.to_owned(), call.limits.max_log_line);
            tracing::info!(plugin = p, customer = c, stream, "{line}");
        }
    }
    let dropped = out.dropped + call.log_dropped;
    if dropped > 0 || extra_lines > 0 {
        tracing::warn!(
            plugin = p,
            customer = c,
            dropped_bytes = dropped,
            dropped_lines = extra_lines,
            "plugin logged more than its budget of {} bytes and {MAX_OUTPUT_LINES} output lines per call: the rest was dropped",
            call.limits.max_log_bytes
        );
    }
}
