//! `GET /v1/customers/{id}`: one customer as the engine sees them: traits,
//! pending timers by plugin, recent decisions with why each came out so,
//! conversions, and the contact centre's open actions.
//!
//! For a viewer (results), an agent (the contact centre opens it on a call)
//! or an operator. Reads the customer's own keys only (their timeline is
//! contiguous in the store), never the whole decision log.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{check_api, error};
use crate::config::Role;
use crate::deliver::AgentAction;
use crate::event::{format_ts, now_ms};
use crate::serve::Shared;
use crate::stats::VALUE_SCALE;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/v1/customers/{id}", get(show))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    /// How many of the most recent decisions (default 100, at most 1000).
    limit: Option<usize>,
}

async fn show(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    // Results readers and the contact centre both open a customer.
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        if let Err(r2) = check_api(&s, &headers, Role::Agent) {
            return if r.status() == StatusCode::FORBIDDEN {
                *r2
            } else {
                *r
            };
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let store = s.store.clone();
    match tokio::task::spawn_blocking(move || view(&store, &id, limit)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("reading: {e}")),
    }
}

/// One customer as the engine sees them (the JSON of `GET
/// /v1/customers/{id}`): traits, pending timers by plugin, the `limit`
/// most recent decisions with their explanations, conversions, and the
/// open actions.
pub fn view(
    store: &crate::store::Store,
    id: &str,
    limit: usize,
) -> Result<Value, crate::store::StoreError> {
    let traits = store.traits(id)?;
    let mut timers: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    // The host's own (a decision's goal window) are not a plugin's.
    for (plugin, key, t) in store
        .timers_of(id)?
        .into_iter()
        .filter(|(p, ..)| p != crate::ledger::MATURITY)
    {
        timers.entry(plugin).or_default().push(json!({
            "key": key,
            "due": format_ts(t.due),
            "trigger": t.trigger,
        }));
    }
    let timeline = store.timeline(id)?;
    let total = timeline.len();
    let mut decisions = Vec::new();
    let mut conversions = Vec::new();
    for (json, conversion) in timeline.into_iter().rev().take(limit) {
        let Ok(mut d) = serde_json::from_slice::<Value>(&json) else {
            continue;
        };
        if let Some((at, value)) = conversion {
            d["converted_at"] = json!(format_ts(at));
            d["value"] = json!(value as f64 / VALUE_SCALE);
            conversions.push(json!({
                "campaign": d["campaign"],
                "decided_at": d["ts"],
                "converted_at": format_ts(at),
                "value": value as f64 / VALUE_SCALE,
            }));
        }
        decisions.push(d);
    }
    let now = now_ms();
    let actions: Vec<AgentAction> = store
        .actions(id)?
        .iter()
        .filter_map(|b| serde_json::from_slice(b).ok())
        .filter(|a: &AgentAction| a.outcome.is_none() && a.expires_ms.is_none_or(|e| e > now))
        .collect();
    Ok(json!({
        "customer": id,
        "traits": traits,
        "timers": timers,
        "decisions_total": total,
        "decisions": decisions,
        "conversions": conversions,
        "actions": actions,
    }))
}
