//! People: one customer as the engine sees them, and the contact centre's
//! screen: the pre-thought actions for the customer on the line, with
//! accept and decline.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::html::{self, esc, Nav};
use super::{back_to, checked, html_response, plain, session, viewer, Need};
use crate::deliver::AgentAction;
use crate::event::now_ms;
use crate::serve::Shared;

#[derive(Deserialize)]
pub struct Who {
    id: Option<String>,
}

fn search(action: &str, label: &str, id: &str) -> String {
    format!(
        r#"<form method="get" action="{action}" class="search" role="search"><label for="id">{label}</label> <input id="id" name="id" value="{}" required autocomplete="off"> <button type="submit">Open</button></form>"#,
        esc(id)
    )
}

/// A JSON value as short text (strings without their quotes).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub async fn customer(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<Who>,
) -> Response {
    let sess = match session(&s, &headers, Need::Anyone, "/ui/customer") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let v = viewer(&sess);
    let id = q.id.unwrap_or_default();
    let mut body = search("/ui/customer", "Customer id", &id);
    if !id.is_empty() {
        let store = s.store.clone();
        let cid = id.clone();
        let view =
            match tokio::task::spawn_blocking(move || crate::customer::view(&store, &cid, 200))
                .await
            {
                Ok(Ok(view)) => view,
                Ok(Err(e)) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            };
        body.push_str(&customer_body(&id, &view, v.is_agent()));
    }
    html_response(html::page("Customer", Nav::Customer, Some(&v), &body))
}

fn customer_body(id: &str, view: &Value, agent: bool) -> String {
    let mut s = String::new();
    let _ = write!(s, r#"<h2 id="customer-id">{}</h2>"#, esc(id));
    if agent {
        let _ = write!(
            s,
            r#"<p><a href="/ui/contact?id={}">Open in the contact centre</a></p>"#,
            html::url(id)
        );
    }
    s.push_str(r#"<h3>Traits</h3><table class="data" id="traits"><tbody>"#);
    if let Some(t) = view["traits"].as_object() {
        if t.is_empty() {
            s.push_str("<tr><td>none yet</td></tr>");
        }
        for (k, v) in t {
            let _ = write!(
                s,
                r#"<tr><th scope="row">{}</th><td>{}</td></tr>"#,
                esc(k),
                esc(&text(v))
            );
        }
    }
    s.push_str("</tbody></table>");
    s.push_str(r#"<h3>Timeline</h3><table class="data" id="timeline"><thead><tr><th scope="col">When</th><th scope="col">Campaign</th><th scope="col">Outcome</th><th scope="col">Why</th><th scope="col">Trigger</th><th scope="col">Converted</th></tr></thead><tbody>"#);
    let decisions = view["decisions"].as_array().cloned().unwrap_or_default();
    if decisions.is_empty() {
        s.push_str(r#"<tr><td colspan="6">No decisions yet.</td></tr>"#);
    }
    for d in &decisions {
        let converted = match (&d["converted_at"], &d["value"]) {
            (Value::String(at), v) => format!("{at} ({})", text(v)),
            _ => String::new(),
        };
        let _ = write!(
            s,
            r#"<tr><td>{}</td><td>{}</td><td><span class="outcome">{}</span></td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&text(&d["ts"])),
            esc(&text(&d["campaign"])),
            esc(&text(&d["outcome"])),
            esc(&text(&d["reason"])),
            esc(&text(&d["trigger"])),
            esc(&converted)
        );
    }
    s.push_str("</tbody></table>");
    s.push_str(r#"<h3>Pending timers</h3><ul id="timers">"#);
    let mut any = false;
    if let Some(t) = view["timers"].as_object() {
        for (plugin, list) in t {
            for timer in list.as_array().into_iter().flatten() {
                any = true;
                let _ = write!(
                    s,
                    "<li>{}: {} due {}</li>",
                    esc(plugin),
                    esc(&text(&timer["key"])),
                    esc(&text(&timer["due"]))
                );
            }
        }
    }
    if !any {
        s.push_str("<li>none</li>");
    }
    s.push_str("</ul>");
    let actions = view["actions"].as_array().map_or(0, Vec::len);
    let _ = write!(s, "<h3>Open actions</h3><p>{actions}</p>");
    s
}

pub async fn contact(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<Who>,
) -> Response {
    let sess = match session(&s, &headers, Need::Agent, "/ui/contact") {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let v = viewer(&sess);
    let id = q.id.unwrap_or_default();
    let mut body = search("/ui/contact", "Customer on the line", &id);
    if !id.is_empty() {
        let now = now_ms();
        let (store, cid) = (s.store.clone(), id.clone());
        let raw = tokio::task::spawn_blocking(move || store.actions(&cid))
            .await
            .unwrap_or_else(|e| {
                Err(crate::store::StoreError::Corrupt {
                    what: "actions",
                    customer: String::new(),
                    problem: e.to_string(),
                })
            });
        let actions: Vec<AgentAction> = match raw {
            Ok(raw) => raw
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .filter(|a: &AgentAction| {
                    a.outcome.is_none() && a.expires_ms.is_none_or(|e| e > now)
                })
                .collect(),
            Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
        let _ = write!(body, r#"<h2 id="customer-id">{}</h2>"#, esc(&id));
        if actions.is_empty() {
            body.push_str(
                r#"<p id="no-actions">No open action for this customer: nothing pre-thought.</p>"#,
            );
        }
        for a in &actions {
            let _ = write!(
                body,
                r#"<article class="action" id="action-{aid}" aria-labelledby="script-{aid}">
<p class="script" id="script-{aid}">{script}</p>
<dl class="facts"><dt>Why</dt><dd>{why}</dd><dt>Campaign</dt><dd>{campaign}</dd><dt>Trigger</dt><dd>{trigger}</dd><dt>Decided</dt><dd>{decided}</dd><dt>Expires</dt><dd>{expires}</dd></dl>
<form method="post" action="/ui/contact/outcome" class="answer">{csrf}<input type="hidden" name="customer" value="{cust}"><input type="hidden" name="action" value="{aid}">
<label for="note-{aid}">Note</label> <input id="note-{aid}" name="note" autocomplete="off">
<button type="submit" name="outcome" value="accepted" class="accept">Accept</button> <button type="submit" name="outcome" value="declined" class="decline">Decline</button></form>
</article>"#,
                aid = esc(&a.id),
                script = esc(&a.script),
                why = esc(&a.why),
                campaign = esc(&a.campaign),
                trigger = esc(&a.trigger),
                decided = esc(&a.decided_at),
                expires = esc(a.expires_at.as_deref().unwrap_or("never")),
                csrf = v.csrf_field(),
                cust = esc(&id),
            );
        }
    }
    html_response(html::page("Contact centre", Nav::Contact, Some(&v), &body))
}

#[derive(Deserialize)]
pub struct Answer {
    csrf: String,
    customer: String,
    action: String,
    outcome: String,
    note: Option<String>,
}

pub async fn outcome(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(f): Form<Answer>,
) -> Response {
    let sess = match checked(&s, &headers, Need::Agent, &f.csrf) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if f.outcome != "accepted" && f.outcome != "declined" {
        return plain(StatusCode::BAD_REQUEST, "outcome: accepted or declined");
    }
    let note = f.note.filter(|n| !n.trim().is_empty());
    match crate::actions::record_outcome(&s.store, &f.customer, &f.action, f.outcome.clone(), note)
    {
        Ok(_) => {
            tracing::info!(agent = %sess.name, customer = %f.customer, action = %f.action, outcome = %f.outcome, "action answered in the dashboard");
            back_to(&format!("/ui/contact?id={}", html::url(&f.customer)))
        }
        Err(r) => {
            let (status, message) = r.status();
            plain(status, &message)
        }
    }
}
