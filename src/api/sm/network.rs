//! NetworkService v5: the SMs ask the CM for their node's address in a network, for each
//! instance's address, DNS server and firewall rules, and subscribe to firewall updates.
//! Everything is allocated in the store (the same allocations the network reconciler keeps)
//! and stays stable across restarts. Business errors go in the response's `error`, as
//! upstream does; only undecodable requests fail the call.

use crate::api::proto::common::v2 as pbc;
use crate::api::proto::servicemanager::v5 as pb;
use crate::api::sm::convert;
use crate::model::*;
use crate::reconcilers::network::{free_ip, free_subnet, free_vlan, rules_for};
use crate::store::{Store, StoreError};
use core::net::Ipv4Addr;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// aos_code values (index of the upstream error enumeration).
const FAILED: i32 = 1;
const NOT_FOUND: i32 = 5;
const INVALID_ARGUMENT: i32 = 6;

type Notification = Result<pb::InstanceNetworkUpdateNotification, Status>;

struct Inner {
    store: Arc<Store>,
    /// Handed to instances as their DNS server (errata 15: never empty).
    dns_servers: Vec<String>,
    subscribers: Mutex<HashMap<String, mpsc::Sender<Notification>>>,
    /// Updates for nodes without a subscription, delivered when they subscribe (errata 14).
    queued: Mutex<HashMap<String, Vec<pb::InstanceNetworkUpdateNotification>>>,
}

#[derive(Clone)]
pub struct NetworkService {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn error(code: i32, message: impl Into<String>) -> Option<pbc::ErrorInfo> {
    Some(pbc::ErrorInfo {
        aos_code: code,
        exit_code: 0,
        message: message.into(),
    })
}

/// A business error of a request (aos_code, message), reported in the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub i32, pub String);

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal(FAILED, e.to_string())
    }
}

fn rule_pb(r: &FirewallRule) -> pb::FirewallRule {
    pb::FirewallRule {
        dst_ip: r.dst_ip.to_string(),
        dst_port: r.dst_port.clone(),
        proto: r.proto.clone(),
        src_ip: r.src_ip.to_string(),
    }
}

fn ident_of(id: Option<&pbc::InstanceIdent>) -> Result<InstanceIdent, Refusal> {
    match id {
        Some(id) if !id.item_id.is_empty() && !id.subject_id.is_empty() => {
            Ok(convert::ident_from_pb(id))
        }
        _ => Err(Refusal(
            INVALID_ARGUMENT,
            "instance: item_id and subject_id are required".into(),
        )),
    }
}

fn required(what: &str, v: &str) -> Result<(), Refusal> {
    if v.is_empty() || v.len() > 64 {
        return Err(Refusal(
            INVALID_ARGUMENT,
            format!("{what}: 1 to 64 characters required"),
        ));
    }
    Ok(())
}

/// Addresses taken in a network: its hosts and its instances.
fn used_in(
    network: &NetworkAllocation,
    ips: &BTreeMap<InstanceIdent, InstanceAddress>,
    id: &str,
) -> BTreeSet<Ipv4Addr> {
    let mut used: BTreeSet<Ipv4Addr> = network.hosts.values().copied().collect();
    used.extend(ips.values().filter(|a| a.network_id == id).map(|a| a.ip));
    used
}

impl NetworkService {
    pub fn new(store: Arc<Store>, dns_servers: Vec<String>) -> NetworkService {
        NetworkService {
            inner: Arc::new(Inner {
                store,
                dns_servers,
                subscribers: Mutex::new(HashMap::new()),
                queued: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn service(&self) -> pb::network_service_server::NetworkServiceServer<NetworkService> {
        pb::network_service_server::NetworkServiceServer::new(self.clone())
    }

    /// Sends a firewall update to a node, or keeps it until the node subscribes.
    fn push(&self, node: &str, update: pb::PendingFirewallUpdate) {
        let n = pb::InstanceNetworkUpdateNotification {
            update: Some(
                pb::instance_network_update_notification::Update::PendingFirewallUpdate(update),
            ),
        };
        let sender = lock(&self.inner.subscribers).get(node).cloned();
        match sender {
            Some(tx) if tx.try_send(Ok(n.clone())).is_ok() => {}
            _ => lock(&self.inner.queued)
                .entry(node.to_string())
                .or_default()
                .push(n),
        }
    }

    /// Recomputes the rules of every instance whose allowed connections name `item` (a target
    /// that just got or lost an address) and pushes the changed ones to their nodes.
    fn resolve_dependents(&self, item: &str) -> Result<(), StoreError> {
        let snap = self.inner.store.shared_snapshot()?;
        let mut changed: Vec<(String, InstanceIdent, Vec<FirewallRule>)> = Vec::new();
        for (ident, addr) in &snap.allocations.instance_ips {
            let names_item = snap.observed.network_params.get(ident).is_some_and(|p| {
                p.allowed_connections
                    .iter()
                    .any(|c| c.split('/').next() == Some(item))
            });
            if !names_item {
                continue;
            }
            let (rules, _) = rules_for(&snap, ident);
            if snap
                .allocations
                .firewall
                .get(ident)
                .cloned()
                .unwrap_or_default()
                != rules
            {
                changed.push((addr.node_id.clone(), ident.clone(), rules));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        self.inner.store.write(|tx| {
            for (_, ident, rules) in &changed {
                if rules.is_empty() {
                    tx.remove_firewall(ident)?;
                } else {
                    tx.set_firewall(ident, rules)?;
                }
            }
            Ok(())
        })?;
        for (node, ident, rules) in changed {
            self.push(
                &node,
                pb::PendingFirewallUpdate {
                    instance: Some(convert::ident_to_pb(&ident, ItemType::Service, false)),
                    firewall_rules: rules.iter().map(rule_pb).collect(),
                },
            );
        }
        Ok(())
    }

    /// GetNodeNetworkParams: the network's subnet and VLAN (allocated on first use) and the
    /// node's address in it.
    pub fn node_params(
        &self,
        network_id: &str,
        node_id: &str,
    ) -> Result<(Ipv4Net, Ipv4Addr, u16), Refusal> {
        required("network_id", network_id)?;
        required("node_id", node_id)?;
        self.inner.store.write(|tx| {
            let ips = tx.allocations()?.instance_ips;
            let mut net = match tx.network(network_id)? {
                Some(n) => n,
                None => {
                    let a = tx.allocations()?;
                    let subnets: BTreeSet<Ipv4Net> =
                        a.networks.values().map(|n| n.subnet).collect();
                    let vlans: BTreeSet<u16> = a.networks.values().map(|n| n.vlan_id).collect();
                    let (Some(subnet), Some(vlan_id)) =
                        (free_subnet(&subnets, &tx.host_routes()?), free_vlan(&vlans))
                    else {
                        return Ok(Err(Refusal(FAILED, "no free subnet or VLAN".into())));
                    };
                    NetworkAllocation {
                        subnet,
                        vlan_id,
                        hosts: BTreeMap::new(),
                        sm_hosts: Default::default(),
                    }
                }
            };
            net.sm_hosts.insert(node_id.to_string());
            let ip = match net.hosts.get(node_id) {
                Some(ip) => *ip,
                None => match free_ip(&net.subnet, &used_in(&net, &ips, network_id)) {
                    Some(ip) => {
                        net.hosts.insert(node_id.to_string(), ip);
                        ip
                    }
                    None => {
                        return Ok(Err(Refusal(
                            FAILED,
                            format!("network {network_id} is full"),
                        )));
                    }
                },
            };
            tx.put_network(network_id, &net)?;
            Ok(Ok((net.subnet, ip, net.vlan_id)))
        })?
    }

    /// AllocateInstanceNetwork: the instance's address (kept when it exists) and its rules.
    pub fn allocate(
        &self,
        req: &pb::AllocateInstanceNetworkRequest,
    ) -> Result<(Ipv4Net, Ipv4Addr, Vec<FirewallRule>), Refusal> {
        let ident = ident_of(req.instance.as_ref())?;
        required("network_id", &req.network_id)?;
        required("node_id", &req.node_id)?;
        let data = req.service_data.clone().unwrap_or_default();
        let params = InstanceNetworkParams {
            hosts: data.hosts,
            exposed_ports: data.exposed_ports,
            allowed_connections: data.allowed_connections,
        };
        let (network_id, node_id) = (req.network_id.as_str(), req.node_id.as_str());
        let result = self.inner.store.write(|tx| {
            let Some(net) = tx.network(network_id)? else {
                return Ok(Err(Refusal(
                    NOT_FOUND,
                    format!("network {network_id} not found"),
                )));
            };
            if !net.hosts.contains_key(node_id) {
                return Ok(Err(Refusal(
                    NOT_FOUND,
                    format!("host {node_id} not found in network {network_id}"),
                )));
            }
            // An instance keeps its address, also when it moved to another node of the network.
            let ip = match tx.instance_ip(&ident)? {
                Some(a) if a.network_id == network_id => a.ip,
                _ => {
                    let ips = tx.allocations()?.instance_ips;
                    match free_ip(&net.subnet, &used_in(&net, &ips, network_id)) {
                        Some(ip) => ip,
                        None => {
                            return Ok(Err(Refusal(
                                FAILED,
                                format!("network {network_id} is full"),
                            )));
                        }
                    }
                }
            };
            tx.put_instance_ip(
                &ident,
                &InstanceAddress {
                    network_id: network_id.to_string(),
                    node_id: node_id.to_string(),
                    ip,
                },
            )?;
            // The newest request's parameters win.
            tx.set_network_params(&ident, &params)?;
            let snap = tx.snapshot()?;
            let (rules, _pending) = rules_for(&snap, &ident);
            if rules.is_empty() {
                tx.remove_firewall(&ident)?;
            } else {
                tx.set_firewall(&ident, &rules)?;
            }
            Ok(Ok((net.subnet, ip, rules)))
        })?;
        let out = result?;
        // A target that just appeared resolves the pending connections of others.
        self.resolve_dependents(&ident.item_id)?;
        Ok(out)
    }

    pub fn release_instance(&self, ident: &InstanceIdent) -> Result<(), Refusal> {
        self.inner.store.write(|tx| {
            tx.remove_instance_ip(ident)?;
            tx.remove_firewall(ident)?;
            tx.remove_network_params(ident)?;
            Ok(())
        })?;
        self.resolve_dependents(&ident.item_id)?;
        Ok(())
    }

    pub fn release_node(&self, network_id: &str, node_id: &str) -> Result<(), Refusal> {
        required("network_id", network_id)?;
        required("node_id", node_id)?;
        let released = self.inner.store.write(|tx| {
            let Some(mut net) = tx.network(network_id)? else {
                return Ok(Err(Refusal(
                    NOT_FOUND,
                    format!("network {network_id} not found"),
                )));
            };
            net.hosts.remove(node_id);
            net.sm_hosts.remove(node_id);
            let ips = tx.allocations()?.instance_ips;
            let mut released = Vec::new();
            for (ident, a) in &ips {
                // The node's instances go; the last host takes the network with it.
                if a.network_id == network_id && (a.node_id == node_id || net.hosts.is_empty()) {
                    tx.remove_instance_ip(ident)?;
                    tx.remove_firewall(ident)?;
                    tx.remove_network_params(ident)?;
                    released.push(ident.item_id.clone());
                }
            }
            if net.hosts.is_empty() {
                tx.remove_network(network_id)?;
            } else {
                tx.put_network(network_id, &net)?;
            }
            Ok(Ok(released))
        })??;
        for item in BTreeSet::<String>::from_iter(released) {
            self.resolve_dependents(&item)?;
        }
        Ok(())
    }

    fn sync(&self, req: &pb::SyncNetworkStateRequest) -> Result<(), Refusal> {
        required("node_id", &req.node_id)?;
        let reported: BTreeSet<InstanceIdent> = req
            .instances
            .iter()
            .filter_map(|i| i.instance.as_ref().map(convert::ident_from_pb))
            .collect();
        let snap = self.inner.store.shared_snapshot()?;
        let stale: Vec<InstanceIdent> = snap
            .allocations
            .instance_ips
            .iter()
            .filter(|(k, a)| a.node_id == req.node_id && !reported.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for ident in &stale {
            self.release_instance(ident)?;
        }
        // Re-resolve what the node runs: rules that differ from what it has are pushed.
        let snap = self.inner.store.shared_snapshot()?;
        for info in &req.instances {
            let Some(id) = &info.instance else { continue };
            let ident = convert::ident_from_pb(id);
            if !snap.allocations.instance_ips.contains_key(&ident) {
                continue;
            }
            let (rules, _) = rules_for(&snap, &ident);
            let has: BTreeSet<(String, String, String, String)> = info
                .firewall_rules
                .iter()
                .map(|r| {
                    (
                        r.src_ip.clone(),
                        r.dst_ip.clone(),
                        r.dst_port.clone(),
                        r.proto.clone(),
                    )
                })
                .collect();
            let want: BTreeSet<(String, String, String, String)> = rules
                .iter()
                .map(|r| {
                    (
                        r.src_ip.to_string(),
                        r.dst_ip.to_string(),
                        r.dst_port.clone(),
                        r.proto.clone(),
                    )
                })
                .collect();
            if has != want {
                self.push(
                    &req.node_id,
                    pb::PendingFirewallUpdate {
                        instance: Some(id.clone()),
                        firewall_rules: rules.iter().map(rule_pb).collect(),
                    },
                );
            }
        }
        Ok(())
    }
}

type UpdateStream = Pin<Box<dyn futures::Stream<Item = Notification> + Send>>;

#[tonic::async_trait]
impl pb::network_service_server::NetworkService for NetworkService {
    async fn get_node_network_params(
        &self,
        request: Request<pb::GetNodeNetworkParamsRequest>,
    ) -> Result<Response<pb::GetNodeNetworkParamsResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            match self.node_params(&r.network_id, &r.node_id) {
                Ok((subnet, ip, vlan)) => pb::GetNodeNetworkParamsResponse {
                    subnet: subnet.to_string(),
                    ip: ip.to_string(),
                    vlan_id: u64::from(vlan),
                    error: None,
                },
                Err(Refusal(code, msg)) => pb::GetNodeNetworkParamsResponse {
                    error: error(code, msg),
                    ..Default::default()
                },
            },
        ))
    }

    async fn allocate_instance_network(
        &self,
        request: Request<pb::AllocateInstanceNetworkRequest>,
    ) -> Result<Response<pb::AllocateInstanceNetworkResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(match self.allocate(&r) {
            Ok((subnet, ip, rules)) => pb::AllocateInstanceNetworkResponse {
                subnet: subnet.to_string(),
                ip: ip.to_string(),
                dns_servers: self.inner.dns_servers.clone(),
                error: None,
                firewall_rules: rules.iter().map(rule_pb).collect(),
            },
            Err(Refusal(code, msg)) => pb::AllocateInstanceNetworkResponse {
                error: error(code, msg),
                ..Default::default()
            },
        }))
    }

    async fn release_instance_network(
        &self,
        request: Request<pb::ReleaseInstanceNetworkRequest>,
    ) -> Result<Response<pb::ReleaseInstanceNetworkResponse>, Status> {
        let r = request.into_inner();
        let result = ident_of(r.instance.as_ref()).and_then(|i| self.release_instance(&i));
        Ok(Response::new(pb::ReleaseInstanceNetworkResponse {
            error: result.err().and_then(|Refusal(c, m)| error(c, m)),
        }))
    }

    async fn release_node_network(
        &self,
        request: Request<pb::ReleaseNodeNetworkRequest>,
    ) -> Result<Response<pb::ReleaseNodeNetworkResponse>, Status> {
        let r = request.into_inner();
        let result = self.release_node(&r.network_id, &r.node_id);
        Ok(Response::new(pb::ReleaseNodeNetworkResponse {
            error: result.err().and_then(|Refusal(c, m)| error(c, m)),
        }))
    }

    type SubscribeInstanceNetworkUpdatesStream = UpdateStream;

    async fn subscribe_instance_network_updates(
        &self,
        request: Request<pb::SubscribeInstanceNetworkUpdatesRequest>,
    ) -> Result<Response<Self::SubscribeInstanceNetworkUpdatesStream>, Status> {
        let node = request.into_inner().node_id;
        if node.is_empty() || node.len() > 64 {
            return Err(Status::invalid_argument(
                "node_id: 1 to 64 characters required",
            ));
        }
        let (tx, rx) = mpsc::channel(256);
        for n in lock(&self.inner.queued).remove(&node).unwrap_or_default() {
            let _ = tx.try_send(Ok(n));
        }
        // A newer subscription replaces the older: dropping its sender ends its stream.
        lock(&self.inner.subscribers).insert(node, tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn sync_network_state(
        &self,
        request: Request<pb::SyncNetworkStateRequest>,
    ) -> Result<Response<pb::SyncNetworkStateResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::SyncNetworkStateResponse {
            error: self.sync(&r).err().and_then(|Refusal(c, m)| error(c, m)),
        }))
    }
}
