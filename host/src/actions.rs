//! What the API and the dashboard both do to the contact centre's actions
//! and to dead letters, so that a click and a request do exactly the same.

use axum::http::StatusCode;

use crate::deliver::{self, AgentAction, Delivery};
use crate::event::{format_ts, now_ms};
use crate::store::Store;

/// Why an agent's answer was not recorded.
pub enum Refused {
    Missing(String),
    Answered(String),
    Expired(String),
    Store(String),
}

impl From<crate::store::StoreError> for Refused {
    fn from(e: crate::store::StoreError) -> Refused {
        Refused::Store(e.to_string())
    }
}

impl Refused {
    pub fn status(&self) -> (StatusCode, String) {
        match self {
            Refused::Missing(m) => (StatusCode::NOT_FOUND, m.clone()),
            Refused::Answered(m) => (StatusCode::CONFLICT, m.clone()),
            Refused::Expired(m) => (StatusCode::GONE, m.clone()),
            Refused::Store(m) => (StatusCode::INTERNAL_SERVER_ERROR, format!("store: {m}")),
        }
    }
}

/// Records an agent's answer (`accepted` or `declined`) to an action, and
/// counts it in the campaign's funnel. Read, checked and answered under
/// one lock: two agents answering one action at once cannot both succeed,
/// nor count twice.
pub fn record_outcome(
    store: &Store,
    customer: &str,
    action: &str,
    outcome: String,
    note: Option<String>,
) -> Result<AgentAction, Refused> {
    let now = now_ms();
    store.update_action(customer, action, |current| {
        let mut a: AgentAction = match current {
            None => {
                return Err(Refused::Missing(format!(
                    "customer {customer:?} has no action {action:?}"
                )))
            }
            Some(b) => serde_json::from_slice(&b).map_err(|e| Refused::Store(e.to_string()))?,
        };
        if let Some(prev) = &a.outcome {
            return Err(Refused::Answered(format!(
                "action {action:?} already has outcome {prev:?}"
            )));
        }
        if a.expires_ms.is_some_and(|e| e <= now) {
            return Err(Refused::Expired(format!(
                "action {action:?} expired at {}",
                a.expires_at.clone().unwrap_or_default()
            )));
        }
        let accepted = outcome == "accepted";
        a.outcome = Some(outcome);
        a.outcome_at = Some(format_ts(now));
        a.outcome_note = note;
        let decided = crate::event::parse_ts(&a.decided_at).unwrap_or(now);
        let tally =
            crate::ledger::direct_edit(&a.campaign, decided, crate::ledger::AGENTS, move |f| {
                if accepted {
                    f.accepted += 1;
                } else {
                    f.declined += 1;
                }
            });
        let json = serde_json::to_vec(&a).unwrap_or_default();
        Ok((json, a, Some(tally)))
    })
}

/// Moves dead letter `id` back to the outbox, attempts reset, and hands it
/// to the deliverer.
pub fn retry_dead_letter(
    store: &Store,
    deliverer: &std::sync::Mutex<Option<std::sync::mpsc::Sender<deliver::Input>>>,
    id: &str,
) -> Result<(), (StatusCode, String)> {
    let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"));
    let mut d: Delivery = match store.dead_letter_get(id) {
        Ok(Some(b)) => serde_json::from_slice(&b).map_err(|e| internal(e.to_string()))?,
        Ok(None) => return Err((StatusCode::NOT_FOUND, format!("no dead letter {id:?}"))),
        Err(e) => return Err(internal(e.to_string())),
    };
    d.attempts = 0;
    d.next_at = 0;
    d.failed_at = None;
    let json = d.to_json();
    store
        .retry_dead_letter(id, &json)
        .map_err(|e| internal(e.to_string()))?;
    if let Some(tx) = deliverer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = tx.send(deliver::Input::New(vec![json]));
    }
    Ok(())
}
