//! A lenient, path-tracking reader over `serde_json::Value`, used by every JSON edge.
//!
//! Upstream matches object keys case-insensitively and accepts some numbers as strings; it is
//! strict about missing IDs, capacities and enum strings. This reader does both, and collects
//! every problem with its JSON path (`data.items[2].item.type`) instead of stopping at the
//! first, so that `aos-cm validate` can list them all.

use serde_json::{Map, Value};
use std::fmt;

/// One problem found in a document, at a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems of a document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Parses JSON text; a syntax error becomes a problem at the root with line and column.
pub fn parse(text: &str) -> Result<Value, Problems> {
    serde_json::from_str(text).map_err(|e| {
        let mut p = Problems::default();
        p.push(
            "$",
            format!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        );
        p
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object being read at a path.
#[derive(Clone)]
pub struct Obj<'a> {
    pub path: String,
    map: &'a Map<String, Value>,
}

/// Views a value as an object, or records that it is not one.
pub fn obj<'a>(v: &'a Value, path: &str, probs: &mut Problems) -> Option<Obj<'a>> {
    match v {
        Value::Object(map) => Some(Obj {
            path: path.to_string(),
            map,
        }),
        other => {
            probs.push(
                path,
                format!("expected an object, found {}", type_name(other)),
            );
            None
        }
    }
}

pub fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() || path == "$" {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> Obj<'a> {
    /// The value of a key, matched case-insensitively; an exact match wins; null is absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        let v = self.map.get(key).or_else(|| {
            self.map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        });
        v.filter(|v| !v.is_null())
    }

    pub fn path_of(&self, key: &str) -> String {
        child_path(&self.path, key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn string(&self, key: &str, probs: &mut Problems) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                probs.push(
                    &self.path_of(key),
                    format!("expected a string, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A required string of at most `max` characters.
    pub fn id(&self, key: &str, max: usize, probs: &mut Problems) -> Option<String> {
        let path = self.path_of(key);
        match self.string(key, probs) {
            None if !self.has(key) => {
                probs.push(&path, "is required");
                None
            }
            None => None,
            Some(s) if s.is_empty() => {
                probs.push(&path, "must not be empty");
                None
            }
            Some(s) if s.chars().count() > max => {
                probs.push(
                    &path,
                    format!(
                        "is {} characters long, at most {max} allowed",
                        s.chars().count()
                    ),
                );
                None
            }
            Some(s) => Some(s),
        }
    }

    /// An unsigned integer; numbers given as decimal strings are accepted.
    pub fn u64(&self, key: &str, probs: &mut Problems) -> Option<u64> {
        let v = self.get(key)?;
        let parsed = match v {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                    .map(|f| f as u64)
            }),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        if parsed.is_none() {
            probs.push(
                &self.path_of(key),
                format!("expected an unsigned integer, found {}", describe(v)),
            );
        }
        parsed
    }

    pub fn f64(&self, key: &str, probs: &mut Problems) -> Option<f64> {
        let v = self.get(key)?;
        let parsed = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
            _ => None,
        };
        if parsed.is_none() {
            probs.push(
                &self.path_of(key),
                format!("expected a number, found {}", describe(v)),
            );
        }
        parsed
    }

    pub fn bool(&self, key: &str, probs: &mut Problems) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            other => {
                probs.push(
                    &self.path_of(key),
                    format!("expected a boolean, found {}", describe(other)),
                );
                None
            }
        }
    }

    /// The elements of an array, each with its path; absent is an empty array.
    pub fn array(&self, key: &str, probs: &mut Problems) -> Vec<(String, &'a Value)> {
        match self.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let base = self.path_of(key);
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("{base}[{i}]"), v))
                    .collect()
            }
            Some(other) => {
                probs.push(
                    &self.path_of(key),
                    format!("expected an array, found {}", type_name(other)),
                );
                Vec::new()
            }
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str, probs: &mut Problems) -> Vec<String> {
        let mut out = Vec::new();
        for (path, v) in self.array(key, probs) {
            match v {
                Value::String(s) => out.push(s.clone()),
                other => probs.push(
                    &path,
                    format!("expected a string, found {}", type_name(other)),
                ),
            }
        }
        out
    }

    /// An enumeration given by its exact wire string.
    pub fn enumeration<T>(
        &self,
        key: &str,
        parse: fn(&str) -> Option<T>,
        allowed: &[&str],
        probs: &mut Problems,
    ) -> Option<T> {
        let s = self.string(key, probs)?;
        let parsed = parse(&s);
        if parsed.is_none() {
            probs.push(
                &self.path_of(key),
                format!(
                    "unknown value {s:?}, expected one of: {}",
                    allowed.join(", ")
                ),
            );
        }
        parsed
    }

    /// A nested object, if present.
    pub fn object(&self, key: &str, probs: &mut Problems) -> Option<(String, &'a Value)> {
        let v = self.get(key)?;
        if v.is_object() {
            Some((self.path_of(key), v))
        } else {
            probs.push(
                &self.path_of(key),
                format!("expected an object, found {}", type_name(v)),
            );
            None
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.map.iter()
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Number(n) => format!("the number {n}"),
        other => type_name(other).to_string(),
    }
}
