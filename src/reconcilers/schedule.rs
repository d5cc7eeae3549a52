//! The update scheduler's pure core: where each kind of update stands, derived from the
//! snapshot (desired items against downloaded blobs and the catalogue, installed items,
//! instances, the unit config) and the scheduler's persisted record; and the gate that holds
//! back the actions that would change the running unit until the kind's policy allows it.
//!
//! Downloads are never held. What is held, per kind:
//! - SOTA: installing and removing non-component items, starting and stopping service
//!   instances, installing the unit config, pushing node configs, pausing and resuming nodes;
//! - FOTA: installing and removing component items, starting component instances.
//!
//! A kind's update is identified by the fingerprint of its part of the desired state, so a new
//! different desired state needs a new approval, and one that was reached (`done`) never waits
//! again: later repairs (an instance restarted after a node came back) go on at once.

use super::{images, instances, unitconfig};
use crate::model::*;
use sha2::{Digest as _, Sha256};

/// How long instances may stay `activating` after the last instance state change before the
/// update fails (upstream v7 update manager).
pub const ACTIVATION_TIMEOUT_MS: i64 = 10 * 60 * 1000;

/// The kind of update an item type belongs to.
pub fn kind_of_item(t: ItemType) -> UpdateKind {
    if t == ItemType::Component {
        UpdateKind::Fota
    } else {
        UpdateKind::Sota
    }
}

/// The kind of an item known by ID only: from the desired items, else from the held items;
/// SOTA when unknown.
fn kind_of_item_id(snap: &Snapshot, item_id: &str) -> UpdateKind {
    let t = snap
        .desired
        .as_ref()
        .and_then(|d| d.item(item_id))
        .map(|i| i.item_type)
        .or_else(|| {
            snap.observed
                .items
                .values()
                .find(|s| s.id == item_id)
                .map(|s| s.item_type)
        });
    t.map_or(UpdateKind::Sota, kind_of_item)
}

/// The kind of update an action belongs to when it changes the running unit; `None` for the
/// actions that never wait (downloads, deletions of what nothing uses, allocations).
pub fn action_kind(action: &Action, snap: &Snapshot) -> Option<UpdateKind> {
    match action {
        Action::InstallItem { item_type, .. } => Some(kind_of_item(*item_type)),
        Action::RemoveItem { item_id, version } => Some(
            snap.observed
                .items
                .get(&(item_id.clone(), version.clone()))
                .map_or_else(
                    || kind_of_item_id(snap, item_id),
                    |s| kind_of_item(s.item_type),
                ),
        ),
        Action::StartInstance(s) => Some(kind_of_item(s.item_type)),
        Action::StopInstance { ident, .. } => Some(kind_of_item_id(snap, &ident.item_id)),
        Action::InstallUnitConfig { .. }
        | Action::PushNodeConfig { .. }
        | Action::SetNodeState { .. } => Some(UpdateKind::Sota),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of one kind's part of the desired state.
pub fn fingerprint(desired: &DesiredState, kind: UpdateKind) -> String {
    let items: Vec<&DesiredItem> = desired
        .items
        .iter()
        .filter(|i| kind_of_item(i.item_type) == kind)
        .collect();
    let requests: Vec<&DesiredInstances> = desired
        .instances
        .iter()
        .filter(|r| {
            desired
                .item(&r.item_id)
                .map_or(UpdateKind::Sota, |i| kind_of_item(i.item_type))
                == kind
        })
        .collect();
    let value = match kind {
        UpdateKind::Sota => serde_json::json!({
            "items": items,
            "instances": requests,
            "unitConfig": desired.unit_config,
            "nodes": desired.nodes,
            "subjects": desired.subjects,
        }),
        UpdateKind::Fota => serde_json::json!({ "items": items, "instances": requests }),
    };
    hex(&Sha256::digest(value.to_string().as_bytes()))
}

/// Whether a kind's actions may change the running unit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Policy `trigger`: waits for StartSOTAUpdate / StartFOTAUpdate.
    WaitingForStart,
    /// Policy `timetable`: waits for the next slot (`None`: the timetable has none).
    WaitingForUpdateWindow(Option<UnixMillis>),
}

pub fn gate(snap: &Snapshot, kind: UpdateKind, now: UnixMillis) -> Gate {
    let schedule = snap.settings.update_schedules.of(kind);
    let Some(desired) = snap.desired.as_ref() else {
        return Gate::Open;
    };
    if schedule.policy == UpdatePolicy::Auto {
        return Gate::Open;
    }
    let fp = fingerprint(desired, kind);
    let rec = snap.progress.of(kind);
    if rec.approved.as_deref() == Some(fp.as_str()) || rec.done.as_deref() == Some(fp.as_str()) {
        return Gate::Open;
    }
    match schedule.policy {
        UpdatePolicy::Auto => Gate::Open,
        UpdatePolicy::Trigger => Gate::WaitingForStart,
        UpdatePolicy::Timetable => Gate::WaitingForUpdateWindow(schedule.next_window(now)),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a UTC time (civil-from-days, proleptic Gregorian).
fn utc(ms: UnixMillis) -> String {
    let days = ms.div_euclid(86_400_000);
    let secs = ms.rem_euclid(86_400_000) / 1000;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Removes from a reconciler's plan the actions whose kind's gate is closed, and says why in
/// a condition `update <kind>`; adds the failure of a finished update as a condition of the
/// reconciler that runs that kind's instances.
pub fn apply_gate(mut plan: Plan, snap: &Snapshot, now: UnixMillis) -> Plan {
    for kind in UpdateKind::ALL {
        let held = plan
            .actions
            .iter()
            .filter(|a| action_kind(a, snap) == Some(kind))
            .count();
        if held > 0 {
            let g = gate(snap, kind, now);
            if g != Gate::Open {
                plan.actions.retain(|a| action_kind(a, snap) != Some(kind));
                let (reason, message) = match g {
                    Gate::WaitingForStart => (
                        "WaitingForStart",
                        format!(
                            "{held} action(s) wait for Start{}Update (policy trigger)",
                            kind.as_str().to_uppercase()
                        ),
                    ),
                    Gate::WaitingForUpdateWindow(Some(at)) => (
                        "WaitingForUpdateWindow",
                        format!(
                            "{held} action(s) wait for the {kind} timetable slot at {}",
                            utc(at)
                        ),
                    ),
                    _ => (
                        "WaitingForUpdateWindow",
                        format!("{held} action(s) wait; the {kind} timetable has no slot"),
                    ),
                };
                plan.condition(format!("update {kind}"), reason, message);
            }
        }
        let runs_kind = match kind {
            UpdateKind::Sota => plan.reconciler == ReconcilerKind::Instances,
            UpdateKind::Fota => plan.reconciler == ReconcilerKind::Firmware,
        };
        if runs_kind
            && let Some(desired) = snap.desired.as_ref()
            && let rec = snap.progress.of(kind)
            && let Some(error) = rec.error.as_ref()
            && rec.done.as_deref() == Some(fingerprint(desired, kind).as_str())
        {
            plan.condition(format!("update {kind}"), "UpdateFailed", error.clone());
        }
    }
    plan
}

/// What one kind's update changes, for the update scheduler's notifications.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub error: Option<String>,
    /// FOTA: (component ID, component type, version) to install.
    pub components: Vec<(String, String, String)>,
    /// SOTA: the desired unit config version when it is not installed yet.
    pub unit_config: Option<String>,
    /// SOTA: (service ID, version).
    pub install_services: Vec<(String, String)>,
    pub remove_services: Vec<(String, String)>,
    /// SOTA: (layer ID, digest, version).
    pub install_layers: Vec<(String, String, String)>,
    pub remove_layers: Vec<(String, String, String)>,
}

fn installed(snap: &Snapshot, id: &str, version: &str) -> bool {
    snap.observed
        .items
        .get(&(id.to_string(), version.to_string()))
        .is_some_and(|s| s.state == ItemState::Installed)
}

/// Whether some desired item of the kind still misses blobs (or its parsed image).
fn downloads_pending(snap: &Snapshot, desired: &DesiredState, kind: UpdateKind) -> bool {
    desired
        .items
        .iter()
        .filter(|i| kind_of_item(i.item_type) == kind)
        .filter(|i| !installed(snap, &i.id, &i.version))
        .filter_map(|i| i.index_digest.as_ref())
        .any(|index| match snap.catalogue.images.get(index) {
            Some(image) => image
                .blobs()
                .iter()
                .any(|b| !snap.observed.blobs.contains(b)),
            None => true,
        })
}

/// Whether anything of the kind is left to do: an action the ungated reconcilers would take,
/// or an instance of the kind still activating.
fn changes_pending(snap: &Snapshot, kind: UpdateKind, now: UnixMillis) -> bool {
    let plans = [
        images::plan(snap, now),
        unitconfig::plan(snap, now),
        instances::plan(snap, now),
        super::firmware::plan(snap, now),
    ];
    plans
        .iter()
        .flat_map(|p| p.actions.iter())
        .any(|a| action_kind(a, snap) == Some(kind))
        || !activating(snap, kind).is_empty()
}

/// The instances of the kind that are still `activating`.
pub fn activating(snap: &Snapshot, kind: UpdateKind) -> Vec<&InstanceIdent> {
    snap.observed
        .instances
        .values()
        .filter(|r| r.state == InstanceState::Activating && !r.preinstalled)
        .filter(|r| kind_of_item_id(snap, &r.ident.item_id) == kind)
        .map(|r| &r.ident)
        .collect()
}

/// The failure of an update whose instances are still activating `ACTIVATION_TIMEOUT_MS`
/// after the last instance state change (`last_change`).
pub fn activation_overdue(
    snap: &Snapshot,
    kind: UpdateKind,
    last_change: UnixMillis,
    now: UnixMillis,
) -> Option<String> {
    let waiting = activating(snap, kind);
    if waiting.is_empty() || now.saturating_sub(last_change) < ACTIVATION_TIMEOUT_MS {
        return None;
    }
    let names: Vec<String> = waiting.iter().map(|i| i.to_string()).collect();
    Some(format!(
        "instances still activating 10 minutes after the last instance state change: {}",
        names.join(", ")
    ))
}

fn fill_lists(snap: &Snapshot, desired: &DesiredState, kind: UpdateKind, st: &mut UpdateStatus) {
    let is_desired = |id: &str, version: &str| {
        desired
            .items
            .iter()
            .any(|i| i.id == id && i.version == version)
    };
    for item in desired
        .items
        .iter()
        .filter(|i| kind_of_item(i.item_type) == kind)
    {
        if installed(snap, &item.id, &item.version) {
            continue;
        }
        let digest = item
            .index_digest
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default();
        match item.item_type {
            ItemType::Service => st
                .install_services
                .push((item.id.clone(), item.version.clone())),
            ItemType::Layer => {
                st.install_layers
                    .push((item.id.clone(), digest, item.version.clone()))
            }
            ItemType::Component => {
                let component_type = item
                    .index_digest
                    .as_ref()
                    .and_then(|d| snap.catalogue.images.get(d))
                    .and_then(|img| {
                        img.manifests
                            .iter()
                            .filter_map(|m| m.item_config.as_ref())
                            .flat_map(|c| c.runtimes.iter())
                            .next()
                            .cloned()
                    })
                    .unwrap_or_default();
                st.components
                    .push((item.id.clone(), component_type, item.version.clone()));
            }
            _ => {}
        }
    }
    for ((id, version), stored) in &snap.observed.items {
        if stored.state != ItemState::Installed
            || kind_of_item(stored.item_type) != kind
            || is_desired(id, version)
        {
            continue;
        }
        match stored.item_type {
            ItemType::Service => st.remove_services.push((id.clone(), version.clone())),
            ItemType::Layer => st.remove_layers.push((
                id.clone(),
                stored.index_digest.to_string(),
                version.clone(),
            )),
            _ => {}
        }
    }
    if kind == UpdateKind::Sota
        && let Some(uc) = &desired.unit_config
    {
        let status = &snap.observed.unit_config;
        let current = status.state == UnitConfigState::Installed
            && status.version.as_ref().is_some_and(|v| *v >= uc.version);
        if !current {
            st.unit_config = Some(uc.version.to_string());
        }
    }
}

/// Where one kind's update stands.
pub fn status(snap: &Snapshot, kind: UpdateKind, now: UnixMillis) -> UpdateStatus {
    let mut st = UpdateStatus::default();
    let Some(desired) = snap.desired.as_ref() else {
        return st;
    };
    let fp = fingerprint(desired, kind);
    let rec = snap.progress.of(kind);
    if rec.done.as_deref() == Some(fp.as_str()) {
        st.error = rec.error.clone();
        return st;
    }
    fill_lists(snap, desired, kind, &mut st);
    let open = gate(snap, kind, now) == Gate::Open;
    st.state = if downloads_pending(snap, desired, kind) {
        UpdateState::Downloading
    } else if !changes_pending(snap, kind, now) && (open || !unplaced(snap, desired, kind)) {
        UpdateState::NoUpdate
    } else if open {
        UpdateState::Updating
    } else {
        UpdateState::ReadyToUpdate
    };
    st
}

/// Whether an instance the desired state asks for has no placement yet. Before the update is
/// started, such an instance makes it an update even when no node can take it now (with no
/// node connected the planner has nothing to do): otherwise the update would count as done,
/// the gate would open, and the instances would start without a start or a slot once nodes
/// came back. After the start, an instance that cannot be placed fails, as upstream reports
/// it, and the update ends.
fn unplaced(snap: &Snapshot, desired: &DesiredState, kind: UpdateKind) -> bool {
    desired
        .instances
        .iter()
        .filter(|r| kind_of_item_id(snap, &r.item_id) == kind)
        .any(|r| {
            (0..r.num_instances).any(|instance| {
                let ident = InstanceIdent {
                    item_id: r.item_id.clone(),
                    subject_id: r.subject_id.clone(),
                    instance,
                };
                !snap.allocations.instances.contains_key(&ident)
            })
        })
}

#[cfg(test)]
mod tests;
