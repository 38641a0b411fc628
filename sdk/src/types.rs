//! The records of the contract, as plain Rust types.

use crate::value::{Fields, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Identify,
    Track,
}

/// One customer event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub message_id: String,
    pub customer_id: String,
    pub kind: EventKind,
    /// The `track` event name; empty for `identify`.
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    pub properties: Fields,
    /// Traits this `identify` carries.
    pub traits: Fields,
}

impl Event {
    /// A `track` event, for tests.
    pub fn track(customer: &str, name: &str, ts: i64, properties: Fields) -> Event {
        Event {
            message_id: format!("test-{ts}"),
            customer_id: customer.into(),
            kind: EventKind::Track,
            name: name.into(),
            ts,
            properties,
            traits: Fields::new(),
        }
    }

    /// An `identify` event, for tests.
    pub fn identify(customer: &str, ts: i64, traits: Fields) -> Event {
        Event {
            message_id: format!("test-{ts}"),
            customer_id: customer.into(),
            kind: EventKind::Identify,
            name: String::new(),
            ts,
            properties: Fields::new(),
            traits,
        }
    }

    pub fn is_identify(&self) -> bool {
        self.kind == EventKind::Identify
    }
}

/// The customer as the host knows them: traits merged over every identify.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Customer {
    pub id: String,
    pub traits: Fields,
}

/// A trigger's signal; campaigns listen for it by name.
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    pub name: String,
    pub data: Fields,
}

impl Firing {
    pub fn new(name: impl Into<String>) -> Self {
        Firing {
            name: name.into(),
            data: Fields::new(),
        }
    }

    /// Adds a value campaigns and responses can read as `firing.<key>`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.data.insert(key, value);
        self
    }
}

/// What a trigger plugin says about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerInfo {
    pub name: String,
    pub version: String,
    /// Track event names to receive; `"identify"` for identify events.
    pub subscribes: Vec<String>,
    /// Firing names this plugin may return.
    pub firings: Vec<String>,
}

impl TriggerInfo {
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        TriggerInfo {
            name: name.into(),
            version: version.into(),
            subscribes: Vec::new(),
            firings: Vec::new(),
        }
    }

    pub fn subscribes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.subscribes.extend(names.into_iter().map(Into::into));
        self
    }

    pub fn fires<I: IntoIterator<Item = S>, S: Into<String>>(mut self, names: I) -> Self {
        self.firings.extend(names.into_iter().map(Into::into));
        self
    }
}

/// A decided action, handed to a response plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub campaign: String,
    pub channel: String,
    pub ts: i64,
    /// `messageId` of the event that caused the firing.
    pub trigger: String,
    pub firing: Firing,
}

/// The pre-thought action.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Treatment {
    pub subject: String,
    pub body: String,
    pub agent_script: String,
    pub variables: Fields,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recipient {
    pub customer_id: String,
    pub email: Option<String>,
    pub phone: Option<String>,
}

/// What a channel plugin asks the host to send.
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    Email {
        to: String,
        subject: String,
        body: String,
    },
    Http {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    AgentQueue(Treatment),
}
