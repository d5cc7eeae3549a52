//! SMService over loopback with simulated SMs (reference grpc-interfaces.md 6.5): connection,
//! node config, logs, instances, monitoring, cloud status, alerts, blobs; convergence of the
//! example unit; a dropped node; malformed messages.

mod common;

use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::api::proto::servicemanager::v5::sm_incoming_messages::SmIncomingMessage as In;
use aos_cm::api::proto::servicemanager::v5::sm_outgoing_messages::SmOutgoingMessage as Out;
use aos_cm::api::sm::SmConfig;
use aos_cm::model::*;
use aos_cm::sim::sm::SimOptions;
use common::*;
use std::time::Duration;

fn node_of(snap: &Snapshot, item_prefix: &str, i: u64) -> (String, String) {
    let p = snap
        .allocations
        .instances
        .values()
        .find(|p| p.ident.item_id.starts_with(item_prefix) && p.ident.instance == i)
        .unwrap_or_else(|| panic!("no placement of {item_prefix}/{i}"));
    (p.node_id.clone(), p.runtime_type.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_unit_converges_with_three_simulated_nodes() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let main = unit.sim("main", SimOptions::default()).await;
    let s1 = unit.sim("secondary-1", SimOptions::default()).await;
    let s2 = unit.sim("secondary-2", SimOptions::default()).await;

    let snap = unit.wait_for("convergence", 30, converged).await;
    // Placement as the example README expects.
    assert_eq!(
        node_of(&snap, "8f3a6b2c", 0),
        ("main".into(), "crun".into())
    );
    assert_eq!(
        node_of(&snap, "2d7c4e1a", 0),
        ("main".into(), "crun".into())
    );
    assert_eq!(
        node_of(&snap, "2d7c4e1a", 1),
        ("main".into(), "crun".into())
    );
    assert_eq!(
        node_of(&snap, "c41e9d7b", 0),
        ("secondary-1".into(), "runc".into())
    );
    assert_eq!(
        node_of(&snap, "e7b2a5d9", 0),
        ("secondary-1".into(), "boot".into())
    );
    assert_eq!(
        node_of(&snap, "e7b2a5d9", 1),
        ("secondary-2".into(), "boot".into())
    );
    // The nodes run exactly that, with the UIDs allocated.
    assert_eq!(main.running().len(), 3);
    assert_eq!(s1.running().len(), 2);
    assert_eq!(s2.running().len(), 1);
    let gw = InstanceIdent::new(
        "8f3a6b2c-0d4e-4a71-b5c9-6e2d1f8a3b45",
        "41a8f2c6-5e9d-4b73-a01e-6d3c8b2f7e95",
        0,
    );
    assert_eq!(main.running()[&gw].uid, snap.allocations.instances[&gw].uid);
    // Node configs were checked and set on every node.
    for sim in [&main, &s1, &s2] {
        let st = sim.state.lock().unwrap();
        assert_eq!(st.node_config_version, "1.2.0");
        let check = st
            .received
            .iter()
            .position(|k| k == "CheckNodeConfig")
            .unwrap();
        let set = st
            .received
            .iter()
            .position(|k| k == "SetNodeConfig")
            .unwrap();
        assert!(check < set);
        assert_eq!(
            st.received[0], "ConnectionStatus",
            "ConnectionStatus comes first"
        );
    }
    let s1_cfg: serde_json::Value =
        serde_json::from_str(&s1.state.lock().unwrap().node_config).unwrap();
    assert_eq!(s1_cfg["labels"], serde_json::json!(["edge", "camera"]));
    assert_eq!(s1_cfg["priority"], 60);
    // No open conditions.
    let conds = unit.store.conditions().unwrap();
    assert!(conds.is_empty(), "{conds:#?}");
    // Node config status as the node reports it.
    let st = unit.sm.get_node_config_status("secondary-2").await.unwrap();
    assert_eq!(
        (st.state.as_str(), st.version.as_str()),
        ("installed", "1.2.0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_logs_monitoring_alerts_cloud_status_and_blobs() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let opts = SimOptions {
        log_parts: 3,
        ..SimOptions::default()
    };
    let main = unit.sim("main", opts).await;
    unit.wait_for("main registered", 10, |s| {
        s.observed.nodes["main"]
            .sm
            .as_ref()
            .is_some_and(|sm| sm.runtimes.len() == 2)
            && s.observed.nodes["main"].is_connected()
    })
    .await;

    // Multi-part log data goes to the intake.
    unit.sm
        .send(
            "main",
            In::SystemLogRequest(pb::SystemLogRequest {
                correlation_id: "log-7".into(),
                from: None,
                till: None,
            }),
        )
        .await
        .unwrap();
    // Average monitoring is a synchronous request; its reply proves the log parts before it
    // were handled (one stream, in order).
    let avg = unit.sm.get_average_monitoring("main").await.unwrap();
    assert!(avg.node_monitoring.unwrap().cpu >= 1000);
    let logs = unit.sm.intake().drain_logs();
    assert_eq!(logs.len(), 3);
    assert!(
        logs.iter()
            .all(|(n, l)| n == "main" && l.correlation_id == "log-7" && l.part_count == 3)
    );
    assert_eq!(
        logs.iter().map(|(_, l)| l.part).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // Instant monitoring and alerts; an identical alert is dropped and counted.
    let alert = pb::Alert {
        timestamp: None,
        alert_item: Some(pb::alert::AlertItem::CoreAlert(pb::CoreAlert {
            core_component: "SM".into(),
            message: "restarted".into(),
        })),
    };
    for m in [
        Out::InstantMonitoring(pb::InstantMonitoring {
            node_monitoring: Some(pb::MonitoringData {
                ram: 5,
                cpu: 6,
                ..Default::default()
            }),
            instances_monitoring: vec![],
        }),
        Out::Alert(alert.clone()),
        Out::Alert(alert),
    ] {
        assert!(
            main.send_raw(pb::SmOutgoingMessages {
                sm_outgoing_message: Some(m)
            })
            .await
        );
    }
    unit.sm.get_average_monitoring("main").await.unwrap();
    assert_eq!(unit.sm.intake().drain_node_monitoring()["main"][0].cpu, 6);
    assert_eq!(unit.sm.intake().drain_alerts().len(), 1);
    assert_eq!(unit.sm.intake().counters().alerts_duplicate, 1);

    // Cloud connection status is pushed to the node.
    unit.sm.set_cloud_connected(true).await;
    unit.sm.get_average_monitoring("main").await.unwrap();
    assert_eq!(main.state.lock().unwrap().cloud_connected, Some(true));
    unit.sm.set_cloud_connected(false).await;
    unit.sm.get_average_monitoring("main").await.unwrap();
    assert_eq!(main.state.lock().unwrap().cloud_connected, Some(false));

    // GetBlobsInfos: URLs on the file server; an unknown digest is INTERNAL.
    let mut client = pb::sm_service_client::SmServiceClient::new(unit.channel().await);
    let known = "sha256:58b9257874a9963a80e90baa1845e1724103c4608d22756f490c9440df8f8046";
    let urls = client
        .get_blobs_infos(pb::BlobsInfosRequest {
            digests: vec![known.into()],
        })
        .await
        .unwrap()
        .into_inner()
        .urls;
    assert_eq!(
        urls,
        vec![
            "http://localhost:8094/blobs/sha256/58b9257874a9963a80e90baa1845e1724103c4608d22756f490c9440df8f8046"
        ]
    );
    let err = client
        .get_blobs_infos(pb::BlobsInfosRequest {
            digests: vec![format!("sha256:{}", "0".repeat(64))],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);

    // UpdateInstances to a node without an SM: not found.
    let e = unit
        .sm
        .update_instances("nowhere", vec![], vec![], &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("node nowhere not found"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_node_config_stays_visible_as_a_condition() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let _s2 = unit
        .sim(
            "secondary-2",
            SimOptions {
                reject_node_config: true,
                ..SimOptions::default()
            },
        )
        .await;
    let _main = unit.sim("main", SimOptions::default()).await;
    let _s1 = unit.sim("secondary-1", SimOptions::default()).await;
    let mut changes = unit.store.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let conds = unit.store.conditions().unwrap();
        if let Some(c) = conds.get("action/nodeconfig/secondary-2") {
            assert!(
                c.message.contains("rejected node config 1.2.0"),
                "{}",
                c.message
            );
            break;
        }
        tokio::time::timeout_at(deadline, changes.recv())
            .await
            .expect("no condition");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_node_is_replaced_after_timeout_and_readopted_without_restart() {
    let config = SmConfig {
        sm_connection_timeout: Duration::from_millis(400),
        ..SmConfig::default()
    };
    let unit = Unit::start(&example("fresh-install"), config, None).await;
    let _main = unit.sim("main", SimOptions::default()).await;
    let mut s1 = unit.sim("secondary-1", SimOptions::default()).await;
    let mut s2 = unit.sim("secondary-2", SimOptions::default()).await;
    unit.wait_for("convergence", 30, converged).await;
    let starts_before = s2.state.lock().unwrap().starts.clone();

    // secondary-2 drops its stream: disconnected, then lost after the timeout; its boot
    // component cannot go elsewhere (pinned), so a condition says why.
    s2.disconnect();
    unit.wait_for("secondary-2 disconnected", 10, |s| {
        matches!(
            s.observed.nodes["secondary-2"].connection,
            Connection::Disconnected { .. }
        )
    })
    .await;
    unit.wait_for("secondary-2 lost", 10, |s| {
        matches!(
            s.observed.nodes["secondary-2"].connection,
            Connection::Lost { .. }
        )
    })
    .await;

    // It comes back with its instances still running: re-adopted, nothing restarted.
    s2.connect(unit.channel().await).await.unwrap();
    unit.wait_for("re-converged", 30, |s| {
        s.observed.nodes["secondary-2"].is_connected() && converged(s)
    })
    .await;
    assert_eq!(
        s2.state.lock().unwrap().starts,
        starts_before,
        "no instance restarted"
    );

    // secondary-1 drops in the middle: vision (label camera) has nowhere else to go, telemetry
    // and gateway on main are untouched.
    let main_starts = _main.state.lock().unwrap().starts.clone();
    s1.disconnect();
    let snap = unit
        .wait_for("vision cannot be placed", 10, |s| {
            matches!(
                s.observed.nodes["secondary-1"].connection,
                Connection::Lost { .. }
            ) && aos_cm::reconcilers::plan_one(ReconcilerKind::Instances, s, 0)
                .conditions
                .iter()
                .any(|c| c.reason == "NoMatchingLabels")
        })
        .await;
    assert!(snap.observed.nodes["main"].is_connected());
    assert_eq!(_main.state.lock().unwrap().starts, main_starts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_close_only_that_stream() {
    let config = SmConfig {
        max_message_size: 64 * 1024,
        ..SmConfig::default()
    };
    let unit = Unit::start(&example("fresh-install"), config, None).await;
    let main = unit.sim("main", SimOptions::default()).await;
    let mut s1 = unit.sim("secondary-1", SimOptions::default()).await;
    let s2 = unit.sim("secondary-2", SimOptions::default()).await;
    let before = unit.wait_for("convergence", 30, converged).await;

    // An oversized message on secondary-1's stream.
    let huge = pb::SmOutgoingMessages {
        sm_outgoing_message: Some(Out::Log(pb::LogData {
            correlation_id: "x".into(),
            data: vec![0u8; 200 * 1024],
            ..Default::default()
        })),
    };
    assert!(s1.send_raw(huge).await);
    // A status with an unknown state on secondary-2's: counted and ignored, stream stays.
    let bogus = pb::SmOutgoingMessages {
        sm_outgoing_message: Some(Out::UpdateInstancesStatus(pb::UpdateInstancesStatus {
            instances: vec![pb::InstanceStatus {
                instance: Some(aos_cm::api::proto::common::v2::InstanceIdent {
                    item_id: "x".into(),
                    ..Default::default()
                }),
                state: "exploded".into(),
                ..Default::default()
            }],
        })),
    };
    assert!(s2.send_raw(bogus).await);

    unit.wait_for("secondary-1 closed", 10, |s| {
        !s.observed.nodes["secondary-1"].is_connected()
    })
    .await;
    // secondary-1's client saw the stream end with an error status naming the problem.
    tokio::time::timeout(Duration::from_secs(5), s1.wait_closed())
        .await
        .expect("stream not closed");
    let errors = s1.state.lock().unwrap().stream_errors.clone();
    assert!(
        errors.iter().any(|e| e.contains("bad message")),
        "{errors:?}"
    );
    assert!(
        unit.sm
            .counters()
            .bad_messages
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    // The other nodes are still served, and nothing stored was lost.
    unit.sm.get_average_monitoring("main").await.unwrap();
    unit.sm.get_average_monitoring("secondary-2").await.unwrap();
    let after = unit.store.snapshot().unwrap();
    assert_eq!(after.allocations, before.allocations);
    assert_eq!(after.desired, before.desired);
    drop(main);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_dropped_in_the_middle_of_an_update_has_its_instances_replaced() {
    // telemetry runs 3 instances, one per node (the disconnected-node scenario's placements).
    let config = SmConfig {
        sm_connection_timeout: Duration::from_millis(300),
        ..SmConfig::default()
    };
    let unit = Unit::start(&example("disconnected-node"), config, None).await;
    let _main = unit.sim("main", SimOptions::default()).await;
    let _s2 = unit.sim("secondary-2", SimOptions::default()).await;
    // secondary-1 is slow: its UpdateInstances is still being applied when it drops.
    let mut s1 = unit
        .sim(
            "secondary-1",
            SimOptions {
                delay: Duration::from_secs(5),
                ..SimOptions::default()
            },
        )
        .await;
    let telemetry1 = InstanceIdent::new(
        "2d7c4e1a-93b5-4f0e-8a6d-1c5b9e3f7a21",
        "41a8f2c6-5e9d-4b73-a01e-6d3c8b2f7e95",
        1,
    );
    tokio::time::timeout(Duration::from_secs(10), s1.wait_received("UpdateInstances"))
        .await
        .expect("no UpdateInstances reached secondary-1");
    s1.disconnect();
    assert!(
        s1.running().is_empty(),
        "the update never completed on the node"
    );

    // Lost after the timeout; telemetry/1 is placed elsewhere and runs there.
    let snap = unit
        .wait_for("telemetry/1 re-placed and active", 20, |s| {
            matches!(
                s.observed.nodes["secondary-1"].connection,
                Connection::Lost { .. }
            ) && s.allocations.instances.get(&telemetry1).is_some_and(|p| {
                p.node_id != "secondary-1"
                    && s.observed
                        .instances
                        .get(&telemetry1)
                        .is_some_and(|r| r.node_id == p.node_id && r.state == InstanceState::Active)
            })
        })
        .await;
    let moved_to = snap.allocations.instances[&telemetry1].node_id.clone();

    // secondary-1 comes back: vision returns to it; telemetry/1 stays where it went.
    s1.options.delay = Duration::ZERO;
    s1.connect(unit.channel().await).await.unwrap();
    let snap = unit.wait_for("converged again", 30, converged).await;
    assert_eq!(snap.allocations.instances[&telemetry1].node_id, moved_to);
    let vision = InstanceIdent::new(
        "c41e9d7b-6a25-4c3f-9b8e-0f7a2d5c1e69",
        "d3f7a1c9-8b26-4e5d-9f40-1a6e2c8b5d73",
        0,
    );
    assert_eq!(snap.allocations.instances[&vision].node_id, "secondary-1");
}

/// Statuses that many nodes send at once are group-committed: every one is recorded, in the
/// order each node sent them, and none waits behind a writer that has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_status_lists_of_many_nodes_are_all_recorded() {
    use aos_cm::sim::unit::SimUnit;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (unit, sims, desired) = SimUnit::start_synthetic(&dir.path().join("cm.redb"), 12, 12, 96)
        .await
        .unwrap();
    unit.store
        .write(|tx| tx.set_desired(desired.as_ref()))
        .unwrap();
    unit.wait_active(96, Duration::from_secs(30)).await.unwrap();
    let before = unit.sm.counters().statuses.load(Ordering::Relaxed);
    // Two changes per instance, one status per message: the second must win everywhere.
    for note in ["first", "second"] {
        let sent: usize =
            futures::future::join_all(sims.iter().map(|s| s.report_running(1, Some(note))))
                .await
                .into_iter()
                .sum();
        assert_eq!(sent, 96);
    }
    let snap = unit
        .wait_for(Duration::from_secs(30), |s| {
            s.observed.instances.len() == 96
                && s.observed
                    .instances
                    .values()
                    .all(|r| r.error.as_deref() == Some("second"))
        })
        .await
        .unwrap();
    assert!(
        snap.observed
            .instances
            .values()
            .all(|r| r.state == InstanceState::Active)
    );
    // Counted once each (the count follows the commit that the wait above saw).
    let counter = &unit.sm.counters().statuses;
    tokio::time::timeout(Duration::from_secs(5), async {
        while counter.load(Ordering::Relaxed) < before + 192 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(counter.load(Ordering::Relaxed) - before, 192);
    drop(sims);
    unit.stop().await;
}

/// After a restart the controller knows nothing of what a node reported before: a node's first
/// full status list is checked against the stored records, and the ones of that node it no
/// longer lists are dropped; other nodes' records stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_first_full_list_drops_its_stored_records_it_no_longer_lists() {
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    let ghost = |node: &str, n: u64| ReportedInstance {
        ident: InstanceIdent::new("ghost", "subject", n),
        node_id: node.into(),
        runtime_id: "runc".into(),
        version: "1.0.0".into(),
        state: InstanceState::Active,
        error: None,
        preinstalled: false,
    };
    // What the nodes reported before the restart.
    let before = [
        ghost("secondary-1", 0),
        ghost("secondary-1", 1),
        ghost("main", 2),
    ];
    unit.store
        .write_observed(|tx| {
            for r in &before {
                tx.put_reported_instance(r)?;
            }
            Ok(())
        })
        .unwrap();
    let _s1 = unit.sim("secondary-1", SimOptions::default()).await;
    let snap = unit
        .wait_for("secondary-1's old records dropped", 30, |s| {
            !s.observed
                .instances
                .values()
                .any(|r| r.ident.item_id == "ghost" && r.node_id == "secondary-1")
        })
        .await;
    assert_eq!(
        snap.observed.instances.get(&before[2].ident),
        Some(&before[2])
    );
}
