//! A cluster node answers a request about one customer by asking the
//! node that owns the customer's slot: `/v1/customers/{id}` and its
//! actions (the contact centre's queue and outcomes). The owner's copy is
//! the current one and only the owner may change it (an agent's outcome
//! is committed through the slot's log), so a request anywhere else is
//! forwarded, headers and body as received, once: a forwarded request is
//! marked and answered where it lands. When no owner is known (a slot
//! being moved), the node answers from its own copy.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error;
use crate::serve::Shared;

/// Marks a request one node forwarded to another.
const FORWARDED: &str = "x-nudge-forwarded";

/// Largest request body forwarded (an outcome is a small JSON object).
const MAX_BODY: usize = 1 << 20;

/// The customer id a path is about, percent-decoded.
fn customer_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/customers/")?;
    let id = rest.split('/').next()?;
    let bytes = id.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

/// The layer: forwards what another node owns, passes the rest on.
pub async fn forward(
    State(s): State<std::sync::Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(node) = &s.node else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED) {
        return next.run(req).await;
    }
    let Some(customer) = customer_of(req.uri().path()) else {
        return next.run(req).await;
    };
    if node.holds_customer(&customer) {
        return next.run(req).await;
    }
    let Some(api) = node.owner_api(&customer) else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            )
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    let mut out = client
        .request(method, &url)
        .timeout(std::time::Duration::from_secs(10))
        .header(FORWARDED, node.name())
        .body(body.to_vec());
    for (k, v) in parts.headers.iter() {
        if k == axum::http::header::HOST || k == axum::http::header::CONTENT_LENGTH {
            continue;
        }
        if let Ok(v) = v.to_str() {
            out = out.header(k.as_str(), v);
        }
    }
    match out.send().await {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let ctype = r
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
            let bytes = r.bytes().await.unwrap_or_default();
            let mut resp = (status, Body::from(bytes)).into_response();
            if let Some(c) = ctype {
                resp.headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, c);
            }
            resp
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("the node owning this customer's slot ({api}) did not answer: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_customer_is_read_from_the_path_percent_decoded() {
        assert_eq!(customer_of("/v1/customers/c-1"), Some("c-1".into()));
        assert_eq!(
            customer_of("/v1/customers/a%2Fb.c/actions/x/outcome"),
            Some("a/b.c".into())
        );
        assert_eq!(customer_of("/v1/customers/"), None);
        assert_eq!(customer_of("/v1/reports"), None);
        assert_eq!(customer_of("/v1/customers/%zz"), None);
    }
}
