//! `aos-cm status`: what a daemon's store says about the unit, for a person or (with --json) a
//! script: nodes, items, instances, allocations, update progress and open conditions.

use crate::model::*;
use crate::store::{Store, StoreError};
use std::fmt::Write;
use std::path::Path;

/// Reads the store at `path` (a working directory holding cm.redb, or the file).
pub fn load(path: &Path) -> Result<(Snapshot, Vec<Condition>, Option<String>), StatusError> {
    let file = if path.is_dir() {
        path.join("cm.redb")
    } else {
        path.to_path_buf()
    };
    if !file.exists() {
        return Err(StatusError::NoStore(file.display().to_string()));
    }
    let store = Store::open(&file)?;
    let snap = store.snapshot()?;
    let conditions: Vec<Condition> = store.conditions()?.into_values().collect();
    let progress = store.update_progress()?.map(|p| p.state);
    Ok((snap, conditions, progress))
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0}: no store there")]
    NoStore(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn connection(n: &ObservedNode) -> String {
    match &n.connection {
        Connection::Connected => "connected".into(),
        Connection::Disconnected { .. } => "disconnected".into(),
        Connection::Lost { .. } => "lost (error)".into(),
    }
}

/// The status as text.
pub fn text(snap: &Snapshot, conditions: &[Condition], progress: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "update: {}", progress.unwrap_or("none"));
    let uc = &snap.observed.unit_config;
    let _ = writeln!(
        out,
        "unit config: {} {}",
        uc.state,
        uc.version
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_default()
    );
    let _ = writeln!(out, "nodes ({}):", snap.observed.nodes.len());
    for (id, n) in &snap.observed.nodes {
        let running = snap
            .observed
            .instances
            .values()
            .filter(|r| r.node_id == *id && r.state == InstanceState::Active)
            .count();
        let _ = writeln!(
            out,
            "  {id} ({}) {}, {}, node config {}, {running} active instance(s)",
            n.info.node_type,
            n.info.state,
            connection(n),
            n.node_config
                .as_ref()
                .map(|c| c.version.as_str())
                .unwrap_or("-")
        );
    }
    let _ = writeln!(out, "items ({}):", snap.observed.items.len());
    for i in snap.observed.items.values() {
        let _ = writeln!(out, "  {} {} {} {}", i.item_type, i.id, i.version, i.state);
    }
    let _ = writeln!(out, "instances ({}):", snap.allocations.instances.len());
    for (ident, p) in &snap.allocations.instances {
        let state = snap
            .observed
            .instances
            .get(ident)
            .map(|r| r.state.as_str())
            .unwrap_or("not reported");
        let ip = snap
            .allocations
            .instance_ips
            .get(ident)
            .map(|a| a.ip.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "  {ident} v{} on {}/{} uid {} ip {ip}: {state}",
            p.version, p.node_id, p.runtime_type, p.uid
        );
    }
    let _ = writeln!(out, "networks ({}):", snap.allocations.networks.len());
    for (id, n) in &snap.allocations.networks {
        let _ = writeln!(
            out,
            "  {id}: {} vlan {}, {} host(s)",
            n.subnet,
            n.vlan_id,
            n.hosts.len()
        );
    }
    let _ = writeln!(out, "conditions ({}):", conditions.len());
    for c in conditions {
        let _ = writeln!(out, "  {c}");
    }
    out
}

/// The status as JSON.
pub fn json(
    snap: &Snapshot,
    conditions: &[Condition],
    progress: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "update": progress,
        "unitConfig": snap.observed.unit_config,
        "nodes": snap.observed.nodes,
        "items": snap.observed.items.values().collect::<Vec<_>>(),
        "placements": snap.allocations.instances.values().collect::<Vec<_>>(),
        "reportedInstances": snap.observed.instances.values().collect::<Vec<_>>(),
        "networks": snap.allocations.networks,
        "instanceAddresses": snap.allocations.instance_ips.iter().map(|(k, v)| serde_json::json!({"instance": k, "address": v})).collect::<Vec<_>>(),
        "conditions": conditions,
    })
}
