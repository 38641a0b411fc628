//! Ingest requests in the shape of Segment's HTTP tracking API, so that
//! Segment's and RudderStack's SDKs work unchanged: authentication by write
//! key, gzip bodies, `track`/`identify`/`batch`, Segment's size limits.
//!
//! A request is validated whole before anything is stored: one bad event
//! refuses the request, naming the event and the field.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::config;
use crate::event::{format_ts, parse_ts, Event};

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Track,
    Identify,
    Batch,
    /// `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/alias`: Segment calls
    /// the SDKs make, acknowledged as in a batch and not decided.
    Ignored(&'static str),
}

/// Why a request was refused; maps onto an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Unsupported(String),
    /// Queues are full: retry after this many seconds.
    #[error("busy: {message}")]
    Busy { message: String, retry_after: u64 },
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl IngestError {
    pub fn status(&self) -> u16 {
        match self {
            IngestError::Unauthorized(_) => 401,
            IngestError::TooLarge(_) => 413,
            IngestError::Malformed(_) => 400,
            IngestError::Unsupported(_) => 415,
            IngestError::Busy { .. } => 503,
            IngestError::Unavailable(_) => 503,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            IngestError::Busy { retry_after, .. } => Some(*retry_after),
            IngestError::Unavailable(_) => Some(5),
            _ => None,
        }
    }
}

/// One accepted event: parsed, and as stored in the inbox.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event: Event,
    /// The event's JSON as accepted (defaults filled in).
    pub raw: Vec<u8>,
}

/// A validated request.
#[derive(Debug, Default)]
pub struct Parsed {
    pub events: Vec<Incoming>,
    /// Events with only an `anonymousId`: acknowledged, but there is no
    /// customer to decide for.
    pub unattributed: usize,
    /// Valid Segment calls Nudge does not act on (`page`, `screen`,
    /// `group`, `alias`): acknowledged, so an SDK's batch is not refused
    /// for them, and counted.
    pub ignored: usize,
}

/// Segment call types that are valid but carry nothing to decide on.
const IGNORED_TYPES: &[&str] = &["page", "screen", "group", "alias"];

/// Checks `Authorization`: HTTP Basic with the write key as user name (how
/// Segment's SDKs send it) or `Bearer <write key>`. No keys configured:
/// every request is let in.
pub fn authorize(header: Option<&str>, keys: &[String]) -> Result<(), IngestError> {
    if keys.is_empty() {
        return Ok(());
    }
    let Some(h) = header else {
        return Err(IngestError::Unauthorized(
            "missing Authorization header: use HTTP Basic with the write key as user name, or Bearer <write key>".into(),
        ));
    };
    // Schemes are case-insensitive (RFC 9110).
    let (scheme, credentials) = h.split_once(' ').unwrap_or((h, ""));
    let key = if scheme.eq_ignore_ascii_case("basic") {
        let b = credentials;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|_| {
                IngestError::Unauthorized("Authorization: Basic credentials are not base64".into())
            })?;
        let text = String::from_utf8_lossy(&decoded).into_owned();
        text.split_once(':')
            .map(|(u, _)| u.to_owned())
            .unwrap_or(text)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        credentials.trim().to_owned()
    } else {
        return Err(IngestError::Unauthorized(
            "Authorization: expected Basic or Bearer".into(),
        ));
    };
    // Compare against every key in full, so timing says nothing about
    // which prefix matched.
    let mut ok = false;
    for k in keys {
        ok |= constant_time_eq(k.as_bytes(), key.as_bytes());
    }
    if ok {
        Ok(())
    } else {
        Err(IngestError::Unauthorized("unknown write key".into()))
    }
}

/// Equal, in time that depends only on the lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Digests first: equal lengths whatever was sent, so the time taken
    // says nothing about a secret's length either.
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The request body, gunzipped if it says so, at most `max` bytes.
pub fn decode_body(
    encoding: Option<&str>,
    body: &[u8],
    max: usize,
) -> Result<Vec<u8>, IngestError> {
    let too_large = || IngestError::TooLarge(format!("request body is over {max} bytes"));
    match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("identity") => {
            if body.len() > max {
                return Err(too_large());
            }
            Ok(body.to_vec())
        }
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::with_capacity(body.len() * 4);
            // Read one byte past the limit to tell "at the limit" from
            // "over it" without inflating a gzip bomb further.
            flate2::read::MultiGzDecoder::new(body)
                .take(max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| IngestError::Malformed(format!("gzip body: {e}")))?;
            if out.len() > max {
                return Err(too_large());
            }
            Ok(out)
        }
        Some(other) => Err(IngestError::Unsupported(format!(
            "Content-Encoding {other:?} (use gzip or none)"
        ))),
    }
}

/// Makes message ids for events sent without one (Segment generates them
/// server-side too).
pub struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl MessageIds {
    pub fn new() -> MessageIds {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        MessageIds {
            prefix: format!("nudge-{start:x}-{:x}", std::process::id()),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl Default for MessageIds {
    fn default() -> Self {
        MessageIds::new()
    }
}

/// Validates a decoded body from `endpoint`. `now_ms` fills a missing
/// `timestamp` (Segment uses the time received).
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    limits: &config::Ingest,
    now_ms: i64,
    ids: &MessageIds,
) -> Result<Parsed, IngestError> {
    let mut out = Parsed::default();
    let text = std::str::from_utf8(body)
        .map_err(|e| IngestError::Malformed(format!("body is not UTF-8: {e}")))?;
    let skew = limits.max_clock_skew.0.as_millis() as i64;
    match endpoint {
        Endpoint::Batch => {
            // The events stay as the client wrote them (no re-encoding):
            // each is checked against Segment's per-event limit as sent.
            let (items, batch_sent_at) = batch_items(text)?;
            out.events.reserve(items.len());
            for (i, raw) in items.into_iter().enumerate() {
                let at = || format!("batch[{i}]");
                let raw = raw.get();
                if raw.len() > limits.max_event_bytes {
                    return Err(IngestError::TooLarge(format!(
                        "{}: event is {} bytes, over the {}-byte limit",
                        at(),
                        raw.len(),
                        limits.max_event_bytes
                    )));
                }
                // Fast path: a complete event, as SDKs send them.
                match Event::parse(raw) {
                    Ok(event) if event.message_id.chars().count() <= limits.max_message_id => {
                        out.events.push(Incoming {
                            event,
                            raw: raw.as_bytes().to_vec(),
                        })
                    }
                    // Defaults to fill in, an anonymous event, or an error
                    // to name precisely.
                    _ => {
                        let m = match serde_json::from_str::<Value>(raw) {
                            Ok(Value::Object(m)) => m,
                            _ => {
                                return Err(IngestError::Malformed(format!(
                                    "{}: must be an object",
                                    at()
                                )))
                            }
                        };
                        accept(&at(), m, None, limits, now_ms, ids, &mut out)?;
                    }
                }
                if let Some(last) = out.events.last_mut().filter(|e| e.event.ts > now_ms + skew) {
                    let at = at();
                    bound_clock(&at, last, batch_sent_at, now_ms, skew)?;
                }
            }
        }
        Endpoint::Ignored(kind) => {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| IngestError::Malformed(format!("body is not valid JSON: {e}")))?;
            let Value::Object(m) = value else {
                return Err(IngestError::Malformed("body must be a JSON object".into()));
            };
            match m.get("type") {
                None | Some(Value::Null) => {}
                Some(Value::String(t)) if t == kind => {}
                Some(other) => {
                    return Err(IngestError::Malformed(format!(
                        "event.type: {other} sent to /v1/{kind}"
                    )))
                }
            }
            out.ignored += 1;
        }
        Endpoint::Track | Endpoint::Identify => {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| IngestError::Malformed(format!("body is not valid JSON: {e}")))?;
            let Value::Object(m) = value else {
                return Err(IngestError::Malformed("body must be a JSON object".into()));
            };
            let kind = if endpoint == Endpoint::Track {
                "track"
            } else {
                "identify"
            };
            accept("event", m, Some(kind), limits, now_ms, ids, &mut out)?;
            if let Some(last) = out.events.last_mut().filter(|e| e.event.ts > now_ms + skew) {
                bound_clock("event", last, None, now_ms, skew)?;
            }
        }
    }
    Ok(out)
}

/// An event dated more than `skew` after `now`: corrected by the client's
/// `sentAt` (its own, else the batch's) if that brings it within the
/// bound, refused otherwise. A future timestamp would make the event's
/// decisions count as recent for ever, and on the event clock fire every
/// pending timer at once.
fn bound_clock(
    at: &str,
    inc: &mut Incoming,
    batch_sent_at: Option<i64>,
    now: i64,
    skew: i64,
) -> Result<(), IngestError> {
    let mut m = match serde_json::from_slice::<Value>(&inc.raw) {
        Ok(Value::Object(m)) => m,
        _ => return Err(IngestError::Malformed(format!("{at}: must be an object"))),
    };
    let sent_at = match m.get("sentAt") {
        Some(Value::String(s)) => parse_ts(s),
        _ => batch_sent_at,
    };
    let ts = inc.event.ts;
    let corrected = sent_at.map(|sent| ts.saturating_add(now - sent));
    match corrected {
        Some(c) if c <= now + skew => {
            m.insert("timestamp".into(), Value::String(format_ts(c)));
            inc.event.ts = c;
            inc.raw = serde_json::to_vec(&m).unwrap_or_default();
            Ok(())
        }
        _ => Err(IngestError::Malformed(format!(
            "{at}.timestamp: {} is {} after the server's clock ({}), more than ingest.max_clock_skew allows ({}){}",
            format_ts(ts),
            human_ms(ts - now),
            format_ts(now),
            human_ms(skew),
            if sent_at.is_some() {
                ", even corrected by sentAt"
            } else {
                "; send sentAt or correct the client's clock"
            }
        ))),
    }
}

/// A span for people: `5m`, `3h`, `12d`, `7973y`.
fn human_ms(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s if s < 2 * 31_557_600 => format!("{}d", s / 86_400),
        s => format!("{}y", s / 31_557_600),
    }
}

/// The elements of a batch body's `batch` array, unparsed, and the batch's
/// `sentAt` if it has a valid one.
fn batch_items(
    text: &str,
) -> Result<(Vec<&serde_json::value::RawValue>, Option<i64>), IngestError> {
    use serde_json::value::RawValue;
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default)]
        batch: Option<&'a RawValue>,
        #[serde(default, rename = "sentAt")]
        sent_at: Option<Value>,
    }
    let not_json =
        |e: serde_json::Error| IngestError::Malformed(format!("body is not valid JSON: {e}"));
    let top: Top = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            IngestError::Malformed("body must be a JSON object with a `batch` array".into())
        } else {
            not_json(e)
        }
    })?;
    let batch = top
        .batch
        .ok_or_else(|| IngestError::Malformed("field `batch` is missing".into()))?;
    let sent_at = match &top.sent_at {
        Some(Value::String(s)) => parse_ts(s),
        _ => None,
    };
    serde_json::from_str::<Vec<&RawValue>>(batch.get())
        .map(|items| (items, sent_at))
        .map_err(|_| IngestError::Malformed("field `batch` must be an array".into()))
}

fn accept(
    at: &str,
    mut m: Map<String, Value>,
    kind: Option<&str>,
    limits: &config::Ingest,
    now_ms: i64,
    ids: &MessageIds,
    out: &mut Parsed,
) -> Result<(), IngestError> {
    let bad =
        |field: &str, problem: String| IngestError::Malformed(format!("{at}.{field}: {problem}"));
    if let Some(kind) = kind {
        match m.get("type") {
            None | Some(Value::Null) => {
                m.insert("type".into(), Value::String(kind.into()));
            }
            Some(Value::String(t)) if t == kind => {}
            Some(other) => {
                return Err(bad("type", format!("{other} sent to /v1/{kind}")));
            }
        }
    }
    match m.get("messageId") {
        None | Some(Value::Null) => {
            m.insert("messageId".into(), Value::String(ids.next()));
        }
        Some(Value::String(s)) if s.chars().count() > limits.max_message_id => {
            return Err(bad(
                "messageId",
                format!("longer than {} characters", limits.max_message_id),
            ));
        }
        _ => {}
    }
    if matches!(m.get("timestamp"), None | Some(Value::Null)) {
        m.insert("timestamp".into(), Value::String(format_ts(now_ms)));
    }
    if let Some(Value::String(t)) = m.get("type") {
        if IGNORED_TYPES.contains(&t.as_str()) {
            out.ignored += 1;
            return Ok(());
        }
    }
    let anonymous_only = matches!(m.get("userId"), None | Some(Value::Null))
        && matches!(m.get("anonymousId"), Some(Value::String(s)) if !s.is_empty());
    let raw = serde_json::to_vec(&m).unwrap_or_default();
    if raw.len() > limits.max_event_bytes {
        return Err(IngestError::TooLarge(format!(
            "{at}: event is {} bytes, over the {}-byte limit",
            raw.len(),
            limits.max_event_bytes
        )));
    }
    if anonymous_only {
        // Validate the rest all the same: a malformed anonymous event is
        // still a malformed request.
        if !matches!(m.get("type"), Some(Value::String(t)) if t == "track" || t == "identify") {
            return Err(bad("type", "must be \"track\" or \"identify\"".into()));
        }
        out.unattributed += 1;
        return Ok(());
    }
    let event = Event::from_value(Value::Object(m))
        .map_err(|e| IngestError::Malformed(format!("{at}: {e}")))?;
    out.events.push(Incoming { event, raw });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> config::Ingest {
        config::Ingest::default()
    }

    /// A server clock after the requests' timestamps (2026-06-01).
    const NOW: i64 = 1_780_272_000_000;

    #[test]
    fn a_timestamp_past_the_clock_skew_is_refused_naming_it() {
        let ids = MessageIds::new();
        let body = br#"{"batch":[{"type":"track","userId":"c","event":"E","messageId":"1","timestamp":"2026-01-01T00:00:00Z"},{"type":"track","userId":"c","event":"E","messageId":"2","timestamp":"9999-01-01T00:00:00Z"}]}"#;
        let e = parse(Endpoint::Batch, body, &limits(), NOW, &ids).unwrap_err();
        assert_eq!(e.status(), 400);
        let text = e.to_string();
        assert!(
            text.starts_with("batch[1].timestamp: 9999-01-01T00:00:00.000Z is 7972y after"),
            "{text}"
        );
        assert!(text.contains("ingest.max_clock_skew"), "{text}");
        // Within the bound it is accepted as sent.
        let soon = format!(
            r#"{{"userId":"c","event":"E","messageId":"3","timestamp":"{}"}}"#,
            format_ts(NOW + 60_000)
        );
        let p = parse(Endpoint::Track, soon.as_bytes(), &limits(), NOW, &ids).unwrap();
        assert_eq!(p.events[0].event.ts, NOW + 60_000);
    }

    #[test]
    fn a_fast_client_clock_is_corrected_by_sent_at() {
        let ids = MessageIds::new();
        // The client's clock is an hour fast: it stamped the event and sent
        // the batch by its own clock.
        let fast = 3_600_000;
        let body = format!(
            r#"{{"sentAt":"{}","batch":[{{"type":"track","userId":"c","event":"E","messageId":"1","timestamp":"{}"}}]}}"#,
            format_ts(NOW + fast),
            format_ts(NOW + fast - 5_000)
        );
        let p = parse(Endpoint::Batch, body.as_bytes(), &limits(), NOW, &ids).unwrap();
        assert_eq!(p.events[0].event.ts, NOW - 5_000);
        let stored = Event::parse(std::str::from_utf8(&p.events[0].raw).unwrap()).unwrap();
        assert_eq!(
            stored.ts,
            NOW - 5_000,
            "the corrected time is what is stored"
        );
    }

    #[test]
    fn basic_and_bearer_auth() {
        let keys = vec!["wk_1".to_string()];
        // "wk_1:" in base64, as analytics-python sends it.
        assert!(authorize(Some("Basic d2tfMTo="), &keys).is_ok());
        assert!(authorize(Some("Bearer wk_1"), &keys).is_ok());
        assert_eq!(authorize(None, &keys).unwrap_err().status(), 401);
        assert_eq!(
            authorize(Some("Bearer nope"), &keys).unwrap_err().status(),
            401
        );
        assert_eq!(
            authorize(Some("Basic !!!"), &keys).unwrap_err().status(),
            401
        );
        assert!(authorize(None, &[]).is_ok());
    }

    #[test]
    fn gzip_is_inflated_within_the_limit() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&vec![b' '; 10_000]).unwrap();
        let body = gz.finish().unwrap();
        assert_eq!(
            decode_body(Some("gzip"), &body, 10_000).unwrap().len(),
            10_000
        );
        assert_eq!(
            decode_body(Some("gzip"), &body, 9_999)
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(
            decode_body(Some("br"), &body, 9_999).unwrap_err().status(),
            415
        );
        assert_eq!(
            decode_body(Some("gzip"), b"not gzip", 100)
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn track_gets_type_id_and_timestamp_defaults() {
        let ids = MessageIds::new();
        let p = parse(
            Endpoint::Track,
            br#"{"userId":"c-1","event":"Deposit Made","properties":{"amount":5}}"#,
            &limits(),
            1_700_000_000_000,
            &ids,
        )
        .unwrap();
        assert_eq!(p.events.len(), 1);
        let e = &p.events[0].event;
        assert_eq!(e.name, "Deposit Made");
        assert_eq!(e.ts, 1_700_000_000_000);
        assert!(e.message_id.starts_with("nudge-"));
    }

    #[test]
    fn errors_name_the_event_and_field() {
        let ids = MessageIds::new();
        let body = br#"{"batch":[{"type":"track","userId":"c","event":"E","messageId":"1","timestamp":"2026-01-01T00:00:00Z"},{"type":"track","event":"E","messageId":"2","timestamp":"2026-01-01T00:00:00Z"}]}"#;
        let e = parse(Endpoint::Batch, body, &limits(), NOW, &ids).unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.to_string(), "batch[1]: field `userId`: missing");
        let long = format!(
            r#"{{"userId":"c","event":"E","messageId":"{}"}}"#,
            "x".repeat(101)
        );
        let e = parse(Endpoint::Track, long.as_bytes(), &limits(), NOW, &ids).unwrap_err();
        assert_eq!(e.to_string(), "event.messageId: longer than 100 characters");
        let e = parse(
            Endpoint::Identify,
            br#"{"type":"track","userId":"c"}"#,
            &limits(),
            0,
            &ids,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("event.type:"), "{e}");
    }

    #[test]
    fn other_segment_calls_are_acknowledged_not_refused() {
        let ids = MessageIds::new();
        let body = br#"{"batch":[{"type":"page","anonymousId":"a","name":"Home"},{"type":"track","userId":"c","event":"E","messageId":"1","timestamp":"2026-01-01T00:00:00Z"},{"type":"alias","previousId":"a","userId":"c"}]}"#;
        let p = parse(Endpoint::Batch, body, &limits(), NOW, &ids).unwrap();
        assert_eq!((p.events.len(), p.ignored), (1, 2));
        let bad = br#"{"batch":[{"type":"purchase","userId":"c"}]}"#;
        let e = parse(Endpoint::Batch, bad, &limits(), NOW, &ids).unwrap_err();
        assert!(e.to_string().starts_with("batch[0]: field `type`"), "{e}");
    }

    #[test]
    fn oversized_event_is_413() {
        let ids = MessageIds::new();
        let big = format!(
            r#"{{"userId":"c","event":"E","properties":{{"x":"{}"}}}}"#,
            "y".repeat(33 << 10)
        );
        let e = parse(Endpoint::Track, big.as_bytes(), &limits(), NOW, &ids).unwrap_err();
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn segment_python_capture_is_accepted_unchanged() {
        let text = include_str!("../../tests/fixtures/segment/analytics-python-2.4.0-batch.json");
        let captured: Value = serde_json::from_str(text).unwrap();
        let req = &captured[0];
        let body = serde_json::to_vec(&req["body"]).unwrap();
        let ids = MessageIds::new();
        let p = parse(Endpoint::Batch, &body, &limits(), NOW, &ids).unwrap();
        let batch = req["body"]["batch"].as_array().unwrap();
        let anonymous = batch
            .iter()
            .filter(|e| e["userId"].is_null() && e["anonymousId"].is_string())
            .count();
        assert_eq!(p.events.len() + p.unattributed, batch.len());
        assert_eq!(p.unattributed, anonymous);
        let auth = req["headers"]["Authorization"].as_str().unwrap();
        assert!(authorize(Some(auth), &["wk_test_123".to_string()]).is_ok());
    }
}
