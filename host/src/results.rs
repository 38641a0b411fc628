//! Reading results over HTTP: `GET /v1/decisions`, the decision log as
//! JSON Lines, paged by cursor, for export to a warehouse.
//!
//! A page scans only its range of the log (the log is ordered by time,
//! then customer, then campaign); filters apply within it.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::api::{check_api, error};
use crate::config::Role;
use crate::serve::Shared;

/// Most decisions in one page.
pub const MAX_PAGE: usize = 10_000;

/// The header that carries the next page's cursor.
pub const NEXT_CURSOR: &str = "nudge-next-cursor";

pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/v1/decisions", get(decisions))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionsQuery {
    campaign: Option<String>,
    customer: Option<String>,
    /// RFC 3339 or epoch milliseconds; inclusive.
    from: Option<String>,
    /// RFC 3339 or epoch milliseconds; exclusive.
    to: Option<String>,
    /// From the previous page's `Nudge-Next-Cursor`.
    cursor: Option<String>,
    /// Decisions per page (default 1000, at most [`MAX_PAGE`]).
    limit: Option<usize>,
}

/// A time given as RFC 3339 or as epoch milliseconds.
pub(crate) fn parse_time(field: &str, v: &str) -> Result<i64, String> {
    v.parse::<i64>()
        .ok()
        .or_else(|| crate::event::parse_ts(v))
        .ok_or_else(|| format!("{field}: {v:?} is not an RFC 3339 time or epoch milliseconds"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2048 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Deserialize)]
struct Who<'a> {
    #[serde(borrow)]
    customer: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    campaign: std::borrow::Cow<'a, str>,
}

async fn decisions(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<DecisionsQuery>,
) -> Response {
    if let Err(r) = check_api(&s, &headers, Role::Viewer) {
        return *r;
    }
    let from = match q.from.as_deref().map(|v| parse_time("from", v)).transpose() {
        Ok(v) => v,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let to = match q.to.as_deref().map(|v| parse_time("to", v)).transpose() {
        Ok(v) => v,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let cursor = match q.cursor.as_deref().map(unhex) {
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "cursor: not one this server gave (hex of a decision key)".into(),
            )
        }
        Some(Some(c)) => Some(c),
        None => None,
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_PAGE);
    let (campaign, customer) = (q.campaign, q.customer);
    let keep = move |line: &[u8]| match serde_json::from_slice::<Who<'_>>(line) {
        Ok(w) => {
            campaign.as_deref().is_none_or(|c| c == w.campaign)
                && customer.as_deref().is_none_or(|c| c == w.customer)
        }
        Err(_) => false,
    };
    let store = s.store.clone();
    // A page reads up to MAX_PAGE values from sled: off the async threads.
    let page = tokio::task::spawn_blocking(move || {
        store.decisions_page(from, to, cursor.as_deref(), limit, keep)
    })
    .await;
    let (lines, next) = match page {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("reading: {e}")),
    };
    let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        body.extend_from_slice(&l);
        body.push(b'\n');
    }
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&hex(&n)).ok()) {
        resp.headers_mut().insert(NEXT_CURSOR, next);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let k = b"D\x80\x00\x01c-1\0welcome".to_vec();
        assert_eq!(unhex(&hex(&k)), Some(k));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
