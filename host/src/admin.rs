//! The operator API over generations and controls (bearer API token):
//!
//! - `GET /v1/generations`: every generation, newest first, with the
//!   active one's number, paused campaigns and quarantined plugins.
//! - `POST /v1/generations/reload`: read the folders now.
//! - `POST /v1/generations/{n}/activate`, `POST /v1/generations/rollback`.
//! - `GET /v1/campaigns`; `POST /v1/campaigns/{id}/pause` and `/resume`.
//! - `DELETE /v1/plugins/{name}/quarantine`: release by hand.
//! - `GET /v1/cluster` (a cluster node): members, the assigner, each
//!   slot's assigned node, owner, epoch and lag (asked of every member);
//!   `GET /v1/cluster/lag`: this node's slots' lag.
//!
//! Reads take a `viewer` (or `operator`) token; every change an
//! `operator` one. Generation and pause records name the token that asked
//! (its `name` in `[api]`), never what a client says of itself.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::api::{check_api, error};
use crate::config::Role;
use crate::controls::ControlError;
use crate::reload::{Outcome, ReloadError};
use crate::rules::TriggerRef;
use crate::serve::Shared;

type AppState = Arc<Shared>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/generations", get(generations))
        .route("/v1/generations/reload", post(reload))
        .route("/v1/generations/rollback", post(rollback))
        .route("/v1/generations/{n}/activate", post(activate))
        .route("/v1/campaigns", get(campaigns))
        .route("/v1/campaigns/{id}/pause", post(pause))
        .route("/v1/campaigns/{id}/resume", post(resume))
        .route("/v1/plugins/{name}/quarantine", delete(release))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/lag", get(cluster_lag))
}

fn not_a_cluster() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this server is not a cluster node (no [cluster] section)".into(),
    )
}

/// The cluster's status, with every member's lag.
async fn cluster(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        return *r;
    }
    let Some(node) = &s.node else {
        return not_a_cluster();
    };
    let mut st = match node.status().await {
        Ok(st) => st,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cluster status: {e}"),
            )
        }
    };
    // The other members' lag, with the caller's own credential (every
    // node has the same tokens); one that does not answer shows none.
    let token = crate::api::bearer(&headers).map(str::to_owned);
    let client = reqwest::Client::new();
    for (name, api) in st.members.clone() {
        if name == node.name() {
            continue;
        }
        let mut req = client
            .get(format!("{}/v1/cluster/lag", api.trim_end_matches('/')))
            .timeout(std::time::Duration::from_secs(2));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let lags: Option<std::collections::BTreeMap<u16, u64>> = match req.send().await {
            Ok(r) if r.status().is_success() => r
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
            _ => None,
        };
        for (slot, lag) in lags.into_iter().flatten() {
            if let Some(x) = st
                .slots
                .iter_mut()
                .find(|x| x.slot == slot && x.owner.as_deref() == Some(name.as_str()))
            {
                x.lag = Some(lag);
            }
        }
    }
    Json(json!({ "node": node.name(), "status": st })).into_response()
}

/// This node's slots: events stored and not yet read.
async fn cluster_lag(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        return *r;
    }
    match &s.node {
        Some(node) => Json(node.lags()).into_response(),
        None => not_a_cluster(),
    }
}

fn reload_error(e: ReloadError) -> Response {
    let status = match &e {
        ReloadError::Unknown(_) => StatusCode::NOT_FOUND,
        ReloadError::Rejected { .. }
        | ReloadError::Archive { .. }
        | ReloadError::Unavailable(_)
        | ReloadError::NothingToRollBack => StatusCode::CONFLICT,
        ReloadError::Watch { .. } | ReloadError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ReloadError::Shared(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

fn control_error(e: ControlError) -> Response {
    let status = match &e {
        ControlError::NoCampaign(_) | ControlError::NotQuarantined(_) => StatusCode::NOT_FOUND,
        ControlError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Runs blocking reloader work (file reads, compilation) off the async
/// threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("task: {e}")))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    /// Newest first, at most this many (default 50).
    limit: Option<usize>,
}

async fn generations(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let _caller = match check_api(&s, &headers, Role::Viewer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let view = s.reloader.controls().view();
    let all = s.reloader.list();
    let total = all.len();
    let list: Vec<_> = all.into_iter().take(q.limit.unwrap_or(50)).collect();
    Json(json!({
        "active": s.reloader.active(),
        "paused": view.paused,
        "quarantined": view.quarantined,
        "total": total,
        "generations": list,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct ReloadQuery {
    /// Build even if nothing changed, and let a publish through that looks
    /// half-done (a manifest gone, no campaign left).
    #[serde(default)]
    force: bool,
}

async fn reload(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ReloadQuery>,
) -> Response {
    let caller = match check_api(&s, &headers, Role::Operator) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let forced = if q.force { " (forced)" } else { "" };
    let cause = format!("reload requested by {}{forced}", caller.name.clone());
    let r = s.reloader.clone();
    let outcome = match blocking(move || r.reload(&cause, q.force)).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    let (status, result, number) = match outcome {
        Outcome::Activated(n) => (StatusCode::OK, "activated", Some(n)),
        Outcome::Unchanged => (StatusCode::OK, "unchanged", None),
        Outcome::Rejected(n) => (StatusCode::UNPROCESSABLE_ENTITY, "rejected", Some(n)),
        Outcome::Unshared(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not reloaded: the cluster's generations are out of reach: {e}"),
            )
        }
    };
    let record = number.and_then(|n| s.reloader.list().into_iter().find(|r| r.number == n));
    (
        status,
        Json(json!({
            "result": result,
            "active": s.reloader.active(),
            "generation": record,
        })),
    )
        .into_response()
}

async fn activate(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Response {
    let caller = match check_api(&s, &headers, Role::Operator) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let Ok(n) = n.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("generation {n:?}: not a number"),
        );
    };
    let by = format!("activated by {}", caller.name.clone());
    let r = s.reloader.clone();
    match blocking(move || r.activate(n, &by)).await {
        Ok(Ok(record)) => Json(record).into_response(),
        Ok(Err(e)) => reload_error(e),
        Err(resp) => resp,
    }
}

async fn rollback(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match check_api(&s, &headers, Role::Operator) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let by = format!("rollback by {}", caller.name.clone());
    let r = s.reloader.clone();
    match blocking(move || r.rollback(&by)).await {
        Ok(Ok(record)) => Json(record).into_response(),
        Ok(Err(e)) => reload_error(e),
        Err(resp) => resp,
    }
}

async fn campaigns(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let _caller = match check_api(&s, &headers, Role::Viewer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let gen = s.current.load();
    let view = s.reloader.controls().view();
    let list: Vec<_> = gen
        .rules
        .campaigns
        .iter()
        .map(|c| {
            let trigger = match &c.trigger {
                TriggerRef::Plugin { plugin, firing } => format!("{plugin}/{firing}"),
                TriggerRef::Event { name } => format!("event {name}"),
            };
            json!({
                "id": c.id,
                "owner": c.owner,
                "channel": c.channel,
                "trigger": trigger,
                "response": c.response,
                "file": c.file.display().to_string(),
                "sha256": c.hash,
                "blocked": view.blocked(&gen, c),
                "paused": view.paused.get(&c.id),
            })
        })
        .collect();
    Json(json!({ "generation": gen.number, "campaigns": list })).into_response()
}

async fn pause(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    set_paused(s, headers, id, true).await
}

async fn resume(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    set_paused(s, headers, id, false).await
}

/// Pauses or resumes campaign `id`; answers with its pause record (null
/// once resumed).
async fn set_paused(s: AppState, headers: HeaderMap, id: String, pause: bool) -> Response {
    let caller = match check_api(&s, &headers, Role::Operator) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let (gen, controls, by, campaign) = (
        s.current.load(),
        s.reloader.controls(),
        caller.name.clone(),
        id.clone(),
    );
    let changed = blocking(move || match pause {
        true => controls.pause(&gen, &campaign, &by),
        false => controls.resume(&gen, &campaign, &by),
    });
    match changed.await {
        Ok(Ok(view)) => {
            Json(json!({ "campaign": id, "paused": view.paused.get(&id) })).into_response()
        }
        Ok(Err(e)) => control_error(e),
        Err(resp) => resp,
    }
}

async fn release(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let caller = match check_api(&s, &headers, Role::Operator) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let (controls, by, plugin) = (s.reloader.controls(), caller.name.clone(), name.clone());
    match blocking(move || controls.release(&plugin, &by)).await {
        Ok(Ok(view)) => {
            Json(json!({ "released": name, "quarantined": view.quarantined })).into_response()
        }
        Ok(Err(e)) => control_error(e),
        Err(resp) => resp,
    }
}
