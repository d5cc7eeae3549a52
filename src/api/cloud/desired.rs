//! The v7 envelope and the `desiredStatus` message, converted into `DesiredState`.
//!
//! Rules (reference 2.4 and errata 17-18): item `id` and a valid `type`, `owner.id`, instance
//! `item.id` and `subject.id`, subject `identity.id` and `type`, node `item.codename` and
//! `state` are required, and the whole message is rejected when one is missing; `version` and
//! `indexDigest` may be absent; at most 4 labels; IDs at most 64 characters.

use super::*;
use crate::api::json::{self, Obj, Problems};
use crate::model::*;
use serde_json::Value;

/// Every message type of protocol v7.
pub const MESSAGE_TYPES: [&str; 26] = [
    "ack",
    "nack",
    "desiredStatus",
    "unitStatus",
    "requestBlobUrls",
    "blobUrls",
    "alerts",
    "monitoringData",
    "requestLog",
    "pushLog",
    "stateRequest",
    "newState",
    "updateState",
    "stateAcceptance",
    "overrideEnvVars",
    "overrideEnvVarsStatus",
    "renewCertificatesNotification",
    "issueUnitCertificates",
    "issuedUnitCertificates",
    "installUnitCertificatesConfirmation",
    "startProvisioningRequest",
    "startProvisioningResponse",
    "finishProvisioningRequest",
    "finishProvisioningResponse",
    "deprovisioningRequest",
    "deprovisioningResponse",
];

/// The envelope header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u64,
    pub system_id: String,
    pub created_at: Option<String>,
    pub txn: String,
}

/// Reads `{header, data}`; returns the header and the data object with its message type.
pub fn envelope<'a>(v: &'a Value, probs: &mut Problems) -> Option<(Header, Obj<'a>, String)> {
    let root = json::obj(v, "$", probs)?;
    let header = match root.object("header", probs) {
        Some((p, hv)) => json::obj(hv, &p, probs).map(|h| {
            let version = h.u64("version", probs);
            if version.is_none() && !h.has("version") {
                probs.push(&h.path_of("version"), "is required");
            }
            if let Some(ver) = version
                && ver != PROTOCOL_VERSION
            {
                probs.push(
                    &h.path_of("version"),
                    format!("protocol version {ver} is not supported, expected {PROTOCOL_VERSION}"),
                );
            }
            Header {
                version: version.unwrap_or(0),
                system_id: h.id("systemId", MAX_ID_LEN, probs).unwrap_or_default(),
                created_at: h.string("createdAt", probs),
                txn: h.id("txn", MAX_ID_LEN, probs).unwrap_or_default(),
            }
        }),
        None => {
            if !root.has("header") {
                probs.push("header", "is required");
            }
            None
        }
    };
    let data = match root.object("data", probs) {
        Some((_, dv)) => json::obj(dv, "data", probs),
        None => {
            if !root.has("data") {
                probs.push("data", "is required");
            }
            None
        }
    };
    let data = data?;
    let message_type = match data.string("messageType", probs) {
        Some(t) if MESSAGE_TYPES.contains(&t.as_str()) => Some(t),
        Some(t) => {
            probs.push("data.messageType", format!("unknown message type {t:?}"));
            None
        }
        None => {
            if !data.has("messageType") {
                probs.push("data.messageType", "is required");
            }
            None
        }
    };
    Some((header?, data, message_type?))
}

/// Parses a whole `desiredStatus` frame.
pub fn parse_frame(text: &str) -> Result<(Header, DesiredState), Problems> {
    let v = json::parse(text)?;
    let mut probs = Problems::default();
    let parsed = envelope(&v, &mut probs);
    let result = match parsed {
        Some((header, data, t)) if t == "desiredStatus" => {
            from_data(&data, &mut probs).map(|d| (header, d))
        }
        Some((_, _, t)) => {
            probs.push(
                "data.messageType",
                format!("expected \"desiredStatus\", found {t:?}"),
            );
            None
        }
        None => None,
    };
    match result {
        Some(r) if probs.is_empty() => Ok(r),
        _ => Err(probs),
    }
}

/// Reads an identity object's `id` (required) — `{ "id": "..." }`.
fn ident_id(o: &Obj<'_>, key: &str, probs: &mut Problems) -> Option<String> {
    let Some((p, v)) = o.object(key, probs) else {
        if !o.has(key) {
            probs.push(&o.path_of(key), "is required");
        }
        return None;
    };
    json::obj(v, &p, probs)?.id("id", MAX_ID_LEN, probs)
}

fn limit(o: &Obj<'_>, key: &str, n: usize, max: usize, probs: &mut Problems) {
    if n > max {
        probs.push(
            &o.path_of(key),
            format!("has {n} entries, at most {max} allowed"),
        );
    }
}

/// Converts the data object of a `desiredStatus` message.
pub fn from_data(d: &Obj<'_>, probs: &mut Problems) -> Option<DesiredState> {
    let before = probs.0.len();
    let mut out = DesiredState {
        correlation_id: d.string("correlationId", probs),
        ..DesiredState::default()
    };

    let nodes = d.array("nodes", probs);
    limit(d, "nodes", nodes.len(), MAX_NODES, probs);
    for (p, v) in nodes {
        let Some(o) = json::obj(v, &p, probs) else {
            continue;
        };
        let node_id = o.object("item", probs).and_then(|(ip, iv)| {
            json::obj(iv, &ip, probs).and_then(|i| i.id("codename", MAX_ID_LEN, probs))
        });
        if !o.has("item") {
            probs.push(&o.path_of("item"), "is required");
        }
        let state = o.enumeration(
            "state",
            DesiredNodeState::parse,
            DesiredNodeState::ALL,
            probs,
        );
        if !o.has("state") {
            probs.push(&o.path_of("state"), "is required");
        }
        if let (Some(node_id), Some(state)) = (node_id, state) {
            out.nodes.push(DesiredNode { node_id, state });
        }
    }

    if let Some((p, v)) = d.object("unitConfig", probs) {
        out.unit_config = super::unitconfig::from_value(v, &p, probs);
    }

    let items = d.array("items", probs);
    limit(d, "items", items.len(), MAX_ITEMS, probs);
    for (p, v) in items {
        let Some(o) = json::obj(v, &p, probs) else {
            continue;
        };
        let (id, item_type) = match o.object("item", probs) {
            Some((ip, iv)) => match json::obj(iv, &ip, probs) {
                Some(i) => {
                    let id = i.id("id", MAX_ID_LEN, probs);
                    let t = i.enumeration("type", ItemType::parse, ItemType::ALL, probs);
                    if !i.has("type") {
                        probs.push(&i.path_of("type"), "is required");
                    }
                    (id, t)
                }
                None => (None, None),
            },
            None => {
                if !o.has("item") {
                    probs.push(&o.path_of("item"), "is required");
                }
                (None, None)
            }
        };
        let version = o.string("version", probs).unwrap_or_default();
        if version.chars().count() > MAX_VERSION_LEN {
            probs.push(
                &o.path_of("version"),
                format!("is longer than {MAX_VERSION_LEN} characters"),
            );
        }
        let owner_id = ident_id(&o, "owner", probs);
        let index_digest = o.string("indexDigest", probs).and_then(|s| {
            Digest::parse(&s)
                .map_err(|e| probs.push(&o.path_of("indexDigest"), e))
                .ok()
        });
        if let (Some(id), Some(item_type), Some(owner_id)) = (id, item_type, owner_id) {
            if out.items.iter().any(|i| i.id == id) {
                probs.push(&p, format!("item {id} is listed twice"));
            }
            out.items.push(DesiredItem {
                id,
                item_type,
                version,
                owner_id,
                index_digest,
            });
        }
    }

    let instances = d.array("instances", probs);
    limit(d, "instances", instances.len(), MAX_INSTANCES, probs);
    for (p, v) in instances {
        let Some(o) = json::obj(v, &p, probs) else {
            continue;
        };
        let item_id = ident_id(&o, "item", probs);
        let subject_id = ident_id(&o, "subject", probs);
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
        let priority = o.u64("priority", probs).unwrap_or(0);
        let num_instances = o.u64("numInstances", probs).unwrap_or(0);
        if num_instances > MAX_INSTANCES as u64 {
            probs.push(
                &o.path_of("numInstances"),
                format!("{num_instances} instances requested, at most {MAX_INSTANCES} allowed"),
            );
        }
        if let (Some(item_id), Some(subject_id)) = (item_id, subject_id) {
            out.instances.push(DesiredInstances {
                item_id,
                subject_id,
                priority,
                num_instances,
                labels,
            });
        }
    }

    let subjects = d.array("subjects", probs);
    limit(d, "subjects", subjects.len(), MAX_SUBJECTS, probs);
    for (p, v) in subjects {
        let Some(o) = json::obj(v, &p, probs) else {
            continue;
        };
        let id = ident_id(&o, "identity", probs);
        let subject_type = o.enumeration("type", SubjectType::parse, SubjectType::ALL, probs);
        if !o.has("type") {
            probs.push(&o.path_of("type"), "is required");
        }
        let is_reported_from_unit = o.bool("isReportedFromUnit", probs).unwrap_or(false);
        if let (Some(id), Some(subject_type)) = (id, subject_type) {
            out.subjects.push(DesiredSubject {
                id,
                subject_type,
                is_reported_from_unit,
            });
        }
    }

    for (p, v) in d.array("certificates", probs) {
        let Some(o) = json::obj(v, &p, probs) else {
            continue;
        };
        out.certificates.push(Certificate {
            certificate: o.string("certificate", probs).unwrap_or_default(),
            fingerprint: o.string("fingerprint", probs).unwrap_or_default(),
        });
    }
    for (p, v) in d.array("certificateChains", probs) {
        let Some(o) = json::obj(v, &p, probs) else {
            continue;
        };
        out.certificate_chains.push(CertificateChain {
            name: o.string("name", probs).unwrap_or_default(),
            fingerprints: o.strings("fingerprints", probs),
        });
    }

    (probs.0.len() == before).then_some(out)
}
