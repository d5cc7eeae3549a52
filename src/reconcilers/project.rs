//! Projection: the snapshot as it would be once an action has been carried out. The dry run
//! chains the reconcilers through it (so that the network plan sees the placements the
//! instances plan proposes), and tests use it to check that a plan converges.

use crate::model::*;
use core::net::Ipv4Addr;
use std::collections::BTreeSet;

/// Applies the effect an action has on the stored state (allocations, catalogue, unit config
/// status, node states). What only a node can report (instances running) is not invented.
pub fn apply(snap: &mut Snapshot, action: &Action, now: UnixMillis) {
    let a = &mut snap.allocations;
    let o = &mut snap.observed;
    match action {
        Action::DownloadBlob { digest, .. } => {
            o.blobs.insert(digest.clone());
        }
        Action::DeleteBlob { digest } => {
            o.blobs.remove(digest);
        }
        Action::InstallItem {
            item_id,
            item_type,
            version,
            index_digest,
        } => {
            o.items.insert(
                (item_id.clone(), version.clone()),
                StoredItem {
                    id: item_id.clone(),
                    item_type: *item_type,
                    version: version.clone(),
                    index_digest: index_digest.clone(),
                    state: ItemState::Installed,
                    removed_at: None,
                },
            );
        }
        Action::RemoveItem { item_id, version } => {
            if let Some(i) = o.items.get_mut(&(item_id.clone(), version.clone())) {
                i.state = ItemState::Removed;
                i.removed_at = Some(now);
            }
        }
        Action::DeleteItem { item_id, version } => {
            o.items.remove(&(item_id.clone(), version.clone()));
        }
        Action::StartInstance(s) => {
            let p = &s.placement;
            if p.gid != 0 {
                a.gids.entry(p.ident.item_id.clone()).or_insert(p.gid);
            }
            a.instances.insert(p.ident.clone(), p.clone());
        }
        Action::StopInstance { .. } => {}
        Action::ReleaseInstance { ident } => {
            a.instances.remove(ident);
            if !a.instances.keys().any(|k| k.item_id == ident.item_id) {
                a.gids.remove(&ident.item_id);
            }
        }
        // The NetworkService may create another network between a plan and its execution
        // (an SM asked for it first): a planned subnet or VLAN taken meanwhile is replaced by a
        // free one, so that no two networks share either.
        Action::AllocateNetwork {
            network_id,
            subnet,
            vlan_id,
        } => {
            if !a.networks.contains_key(network_id) {
                let subnets: BTreeSet<Ipv4Net> = a.networks.values().map(|n| n.subnet).collect();
                let vlans: BTreeSet<u16> = a.networks.values().map(|n| n.vlan_id).collect();
                let subnet = if subnets.iter().any(|u| u.overlaps(subnet)) {
                    super::network::free_subnet(&subnets, &o.host_routes)
                } else {
                    Some(*subnet)
                };
                let vlan_id = if vlans.contains(vlan_id) {
                    super::network::free_vlan(&vlans)
                } else {
                    Some(*vlan_id)
                };
                if let (Some(subnet), Some(vlan_id)) = (subnet, vlan_id) {
                    a.networks.insert(
                        network_id.clone(),
                        NetworkAllocation {
                            subnet,
                            vlan_id,
                            hosts: Default::default(),
                            sm_hosts: Default::default(),
                        },
                    );
                }
            }
        }
        // Addresses may also be handed out by the NetworkService between a plan and its
        // execution: an existing address is kept, and a planned one taken meanwhile is replaced
        // by the lowest free one, so that no address is ever given twice.
        Action::AttachHost {
            network_id,
            node_id,
            ip,
        } => {
            if a.networks
                .get(network_id)
                .is_some_and(|n| !n.hosts.contains_key(node_id))
            {
                let ip = untaken(a, network_id, *ip);
                if let (Some(ip), Some(n)) = (ip, a.networks.get_mut(network_id)) {
                    n.hosts.insert(node_id.clone(), ip);
                }
            }
        }
        Action::AssignInstanceIp {
            ident,
            network_id,
            node_id,
            ip,
            ..
        } => {
            let kept = a
                .instance_ips
                .get(ident)
                .filter(|x| x.network_id == *network_id)
                .map(|x| x.ip);
            let ip = match kept {
                Some(ip) => Some(ip),
                None => untaken(a, network_id, *ip),
            };
            if let Some(ip) = ip {
                a.instance_ips.insert(
                    ident.clone(),
                    InstanceAddress {
                        network_id: network_id.clone(),
                        node_id: node_id.clone(),
                        ip,
                    },
                );
            }
        }
        Action::SetFirewallRules { ident, rules } => {
            if rules.is_empty() {
                a.firewall.remove(ident);
            } else {
                a.firewall.insert(ident.clone(), rules.clone());
            }
        }
        Action::ReleaseInstanceIp { ident } => {
            a.instance_ips.remove(ident);
            a.firewall.remove(ident);
        }
        Action::DetachHost {
            network_id,
            node_id,
        } => {
            if let Some(n) = a.networks.get_mut(network_id) {
                n.hosts.remove(node_id);
            }
        }
        Action::ReleaseNetwork { network_id } => {
            a.networks.remove(network_id);
            a.instance_ips.retain(|_, v| v.network_id != *network_id);
        }
        Action::InstallUnitConfig { .. } => {
            if let Some(uc) = snap.desired.as_ref().and_then(|d| d.unit_config.clone()) {
                o.unit_config = UnitConfigStatus {
                    state: UnitConfigState::Installed,
                    version: Some(uc.version.clone()),
                    error: None,
                    config: Some(uc),
                };
            }
        }
        Action::PushNodeConfig { node_id, version } => {
            if let Some(n) = o.nodes.get_mut(node_id) {
                n.node_config = Some(NodeConfigStatus {
                    version: version.clone(),
                    error: None,
                });
            }
        }
        Action::SetNodeState { node_id, state } => {
            if let Some(n) = o.nodes.get_mut(node_id) {
                n.info.state = match state {
                    DesiredNodeState::Paused => NodeState::Paused,
                    DesiredNodeState::Provisioned => NodeState::Provisioned,
                };
            }
        }
    }
}

/// `wanted` if nothing in the network uses it, else the lowest free address.
fn untaken(a: &Allocations, network_id: &str, wanted: Ipv4Addr) -> Option<Ipv4Addr> {
    let net = a.networks.get(network_id)?;
    let in_use = |ip: Ipv4Addr| {
        net.hosts.values().any(|h| *h == ip)
            || a.instance_ips
                .values()
                .any(|x| x.ip == ip && x.network_id == network_id)
    };
    if net.subnet.contains(wanted) && !in_use(wanted) {
        return Some(wanted);
    }
    let mut used: BTreeSet<Ipv4Addr> = net.hosts.values().copied().collect();
    used.extend(
        a.instance_ips
            .values()
            .filter(|x| x.network_id == network_id)
            .map(|x| x.ip),
    );
    if !used.contains(&wanted) && net.subnet.contains(wanted) {
        return Some(wanted);
    }
    super::network::free_ip(&net.subnet, &used)
}

/// Applies an action as a well-behaved unit would: like `apply`, and a started instance is
/// reported active, a stopped one disappears. Used to check that plans converge.
pub fn apply_as_unit(snap: &mut Snapshot, action: &Action, now: UnixMillis) {
    apply(snap, action, now);
    match action {
        Action::StartInstance(s) => {
            let p = &s.placement;
            snap.observed.instances.insert(
                p.ident.clone(),
                ReportedInstance {
                    ident: p.ident.clone(),
                    node_id: p.node_id.clone(),
                    runtime_id: p.runtime_id.clone(),
                    version: p.version.clone(),
                    state: InstanceState::Active,
                    error: None,
                    preinstalled: false,
                },
            );
        }
        Action::StopInstance { ident, node_id, .. }
            if snap
                .observed
                .instances
                .get(ident)
                .is_some_and(|r| r.node_id == *node_id) =>
        {
            snap.observed.instances.remove(ident);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocate(id: &str, second_octet: u8, vlan_id: u16) -> Action {
        Action::AllocateNetwork {
            network_id: id.to_owned(),
            subnet: Ipv4Net::new(std::net::Ipv4Addr::new(172, second_octet, 0, 0), 16),
            vlan_id,
        }
    }

    #[test]
    fn a_network_planned_on_a_subnet_taken_meanwhile_gets_a_free_one() {
        let mut snap = Snapshot::default();
        // The NetworkService created "b" on the subnet and VLAN the plan gave "a".
        apply(&mut snap, &allocate("b", 17, 1), 0);
        apply(&mut snap, &allocate("a", 17, 1), 0);
        let (a, b) = (
            snap.allocations.networks["a"].clone(),
            snap.allocations.networks["b"].clone(),
        );
        assert_ne!(a.subnet, b.subnet);
        assert!(!a.subnet.overlaps(&b.subnet));
        assert_ne!(a.vlan_id, b.vlan_id);
        // An existing network is left as it is.
        apply(&mut snap, &allocate("a", 30, 9), 0);
        assert_eq!(snap.allocations.networks["a"].subnet, a.subnet);
    }
}
