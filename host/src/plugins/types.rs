//! What plugins and the host exchange, as the host keeps it (independent
//! of any contract version).

use serde_json::{Map, Value};

/// A firing as the host keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    pub name: String,
    pub data: Map<String, Value>,
}

/// Who a treatment goes to, as far as the host knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recipient {
    pub customer: String,
    pub email: Option<String>,
    pub phone: Option<String>,
}

/// What a channel plugin asked the host to send.
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

/// A decided action, for a response plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub campaign: String,
    pub channel: String,
    pub ts: i64,
    pub trigger: String,
    pub firing: Firing,
}

/// A response plugin's pre-thought action.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Treatment {
    pub subject: String,
    pub body: String,
    pub agent_script: String,
    pub variables: Map<String, Value>,
}
