//! Channel `webhook`: the treatment as a JSON document, posted to `url`
//! from the manifest's `[config]`. The host adds the `Idempotency-Key`
//! header and sends it only to hosts this plugin is granted.

use nudge_sdk::prelude::*;
use nudge_sdk::serde_json::{json, Map};

pub struct Webhook;

/// The treatment as the receiver gets it.
pub fn document(treatment: &Treatment, recipient: &Recipient) -> String {
    let variables: Map<String, _> = treatment
        .variables
        .iter()
        .map(|(k, v)| (k.to_owned(), v.json().unwrap_or_default()))
        .collect();
    json!({
        "customer": recipient.customer_id,
        "subject": treatment.subject,
        "body": treatment.body,
        "agent_script": treatment.agent_script,
        "variables": variables,
    })
    .to_string()
}

impl Channel for Webhook {
    fn info() -> (String, String) {
        ("webhook".into(), "0.1.0".into())
    }

    fn deliver(
        _ctx: &mut Ctx,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, String> {
        let url = config("url").ok_or("no `url` in the plugin's config")?;
        Ok(vec![Outbound::Http {
            method: "POST".into(),
            url,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: document(treatment, recipient).into_bytes(),
        }])
    }
}

export_channel!(Webhook);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_carries_treatment_and_variables() {
        let t = Treatment {
            subject: "Say \"hi\"".into(),
            variables: [("campaign", "welcome")].into_iter().collect(),
            ..Treatment::default()
        };
        let r = Recipient {
            customer_id: "c-1".into(),
            ..Recipient::default()
        };
        let v: nudge_sdk::serde_json::Value =
            nudge_sdk::serde_json::from_str(&document(&t, &r)).unwrap();
        assert_eq!(v["customer"], "c-1");
        assert_eq!(v["subject"], "Say \"hi\"");
        assert_eq!(v["variables"]["campaign"], "welcome");
    }
}
