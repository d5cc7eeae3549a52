//! Property: over random sequences of node and instance allocations and releases across 50
//! network IDs (1,000 instance IDs), no address is ever held twice in a network, no two
//! networks share a subnet or a VLAN, and every VLAN is in 1..=4094. Only 15 /16 subnets
//! exist in the pool, so a request beyond that fails with a clear error instead.

use aos_cm::api::proto::common::v2 as pbc;
use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::api::sm::network::NetworkService;
use aos_cm::model::*;
use aos_cm::store::Store;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    Node(u8, u8),
    Instance(u16, u8, u8),
    ReleaseInstance(u16),
    ReleaseNode(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..50, 0u8..4).prop_map(|(n, h)| Op::Node(n, h)),
        6 => (0u16..1000, 0u8..50, 0u8..4).prop_map(|(i, n, h)| Op::Instance(i, n, h)),
        2 => (0u16..1000).prop_map(Op::ReleaseInstance),
        1 => (0u8..50, 0u8..4).prop_map(|(n, h)| Op::ReleaseNode(n, h)),
    ]
}

fn check(a: &Allocations) {
    let mut subnets = BTreeSet::new();
    let mut vlans = BTreeSet::new();
    for (id, n) in &a.networks {
        assert!(subnets.insert(n.subnet), "subnet {} twice", n.subnet);
        assert!(
            (1..=4094).contains(&n.vlan_id),
            "vlan {} of {id} out of range",
            n.vlan_id
        );
        assert!(vlans.insert(n.vlan_id), "vlan {} twice", n.vlan_id);
        let mut ips = BTreeSet::new();
        for ip in n.hosts.values() {
            assert!(n.subnet.contains(*ip));
            assert!(ips.insert(*ip), "host address {ip} twice in {id}");
        }
        for (k, x) in a.instance_ips.iter().filter(|(_, x)| x.network_id == *id) {
            assert!(n.subnet.contains(x.ip), "{k} outside its subnet");
            assert!(ips.insert(x.ip), "address {} twice in {id}", x.ip);
        }
    }
    assert!(
        a.instance_ips
            .values()
            .all(|x| a.networks.contains_key(&x.network_id))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]
    #[test]
    fn allocations_stay_unique(ops in proptest::collection::vec(op(), 1200..1500)) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("cm.redb")).unwrap());
        let svc = NetworkService::new(store.clone(), vec!["127.0.0.1".into()]);
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Node(n, h) => {
                    if let Err(e) = svc.node_params(&format!("net{n}"), &format!("node{h}")) {
                        let nets = store.snapshot().unwrap().allocations.networks.len();
                        prop_assert!(nets == 15 && e.1.contains("no free subnet"), "step {step}: {e:?} with {nets} networks");
                    }
                }
                Op::Instance(i, n, h) => {
                    let req = pb::AllocateInstanceNetworkRequest {
                        instance: Some(pbc::InstanceIdent { item_id: format!("item{}", i % 100), subject_id: "s".into(), instance: u64::from(*i), ..Default::default() }),
                        network_id: format!("net{n}"),
                        node_id: format!("node{h}"),
                        service_data: None,
                    };
                    if let Err(e) = svc.allocate(&req) {
                        prop_assert!(e.1.contains("not found"), "step {step}: {e:?}");
                    }
                }
                Op::ReleaseInstance(i) => {
                    svc.release_instance(&InstanceIdent::new(&format!("item{}", i % 100), "s", u64::from(*i))).unwrap();
                }
                Op::ReleaseNode(n, h) => {
                    if let Err(e) = svc.release_node(&format!("net{n}"), &format!("node{h}")) {
                        prop_assert!(e.1.contains("not found"), "step {step}: {e:?}");
                    }
                }
            }
            if step % 50 == 0 {
                check(&store.snapshot().unwrap().allocations);
            }
        }
        check(&store.snapshot().unwrap().allocations);
    }
}
