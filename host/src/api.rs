//! The HTTP API: Segment-compatible ingest, the contact centre's action
//! queue, dead letters, health and metrics. Errors are JSON naming what is
//! wrong: `{"error": "...", "status": 400}`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Role;
use crate::deliver::AgentAction;
use crate::event::now_ms;
use crate::ingest::{self, Endpoint, IngestError};
use crate::serve::Shared;

type AppState = Arc<Shared>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/track", post(track))
        .route("/v1/identify", post(identify))
        .route("/v1/batch", post(batch))
        .route("/v1/import", post(batch))
        .route("/v1/page", post(page))
        .route("/v1/screen", post(screen))
        .route("/v1/group", post(group))
        .route("/v1/alias", post(alias))
        .route("/v1/customers/{id}/actions", get(actions))
        .route(
            "/v1/customers/{id}/actions/{action}/outcome",
            post(action_outcome),
        )
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/dead-letters/{id}/retry", post(retry_dead_letter))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes())
        .merge(crate::customer::routes())
        .merge(crate::results::routes())
        .merge(crate::reports::routes())
        .merge(crate::ui::routes())
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method".into(),
            )
        })
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::forward::forward,
        ))
        .with_state(state)
}

/// Every error is JSON: the responses axum's extractors make themselves
/// (a bad query string, a body over a limit) are plain text, and become
/// `{"error": <their text>, "status": …}`.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    // JSON already, or one of the dashboard's pages (HTML, for people).
    let is_ours = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/html"));
    if !(status.is_client_error() || status.is_server_error()) || is_ours {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut out = error(status, message);
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

pub(crate) fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(json!({ "error": message, "status": status.as_u16() })),
    )
        .into_response()
}

fn ingest_error(state: &Shared, e: IngestError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    state.metrics.rejected(e.status());
    let retry = e.retry_after();
    let mut resp = error(status, e.to_string());
    if let Some(secs) = retry {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

async fn track(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    ingest(s, Endpoint::Track, headers, body).await
}

async fn identify(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    ingest(s, Endpoint::Identify, headers, body).await
}

async fn batch(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    ingest(s, Endpoint::Batch, headers, body).await
}

async fn page(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    ingest(s, Endpoint::Ignored("page"), headers, body).await
}

async fn screen(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    ingest(s, Endpoint::Ignored("screen"), headers, body).await
}

async fn group(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    ingest(s, Endpoint::Ignored("group"), headers, body).await
}

async fn alias(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    ingest(s, Endpoint::Ignored("alias"), headers, body).await
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn ingest(s: AppState, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let received = Instant::now();
    let limits = &s.cfg.ingest;
    if let Err(e) = ingest::authorize(
        header_str(&headers, header::AUTHORIZATION),
        &limits.write_keys,
    ) {
        return ingest_error(&s, e);
    }
    let max = match endpoint {
        Endpoint::Batch => limits.max_batch_bytes,
        Endpoint::Track | Endpoint::Identify | Endpoint::Ignored(_) => limits.max_event_bytes,
    };
    // A compressed body is never larger than what it inflates to (past
    // gzip's few bytes of framing), so the raw limit is the same.
    let raw: Bytes = match axum::body::to_bytes(body, max + 1024).await {
        Ok(b) => b,
        Err(_) => {
            return ingest_error(
                &s,
                IngestError::TooLarge(format!("request body is over {max} bytes")),
            )
        }
    };
    let state = s.clone();
    let encoding = header_str(&headers, header::CONTENT_ENCODING).map(str::to_owned);
    // Inflating and parsing a 500 KB batch is CPU work: off the reactor.
    let parsed = tokio::task::spawn_blocking(move || {
        let body = ingest::decode_body(encoding.as_deref(), &raw, max)?;
        ingest::parse(endpoint, &body, &state.cfg.ingest, now_ms(), &state.ids)
    })
    .await
    .unwrap_or_else(|e| Err(IngestError::Unavailable(format!("parser: {e}"))));
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return ingest_error(&s, e),
    };
    if s.cfg.server.late == crate::config::Late::Refuse {
        for inc in &parsed.events {
            let ev = &inc.event;
            let late = s.watermarks.of(&ev.customer).filter(|w| ev.ts < *w);
            // A retry of what was accepted is a duplicate, not late.
            if let Some(w) = late.filter(|_| !s.store.seen_message(&ev.message_id).unwrap_or(false))
            {
                s.metrics.events_late.inc();
                return ingest_error(
                    &s,
                    IngestError::Malformed(format!(
                        "event {:?}: timestamp {} is before {}, up to which this server has already decided on the event clock (server.late = \"refuse\"): send history in timestamp order, or widen server.reorder_window",
                        ev.message_id,
                        crate::event::format_ts(ev.ts),
                        crate::event::format_ts(w)
                    )),
                );
            }
        }
    }
    s.metrics
        .events_unattributed
        .inc_by(parsed.unattributed as u64);
    let submitted = match &s.node {
        Some(node) => node.submit(parsed.events).await,
        None => s.inbox.submit(parsed.events, received).await,
    };
    match submitted {
        Ok(ack) => Json(json!({
            "success": true,
            "accepted": ack.accepted,
            "duplicates": ack.duplicates,
            "unattributed": parsed.unattributed,
            "ignored": parsed.ignored,
        }))
        .into_response(),
        Err(e) => ingest_error(&s, e),
    }
}

/// Who called, by the name of their token.
pub(crate) struct Caller {
    pub name: String,
}

/// The bearer credential of `Authorization`, whatever the scheme's case.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let (scheme, rest) = header_str(headers, header::AUTHORIZATION)?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Operator, contact-centre and reporting endpoints take `Bearer <api
/// token>` of a role that allows them: `need` is the least role (an
/// operator may do everything; an agent the contact centre's calls; a
/// viewer reads). Tokens are compared in constant time, every one in full.
pub(crate) fn check_api(
    s: &Shared,
    headers: &HeaderMap,
    need: Role,
) -> Result<Caller, Box<Response>> {
    // Legacy plain tokens were folded into `token` at start-up.
    let tokens = &s.cfg.api.token;
    if tokens.is_empty() {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "no API tokens are configured ([api] token or NUDGE_API_TOKENS)".into(),
        )));
    }
    let Some(given) = bearer(headers) else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <api token>".into(),
        )));
    };
    let mut found = None;
    for t in tokens {
        if ingest::constant_time_eq(t.secret.as_bytes(), given.as_bytes()) {
            found = Some(t);
        }
    }
    let Some(t) = found else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "unknown API token".into(),
        )));
    };
    let allowed = match need {
        Role::Operator => t.role == Role::Operator,
        Role::Agent => matches!(t.role, Role::Agent | Role::Operator),
        Role::Viewer => matches!(t.role, Role::Viewer | Role::Operator),
    };
    if !allowed {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}; this needs role {}",
                t.name,
                t.role.name(),
                need.name()
            ),
        )));
    }
    Ok(Caller {
        name: t.name.clone(),
    })
}

fn store_error(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"))
}

#[derive(Deserialize)]
struct ActionsQuery {
    /// Also expired and already-decided actions.
    #[serde(default)]
    all: bool,
}

async fn actions(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ActionsQuery>,
) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Agent) {
        return *r;
    }
    let raw = match s.store.actions(&id) {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let now = now_ms();
    let mut list: Vec<AgentAction> = raw
        .iter()
        .filter_map(|b| serde_json::from_slice(b).ok())
        .filter(|a: &AgentAction| {
            q.all || (a.outcome.is_none() && a.expires_ms.is_none_or(|e| e > now))
        })
        .collect();
    list.sort_by(|a, b| b.decided_at.cmp(&a.decided_at));
    Json(json!({ "customer": id, "actions": list })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeBody {
    outcome: String,
    #[serde(default)]
    note: Option<String>,
}

async fn action_outcome(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Agent) {
        return *r;
    }
    let req: OutcomeBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body: {e} (expected {{\"outcome\": \"accepted\" | \"declined\", \"note\": \"...\"}})"),
            )
        }
    };
    if req.outcome != "accepted" && req.outcome != "declined" {
        return error(
            StatusCode::BAD_REQUEST,
            format!("outcome: {:?} (accepted or declined)", req.outcome),
        );
    }
    match crate::actions::record_outcome(&s.store, &id, &action, req.outcome, req.note) {
        Ok(a) => Json(a).into_response(),
        Err(r) => {
            let (status, message) = r.status();
            error(status, message)
        }
    }
}

async fn dead_letters(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        return *r;
    }
    match s.store.dead_letters() {
        Ok(list) => {
            let list: Vec<Value> = list
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .collect();
            Json(json!({ "dead_letters": list })).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn retry_dead_letter(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Operator) {
        return *r;
    }
    match crate::actions::retry_dead_letter(&s.store, &s.deliver, &id) {
        Ok(()) => Json(json!({ "retrying": id })).into_response(),
        Err((status, message)) => error(status, message),
    }
}

async fn healthz(State(s): State<AppState>) -> Response {
    Json(json!({
        "status": "ok",
        "generation": s.current.load().number,
        "inflight_events": s.inbox.inflight(),
    }))
    .into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    s.metrics
        .set_queue_depth("inflight_events", s.inbox.inflight() as i64);
    if let Ok(n) = s.store.dead_letters().map(|l| l.len()) {
        s.metrics.set_queue_depth("dead_letters", n as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}
