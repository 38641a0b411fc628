//! Dashboard sessions: a login with an API token of one of the roles gives
//! an `HttpOnly`, `SameSite=Strict` cookie naming a session held here; each
//! session has its own CSRF token, which every state-changing form sends
//! back. Sessions live in memory: a restart logs everyone out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

use crate::config::Role;

/// The session cookie's name.
pub const COOKIE: &str = "nudge_session";

/// How long a session lasts without a request.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);

/// Most sessions held; past it the least recently used goes.
const MAX_SESSIONS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct Session {
    /// The token's name (audits name it).
    pub name: String,
    pub role: Role,
    pub csrf: String,
    last: Instant,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes, hex: a session id or a CSRF token.
fn secret() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Sessions {
    /// A new session for token `name` with `role`: its id, for the cookie.
    pub fn create(&self, name: &str, role: Role) -> Option<(String, Session)> {
        let (id, csrf) = (secret()?, secret()?);
        let s = Session {
            name: name.to_owned(),
            role,
            csrf,
            last: Instant::now(),
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.last.elapsed() < IDLE);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), s.clone());
        Some((id, s))
    }

    /// The session the request's cookie names, if it is live.
    pub fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.get_mut(id)?;
        if s.last.elapsed() >= IDLE {
            map.remove(id);
            return None;
        }
        s.last = Instant::now();
        Some(s.clone())
    }

    pub fn remove(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
    }
}

/// The value of cookie `name` in the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value that starts a session (`None`: ends it).
pub fn set_cookie(id: Option<&str>) -> String {
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            IDLE.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_and_forgotten_at_logout() {
        let sessions = Sessions::default();
        let (id, s) = sessions.create("ops", Role::Operator).unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(id, s.csrf);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={id}").parse().unwrap(),
        );
        assert_eq!(sessions.get(&h).unwrap().name, "ops");
        sessions.remove(&h);
        assert!(sessions.get(&h).is_none());
        let mut wrong = HeaderMap::new();
        wrong.insert(header::COOKIE, format!("{COOKIE}=nope").parse().unwrap());
        assert!(sessions.get(&wrong).is_none());
        assert!(set_cookie(Some("x")).contains("HttpOnly; SameSite=Strict"));
    }
}
