//! The network reconciler: one /16 subnet and VLAN per network (the owner of the items in it),
//! one host address per (network, node), one address per service instance with its DNS names,
//! and firewall rules from allowed connections. Allocations are stable: what exists is never
//! moved; new ones take the lowest free value.

use crate::model::*;
use core::net::Ipv4Addr;
use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, BTreeSet};

/// The pool: /16 subnets from 172.17.0.0 to 172.31.255.255.
pub const POOL_FIRST: [u8; 2] = [172, 17];
pub const POOL_LAST: [u8; 2] = [172, 31];
pub const VLAN_MIN: u16 = 1;
pub const VLAN_MAX: u16 = 4094;

/// Candidate subnets in pool order.
pub fn pool() -> Vec<Ipv4Net> {
    (POOL_FIRST[1]..=POOL_LAST[1])
        .map(|b| Ipv4Net::new(Ipv4Addr::new(POOL_FIRST[0], b, 0, 0), 16))
        .collect()
}

/// The first free subnet that neither another network nor a host route uses. A default route
/// (prefix 0) collides with nothing.
pub fn free_subnet(used: &BTreeSet<Ipv4Net>, routes: &[Ipv4Net]) -> Option<Ipv4Net> {
    pool().into_iter().find(|s| {
        !used.iter().any(|u| u.overlaps(s))
            && !routes
                .iter()
                .filter(|r| r.prefix > 0)
                .any(|r| r.overlaps(s))
    })
}

pub fn free_vlan(used: &BTreeSet<u16>) -> Option<u16> {
    (VLAN_MIN..=VLAN_MAX).find(|v| !used.contains(v))
}

/// The lowest free address of a subnet; `.0.1` is never handed out (upstream starts at +2) and
/// the broadcast address is excluded.
pub fn free_ip(subnet: &Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = subnet.first().checked_add(2)?;
    let last = subnet.last().checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
}

/// DNS names of an instance: `<index>.<subject>.<item>` with and without the network suffix,
/// the index-0 short forms, and the item config hostname.
pub fn dns_names(ident: &InstanceIdent, network_id: &str, hostname: Option<&str>) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(h) = hostname.filter(|h| !h.is_empty()) {
        names.push(h.to_string());
    }
    let base = format!("{}.{}.{}", ident.instance, ident.subject_id, ident.item_id);
    names.push(format!("{base}.{network_id}"));
    names.push(base);
    if ident.instance == 0 {
        let short = format!("{}.{}", ident.subject_id, ident.item_id);
        names.push(format!("{short}.{network_id}"));
        names.push(short);
    }
    names
}

/// `itemID/port[/proto]` → (item, port, proto); tcp by default.
pub fn parse_connection(s: &str) -> Option<(&str, &str, &str)> {
    let mut parts = s.split('/');
    let item = parts.next().filter(|p| !p.is_empty())?;
    let port = parts.next().filter(|p| !p.is_empty())?;
    let proto = parts.next().unwrap_or("tcp");
    parts.next().is_none().then_some((item, port, proto))
}

/// Does an exposed-port entry (`port[/proto]`) serve `port/proto`?
pub fn exposes(exposed: &str, port: &str, proto: &str) -> bool {
    let (p, pr) = exposed.split_once('/').unwrap_or((exposed, "tcp"));
    p == port && pr.eq_ignore_ascii_case(proto)
}

fn manifest_of<'a>(
    snap: &'a Snapshot,
    items: &BTreeMap<&str, &'a DesiredItem>,
    p: &InstancePlacement,
) -> Option<&'a ManifestInfo> {
    let item = items.get(p.ident.item_id.as_str())?;
    let image = snap.catalogue.images.get(item.index_digest.as_ref()?)?;
    image
        .manifests
        .iter()
        .find(|m| m.digest == p.manifest_digest)
}

/// An instance's allowed connections: what its SM sent, else its item config.
pub fn allowed_connections(
    snap: &Snapshot,
    items: &BTreeMap<&str, &DesiredItem>,
    ident: &InstanceIdent,
    p: &InstancePlacement,
) -> Vec<String> {
    match snap.observed.network_params.get(ident) {
        Some(params) => params.allowed_connections.clone(),
        None => manifest_of(snap, items, p)
            .and_then(|m| m.item_config.as_ref())
            .map(|c| c.allowed_connections.clone())
            .unwrap_or_default(),
    }
}

/// An instance's exposed ports: what its SM sent, else its image config.
pub fn exposed_ports(
    snap: &Snapshot,
    items: &BTreeMap<&str, &DesiredItem>,
    ident: &InstanceIdent,
    p: &InstancePlacement,
) -> Vec<String> {
    match snap.observed.network_params.get(ident) {
        Some(params) => params.exposed_ports.clone(),
        None => manifest_of(snap, items, p)
            .map(|m| m.image.exposed_ports.clone())
            .unwrap_or_default(),
    }
}

pub fn plan(snap: &Snapshot, _now: UnixMillis) -> Plan {
    let mut plan = Plan::new(ReconcilerKind::Network);
    let Some(desired) = snap.desired.as_ref() else {
        return plan;
    };
    let allocs = &snap.allocations;
    let items: BTreeMap<&str, &DesiredItem> =
        desired.items.iter().map(|i| (i.id.as_str(), i)).collect();

    // Which service instances need an address, in which network, on which node.
    let mut members: BTreeMap<&InstanceIdent, (&str, &InstancePlacement)> = BTreeMap::new();
    for (ident, p) in &allocs.instances {
        match items.get(ident.item_id.as_str()) {
            Some(item) if item.item_type == ItemType::Service => {
                members.insert(ident, (item.owner_id.as_str(), p));
            }
            Some(_) => {}
            // No longer desired but still placed (being stopped): keep its address until the
            // placement is released, so that nothing else gets it while it may still run.
            None => {
                if let Some(addr) = allocs.instance_ips.get(ident) {
                    members.insert(ident, (addr.network_id.as_str(), p));
                }
            }
        }
    }
    let needed_hosts: BTreeSet<(&str, &str)> = members
        .values()
        .map(|(net, p)| (*net, p.node_id.as_str()))
        .collect();
    let needed_nets: BTreeSet<&str> = needed_hosts.iter().map(|(n, _)| *n).collect();

    // Working copy of the allocations, updated as the plan proposes new ones.
    let mut nets = allocs.networks.clone();
    // Addresses after this plan, by instance: the stored ones minus releases plus new ones.
    let mut ips: HashMap<&InstanceIdent, InstanceAddress> = HashMap::new();
    // Addresses taken per network, including those released by this plan: an address is
    // handed out again only by a later plan, once its release is committed.
    let mut used: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for a in allocs.instance_ips.values() {
        used.entry(a.network_id.clone()).or_default().insert(a.ip);
    }
    for (id, n) in &allocs.networks {
        used.entry(id.clone())
            .or_default()
            .extend(n.hosts.values().copied());
    }
    // The lowest free address only grows within a plan: one cursor per network.
    let mut cursors: BTreeMap<String, u32> = BTreeMap::new();
    let mut next_ip = |net_id: &str, subnet: &Ipv4Net| -> Option<Ipv4Addr> {
        let taken = used.entry(net_id.to_string()).or_default();
        let cursor = cursors
            .entry(net_id.to_string())
            .or_insert_with(|| subnet.first().saturating_add(2));
        let last = subnet.last().checked_sub(1)?;
        while *cursor <= last && taken.contains(&Ipv4Addr::from(*cursor)) {
            *cursor += 1;
        }
        if *cursor > last {
            return None;
        }
        let ip = Ipv4Addr::from(*cursor);
        taken.insert(ip);
        Some(ip)
    };

    // Releases. What an SM asked for (an instance address it allocated, a host it requested)
    // is the SM's to release; the reconciler releases only what it allocated itself.
    let sm_held: BTreeSet<&InstanceIdent> = allocs
        .instance_ips
        .keys()
        .filter(|k| snap.observed.network_params.contains_key(*k))
        .collect();
    let sm_hosts_held: BTreeSet<(&str, &str)> = allocs
        .instance_ips
        .iter()
        .filter(|(k, _)| sm_held.contains(k))
        .map(|(_, a)| (a.network_id.as_str(), a.node_id.as_str()))
        .collect();
    let sm_nets: BTreeSet<&str> = sm_hosts_held.iter().map(|(n, _)| *n).collect();
    for (ident, addr) in &allocs.instance_ips {
        let keep = sm_held.contains(ident)
            || members
                .get(ident)
                .is_some_and(|(net, _)| *net == addr.network_id);
        if !keep {
            plan.actions.push(Action::ReleaseInstanceIp {
                ident: ident.clone(),
            });
        }
    }
    for (net_id, net) in &allocs.networks {
        let held = !net.sm_hosts.is_empty() || sm_nets.contains(net_id.as_str());
        if !needed_nets.contains(net_id.as_str()) && !held {
            plan.actions.push(Action::ReleaseNetwork {
                network_id: net_id.clone(),
            });
            nets.remove(net_id);
            continue;
        }
        for node in net.hosts.keys() {
            if !needed_hosts.contains(&(net_id.as_str(), node.as_str()))
                && !net.sm_hosts.contains(node)
                && !sm_hosts_held.contains(&(net_id.as_str(), node.as_str()))
            {
                plan.actions.push(Action::DetachHost {
                    network_id: net_id.clone(),
                    node_id: node.clone(),
                });
                if let Some(n) = nets.get_mut(net_id) {
                    n.hosts.remove(node);
                }
            }
        }
    }

    // Networks.
    for net_id in &needed_nets {
        if nets.contains_key(*net_id) {
            continue;
        }
        let used_subnets: BTreeSet<Ipv4Net> = nets.values().map(|n| n.subnet).collect();
        let used_vlans: BTreeSet<u16> = nets.values().map(|n| n.vlan_id).collect();
        let (Some(subnet), Some(vlan_id)) = (
            free_subnet(&used_subnets, &snap.observed.host_routes),
            free_vlan(&used_vlans),
        ) else {
            plan.condition(
                format!("network {net_id}"),
                "NoSubnet",
                "no free /16 subnet in 172.17.0.0-172.31.255.255 that avoids the host routes",
            );
            continue;
        };
        plan.actions.push(Action::AllocateNetwork {
            network_id: (*net_id).to_string(),
            subnet,
            vlan_id,
        });
        nets.insert(
            (*net_id).to_string(),
            NetworkAllocation {
                subnet,
                vlan_id,
                hosts: BTreeMap::new(),
                sm_hosts: Default::default(),
            },
        );
    }

    // Host addresses.
    for (net_id, node_id) in &needed_hosts {
        let Some(net) = nets.get(*net_id) else {
            continue;
        };
        if net.hosts.contains_key(*node_id) {
            continue;
        }
        let subnet = net.subnet;
        let Some(ip) = next_ip(net_id, &subnet) else {
            plan.condition(
                format!("network {net_id}"),
                "NoAddress",
                "the subnet is full",
            );
            continue;
        };
        plan.actions.push(Action::AttachHost {
            network_id: (*net_id).to_string(),
            node_id: (*node_id).to_string(),
            ip,
        });
        if let Some(n) = nets.get_mut(*net_id) {
            n.hosts.insert((*node_id).to_string(), ip);
        }
    }

    // Instance addresses; an instance that moved to another node keeps its address.
    for (ident, (net_id, p)) in &members {
        let Some(net) = nets.get(*net_id) else {
            continue;
        };
        let hostname = manifest_of(snap, &items, p)
            .and_then(|m| m.item_config.as_ref())
            .and_then(|c| c.hostname.clone());
        // The names the instance's SM computed, when it has asked; else the same patterns.
        let names = match snap.observed.network_params.get(*ident) {
            Some(params) if !params.hosts.is_empty() => params.hosts.clone(),
            _ => dns_names(ident, net_id, hostname.as_deref()),
        };
        let current = allocs
            .instance_ips
            .get(*ident)
            .filter(|a| a.network_id == *net_id);
        let ip = match current {
            Some(a) if a.node_id == p.node_id => {
                ips.insert(*ident, a.clone());
                continue;
            }
            Some(a) => a.ip,
            None => match next_ip(net_id, &net.subnet) {
                Some(ip) => ip,
                None => {
                    plan.condition(
                        format!("instance {ident}"),
                        "NoAddress",
                        "the subnet is full",
                    );
                    continue;
                }
            },
        };
        plan.actions.push(Action::AssignInstanceIp {
            ident: (*ident).clone(),
            network_id: (*net_id).to_string(),
            node_id: p.node_id.clone(),
            ip,
            dns_names: names,
        });
        ips.insert(
            *ident,
            InstanceAddress {
                network_id: (*net_id).to_string(),
                node_id: p.node_id.clone(),
                ip,
            },
        );
    }

    // Firewall rules from allowed connections to instances that expose the port.
    let mut by_item: BTreeMap<&str, Vec<(&InstanceIdent, &str, &InstancePlacement)>> =
        BTreeMap::new();
    for (ident, (net, p)) in &members {
        by_item
            .entry(ident.item_id.as_str())
            .or_default()
            .push((ident, net, p));
    }
    for (ident, (net_id, p)) in &members {
        let Some(src) = ips.get(ident) else {
            continue;
        };
        let allowed = allowed_connections(snap, &items, ident, p);
        let mut rules: Vec<FirewallRule> = Vec::new();
        for conn in &allowed {
            let Some((target, port, proto)) = parse_connection(conn) else {
                plan.condition(
                    format!("instance {ident}"),
                    "BadConnection",
                    format!("allowed connection {conn:?} is not itemID/port[/proto]"),
                );
                continue;
            };
            let dst = by_item.get(target).and_then(|targets| {
                targets.iter().find(|(t, _, tp)| {
                    exposed_ports(snap, &items, t, tp)
                        .iter()
                        .any(|e| exposes(e, port, proto))
                })
            });
            match dst {
                Some((t, t_net, _)) => {
                    if t_net == net_id {
                        continue; // same subnet: no rule needed
                    }
                    if let Some(dst_addr) = ips.get(t) {
                        rules.push(FirewallRule {
                            src_ip: src.ip,
                            dst_ip: dst_addr.ip,
                            dst_port: port.to_string(),
                            proto: proto.to_ascii_lowercase(),
                        });
                    }
                }
                None => plan.condition(
                    format!("instance {ident}"),
                    "PendingConnection",
                    format!("connection {conn} waits for an instance of {target} exposing {port}/{proto}"),
                ),
            }
        }
        rules.sort();
        rules.dedup();
        let current = allocs.firewall.get(*ident).cloned().unwrap_or_default();
        if current != rules {
            plan.actions.push(Action::SetFirewallRules {
                ident: (*ident).clone(),
                rules,
            });
        }
    }
    plan
}

/// Firewall rules of one instance from the stored addresses, and the connections still
/// pending (their target item has no instance with an address exposing the port). Used by
/// the NetworkService when an SM asks, and when a target appears.
pub fn rules_for(snap: &Snapshot, ident: &InstanceIdent) -> (Vec<FirewallRule>, Vec<String>) {
    let items: BTreeMap<&str, &DesiredItem> = snap
        .desired
        .iter()
        .flat_map(|d| d.items.iter().map(|i| (i.id.as_str(), i)))
        .collect();
    let Some(src) = snap.allocations.instance_ips.get(ident) else {
        return (Vec::new(), Vec::new());
    };
    let ports_of = |t: &InstanceIdent| -> Vec<String> {
        match (
            snap.observed.network_params.get(t),
            snap.allocations.instances.get(t),
        ) {
            (Some(params), _) => params.exposed_ports.clone(),
            (None, Some(p)) => exposed_ports(snap, &items, t, p),
            (None, None) => Vec::new(),
        }
    };
    let allowed = match (
        snap.observed.network_params.get(ident),
        snap.allocations.instances.get(ident),
    ) {
        (Some(params), _) => params.allowed_connections.clone(),
        (None, Some(p)) => allowed_connections(snap, &items, ident, p),
        (None, None) => Vec::new(),
    };
    let mut rules = Vec::new();
    let mut pending = Vec::new();
    for conn in allowed {
        let Some((target, port, proto)) = parse_connection(&conn) else {
            continue;
        };
        let dst = snap.allocations.instance_ips.iter().find(|(t, _)| {
            t.item_id == target && ports_of(t).iter().any(|e| exposes(e, port, proto))
        });
        match dst {
            Some((_, d)) if d.network_id == src.network_id => {} // same subnet: no rule
            Some((_, d)) => rules.push(FirewallRule {
                src_ip: src.ip,
                dst_ip: d.ip,
                dst_port: port.to_string(),
                proto: proto.to_ascii_lowercase(),
            }),
            None => pending.push(conn.clone()),
        }
    }
    rules.sort();
    rules.dedup();
    (rules, pending)
}

/// The DNS zone: every instance address under the names its SM computed (or, before it has
/// asked, the standard patterns and the item's hostname).
pub fn zone_records(snap: &Snapshot) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let items: BTreeMap<&str, &DesiredItem> = snap
        .desired
        .iter()
        .flat_map(|d| d.items.iter().map(|i| (i.id.as_str(), i)))
        .collect();
    let mut zone: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for (ident, addr) in &snap.allocations.instance_ips {
        let names = match snap.observed.network_params.get(ident) {
            Some(params) if !params.hosts.is_empty() => params.hosts.clone(),
            _ => {
                let hostname = snap
                    .allocations
                    .instances
                    .get(ident)
                    .and_then(|p| manifest_of(snap, &items, p))
                    .and_then(|m| m.item_config.as_ref())
                    .and_then(|c| c.hostname.clone());
                dns_names(ident, &addr.network_id, hostname.as_deref())
            }
        };
        for name in names {
            let ips = zone.entry(name.to_ascii_lowercase()).or_default();
            if !ips.contains(&addr.ip) {
                ips.push(addr.ip);
            }
        }
    }
    zone
}
