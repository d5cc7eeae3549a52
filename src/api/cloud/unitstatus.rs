//! `unitStatus` derived from the store (cloud-protocol.md §2.5, §3.4).
//!
//! [`full_status`] builds the whole status from the observed unit: unit config (current, plus
//! the attempted version when it differs), every node, every item but `removed` (plus a synthetic
//! `installed` entry per preinstalled component), the instances grouped by item, subject and
//! version, and the unit subjects. [`delta`] compares two full statuses and keeps only the
//! sections that changed, with `isDeltaInfo: true`. Nothing here is stored: the status is
//! recomputed from the store whenever it is needed (ARCHITECTURE invariant 5).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use super::messages::{
    self, ArchInfo, CpuInfo, ErrorInfo, Identity, InstanceStatus, InstancesStatus, ItemStatus,
    NodeIdentity, NodeInfo, OsInfo, PartitionInfo, ResourceInfo, RuntimeInfo, UnitConfigStatus,
    UnitStatus,
};
use crate::model::{
    Condition, Connection, ItemState, ObservedNode, ObservedUnit, Snapshot, UnitConfigState,
};

/// The same state string in the wire enum; `None` if the wire has no such value.
fn wire<T: DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// An error in the cloud's shape (aosCode 1 = failed).
pub fn error_info(message: &str) -> ErrorInfo {
    ErrorInfo {
        aos_code: 1,
        exit_code: 0,
        message: message.to_owned(),
    }
}

fn positive(v: u64) -> Option<u64> {
    (v > 0).then_some(v)
}

fn os_info(o: &crate::model::OsInfo) -> OsInfo {
    OsInfo {
        os: o.os.clone(),
        version: o.version.clone().filter(|v| !v.is_empty()),
        features: o.features.clone(),
    }
}

fn arch_info(a: &crate::model::ArchInfo) -> ArchInfo {
    ArchInfo {
        architecture: a.architecture.clone(),
        variant: a.variant.clone().filter(|v| !v.is_empty()),
    }
}

/// One node as `unitStatus.nodes[]` reports it.
pub fn node_status(node: &ObservedNode) -> NodeInfo {
    let info = &node.info;
    let state = match node.connection {
        // Errata 3: a node whose SM stayed away is in error.
        Connection::Lost { .. } => messages::NodeState::Error,
        _ => wire(info.state.as_str()).unwrap_or_default(),
    };
    let error = info.error.clone().or_else(|| {
        node.node_config
            .as_ref()
            .and_then(|c| c.error.clone())
            .map(|e| format!("node config: {e}"))
    });
    let (runtimes, resources) = match &node.sm {
        Some(sm) => (
            sm.runtimes
                .iter()
                .map(|r| RuntimeInfo {
                    identity: Identity::with_codename(r.runtime_id.as_str()),
                    runtime_type: r.runtime_type.clone(),
                    arch_info: arch_info(&r.arch_info),
                    os_info: os_info(&r.os_info),
                    max_dmips: positive(r.max_dmips),
                    allowed_dmips: positive(r.allowed_dmips),
                    total_ram: positive(r.total_ram),
                    allowed_ram: positive(r.allowed_ram),
                    max_instances: r.max_instances,
                })
                .collect(),
            sm.resources
                .iter()
                .map(|r| ResourceInfo {
                    name: r.name.clone(),
                    shared_count: r.shared_count,
                })
                .collect(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    NodeInfo {
        identity: NodeIdentity {
            codename: info.node_id.as_str().to_owned(),
            title: info.title.clone(),
        },
        node_group_subject: Identity::with_codename(&info.node_type),
        max_dmips: info.max_dmips,
        physical_ram: positive(info.physical_ram),
        total_ram: info.total_ram,
        os_info: os_info(&info.os_info),
        cpus: info
            .cpus
            .iter()
            .map(|c| CpuInfo {
                model_name: c.model_name.clone(),
                total_num_cores: c.num_cores,
                total_num_threads: c.num_threads,
                arch_info: arch_info(&c.arch_info),
                max_dmips: positive(c.max_dmips),
            })
            .collect(),
        attrs: info.attrs.clone(),
        partitions: info
            .partitions
            .iter()
            .map(|p| PartitionInfo {
                name: p.name.clone(),
                path: Some(p.path.clone()).filter(|p| !p.is_empty()),
                types: p.types.clone(),
                total_size: p.total_size,
            })
            .collect(),
        state,
        is_connected: node.connection == Connection::Connected,
        error_info: error.as_deref().map(error_info),
        runtimes,
        resources,
    }
}

fn unit_config(o: &ObservedUnit) -> Vec<UnitConfigStatus> {
    let status = &o.unit_config;
    let installed = status.config.as_ref().map(|c| c.version.to_string());
    let mut out = Vec::new();
    match status.state {
        UnitConfigState::Absent => out.push(UnitConfigStatus {
            version: None,
            state: messages::UnitConfigState::Absent,
            error_info: status.error.as_deref().map(error_info),
        }),
        UnitConfigState::Installed => out.push(UnitConfigStatus {
            version: status
                .version
                .as_ref()
                .map(ToString::to_string)
                .or(installed),
            state: messages::UnitConfigState::Installed,
            error_info: None,
        }),
        UnitConfigState::Failed => {
            let attempted = status.version.as_ref().map(ToString::to_string);
            // The config still in force, then the attempt that failed.
            if let Some(v) = installed.clone().filter(|v| Some(v) != attempted.as_ref()) {
                out.push(UnitConfigStatus {
                    version: Some(v),
                    state: messages::UnitConfigState::Installed,
                    error_info: None,
                });
            }
            out.push(UnitConfigStatus {
                version: attempted,
                state: messages::UnitConfigState::Failed,
                error_info: Some(error_info(
                    status.error.as_deref().unwrap_or("unit config failed"),
                )),
            });
        }
    }
    out
}

fn items(o: &ObservedUnit) -> Vec<ItemStatus> {
    let mut out: Vec<ItemStatus> = o
        .items
        .values()
        .filter(|i| i.state != ItemState::Removed)
        .map(|i| ItemStatus {
            item: Identity {
                id: Some(i.id.as_str().to_owned()),
                item_type: wire(i.item_type.as_str()),
                ..Identity::default()
            },
            version: i.version.clone(),
            state: wire(i.state.as_str()).unwrap_or_default(),
            error_info: None,
        })
        .collect();
    // Preinstalled components have no item record: report them installed, once per version.
    let mut seen = std::collections::BTreeSet::new();
    for inst in o.instances.values().filter(|i| i.preinstalled) {
        let key = (inst.ident.item_id.as_str().to_owned(), inst.version.clone());
        if seen.insert(key.clone()) {
            out.push(ItemStatus {
                item: Identity {
                    codename: Some(key.0),
                    item_type: Some(messages::UpdateItemType::Component),
                    ..Identity::default()
                },
                version: key.1,
                state: messages::ItemState::Installed,
                error_info: None,
            });
        }
    }
    out
}

fn instances(o: &ObservedUnit) -> Vec<InstancesStatus> {
    // Item type by item ID, from the items the unit holds.
    let types: BTreeMap<&str, messages::UpdateItemType> = o
        .items
        .values()
        .filter_map(|i| Some((i.id.as_str(), wire(i.item_type.as_str())?)))
        .collect();
    let mut groups: BTreeMap<(String, String, String, bool), Vec<InstanceStatus>> = BTreeMap::new();
    for inst in o.instances.values() {
        let key = (
            inst.ident.item_id.as_str().to_owned(),
            inst.ident.subject_id.as_str().to_owned(),
            inst.version.clone(),
            inst.preinstalled,
        );
        groups.entry(key).or_default().push(InstanceStatus {
            node: Identity::with_codename(inst.node_id.as_str()),
            runtime: Identity::with_codename(inst.runtime_id.as_str()),
            instance: inst.ident.instance,
            state_checksum: None,
            state: wire(inst.state.as_str()).unwrap_or_default(),
            error_info: inst.error.as_deref().map(error_info),
        });
    }
    groups
        .into_iter()
        .map(|((item, subject, version, preinstalled), instances)| {
            let (item, subject) = if preinstalled {
                (
                    Identity {
                        codename: Some(item),
                        item_type: Some(messages::UpdateItemType::Component),
                        ..Identity::default()
                    },
                    Identity::with_codename(&subject),
                )
            } else {
                let item_type = types.get(item.as_str()).copied();
                (
                    Identity {
                        id: Some(item),
                        item_type,
                        ..Identity::default()
                    },
                    Identity::with_id(&subject),
                )
            };
            InstancesStatus {
                item,
                subject,
                version,
                instances,
            }
        })
        .collect()
}

/// The full status (`isDeltaInfo: false`, every section present).
pub fn full_status(o: &ObservedUnit) -> UnitStatus {
    UnitStatus {
        correlation_id: None,
        is_delta_info: false,
        unit_config: Some(unit_config(o)),
        nodes: Some(o.nodes.values().map(node_status).collect()),
        items: Some(items(o)),
        instances: Some(instances(o)),
        subjects: Some(
            o.unit_subjects
                .iter()
                .map(|s| Identity::with_codename(s.as_str()))
                .collect(),
        ),
    }
}

/// [`full_status`] plus the desired items the unit does not hold yet: `downloading` while a
/// blob of theirs is missing, `failed` with the error when fetching or verifying one of them
/// failed (the runner keeps retrying; the state follows), `pending` once everything is stored.
pub fn full_status_of(snap: &Snapshot, conditions: &BTreeMap<String, Condition>) -> UnitStatus {
    let mut status = full_status(&snap.observed);
    if let Some(items) = status.items.as_mut() {
        items.extend(desired_items(snap, conditions));
    }
    status
}

/// Fills `stateChecksum` of every reported instance that `checksum(item ID, subject ID,
/// instance)` knows one for: the checksum of its state as the unit last knew it (accepted by
/// the cloud, written by it, or sent as `newState`). Others keep none.
pub fn set_state_checksums(
    status: &mut UnitStatus,
    checksum: impl Fn(&str, &str, u64) -> Option<String>,
) {
    for group in status.instances.iter_mut().flatten() {
        let (Some(item), Some(subject)) = (group.item.id.as_deref(), group.subject.id.as_deref())
        else {
            continue;
        };
        for inst in &mut group.instances {
            inst.state_checksum = checksum(item, subject, inst.instance);
        }
    }
}

/// The message of a failed action's condition without the runner's framing
/// (`<reconciler>: <error> (attempt <n>)`), so that a retry does not change the status.
fn failure_message(c: &Condition) -> String {
    let m = c.message.as_str();
    let m = m.split_once(": ").map_or(m, |(_, rest)| rest);
    let m = m.rsplit_once(" (attempt ").map_or(m, |(head, _)| head);
    m.to_owned()
}

fn desired_items(snap: &Snapshot, conditions: &BTreeMap<String, Condition>) -> Vec<ItemStatus> {
    let Some(desired) = snap.desired.as_ref() else {
        return Vec::new();
    };
    let o = &snap.observed;
    let mut out = Vec::new();
    for item in &desired.items {
        let held = o
            .items
            .get(&(item.id.clone(), item.version.clone()))
            .is_some_and(|i| i.state != ItemState::Removed);
        if held {
            continue;
        }
        let Some(index) = &item.index_digest else {
            continue;
        };
        let blobs = match snap.catalogue.images.get(index) {
            Some(image) => image.blobs(),
            None => vec![index.clone()],
        };
        let failure = blobs
            .iter()
            .find_map(|b| conditions.get(&format!("action/blob/{b}")));
        let (state, error) = match failure {
            Some(c) => (
                messages::ItemState::Failed,
                Some(error_info(&failure_message(c))),
            ),
            None if blobs.iter().any(|b| !o.blobs.contains(b))
                || !snap.catalogue.images.contains_key(index) =>
            {
                (messages::ItemState::Downloading, None)
            }
            None => (messages::ItemState::Pending, None),
        };
        out.push(ItemStatus {
            item: Identity {
                id: Some(item.id.as_str().to_owned()),
                item_type: wire(item.item_type.as_str()),
                ..Identity::default()
            },
            version: item.version.clone(),
            state,
            error_info: error,
        });
    }
    out
}

/// The sections of `now` that differ from `sent` (both full), as a delta status; `None` when
/// nothing changed.
pub fn delta(sent: &UnitStatus, now: &UnitStatus) -> Option<UnitStatus> {
    fn changed<T: Clone + PartialEq>(a: &Option<T>, b: &Option<T>) -> Option<T> {
        if a == b { None } else { b.clone() }
    }
    let d = UnitStatus {
        correlation_id: None,
        is_delta_info: true,
        unit_config: changed(&sent.unit_config, &now.unit_config),
        nodes: changed(&sent.nodes, &now.nodes),
        items: changed(&sent.items, &now.items),
        instances: changed(&sent.instances, &now.instances),
        subjects: changed(&sent.subjects, &now.subjects),
    };
    let any = d.unit_config.is_some()
        || d.nodes.is_some()
        || d.items.is_some()
        || d.instances.is_some()
        || d.subjects.is_some();
    any.then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InstanceIdent, InstanceState, ReportedInstance, StoredItem};
    use serde_json::json;

    fn example() -> ObservedUnit {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/desired-states/fresh-install");
        crate::scenario::load(&dir)
            .expect("example scenario")
            .snapshot
            .observed
    }

    #[test]
    fn nodes_match_the_example_units_expected_report() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/desired-states/fresh-install");
        let nodes: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("nodes.json")).unwrap())
                .unwrap();
        let status = full_status(&example());
        let got = serde_json::to_value(status.nodes.unwrap()).unwrap();
        let expected: Vec<serde_json::Value> = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["unitStatusNode"].clone())
            .collect();
        assert_eq!(got, json!(expected));
    }

    #[test]
    fn full_status_sections_and_preinstalled_entries() {
        let mut o = example();
        o.items.insert(
            ("svc".into(), "1.0.0".into()),
            StoredItem {
                id: "svc".into(),
                item_type: crate::model::ItemType::Service,
                version: "1.0.0".into(),
                index_digest: crate::model::Digest::parse(&format!("sha256:{}", "1".repeat(64)))
                    .unwrap(),
                state: ItemState::Installed,
                removed_at: None,
            },
        );
        o.items.insert(
            ("old".into(), "0.1.0".into()),
            StoredItem {
                id: "old".into(),
                item_type: crate::model::ItemType::Layer,
                version: "0.1.0".into(),
                index_digest: crate::model::Digest::parse(&format!("sha256:{}", "2".repeat(64)))
                    .unwrap(),
                state: ItemState::Removed,
                removed_at: Some(1),
            },
        );
        for (i, preinstalled) in [(0, false), (1, false)] {
            let ident = InstanceIdent::new("svc", "subj", i);
            o.instances.insert(
                ident.clone(),
                ReportedInstance {
                    ident,
                    node_id: "main".into(),
                    runtime_id: "crun-main".into(),
                    version: "1.0.0".into(),
                    state: if i == 0 {
                        InstanceState::Active
                    } else {
                        InstanceState::Failed
                    },
                    error: (i == 1).then(|| "exit 3".to_owned()),
                    preinstalled,
                },
            );
        }
        let ident = InstanceIdent::new("boot", "", 0);
        o.instances.insert(
            ident.clone(),
            ReportedInstance {
                ident,
                node_id: "secondary-1".into(),
                runtime_id: "boot-s1".into(),
                version: "2.3.0".into(),
                state: InstanceState::Active,
                error: None,
                preinstalled: true,
            },
        );
        let s = serde_json::to_value(full_status(&o)).unwrap();
        assert_eq!(s["isDeltaInfo"], json!(false));
        assert_eq!(
            s["unitConfig"],
            json!([{"version": "1.2.0", "state": "installed"}])
        );
        assert_eq!(
            s["items"],
            json!([
                {"item": {"id": "svc", "type": "service"}, "version": "1.0.0", "state": "installed"},
                {"item": {"codename": "boot", "type": "component"}, "version": "2.3.0", "state": "installed"}
            ])
        );
        assert_eq!(
            s["instances"],
            json!([
                {"item": {"codename": "boot", "type": "component"}, "subject": {"codename": ""},
                 "version": "2.3.0", "instances": [
                    {"node": {"codename": "secondary-1"}, "runtime": {"codename": "boot-s1"},
                     "instance": 0, "state": "active"}]},
                {"item": {"id": "svc", "type": "service"}, "subject": {"id": "subj"},
                 "version": "1.0.0", "instances": [
                    {"node": {"codename": "main"}, "runtime": {"codename": "crun-main"},
                     "instance": 0, "state": "active"},
                    {"node": {"codename": "main"}, "runtime": {"codename": "crun-main"},
                     "instance": 1, "state": "failed",
                     "errorInfo": {"aosCode": 1, "exitCode": 0, "message": "exit 3"}}]}
            ])
        );
        assert_eq!(
            s["subjects"],
            json!([{"codename": "d3f7a1c9-8b26-4e5d-9f40-1a6e2c8b5d73"}])
        );
    }

    #[test]
    fn state_checksums_go_to_the_instances_of_cloud_items_only() {
        let instance = |n: u64| InstanceStatus {
            instance: n,
            ..InstanceStatus::default()
        };
        let group = |item: Identity, subject: Identity, n: u64| InstancesStatus {
            item,
            subject,
            version: "1.0.0".into(),
            instances: (0..n).map(instance).collect(),
        };
        let mut status = UnitStatus {
            instances: Some(vec![
                group(Identity::with_id("svc"), Identity::with_id("subj"), 2),
                group(Identity::with_id("other"), Identity::with_id("subj"), 1),
                // A preinstalled component's group is named by codename: it keeps no state.
                group(
                    Identity::with_codename("boot"),
                    Identity::with_codename(""),
                    1,
                ),
            ]),
            ..full_status(&example())
        };
        // One instance has a known state: only it gets the field.
        set_state_checksums(&mut status, |i, s, n| {
            (i == "svc" && s == "subj" && n == 1).then(|| "ab12".to_owned())
        });
        assert_eq!(
            serde_json::to_value(&status).unwrap()["instances"],
            json!([
                {"item": {"id": "svc"}, "subject": {"id": "subj"}, "version": "1.0.0", "instances": [
                    {"node": {}, "runtime": {}, "instance": 0, "state": "activating"},
                    {"node": {}, "runtime": {}, "instance": 1, "stateChecksum": "ab12", "state": "activating"}]},
                {"item": {"id": "other"}, "subject": {"id": "subj"}, "version": "1.0.0", "instances": [
                    {"node": {}, "runtime": {}, "instance": 0, "state": "activating"}]},
                {"item": {"codename": "boot"}, "subject": {"codename": ""}, "version": "1.0.0", "instances": [
                    {"node": {}, "runtime": {}, "instance": 0, "state": "activating"}]}
            ])
        );
        // Asked for every instance: the component's still gets none.
        set_state_checksums(&mut status, |_, _, _| Some("cd34".to_owned()));
        let sums: Vec<Option<&str>> = status
            .instances
            .iter()
            .flatten()
            .flat_map(|g| &g.instances)
            .map(|i| i.state_checksum.as_deref())
            .collect();
        assert_eq!(sums, [Some("cd34"), Some("cd34"), Some("cd34"), None]);
    }

    #[test]
    fn delta_keeps_only_changed_sections() {
        let o = example();
        let a = full_status(&o);
        assert_eq!(delta(&a, &a), None);
        let mut o2 = o.clone();
        if let Some(n) = o2.nodes.values_mut().next() {
            n.connection = Connection::Lost { since: 5 };
        }
        let b = full_status(&o2);
        let d = serde_json::to_value(delta(&a, &b).expect("changed")).unwrap();
        let keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["isDeltaInfo", "nodes"]);
        assert_eq!(d["isDeltaInfo"], json!(true));
        assert_eq!(d["nodes"][0]["state"], json!("error"));
        assert_eq!(d["nodes"][0]["isConnected"], json!(false));
    }

    #[test]
    fn failed_unit_config_reports_current_and_attempted() {
        let mut o = example();
        let installed: crate::model::UnitConfig = crate::model::UnitConfig {
            format_version: "7".into(),
            version: crate::model::Version::parse("1.0.0").unwrap(),
            nodes: Vec::new(),
        };
        o.unit_config = crate::model::UnitConfigStatus {
            state: UnitConfigState::Failed,
            version: Some(crate::model::Version::parse("2.0.0").unwrap()),
            error: Some("node main rejected it".into()),
            config: Some(installed),
        };
        let s = serde_json::to_value(full_status(&o)).unwrap();
        assert_eq!(
            s["unitConfig"],
            json!([
                {"version": "1.0.0", "state": "installed"},
                {"version": "2.0.0", "state": "failed",
                 "errorInfo": {"aosCode": 1, "exitCode": 0, "message": "node main rejected it"}}
            ])
        );
    }
}
