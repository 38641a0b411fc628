//! The dashboard `nudge serve` serves under `/ui/`: results for managers,
//! the contact centre's screen for agents, operations for operators.
//!
//! Pages are HTML rendered here, charts SVG rendered here, and every asset
//! is compiled into the binary: nothing is fetched at run time and there is
//! no build step. Script only refreshes the live parts of a page; every
//! page works without it.
//!
//! # Layout
//!
//! - `session.rs`: login with an API token, the session cookie, CSRF.
//! - `html.rs`: escaping, numbers for people, the page frame.
//! - `charts.rs`: forest plot, lines with a band, bars, as SVG.
//! - `results.rs`: Overview, Campaigns, a campaign (and `report --html`).
//! - `people.rs`: a customer, and the contact centre.
//! - `ops.rs`: Operations, with its live part and its sampler.
//! - `assets/`: the stylesheet and the script.
//!
//! # Access
//!
//! Nothing but the login page and the assets answers without a session.
//! Viewers see results and customers, agents customers and the contact
//! centre, operators everything. Every state-changing request is a POST
//! carrying the session's CSRF token, and the cookie is `SameSite=Strict`.

use std::sync::Arc;

use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::config::Role;
use crate::ingest::constant_time_eq;
use crate::serve::Shared;

pub mod charts;
pub mod html;
mod ops;
mod people;
pub mod results;
pub mod session;

use html::{esc, Nav, Viewer};
pub use ops::{sample, Sampler};
use session::{Session, Sessions};

/// What the dashboard keeps while the server runs.
#[derive(Default)]
pub struct UiState {
    pub sessions: Sessions,
    pub sampler: Sampler,
}

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(home))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/assets/style.css", get(style))
        .route("/ui/assets/app.js", get(script))
        .route("/ui/overview", get(results::overview))
        .route("/ui/campaigns", get(results::campaigns))
        .route("/ui/campaigns/{id}", get(results::campaign))
        .route("/ui/campaigns/{id}/pause", post(results::pause))
        .route("/ui/campaigns/{id}/resume", post(results::resume))
        .route("/ui/customer", get(people::customer))
        .route("/ui/contact", get(people::contact))
        .route("/ui/contact/outcome", post(people::outcome))
        .route("/ui/operations", get(ops::page))
        .route("/ui/operations/live", get(ops::live))
        .route("/ui/operations/dead-letters/retry", post(ops::retry))
        .route("/ui/operations/quarantine/release", post(ops::release))
        .route("/ui/operations/generations/activate", post(ops::activate))
}

/// What a page needs of the viewer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Results: viewers and operators.
    Results,
    /// A customer: anyone logged in.
    Anyone,
    /// The contact centre: agents and operators.
    Agent,
    Operator,
}

impl Need {
    fn allows(self, role: Role) -> bool {
        match self {
            Need::Results => matches!(role, Role::Viewer | Role::Operator),
            Need::Anyone => true,
            Need::Agent => matches!(role, Role::Agent | Role::Operator),
            Need::Operator => role == Role::Operator,
        }
    }
}

/// The caller's session if it allows `need`; else a redirect to the login
/// (no session) or a 403 page (a role that does not allow it).
pub(crate) fn session(
    s: &Shared,
    headers: &HeaderMap,
    need: Need,
    here: &str,
) -> Result<Session, Box<Response>> {
    let Some(sess) = s.ui.sessions.get(headers) else {
        return Err(Box::new(
            Redirect::to(&format!("/ui/login?next={}", html::url(here))).into_response(),
        ));
    };
    if !need.allows(sess.role) {
        let v = viewer(&sess);
        let body = format!(
            "<p>Your token has the role <strong>{}</strong>, which does not open this page.</p>",
            sess.role.name()
        );
        let page = html::page("Not for your role", Nav::None, Some(&v), &body);
        return Err(Box::new(
            (StatusCode::FORBIDDEN, html_response(page)).into_response(),
        ));
    }
    Ok(sess)
}

/// A state-changing request: its session must allow `need`, and its form
/// must carry that session's CSRF token.
pub(crate) fn checked(
    s: &Shared,
    headers: &HeaderMap,
    need: Need,
    csrf: &str,
) -> Result<Session, Box<Response>> {
    if !same_origin(headers) {
        return Err(Box::new(plain(
            StatusCode::FORBIDDEN,
            "a form from another site: refused",
        )));
    }
    let Some(sess) = s.ui.sessions.get(headers) else {
        return Err(Box::new(plain(StatusCode::UNAUTHORIZED, "not logged in")));
    };
    if !constant_time_eq(sess.csrf.as_bytes(), csrf.as_bytes()) {
        return Err(Box::new(plain(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: reload the page",
        )));
    }
    if !need.allows(sess.role) {
        return Err(Box::new(plain(
            StatusCode::FORBIDDEN,
            &format!("role {} may not do this", sess.role.name()),
        )));
    }
    Ok(sess)
}

/// Whether a POST comes from our own pages, as far as the browser says:
/// `Sec-Fetch-Site` (every current browser sends it) and, failing that,
/// `Origin` against `Host`. Requests without either (curl) pass: the
/// session cookie and the CSRF token still stand.
fn same_origin(headers: &HeaderMap) -> bool {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (get("origin"), get("host")) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host),
        _ => true,
    }
}

pub(crate) fn viewer(s: &Session) -> Viewer<'_> {
    Viewer {
        name: &s.name,
        role: s.role,
        csrf: &s.csrf,
    }
}

pub(crate) fn html_response(body: String) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Pages show what the server holds now; never from a cache, never framed.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    r
}

pub(crate) fn plain(status: StatusCode, message: &str) -> Response {
    let body = html::page(
        "Refused",
        Nav::None,
        None,
        &format!("<p>{}</p>", esc(message)),
    );
    (status, html_response(body)).into_response()
}

/// Back to where a form came from (a path of ours only).
pub(crate) fn back_to(path: &str) -> Response {
    let safe = if path.starts_with("/ui/")
        && !path.starts_with("//")
        && path.bytes().all(|b| b.is_ascii_graphic())
    {
        path
    } else {
        "/ui/"
    };
    Redirect::to(safe).into_response()
}

async fn home(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match s.ui.sessions.get(&headers) {
        None => Redirect::to("/ui/login").into_response(),
        Some(sess) if Need::Results.allows(sess.role) => {
            Redirect::to("/ui/overview").into_response()
        }
        Some(_) => Redirect::to("/ui/contact").into_response(),
    }
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

fn login_form(next: &str, error: Option<&str>) -> String {
    let error = error.map_or(String::new(), |e| {
        format!(r#"<p class="error" role="alert">{}</p>"#, esc(e))
    });
    let body = format!(
        r#"{error}<form method="post" action="/ui/login" class="login">
<input type="hidden" name="next" value="{next}">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Log in</button>
<p class="hint">A token from <code>[api] tokens</code> (or <code>NUDGE_API_TOKENS</code>): a viewer sees results, an agent the contact centre, an operator everything.</p>
</form>"#,
        next = esc(next)
    );
    html::page("Log in", Nav::None, None, &body)
}

async fn login_page(Query(q): Query<Next>) -> Response {
    html_response(login_form(q.next.as_deref().unwrap_or("/ui/"), None))
}

#[derive(Deserialize)]
struct Login {
    token: String,
    next: Option<String>,
}

async fn login(State(s): State<Arc<Shared>>, headers: HeaderMap, Form(f): Form<Login>) -> Response {
    if !same_origin(&headers) {
        return plain(
            StatusCode::FORBIDDEN,
            "a login form from another site: refused",
        );
    }
    let next = f.next.as_deref().unwrap_or("/ui/");
    let mut found = None;
    // Every token compared in full, in constant time.
    for t in &s.cfg.api.token {
        if constant_time_eq(t.secret.as_bytes(), f.token.trim().as_bytes()) {
            found = Some(t);
        }
    }
    let Some(t) = found else {
        // Guessing tokens costs half a second a try.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let page = login_form(next, Some("That token is not one of this server's."));
        return (StatusCode::UNAUTHORIZED, html_response(page)).into_response();
    };
    let Some((id, _)) = s.ui.sessions.create(&t.name, t.role) else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for a session id",
        );
    };
    tracing::info!(token = %t.name, role = t.role.name(), "dashboard login");
    let mut r = back_to(next);
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(Some(&id))) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: String,
}

async fn logout(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Err(r) = checked(&s, &headers, Need::Anyone, &f.csrf) {
        return *r;
    }
    s.ui.sessions.remove(&headers);
    let mut r = Redirect::to("/ui/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(None)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/style.css"))
}

async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn forms_from_other_sites_are_refused() {
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(same_origin(&headers(&[("sec-fetch-site", "none")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(same_origin(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080")
        ])));
        // curl: neither header; the cookie and the CSRF token still stand.
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8080")])));
    }

    #[test]
    fn redirects_stay_on_our_pages() {
        let to = |p: &str| {
            back_to(p)
                .headers()
                .get(header::LOCATION)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(to("/ui/campaigns").as_deref(), Some("/ui/campaigns"));
        assert_eq!(to("https://evil.example/").as_deref(), Some("/ui/"));
        assert_eq!(to("//evil.example/ui/").as_deref(), Some("/ui/"));
        assert_eq!(to("/ui/\nSet-Cookie: x").as_deref(), Some("/ui/"));
    }
}
