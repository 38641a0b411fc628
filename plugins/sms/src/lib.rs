//! Channel `sms`: a JSON request to an SMS gateway (`url` in the manifest's
//! `[config]`), to the customer's `phone` trait. The host sends it, and only
//! to hosts this plugin is granted.

use nudge_sdk::prelude::*;
use nudge_sdk::serde_json::json;

pub struct Sms;

/// Longest text sent: four concatenated GSM-7 segments.
const MAX_TEXT: usize = 612;

impl Channel for Sms {
    fn info() -> (String, String) {
        ("sms".into(), "0.1.0".into())
    }

    fn deliver(
        _ctx: &mut Ctx,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, String> {
        let url = config("url").ok_or("no `url` in the plugin's config")?;
        let to = recipient
            .phone
            .as_deref()
            .map(str::trim)
            .filter(|p| p.len() > 3)
            .ok_or_else(|| {
                format!(
                    "customer {} has no usable phone trait",
                    recipient.customer_id
                )
            })?;
        let text: String = treatment.subject.chars().take(MAX_TEXT).collect();
        let body = json!({ "to": to, "text": text }).to_string();
        Ok(vec![Outbound::Http {
            method: "POST".into(),
            url,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into_bytes(),
        }])
    }
}

export_channel!(Sms);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    #[test]
    fn refuses_a_customer_without_a_phone() {
        let r = Recipient {
            customer_id: "c-1".into(),
            ..Recipient::default()
        };
        let e = Sms::deliver(
            &mut Ctx::new(&mut TestHost::new()),
            &Treatment::default(),
            &r,
        );
        // Natively there is no manifest config either; whichever is checked
        // first, the call must fail rather than send nowhere.
        assert!(e.is_err());
    }
}
