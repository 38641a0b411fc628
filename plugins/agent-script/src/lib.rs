//! Response: the pre-thought action for each bank-retail campaign: what to
//! tell the customer, and for the contact centre, what to say.

use nudge_sdk::prelude::*;

pub struct AgentScript;

impl Response for AgentScript {
    fn info() -> (String, String) {
        ("agent-script".into(), "0.1.0".into())
    }

    fn respond(_ctx: &mut Ctx, action: &Action, customer: &Customer) -> Result<Treatment, String> {
        let amount = action.firing.data.f64("amount");
        let (subject, script) = match action.campaign.as_str() {
            "large-deposit" => (
                "Our new term deposit rates".to_string(),
                format!(
                    "Update client on new term deposit rates (deposited {:.2}).",
                    amount.unwrap_or_default()
                ),
            ),
            "investment-advice" => (
                "Make your savings work harder".to_string(),
                "Offer a meeting with an investment advisor.".to_string(),
            ),
            "payout-retention" => (
                "Before you pay out your loan".to_string(),
                "Call about the payout quote: offer a retention rate.".to_string(),
            ),
            "cart-abandon" => (
                "You left something in your cart".to_string(),
                "Remind the customer of the items in the cart.".to_string(),
            ),
            "mortgage-browse" => (
                "Thinking about a mortgage?".to_string(),
                "Offer a mortgage pre-approval conversation.".to_string(),
            ),
            "welcome" => (
                "Welcome!".to_string(),
                "Welcome the new customer.".to_string(),
            ),
            "low-balance" => (
                "Your card was declined".to_string(),
                "Tell the customer about overdraft protection.".to_string(),
            ),
            other => (format!("A message from us ({other})"), String::new()),
        };
        let name = customer.traits.str("name").unwrap_or("there");
        Ok(Treatment {
            body: format!("Hi {name},\n\n{subject}.\n"),
            subject,
            agent_script: script,
            variables: [("campaign", action.campaign.as_str())]
                .into_iter()
                .collect(),
        })
    }
}

export_response!(AgentScript);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    #[test]
    fn large_deposit_script_mentions_rates() {
        let action = Action {
            campaign: "large-deposit".into(),
            channel: "agent".into(),
            ts: 0,
            trigger: "m-1".into(),
            firing: Firing::new("deposit").with("amount", 25000.0),
        };
        let mut host = TestHost::new();
        let t =
            AgentScript::respond(&mut Ctx::new(&mut host), &action, &Customer::default()).unwrap();
        assert!(
            t.agent_script.contains("term deposit rates"),
            "{}",
            t.agent_script
        );
        assert!(t.agent_script.contains("25000.00"));
    }
}
