//! Channel `agent-queue`: the treatment goes on the contact centre's
//! next-best-action queue as it is; the agent reads the script.

use nudge_sdk::prelude::*;

pub struct AgentQueue;

impl Channel for AgentQueue {
    fn info() -> (String, String) {
        ("agent-queue".into(), "0.1.0".into())
    }

    fn deliver(
        _ctx: &mut Ctx,
        treatment: &Treatment,
        _recipient: &Recipient,
    ) -> Result<Vec<Outbound>, String> {
        if treatment.agent_script.trim().is_empty() && treatment.subject.trim().is_empty() {
            return Err("nothing for an agent to act on: no script and no subject".into());
        }
        Ok(vec![Outbound::AgentQueue(treatment.clone())])
    }
}

export_channel!(AgentQueue);

#[cfg(test)]
mod tests {
    use super::*;
    use nudge_sdk::testing::TestHost;

    #[test]
    fn queues_the_treatment_and_refuses_an_empty_one() {
        let mut host = TestHost::new();
        let t = Treatment {
            subject: "Rates".into(),
            agent_script: "Update client on new term deposit rates".into(),
            ..Treatment::default()
        };
        let r = Recipient::default();
        let out = AgentQueue::deliver(&mut Ctx::new(&mut host), &t, &r).unwrap();
        assert_eq!(out, vec![Outbound::AgentQueue(t)]);
        let empty = Treatment::default();
        assert!(AgentQueue::deliver(&mut Ctx::new(&mut host), &empty, &r).is_err());
    }
}
