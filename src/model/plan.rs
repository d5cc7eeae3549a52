//! What the reconcilers produce: a `Plan` of `Action`s that would converge the unit, and the
//! `Condition`s that say why something cannot converge (yet).

use super::alloc::{FirewallRule, InstancePlacement, Ipv4Net};
use super::desired::AlertRules;
use super::ids::*;
use core::net::Ipv4Addr;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcilerKind {
    Images,
    Instances,
    Network,
    #[serde(rename = "unitconfig")]
    UnitConfig,
    Firmware,
}

impl ReconcilerKind {
    pub const ALL: [ReconcilerKind; 5] = [
        ReconcilerKind::Images,
        ReconcilerKind::Instances,
        ReconcilerKind::Network,
        ReconcilerKind::UnitConfig,
        ReconcilerKind::Firmware,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReconcilerKind::Images => "images",
            ReconcilerKind::Instances => "instances",
            ReconcilerKind::Network => "network",
            ReconcilerKind::UnitConfig => "unitconfig",
            ReconcilerKind::Firmware => "firmware",
        }
    }
}

impl fmt::Display for ReconcilerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything an SM needs to start one instance, beyond its placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStart {
    pub placement: InstancePlacement,
    pub item_type: ItemType,
    pub owner_id: String,
    pub priority: u64,
    pub storage_quota: u64,
    pub state_quota: u64,
    pub alert_rules: Option<AlertRules>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Action {
    /// Fetch one blob (requestBlobUrls, download, verify) into the blob store.
    DownloadBlob {
        digest: Digest,
        for_items: Vec<String>,
    },
    /// Every blob of the item is present: mark the item installed.
    InstallItem {
        item_id: ItemId,
        item_type: ItemType,
        version: String,
        index_digest: Digest,
    },
    /// The item is no longer desired (or replaced by another version): keep it for the TTL.
    RemoveItem {
        item_id: ItemId,
        version: String,
    },
    /// A removed item outlived `updateItemTtl`: drop it from the catalogue.
    DeleteItem {
        item_id: ItemId,
        version: String,
    },
    /// No item refers to this blob any more.
    DeleteBlob {
        digest: Digest,
    },
    /// Record the placement and start the instance on its node.
    StartInstance(Box<InstanceStart>),
    StopInstance {
        ident: InstanceIdent,
        node_id: NodeId,
        runtime_id: RuntimeId,
        reason: String,
    },
    /// The instance is neither desired nor running: free its placement and UID.
    ReleaseInstance {
        ident: InstanceIdent,
    },
    AllocateNetwork {
        network_id: NetworkId,
        subnet: Ipv4Net,
        vlan_id: u16,
    },
    AttachHost {
        network_id: NetworkId,
        node_id: NodeId,
        ip: Ipv4Addr,
    },
    AssignInstanceIp {
        ident: InstanceIdent,
        network_id: NetworkId,
        node_id: NodeId,
        ip: Ipv4Addr,
        dns_names: Vec<String>,
    },
    SetFirewallRules {
        ident: InstanceIdent,
        rules: Vec<FirewallRule>,
    },
    ReleaseInstanceIp {
        ident: InstanceIdent,
    },
    DetachHost {
        network_id: NetworkId,
        node_id: NodeId,
    },
    ReleaseNetwork {
        network_id: NetworkId,
    },
    /// Accept the desired unit config as the installed one.
    InstallUnitConfig {
        version: String,
    },
    PushNodeConfig {
        node_id: NodeId,
        version: String,
    },
    SetNodeState {
        node_id: NodeId,
        state: DesiredNodeState,
    },
}

impl Action {
    /// Actions with the same key never run at once and share one backoff.
    pub fn key(&self) -> String {
        match self {
            Action::DownloadBlob { digest, .. } | Action::DeleteBlob { digest } => {
                format!("blob/{digest}")
            }
            // Item states change together, in one transaction per plan.
            Action::InstallItem { .. } | Action::RemoveItem { .. } | Action::DeleteItem { .. } => {
                "items".to_string()
            }
            // Starts and stops of one node go out together, in one UpdateInstances.
            Action::StartInstance(s) => format!("node/{}", s.placement.node_id),
            Action::StopInstance { node_id, .. } => format!("node/{node_id}"),
            Action::ReleaseInstance { ident } => format!("instance/{ident}"),
            // One network's allocations go together, in plan order, in one transaction.
            Action::AllocateNetwork { network_id, .. }
            | Action::ReleaseNetwork { network_id }
            | Action::AttachHost { network_id, .. }
            | Action::DetachHost { network_id, .. }
            | Action::AssignInstanceIp { network_id, .. } => format!("network/{network_id}"),
            Action::ReleaseInstanceIp { ident } => format!("ip/{ident}"),
            Action::SetFirewallRules { ident, .. } => format!("firewall/{ident}"),
            Action::InstallUnitConfig { .. } => "unitconfig".to_string(),
            Action::PushNodeConfig { node_id, .. } => format!("nodeconfig/{node_id}"),
            Action::SetNodeState { node_id, .. } => format!("nodestate/{node_id}"),
        }
    }
}

fn mib(bytes: u64) -> String {
    if bytes == 0 {
        "0".to_string()
    } else if bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else if bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::DownloadBlob { digest, for_items } => {
                write!(f, "download {digest} (for {})", for_items.join(", "))
            }
            Action::InstallItem {
                item_id,
                item_type,
                version,
                index_digest,
            } => write!(
                f,
                "install {item_type} {item_id} {version} (index {index_digest})"
            ),
            Action::RemoveItem { item_id, version } => write!(f, "remove item {item_id} {version}"),
            Action::DeleteItem { item_id, version } => write!(
                f,
                "delete item {item_id} {version} (removed longer than updateItemTtl)"
            ),
            Action::DeleteBlob { digest } => write!(f, "delete unused blob {digest}"),
            Action::StartInstance(s) => {
                let p = &s.placement;
                write!(
                    f,
                    "start {} {} on {}/{} ({}, manifest {}, uid {}, gid {}",
                    p.ident,
                    p.version,
                    p.node_id,
                    p.runtime_type,
                    s.item_type,
                    p.manifest_digest,
                    p.uid,
                    p.gid
                )?;
                if s.item_type == ItemType::Component {
                    return f.write_str(", pinned)");
                }
                write!(
                    f,
                    ", cpu {} DMIPS, ram {}, storage {}, state {})",
                    p.requested.cpu_dmips,
                    mib(p.requested.ram),
                    mib(p.requested.storage),
                    mib(p.requested.state)
                )
            }
            Action::StopInstance {
                ident,
                node_id,
                reason,
                ..
            } => write!(f, "stop {ident} on {node_id} ({reason})"),
            Action::ReleaseInstance { ident } => write!(f, "release {ident} (placement, uid)"),
            Action::AllocateNetwork {
                network_id,
                subnet,
                vlan_id,
            } => write!(
                f,
                "allocate network {network_id}: subnet {subnet}, vlan {vlan_id}"
            ),
            Action::AttachHost {
                network_id,
                node_id,
                ip,
            } => write!(f, "attach node {node_id} to network {network_id} as {ip}"),
            Action::AssignInstanceIp {
                ident,
                ip,
                dns_names,
                ..
            } => write!(f, "assign {ip} to {ident} (dns: {})", dns_names.join(" ")),
            Action::SetFirewallRules { ident, rules } => {
                let rules: Vec<String> = rules
                    .iter()
                    .map(|r| format!("{} -> {}:{}/{}", r.src_ip, r.dst_ip, r.dst_port, r.proto))
                    .collect();
                if rules.is_empty() {
                    write!(f, "clear firewall rules of {ident}")
                } else {
                    write!(f, "set firewall rules of {ident}: {}", rules.join(", "))
                }
            }
            Action::ReleaseInstanceIp { ident } => write!(f, "release address of {ident}"),
            Action::DetachHost {
                network_id,
                node_id,
            } => write!(f, "detach node {node_id} from network {network_id}"),
            Action::ReleaseNetwork { network_id } => {
                write!(f, "release network {network_id} (subnet, vlan)")
            }
            Action::InstallUnitConfig { version } => write!(f, "install unit config {version}"),
            Action::PushNodeConfig { node_id, version } => {
                write!(f, "push node config {version} to {node_id}")
            }
            Action::SetNodeState { node_id, state } => match state {
                DesiredNodeState::Paused => write!(f, "pause node {node_id}"),
                DesiredNodeState::Provisioned => write!(f, "resume node {node_id}"),
            },
        }
    }
}

/// Why something has not converged: attached to an object (`instance <ident>`, `node <id>`,
/// `item <id>`, `unitconfig`, ...).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Condition {
    pub object: String,
    pub reason: String,
    pub message: String,
    pub since: Option<UnixMillis>,
}

impl Condition {
    pub fn new(object: impl Into<String>, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            object: object.into(),
            reason: reason.to_string(),
            message: message.into(),
            since: None,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.reason, self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub reconciler: ReconcilerKind,
    pub actions: Vec<Action>,
    pub conditions: Vec<Condition>,
}

impl Plan {
    pub fn new(reconciler: ReconcilerKind) -> Plan {
        Plan {
            reconciler,
            actions: Vec::new(),
            conditions: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn condition(
        &mut self,
        object: impl Into<String>,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.conditions
            .push(Condition::new(object, reason, message));
    }
}
