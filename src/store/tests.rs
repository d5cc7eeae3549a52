//! Unit tests of the store: round trips, notifications, bad records, `Tx::apply` against
//! `project::apply`, reopening, and schema migrations.

use super::migrate::{META, VERSION_KEY};
use super::read::def;
use super::*;
use crate::model::*;
use crate::reconcilers::project;
use core::net::Ipv4Addr;
use redb::ReadableDatabase;
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::mpsc::error::TryRecvError;

fn digest(c: char) -> Digest {
    Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
}

fn ident(item: &str, n: u64) -> InstanceIdent {
    InstanceIdent::new(item, "subj/1", n)
}

fn node(id: &str) -> ObservedNode {
    ObservedNode {
        info: NodeInfo {
            node_id: id.to_string(),
            node_type: "main".to_string(),
            title: format!("node {id}"),
            max_dmips: 10_000,
            total_ram: 1 << 30,
            physical_ram: 1 << 30,
            os_info: OsInfo {
                os: "linux".to_string(),
                version: Some("6.1".to_string()),
                features: vec![],
            },
            cpus: vec![CpuInfo {
                model_name: "cortex".to_string(),
                num_cores: 4,
                num_threads: 4,
                arch_info: ArchInfo {
                    architecture: "arm64".to_string(),
                    variant: Some("v8".to_string()),
                },
                max_dmips: 10_000,
            }],
            partitions: vec![PartitionInfo {
                name: "storages".to_string(),
                types: vec!["storages".to_string()],
                total_size: 1 << 32,
                path: "/var/aos/storages".to_string(),
            }],
            attrs: BTreeMap::from([("MainNode".to_string(), String::new())]),
            state: NodeState::Provisioned,
            error: None,
        },
        sm: Some(SmInfo {
            runtimes: vec![RuntimeInfo {
                runtime_id: "crun-1".to_string(),
                runtime_type: "crun".to_string(),
                ..RuntimeInfo::default()
            }],
            resources: vec![],
        }),
        node_config: Some(NodeConfigStatus {
            version: "1.0.0".to_string(),
            error: None,
        }),
        connection: Connection::Disconnected { since: 42 },
        usage: Some(NodeUsage {
            cpu_dmips: 100,
            ram: 200,
        }),
    }
}

fn placement(id: &InstanceIdent, uid: u32) -> InstancePlacement {
    InstancePlacement {
        ident: id.clone(),
        node_id: "node0".to_string(),
        runtime_id: "crun-1".to_string(),
        runtime_type: "crun".to_string(),
        manifest_digest: digest('b'),
        version: "1.0.0".to_string(),
        uid,
        gid: 5001,
        requested: Reservation {
            cpu_dmips: 100,
            ram: 1 << 20,
            storage: 0,
            state: 0,
        },
        env: Vec::new(),
    }
}

fn unit_config() -> UnitConfig {
    UnitConfig {
        format_version: "7".to_string(),
        version: Version::parse("1.2.3").unwrap(),
        nodes: vec![NodeConfig {
            node_type: "main".to_string(),
            labels: vec!["fast".to_string()],
            priority: 3,
            ..NodeConfig::default()
        }],
    }
}

fn desired() -> DesiredState {
    DesiredState {
        correlation_id: Some("corr-1".to_string()),
        nodes: vec![DesiredNode {
            node_id: "node0".to_string(),
            state: DesiredNodeState::Provisioned,
        }],
        unit_config: Some(unit_config()),
        items: vec![DesiredItem {
            id: "svc/a".to_string(),
            item_type: ItemType::Service,
            version: "1.0.0".to_string(),
            owner_id: "sp1".to_string(),
            index_digest: Some(digest('a')),
        }],
        instances: vec![DesiredInstances {
            item_id: "svc/a".to_string(),
            subject_id: "subj/1".to_string(),
            priority: 1,
            num_instances: 2,
            labels: vec![],
        }],
        subjects: vec![],
        certificates: vec![],
        certificate_chains: vec![],
        env_overrides: Vec::new(),
    }
}

/// A snapshot with something in every table.
fn full_snapshot() -> Snapshot {
    let i0 = ident("svc/a", 0);
    let i1 = ident("svc/a", 1);
    let mut s = Snapshot {
        desired: Some(desired()),
        ..Snapshot::default()
    };
    s.observed.nodes.insert("node0".to_string(), node("node0"));
    s.observed
        .nodes
        .insert("node/1".to_string(), node("node/1"));
    s.observed.instances.insert(
        i0.clone(),
        ReportedInstance {
            ident: i0.clone(),
            node_id: "node0".to_string(),
            runtime_id: "crun-1".to_string(),
            version: "1.0.0".to_string(),
            state: InstanceState::Active,
            error: None,
            preinstalled: false,
        },
    );
    s.observed.unit_config = UnitConfigStatus {
        state: UnitConfigState::Installed,
        version: Some(Version::parse("1.2.3").unwrap()),
        error: None,
        config: Some(unit_config()),
    };
    s.observed.items.insert(
        ("svc/a".to_string(), "1.0.0".to_string()),
        StoredItem {
            id: "svc/a".to_string(),
            item_type: ItemType::Service,
            version: "1.0.0".to_string(),
            index_digest: digest('a'),
            state: ItemState::Installed,
            removed_at: None,
        },
    );
    s.observed.blobs = BTreeSet::from([digest('a'), digest('b'), digest('c')]);
    s.observed.unit_subjects = BTreeSet::from(["subj/1".to_string(), "subj2".to_string()]);
    s.observed.host_routes = vec![
        Ipv4Net::parse("192.168.0.0/16").unwrap(),
        Ipv4Net::parse("10.0.0.0/8").unwrap(),
    ];
    s.observed.network_params.insert(
        ident("svc", 0),
        InstanceNetworkParams {
            hosts: vec!["svc-host".into()],
            exposed_ports: vec!["80/tcp".into()],
            allowed_connections: vec!["other/53/udp".into()],
        },
    );
    s.catalogue.images.insert(
        digest('a'),
        ItemImage {
            index_digest: digest('a'),
            manifests: vec![ManifestInfo {
                digest: digest('b'),
                config_digest: digest('c'),
                item_config_digest: None,
                layers: vec![],
                image: ImageConfig {
                    architecture: "arm64".to_string(),
                    os: "linux".to_string(),
                    exposed_ports: vec!["80/tcp".to_string()],
                    ..ImageConfig::default()
                },
                item_config: Some(ItemConfig::default()),
            }],
        },
    );
    s.allocations
        .instances
        .insert(i0.clone(), placement(&i0, 5000));
    s.allocations
        .instances
        .insert(i1.clone(), placement(&i1, 5001));
    s.allocations.gids.insert("svc/a".to_string(), 5001);
    s.allocations.networks.insert(
        "sp1".to_string(),
        NetworkAllocation {
            subnet: Ipv4Net::parse("172.17.0.0/16").unwrap(),
            vlan_id: 7,
            hosts: BTreeMap::from([("node0".to_string(), Ipv4Addr::new(172, 17, 0, 1))]),
            sm_hosts: Default::default(),
        },
    );
    s.allocations.instance_ips.insert(
        i0.clone(),
        InstanceAddress {
            network_id: "sp1".to_string(),
            node_id: "node0".to_string(),
            ip: Ipv4Addr::new(172, 17, 0, 2),
        },
    );
    s.allocations.firewall.insert(
        i0,
        vec![FirewallRule {
            src_ip: Ipv4Addr::new(172, 17, 0, 3),
            dst_ip: Ipv4Addr::new(172, 17, 0, 2),
            dst_port: "80".to_string(),
            proto: "tcp".to_string(),
        }],
    );
    s.settings = PlanSettings {
        update_item_ttl_ms: 1234,
        uid_first: 6000,
        uid_end: 7000,
        ..PlanSettings::default()
    };
    s
}

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cm.redb")).unwrap();
    (dir, store)
}

fn drain(rx: &mut UnboundedReceiver<Vec<&'static str>>) -> Vec<Vec<&'static str>> {
    let mut out = Vec::new();
    while let Ok(n) = rx.try_recv() {
        out.push(n);
    }
    out
}

#[test]
fn every_table_round_trips_through_typed_setters() {
    let (_dir, store) = open_temp();
    let mut want = full_snapshot();
    let cond = Condition {
        object: "instance svc/a/subj/0".to_string(),
        reason: "NoNode".to_string(),
        message: "no node fits".to_string(),
        since: Some(99),
    };
    let progress = UpdateProgress {
        state: "DOWNLOADING".to_string(),
        correlation_id: Some("corr-1".to_string()),
        ..UpdateProgress::default()
    };
    want.progress = progress.clone();
    store
        .write(|tx| {
            tx.set_desired(want.desired.as_ref())?;
            for n in want.observed.nodes.values() {
                tx.put_node(n)?;
            }
            for r in want.observed.instances.values() {
                tx.put_reported_instance(r)?;
            }
            tx.set_unit_config_status(&want.observed.unit_config)?;
            for i in want.observed.items.values() {
                tx.put_item(i)?;
            }
            for b in &want.observed.blobs {
                tx.add_blob(b)?;
            }
            tx.set_unit_subjects(&want.observed.unit_subjects)?;
            tx.set_host_routes(&want.observed.host_routes)?;
            for (k, v) in &want.observed.network_params {
                tx.set_network_params(k, v)?;
            }
            for img in want.catalogue.images.values() {
                tx.put_catalogue_image(img)?;
            }
            let a = &want.allocations;
            for p in a.instances.values() {
                tx.put_placement(p)?;
            }
            for (item, gid) in &a.gids {
                tx.set_gid(item, *gid)?;
            }
            for (id, n) in &a.networks {
                tx.put_network(id, n)?;
            }
            for (id, ip) in &a.instance_ips {
                tx.put_instance_ip(id, ip)?;
            }
            for (id, rules) in &a.firewall {
                tx.set_firewall(id, rules)?;
            }
            tx.set_settings(&want.settings)?;
            tx.put_condition("instance/svc/a", &cond)?;
            tx.set_update_progress(&progress)?;
            // The write transaction reads its own writes.
            assert_eq!(tx.snapshot()?, want);
            Ok(())
        })
        .unwrap();

    assert_eq!(store.snapshot().unwrap(), want);
    assert_eq!(
        store.conditions().unwrap(),
        BTreeMap::from([("instance/svc/a".to_string(), cond)])
    );
    assert_eq!(store.update_progress().unwrap(), Some(progress));

    // Single-record readers agree with the snapshot.
    let i0 = ident("svc/a", 0);
    store
        .read(|r| {
            assert_eq!(
                r.node("node/1")?,
                want.observed.nodes.get("node/1").cloned()
            );
            assert_eq!(
                r.placement(&i0)?,
                want.allocations.instances.get(&i0).cloned()
            );
            assert_eq!(
                r.instance_ip(&i0)?,
                want.allocations.instance_ips.get(&i0).cloned()
            );
            assert_eq!(
                r.firewall(&i0)?,
                want.allocations.firewall.get(&i0).cloned()
            );
            assert_eq!(
                r.network("sp1")?,
                want.allocations.networks.get("sp1").cloned()
            );
            assert_eq!(r.gid("svc/a")?, Some(5001));
            assert!(r.has_blob(&digest('a'))?);
            assert!(!r.has_blob(&digest('d'))?);
            assert!(r.item("svc/a", "1.0.0")?.is_some());
            assert!(r.catalogue_image(&digest('a'))?.is_some());
            assert!(r.reported_instance(&i0)?.is_some());
            assert_eq!(r.reported_instance(&ident("svc/a", 1))?, None);
            Ok(())
        })
        .unwrap();

    // Removing everything again empties the snapshot.
    store
        .write(|tx| {
            tx.set_snapshot(&Snapshot::default())?;
            tx.remove_condition("instance/svc/a")?;
            Ok(())
        })
        .unwrap();
    let empty = store.snapshot().unwrap();
    assert_eq!(empty.observed, ObservedUnit::default());
    assert_eq!(empty.allocations, Allocations::default());
    assert_eq!(empty.desired, None);
    assert!(store.conditions().unwrap().is_empty());
}

#[test]
fn fresh_store_reads_as_the_default_snapshot() {
    let (_dir, store) = open_temp();
    assert_eq!(store.snapshot().unwrap(), Snapshot::default());
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(store.update_progress().unwrap(), None);
}

#[test]
fn set_snapshot_round_trips_and_rewriting_it_announces_nothing() {
    let (_dir, store) = open_temp();
    let want = full_snapshot();
    let mut rx = store.subscribe();
    store.write(|tx| tx.set_snapshot(&want)).unwrap();
    assert_eq!(store.snapshot().unwrap(), want);
    let mut all_but_meta: Vec<&str> = tables::ALL
        .iter()
        .copied()
        .filter(|t| {
            ![
                tables::CONDITIONS,
                tables::UPDATE_PROGRESS,
                tables::JOURNAL_CURSOR,
            ]
            .contains(t)
        })
        .collect();
    all_but_meta.sort();
    assert_eq!(drain(&mut rx), vec![all_but_meta]);

    store.write(|tx| tx.set_snapshot(&want)).unwrap();
    assert_eq!(drain(&mut rx), Vec::<Vec<&str>>::new());
}

#[test]
fn set_snapshot_refuses_a_key_that_is_not_the_records_identity() {
    let (_dir, store) = open_temp();
    let mut s = Snapshot::default();
    s.observed.nodes.insert("other".to_string(), node("node0"));
    let err = store.write(|tx| tx.set_snapshot(&s)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Mismatch { table: "nodes", key, .. } if key == "other"),
        "{err}"
    );
    assert_eq!(store.snapshot().unwrap(), Snapshot::default());
}

#[test]
fn notifications_name_exactly_the_changed_tables() {
    let (_dir, store) = open_temp();
    let mut rx = store.subscribe();
    let mut rx2 = store.subscribe();
    let dropped = store.subscribe();
    drop(dropped);

    store.write(|tx| tx.put_node(&node("node0"))).unwrap();
    assert_eq!(drain(&mut rx), vec![vec![tables::NODES]]);

    // The same record again changes nothing and announces nothing.
    store.write(|tx| tx.put_node(&node("node0"))).unwrap();
    assert_eq!(drain(&mut rx), Vec::<Vec<&str>>::new());

    // Several tables in one event: one notification, sorted names.
    let i0 = ident("svc/a", 0);
    store
        .write(|tx| {
            tx.put_placement(&placement(&i0, 5000))?;
            tx.set_desired(Some(&desired()))?;
            tx.put_node(&node("node0"))?; // unchanged: not named
            Ok(())
        })
        .unwrap();
    assert_eq!(
        drain(&mut rx),
        vec![vec![tables::DESIRED, tables::PLACEMENTS]]
    );

    // Removing what is absent, and reading, change nothing.
    let n = store
        .write(|tx| {
            tx.remove_node("nope")?;
            tx.remove_condition("nope")?;
            tx.set_desired(Some(&desired()))?;
            Ok(tx.nodes()?.len())
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(drain(&mut rx), Vec::<Vec<&str>>::new());

    // A failed event writes nothing and announces nothing.
    let err = store
        .write(|tx| -> Result<(), StoreError> {
            tx.remove_node("node0")?;
            Err(StoreError::UnknownTable("boom".to_string()))
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownTable(_)));
    assert_eq!(drain(&mut rx), Vec::<Vec<&str>>::new());
    assert!(
        store
            .snapshot()
            .unwrap()
            .observed
            .nodes
            .contains_key("node0")
    );

    // Conditions and update progress are tables like the others.
    store
        .write(|tx| {
            tx.put_condition("k", &Condition::new("node node0", "Lost", "gone"))?;
            tx.set_update_progress(&UpdateProgress {
                state: "NO_UPDATE".to_string(),
                correlation_id: None,
                ..UpdateProgress::default()
            })
        })
        .unwrap();
    assert_eq!(
        drain(&mut rx),
        vec![vec![tables::CONDITIONS, tables::UPDATE_PROGRESS]]
    );

    // Every live subscriber got every notification.
    assert_eq!(drain(&mut rx2).len(), 3);
    assert!(matches!(rx2.try_recv(), Err(TryRecvError::Empty)));
}

/// Writes raw bytes into a table of a closed store, bypassing the typed API.
fn poke(path: &std::path::Path, table: &str, key: &str, bytes: &[u8]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(def(table))
        .unwrap()
        .insert(key, bytes)
        .unwrap();
    txn.commit().unwrap();
}

#[test]
fn a_corrupt_record_is_reported_by_table_and_key_and_the_rest_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    {
        let store = Store::open(&path).unwrap();
        store
            .write(|tx| {
                tx.put_node(&node("node0"))?;
                tx.set_desired(Some(&desired()))?;
                tx.put_condition("c", &Condition::new("x", "Y", "z"))
            })
            .unwrap();
    }
    poke(&path, tables::NODES, "node9", b"\x00garbage{");

    let store = Store::open(&path).unwrap();
    let err = store.snapshot().unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, StoreError::BadRecord { table: "nodes", key, .. } if key == "node9"),
        "{msg}"
    );
    assert!(msg.contains("nodes") && msg.contains("node9"), "{msg}");

    // Everything else still reads, including the good record of the same table.
    store
        .read(|r| {
            assert_eq!(r.desired()?, Some(desired()));
            assert_eq!(r.node("node0")?, Some(node("node0")));
            assert_eq!(r.conditions()?.len(), 1);
            assert!(r.allocations().is_ok());
            Ok(())
        })
        .unwrap();
    // A write that does not touch the bad table still works.
    store.write(|tx| tx.set_gid("svc", 5005)).unwrap();

    // The bad record can be cleared by name, after which the snapshot reads again.
    assert!(
        store
            .write(|tx| tx.remove_record("nodes", "node9"))
            .unwrap()
    );
    assert_eq!(store.snapshot().unwrap().observed.nodes.len(), 1);
    assert!(matches!(
        store.write(|tx| tx.remove_record("nope", "x")),
        Err(StoreError::UnknownTable(_))
    ));
}

#[test]
fn a_bad_key_or_a_record_under_the_wrong_key_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    drop(Store::open(&path).unwrap());
    let addr = serde_json::to_vec(&InstanceAddress {
        network_id: "sp1".to_string(),
        node_id: "node0".to_string(),
        ip: Ipv4Addr::new(10, 0, 0, 2),
    })
    .unwrap();
    poke(&path, tables::INSTANCE_IPS, "not-an-ident", &addr);
    let store = Store::open(&path).unwrap();
    let err = store.snapshot().unwrap_err();
    assert!(
        matches!(&err, StoreError::BadRecord { table: "instance_ips", key, .. } if key == "not-an-ident"),
        "{err}"
    );
    drop(store);

    let i0 = ident("svc/a", 0);
    let p = serde_json::to_vec(&placement(&i0, 5000)).unwrap();
    poke(
        &path,
        tables::INSTANCE_IPS,
        "svc%2Fa/subj%2F1/00000000000000000000",
        &addr,
    );
    let store = Store::open(&path).unwrap();
    store
        .write(|tx| tx.remove_record("instance_ips", "not-an-ident"))
        .unwrap();
    assert_eq!(store.snapshot().unwrap().allocations.instance_ips.len(), 1);
    drop(store);

    poke(
        &path,
        tables::PLACEMENTS,
        "svc%2Fa/subj%2F1/00000000000000000001",
        &p,
    );
    let store = Store::open(&path).unwrap();
    let err = store.snapshot().unwrap_err();
    assert!(
        matches!(&err, StoreError::BadRecord { table: "placements", key, .. } if key.ends_with("01")),
        "{err}"
    );
}

fn start(id: &InstanceIdent, uid: u32) -> Action {
    Action::StartInstance(Box::new(InstanceStart {
        placement: placement(id, uid),
        item_type: ItemType::Service,
        owner_id: "sp1".to_string(),
        priority: 1,
        storage_quota: 0,
        state_quota: 0,
        alert_rules: None,
    }))
}

#[test]
fn tx_apply_gives_the_same_snapshot_as_project_apply() {
    let (_dir, store) = open_temp();
    let mut base = full_snapshot();
    base.allocations = Allocations::default();
    base.observed.unit_config = UnitConfigStatus::default();
    store.write(|tx| tx.set_snapshot(&base)).unwrap();

    let i0 = ident("svc/a", 0);
    let i1 = ident("svc/a", 1);
    let rule = FirewallRule {
        src_ip: Ipv4Addr::new(172, 18, 0, 3),
        dst_ip: Ipv4Addr::new(172, 18, 0, 2),
        dst_port: "80".to_string(),
        proto: "tcp".to_string(),
    };
    let actions = vec![
        start(&i0, 5000),
        start(&i1, 5001),
        Action::AllocateNetwork {
            network_id: "sp1".to_string(),
            subnet: Ipv4Net::parse("172.18.0.0/16").unwrap(),
            vlan_id: 12,
        },
        // A second allocation of the same network keeps the first (or_insert).
        Action::AllocateNetwork {
            network_id: "sp1".to_string(),
            subnet: Ipv4Net::parse("172.19.0.0/16").unwrap(),
            vlan_id: 13,
        },
        Action::AttachHost {
            network_id: "sp1".to_string(),
            node_id: "node0".to_string(),
            ip: Ipv4Addr::new(172, 18, 0, 1),
        },
        Action::AssignInstanceIp {
            ident: i0.clone(),
            network_id: "sp1".to_string(),
            node_id: "node0".to_string(),
            ip: Ipv4Addr::new(172, 18, 0, 2),
            dns_names: vec!["a.sp1".to_string()],
        },
        Action::AssignInstanceIp {
            ident: i1.clone(),
            network_id: "sp1".to_string(),
            node_id: "node0".to_string(),
            ip: Ipv4Addr::new(172, 18, 0, 3),
            dns_names: vec![],
        },
        Action::SetFirewallRules {
            ident: i0.clone(),
            rules: vec![rule],
        },
        Action::StopInstance {
            ident: i1.clone(),
            node_id: "node0".to_string(),
            runtime_id: "crun-1".to_string(),
            reason: "not desired".to_string(),
        },
        Action::ReleaseInstanceIp { ident: i1.clone() },
        Action::ReleaseInstance { ident: i1 },
        Action::DetachHost {
            network_id: "sp1".to_string(),
            node_id: "node0".to_string(),
        },
        Action::ReleaseNetwork {
            network_id: "sp1".to_string(),
        },
        Action::ReleaseInstance { ident: i0 },
        Action::DownloadBlob {
            digest: digest('e'),
            for_items: vec!["svc/a".to_string()],
        },
        Action::InstallItem {
            item_id: "svc/b".to_string(),
            item_type: ItemType::Service,
            version: "2.0.0".to_string(),
            index_digest: digest('e'),
        },
        Action::RemoveItem {
            item_id: "svc/b".to_string(),
            version: "2.0.0".to_string(),
        },
        Action::DeleteItem {
            item_id: "svc/b".to_string(),
            version: "2.0.0".to_string(),
        },
        Action::DeleteBlob {
            digest: digest('e'),
        },
        Action::InstallUnitConfig {
            version: "1.2.3".to_string(),
        },
        Action::PushNodeConfig {
            node_id: "node0".to_string(),
            version: "1.2.3".to_string(),
        },
        Action::SetNodeState {
            node_id: "node0".to_string(),
            state: DesiredNodeState::Paused,
        },
    ];

    let mut rx = store.subscribe();
    let mut expected = base;
    for (step, action) in actions.iter().enumerate() {
        let now = 1_000 + step as i64;
        project::apply(&mut expected, action, now);
        store.write(|tx| tx.apply(action, now)).unwrap();
        assert_eq!(store.snapshot().unwrap(), expected, "after {action}");
        let notes = drain(&mut rx);
        match action {
            Action::StartInstance(_) if step == 0 => {
                assert_eq!(notes, vec![vec![tables::GIDS, tables::PLACEMENTS]])
            }
            // The gid is already there for the second instance of the item.
            Action::StartInstance(_) => assert_eq!(notes, vec![vec![tables::PLACEMENTS]]),
            Action::AllocateNetwork { vlan_id: 13, .. } | Action::StopInstance { .. } => {
                assert_eq!(notes, Vec::<Vec<&str>>::new(), "{action}")
            }
            Action::AllocateNetwork { .. } => assert_eq!(notes, vec![vec![tables::NETWORKS]]),
            Action::AssignInstanceIp { .. } => {
                assert_eq!(notes, vec![vec![tables::INSTANCE_IPS]])
            }
            _ => assert_eq!(notes.len(), 1, "{action}"),
        }
    }
    // The sequence really did exercise the allocations it released.
    assert!(expected.allocations.instances.is_empty());
    assert_eq!(
        expected.observed.nodes["node0"].info.state,
        NodeState::Paused
    );
}

#[test]
fn state_survives_closing_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    let want = full_snapshot();
    {
        let store = Store::open(&path).unwrap();
        store
            .write(|tx| {
                tx.set_snapshot(&want)?;
                tx.put_condition("k", &Condition::new("a", "B", "c"))
            })
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.snapshot().unwrap(), want);
    assert_eq!(store.conditions().unwrap().len(), 1);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn journal_cursor_is_saved_unannounced_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(store.journal_cursor().unwrap(), None);
        let mut rx = store.subscribe();
        store.write(|tx| tx.set_journal_cursor("s=1;i=2")).unwrap();
        store.write(|tx| tx.set_journal_cursor("s=1;i=3")).unwrap();
        assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("s=1;i=3"));
        // Committed, but nobody is woken for it.
        assert_eq!(drain(&mut rx), Vec::<Vec<&str>>::new());
        // Written together with announced tables, only those are announced.
        store
            .write(|tx| {
                tx.set_journal_cursor("s=1;i=4")?;
                tx.put_condition("k", &Condition::new("a", "B", "c"))
            })
            .unwrap();
        assert_eq!(drain(&mut rx), vec![vec![tables::CONDITIONS]]);
        // Not part of a snapshot.
        assert_eq!(store.snapshot().unwrap(), Snapshot::default());
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("s=1;i=4"));
}

#[test]
fn a_version_2_store_from_before_the_journal_cursor_table_gains_it_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    {
        // A version-2 file as an older binary wrote it: every table but the new one.
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(VERSION_KEY, SCHEMA_VERSION)
            .unwrap();
        for name in tables::ALL {
            if name != tables::JOURNAL_CURSOR {
                txn.open_table(def(name)).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(store.journal_cursor().unwrap(), None);
    store.write(|tx| tx.set_journal_cursor("c")).unwrap();
    assert_eq!(store.journal_cursor().unwrap().as_deref(), Some("c"));
}

#[test]
fn the_error_type_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<StoreError>();
    assert_send_sync::<Store>();
}

// --- migrations ------------------------------------------------------------------------------

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// Writes a version-1 store by hand: everything in `kv`, keys prefixed by kind.
fn write_v1(path: &std::path::Path, version: u32, records: &[(&str, Vec<u8>)]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert(VERSION_KEY, version)
        .unwrap();
    {
        let mut kv = txn.open_table(def("kv")).unwrap();
        for (k, v) in records {
            kv.insert(*k, v.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
}

#[test]
fn a_version_1_store_is_migrated_to_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    let i0 = InstanceIdent::new("svc/a", "subj/1", 0);
    write_v1(
        &path,
        1,
        &[
            ("desired", json(&desired())),
            ("node/node0", json(&node("node0"))),
            (
                "placement/svc%2Fa/subj%2F1/00000000000000000000",
                json(&placement(&i0, 5000)),
            ),
            ("gid/svc/a", json(&5001u32)),
            (
                "condition/instance/svc/a",
                json(&Condition::new("a", "B", "c")),
            ),
        ],
    );

    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    let snap = store.snapshot().unwrap();
    assert_eq!(snap.desired, Some(desired()));
    assert_eq!(snap.observed.nodes.get("node0"), Some(&node("node0")));
    assert_eq!(
        snap.allocations.instances.get(&i0),
        Some(&placement(&i0, 5000))
    );
    assert_eq!(snap.allocations.gids.get("svc/a"), Some(&5001));
    assert_eq!(store.conditions().unwrap().len(), 1);
    drop(store);

    // The kv table is gone, and reopening a migrated store changes nothing.
    let db = redb::Database::create(&path).unwrap();
    let names: Vec<String> = {
        use redb::TableHandle;
        let txn = db.begin_read().unwrap();
        txn.list_tables()
            .unwrap()
            .map(|h| h.name().to_string())
            .collect()
    };
    assert!(!names.iter().any(|n| n == "kv"), "{names:?}");
    assert!(names.iter().any(|n| n == tables::PLACEMENTS), "{names:?}");
    drop(db);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.snapshot().unwrap(), snap);
}

#[test]
fn a_version_1_record_of_unknown_kind_stops_the_upgrade_and_keeps_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    write_v1(
        &path,
        1,
        &[
            ("desired", serde_json::to_vec(&desired()).unwrap()),
            ("mystery/x", b"{}".to_vec()),
        ],
    );
    let err = Store::open(&path).err().unwrap();
    assert!(
        matches!(&err, StoreError::BadRecord { table: "kv", key, .. } if key == "mystery/x"),
        "{err}"
    );
    // The failed upgrade left version 1 in place.
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let v = txn
        .open_table(META)
        .unwrap()
        .get(VERSION_KEY)
        .unwrap()
        .unwrap()
        .value();
    assert_eq!(v, 1);
}

#[test]
fn a_store_newer_than_the_binary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    write_v1(&path, 99, &[]);
    let err = Store::open(&path).err().unwrap();
    assert!(
        matches!(
            err,
            StoreError::SchemaTooNew {
                found: 99,
                supported: SCHEMA_VERSION
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("99") && msg.contains("newer"), "{msg}");
}

#[test]
fn tables_without_a_schema_version_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    poke(&path, "something", "k", b"v");
    let err = Store::open(&path).err().unwrap();
    assert!(
        matches!(&err, StoreError::NoSchemaVersion { tables } if tables == "something"),
        "{err}"
    );
}

#[test]
fn replacing_the_unit_subjects_clears_an_undecodable_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cm.redb");
    drop(Store::open(&path).unwrap());
    poke(&path, tables::UNIT_SUBJECTS, "zzz", b"not json");
    let store = Store::open(&path).unwrap();
    assert!(store.snapshot().is_err());
    let subjects = BTreeSet::from(["s1".to_string()]);
    store.write(|tx| tx.set_unit_subjects(&subjects)).unwrap();
    assert_eq!(store.snapshot().unwrap().observed.unit_subjects, subjects);
}

#[test]
fn cached_snapshots_always_equal_a_full_read() {
    let (_dir, store) = open_temp();
    let full = |s: &Store| s.read(|r| r.snapshot()).unwrap();
    assert_eq!(store.snapshot().unwrap(), full(&store));
    store.write(|tx| tx.set_snapshot(&full_snapshot())).unwrap();
    assert_eq!(store.snapshot().unwrap(), full(&store));
    // Changes to one table at a time, durable and not, each followed by a snapshot.
    for n in 0..20u32 {
        let id = ident("cache", u64::from(n));
        match n % 4 {
            0 => store
                .write(|tx| tx.put_placement(&placement(&id, 6000 + n)))
                .unwrap(),
            1 => store
                .write_observed(|tx| {
                    tx.put_reported_instance(&ReportedInstance {
                        ident: id.clone(),
                        node_id: "n1".into(),
                        runtime_id: "r".into(),
                        version: "1".into(),
                        state: InstanceState::Active,
                        error: None,
                        preinstalled: false,
                    })
                })
                .unwrap(),
            2 => store
                .write(|tx| tx.add_blob(&digest('f')).map(|_| ()))
                .unwrap(),
            _ => store.write(|tx| tx.set_desired(None)).unwrap(),
        }
        assert_eq!(store.snapshot().unwrap(), full(&store), "after write {n}");
    }
    // The tables refreshed record by record: puts, changes and removals, several writes
    // between two snapshots, and writes of more records than are remembered one by one.
    let reported = |id: &InstanceIdent, state: InstanceState| ReportedInstance {
        ident: id.clone(),
        node_id: "n1".into(),
        runtime_id: "r".into(),
        version: "1".into(),
        state,
        error: None,
        preinstalled: false,
    };
    for (round, writes) in [1usize, 3, 300].into_iter().enumerate() {
        let held = store.shared_snapshot().unwrap();
        let as_held = (*held).clone();
        for n in 0..writes {
            let id = ident("keyed", (n % 40) as u64);
            let node_id = format!("keyed-node{}", n % 7);
            match (n + round) % 6 {
                0 => store
                    .write_observed(|tx| {
                        tx.put_reported_instance(&reported(&id, InstanceState::Failed))
                    })
                    .unwrap(),
                1 => store
                    .write_observed(|tx| tx.remove_reported_instance(&id).map(|_| ()))
                    .unwrap(),
                2 => store
                    .write(|tx| tx.put_placement(&placement(&id, 7000 + n as u32)))
                    .unwrap(),
                3 => store
                    .write(|tx| tx.remove_placement(&id).map(|_| ()))
                    .unwrap(),
                4 => store.write(|tx| tx.put_node(&node(&node_id))).unwrap(),
                _ => store
                    .write(|tx| tx.remove_node(&node_id).map(|_| ()))
                    .unwrap(),
            }
        }
        // One transaction changing more records than are remembered one by one.
        store
            .write_observed(|tx| {
                for n in 0..300u64 {
                    tx.put_reported_instance(&reported(&ident("bulk", n), InstanceState::Active))?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(store.snapshot().unwrap(), full(&store), "round {round}");
        // A reader holding the old snapshot still sees it unchanged.
        assert_eq!(*held, as_held, "round {round}");
        assert_ne!(as_held, full(&store), "round {round}");
    }
    // A write whose closure fails changes nothing, cached or not.
    let before = store.snapshot().unwrap();
    let failed: Result<(), StoreError> = store.write(|tx| {
        tx.put_placement(&placement(&ident("gone", 0), 1))?;
        Err(StoreError::UnknownTable("simulated failure".into()))
    });
    assert!(failed.is_err());
    assert_eq!(store.snapshot().unwrap(), before);
    assert_eq!(full(&store), before);
}
