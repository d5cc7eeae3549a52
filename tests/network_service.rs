//! NetworkService v5 and the embedded DNS server over loopback (reference grpc-interfaces.md
//! 6.6): node and instance networks, firewall rules across networks, pending connections and
//! their notification, releases, state sync, DNS answers over UDP and TCP, and stability of
//! every allocation across a restart.

mod common;

use aos_cm::api::proto::common::v2 as pbc;
use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::api::sm::SmConfig;
use aos_cm::sim::unit::{SimUnit, quick_runner};
use common::*;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

type Client = pb::network_service_client::NetworkServiceClient<tonic::transport::Channel>;

fn ident(item: &str, i: u64) -> pbc::InstanceIdent {
    pbc::InstanceIdent {
        item_id: item.into(),
        subject_id: "subj".into(),
        instance: i,
        ..Default::default()
    }
}

async fn node_params(c: &mut Client, net: &str, node: &str) -> pb::GetNodeNetworkParamsResponse {
    c.get_node_network_params(pb::GetNodeNetworkParamsRequest {
        network_id: net.into(),
        node_id: node.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[allow(clippy::too_many_arguments)]
async fn allocate(
    c: &mut Client,
    item: &str,
    i: u64,
    net: &str,
    node: &str,
    hosts: &[&str],
    allowed: &[&str],
    exposed: &[&str],
) -> pb::AllocateInstanceNetworkResponse {
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
    c.allocate_instance_network(pb::AllocateInstanceNetworkRequest {
        instance: Some(ident(item, i)),
        network_id: net.into(),
        node_id: node.into(),
        service_data: Some(pb::UpdateItemNetworkParams {
            hosts: v(hosts),
            allowed_connections: v(allowed),
            exposed_ports: v(exposed),
        }),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn client(addr: SocketAddr) -> Client {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::network_service_client::NetworkServiceClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_instance_networks() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let mut c = client(unit.addr).await;

    // New network, new node; existing network, new node; existing node (idempotent).
    let a = node_params(&mut c, "netA", "n1").await;
    assert_eq!(
        (a.subnet.as_str(), a.ip.as_str(), a.vlan_id, &a.error),
        ("172.17.0.0/16", "172.17.0.2", 1, &None)
    );
    let b = node_params(&mut c, "netA", "n2").await;
    assert_eq!(
        (b.subnet.as_str(), b.ip.as_str(), b.vlan_id),
        ("172.17.0.0/16", "172.17.0.3", 1)
    );
    assert_eq!(node_params(&mut c, "netA", "n1").await, a);
    let other = node_params(&mut c, "netB", "n1").await;
    assert_eq!((other.subnet.as_str(), other.vlan_id), ("172.18.0.0/16", 2));

    // New instance; the same instance again keeps its address; DNS server is ours.
    let x = allocate(&mut c, "itemX", 0, "netA", "n1", &["x0"], &[], &["80/tcp"]).await;
    assert_eq!(
        (x.subnet.as_str(), x.ip.as_str(), x.error),
        ("172.17.0.0/16", "172.17.0.4", None)
    );
    assert_eq!(
        x.dns_servers,
        vec![unit.unit.dns.local_addr().ip().to_string()]
    );
    assert_eq!(
        allocate(&mut c, "itemX", 0, "netA", "n1", &["x0"], &[], &["80/tcp"])
            .await
            .ip,
        x.ip
    );

    // Network or host not found: business errors in the response.
    let e = allocate(&mut c, "itemX", 1, "nope", "n1", &[], &[], &[])
        .await
        .error
        .unwrap();
    assert_eq!(e.aos_code, 5);
    assert!(
        e.message.contains("network nope not found"),
        "{}",
        e.message
    );
    let e = allocate(&mut c, "itemX", 1, "netA", "n9", &[], &[], &[])
        .await
        .error
        .unwrap();
    assert!(e.message.contains("host n9 not found"), "{}", e.message);

    // Migration to another node of the network keeps the address, and that address is not
    // handed out again (errata 12).
    let moved = allocate(&mut c, "itemX", 0, "netA", "n2", &["x0"], &[], &["80/tcp"]).await;
    assert_eq!(moved.ip, x.ip);
    let y = allocate(&mut c, "itemY", 0, "netA", "n2", &[], &[], &[]).await;
    assert_eq!(y.ip, "172.17.0.5");
    let snap = unit.store.snapshot().unwrap();
    let addr =
        &snap.allocations.instance_ips[&aos_cm::model::InstanceIdent::new("itemX", "subj", 0)];
    assert_eq!(addr.node_id, "n2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firewall_rules_pending_connections_and_notifications() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let mut c = client(unit.addr).await;
    node_params(&mut c, "netA", "n1").await;
    node_params(&mut c, "netB", "n2").await;
    let mut updates = c
        .subscribe_instance_network_updates(pb::SubscribeInstanceNetworkUpdatesRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // The client may reach server:8443 (another network) and peer:80 (its own network), and
    // db:5432 which has no instance yet: partial rules.
    let srv = allocate(&mut c, "server", 0, "netB", "n2", &[], &[], &["8443/tcp"]).await;
    let peer = allocate(&mut c, "peer", 0, "netA", "n1", &[], &[], &["80"]).await;
    let cl = allocate(
        &mut c,
        "client",
        0,
        "netA",
        "n1",
        &[],
        &["server/8443/tcp", "peer/80", "db/5432"],
        &[],
    )
    .await;
    assert_eq!(cl.error, None);
    assert_eq!(
        cl.firewall_rules,
        vec![pb::FirewallRule {
            dst_ip: srv.ip.clone(),
            dst_port: "8443".into(),
            proto: "tcp".into(),
            src_ip: cl.ip.clone()
        }],
        "one rule across networks, none within, db pending"
    );
    let _ = peer;

    // db appears in netB: the client's node is told about the resolved connection.
    let db = allocate(&mut c, "db", 0, "netB", "n2", &[], &[], &["5432/tcp"]).await;
    let n = tokio::time::timeout(Duration::from_secs(5), updates.message())
        .await
        .expect("no notification")
        .unwrap()
        .unwrap();
    let Some(pb::instance_network_update_notification::Update::PendingFirewallUpdate(u)) = n.update
    else {
        panic!("unexpected {n:?}")
    };
    assert_eq!(u.instance.unwrap().item_id, "client");
    assert!(
        u.firewall_rules
            .iter()
            .any(|r| r.dst_ip == db.ip && r.dst_port == "5432")
    );

    // Release the client: its rules and pending connections are gone.
    let r = c
        .release_instance_network(pb::ReleaseInstanceNetworkRequest {
            instance: Some(ident("client", 0)),
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.error, None);
    let snap = unit.store.snapshot().unwrap();
    let cid = aos_cm::model::InstanceIdent::new("client", "subj", 0);
    assert!(!snap.allocations.instance_ips.contains_key(&cid));
    assert!(!snap.allocations.firewall.contains_key(&cid));
    assert!(!snap.observed.network_params.contains_key(&cid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_nodes_and_syncing_state() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let mut c = client(unit.addr).await;
    node_params(&mut c, "netA", "n1").await;
    node_params(&mut c, "netA", "n2").await;
    let a = allocate(&mut c, "a", 0, "netA", "n1", &[], &[], &[]).await;
    let b = allocate(&mut c, "b", 0, "netA", "n2", &[], &[], &[]).await;
    let stale = allocate(&mut c, "stale", 0, "netA", "n1", &[], &[], &[]).await;

    // SyncNetworkState: n1 no longer reports "stale": released; "a" is kept.
    let r = c
        .sync_network_state(pb::SyncNetworkStateRequest {
            node_id: "n1".into(),
            instances: vec![pb::InstanceNetworkStateInfo {
                instance: Some(ident("a", 0)),
                network_id: "netA".into(),
                ip: a.ip.clone(),
                firewall_rules: vec![],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.error, None);
    let snap = unit.store.snapshot().unwrap();
    assert!(
        !snap
            .allocations
            .instance_ips
            .contains_key(&aos_cm::model::InstanceIdent::new("stale", "subj", 0))
    );
    assert!(
        snap.allocations
            .instance_ips
            .contains_key(&aos_cm::model::InstanceIdent::new("a", "subj", 0))
    );
    let _ = stale;

    // Release n1: its instances go, the network stays for n2.
    let r = c
        .release_node_network(pb::ReleaseNodeNetworkRequest {
            network_id: "netA".into(),
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.error, None);
    let snap = unit.store.snapshot().unwrap();
    assert_eq!(
        snap.allocations.networks["netA"]
            .hosts
            .keys()
            .collect::<Vec<_>>(),
        vec!["n2"]
    );
    assert!(
        !snap
            .allocations
            .instance_ips
            .contains_key(&aos_cm::model::InstanceIdent::new("a", "subj", 0))
    );
    assert_eq!(
        snap.allocations.instance_ips[&aos_cm::model::InstanceIdent::new("b", "subj", 0)]
            .ip
            .to_string(),
        b.ip
    );

    // The last node frees the network: its subnet and VLAN go back to the pool.
    c.release_node_network(pb::ReleaseNodeNetworkRequest {
        network_id: "netA".into(),
        node_id: "n2".into(),
    })
    .await
    .unwrap();
    assert!(
        unit.store
            .snapshot()
            .unwrap()
            .allocations
            .networks
            .is_empty()
    );
    let e = allocate(&mut c, "b", 0, "netA", "n2", &[], &[], &[])
        .await
        .error
        .unwrap();
    assert!(e.message.contains("not found"));
    let again = node_params(&mut c, "netC", "n1").await;
    assert_eq!((again.subnet.as_str(), again.vlan_id), ("172.17.0.0/16", 1));
}

fn query(name: &str) -> (u16, Vec<u8>) {
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    (msg.metadata.id, msg.to_vec().unwrap())
}

async fn udp(addr: SocketAddr, name: &str) -> Message {
    let (_, bytes) = query(name);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("dns answer")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn tcp(addr: SocketAddr, name: &str) -> Message {
    let (_, bytes) = query(name);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    Message::from_vec(&body).unwrap()
}

fn a(msg: &Message) -> Vec<Ipv4Addr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_every_name_form_and_follows_allocations() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let dns = unit.unit.dns.local_addr();
    let mut c = client(unit.addr).await;
    node_params(&mut c, "net1", "n1").await;
    node_params(&mut c, "net2", "n1").await;
    // The SM computes the names (index 0 has the short forms, plus the item's hostname).
    let names = [
        "gw",
        "0.subj.item",
        "0.subj.item.net1",
        "subj.item",
        "subj.item.net1",
    ];
    let x = allocate(&mut c, "item", 0, "net1", "n1", &names, &[], &[]).await;
    let want: Vec<Ipv4Addr> = vec![x.ip.parse().unwrap()];
    // The zone follows the store within a second: query until it answers, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while a(&udp(dns, "gw").await) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "zone not updated within 1 s"
        );
        tokio::task::yield_now().await;
    }
    for name in names {
        assert_eq!(a(&udp(dns, name).await), want, "udp {name}");
        assert_eq!(a(&tcp(dns, &name.to_uppercase()).await), want, "tcp {name}");
    }
    // Unknown name in the zone: NXDOMAIN.
    assert_eq!(
        udp(dns, "9.subj.item.net1").await.metadata.response_code,
        ResponseCode::NXDomain
    );

    // The instance moves to another network (its owner changed): the names follow.
    c.release_instance_network(pb::ReleaseInstanceNetworkRequest {
        instance: Some(ident("item", 0)),
        node_id: "n1".into(),
    })
    .await
    .unwrap();
    let moved_names = ["gw", "0.subj.item.net2"];
    let y = allocate(&mut c, "item", 0, "net2", "n1", &moved_names, &[], &[]).await;
    let want: Vec<Ipv4Addr> = vec![y.ip.parse().unwrap()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while a(&udp(dns, "gw").await) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "zone not updated within 1 s"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(a(&tcp(dns, "0.subj.item.net2").await), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_are_the_same_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    let (first, before) = {
        let unit = SimUnit::start(&path, SmConfig::default(), None, quick_runner())
            .await
            .unwrap();
        let mut c = client(unit.addr).await;
        let mut got = Vec::new();
        for (net, node) in [("netA", "n1"), ("netA", "n2"), ("netB", "n1")] {
            got.push(node_params(&mut c, net, node).await);
        }
        for i in 0..5 {
            got.push(node_params(&mut c, "netB", "n1").await);
            let r = allocate(
                &mut c,
                "svc",
                i,
                if i % 2 == 0 { "netA" } else { "netB" },
                "n1",
                &[],
                &[],
                &[],
            )
            .await;
            assert_eq!(r.error, None);
        }
        let snap = unit.store.snapshot().unwrap();
        drop(c);
        unit.stop().await;
        (got, snap.allocations)
    };
    let unit = SimUnit::start(&path, SmConfig::default(), None, quick_runner())
        .await
        .unwrap();
    let mut c = client(unit.addr).await;
    for (want, (net, node)) in first
        .iter()
        .zip([("netA", "n1"), ("netA", "n2"), ("netB", "n1")])
    {
        assert_eq!(&node_params(&mut c, net, node).await, want);
    }
    for i in 0..5u64 {
        let r = allocate(
            &mut c,
            "svc",
            i,
            if i % 2 == 0 { "netA" } else { "netB" },
            "n1",
            &[],
            &[],
            &[],
        )
        .await;
        let id = aos_cm::model::InstanceIdent::new("svc", "subj", i);
        assert_eq!(r.ip, before.instance_ips[&id].ip.to_string());
    }
    assert_eq!(
        unit.store.snapshot().unwrap().allocations.networks,
        before.networks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_replace_queue_and_sync_pushes_differences() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let mut c = client(unit.addr).await;
    node_params(&mut c, "netA", "n1").await;
    node_params(&mut c, "netB", "n2").await;
    // n1 is not subscribed when its pending connection resolves: the update is kept.
    allocate(
        &mut c,
        "client",
        0,
        "netA",
        "n1",
        &[],
        &["server/8443"],
        &[],
    )
    .await;
    let srv = allocate(&mut c, "server", 0, "netB", "n2", &[], &[], &["8443/tcp"]).await;
    let subscribe = |mut c: Client| async move {
        c.subscribe_instance_network_updates(pb::SubscribeInstanceNetworkUpdatesRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner()
    };
    let mut first = subscribe(c.clone()).await;
    let queued = tokio::time::timeout(Duration::from_secs(5), first.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::instance_network_update_notification::Update::PendingFirewallUpdate(u)) =
        queued.update
    else {
        panic!("{queued:?}")
    };
    assert_eq!(
        u.firewall_rules[0].dst_ip, srv.ip,
        "the queued update is delivered on subscribe"
    );

    // A newer subscription replaces the older one, whose stream ends.
    let mut second = subscribe(c.clone()).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), first.message())
        .await
        .unwrap();
    assert!(matches!(ended, Ok(None)), "{ended:?}");

    // SyncNetworkState with rules that differ from the CM's: the right ones are pushed.
    let cl = unit.store.snapshot().unwrap().allocations.instance_ips
        [&aos_cm::model::InstanceIdent::new("client", "subj", 0)]
        .ip
        .to_string();
    c.sync_network_state(pb::SyncNetworkStateRequest {
        node_id: "n1".into(),
        instances: vec![pb::InstanceNetworkStateInfo {
            instance: Some(ident("client", 0)),
            network_id: "netA".into(),
            ip: cl,
            firewall_rules: vec![],
        }],
    })
    .await
    .unwrap();
    let pushed = tokio::time::timeout(Duration::from_secs(5), second.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::instance_network_update_notification::Update::PendingFirewallUpdate(u)) =
        pushed.update
    else {
        panic!("{pushed:?}")
    };
    assert_eq!(
        (
            u.firewall_rules[0].dst_ip.as_str(),
            u.firewall_rules[0].dst_port.as_str()
        ),
        (srv.ip.as_str(), "8443")
    );
}
