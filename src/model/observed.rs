//! What the CM knows about the unit as it is: nodes (from IAM and their SMs), instances the SMs
//! report, the installed unit config, installed items and blobs, unit subjects and host routes.

use super::Ipv4Net;
use super::desired::UnitConfig;
use super::ids::*;
use super::version::Version;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObservedUnit {
    pub nodes: BTreeMap<NodeId, ObservedNode>,
    /// Instances as the SMs last reported them, by identity.
    pub instances: BTreeMap<InstanceIdent, ReportedInstance>,
    pub unit_config: UnitConfigStatus,
    /// Items the unit holds, by item ID and version.
    pub items: BTreeMap<(ItemId, String), StoredItem>,
    /// Blobs present in the content-addressed store.
    pub blobs: BTreeSet<Digest>,
    /// Subjects IAM reports as unit subjects.
    pub unit_subjects: BTreeSet<SubjectId>,
    /// IPv4 routes of the host; subnets that collide with them are not handed out.
    pub host_routes: Vec<Ipv4Net>,
    /// What each instance's SM sent in AllocateInstanceNetwork: host names, exposed ports and
    /// allowed connections. The newest request wins over the item's image.
    #[serde(default)]
    pub network_params: BTreeMap<InstanceIdent, InstanceNetworkParams>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceNetworkParams {
    pub hosts: Vec<String>,
    pub exposed_ports: Vec<String>,
    pub allowed_connections: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedNode {
    pub info: NodeInfo,
    /// What the node's SM sent on registration; `None` until it has connected once.
    pub sm: Option<SmInfo>,
    pub node_config: Option<NodeConfigStatus>,
    pub connection: Connection,
    /// Last measured usage (from average monitoring), used when balancing.
    pub usage: Option<NodeUsage>,
}

impl ObservedNode {
    pub fn is_connected(&self) -> bool {
        matches!(self.connection, Connection::Connected)
    }

    /// A node that placement may use: provisioned by IAM, its SM known and not in error.
    pub fn is_schedulable(&self) -> bool {
        self.info.state == NodeState::Provisioned
            && self.sm.is_some()
            && !matches!(self.connection, Connection::Lost { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connection {
    Connected,
    /// The SM stream dropped; the node is waited for until `smConnectionTimeout`.
    Disconnected {
        since: UnixMillis,
    },
    /// The SM stayed away past `smConnectionTimeout`: the node is in error and not scheduled on.
    Lost {
        since: UnixMillis,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUsage {
    pub cpu_dmips: u64,
    pub ram: u64,
}

/// IAM's view of a node (`iamanager.v6.NodeInfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub node_type: String,
    pub title: String,
    pub max_dmips: u64,
    pub total_ram: u64,
    pub physical_ram: u64,
    pub os_info: OsInfo,
    pub cpus: Vec<CpuInfo>,
    pub partitions: Vec<PartitionInfo>,
    pub attrs: BTreeMap<String, String>,
    pub state: NodeState,
    pub error: Option<String>,
}

impl NodeInfo {
    /// Total size of the partitions of one type (`storages`, `states`), `None` when the node
    /// reports no such partition.
    pub fn partition_capacity(&self, kind: &str) -> Option<u64> {
        let sizes: Vec<u64> = self
            .partitions
            .iter()
            .filter(|p| p.types.iter().any(|t| t == kind))
            .map(|p| p.total_size)
            .collect();
        (!sizes.is_empty()).then(|| sizes.iter().sum())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInfo {
    pub os: String,
    pub version: Option<String>,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchInfo {
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub model_name: String,
    pub num_cores: u64,
    pub num_threads: u64,
    pub arch_info: ArchInfo,
    pub max_dmips: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub name: String,
    pub types: Vec<String>,
    pub total_size: u64,
    pub path: String,
}

/// What a node's SM reports on registration (`servicemanager.v5.SMInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmInfo {
    pub runtimes: Vec<RuntimeInfo>,
    pub resources: Vec<ResourceInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub runtime_id: RuntimeId,
    pub runtime_type: String,
    pub arch_info: ArchInfo,
    pub os_info: OsInfo,
    pub max_dmips: u64,
    pub allowed_dmips: u64,
    pub total_ram: u64,
    pub allowed_ram: u64,
    /// 0 means the default of 256.
    pub max_instances: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceInfo {
    pub name: String,
    /// How many instances may use the resource at once; 0 = unlimited.
    pub shared_count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfigStatus {
    pub version: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedInstance {
    pub ident: InstanceIdent,
    pub node_id: NodeId,
    pub runtime_id: RuntimeId,
    pub version: String,
    pub state: InstanceState,
    pub error: Option<String>,
    /// Factory-installed component (boot/rootfs image) the SM reports on its own.
    pub preinstalled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitConfigStatus {
    pub state: UnitConfigState,
    pub version: Option<Version>,
    pub error: Option<String>,
    /// The installed unit config itself (state `installed`).
    pub config: Option<UnitConfig>,
}

impl Default for UnitConfigStatus {
    fn default() -> Self {
        UnitConfigStatus {
            state: UnitConfigState::Absent,
            version: None,
            error: None,
            config: None,
        }
    }
}

/// An item the unit holds in its catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredItem {
    pub id: ItemId,
    pub item_type: ItemType,
    pub version: String,
    pub index_digest: Digest,
    pub state: ItemState,
    /// When the item was removed (state `removed`), for the TTL.
    pub removed_at: Option<UnixMillis>,
}
