//! Channel `email`: the treatment's subject and body, to the customer's
//! `email` trait. The host does the sending (SMTP), not the plugin.

use nudge_sdk::prelude::*;

pub struct Email;

impl Channel for Email {
    fn info() -> (String, String) {
        ("email".into(), "0.1.0".into())
    }

    fn deliver(
        _ctx: &mut Ctx,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, String> {
        let to = recipient
            .email
            .as_deref()
            .map(str::trim)
            .filter(|e| e.contains('@'))
            .ok_or_else(|| {
                format!(
                    "customer {} has no usable email trait",
                    recipient.customer_id
                )
            })?;
        Ok(vec![Outbound::Email {
            to: to.to_owned(),
            subject: treatment.subject.clone(),
            body: treatment.body.clone(),
        }])
    }
}

export_channel!(Email);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    fn recipient(email: Option<&str>) -> Recipient {
        Recipient {
            customer_id: "c-1".into(),
            email: email.map(str::to_owned),
            phone: None,
        }
    }

    #[test]
    fn renders_subject_and_body_to_the_email_trait() {
        let mut host = TestHost::new();
        let t = Treatment {
            subject: "Hello".into(),
            body: "Body".into(),
            ..Treatment::default()
        };
        let out = Email::deliver(
            &mut Ctx::new(&mut host),
            &t,
            &recipient(Some("a@example.com")),
        );
        assert_eq!(
            out.unwrap(),
            vec![Outbound::Email {
                to: "a@example.com".into(),
                subject: "Hello".into(),
                body: "Body".into()
            }]
        );
    }

    #[test]
    fn refuses_a_customer_without_an_address() {
        let mut host = TestHost::new();
        let t = Treatment::default();
        assert!(Email::deliver(&mut Ctx::new(&mut host), &t, &recipient(Some(""))).is_err());
        assert!(Email::deliver(&mut Ctx::new(&mut host), &t, &recipient(None)).is_err());
    }
}
