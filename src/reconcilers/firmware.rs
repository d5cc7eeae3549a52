//! The firmware reconciler: `component` items requested with `numInstances: 0` get one
//! instance per node runtime whose type the item config lists (boot, rootfs, ...), pinned to
//! that node and runtime, without CPU/RAM accounting, UID, GID or network. Preinstalled
//! components the SMs report are passed through untouched.

use super::placement::platform_matches;
use crate::model::*;
use std::collections::BTreeSet;

pub fn plan(snap: &Snapshot, _now: UnixMillis) -> Plan {
    let mut plan = Plan::new(ReconcilerKind::Firmware);
    let Some(desired) = snap.desired.as_ref() else {
        return plan;
    };
    let mut requests: Vec<&DesiredInstances> = desired
        .instances
        .iter()
        .filter(|r| r.num_instances == 0)
        .collect();
    requests.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.item_id.cmp(&b.item_id)));
    for req in requests {
        let Some(item) = desired.item(&req.item_id) else {
            continue;
        };
        if item.item_type != ItemType::Component {
            continue;
        }
        let Some(image) = item
            .index_digest
            .as_ref()
            .and_then(|d| snap.catalogue.images.get(d))
        else {
            plan.condition(
                format!("item {}", item.id),
                "WaitingForImage",
                format!(
                    "component {} {} is not downloaded yet",
                    item.id, item.version
                ),
            );
            continue;
        };
        // Union of the runtime types over all manifests; no default for components.
        let types: BTreeSet<&str> = image
            .manifests
            .iter()
            .filter_map(|m| m.item_config.as_ref())
            .flat_map(|c| c.runtimes.iter().map(String::as_str))
            .collect();
        if types.is_empty() {
            plan.condition(
                format!("item {}", item.id),
                "NoRuntimeTypes",
                "component item config lists no runtimes",
            );
            continue;
        }
        // One instance per (node, runtime) of a listed type, numbered in node/runtime order.
        let mut index = 0u64;
        for node in snap.observed.nodes.values() {
            let mut runtimes: Vec<&RuntimeInfo> = node
                .sm
                .iter()
                .flat_map(|sm| sm.runtimes.iter())
                .filter(|r| types.contains(r.runtime_type.as_str()))
                .collect();
            runtimes.sort_by(|a, b| a.runtime_id.cmp(&b.runtime_id));
            for rt in runtimes {
                let ident = InstanceIdent::new(&item.id, &req.subject_id, index);
                index += 1;
                plan_one(&mut plan, snap, item, req, image, node, rt, ident);
            }
        }
    }
    plan
}

#[allow(clippy::too_many_arguments)]
fn plan_one(
    plan: &mut Plan,
    snap: &Snapshot,
    item: &DesiredItem,
    req: &DesiredInstances,
    image: &ItemImage,
    node: &ObservedNode,
    rt: &RuntimeInfo,
    ident: InstanceIdent,
) {
    let object = format!("instance {ident}");
    let reported = snap.observed.instances.get(&ident);
    let runs_version = reported.is_some_and(|r| {
        r.node_id == node.info.node_id
            && r.runtime_id == rt.runtime_id
            && r.version == item.version
            && r.state != InstanceState::Inactive
    });
    if !node.is_connected() && runs_version {
        return; // installed before the node went away: nothing to do until it is back
    }
    if !node.is_connected() || node.info.state != NodeState::Provisioned {
        let why = if node.is_connected() {
            format!("is {}", node.info.state)
        } else {
            "is not connected".to_string()
        };
        plan.condition(
            object,
            "NodeUnavailable",
            format!(
                "pinned to {}/{}, whose node {why}",
                node.info.node_id, rt.runtime_type
            ),
        );
        return;
    }
    let Some(manifest) = image.manifests.iter().find(|m| {
        m.item_config
            .as_ref()
            .is_some_and(|c| c.runtimes.contains(&rt.runtime_type))
            && platform_matches(&m.image, rt)
    }) else {
        plan.condition(
            object,
            "NoPlatform",
            format!(
                "no manifest for {}/{} ({} {})",
                node.info.node_id,
                rt.runtime_type,
                rt.arch_info.architecture,
                rt.arch_info.variant.as_deref().unwrap_or("")
            ),
        );
        return;
    };
    let placement = InstancePlacement {
        ident: ident.clone(),
        node_id: node.info.node_id.clone(),
        runtime_id: rt.runtime_id.clone(),
        runtime_type: rt.runtime_type.clone(),
        manifest_digest: manifest.digest.clone(),
        version: item.version.clone(),
        uid: 0,
        gid: 0,
        requested: Reservation::default(),
        env: Vec::new(),
    };
    let done = reported.is_some_and(|r| {
        r.node_id == placement.node_id
            && r.runtime_id == placement.runtime_id
            && r.version == placement.version
            && r.state != InstanceState::Inactive
    });
    if let Some(r) = reported.filter(|_| done)
        && r.state == InstanceState::Failed
    {
        plan.condition(
            object.clone(),
            "InstanceFailed",
            r.error
                .clone()
                .unwrap_or_else(|| "the node reports the update failed".into()),
        );
    }
    if !done || snap.allocations.instances.get(&ident) != Some(&placement) {
        plan.actions
            .push(Action::StartInstance(Box::new(InstanceStart {
                placement,
                item_type: ItemType::Component,
                owner_id: item.owner_id.clone(),
                priority: req.priority,
                storage_quota: 0,
                state_quota: 0,
                alert_rules: None,
            })));
    }
}
