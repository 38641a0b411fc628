//! JSON-like values and the field lists (properties, traits, firing data)
//! that carry them.

/// One JSON value as the host hands it over. Arrays and objects stay JSON
/// text ([`Value::Json`]); [`Value::json`] parses them when needed.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    /// An array or object, as compact JSON text.
    Json(String),
}

impl Value {
    /// The number as a double: integers convert, everything else is `None`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// An integer, or a float with no fractional part that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// Only the JSON value `true` is true: `"true"`, `1` or null are not.
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    /// Parses an array or object into `serde_json::Value`; scalars convert
    /// directly.
    pub fn json(&self) -> Option<serde_json::Value> {
        match self {
            Value::Null => Some(serde_json::Value::Null),
            Value::Bool(b) => Some(serde_json::Value::Bool(*b)),
            Value::Int(i) => Some((*i).into()),
            Value::Float(f) => serde_json::Number::from_f64(*f).map(serde_json::Value::Number),
            Value::Text(s) => Some(serde_json::Value::String(s.clone())),
            Value::Json(s) => serde_json::from_str(s).ok(),
        }
    }

    /// Converts a parsed JSON value: nested arrays and objects become
    /// [`Value::Json`] text.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            // serde_json keeps `3` and `3.0` apart: only the former is i64.
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Json(other.to_string()),
        }
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

/// An ordered list of keyed values: event properties, traits, firing data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fields(pub Vec<(String, Value)>);

impl Fields {
    pub fn new() -> Self {
        Fields(Vec::new())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    pub fn i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(Value::as_i64)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// True only for the JSON value `true`.
    pub fn is_true(&self, key: &str) -> bool {
        self.get(key).is_some_and(Value::is_true)
    }

    /// Sets `key`, replacing an earlier value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let key = key.into();
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Builds fields from a JSON object; anything else gives no fields.
    pub fn from_json(v: &serde_json::Value) -> Fields {
        match v {
            serde_json::Value::Object(map) => Fields(
                map.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            ),
            _ => Fields::new(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for Fields {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Fields(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_integer_and_float_apart() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"a":3,"b":3.0,"c":1e2,"d":[1]}"#).unwrap();
        let f = Fields::from_json(&v);
        assert_eq!(f.get("a"), Some(&Value::Int(3)));
        assert_eq!(f.get("b"), Some(&Value::Float(3.0)));
        assert_eq!(f.get("c"), Some(&Value::Float(100.0)));
        assert_eq!(f.get("d"), Some(&Value::Json("[1]".into())));
        assert_eq!(f.f64("a"), Some(3.0));
    }

    #[test]
    fn only_json_true_is_true() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"a":true,"b":"true","c":1,"d":null}"#).unwrap();
        let f = Fields::from_json(&v);
        assert!(f.is_true("a"));
        for k in ["b", "c", "d", "missing"] {
            assert!(!f.is_true(k), "{k}");
        }
    }
}
