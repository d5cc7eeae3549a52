//! Allocations: the decisions that must stay stable across restarts (placement, UID, GID,
//! subnets, host and instance IPs, VLAN IDs). Reconcilers read them and propose new ones; the
//! executor commits a proposal to the store before it is announced to anyone.

use super::ids::*;
use core::net::Ipv4Addr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// First UID handed to an instance; the pool is `[UID_FIRST, UID_END)`.
pub const UID_FIRST: u32 = 5000;
pub const UID_END: u32 = 10000;
/// GIDs (one per item) come from the same range.
pub const GID_FIRST: u32 = 5000;
pub const GID_END: u32 = 10000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Allocations {
    pub instances: BTreeMap<InstanceIdent, InstancePlacement>,
    pub gids: BTreeMap<ItemId, u32>,
    pub networks: BTreeMap<NetworkId, NetworkAllocation>,
    pub instance_ips: BTreeMap<InstanceIdent, InstanceAddress>,
    /// Firewall rules last computed for each instance from its allowed connections.
    pub firewall: BTreeMap<InstanceIdent, Vec<FirewallRule>>,
}

/// A firewall rule that lets `src_ip` reach `dst_ip:dst_port/proto`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FirewallRule {
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub dst_port: String,
    pub proto: String,
}

/// Where an instance runs and with which identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePlacement {
    pub ident: InstanceIdent,
    pub node_id: NodeId,
    pub runtime_id: RuntimeId,
    pub runtime_type: String,
    pub manifest_digest: Digest,
    pub version: String,
    pub uid: u32,
    pub gid: u32,
    pub requested: Reservation,
    /// Env vars the instance was started with (the cloud's overrides).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
}

/// What an instance is charged against its node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub cpu_dmips: u64,
    pub ram: u64,
    pub storage: u64,
    pub state: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAllocation {
    pub subnet: Ipv4Net,
    pub vlan_id: u16,
    /// Each node attached to the network gets one address in it.
    pub hosts: BTreeMap<NodeId, Ipv4Addr>,
    /// Hosts a node's SM asked for (GetNodeNetworkParams): the SM releases them
    /// (ReleaseNodeNetwork), not the network reconciler.
    #[serde(default)]
    pub sm_hosts: std::collections::BTreeSet<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAddress {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    pub ip: Ipv4Addr,
}

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
        let prefix = prefix.min(32);
        Ipv4Net {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask_of(prefix)),
            prefix,
        }
    }

    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    pub fn parse(s: &str) -> Result<Ipv4Net, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR form a.b.c.d/n"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{p:?} is not a prefix length 0..32"))?;
        Ok(Ipv4Net::new(addr, prefix))
    }

    pub fn first(&self) -> u32 {
        u32::from(self.addr)
    }

    pub fn last(&self) -> u32 {
        self.first() | !Self::mask_of(self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) & Self::mask_of(self.prefix)) == self.first()
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
