//! The instances reconciler: expands the desired instance requests, keeps valid placements
//! where they are, places the rest (see `placement`), and plans the starts, stops and releases
//! that make the nodes run exactly that.
//!
//! Components with `numInstances: 0` belong to the firmware reconciler and are left alone here.

use super::placement::{self, InstanceRequest, NodeBudget};
use crate::model::*;
use foldhash::HashMap;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// An instance the desired state asks for, with what placement needs to know about it.
struct Wanted<'a> {
    ident: InstanceIdent,
    /// Position of its request in priority order.
    req_idx: usize,
    item: &'a DesiredItem,
    req: &'a DesiredInstances,
    image: &'a ItemImage,
}

fn node_config(snap: &Snapshot, node: &ObservedNode) -> NodeConfig {
    match &snap.observed.unit_config.config {
        Some(uc) => uc.node_config(&node.info.node_id, &node.info.node_type),
        None => NodeConfig {
            node_id: Some(node.info.node_id.clone()),
            node_type: node.info.node_type.clone(),
            ..NodeConfig::default()
        },
    }
}

fn desired_paused(desired: &DesiredState, node_id: &str) -> bool {
    desired
        .nodes
        .iter()
        .any(|n| n.node_id == node_id && n.state == DesiredNodeState::Paused)
}

/// Nodes placement may use, in a fixed order (node ID), with their budgets.
pub fn node_budgets(snap: &Snapshot, desired: &DesiredState) -> Vec<NodeBudget> {
    snap.observed
        .nodes
        .values()
        .filter(|n| n.is_schedulable() && !desired_paused(desired, &n.info.node_id))
        .map(|n| NodeBudget::new(n, node_config(snap, n), n.is_connected()))
        .collect()
}

/// The item config of a manifest; services without one run with defaults.
fn item_config(m: &ManifestInfo) -> ItemConfig {
    m.item_config.clone().unwrap_or_default()
}

pub fn plan(snap: &Snapshot, now: UnixMillis) -> Plan {
    let mut plan = Plan::new(ReconcilerKind::Instances);
    let Some(desired) = snap.desired.as_ref() else {
        return plan;
    };
    let allocs = &snap.allocations;

    // 1. Expand the requests, highest priority first, then item ID.
    let mut requests: Vec<&DesiredInstances> = desired.instances.iter().collect();
    requests.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.item_id.cmp(&b.item_id))
            .then(a.subject_id.cmp(&b.subject_id))
    });
    let mut wanted: Vec<Wanted<'_>> = Vec::new();
    // Instances we must not touch: desired, but their image is not known yet.
    let mut untouched: BTreeSet<InstanceIdent> = BTreeSet::new();
    // A second request for the same item and subject would ask for the same instances again:
    // the first one (highest priority) stands.
    let mut requested: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (req_idx, req) in requests.into_iter().enumerate() {
        if !requested.insert((&req.item_id, &req.subject_id)) {
            plan.condition(
                format!("item {}", req.item_id),
                "DuplicateRequest",
                format!(
                    "instances of subject {} are requested more than once: the request of highest priority stands",
                    req.subject_id
                ),
            );
            continue;
        }
        let Some(item) = desired.item(&req.item_id) else {
            plan.condition(
                format!("item {}", req.item_id),
                "UnknownItem",
                "instances requested for an item that is not in the desired items",
            );
            continue;
        };
        match item.item_type {
            ItemType::Service => {}
            ItemType::Component if req.num_instances > 0 => {}
            ItemType::Component => continue, // firmware reconciler
            other => {
                plan.condition(
                    format!("item {}", item.id),
                    "NotRunnable",
                    format!("{other} items have no instances"),
                );
                continue;
            }
        }
        let idents =
            (0..req.num_instances).map(|i| InstanceIdent::new(&req.item_id, &req.subject_id, i));
        if let Some(subject) = desired.subjects.iter().find(|s| s.id == req.subject_id)
            && subject.is_reported_from_unit
            && !snap.observed.unit_subjects.contains(&req.subject_id)
        {
            for ident in idents {
                plan.condition(
                    format!("instance {ident}"),
                    "SubjectNotOnUnit",
                    format!(
                        "subject {} is not a unit subject reported by IAM: instance disabled",
                        req.subject_id
                    ),
                );
            }
            continue;
        }
        let image = item
            .index_digest
            .as_ref()
            .and_then(|d| snap.catalogue.images.get(d));
        let Some(image) = image else {
            for ident in idents {
                plan.condition(
                    format!("instance {ident}"),
                    "WaitingForImage",
                    format!("item {} {} is not downloaded yet", item.id, item.version),
                );
                untouched.insert(ident);
            }
            continue;
        };
        for ident in idents {
            wanted.push(Wanted {
                ident,
                req_idx,
                item,
                req,
                image,
            });
        }
    }

    // 2. Budgets; keep valid existing placements first, in priority order.
    let mut nodes = node_budgets(snap, desired);
    let node_idx: BTreeMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.node_id.clone(), i))
        .collect();
    // Lookups by identity are hashed: at 10,000 instances ordered-map searches dominate. The
    // placements are kept by position in `wanted`; kept ones are borrowed from the snapshot,
    // only new ones are built.
    let mut placed: Vec<Option<Cow<'_, InstancePlacement>>> = wanted.iter().map(|_| None).collect();
    let position: HashMap<&InstanceIdent, usize> = wanted
        .iter()
        .enumerate()
        .map(|(i, w)| (&w.ident, i))
        .collect();
    let stored: HashMap<&InstanceIdent, &InstancePlacement> = allocs.instances.iter().collect();
    let reported_by: HashMap<&InstanceIdent, &ReportedInstance> =
        snap.observed.instances.iter().collect();
    let mut configs: BTreeMap<(usize, usize), ItemConfig> = BTreeMap::new();
    for (wi, w) in wanted.iter().enumerate() {
        let Some(p) = stored.get(&w.ident).copied() else {
            continue;
        };
        let Some(&i) = node_idx.get(p.node_id.as_str()) else {
            continue; // its node is gone, lost or paused: re-place
        };
        let Some(m) = w
            .image
            .manifests
            .iter()
            .find(|m| m.digest == p.manifest_digest)
        else {
            continue;
        };
        if p.version != w.item.version {
            continue;
        }
        let mi = w
            .image
            .manifests
            .iter()
            .position(|x| x.digest == m.digest)
            .unwrap_or(0);
        let cfg = configs
            .entry((w.req_idx, mi))
            .or_insert_with(|| item_config(m));
        let req = InstanceRequest {
            item_type: w.item.item_type,
            labels: &w.req.labels,
            pinned: Some((p.node_id.as_str(), p.runtime_id.as_str())),
        };
        // Still valid where it is? The same chain, over its own node only.
        let here = std::slice::from_ref(&nodes[i]);
        let fits = placement::static_candidates(&req, m, cfg, here)
            .and_then(|c| placement::choose_from(w.item.item_type, cfg, here, &c))
            .is_ok();
        if fits {
            nodes[i].charge(&p.runtime_id, &p.requested, &cfg.resources);
            placed[wi] = Some(Cow::Borrowed(p));
        }
    }

    // 3. Place the rest.
    type Statics = (
        ItemConfig,
        Result<Vec<(usize, usize)>, placement::Rejection>,
    );
    let mut statics: BTreeMap<(usize, usize), Statics> = BTreeMap::new();
    let mut used_uids: BTreeSet<u32> = allocs.instances.values().map(|p| p.uid).collect();
    let (uid_first, uid_end) = (snap.settings.uid_first, snap.settings.uid_end);
    let mut uid_cursor = uid_first;
    let mut gids: BTreeMap<ItemId, u32> = allocs.gids.clone();
    for (wi, w) in wanted.iter().enumerate() {
        if placed[wi].is_some() {
            continue;
        }
        let old = stored.get(&w.ident).copied();
        // Balancing disabled: an instance stays on its node and runtime (it fails there rather
        // than moving) as long as that node is available; a node that is lost, paused or gone
        // no longer holds it, and it is placed anew.
        let pinned = old
            .filter(|p| node_idx.contains_key(&p.node_id))
            .and_then(|p| {
                let disabled = w.item.item_type == ItemType::Component
                    || w.image
                        .manifests
                        .iter()
                        .any(|m| item_config(m).balancing_policy == BalancingPolicy::Disabled);
                disabled.then_some((p.node_id.as_str(), p.runtime_id.as_str()))
            });
        let req = InstanceRequest {
            item_type: w.item.item_type,
            labels: &w.req.labels,
            pinned,
        };
        let mut worst: Option<placement::Rejection> = None;
        let mut chosen = None;
        for (mi, m) in w.image.manifests.iter().enumerate() {
            // Static filters and the item config are the same for every instance of a
            // request: computed once per (request, manifest) unless the instance is pinned.
            let attempt = if req.pinned.is_some() {
                let cfg = item_config(m);
                placement::choose(&req, m, &cfg, &nodes).map(|c| (c, cfg))
            } else {
                let (cfg, statics) = statics.entry((w.req_idx, mi)).or_insert_with(|| {
                    let cfg = item_config(m);
                    let st = placement::static_candidates(&req, m, &cfg, &nodes);
                    (cfg, st)
                });
                match statics {
                    Ok(c) => placement::choose_from(w.item.item_type, cfg, &nodes, c)
                        .map(|ch| (ch, cfg.clone())),
                    Err(r) => Err(r.clone()),
                }
            };
            match attempt {
                Ok((c, cfg)) => {
                    chosen = Some((c, m, cfg));
                    break;
                }
                Err(r) => {
                    if worst.as_ref().is_none_or(|w| r.stage > w.stage) {
                        worst = Some(r);
                    }
                }
            }
        }
        let Some((choice, manifest, cfg)) = chosen else {
            let r = worst.unwrap_or(placement::Rejection {
                stage: 0,
                reason: "NoManifest",
                message: "the item image has no manifest".to_string(),
            });
            plan.condition(format!("instance {}", w.ident), r.reason, r.message);
            continue;
        };
        let is_component = w.item.item_type == ItemType::Component;
        let uid = match old {
            Some(p) => p.uid,
            None if is_component => 0,
            None => {
                // The lowest free UID only grows within a plan, so a cursor finds it.
                while uid_cursor < uid_end && used_uids.contains(&uid_cursor) {
                    uid_cursor += 1;
                }
                if uid_cursor >= uid_end {
                    plan.condition(
                        format!("instance {}", w.ident),
                        "NoUid",
                        format!("the UID pool [{uid_first}, {uid_end}) is exhausted"),
                    );
                    continue;
                }
                used_uids.insert(uid_cursor);
                uid_cursor
            }
        };
        let gid = if is_component {
            0
        } else if let Some(g) = gids.get(&w.item.id) {
            *g
        } else {
            let used: BTreeSet<u32> = gids.values().copied().collect();
            match (GID_FIRST..GID_END).find(|g| !used.contains(g)) {
                Some(g) => {
                    gids.insert(w.item.id.clone(), g);
                    g
                }
                None => {
                    plan.condition(
                        format!("instance {}", w.ident),
                        "NoGid",
                        "the GID pool [5000, 10000) is exhausted",
                    );
                    continue;
                }
            }
        };
        let node = &mut nodes[choice.node_idx];
        node.charge(
            &choice.runtime.runtime_id,
            &choice.reservation,
            &cfg.resources,
        );
        placed[wi] = Some(Cow::Owned(InstancePlacement {
            ident: w.ident.clone(),
            node_id: node.node_id.clone(),
            runtime_id: choice.runtime.runtime_id.clone(),
            runtime_type: choice.runtime.runtime_type.clone(),
            manifest_digest: manifest.digest.clone(),
            version: w.item.version.clone(),
            uid,
            gid,
            requested: choice.reservation,
            env: desired.env_for(&w.ident, now),
        }));
    }
    let placed_of = |ident: &InstanceIdent| -> Option<&InstancePlacement> {
        position.get(ident).and_then(|&i| placed[i].as_deref())
    };

    let firmware = firmware_requests(desired);

    // 4. Stops: reported instances that run where they should not.
    for (ident, rep) in &snap.observed.instances {
        if rep.preinstalled || rep.state == InstanceState::Inactive {
            continue;
        }
        if untouched.contains(ident) || firmware.contains(&(&ident.item_id, &ident.subject_id)) {
            continue;
        }
        let keep = placed_of(ident).is_some_and(|p| {
            p.node_id == rep.node_id && p.runtime_id == rep.runtime_id && p.version == rep.version
        });
        let connected = snap
            .observed
            .nodes
            .get(&rep.node_id)
            .is_some_and(|n| n.is_connected());
        if !keep && connected {
            let reason = match placed_of(ident) {
                None if position.contains_key(ident) => {
                    "desired, but cannot be placed (see its condition)".to_string()
                }
                None => "no longer desired".to_string(),
                Some(p) if p.version != rep.version => {
                    format!("version {} replaced by {}", rep.version, p.version)
                }
                Some(p) => format!("moved to {}", p.node_id),
            };
            plan.actions.push(Action::StopInstance {
                ident: ident.clone(),
                node_id: rep.node_id.clone(),
                runtime_id: rep.runtime_id.clone(),
                reason,
            });
        }
    }

    // 5. Starts, in priority order: new or changed placements, and placements the node does
    //    not report running.
    for (w, p) in wanted.iter().zip(&placed) {
        let Some(p) = p else {
            continue;
        };
        let reported = reported_by.get(&w.ident).copied();
        let running_here = reported.is_some_and(|r| {
            r.node_id == p.node_id
                && r.runtime_id == p.runtime_id
                && r.version == p.version
                && r.state != InstanceState::Inactive
        });
        if let Some(r) = reported.filter(|_| running_here)
            && r.state == InstanceState::Failed
        {
            plan.condition(
                format!("instance {}", w.ident),
                "InstanceFailed",
                r.error
                    .clone()
                    .unwrap_or_else(|| "the node reports the instance failed".into()),
            );
        }
        let changed = match p {
            Cow::Borrowed(_) => false, // kept as stored
            Cow::Owned(new) => stored.get(&w.ident).copied() != Some(new),
        };
        // A service whose owner changed moves to another network: the node sets networking
        // up at start, so the running instance is restarted to take its new address.
        let network_moved = w.item.item_type == ItemType::Service
            && running_here
            && allocs
                .instance_ips
                .get(&w.ident)
                .is_some_and(|a| a.network_id != w.item.owner_id);
        if network_moved && let Some(r) = reported {
            plan.actions.push(Action::StopInstance {
                ident: w.ident.clone(),
                node_id: r.node_id.clone(),
                runtime_id: r.runtime_id.clone(),
                reason: format!("network changed to {}", w.item.owner_id),
            });
        }
        // The cloud's env var overrides changed (or expired): restart in place with the new set
        // (errata 6: no rebalancing).
        let env = desired.env_for(&w.ident, now);
        let env_changed = p.env != env;
        if env_changed
            && running_here
            && !network_moved
            && let Some(r) = reported
        {
            plan.actions.push(Action::StopInstance {
                ident: w.ident.clone(),
                node_id: r.node_id.clone(),
                runtime_id: r.runtime_id.clone(),
                reason: "env vars changed".to_string(),
            });
        }
        if changed || !running_here || network_moved || env_changed {
            let mut placement = p.as_ref().clone();
            placement.env = env;
            let manifest = w
                .image
                .manifests
                .iter()
                .find(|m| m.digest == p.manifest_digest);
            let cfg = manifest.map(item_config).unwrap_or_default();
            let quotas = cfg.quotas;
            plan.actions
                .push(Action::StartInstance(Box::new(InstanceStart {
                    placement,
                    item_type: w.item.item_type,
                    owner_id: w.item.owner_id.clone(),
                    priority: w.req.priority,
                    storage_quota: quotas.storage_limit.unwrap_or(0),
                    state_quota: quotas.state_limit.unwrap_or(0),
                    alert_rules: cfg.alert_rules.clone(),
                })));
        }
    }

    // 6. Releases: placements of instances that are no longer desired and no longer run.
    for ident in allocs.instances.keys() {
        if placed_of(ident).is_some() || untouched.contains(ident) {
            continue;
        }
        if firmware.contains(&(&ident.item_id, &ident.subject_id)) {
            continue;
        }
        let still_desired = position.contains_key(ident);
        let running = reported_by
            .get(ident)
            .is_some_and(|r| r.state != InstanceState::Inactive);
        if !still_desired && !running {
            plan.actions.push(Action::ReleaseInstance {
                ident: ident.clone(),
            });
        }
    }
    plan
}

/// (item, subject) pairs whose instances the firmware reconciler generates and handles:
/// components requested with `numInstances: 0`.
pub fn firmware_requests(desired: &DesiredState) -> BTreeSet<(&String, &String)> {
    desired
        .instances
        .iter()
        .filter(|r| {
            r.num_instances == 0
                && desired
                    .item(&r.item_id)
                    .is_some_and(|i| i.item_type == ItemType::Component)
        })
        .map(|r| (&r.item_id, &r.subject_id))
        .collect()
}
