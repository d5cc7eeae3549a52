//! The v7 unit config JSON (in `desiredStatus.unitConfig` and in the `aos_unit.cfg` file).

use super::{MAX_ID_LEN, MAX_LABEL_LEN, MAX_LABELS};
use crate::api::json::{self, Obj, Problems};
use crate::config::parse_duration;
use crate::model::*;
use serde_json::Value;

/// Reads a unit config object; `None` when it has errors (recorded in `probs`).
pub fn from_value(v: &Value, path: &str, probs: &mut Problems) -> Option<UnitConfig> {
    let before = probs.0.len();
    let o = json::obj(v, path, probs)?;
    let format_version = match o.get("formatVersion") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            probs.push(&o.path_of("formatVersion"), "expected a string or a number");
            String::new()
        }
    };
    let version = match o.string("version", probs) {
        Some(s) => match Version::parse(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                probs.push(&o.path_of("version"), e);
                None
            }
        },
        None => {
            if !o.has("version") {
                probs.push(&o.path_of("version"), "is required");
            }
            None
        }
    };
    let mut nodes = Vec::new();
    for (p, nv) in o.array("nodes", probs) {
        if let Some(n) = node_config(nv, &p, probs) {
            nodes.push(n);
        }
    }
    match version {
        Some(version) if probs.0.len() == before => Some(UnitConfig {
            format_version,
            version,
            nodes,
        }),
        _ => None,
    }
}

/// Reads the codename of an identity object such as `{"codename": "main"}`.
fn codename(o: &Obj<'_>, key: &str, required: bool, probs: &mut Problems) -> Option<String> {
    let Some((p, v)) = o.object(key, probs) else {
        if required && !o.has(key) {
            probs.push(&o.path_of(key), "is required");
        }
        return None;
    };
    let inner = json::obj(v, &p, probs)?;
    inner.id("codename", MAX_ID_LEN, probs)
}

fn node_config(v: &Value, path: &str, probs: &mut Problems) -> Option<NodeConfig> {
    let o = json::obj(v, path, probs)?;
    let node_type = codename(&o, "nodeGroupSubject", true, probs);
    let node_id = codename(&o, "node", false, probs);
    let labels = o.strings("labels", probs);
    if labels.len() > MAX_LABELS {
        probs.push(
            &o.path_of("labels"),
            format!("has {} labels, at most {MAX_LABELS} allowed", labels.len()),
        );
    }
    for (i, l) in labels.iter().enumerate() {
        if l.chars().count() > MAX_LABEL_LEN {
            probs.push(
                &format!("{}[{i}]", o.path_of("labels")),
                format!("label is longer than {MAX_LABEL_LEN} characters"),
            );
        }
    }
    let mut ratios = ResourceRatios::default();
    if let Some((p, rv)) = o.object("resourceRatios", probs)
        && let Some(r) = json::obj(rv, &p, probs)
    {
        ratios.cpu = r.f64("cpu", probs);
        ratios.ram = r.f64("ram", probs);
        ratios.storage = r.f64("storage", probs);
        ratios.state = r.f64("state", probs);
    }
    let alert_rules = o
        .object("alertRules", probs)
        .and_then(|(p, av)| alert_rules(av, &p, probs));
    Some(NodeConfig {
        node_id,
        node_type: node_type?,
        version: o.string("version", probs),
        alert_rules,
        resource_ratios: ratios,
        labels,
        priority: o.u64("priority", probs).unwrap_or(0),
    })
}

fn timeout_ms(o: &Obj<'_>, probs: &mut Problems) -> u64 {
    let path = o.path_of("minTimeout");
    let parsed = match o.get("minTimeout") {
        None => return 0,
        Some(Value::String(s)) => parse_duration(s),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| *f >= 0.0)
            .map(std::time::Duration::from_secs_f64)
            .ok_or_else(|| "negative duration".to_string()),
        Some(_) => Err("expected a duration string or a number of seconds".to_string()),
    };
    match parsed {
        Ok(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        Err(e) => {
            probs.push(&path, e);
            0
        }
    }
}

/// Alert rules as in the unit config and the item config.
pub fn alert_rules(v: &Value, path: &str, probs: &mut Problems) -> Option<AlertRules> {
    let o = json::obj(v, path, probs)?;
    let percent = |key: &str, probs: &mut Problems| -> Option<PercentRule> {
        let (p, rv) = o.object(key, probs)?;
        let r = json::obj(rv, &p, probs)?;
        Some(PercentRule {
            min_timeout_ms: timeout_ms(&r, probs),
            min_threshold: r.f64("minThreshold", probs).unwrap_or(0.0),
            max_threshold: r.f64("maxThreshold", probs).unwrap_or(0.0),
        })
    };
    let points = |key: &str, probs: &mut Problems| -> Option<PointsRule> {
        let (p, rv) = o.object(key, probs)?;
        let r = json::obj(rv, &p, probs)?;
        Some(PointsRule {
            min_timeout_ms: timeout_ms(&r, probs),
            min_threshold: r.u64("minThreshold", probs).unwrap_or(0),
            max_threshold: r.u64("maxThreshold", probs).unwrap_or(0),
        })
    };
    let ram = percent("ram", probs);
    let cpu = percent("cpu", probs);
    let download = points("download", probs);
    let upload = points("upload", probs);
    let mut partitions = Vec::new();
    for (p, pv) in o.array("partitions", probs) {
        let Some(r) = json::obj(pv, &p, probs) else {
            continue;
        };
        partitions.push(PartitionRule {
            name: r.id("name", MAX_ID_LEN, probs).unwrap_or_default(),
            min_timeout_ms: timeout_ms(&r, probs),
            min_threshold: r.f64("minThreshold", probs).unwrap_or(0.0),
            max_threshold: r.f64("maxThreshold", probs).unwrap_or(0.0),
        });
    }
    Some(AlertRules {
        ram,
        cpu,
        partitions,
        download,
        upload,
    })
}

/// Parses a unit config document (the `aos_unit.cfg` file).
pub fn parse(text: &str) -> Result<UnitConfig, Problems> {
    let v = json::parse(text)?;
    let mut probs = Problems::default();
    match from_value(&v, "$", &mut probs) {
        Some(uc) if probs.is_empty() => Ok(uc),
        _ => Err(probs),
    }
}
