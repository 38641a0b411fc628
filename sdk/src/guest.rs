//! The WIT bindings (wasm32 only) and the conversions the export macros use.
//! Plugin authors never see these types.

use crate::{
    Action, Channel, Ctx, Customer, Event, EventKind, Fields, Firing, Host, Level, Outbound,
    Recipient, Response, Treatment, Trigger, Value,
};

wit_bindgen::generate!({
    world: "sdk",
    path: "wit/since_v0.1.0",
    pub_export_macro: true,
    default_bindings_module: "nudge_sdk::guest",
});

use nudge::plugin::types as wit;

pub use exports::nudge::plugin::channel_handler::Guest as ChannelGuest;
pub use exports::nudge::plugin::response_handler::Guest as ResponseGuest;
pub use exports::nudge::plugin::trigger_handler::Guest as TriggerGuest;
pub use wit::{
    Action as WitAction, Customer as WitCustomer, Event as WitEvent, Firing as WitFiring,
    Outbound as WitOutbound, Recipient as WitRecipient, Treatment as WitTreatment,
    TriggerInfo as WitTriggerInfo,
};

/// The contract's imports, as a [`Host`].
struct WasmHost;

impl Host for WasmHost {
    fn state_get(&mut self, key: &str) -> Option<Vec<u8>> {
        nudge::plugin::state::get(key)
    }
    fn state_set(&mut self, key: &str, value: &[u8]) {
        nudge::plugin::state::set(key, value)
    }
    fn state_delete(&mut self, key: &str) {
        nudge::plugin::state::delete(key)
    }
    fn timer_set(&mut self, key: &str, due_ms: i64) {
        nudge::plugin::timers::set(key, due_ms)
    }
    fn timer_cancel(&mut self, key: &str) {
        nudge::plugin::timers::cancel(key)
    }
    fn now_ms(&mut self) -> i64 {
        nudge::plugin::clock::now_ms()
    }
    fn log(&mut self, level: Level, message: &str) {
        use nudge::plugin::log::Level as L;
        let level = match level {
            Level::Trace => L::Trace,
            Level::Debug => L::Debug,
            Level::Info => L::Info,
            Level::Warn => L::Warn,
            Level::Error => L::Error,
        };
        nudge::plugin::log::log(level, message)
    }
}

fn value_in(v: wit::Value) -> Value {
    match v {
        wit::Value::Null => Value::Null,
        wit::Value::Boolean(b) => Value::Bool(b),
        wit::Value::Integer(i) => Value::Int(i),
        wit::Value::Float(f) => Value::Float(f),
        wit::Value::Text(s) => Value::Text(s),
        wit::Value::Json(s) => Value::Json(s),
    }
}

fn value_out(v: Value) -> wit::Value {
    match v {
        Value::Null => wit::Value::Null,
        Value::Bool(b) => wit::Value::Boolean(b),
        Value::Int(i) => wit::Value::Integer(i),
        Value::Float(f) => wit::Value::Float(f),
        Value::Text(s) => wit::Value::Text(s),
        Value::Json(s) => wit::Value::Json(s),
    }
}

fn fields_in(f: Vec<wit::Field>) -> Fields {
    Fields(f.into_iter().map(|f| (f.key, value_in(f.value))).collect())
}

fn fields_out(f: Fields) -> Vec<wit::Field> {
    f.0.into_iter()
        .map(|(key, v)| wit::Field {
            key,
            value: value_out(v),
        })
        .collect()
}

fn customer_in(c: wit::Customer) -> Customer {
    Customer {
        id: c.id,
        traits: fields_in(c.traits),
    }
}

fn firing_in(f: wit::Firing) -> Firing {
    Firing {
        name: f.name,
        data: fields_in(f.data),
    }
}

fn firing_out(f: Firing) -> wit::Firing {
    wit::Firing {
        name: f.name,
        data: fields_out(f.data),
    }
}

fn treatment_in(t: wit::Treatment) -> Treatment {
    Treatment {
        subject: t.subject,
        body: t.body,
        agent_script: t.agent_script,
        variables: fields_in(t.variables),
    }
}

fn treatment_out(t: Treatment) -> wit::Treatment {
    wit::Treatment {
        subject: t.subject,
        body: t.body,
        agent_script: t.agent_script,
        variables: fields_out(t.variables),
    }
}

pub fn trigger_describe<T: Trigger>() -> wit::TriggerInfo {
    let info = T::info();
    wit::TriggerInfo {
        name: info.name,
        version: info.version,
        subscribes: info.subscribes,
        firings: info.firings,
    }
}

pub fn trigger_on_event<T: Trigger>(
    e: wit::Event,
    c: wit::Customer,
) -> Result<Vec<wit::Firing>, String> {
    let event = Event {
        message_id: e.message_id,
        customer_id: e.customer_id,
        kind: match e.kind {
            wit::EventKind::Identify => EventKind::Identify,
            wit::EventKind::Track => EventKind::Track,
        },
        name: e.name,
        ts: e.timestamp_ms,
        properties: fields_in(e.properties),
        traits: fields_in(e.traits),
    };
    let firings = T::on_event(&mut Ctx::new(&mut WasmHost), &event, &customer_in(c))?;
    Ok(firings.into_iter().map(firing_out).collect())
}

pub fn trigger_on_timer<T: Trigger>(
    key: String,
    c: wit::Customer,
) -> Result<Vec<wit::Firing>, String> {
    let firings = T::on_timer(&mut Ctx::new(&mut WasmHost), &key, &customer_in(c))?;
    Ok(firings.into_iter().map(firing_out).collect())
}

pub fn respond<T: Response>(a: wit::Action, c: wit::Customer) -> Result<wit::Treatment, String> {
    let action = Action {
        campaign: a.campaign,
        channel: a.channel,
        ts: a.timestamp_ms,
        trigger: a.trigger,
        firing: firing_in(a.firing),
    };
    T::respond(&mut Ctx::new(&mut WasmHost), &action, &customer_in(c)).map(treatment_out)
}

pub fn deliver<T: Channel>(
    t: wit::Treatment,
    r: wit::Recipient,
) -> Result<Vec<wit::Outbound>, String> {
    let recipient = Recipient {
        customer_id: r.customer_id,
        email: r.email,
        phone: r.phone,
    };
    let out = T::deliver(&mut Ctx::new(&mut WasmHost), &treatment_in(t), &recipient)?;
    Ok(out
        .into_iter()
        .map(|o| match o {
            Outbound::Email { to, subject, body } => {
                wit::Outbound::Email(wit::EmailMessage { to, subject, body })
            }
            Outbound::Http {
                method,
                url,
                headers,
                body,
            } => wit::Outbound::Http(wit::HttpRequest {
                method,
                url,
                headers,
                body,
            }),
            Outbound::AgentQueue(t) => wit::Outbound::AgentQueue(treatment_out(t)),
        })
        .collect())
}
