//! One test per placement and network rule, each named after the rule it checks. Fixtures
//! are built in code so that each test shows exactly the input the rule depends on.

use super::*;
use core::net::Ipv4Addr;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn digest(n: u64) -> Digest {
    Digest::parse(&format!("sha256:{n:064x}")).unwrap()
}

struct Unit {
    snap: Snapshot,
    next_digest: u64,
}

fn runtime(node: &str, ty: &str, arch: &str) -> RuntimeInfo {
    RuntimeInfo {
        runtime_id: format!("{ty}-{node}"),
        runtime_type: ty.to_string(),
        arch_info: ArchInfo {
            architecture: arch.to_string(),
            variant: None,
        },
        os_info: OsInfo {
            os: "linux".into(),
            ..OsInfo::default()
        },
        ..RuntimeInfo::default()
    }
}

impl Unit {
    fn new() -> Unit {
        Unit {
            snap: Snapshot {
                desired: Some(DesiredState::default()),
                ..Snapshot::default()
            },
            next_digest: 1,
        }
    }

    fn node(
        &mut self,
        id: &str,
        dmips: u64,
        ram: u64,
        runtimes: Vec<RuntimeInfo>,
    ) -> &mut ObservedNode {
        self.snap.observed.nodes.insert(
            id.to_string(),
            ObservedNode {
                info: NodeInfo {
                    node_id: id.to_string(),
                    node_type: "t".into(),
                    max_dmips: dmips,
                    total_ram: ram,
                    state: NodeState::Provisioned,
                    ..NodeInfo::default()
                },
                sm: Some(SmInfo {
                    runtimes,
                    resources: vec![],
                }),
                node_config: None,
                connection: Connection::Connected,
                usage: None,
            },
        );
        self.snap.observed.nodes.get_mut(id).unwrap()
    }

    fn config(&mut self, nodes: Vec<NodeConfig>) {
        let uc = UnitConfig {
            format_version: "7".into(),
            version: Version::parse("1.0.0").unwrap(),
            nodes,
        };
        self.snap.observed.unit_config = UnitConfigStatus {
            state: UnitConfigState::Installed,
            version: Some(uc.version.clone()),
            error: None,
            config: Some(uc),
        };
    }

    /// Adds a service item with one manifest per architecture.
    fn item(&mut self, id: &str, owner: &str, archs: &[&str], cfg: ItemConfig, ports: &[&str]) {
        let index = digest(self.next_digest);
        self.next_digest += 1;
        let manifests = archs
            .iter()
            .map(|a| {
                let d = digest(self.next_digest);
                self.next_digest += 1;
                ManifestInfo {
                    digest: d.clone(),
                    config_digest: d,
                    item_config_digest: None,
                    layers: vec![],
                    image: ImageConfig {
                        architecture: a.to_string(),
                        os: "linux".into(),
                        exposed_ports: ports.iter().map(|p| p.to_string()).collect(),
                        ..ImageConfig::default()
                    },
                    item_config: Some(cfg.clone()),
                }
            })
            .collect();
        self.snap.catalogue.images.insert(
            index.clone(),
            ItemImage {
                index_digest: index.clone(),
                manifests,
            },
        );
        self.desired().items.push(DesiredItem {
            id: id.into(),
            item_type: ItemType::Service,
            version: "1.0.0".into(),
            owner_id: owner.into(),
            index_digest: Some(index),
        });
    }

    fn run(&mut self, item: &str, n: u64, priority: u64, labels: &[&str]) {
        self.desired().instances.push(DesiredInstances {
            item_id: item.into(),
            subject_id: "s".into(),
            priority,
            num_instances: n,
            labels: labels.iter().map(|l| l.to_string()).collect(),
        });
    }

    fn desired(&mut self) -> &mut DesiredState {
        self.snap.desired.as_mut().unwrap()
    }

    fn instances(&self) -> Plan {
        instances::plan(&self.snap, 0)
    }

    /// Where each instance of the plan goes: "item/index@node/runtime".
    fn placed(&self) -> Vec<String> {
        self.instances()
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::StartInstance(s) => Some(format!(
                    "{}/{}@{}/{}",
                    s.placement.ident.item_id,
                    s.placement.ident.instance,
                    s.placement.node_id,
                    s.placement.runtime_type
                )),
                _ => None,
            })
            .collect()
    }

    fn reasons(&self) -> Vec<String> {
        self.instances()
            .conditions
            .iter()
            .map(|c| format!("{}: {}", c.reason, c.message))
            .collect()
    }

    /// Carries out the whole chain as a well-behaved unit would, until nothing is left.
    fn converge(&mut self) {
        for _ in 0..6 {
            let mut acted = false;
            for kind in CHAIN {
                let plan = plan_one(kind, &self.snap, 0);
                for a in &plan.actions {
                    project::apply_as_unit(&mut self.snap, a, 0);
                    acted = true;
                }
            }
            if !acted {
                return;
            }
        }
        panic!("did not converge");
    }
}

fn cfg() -> ItemConfig {
    ItemConfig::default()
}

fn node_cfg(id: &str, labels: &[&str], priority: u64) -> NodeConfig {
    NodeConfig {
        node_id: Some(id.into()),
        node_type: "t".into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        priority,
        ..NodeConfig::default()
    }
}

// ---- placement ----

#[test]
fn rule_labels_node_config_must_contain_all_instance_labels() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.node("b", 1000, GIB, vec![runtime("b", "crun", "amd64")]);
    u.config(vec![
        node_cfg("a", &["x"], 0),
        node_cfg("b", &["x", "camera"], 0),
    ]);
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 0, &["camera", "x"]);
    assert_eq!(u.placed(), vec!["svc/0@b/crun"]);
    u.desired().instances[0].labels = vec!["gpu".into()];
    assert_eq!(
        u.reasons(),
        vec!["NoMatchingLabels: no node with label gpu"]
    );
}

#[test]
fn rule_shared_resources_count_and_zero_is_unlimited() {
    let mut u = Unit::new();
    u.node("a", 10_000, 4 * GIB, vec![runtime("a", "crun", "amd64")])
        .sm
        .as_mut()
        .unwrap()
        .resources = vec![
        ResourceInfo {
            name: "camera".into(),
            shared_count: 1,
        },
        ResourceInfo {
            name: "gnss".into(),
            shared_count: 0,
        },
    ];
    u.item(
        "cam",
        "o",
        &["amd64"],
        ItemConfig {
            resources: vec!["camera".into()],
            ..cfg()
        },
        &[],
    );
    u.item(
        "gps",
        "o",
        &["amd64"],
        ItemConfig {
            resources: vec!["gnss".into()],
            ..cfg()
        },
        &[],
    );
    u.run("cam", 2, 0, &[]);
    u.run("gps", 3, 0, &[]);
    let placed = u.placed();
    assert_eq!(
        placed.iter().filter(|p| p.starts_with("cam/")).count(),
        1,
        "{placed:?}"
    );
    assert_eq!(
        placed.iter().filter(|p| p.starts_with("gps/")).count(),
        3,
        "{placed:?}"
    );
    assert_eq!(
        u.reasons(),
        vec!["NoResource: no node with resource camera free"]
    );
}

#[test]
fn rule_runtime_type_from_item_config_default_crun_runc() {
    let mut u = Unit::new();
    u.node(
        "a",
        1000,
        GIB,
        vec![runtime("a", "boot", "amd64"), runtime("a", "runc", "amd64")],
    );
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.item(
        "only-crun",
        "o",
        &["amd64"],
        ItemConfig {
            runtimes: vec!["crun".into()],
            ..cfg()
        },
        &[],
    );
    u.run("svc", 1, 1, &[]);
    u.run("only-crun", 1, 0, &[]);
    assert_eq!(u.placed(), vec!["svc/0@a/runc"]);
    assert_eq!(
        u.reasons(),
        vec!["NoRuntime: no node with runtime type crun"]
    );
}

#[test]
fn rule_platform_and_manifests_tried_in_index_order() {
    let mut u = Unit::new();
    u.node("x86", 1000, GIB, vec![runtime("x86", "crun", "amd64")]);
    u.node("arm", 1000, GIB, vec![runtime("arm", "crun", "arm64")]);
    let c = ItemConfig {
        requested: RequestedResources {
            cpu: Some(600),
            ..Default::default()
        },
        ..cfg()
    };
    u.item("svc", "o", &["amd64", "arm64"], c, &[]);
    u.item("riscv", "o", &["riscv64"], cfg(), &[]);
    u.run("svc", 2, 1, &[]);
    u.run("riscv", 1, 0, &[]);
    // The amd64 manifest first; once x86 is out of CPU the arm64 manifest is used.
    assert_eq!(u.placed(), vec!["svc/0@x86/crun", "svc/1@arm/crun"]);
    assert_eq!(
        u.reasons(),
        vec!["NoPlatform: no runtime for platform riscv64 linux"]
    );
}

#[test]
fn rule_cpu_and_ram_requested_clamped_to_quota_else_quota_times_ratio() {
    assert_eq!(
        placement::requested_value(Some(500), Some(2000), Some(40.0)),
        500
    );
    assert_eq!(
        placement::requested_value(Some(5000), Some(2000), None),
        2000
    );
    assert_eq!(placement::requested_value(None, Some(4000), None), 2000); // default 50 %
    assert_eq!(
        placement::requested_value(None, Some(4000), Some(40.0)),
        1600
    );
    assert_eq!(
        placement::requested_value(None, Some(4000), Some(150.0)),
        4000
    ); // capped at 100 %
    assert_eq!(
        placement::requested_value(None, Some(134217728), Some(60.0)),
        80530637
    ); // rounded
    assert_eq!(placement::requested_value(None, None, Some(60.0)), 0);
    let r = placement::reservation(
        ItemType::Service,
        &ItemConfig {
            skip_resource_limits: true,
            quotas: Quotas {
                cpu_dmips_limit: Some(100),
                ..Default::default()
            },
            ..cfg()
        },
        &ResourceRatios::default(),
    );
    assert_eq!(
        r,
        Reservation::default(),
        "skipResourceLimits reserves nothing"
    );
}

#[test]
fn rule_not_enough_cpu_then_ram_on_any_node() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.item(
        "cpu",
        "o",
        &["amd64"],
        ItemConfig {
            requested: RequestedResources {
                cpu: Some(600),
                ..Default::default()
            },
            ..cfg()
        },
        &[],
    );
    u.item(
        "ram",
        "o",
        &["amd64"],
        ItemConfig {
            requested: RequestedResources {
                ram: Some(600 * MIB),
                ..Default::default()
            },
            ..cfg()
        },
        &[],
    );
    u.run("cpu", 2, 1, &[]);
    u.run("ram", 2, 0, &[]);
    assert_eq!(u.placed(), vec!["cpu/0@a/crun", "ram/0@a/crun"]);
    assert_eq!(
        u.reasons(),
        vec![
            "NoCpu: not enough CPU on any node",
            "NoRam: not enough RAM on any node"
        ]
    );
}

#[test]
fn rule_storage_and_state_budget_from_partitions() {
    let mut u = Unit::new();
    u.node("a", 10_000, 4 * GIB, vec![runtime("a", "crun", "amd64")])
        .info
        .partitions = vec![PartitionInfo {
        name: "aos".into(),
        types: vec!["storages".into()],
        total_size: 100 * MIB,
        path: "/".into(),
    }];
    u.item(
        "svc",
        "o",
        &["amd64"],
        ItemConfig {
            requested: RequestedResources {
                storage: Some(60 * MIB),
                ..Default::default()
            },
            ..cfg()
        },
        &[],
    );
    u.run("svc", 2, 0, &[]);
    assert_eq!(u.placed(), vec!["svc/0@a/crun"]);
    assert_eq!(
        u.reasons(),
        vec!["NoStorage: not enough storage on any node"]
    );
}

#[test]
fn rule_runtime_max_instances_and_per_runtime_budget() {
    let mut u = Unit::new();
    let mut limited = runtime("a", "runc", "amd64");
    limited.max_instances = 1;
    let mut budget = runtime("b", "runc", "amd64");
    budget.allowed_dmips = 500;
    u.node("a", 10_000, 4 * GIB, vec![limited]);
    u.node("b", 10_000, 4 * GIB, vec![budget]);
    u.item(
        "svc",
        "o",
        &["amd64"],
        ItemConfig {
            requested: RequestedResources {
                cpu: Some(400),
                ..Default::default()
            },
            ..cfg()
        },
        &[],
    );
    u.run("svc", 3, 0, &[]);
    // One on a (max 1 instance), one on b (500 DMIPS runtime budget), the third fits nowhere:
    // b has no CPU left in its runtime budget, a has CPU but its runtime is full.
    let mut placed = u.placed();
    placed.sort();
    assert_eq!(placed, vec!["svc/0@a/runc", "svc/1@b/runc"]);
    assert_eq!(
        u.reasons(),
        vec!["RuntimeFull: every suitable runtime runs its maximum number of instances"]
    );
}

#[test]
fn rule_node_priority_then_most_free_cpu_then_ram_then_node_id() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.node("b", 2000, GIB, vec![runtime("b", "crun", "amd64")]);
    u.node("c", 2000, 2 * GIB, vec![runtime("c", "crun", "amd64")]);
    u.node("d", 2000, 2 * GIB, vec![runtime("d", "crun", "amd64")]);
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 0, &[]);
    u.config(vec![node_cfg("a", &[], 10)]);
    assert_eq!(
        u.placed(),
        vec!["svc/0@a/crun"],
        "priority wins over free CPU"
    );
    u.config(vec![]);
    assert_eq!(
        u.placed(),
        vec!["svc/0@c/crun"],
        "most CPU, then most RAM, then lowest node ID"
    );
}

#[test]
fn rule_runtime_chosen_by_type_name_alphabetically() {
    let mut u = Unit::new();
    u.node(
        "a",
        1000,
        GIB,
        vec![runtime("a", "runc", "amd64"), runtime("a", "crun", "amd64")],
    );
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 0, &[]);
    assert_eq!(u.placed(), vec!["svc/0@a/crun"]);
}

#[test]
fn rule_priority_order_higher_priority_placed_first() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    let big = ItemConfig {
        requested: RequestedResources {
            cpu: Some(800),
            ..Default::default()
        },
        ..cfg()
    };
    u.item("low", "o", &["amd64"], big.clone(), &[]);
    u.item("high", "o", &["amd64"], big, &[]);
    u.run("low", 1, 1, &[]);
    u.run("high", 1, 9, &[]);
    assert_eq!(u.placed(), vec!["high/0@a/crun"]);
}

#[test]
fn rule_a_second_request_for_the_same_item_and_subject_is_ignored() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 1, &[]);
    u.run("svc", 2, 9, &[]);
    // The higher-priority request stands: two instances, each started once.
    assert_eq!(u.placed(), vec!["svc/0@a/crun", "svc/1@a/crun"]);
    assert_eq!(
        u.reasons(),
        vec![
            "DuplicateRequest: instances of subject s are requested more than once: the request \
             of highest priority stands"
        ]
    );
}

#[test]
fn rule_uid_pool_per_instance_and_gid_per_item_are_stable() {
    let mut u = Unit::new();
    u.node("a", 10_000, 4 * GIB, vec![runtime("a", "crun", "amd64")]);
    u.item("one", "o", &["amd64"], cfg(), &[]);
    u.item("two", "o", &["amd64"], cfg(), &[]);
    u.run("one", 2, 1, &[]);
    u.run("two", 1, 0, &[]);
    u.converge();
    let ids: Vec<(String, u32, u32)> = u
        .snap
        .allocations
        .instances
        .values()
        .map(|p| {
            (
                format!("{}/{}", p.ident.item_id, p.ident.instance),
                p.uid,
                p.gid,
            )
        })
        .collect();
    assert_eq!(
        ids,
        vec![
            ("one/0".into(), 5000, 5000),
            ("one/1".into(), 5001, 5000),
            ("two/0".into(), 5002, 5001)
        ]
    );
    // Scaling "one" down: while one/1 is being stopped its UID stays taken, so a new item
    // started in the same plan gets the next one; once released, 5001 is reused.
    u.desired().instances[0].num_instances = 1;
    u.item("three", "o", &["amd64"], cfg(), &[]);
    u.run("three", 1, 0, &[]);
    u.converge();
    let three = u
        .snap
        .allocations
        .instances
        .values()
        .find(|p| p.ident.item_id == "three")
        .unwrap();
    assert_eq!((three.uid, three.gid), (5003, 5002));
    u.item("four", "o", &["amd64"], cfg(), &[]);
    u.run("four", 1, 0, &[]);
    u.converge();
    let four = u
        .snap
        .allocations
        .instances
        .values()
        .find(|p| p.ident.item_id == "four")
        .unwrap();
    assert_eq!(four.uid, 5001);
    assert_eq!(
        u.snap
            .allocations
            .instances
            .values()
            .find(|p| p.ident.item_id == "two")
            .unwrap()
            .uid,
        5002
    );
}

#[test]
fn rule_unit_subject_instances_run_only_when_iam_reports_the_subject() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 0, &[]);
    u.desired().subjects.push(DesiredSubject {
        id: "s".into(),
        subject_type: SubjectType::User,
        is_reported_from_unit: true,
    });
    assert!(u.placed().is_empty());
    assert_eq!(u.instances().conditions[0].reason, "SubjectNotOnUnit");
    u.snap.observed.unit_subjects.insert("s".into());
    assert_eq!(u.placed(), vec!["svc/0@a/crun"]);
}

#[test]
fn rule_existing_placements_are_kept_and_lost_nodes_rebalanced() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 0, &[]);
    u.converge();
    // A better node appears: nothing moves.
    u.node("b", 9000, 8 * GIB, vec![runtime("b", "crun", "amd64")]);
    assert!(u.instances().actions.is_empty());
    // Node a is lost: the instance goes to b with its UID.
    u.snap.observed.nodes.get_mut("a").unwrap().connection = Connection::Lost { since: 0 };
    assert_eq!(u.placed(), vec!["svc/0@b/crun"]);
    // A node that is only disconnected keeps its instances where they are.
    u.snap.observed.nodes.get_mut("a").unwrap().connection = Connection::Disconnected { since: 0 };
    assert!(u.instances().actions.is_empty());
}

#[test]
fn rule_balancing_disabled_pins_to_current_node_while_it_is_available() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.node("b", 1000, GIB, vec![runtime("b", "crun", "amd64")]);
    let pinned = ItemConfig {
        balancing_policy: BalancingPolicy::Disabled,
        ..cfg()
    };
    u.item("pin", "o", &["amd64"], pinned, &[]);
    u.item("free", "o", &["amd64"], cfg(), &[]);
    u.run("pin", 1, 0, &[]);
    u.run("free", 1, 0, &[]);
    u.config(vec![node_cfg("a", &["x"], 9), node_cfg("b", &["x"], 0)]);
    u.converge();
    assert!(
        u.snap
            .allocations
            .instances
            .values()
            .all(|p| p.node_id == "a")
    );
    // Both now need a label only b has: the free one moves, the pinned one stays and fails.
    u.config(vec![
        node_cfg("a", &["x"], 9),
        node_cfg("b", &["x", "y"], 0),
    ]);
    for r in &mut u.desired().instances {
        r.labels = vec!["y".into()];
    }
    assert_eq!(u.placed(), vec!["free/0@b/crun"]);
    assert_eq!(
        u.reasons(),
        vec!["NoMatchingLabels: no node with label y"],
        "the pinned instance is not moved"
    );
    // Its node is lost: a pin to an unavailable node does not hold, it is placed anew.
    u.snap.observed.nodes.get_mut("a").unwrap().connection = Connection::Lost { since: 0 };
    assert_eq!(u.placed(), vec!["free/0@b/crun", "pin/0@b/crun"]);
}

#[test]
fn rule_stop_instances_no_longer_desired_and_release_after() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 0, &[]);
    u.converge();
    u.desired().instances.clear();
    let plan = u.instances();
    assert!(
        matches!(&plan.actions[0], Action::StopInstance { reason, .. } if reason == "no longer desired")
    );
    u.converge();
    assert!(u.snap.allocations.instances.is_empty());
    assert!(
        u.snap.allocations.networks.is_empty(),
        "the last instance frees the network"
    );
}

// ---- network ----

#[test]
fn rule_one_16_subnet_per_network_from_172_17_skipping_host_routes() {
    let used = std::collections::BTreeSet::new();
    let route = Ipv4Net::parse("172.17.5.0/24").unwrap();
    let default = Ipv4Net::parse("0.0.0.0/0").unwrap();
    assert_eq!(
        network::free_subnet(&used, &[default]).unwrap().to_string(),
        "172.17.0.0/16"
    );
    assert_eq!(
        network::free_subnet(&used, &[route, default])
            .unwrap()
            .to_string(),
        "172.18.0.0/16"
    );
    let all: std::collections::BTreeSet<Ipv4Net> = network::pool().into_iter().collect();
    assert_eq!(all.len(), 15);
    assert_eq!(network::free_subnet(&all, &[]), None);
}

#[test]
fn rule_addresses_start_at_dot_2_and_skip_used() {
    let net = Ipv4Net::parse("172.18.0.0/16").unwrap();
    let mut used = std::collections::BTreeSet::new();
    assert_eq!(
        network::free_ip(&net, &used),
        Some(Ipv4Addr::new(172, 18, 0, 2))
    );
    used.insert(Ipv4Addr::new(172, 18, 0, 2));
    assert_eq!(
        network::free_ip(&net, &used),
        Some(Ipv4Addr::new(172, 18, 0, 3))
    );
}

#[test]
fn rule_vlan_ids_unique_in_1_to_4094() {
    let mut used: std::collections::BTreeSet<u16> = std::collections::BTreeSet::new();
    assert_eq!(network::free_vlan(&used), Some(1));
    used.extend(1..=4093);
    assert_eq!(network::free_vlan(&used), Some(4094));
    used.insert(4094);
    assert_eq!(network::free_vlan(&used), None);
}

#[test]
fn rule_dns_names_with_network_suffix_short_forms_and_hostname() {
    let names = network::dns_names(&InstanceIdent::new("item", "subj", 0), "net", Some("gw"));
    assert_eq!(
        names,
        vec![
            "gw",
            "0.subj.item.net",
            "0.subj.item",
            "subj.item.net",
            "subj.item"
        ]
    );
    let names = network::dns_names(&InstanceIdent::new("item", "subj", 3), "net", None);
    assert_eq!(names, vec!["3.subj.item.net", "3.subj.item"]);
}

#[test]
fn rule_network_per_owner_host_per_node_and_stable_allocations() {
    let mut u = Unit::new();
    u.node("a", 10_000, 4 * GIB, vec![runtime("a", "crun", "amd64")]);
    u.item("x", "owner1", &["amd64"], cfg(), &[]);
    u.item("y", "owner2", &["amd64"], cfg(), &[]);
    u.run("x", 2, 1, &[]);
    u.run("y", 1, 0, &[]);
    u.converge();
    let a = &u.snap.allocations;
    assert_eq!(a.networks["owner1"].subnet.to_string(), "172.17.0.0/16");
    assert_eq!(a.networks["owner2"].subnet.to_string(), "172.18.0.0/16");
    assert_eq!(
        (a.networks["owner1"].vlan_id, a.networks["owner2"].vlan_id),
        (1, 2)
    );
    assert_eq!(
        a.networks["owner1"].hosts["a"],
        Ipv4Addr::new(172, 17, 0, 2)
    );
    let before = u.snap.allocations.clone();
    // Releasing owner1's network and adding a third owner must not move owner2.
    u.desired().instances.retain(|r| r.item_id != "x");
    u.item("z", "owner3", &["amd64"], cfg(), &[]);
    u.run("z", 1, 0, &[]);
    u.converge();
    let after = &u.snap.allocations;
    assert_eq!(after.networks["owner2"], before.networks["owner2"]);
    let y0 = InstanceIdent::new("y", "s", 0);
    assert_eq!(after.instance_ips[&y0], before.instance_ips[&y0]);
    assert!(!after.networks.contains_key("owner1"));
}

#[test]
fn rule_migrated_instance_keeps_its_ip() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.item("svc", "o", &["amd64"], cfg(), &[]);
    u.run("svc", 1, 0, &[]);
    u.converge();
    let ident = InstanceIdent::new("svc", "s", 0);
    let ip = u.snap.allocations.instance_ips[&ident].ip;
    u.node("b", 1000, GIB, vec![runtime("b", "crun", "amd64")]);
    u.snap.observed.nodes.get_mut("a").unwrap().connection = Connection::Lost { since: 0 };
    u.converge();
    let addr = &u.snap.allocations.instance_ips[&ident];
    assert_eq!((addr.node_id.as_str(), addr.ip), ("b", ip));
}

#[test]
fn rule_firewall_rule_only_across_networks_and_pending_until_target_runs() {
    let mut u = Unit::new();
    u.node("a", 10_000, 4 * GIB, vec![runtime("a", "crun", "amd64")]);
    let client = ItemConfig {
        allowed_connections: vec!["server/8443/tcp".into(), "peer/80".into()],
        ..cfg()
    };
    u.item("client", "o1", &["amd64"], client, &[]);
    u.item("server", "o2", &["amd64"], cfg(), &["8443/tcp"]);
    u.item("peer", "o1", &["amd64"], cfg(), &["80/tcp"]);
    u.run("client", 1, 0, &[]);
    u.run("peer", 1, 0, &[]);
    u.converge();
    // server has no instance yet: pending; peer is in the same network: no rule.
    let conds = network::plan(&u.snap, 0).conditions;
    assert_eq!(conds.len(), 1);
    assert_eq!(conds[0].reason, "PendingConnection");
    assert!(u.snap.allocations.firewall.is_empty());
    u.run("server", 1, 0, &[]);
    u.converge();
    let client_ip = u.snap.allocations.instance_ips[&InstanceIdent::new("client", "s", 0)].ip;
    let server_ip = u.snap.allocations.instance_ips[&InstanceIdent::new("server", "s", 0)].ip;
    assert_eq!(
        u.snap.allocations.firewall[&InstanceIdent::new("client", "s", 0)],
        vec![FirewallRule {
            src_ip: client_ip,
            dst_ip: server_ip,
            dst_port: "8443".into(),
            proto: "tcp".into()
        }]
    );
    assert!(network::plan(&u.snap, 0).conditions.is_empty());
}

#[test]
fn rule_connection_strings_default_to_tcp() {
    assert_eq!(
        network::parse_connection("item/80"),
        Some(("item", "80", "tcp"))
    );
    assert_eq!(
        network::parse_connection("item/53/udp"),
        Some(("item", "53", "udp"))
    );
    assert_eq!(network::parse_connection("item"), None);
    assert!(network::exposes("8443", "8443", "tcp"));
    assert!(!network::exposes("8053/udp", "8053", "tcp"));
}

// ---- unit config, firmware, images ----

#[test]
fn rule_unitconfig_semver_equal_installed_lower_rejected_higher_installed() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![runtime("a", "crun", "amd64")]);
    u.config(vec![]);
    let mk = |v: &str| UnitConfig {
        format_version: "7".into(),
        version: Version::parse(v).unwrap(),
        nodes: vec![],
    };
    u.desired().unit_config = Some(mk("1.0.0"));
    assert!(
        !unitconfig::plan(&u.snap, 0)
            .actions
            .iter()
            .any(|a| matches!(a, Action::InstallUnitConfig { .. }))
    );
    u.desired().unit_config = Some(mk("0.9.9"));
    assert_eq!(
        unitconfig::plan(&u.snap, 0).conditions[0].reason,
        "UnitConfigRejected"
    );
    u.desired().unit_config = Some(mk("1.0.1-rc.1"));
    assert!(matches!(
        unitconfig::plan(&u.snap, 0).actions[0],
        Action::InstallUnitConfig { .. }
    ));
}

#[test]
fn rule_node_config_by_id_else_by_type_else_empty() {
    let uc = UnitConfig {
        format_version: "7".into(),
        version: Version::parse("2.0.0").unwrap(),
        nodes: vec![
            NodeConfig {
                node_type: "t".into(),
                labels: vec!["type".into()],
                ..NodeConfig::default()
            },
            NodeConfig {
                node_id: Some("n1".into()),
                node_type: "t".into(),
                labels: vec!["own".into()],
                ..NodeConfig::default()
            },
        ],
    };
    assert_eq!(uc.node_config("n1", "t").labels, vec!["own"]);
    assert_eq!(uc.node_config("n2", "t").labels, vec!["type"]);
    let empty = uc.node_config("n3", "other");
    assert!(empty.labels.is_empty());
    assert_eq!(empty.version.as_deref(), Some("2.0.0"));
}

#[test]
fn rule_node_config_pushed_to_connected_nodes_that_differ_or_report_error() {
    let mut u = Unit::new();
    u.node("a", 1000, GIB, vec![]).node_config = Some(NodeConfigStatus {
        version: "1.0.0".into(),
        error: None,
    });
    u.node("b", 1000, GIB, vec![]).node_config = Some(NodeConfigStatus {
        version: "1.0.0".into(),
        error: Some("bad".into()),
    });
    u.node("c", 1000, GIB, vec![]).node_config = Some(NodeConfigStatus {
        version: "0.1.0".into(),
        error: None,
    });
    u.node("d", 1000, GIB, vec![]).connection = Connection::Disconnected { since: 0 };
    u.config(vec![]);
    let pushed: Vec<String> = unitconfig::plan(&u.snap, 0)
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::PushNodeConfig { node_id, .. } => Some(node_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(pushed, vec!["b", "c"]);
}

#[test]
fn rule_removed_items_kept_for_ttl_then_deleted() {
    let mut u = Unit::new();
    let idx = digest(99);
    u.snap.observed.items.insert(
        ("old".into(), "1.0.0".into()),
        StoredItem {
            id: "old".into(),
            item_type: ItemType::Service,
            version: "1.0.0".into(),
            index_digest: idx.clone(),
            state: ItemState::Installed,
            removed_at: None,
        },
    );
    assert!(matches!(
        images::plan(&u.snap, 0).actions[..],
        [Action::RemoveItem { .. }]
    ));
    let item = u
        .snap
        .observed
        .items
        .get_mut(&("old".into(), "1.0.0".into()))
        .unwrap();
    item.state = ItemState::Removed;
    item.removed_at = Some(1000);
    let ttl = u.snap.settings.update_item_ttl_ms as i64;
    assert!(images::plan(&u.snap, 1000 + ttl - 1).actions.is_empty());
    assert!(matches!(
        images::plan(&u.snap, 1000 + ttl).actions[..],
        [Action::DeleteItem { .. }]
    ));
}
