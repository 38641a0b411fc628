//! Contract `nudge:plugin@0.1.0` (`sdk/wit/since_v0.1.0`): bindings, one
//! module per world sharing the types, and conversions between its types
//! and the host's. Frozen with the contract: a later version gets a module
//! of its own converting into the same host types.

use serde_json::{Map, Value};

use super::types::{Firing, Treatment};

pub mod trigger {
    wasmtime::component::bindgen!({
        world: "trigger",
        path: "../sdk/wit/since_v0.1.0",
        imports: { "nudge:plugin/state": trappable, "nudge:plugin/timers": trappable, "nudge:plugin/log": trappable },
    });
}
pub mod response {
    wasmtime::component::bindgen!({
        world: "response",
        path: "../sdk/wit/since_v0.1.0",
        with: {
            "nudge:plugin/types": super::trigger::nudge::plugin::types,
            "nudge:plugin/clock": super::trigger::nudge::plugin::clock,
            "nudge:plugin/log": super::trigger::nudge::plugin::log,
        },
    });
}
pub mod channel {
    wasmtime::component::bindgen!({
        world: "channel",
        path: "../sdk/wit/since_v0.1.0",
        with: {
            "nudge:plugin/types": super::trigger::nudge::plugin::types,
            "nudge:plugin/clock": super::trigger::nudge::plugin::clock,
            "nudge:plugin/log": super::trigger::nudge::plugin::log,
        },
    });
}
pub use trigger::nudge::plugin::types;
use types as wit;

pub(super) fn value_to_wit(v: &Value) -> wit::Value {
    match v {
        Value::Null => wit::Value::Null,
        Value::Bool(b) => wit::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => wit::Value::Integer(i),
            None => wit::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => wit::Value::Text(s.clone()),
        other => wit::Value::Json(other.to_string()),
    }
}

pub(super) fn value_from_wit(v: wit::Value) -> Value {
    match v {
        wit::Value::Null => Value::Null,
        wit::Value::Boolean(b) => Value::Bool(b),
        wit::Value::Integer(i) => Value::from(i),
        wit::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        wit::Value::Text(s) => Value::String(s),
        wit::Value::Json(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
    }
}

pub(super) fn fields(m: &Map<String, Value>) -> Vec<wit::Field> {
    m.iter()
        .map(|(k, v)| wit::Field {
            key: k.clone(),
            value: value_to_wit(v),
        })
        .collect()
}

impl From<wit::Firing> for Firing {
    fn from(f: wit::Firing) -> Firing {
        Firing {
            name: f.name,
            data: f
                .data
                .into_iter()
                .map(|f| (f.key, value_from_wit(f.value)))
                .collect(),
        }
    }
}

pub(super) fn treatment_to_wit(t: &Treatment) -> wit::Treatment {
    wit::Treatment {
        subject: t.subject.clone(),
        body: t.body.clone(),
        agent_script: t.agent_script.clone(),
        variables: fields(&t.variables),
    }
}

pub(super) fn treatment_from_wit(t: wit::Treatment) -> Treatment {
    Treatment {
        subject: t.subject,
        body: t.body,
        agent_script: t.agent_script,
        variables: t
            .variables
            .into_iter()
            .map(|f| (f.key, value_from_wit(f.value)))
            .collect(),
    }
}

/// Bytes a value takes as returned (numbers and booleans count 8).
fn value_size(v: &wit::Value) -> usize {
    match v {
        wit::Value::Text(s) | wit::Value::Json(s) => s.len(),
        _ => 8,
    }
}

fn fields_size(f: &[wit::Field]) -> usize {
    f.iter().map(|f| f.key.len() + value_size(&f.value)).sum()
}

/// Bytes of a trigger's returned firings.
pub(super) fn firings_size(f: &[wit::Firing]) -> usize {
    f.iter().map(|f| f.name.len() + fields_size(&f.data)).sum()
}

/// Bytes of a response plugin's treatment.
pub(super) fn treatment_size(t: &wit::Treatment) -> usize {
    t.subject.len() + t.body.len() + t.agent_script.len() + fields_size(&t.variables)
}

/// Bytes of one message a channel plugin asks the host to send.
pub(super) fn outbound_size(o: &wit::Outbound) -> usize {
    match o {
        wit::Outbound::Email(m) => m.to.len() + m.subject.len() + m.body.len(),
        wit::Outbound::Http(h) => {
            h.method.len()
                + h.url.len()
                + h.body.len()
                + h.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        }
        wit::Outbound::AgentQueue(t) => treatment_size(t),
    }
}
