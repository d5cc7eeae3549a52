//! Telemetry between the Service Managers and the cloud: alerts, monitoring, logs and env-var
//! overrides, converted between servicemanager.v5 messages and protocol v7 JSON
//! (reference cloud-protocol.md §2.6–§2.8 and §7, grpc-interfaces.md "SM → CM unsolicited").
//!
//! Everything here is a pure function (or, for [`MonitoringLog`], a plain value): no I/O, no
//! clock. Callers pass the time where one is needed, as microseconds since the Unix epoch.
//!
//! servicemanager.v5 has no `OverrideEnvVars` / `OverrideEnvVarStatus` messages (they exist in
//! v4 only): overrides reach an SM inside `InstanceInfo.env_vars`, and their results come back in
//! `InstanceStatus.env_vars`. [`override_env_vars_to_sm`] and [`env_status_to_cloud`] work with
//! those v5 shapes.

use super::messages::{
    self, AlertItem, CoreComponent, ErrorInfo, Identity, InstanceIdent, InstanceState, LogStatus,
    LogType, NodeState,
};
use crate::api::proto::common::v2 as pbc;
use crate::api::proto::servicemanager::v5 as pb;
use crate::api::proto::servicemanager::v5::sm_incoming_messages::SmIncomingMessage as In;
use base64::Engine as _;
use std::collections::{BTreeMap, VecDeque};

/// Alert items per `alerts` message (reference §2.10).
pub const ALERTS_PER_MESSAGE: usize = 16;
/// State transitions kept per node and per instance between two sends (reference §7).
pub const STATE_TRANSITIONS: usize = 16;

/// Aos error code `failed` (reference §2.1).
const AOS_FAILED: i32 = 1;
/// Aos error code `invalidArgument`.
const AOS_INVALID_ARGUMENT: i32 = 6;

/// Key of an instance's monitoring samples and state transitions: (node, item, subject,
/// instance), the same key as the SM intake uses.
pub type InstanceKey = (String, String, String, u64);

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// 0001-01-01T00:00:00Z in seconds since the epoch: the first instant RFC 3339 can write.
const MIN_SECONDS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z in seconds since the epoch: the last second RFC 3339 can write.
const MAX_SECONDS: i64 = 253_402_300_799;

/// A protobuf timestamp as v7 text. An absent timestamp is the epoch (what the proto default
/// decodes to); nanoseconds out of their range are normalised and instants outside years
/// 0001–9999 are clamped, so any input gives a valid RFC 3339 string.
pub fn pb_time_to_cloud(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return messages::format_time(0);
    };
    let nanos = i64::from(ts.nanos);
    let seconds = ts
        .seconds
        .saturating_add(nanos.div_euclid(1_000_000_000))
        .clamp(MIN_SECONDS, MAX_SECONDS);
    let micros = nanos.rem_euclid(1_000_000_000) / 1_000;
    messages::format_time(seconds * 1_000_000 + micros)
}

/// Parses v7 timestamp text (`YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)`) into a protobuf
/// timestamp; `None` when the text is not such a timestamp.
pub fn cloud_time_to_pb(text: &str) -> Option<prost_types::Timestamp> {
    let s = text.trim();
    let b = s.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0_i64, |acc, d| acc * 10 + i64::from(d - b'0')),
        )
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    if year == 0
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut pos = 19;
    let mut nanos = 0_i64;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while b.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        let count = pos - start;
        if count == 0 {
            return None;
        }
        // Digits beyond nanoseconds are dropped (truncation, like the fraction itself).
        let kept = count.min(9);
        nanos = digits(start, kept)? * 10_i64.pow(u32::try_from(9 - kept).ok()?);
    }
    let offset_seconds = match b.get(pos..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == pos + 6 && sep(pos + 3, b":") => {
            let (oh, om) = (digits(pos + 1, 2)?, digits(pos + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = oh * 3600 + om * 60;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    // A leap second is folded into the next second's start, as most clocks do.
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_seconds;
    Some(prost_types::Timestamp {
        seconds,
        nanos: i32::try_from(nanos).ok()?,
    })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------------
// Common conversions
// ---------------------------------------------------------------------------------------------

/// An SM instance identity as v7 `item`/`subject`/`instance`: `id` for cloud-managed items,
/// `codename` for preinstalled ones (reference §2.1).
fn ident_to_cloud(id: &pbc::InstanceIdent) -> InstanceIdent {
    let name = |s: &str| {
        if id.preinstalled {
            Identity::with_codename(s)
        } else {
            Identity::with_id(s)
        }
    };
    InstanceIdent {
        item: name(&id.item_id),
        subject: name(&id.subject_id),
        instance: id.instance,
    }
}

/// An SM error, when it denotes one (`aos_code` or `exit_code` non-zero), as v7 `errorInfo`.
fn error_to_cloud(e: Option<&pbc::ErrorInfo>) -> Option<ErrorInfo> {
    let e = e?;
    (e.aos_code != 0 || e.exit_code != 0).then(|| ErrorInfo {
        aos_code: e.aos_code,
        exit_code: e.exit_code,
        message: e.message.clone(),
    })
}

/// A v7 instance filter as common.v2 `InstanceFilter`: absent item/subject are `""`, an absent
/// instance is `-1` (any). `None` when the instance index does not fit the proto's `int64`.
fn filter_to_pb(
    item: Option<&Identity>,
    subject: Option<&Identity>,
    instance: Option<u64>,
) -> Option<pbc::InstanceFilter> {
    let id = |i: Option<&Identity>| i.and_then(|i| i.id.clone()).unwrap_or_default();
    Some(pbc::InstanceFilter {
        item_id: id(item),
        subject_id: id(subject),
        instance: match instance {
            Some(n) => i64::try_from(n).ok()?,
            None => -1,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Alerts (§2.6, §7)
// ---------------------------------------------------------------------------------------------

fn core_component(name: &str) -> Option<CoreComponent> {
    match name.trim().to_ascii_uppercase().as_str() {
        "CM" => Some(CoreComponent::Cm),
        "SM" => Some(CoreComponent::Sm),
        "IAM" => Some(CoreComponent::Iam),
        "MP" => Some(CoreComponent::Mp),
        _ => None,
    }
}

fn is_raise(status: &str) -> bool {
    status.trim().eq_ignore_ascii_case("raise")
}

/// One SM alert as the v7 alert the cloud receives, or `None` when it does not go to the cloud:
/// quota alerts whose status is not `raise`, an empty oneof, an instance alert without its
/// instance, a core alert naming an unknown component.
pub fn alert_to_cloud(node_id: &str, alert: &pb::Alert) -> Option<AlertItem> {
    use pb::alert::AlertItem as A;
    let timestamp = pb_time_to_cloud(alert.timestamp.as_ref());
    let node = Identity::with_codename(node_id);
    Some(match alert.alert_item.as_ref()? {
        A::SystemAlert(a) => AlertItem::SystemAlert(messages::SystemAlert {
            timestamp,
            node,
            message: a.message.clone(),
        }),
        A::CoreAlert(a) => AlertItem::CoreAlert(messages::CoreAlert {
            timestamp,
            node,
            core_component: core_component(&a.core_component)?,
            message: a.message.clone(),
        }),
        A::ResourceAllocateAlert(a) => {
            AlertItem::ResourceAllocateAlert(messages::ResourceAllocateAlert {
                timestamp,
                ident: ident_to_cloud(a.instance.as_ref()?),
                node,
                device_id: a.resource.clone(),
                message: a.message.clone(),
            })
        }
        A::SystemQuotaAlert(a) => {
            if !is_raise(&a.status) {
                return None;
            }
            AlertItem::SystemQuotaAlert(messages::SystemQuotaAlert {
                timestamp,
                node,
                parameter: a.parameter.clone(),
                value: a.value,
            })
        }
        A::InstanceQuotaAlert(a) => {
            if !is_raise(&a.status) {
                return None;
            }
            AlertItem::InstanceQuotaAlert(messages::InstanceQuotaAlert {
                timestamp,
                ident: ident_to_cloud(a.instance.as_ref()?),
                parameter: a.parameter.clone(),
                value: a.value,
            })
        }
        A::InstanceAlert(a) => {
            AlertItem::UpdateItemInstanceAlert(messages::UpdateItemInstanceAlert {
                timestamp,
                ident: ident_to_cloud(a.instance.as_ref()?),
                version: a.service_version.clone(),
                message: a.message.clone(),
            })
        }
    })
}

/// Converts alerts (node ID, alert) in order and packs the ones that go to the cloud into
/// `alerts` messages of at most [`ALERTS_PER_MESSAGE`] items. No alerts, no messages.
pub fn alert_packages(alerts: Vec<(String, pb::Alert)>) -> Vec<messages::Alerts> {
    packages(
        alerts
            .iter()
            .filter_map(|(node, alert)| alert_to_cloud(node, alert))
            .collect(),
    )
}

/// v7 alerts in `alerts` messages of at most [`ALERTS_PER_MESSAGE`] items, order kept.
pub fn packages(items: Vec<AlertItem>) -> Vec<messages::Alerts> {
    items
        .chunks(ALERTS_PER_MESSAGE)
        .map(|chunk| messages::Alerts {
            correlation_id: None,
            items: chunk.to_vec(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Monitoring (§2.7, §7)
// ---------------------------------------------------------------------------------------------

fn monitoring_item(d: &pb::MonitoringData) -> messages::MonitoringItem {
    messages::MonitoringItem {
        timestamp: pb_time_to_cloud(d.timestamp.as_ref()),
        ram: d.ram,
        cpu: d.cpu,
        download: d.download,
        upload: d.upload,
        partitions: d
            .partitions
            .iter()
            .map(|p| messages::PartitionUsage {
                name: p.name.clone(),
                used_size: p.used_size,
            })
            .collect(),
    }
}

/// The `monitoringData` message for the drained samples: one `nodes[]` entry per node and one
/// `instances[]` entry per (node, item, subject, instance), samples in their order, entries in
/// key order. `None` when there is no sample at all.
pub fn monitoring_message(
    nodes: BTreeMap<String, Vec<pb::MonitoringData>>,
    instances: BTreeMap<InstanceKey, Vec<pb::MonitoringData>>,
) -> Option<messages::MonitoringData> {
    let nodes: Vec<messages::NodeMonitoring> = nodes
        .into_iter()
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(node, samples)| messages::NodeMonitoring {
            node: Identity::with_codename(&node),
            node_states: Vec::new(),
            items: samples.iter().map(monitoring_item).collect(),
        })
        .collect();
    let instances: Vec<messages::InstanceMonitoring> = instances
        .into_iter()
        .filter(|(_, samples)| !samples.is_empty())
        .map(|((node, item, subject, instance), samples)| {
            instance_entry(
                &node,
                &item,
                &subject,
                instance,
                samples.iter().map(monitoring_item),
            )
        })
        .collect();
    (!nodes.is_empty() || !instances.is_empty()).then_some(messages::MonitoringData {
        correlation_id: None,
        nodes,
        instances,
    })
}

fn instance_entry(
    node: &str,
    item: &str,
    subject: &str,
    instance: u64,
    items: impl Iterator<Item = messages::MonitoringItem>,
) -> messages::InstanceMonitoring {
    messages::InstanceMonitoring {
        ident: InstanceIdent {
            item: Identity::with_id(item),
            subject: Identity::with_id(subject),
            instance,
        },
        node: Identity::with_codename(node),
        item_states: Vec::new(),
        items: items.collect(),
    }
}

#[derive(Debug, Clone, Default)]
struct Transitions<S> {
    /// Last state seen; survives [`MonitoringLog::take`] so that only changes are recorded.
    last: Option<S>,
    /// Transitions not yet sent, oldest first, at most [`STATE_TRANSITIONS`].
    pending: VecDeque<(i64, S)>,
}

impl<S: PartialEq + Copy> Transitions<S> {
    fn record(&mut self, at_micros: i64, state: S) -> bool {
        if self.last == Some(state) {
            return false;
        }
        self.last = Some(state);
        self.pending.push_back((at_micros, state));
        if self.pending.len() > STATE_TRANSITIONS {
            self.pending.pop_front();
        }
        true
    }
}

/// Node state/connection transitions and instance state transitions between two monitoring
/// sends. A transition is recorded only when the state differs from the last one seen; at most
/// [`STATE_TRANSITIONS`] are kept per node and per instance, the oldest dropped first.
#[derive(Debug, Clone, Default)]
pub struct MonitoringLog {
    nodes: BTreeMap<String, Transitions<(NodeState, bool)>>,
    instances: BTreeMap<InstanceKey, Transitions<InstanceState>>,
}

impl MonitoringLog {
    /// Records a node's state and connection; returns whether it was a change.
    pub fn node_state(
        &mut self,
        node_id: &str,
        at_micros: i64,
        state: NodeState,
        connected: bool,
    ) -> bool {
        self.nodes
            .entry(node_id.to_string())
            .or_default()
            .record(at_micros, (state, connected))
    }

    /// Records an instance's state; returns whether it was a change.
    pub fn instance_state(
        &mut self,
        key: &InstanceKey,
        at_micros: i64,
        state: InstanceState,
    ) -> bool {
        self.instances
            .entry(key.clone())
            .or_default()
            .record(at_micros, state)
    }

    /// Forgets an instance that no longer exists (its last state and unsent transitions).
    pub fn forget_instance(&mut self, key: &InstanceKey) {
        self.instances.remove(key);
    }

    /// Forgets a node that left the unit, with its instances.
    pub fn forget_node(&mut self, node_id: &str) {
        self.nodes.remove(node_id);
        self.instances.retain(|(node, ..), _| node != node_id);
    }

    /// Whether there are unsent transitions.
    pub fn is_empty(&self) -> bool {
        self.nodes.values().all(|t| t.pending.is_empty())
            && self.instances.values().all(|t| t.pending.is_empty())
    }

    /// Merges the unsent transitions into `message` as `nodeStates` / `itemStates` (adding
    /// entries without samples where needed, keeping key order) and clears them. `None` when
    /// there is neither a message nor a transition.
    pub fn take(
        &mut self,
        message: Option<messages::MonitoringData>,
    ) -> Option<messages::MonitoringData> {
        if message.is_none() && self.is_empty() {
            return None;
        }
        let mut message = message.unwrap_or_default();

        let mut nodes: BTreeMap<String, messages::NodeMonitoring> = BTreeMap::new();
        for entry in std::mem::take(&mut message.nodes) {
            let key = entry.node.codename.clone().unwrap_or_default();
            nodes.insert(key, entry);
        }
        for (node_id, t) in &mut self.nodes {
            if t.pending.is_empty() {
                continue;
            }
            let entry = nodes
                .entry(node_id.clone())
                .or_insert_with(|| messages::NodeMonitoring {
                    node: Identity::with_codename(node_id),
                    ..messages::NodeMonitoring::default()
                });
            entry
                .node_states
                .extend(t.pending.drain(..).map(|(at, (state, is_connected))| {
                    messages::NodeStateEntry {
                        timestamp: messages::format_time(at),
                        state,
                        is_connected,
                    }
                }));
        }
        message.nodes = nodes.into_values().collect();

        let mut instances: BTreeMap<InstanceKey, messages::InstanceMonitoring> = BTreeMap::new();
        for entry in std::mem::take(&mut message.instances) {
            let key = (
                entry.node.codename.clone().unwrap_or_default(),
                entry.ident.item.id.clone().unwrap_or_default(),
                entry.ident.subject.id.clone().unwrap_or_default(),
                entry.ident.instance,
            );
            instances.insert(key, entry);
        }
        for (key, t) in &mut self.instances {
            if t.pending.is_empty() {
                continue;
            }
            let (node, item, subject, instance) = key;
            let entry = instances.entry(key.clone()).or_insert_with(|| {
                instance_entry(node, item, subject, *instance, std::iter::empty())
            });
            entry
                .item_states
                .extend(
                    t.pending
                        .drain(..)
                        .map(|(at, state)| messages::InstanceStateEntry {
                            timestamp: messages::format_time(at),
                            state,
                        }),
                );
        }
        message.instances = instances.into_values().collect();
        Some(message)
    }
}

// ---------------------------------------------------------------------------------------------
// Logs (§2.8)
// ---------------------------------------------------------------------------------------------

/// What a `requestLog` becomes: the SM request per connected node, and the nodes that cannot
/// be asked, with the reason (for [`log_error_for_node`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogRequests {
    pub requests: Vec<(String, In)>,
    pub failed: Vec<(String, String)>,
}

fn node_name(id: &Identity) -> Option<&str> {
    id.codename
        .as_deref()
        .or(id.id.as_deref())
        .filter(|n| !n.is_empty())
}

/// The SM requests for a cloud `requestLog`, one per node listed in `filter.nodeIds` (in order,
/// each node once). Empty `nodeIds` ⇒ nothing at all. Listed nodes that are not connected,
/// and every listed node when the filter itself is invalid (unreadable `from`/`till`, an
/// instance index beyond `int64`), are returned in `failed` with the reason.
///
/// `uploadOptions` has no place in servicemanager.v5 and is not forwarded.
pub fn log_requests(req: &messages::RequestLog, connected_nodes: &[String]) -> LogRequests {
    let mut nodes: Vec<&str> = Vec::new();
    for name in req.filter.node_ids.iter().filter_map(node_name) {
        if !nodes.contains(&name) {
            nodes.push(name);
        }
    }
    let mut out = LogRequests::default();
    if nodes.is_empty() {
        return out;
    }
    let request = match log_request(req) {
        Ok(request) => request,
        Err(reason) => {
            out.failed = nodes
                .into_iter()
                .map(|n| (n.to_string(), reason.clone()))
                .collect();
            return out;
        }
    };
    for node in nodes {
        if connected_nodes.iter().any(|c| c == node) {
            out.requests.push((node.to_string(), request.clone()));
        } else {
            out.failed
                .push((node.to_string(), format!("node {node} is not connected")));
        }
    }
    out
}

fn log_time(field: &str, value: Option<&String>) -> Result<Option<prost_types::Timestamp>, String> {
    value
        .map(|text| {
            cloud_time_to_pb(text)
                .ok_or_else(|| format!("filter.{field}: {text:?} is not an RFC 3339 timestamp"))
        })
        .transpose()
}

fn log_request(req: &messages::RequestLog) -> Result<In, String> {
    let f = &req.filter;
    let from = log_time("from", f.from.as_ref())?;
    let till = log_time("till", f.till.as_ref())?;
    let correlation_id = req.correlation_id.clone();
    let filter = || {
        filter_to_pb(f.item.as_ref(), f.subject.as_ref(), f.instance)
            .ok_or_else(|| "filter.instance: out of range".to_string())
    };
    Ok(match req.log_type {
        LogType::SystemLog => In::SystemLogRequest(pb::SystemLogRequest {
            correlation_id,
            from,
            till,
        }),
        LogType::InstanceLog => In::InstanceLogRequest(pb::InstanceLogRequest {
            correlation_id,
            filter: Some(filter()?),
            from,
            till,
        }),
        LogType::CrashLog => In::InstanceCrashLogRequest(pb::InstanceCrashLogRequest {
            correlation_id,
            filter: Some(filter()?),
            from,
            till,
        }),
    })
}

/// The `pushLog` that tells the cloud a node's log cannot be had: one final part with no
/// content, status `error`, `errorInfo` with aosCode `failed` and the message.
pub fn log_error_for_node(correlation_id: &str, node_id: &str, message: &str) -> messages::PushLog {
    messages::PushLog {
        correlation_id: correlation_id.to_string(),
        node: Identity::with_codename(node_id),
        part: 1,
        parts_count: 1,
        content: String::new(),
        status: LogStatus::Error,
        error_info: Some(ErrorInfo {
            aos_code: AOS_FAILED,
            exit_code: 0,
            message: message.to_string(),
        }),
    }
}

/// One SM log part as `pushLog`: content in base64, the status string as [`LogStatus`] (an
/// unknown status is an error), `errorInfo` only with status `error` (aosCode at least
/// `failed`, so that the cloud reads it as an error).
pub fn push_log(node_id: &str, part: &pb::LogData) -> messages::PushLog {
    let status = match part.status.trim().to_ascii_lowercase().as_str() {
        "ok" => Some(LogStatus::Ok),
        "error" => Some(LogStatus::Error),
        "empty" => Some(LogStatus::Empty),
        "absent" => Some(LogStatus::Absent),
        _ => None,
    };
    let error_info = match status {
        Some(LogStatus::Error) => Some(match part.error.as_ref() {
            Some(e) => ErrorInfo {
                aos_code: if e.aos_code > 0 {
                    e.aos_code
                } else {
                    AOS_FAILED
                },
                exit_code: e.exit_code,
                message: e.message.clone(),
            },
            None => ErrorInfo {
                aos_code: AOS_FAILED,
                ..ErrorInfo::default()
            },
        }),
        Some(_) => None,
        None => Some(ErrorInfo {
            aos_code: AOS_FAILED,
            exit_code: 0,
            message: format!("unknown log status {:?}", part.status),
        }),
    };
    messages::PushLog {
        correlation_id: part.correlation_id.clone(),
        node: Identity::with_codename(node_id),
        part: part.part,
        parts_count: part.part_count,
        content: base64::engine::general_purpose::STANDARD.encode(&part.data),
        status: status.unwrap_or(LogStatus::Error),
        error_info,
    }
}

// ---------------------------------------------------------------------------------------------
// Env-var overrides (§2.8)
// ---------------------------------------------------------------------------------------------

/// One override variable for the SMs: name and value as `InstanceInfo.env_vars` carries them,
/// and when it expires (`None` = never).
#[derive(Debug, Clone, PartialEq)]
pub struct EnvVarOverride {
    pub var: pb::EnvVarInfo,
    pub expires: Option<prost_types::Timestamp>,
}

/// The overrides for the instances an `overrideEnvVars` item selects.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceEnvOverride {
    pub filter: pbc::InstanceFilter,
    pub variables: Vec<EnvVarOverride>,
}

/// What an `overrideEnvVars` message becomes: the overrides to apply, and the variables refused
/// (unreadable `ttl`, instance index beyond `int64`) as statuses for the cloud.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvOverrides {
    pub items: Vec<InstanceEnvOverride>,
    pub refused: Vec<messages::EnvVarStatus>,
}

/// Converts a cloud `overrideEnvVars` into per-filter overrides (absent item/subject = `""`,
/// absent instance = `-1`, i.e. any). A variable with an unreadable `ttl` is refused rather
/// than made permanent.
pub fn override_env_vars_to_sm(msg: &messages::OverrideEnvVars) -> EnvOverrides {
    let mut out = EnvOverrides::default();
    for item in &msg.items {
        let f = &item.filter;
        let refused_ident = || InstanceIdent {
            item: Identity::with_id(f.item.as_ref().and_then(|i| i.id.as_deref()).unwrap_or("")),
            subject: Identity::with_id(
                f.subject
                    .as_ref()
                    .and_then(|s| s.id.as_deref())
                    .unwrap_or(""),
            ),
            instance: f.instance.unwrap_or(0),
        };
        let refuse = |name: &str, message: String| messages::EnvVarStatus {
            ident: refused_ident(),
            name: name.to_string(),
            error_info: Some(ErrorInfo {
                aos_code: AOS_INVALID_ARGUMENT,
                exit_code: 0,
                message,
            }),
        };
        let Some(filter) = filter_to_pb(f.item.as_ref(), f.subject.as_ref(), f.instance) else {
            out.refused.extend(
                item.variables
                    .iter()
                    .map(|v| refuse(&v.name, "instance: out of range".to_string())),
            );
            continue;
        };
        let mut variables = Vec::new();
        for v in &item.variables {
            let expires = match &v.ttl {
                None => None,
                Some(text) => match cloud_time_to_pb(text) {
                    Some(ts) => Some(ts),
                    None => {
                        out.refused.push(refuse(
                            &v.name,
                            format!("ttl: {text:?} is not an RFC 3339 timestamp"),
                        ));
                        continue;
                    }
                },
            };
            variables.push(EnvVarOverride {
                var: pb::EnvVarInfo {
                    name: v.name.clone(),
                    value: v.value.clone(),
                },
                expires,
            });
        }
        out.items.push(InstanceEnvOverride { filter, variables });
    }
    out
}

/// The `overrideEnvVarsStatus` for instance statuses from an SM: one entry per variable, in
/// order, `errorInfo` only for a variable that failed. Instances without identity are skipped.
pub fn env_status_to_cloud(statuses: &[pb::InstanceStatus]) -> messages::OverrideEnvVarsStatus {
    messages::OverrideEnvVarsStatus {
        correlation_id: None,
        statuses: statuses
            .iter()
            .filter_map(|s| Some((ident_to_cloud(s.instance.as_ref()?), &s.env_vars)))
            .flat_map(|(ident, vars)| {
                vars.iter().map(move |v| messages::EnvVarStatus {
                    ident: ident.clone(),
                    name: v.name.clone(),
                    error_info: error_to_cloud(v.error.as_ref()),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// 2023-11-14T22:13:20Z.
    const T0: i64 = 1_700_000_000;

    fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    fn to_json<T: serde::Serialize>(v: &T) -> Value {
        serde_json::to_value(v).expect("serialisable")
    }

    fn ident(item: &str, subject: &str, instance: u64) -> Option<pbc::InstanceIdent> {
        Some(pbc::InstanceIdent {
            item_id: item.into(),
            subject_id: subject.into(),
            instance,
            ..pbc::InstanceIdent::default()
        })
    }

    fn alert(item: pb::alert::AlertItem) -> pb::Alert {
        pb::Alert {
            timestamp: ts(T0, 123_456_789),
            alert_item: Some(item),
        }
    }

    fn system_alert(message: &str) -> pb::Alert {
        alert(pb::alert::AlertItem::SystemAlert(pb::SystemAlert {
            message: message.into(),
        }))
    }

    // --- time ------------------------------------------------------------------------------

    #[test]
    fn telemetry_pb_time_formats_with_six_digits_and_survives_bad_input() {
        let p = |s, n| pb_time_to_cloud(ts(s, n).as_ref());
        assert_eq!(p(T0, 123_456_789), "2023-11-14T22:13:20.123456Z");
        assert_eq!(p(T0, 0), "2023-11-14T22:13:20.000000Z");
        assert_eq!(pb_time_to_cloud(None), "1970-01-01T00:00:00.000000Z");
        // Negative and oversized nanos are normalised into the seconds.
        assert_eq!(p(T0, -1_000), "2023-11-14T22:13:19.999999Z");
        assert_eq!(p(T0, 1_500_000_000), "2023-11-14T22:13:21.500000Z");
        // Out of RFC 3339's range: clamped, never a panic.
        assert_eq!(p(i64::MAX, i32::MAX), "9999-12-31T23:59:59.147483Z");
        assert_eq!(p(i64::MIN, i32::MIN), "0001-01-01T00:00:00.852516Z");
    }

    #[test]
    fn telemetry_cloud_time_parses_rfc3339() {
        let t = |s| cloud_time_to_pb(s).map(|t| (t.seconds, t.nanos));
        assert_eq!(t("2023-11-14T22:13:20Z"), Some((T0, 0)));
        assert_eq!(t("2023-11-14T22:13:20.123456Z"), Some((T0, 123_456_000)));
        assert_eq!(
            t("2023-11-14T22:13:20.1234567891Z"),
            Some((T0, 123_456_789))
        );
        assert_eq!(t("2023-11-15T00:13:20+02:00"), Some((T0, 0)));
        assert_eq!(t("2023-11-14t21:13:20.5-01:00"), Some((T0, 500_000_000)));
        assert_eq!(t("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(t("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(t("2024-02-29T00:00:00Z"), Some((1_709_164_800, 0)));
        for bad in [
            "",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-02-29T00:00:00Z",
            "2023-13-01T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20+0200",
            "2023-11-14T22:13:20Zjunk",
            "２023-11-14T22:13:20Z",
            "-023-11-14T22:13:20Z",
            "now",
        ] {
            assert_eq!(cloud_time_to_pb(bad), None, "{bad:?}");
        }
        let text = "2023-11-14T22:13:20.654321Z";
        assert_eq!(pb_time_to_cloud(cloud_time_to_pb(text).as_ref()), text);
    }

    // --- alerts ----------------------------------------------------------------------------

    #[test]
    fn telemetry_alert_every_kind_to_v7_json() {
        use pb::alert::AlertItem as A;
        let cases = [
            (
                A::SystemAlert(pb::SystemAlert {
                    message: "disk almost full".into(),
                }),
                json!({"timestamp": "2023-11-14T22:13:20.123456Z", "tag": "systemAlert",
                       "node": {"codename": "node0"}, "message": "disk almost full"}),
            ),
            (
                A::CoreAlert(pb::CoreAlert {
                    core_component: "SM".into(),
                    message: "restarted".into(),
                }),
                json!({"timestamp": "2023-11-14T22:13:20.123456Z", "tag": "coreAlert",
                       "node": {"codename": "node0"}, "coreComponent": "SM",
                       "message": "restarted"}),
            ),
            (
                A::ResourceAllocateAlert(pb::ResourceAllocateAlert {
                    instance: ident("svc1", "subj1", 2),
                    resource: "camera".into(),
                    message: "busy".into(),
                }),
                json!({"timestamp": "2023-11-14T22:13:20.123456Z",
                       "tag": "resourceAllocateAlert", "item": {"id": "svc1"},
                       "subject": {"id": "subj1"}, "instance": 2,
                       "node": {"codename": "node0"}, "deviceId": "camera", "message": "busy"}),
            ),
            (
                A::SystemQuotaAlert(pb::SystemQuotaAlert {
                    parameter: "cpu".into(),
                    value: 95,
                    status: "raise".into(),
                }),
                json!({"timestamp": "2023-11-14T22:13:20.123456Z", "tag": "systemQuotaAlert",
                       "node": {"codename": "node0"}, "parameter": "cpu", "value": 95}),
            ),
            (
                A::InstanceQuotaAlert(pb::InstanceQuotaAlert {
                    instance: ident("svc1", "subj1", 0),
                    parameter: "ram".into(),
                    value: 1024,
                    status: "raise".into(),
                }),
                json!({"timestamp": "2023-11-14T22:13:20.123456Z",
                       "tag": "instanceQuotaAlert", "item": {"id": "svc1"},
                       "subject": {"id": "subj1"}, "instance": 0,
                       "parameter": "ram", "value": 1024}),
            ),
            (
                A::InstanceAlert(pb::InstanceAlert {
                    instance: ident("svc1", "subj1", 1),
                    service_version: "1.2.0".into(),
                    message: "exited with 3".into(),
                }),
                json!({"timestamp": "2023-11-14T22:13:20.123456Z",
                       "tag": "updateItemInstanceAlert", "item": {"id": "svc1"},
                       "subject": {"id": "subj1"}, "instance": 1,
                       "version": "1.2.0", "message": "exited with 3"}),
            ),
        ];
        for (item, expected) in cases {
            let got = alert_to_cloud("node0", &alert(item)).expect("alert goes to the cloud");
            assert_eq!(to_json(&got), expected);
        }
    }

    #[test]
    fn telemetry_alert_preinstalled_instance_uses_codename() {
        let mut id = ident("builtin", "sys", 0);
        if let Some(i) = id.as_mut() {
            i.preinstalled = true;
        }
        let a = alert(pb::alert::AlertItem::InstanceAlert(pb::InstanceAlert {
            instance: id,
            service_version: String::new(),
            message: "m".into(),
        }));
        assert_eq!(
            to_json(&alert_to_cloud("n", &a).expect("converted")),
            json!({"timestamp": "2023-11-14T22:13:20.123456Z",
                   "tag": "updateItemInstanceAlert", "item": {"codename": "builtin"},
                   "subject": {"codename": "sys"}, "instance": 0,
                   "version": "", "message": "m"})
        );
    }

    #[test]
    fn telemetry_alert_quota_only_when_raised() {
        use pb::alert::AlertItem as A;
        for status in ["fall", "continue", "", "rise"] {
            let sys = alert(A::SystemQuotaAlert(pb::SystemQuotaAlert {
                parameter: "cpu".into(),
                value: 10,
                status: status.into(),
            }));
            let inst = alert(A::InstanceQuotaAlert(pb::InstanceQuotaAlert {
                instance: ident("s", "u", 0),
                parameter: "cpu".into(),
                value: 10,
                status: status.into(),
            }));
            assert_eq!(alert_to_cloud("n", &sys), None, "{status}");
            assert_eq!(alert_to_cloud("n", &inst), None, "{status}");
        }
        let raised = alert(A::SystemQuotaAlert(pb::SystemQuotaAlert {
            parameter: "cpu".into(),
            value: 10,
            status: "Raise".into(),
        }));
        assert!(alert_to_cloud("n", &raised).is_some());
    }

    #[test]
    fn telemetry_alert_malformed_gives_none() {
        use pb::alert::AlertItem as A;
        let empty = pb::Alert {
            timestamp: ts(T0, 0),
            alert_item: None,
        };
        assert_eq!(alert_to_cloud("n", &empty), None);
        let no_instance = alert(A::InstanceAlert(pb::InstanceAlert {
            instance: None,
            service_version: "1".into(),
            message: "m".into(),
        }));
        assert_eq!(alert_to_cloud("n", &no_instance), None);
        let no_instance = alert(A::ResourceAllocateAlert(pb::ResourceAllocateAlert {
            instance: None,
            resource: "r".into(),
            message: "m".into(),
        }));
        assert_eq!(alert_to_cloud("n", &no_instance), None);
        let unknown_component = alert(A::CoreAlert(pb::CoreAlert {
            core_component: "UM".into(),
            message: "m".into(),
        }));
        assert_eq!(alert_to_cloud("n", &unknown_component), None);
    }

    #[test]
    fn telemetry_alert_absent_timestamp_is_epoch() {
        let a = pb::Alert {
            timestamp: None,
            alert_item: Some(pb::alert::AlertItem::SystemAlert(pb::SystemAlert {
                message: "x".into(),
            })),
        };
        assert_eq!(
            to_json(&alert_to_cloud("n", &a).expect("converted")),
            json!({"timestamp": "1970-01-01T00:00:00.000000Z", "tag": "systemAlert",
                   "node": {"codename": "n"}, "message": "x"})
        );
    }

    #[test]
    fn telemetry_alert_packages_of_sixteen_in_order() {
        let alerts: Vec<(String, pb::Alert)> = (0..17)
            .map(|i| (format!("node{}", i % 2), system_alert(&format!("m{i}"))))
            .collect();
        let packages = alert_packages(alerts);
        assert_eq!(packages.len(), 2);
        assert_eq!(packages[0].items.len(), 16);
        assert_eq!(packages[1].items.len(), 1);
        let messages: Vec<Value> = packages
            .iter()
            .flat_map(|p| p.items.iter().map(|i| to_json(i)["message"].clone()))
            .collect();
        let expected: Vec<Value> = (0..17).map(|i| json!(format!("m{i}"))).collect();
        assert_eq!(messages, expected);
        assert_eq!(
            to_json(&packages[1]),
            json!({"items": [{"timestamp": "2023-11-14T22:13:20.123456Z",
                              "tag": "systemAlert", "node": {"codename": "node0"},
                              "message": "m16"}]})
        );
    }

    #[test]
    fn telemetry_alert_packages_skip_filtered_and_empty() {
        assert!(alert_packages(Vec::new()).is_empty());
        let fall = alert(pb::alert::AlertItem::SystemQuotaAlert(
            pb::SystemQuotaAlert {
                parameter: "ram".into(),
                value: 1,
                status: "fall".into(),
            },
        ));
        assert!(alert_packages(vec![("n".into(), fall.clone())]).is_empty());
        // 16 convertible alerts plus one that is filtered out still fit one package.
        let mut alerts: Vec<(String, pb::Alert)> = (0..16)
            .map(|i| ("n".to_string(), system_alert(&format!("m{i}"))))
            .collect();
        alerts.insert(5, ("n".into(), fall));
        let packages = alert_packages(alerts);
        assert_eq!(packages.len(), 1);
        assert_eq!(packages[0].items.len(), 16);
    }

    // --- monitoring ------------------------------------------------------------------------

    fn sample(seconds: i64, ram: u64) -> pb::MonitoringData {
        pb::MonitoringData {
            timestamp: ts(seconds, 0),
            ram,
            cpu: 12,
            partitions: vec![pb::PartitionUsage {
                name: "storages".into(),
                used_size: 2048,
            }],
            download: 100,
            upload: 200,
        }
    }

    fn key(node: &str, item: &str, subject: &str, instance: u64) -> InstanceKey {
        (node.into(), item.into(), subject.into(), instance)
    }

    #[test]
    fn telemetry_monitoring_message_json() {
        let nodes = BTreeMap::from([
            ("node1".to_string(), vec![sample(T0 + 60, 300)]),
            (
                "node0".to_string(),
                vec![
                    sample(T0, 100),
                    pb::MonitoringData {
                        timestamp: None,
                        ram: 5,
                        ..pb::MonitoringData::default()
                    },
                ],
            ),
            ("node2".to_string(), Vec::new()),
        ]);
        let instances = BTreeMap::from([(key("node0", "svc1", "subj1", 0), vec![sample(T0, 7)])]);
        let msg = monitoring_message(nodes, instances).expect("something to send");
        assert_eq!(
            to_json(&msg),
            json!({
                "nodes": [
                    {"node": {"codename": "node0"}, "items": [
                        {"timestamp": "2023-11-14T22:13:20.000000Z", "ram": 100, "cpu": 12,
                         "download": 100, "upload": 200,
                         "partitions": [{"name": "storages", "usedSize": 2048}]},
                        {"timestamp": "1970-01-01T00:00:00.000000Z", "ram": 5, "cpu": 0,
                         "download": 0, "upload": 0}
                    ]},
                    {"node": {"codename": "node1"}, "items": [
                        {"timestamp": "2023-11-14T22:14:20.000000Z", "ram": 300, "cpu": 12,
                         "download": 100, "upload": 200,
                         "partitions": [{"name": "storages", "usedSize": 2048}]}
                    ]}
                ],
                "instances": [
                    {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0,
                     "node": {"codename": "node0"}, "itemStates": [], "items": [
                        {"timestamp": "2023-11-14T22:13:20.000000Z", "ram": 7, "cpu": 12,
                         "download": 100, "upload": 200,
                         "partitions": [{"name": "storages", "usedSize": 2048}]}
                    ]}
                ]
            })
        );
    }

    #[test]
    fn telemetry_monitoring_nothing_to_send() {
        assert_eq!(monitoring_message(BTreeMap::new(), BTreeMap::new()), None);
        let nodes = BTreeMap::from([("n".to_string(), Vec::new())]);
        let instances = BTreeMap::from([(key("n", "s", "u", 0), Vec::new())]);
        assert_eq!(monitoring_message(nodes, instances), None);
        let mut log = MonitoringLog::default();
        assert_eq!(log.take(None), None);
    }

    #[test]
    fn telemetry_monitoring_instances_only() {
        let instances = BTreeMap::from([(key("n", "s", "u", 3), vec![sample(T0, 1)])]);
        let msg = monitoring_message(BTreeMap::new(), instances).expect("instances");
        let v = to_json(&msg);
        assert_eq!(v["nodes"], json!([]));
        assert_eq!(v["instances"][0]["instance"], json!(3));
    }

    #[test]
    fn telemetry_monitoring_log_records_only_changes_and_merges() {
        let mut log = MonitoringLog::default();
        let us = |s: i64| s * 1_000_000;
        assert!(log.node_state("node0", us(T0), NodeState::Provisioned, true));
        assert!(!log.node_state("node0", us(T0 + 1), NodeState::Provisioned, true));
        assert!(log.node_state("node0", us(T0 + 2), NodeState::Provisioned, false));
        assert!(log.node_state("node9", us(T0 + 3), NodeState::Error, false));
        let k = key("node0", "svc1", "subj1", 0);
        assert!(log.instance_state(&k, us(T0), InstanceState::Activating));
        assert!(log.instance_state(&k, us(T0) + 250_000, InstanceState::Active));
        assert!(!log.instance_state(&k, us(T0 + 5), InstanceState::Active));
        let k2 = key("node1", "svc2", "subj1", 1);
        assert!(log.instance_state(&k2, us(T0), InstanceState::Failed));

        let samples = monitoring_message(
            BTreeMap::from([("node0".to_string(), vec![sample(T0, 100)])]),
            BTreeMap::from([(k.clone(), vec![sample(T0, 7)])]),
        );
        let msg = log.take(samples).expect("message");
        let item = |ram: u64| {
            json!({"timestamp": "2023-11-14T22:13:20.000000Z", "ram": ram, "cpu": 12,
                   "download": 100, "upload": 200,
                   "partitions": [{"name": "storages", "usedSize": 2048}]})
        };
        assert_eq!(
            to_json(&msg),
            json!({
                "nodes": [
                    {"node": {"codename": "node0"},
                     "nodeStates": [
                        {"timestamp": "2023-11-14T22:13:20.000000Z", "state": "provisioned",
                         "isConnected": true},
                        {"timestamp": "2023-11-14T22:13:22.000000Z", "state": "provisioned",
                         "isConnected": false}
                     ],
                     "items": [item(100)]},
                    {"node": {"codename": "node9"},
                     "nodeStates": [
                        {"timestamp": "2023-11-14T22:13:23.000000Z", "state": "error",
                         "isConnected": false}
                     ],
                     "items": []}
                ],
                "instances": [
                    {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0,
                     "node": {"codename": "node0"},
                     "itemStates": [
                        {"timestamp": "2023-11-14T22:13:20.000000Z", "state": "activating"},
                        {"timestamp": "2023-11-14T22:13:20.250000Z", "state": "active"}
                     ],
                     "items": [item(7)]},
                    {"item": {"id": "svc2"}, "subject": {"id": "subj1"}, "instance": 1,
                     "node": {"codename": "node1"},
                     "itemStates": [
                        {"timestamp": "2023-11-14T22:13:20.000000Z", "state": "failed"}
                     ],
                     "items": []}
                ]
            })
        );

        // take() cleared the transitions but remembers the last state.
        assert!(log.is_empty());
        assert_eq!(log.take(None), None);
        assert!(!log.node_state("node0", us(T0 + 9), NodeState::Provisioned, false));
        assert!(!log.instance_state(&k, us(T0 + 9), InstanceState::Active));
        assert!(log.instance_state(&k, us(T0 + 9), InstanceState::Inactive));
        let msg = log.take(None).expect("one transition");
        assert_eq!(
            to_json(&msg),
            json!({"nodes": [], "instances": [
                {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0,
                 "node": {"codename": "node0"},
                 "itemStates": [{"timestamp": "2023-11-14T22:13:29.000000Z",
                                 "state": "inactive"}],
                 "items": []}
            ]})
        );
    }

    #[test]
    fn telemetry_monitoring_log_keeps_newest_sixteen() {
        let mut log = MonitoringLog::default();
        let k = key("n", "s", "u", 0);
        for i in 0..20_i64 {
            let connected = i % 2 == 0;
            assert!(log.node_state("n", (T0 + i) * 1_000_000, NodeState::Provisioned, connected));
            let state = if connected {
                InstanceState::Active
            } else {
                InstanceState::Inactive
            };
            assert!(log.instance_state(&k, (T0 + i) * 1_000_000, state));
        }
        let msg = to_json(&log.take(None).expect("message"));
        let node_states = msg["nodes"][0]["nodeStates"].as_array().expect("array");
        assert_eq!(node_states.len(), 16);
        assert_eq!(
            node_states[0]["timestamp"],
            json!("2023-11-14T22:13:24.000000Z")
        );
        assert_eq!(
            node_states[15]["timestamp"],
            json!("2023-11-14T22:13:39.000000Z")
        );
        let item_states = msg["instances"][0]["itemStates"].as_array().expect("array");
        assert_eq!(item_states.len(), 16);
        assert_eq!(
            item_states[0]["timestamp"],
            json!("2023-11-14T22:13:24.000000Z")
        );
        assert_eq!(item_states[0]["state"], json!("active"));
    }

    #[test]
    fn telemetry_monitoring_log_forget() {
        let mut log = MonitoringLog::default();
        let k = key("n", "s", "u", 0);
        log.node_state("n", 0, NodeState::Provisioned, true);
        log.instance_state(&k, 0, InstanceState::Active);
        log.forget_node("n");
        assert!(log.is_empty());
        // Forgotten, so the same state is a change again.
        assert!(log.instance_state(&k, 1, InstanceState::Active));
        log.forget_instance(&k);
        assert!(log.is_empty());
    }

    // --- logs ------------------------------------------------------------------------------

    fn request_log(v: Value) -> messages::RequestLog {
        serde_json::from_value(v).expect("requestLog")
    }

    fn connected(nodes: &[&str]) -> Vec<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn telemetry_log_requests_system_log() {
        let req = request_log(json!({
            "correlationId": "log-1", "logType": "systemLog",
            "filter": {"from": "2023-11-14T22:13:20Z", "till": "2023-11-14T23:13:20.5Z",
                       "nodeIds": [{"codename": "node0"}, {"codename": "node1"},
                                   {"codename": "node0"}],
                       "item": {"id": "ignored"}}
        }));
        let out = log_requests(&req, &connected(&["node0", "node1", "node2"]));
        let expected = In::SystemLogRequest(pb::SystemLogRequest {
            correlation_id: "log-1".into(),
            from: ts(T0, 0),
            till: ts(T0 + 3600, 500_000_000),
        });
        assert_eq!(
            out.requests,
            vec![
                ("node0".into(), expected.clone()),
                ("node1".into(), expected)
            ]
        );
        assert!(out.failed.is_empty());
    }

    #[test]
    fn telemetry_log_requests_instance_and_crash_filters() {
        let req = request_log(json!({
            "correlationId": "log-2", "logType": "instanceLog",
            "filter": {"nodeIds": [{"codename": "node0"}], "item": {"id": "svc1"},
                       "subject": {"id": "subj1"}, "instance": 2}
        }));
        let out = log_requests(&req, &connected(&["node0"]));
        assert_eq!(
            out.requests,
            vec![(
                "node0".into(),
                In::InstanceLogRequest(pb::InstanceLogRequest {
                    correlation_id: "log-2".into(),
                    filter: Some(pbc::InstanceFilter {
                        item_id: "svc1".into(),
                        subject_id: "subj1".into(),
                        instance: 2,
                    }),
                    from: None,
                    till: None,
                })
            )]
        );

        // No instance (any) and no subject: -1 and "".
        let req = request_log(json!({
            "correlationId": "log-3", "logType": "crashLog",
            "filter": {"nodeIds": [{"codename": "node0"}], "item": {"id": "svc1"},
                       "from": "2023-11-14T22:13:20.000001Z"}
        }));
        let out = log_requests(&req, &connected(&["node0"]));
        assert_eq!(
            out.requests,
            vec![(
                "node0".into(),
                In::InstanceCrashLogRequest(pb::InstanceCrashLogRequest {
                    correlation_id: "log-3".into(),
                    filter: Some(pbc::InstanceFilter {
                        item_id: "svc1".into(),
                        subject_id: String::new(),
                        instance: -1,
                    }),
                    from: ts(T0, 1_000),
                    till: None,
                })
            )]
        );
    }

    #[test]
    fn telemetry_log_requests_empty_node_ids_do_nothing() {
        let req = request_log(json!({
            "correlationId": "log-4", "logType": "systemLog", "filter": {"nodeIds": []}
        }));
        assert_eq!(
            log_requests(&req, &connected(&["node0"])),
            LogRequests::default()
        );
        let req = request_log(json!({
            "correlationId": "log-4", "logType": "systemLog",
            "filter": {"nodeIds": [{"codename": ""}, {}], "from": "garbage"}
        }));
        assert_eq!(
            log_requests(&req, &connected(&["node0"])),
            LogRequests::default()
        );
    }

    #[test]
    fn telemetry_log_requests_unconnected_nodes_fail_separately() {
        let req = request_log(json!({
            "correlationId": "log-5", "logType": "systemLog",
            "filter": {"nodeIds": [{"codename": "node0"}, {"codename": "node7"}]}
        }));
        let out = log_requests(&req, &connected(&["node0"]));
        assert_eq!(out.requests.len(), 1);
        assert_eq!(out.requests[0].0, "node0");
        assert_eq!(
            out.failed,
            vec![(
                "node7".to_string(),
                "node node7 is not connected".to_string()
            )]
        );
        let (node, reason) = &out.failed[0];
        assert_eq!(
            to_json(&log_error_for_node("log-5", node, reason)),
            json!({"correlationId": "log-5", "node": {"codename": "node7"}, "part": 1,
                   "partsCount": 1, "content": "", "status": "error",
                   "errorInfo": {"aosCode": 1, "exitCode": 0,
                                 "message": "node node7 is not connected"}})
        );
    }

    #[test]
    fn telemetry_log_requests_bad_filter_fails_every_node() {
        let req = request_log(json!({
            "correlationId": "log-6", "logType": "instanceLog",
            "filter": {"nodeIds": [{"codename": "node0"}, {"codename": "node1"}],
                       "till": "yesterday"}
        }));
        let out = log_requests(&req, &connected(&["node0"]));
        assert!(out.requests.is_empty());
        let reason = "filter.till: \"yesterday\" is not an RFC 3339 timestamp".to_string();
        assert_eq!(
            out.failed,
            vec![("node0".into(), reason.clone()), ("node1".into(), reason)]
        );
        let req = request_log(json!({
            "correlationId": "log-7", "logType": "crashLog",
            "filter": {"nodeIds": [{"codename": "node0"}], "instance": u64::MAX}
        }));
        let out = log_requests(&req, &connected(&["node0"]));
        assert!(out.requests.is_empty());
        assert_eq!(
            out.failed,
            vec![("node0".into(), "filter.instance: out of range".to_string())]
        );
    }

    fn log_data(status: &str, error: Option<pbc::ErrorInfo>) -> pb::LogData {
        pb::LogData {
            correlation_id: "log-1".into(),
            part_count: 3,
            part: 2,
            data: b"hello\nworld".to_vec(),
            status: status.into(),
            error,
        }
    }

    #[test]
    fn telemetry_push_log_ok_part() {
        // C++ SMs always fill `error`; a zero one is not an error.
        let part = log_data("ok", Some(pbc::ErrorInfo::default()));
        assert_eq!(
            to_json(&push_log("node0", &part)),
            json!({"correlationId": "log-1", "node": {"codename": "node0"}, "part": 2,
                   "partsCount": 3, "content": "aGVsbG8Kd29ybGQ=", "status": "ok"})
        );
        for (status, expected) in [("empty", "empty"), ("absent", "absent")] {
            let mut part = log_data(status, None);
            part.data.clear();
            let v = to_json(&push_log("node0", &part));
            assert_eq!(v["status"], json!(expected));
            assert_eq!(v["content"], json!(""));
            assert_eq!(v.get("errorInfo"), None);
        }
    }

    #[test]
    fn telemetry_push_log_errors() {
        let part = log_data(
            "error",
            Some(pbc::ErrorInfo {
                aos_code: 5,
                exit_code: 2,
                message: "no journal".into(),
            }),
        );
        assert_eq!(
            to_json(&push_log("node1", &part)),
            json!({"correlationId": "log-1", "node": {"codename": "node1"}, "part": 2,
                   "partsCount": 3, "content": "aGVsbG8Kd29ybGQ=", "status": "error",
                   "errorInfo": {"aosCode": 5, "exitCode": 2, "message": "no journal"}})
        );
        let part = log_data("error", None);
        assert_eq!(
            to_json(&push_log("node1", &part))["errorInfo"],
            json!({"aosCode": 1, "exitCode": 0, "message": ""})
        );
        let part = log_data(
            "error",
            Some(pbc::ErrorInfo {
                aos_code: 0,
                exit_code: 13,
                message: "denied".into(),
            }),
        );
        assert_eq!(
            to_json(&push_log("node1", &part))["errorInfo"],
            json!({"aosCode": 1, "exitCode": 13, "message": "denied"})
        );
        let part = log_data("bogus", None);
        let v = to_json(&push_log("node1", &part));
        assert_eq!(v["status"], json!("error"));
        assert_eq!(
            v["errorInfo"],
            json!({"aosCode": 1, "exitCode": 0, "message": "unknown log status \"bogus\""})
        );
    }

    // --- env vars --------------------------------------------------------------------------

    #[test]
    fn telemetry_override_env_vars_to_sm() {
        let msg: messages::OverrideEnvVars = serde_json::from_value(json!({
            "items": [
                {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 1,
                 "variables": [
                    {"name": "LOG_LEVEL", "value": "debug", "ttl": "2023-11-14T22:13:20Z"},
                    {"name": "MODE", "value": "eco"}
                 ]},
                {"item": {"id": "svc2"},
                 "variables": [
                    {"name": "BAD", "value": "x", "ttl": "tomorrow"},
                    {"name": "GOOD", "value": "y"}
                 ]},
                {"variables": [{"name": "ALL", "value": "1"}]},
                {"item": {"id": "svc3"}, "instance": u64::MAX,
                 "variables": [{"name": "HUGE", "value": "1"}]}
            ]
        }))
        .expect("overrideEnvVars");
        let out = override_env_vars_to_sm(&msg);
        let var = |name: &str, value: &str, expires| EnvVarOverride {
            var: pb::EnvVarInfo {
                name: name.into(),
                value: value.into(),
            },
            expires,
        };
        let filter = |item: &str, subject: &str, instance| pbc::InstanceFilter {
            item_id: item.into(),
            subject_id: subject.into(),
            instance,
        };
        assert_eq!(
            out.items,
            vec![
                InstanceEnvOverride {
                    filter: filter("svc1", "subj1", 1),
                    variables: vec![
                        var("LOG_LEVEL", "debug", ts(T0, 0)),
                        var("MODE", "eco", None)
                    ],
                },
                InstanceEnvOverride {
                    filter: filter("svc2", "", -1),
                    variables: vec![var("GOOD", "y", None)],
                },
                InstanceEnvOverride {
                    filter: filter("", "", -1),
                    variables: vec![var("ALL", "1", None)],
                },
            ]
        );
        assert_eq!(
            to_json(&out.refused),
            json!([
                {"item": {"id": "svc2"}, "subject": {"id": ""}, "instance": 0, "name": "BAD",
                 "errorInfo": {"aosCode": 6, "exitCode": 0,
                               "message": "ttl: \"tomorrow\" is not an RFC 3339 timestamp"}},
                {"item": {"id": "svc3"}, "subject": {"id": ""}, "instance": u64::MAX,
                 "name": "HUGE",
                 "errorInfo": {"aosCode": 6, "exitCode": 0,
                               "message": "instance: out of range"}}
            ])
        );
        assert_eq!(
            override_env_vars_to_sm(&messages::OverrideEnvVars::default()),
            EnvOverrides::default()
        );
    }

    #[test]
    fn telemetry_env_status_to_cloud_one_per_variable() {
        let statuses = vec![
            pb::InstanceStatus {
                instance: ident("svc1", "subj1", 0),
                env_vars: vec![
                    pb::EnvVarStatus {
                        name: "LOG_LEVEL".into(),
                        error: Some(pbc::ErrorInfo::default()),
                    },
                    pb::EnvVarStatus {
                        name: "MODE".into(),
                        error: Some(pbc::ErrorInfo {
                            aos_code: 6,
                            exit_code: 0,
                            message: "bad value".into(),
                        }),
                    },
                ],
                ..pb::InstanceStatus::default()
            },
            pb::InstanceStatus {
                instance: None,
                env_vars: vec![pb::EnvVarStatus {
                    name: "LOST".into(),
                    error: None,
                }],
                ..pb::InstanceStatus::default()
            },
            pb::InstanceStatus {
                instance: ident("svc2", "subj1", 3),
                env_vars: vec![pb::EnvVarStatus {
                    name: "X".into(),
                    error: None,
                }],
                ..pb::InstanceStatus::default()
            },
        ];
        assert_eq!(
            to_json(&env_status_to_cloud(&statuses)),
            json!({"statuses": [
                {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0,
                 "name": "LOG_LEVEL"},
                {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0,
                 "name": "MODE",
                 "errorInfo": {"aosCode": 6, "exitCode": 0, "message": "bad value"}},
                {"item": {"id": "svc2"}, "subject": {"id": "subj1"}, "instance": 3,
                 "name": "X"}
            ]})
        );
        assert_eq!(to_json(&env_status_to_cloud(&[])), json!({"statuses": []}));
    }
}
