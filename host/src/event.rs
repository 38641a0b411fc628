//! Customer events in the Segment Spec shape, and their timestamps.
//!
//! Parsing is lenient where Segment's own SDKs send more than we need
//! (`context`, `integrations`, `anonymousId`, `sentAt`, explicit `null`s)
//! and strict where a wrong value would make a wrong decision (a missing
//! customer id, an unparseable timestamp).

use serde::Deserialize;
use serde_json::{Map, Value};

/// Longest customer id we accept: ids are key prefixes in the store.
pub const MAX_CUSTOMER_ID: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Identify,
    Track,
}

/// One validated event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub message_id: String,
    pub customer: String,
    pub kind: Kind,
    /// `track` event name; empty for `identify`.
    pub name: String,
    /// Milliseconds since the Unix epoch, UTC.
    pub ts: i64,
    pub properties: Map<String, Value>,
    pub traits: Map<String, Value>,
}

/// Why an event was refused, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("field `{field}`: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

fn field(field: &'static str, problem: impl Into<String>) -> EventError {
    EventError::Field {
        field,
        problem: problem.into(),
    }
}

/// The wire shape; everything optional so that errors can name the field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    message_id: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    user_id: Option<Value>,
    anonymous_id: Option<Value>,
    timestamp: Option<Value>,
    event: Option<Value>,
    properties: Option<Value>,
    traits: Option<Value>,
}

impl Event {
    /// Parses one JSON object in the Segment Spec shape.
    pub fn parse(text: &str) -> Result<Event, EventError> {
        let wire: Wire = serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;
        Event::from_wire(wire)
    }

    /// Converts an already-parsed JSON value (one element of a batch).
    pub fn from_value(v: Value) -> Result<Event, EventError> {
        let wire: Wire = serde_json::from_value(v).map_err(|e| EventError::Json(e.to_string()))?;
        Event::from_wire(wire)
    }

    fn from_wire(w: Wire) -> Result<Event, EventError> {
        let kind = match w.kind.as_deref() {
            Some("identify") => Kind::Identify,
            Some("track") => Kind::Track,
            Some(other) => {
                return Err(field(
                    "type",
                    format!("{other:?} is not supported (identify, track)"),
                ))
            }
            None => return Err(field("type", "missing")),
        };
        let message_id = match w.message_id {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::String(_)) => return Err(field("messageId", "empty")),
            Some(Value::Null) | None => return Err(field("messageId", "missing")),
            Some(_) => return Err(field("messageId", "must be a string")),
        };
        // Segment identifies a person by userId; an event with only an
        // anonymousId has no customer to decide for yet.
        let customer =
            match (w.user_id, w.anonymous_id) {
                (Some(Value::String(s)), _) if !s.is_empty() => s,
                (Some(Value::Number(n)), _) => n.to_string(),
                (Some(Value::Null) | None, Some(Value::String(_))) => return Err(field(
                    "userId",
                    "missing: events with only an anonymousId cannot be attributed to a customer",
                )),
                (Some(Value::String(_)), _) => return Err(field("userId", "empty")),
                (Some(Value::Null) | None, _) => return Err(field("userId", "missing")),
                (Some(_), _) => return Err(field("userId", "must be a string")),
            };
        if customer.len() > MAX_CUSTOMER_ID {
            return Err(field(
                "userId",
                format!("longer than {MAX_CUSTOMER_ID} bytes"),
            ));
        }
        if customer.contains('\0') {
            return Err(field("userId", "contains a NUL character"));
        }
        let ts = match w.timestamp {
            Some(Value::String(s)) => {
                parse_ts(&s).ok_or_else(|| field("timestamp", format!("{s:?} is not RFC 3339")))?
            }
            None | Some(Value::Null) => return Err(field("timestamp", "missing")),
            Some(_) => return Err(field("timestamp", "must be an RFC 3339 string")),
        };
        let object = |v: Option<Value>, name: &'static str| match v {
            None | Some(Value::Null) => Ok(Map::new()),
            Some(Value::Object(m)) => Ok(m),
            Some(_) => Err(field(name, "must be an object")),
        };
        let (name, properties, traits) = match kind {
            Kind::Track => {
                let name = match w.event {
                    Some(Value::String(s)) if !s.is_empty() => s,
                    Some(Value::String(_)) => return Err(field("event", "empty")),
                    None | Some(Value::Null) => return Err(field("event", "missing")),
                    Some(_) => return Err(field("event", "must be a string")),
                };
                (name, object(w.properties, "properties")?, Map::new())
            }
            Kind::Identify => (String::new(), Map::new(), object(w.traits, "traits")?),
        };
        Ok(Event {
            message_id,
            customer,
            kind,
            name,
            ts,
            properties,
            traits,
        })
    }
}

/// Parses an RFC 3339 timestamp (any offset, any fraction) to epoch ms,
/// truncating below the millisecond.
pub fn parse_ts(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The wall clock, in ms since the epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Formats epoch ms as `2026-03-01T08:15:02.123Z`.
pub fn format_ts(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for s in [
            "2026-03-01T08:15:02.123Z",
            "1970-01-01T00:00:00.000Z",
            "2024-02-29T23:59:59.999Z",
            "1969-12-31T23:59:59.999Z",
        ] {
            let ms = parse_ts(s).unwrap();
            assert_eq!(format_ts(ms), s);
        }
    }

    #[test]
    fn offsets_and_microseconds() {
        let a = parse_ts("2026-03-01T08:15:02.123+00:00").unwrap();
        let b = parse_ts("2026-03-01T10:15:02.123456+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(format_ts(a), "2026-03-01T08:15:02.123Z");
        assert_eq!(parse_ts("2026-03-01 08:15"), None);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Event::parse(
            r#"{"type":"track","userId":"u","timestamp":"2026-03-01T00:00:00Z","event":"X"}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "field `messageId`: missing");
        let e = Event::parse(
            r#"{"messageId":"m","type":"track","userId":"u","timestamp":"yesterday","event":"X"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("field `timestamp`"), "{e}");
        let e = Event::parse(
            r#"{"messageId":"m","type":"page","userId":"u","timestamp":"2026-03-01T00:00:00Z"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("field `type`"), "{e}");
        let e = Event::parse("{not json").unwrap_err();
        assert!(matches!(e, EventError::Json(_)));
    }

    #[test]
    fn segment_python_sdk_shape_is_accepted() {
        let e = Event::parse(
            r#"{"integrations":{},"anonymousId":null,"properties":{"amount":12000.5},
            "timestamp":"2026-03-01T08:16:00.000+00:00","context":{"library":{"name":"analytics-python"}},
            "userId":"c-000042","type":"track","event":"Deposit Made","messageId":"m-2"}"#,
        )
        .unwrap();
        assert_eq!(e.customer, "c-000042");
        assert_eq!(e.properties["amount"], serde_json::json!(12000.5));
    }
}
