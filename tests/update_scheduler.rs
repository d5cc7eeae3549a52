//! The update scheduler over loopback gRPC (`communicationmanager.v3.UpdateSchedulerService`):
//! a client subscribes and sees each kind of update go NO_UPDATE → DOWNLOADING →
//! READY_TO_UPDATE → UPDATING → NO_UPDATE, the unit untouched until the client starts it; a
//! timetable opens at its slot; instances that never finish activating fail the update.

mod common;

use aos_cm::agent::AgentConfig;
use aos_cm::api::cloud::link::LinkConfig;
use aos_cm::api::proto::communicationmanager::v3 as pb;
use aos_cm::api::scheduler::{self, Scheduler};
use aos_cm::api::sm::SmConfig;
use aos_cm::engine::Clock;
use aos_cm::model::*;
use aos_cm::reconcilers::plan_one;
use aos_cm::scenario;
use aos_cm::sim::cloud::{CloudOptions, SimCloud};
use aos_cm::sim::sm::{SimOptions, SimSm};
use aos_cm::sim::unit::{self, CloudSetup, SimUnit};
use aos_cm::store::Store;
use common::example;
use pb::scheduler_notifications::SchedulerNotification;
use pb::update_scheduler_service_client::UpdateSchedulerServiceClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::Streaming;
use tonic::transport::Channel;

type Client = UpdateSchedulerServiceClient<Channel>;

/// Serves the scheduler on 127.0.0.1:0 and starts its task; returns a connected client.
async fn serve_scheduler(
    store: Arc<Store>,
    clock: Clock,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Client, Arc<Scheduler>) {
    let sched = Scheduler::new(store, clock);
    tokio::spawn(sched.clone().run(stop.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut stop = stop;
    tokio::spawn(scheduler::serve(listener, sched.clone(), async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    let client = UpdateSchedulerServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, sched)
}

/// The next notification, as (kind, state, the message).
async fn next(
    stream: &mut Streaming<pb::SchedulerNotifications>,
) -> (UpdateKind, i32, SchedulerNotification) {
    // With paused time there is no timeout: tokio would jump to it while a message is on
    // its way through the loopback socket.
    let message = if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
    {
        stream.message().await
    } else {
        tokio::time::timeout(Duration::from_secs(120), stream.message())
            .await
            .expect("a notification in time")
    };
    let n = message
        .expect("the stream is healthy")
        .expect("the stream is open")
        .scheduler_notification
        .expect("a notification");
    match &n {
        SchedulerNotification::SotaStatus(s) => (UpdateKind::Sota, s.state, n.clone()),
        SchedulerNotification::FotaStatus(f) => (UpdateKind::Fota, f.state, n.clone()),
    }
}

fn pb_state(s: UpdateState) -> i32 {
    match s {
        UpdateState::NoUpdate => pb::UpdateState::NoUpdate as i32,
        UpdateState::Downloading => pb::UpdateState::Downloading as i32,
        UpdateState::ReadyToUpdate => pb::UpdateState::ReadyToUpdate as i32,
        UpdateState::Updating => pb::UpdateState::Updating as i32,
    }
}

fn name(state: i32) -> &'static str {
    pb::UpdateState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("?")
}

/// Per kind, the states seen in order, consecutive repeats (a list that shrank) folded.
#[derive(Default)]
struct Seen {
    sota: Vec<&'static str>,
    fota: Vec<&'static str>,
}

impl Seen {
    fn push(&mut self, kind: UpdateKind, state: i32) {
        let list = match kind {
            UpdateKind::Sota => &mut self.sota,
            UpdateKind::Fota => &mut self.fota,
        };
        if list.last() != Some(&name(state)) {
            list.push(name(state));
        }
    }

    fn last(&self, kind: UpdateKind) -> Option<&'static str> {
        match kind {
            UpdateKind::Sota => self.sota.last().copied(),
            UpdateKind::Fota => self.fota.last().copied(),
        }
    }
}

/// Reads notifications until `kind` reaches `state`; returns that kind's last message.
async fn until(
    stream: &mut Streaming<pb::SchedulerNotifications>,
    seen: &mut Seen,
    kind: UpdateKind,
    state: &str,
) -> SchedulerNotification {
    loop {
        let (k, s, n) = next(stream).await;
        seen.push(k, s);
        if k == kind && name(s) == state {
            return n;
        }
    }
}

fn trigger_both() -> UpdateSchedules {
    let trigger = KindSchedule {
        policy: UpdatePolicy::Trigger,
        timetable: Vec::new(),
    };
    UpdateSchedules {
        sota: trigger.clone(),
        fota: trigger,
    }
}

fn assert_nothing_ready(err: tonic::Status) {
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("nothing is ready to update"),
        "{}",
        err.message()
    );
}

/// Nothing of `kind` installed or started yet.
fn untouched(snap: &Snapshot, kind: UpdateKind) -> bool {
    let is_kind = |t: ItemType| (t == ItemType::Component) == (kind == UpdateKind::Fota);
    let items_untouched = snap.observed.items.values().all(|i| !is_kind(i.item_type));
    let desired = snap.desired.as_ref().expect("desired");
    let kind_of = |item_id: &str| desired.item(item_id).map(|i| i.item_type);
    let started = snap
        .allocations
        .instances
        .keys()
        .chain(snap.observed.instances.keys())
        .any(|i| kind_of(&i.item_id).is_some_and(is_kind));
    items_untouched && !started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_policy_downloads_then_waits_for_start_per_kind() {
    // The example unit, fresh: nodes and the installed unit config, nothing downloaded.
    let dir = tempfile::tempdir().unwrap();
    let scenario_dir = example("fresh-install");
    let mut snap = scenario::load(&scenario_dir).unwrap().snapshot;
    let sms = unit::before_sms_connect(&mut snap);
    // The layer's (SOTA) and the component's (FOTA) blobs: held back at first, so that each
    // kind is seen DOWNLOADING however fast the rest downloads.
    let held: Vec<String> = {
        let desired = snap.desired.as_ref().unwrap();
        [ItemType::Layer, ItemType::Component]
            .iter()
            .flat_map(|t| {
                let item = desired.items.iter().find(|i| i.item_type == *t).unwrap();
                snap.catalogue.images[item.index_digest.as_ref().unwrap()].blobs()
            })
            .map(|d| d.to_string())
            .collect()
    };
    snap.desired = None;
    snap.catalogue = Catalogue::default();
    snap.observed.blobs.clear();
    let store_path = dir.path().join("cm.redb");
    {
        let store = Store::open(&store_path).unwrap();
        store.write(|tx| tx.set_snapshot(&snap)).unwrap();
        scheduler::apply_policies(&store, &trigger_both()).unwrap();
    }
    let frame: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(scenario_dir.join("desired.json")).unwrap())
            .unwrap();
    let system_id = frame["header"]["systemId"].as_str().unwrap().to_owned();
    let mut options = CloudOptions::new(&system_id);
    options.blob_dir = Some(scenario_dir.join("blobs"));
    let cloud = SimCloud::start(options).await.unwrap();
    let mut link = LinkConfig::new(&system_id, &cloud.discovery_url());
    link.backoff_min = Duration::from_millis(10);
    link.backoff_max = Duration::from_millis(100);
    let u = SimUnit::start_with_cloud(
        &store_path,
        None,
        SmConfig::default(),
        unit::quick_runner(),
        CloudSetup {
            link,
            agent: AgentConfig {
                unit_status_send_timeout: Duration::from_millis(50),
                alerts_send_period: Duration::from_millis(50),
                monitoring_send_period: Duration::from_millis(100),
            },
            install_path: dir.path().join("install"),
        },
    )
    .await
    .unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (mut client, _) = serve_scheduler(u.store.clone(), unit::wall_clock(), stop_rx).await;
    let mut stream = client
        .subscribe_notifications(())
        .await
        .unwrap()
        .into_inner();

    // On subscribe: FOTA first, then SOTA; nothing to update yet.
    let (k1, s1, _) = next(&mut stream).await;
    let (k2, s2, _) = next(&mut stream).await;
    assert_eq!((k1, name(s1)), (UpdateKind::Fota, "NO_UPDATE"));
    assert_eq!((k2, name(s2)), (UpdateKind::Sota, "NO_UPDATE"));
    let mut seen = Seen::default();
    seen.push(k1, s1);
    seen.push(k2, s2);
    assert_nothing_ready(client.start_sota_update(()).await.unwrap_err());

    let mut sims: Vec<SimSm> = Vec::new();
    for (node, info) in &sms {
        sims.push(
            u.sim(node, info.clone(), SimOptions::default())
                .await
                .unwrap(),
        );
    }
    if let Some((link, _)) = &u.cloud {
        link.state().wait_for(|s| s.connected).await.unwrap();
    }
    for digest in &held {
        cloud.set_blob_info(digest, None);
    }
    cloud.send_data(frame["data"].clone()).expect("session");

    // Both kinds download, then wait; the unit runs nothing new meanwhile.
    until(&mut stream, &mut seen, UpdateKind::Sota, "DOWNLOADING").await;
    if seen.last(UpdateKind::Fota) != Some("DOWNLOADING") {
        until(&mut stream, &mut seen, UpdateKind::Fota, "DOWNLOADING").await;
    }
    for digest in &held {
        cloud.clear_blob_info(digest);
    }
    until(&mut stream, &mut seen, UpdateKind::Sota, "READY_TO_UPDATE").await;
    if seen.last(UpdateKind::Fota) != Some("READY_TO_UPDATE") {
        until(&mut stream, &mut seen, UpdateKind::Fota, "READY_TO_UPDATE").await;
    }
    assert_eq!(seen.sota, ["NO_UPDATE", "DOWNLOADING", "READY_TO_UPDATE"]);
    assert_eq!(seen.fota, ["NO_UPDATE", "DOWNLOADING", "READY_TO_UPDATE"]);
    let snap = u.store.snapshot().unwrap();
    assert!(
        untouched(&snap, UpdateKind::Sota),
        "{:?}",
        snap.observed.items
    );
    assert!(
        untouched(&snap, UpdateKind::Fota),
        "{:?}",
        snap.observed.items
    );
    let plan = plan_one(ReconcilerKind::Instances, &snap, unit::wall_clock()());
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert!(
        plan.conditions
            .iter()
            .any(|c| c.object == "update sota" && c.reason == "WaitingForStart"),
        "{:?}",
        plan.conditions
    );

    // SOTA goes on; FOTA keeps waiting.
    client.start_sota_update(()).await.unwrap();
    let updating = until(&mut stream, &mut seen, UpdateKind::Sota, "UPDATING").await;
    let SchedulerNotification::SotaStatus(status) = updating else {
        panic!("a SOTA status");
    };
    let mut services: Vec<&str> = status
        .install_services
        .iter()
        .map(|s| s.service_id.as_str())
        .collect();
    services.sort_unstable();
    assert_eq!(services.len(), 3, "{services:?}");
    assert_eq!(
        status.install_layers.len(),
        1,
        "{:?}",
        status.install_layers
    );
    until(&mut stream, &mut seen, UpdateKind::Sota, "NO_UPDATE").await;
    assert_eq!(
        seen.sota,
        [
            "NO_UPDATE",
            "DOWNLOADING",
            "READY_TO_UPDATE",
            "UPDATING",
            "NO_UPDATE"
        ]
    );
    let snap = u.store.snapshot().unwrap();
    assert!(!untouched(&snap, UpdateKind::Sota));
    assert!(
        untouched(&snap, UpdateKind::Fota),
        "{:?}",
        snap.observed.items
    );
    assert_eq!(seen.fota, ["NO_UPDATE", "DOWNLOADING", "READY_TO_UPDATE"]);
    assert_nothing_ready(client.start_sota_update(()).await.unwrap_err());

    // Then FOTA.
    client.start_fota_update(()).await.unwrap();
    let updating = until(&mut stream, &mut seen, UpdateKind::Fota, "UPDATING").await;
    let SchedulerNotification::FotaStatus(status) = updating else {
        panic!("a FOTA status");
    };
    assert_eq!(status.components.len(), 1, "{:?}", status.components);
    until(&mut stream, &mut seen, UpdateKind::Fota, "NO_UPDATE").await;
    assert_eq!(
        seen.fota,
        [
            "NO_UPDATE",
            "DOWNLOADING",
            "READY_TO_UPDATE",
            "UPDATING",
            "NO_UPDATE"
        ]
    );
    let snap = u.store.snapshot().unwrap();
    assert!(!untouched(&snap, UpdateKind::Fota));
    assert_nothing_ready(client.start_fota_update(()).await.unwrap_err());

    // The record survives in the store: a restart finds both updates reached.
    let progress = u.store.update_progress().unwrap().unwrap();
    assert!(progress.sota.done.is_some() && progress.fota.done.is_some());
    assert_eq!(progress.state, "sota NO_UPDATE, fota NO_UPDATE");
    let _ = stop.send(true);
    drop(sims);
    u.stop().await;
}

/// 2026-11-23 00:00:00 UTC, a Monday.
const MONDAY: i64 = 1_795_392_000_000;

/// The engine clock for paused-time tests: `MONDAY + offset` plus tokio's (paused) time.
fn paused_clock(offset: i64) -> Clock {
    let start = tokio::time::Instant::now();
    Arc::new(move || MONDAY + offset + i64::try_from(start.elapsed().as_millis()).unwrap())
}

fn store_with(
    desired: DesiredState,
    schedules: &UpdateSchedules,
) -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("cm.redb")).unwrap());
    store.write(|tx| tx.set_desired(Some(&desired))).unwrap();
    scheduler::apply_policies(&store, schedules).unwrap();
    (dir, store)
}

fn unit_config(version: &str) -> UnitConfig {
    UnitConfig {
        format_version: "7".into(),
        version: Version::parse(version).unwrap(),
        nodes: Vec::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn timetable_opens_at_the_slot() {
    // A unit config to install (nothing to download); slots Monday 01:00-02:00.
    let schedules = UpdateSchedules {
        sota: KindSchedule {
            policy: UpdatePolicy::Timetable,
            timetable: vec![TimetableDay {
                day_of_week: 1,
                slots: vec![TimeSlot {
                    start: 3600,
                    end: 7200,
                }],
            }],
        },
        fota: KindSchedule::default(),
    };
    let (_dir, store) = store_with(
        DesiredState {
            unit_config: Some(unit_config("2.0.0")),
            ..DesiredState::default()
        },
        &schedules,
    );
    let clock = paused_clock(0);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (mut client, _) = serve_scheduler(store.clone(), clock.clone(), stop_rx).await;
    let mut stream = client
        .subscribe_notifications(())
        .await
        .unwrap()
        .into_inner();
    let mut seen = Seen::default();
    let ready = until(&mut stream, &mut seen, UpdateKind::Sota, "READY_TO_UPDATE").await;
    let SchedulerNotification::SotaStatus(ready) = ready else {
        panic!("a SOTA status");
    };
    assert_eq!(
        ready.unit_config.map(|u| u.version).as_deref(),
        Some("2.0.0")
    );
    // Before the slot the plan holds the install back and names the slot.
    let mut snap = store.snapshot().unwrap();
    snap.progress.sota.approved = None;
    let plan = plan_one(ReconcilerKind::UnitConfig, &snap, MONDAY + 60_000);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.conditions[0].reason, "WaitingForUpdateWindow");
    assert!(
        plan.conditions[0].message.contains("2026-11-23T01:00:00Z"),
        "{}",
        plan.conditions[0].message
    );
    assert_nothing_ready(client.start_fota_update(()).await.unwrap_err());

    // The scheduler sleeps until the slot; paused time gets there without waiting.
    until(&mut stream, &mut seen, UpdateKind::Sota, "UPDATING").await;
    let opened_at = clock();
    assert!(
        (MONDAY + 3_600_000..MONDAY + 3_660_000).contains(&opened_at),
        "opened at {opened_at}"
    );
    let snap = store.snapshot().unwrap();
    assert!(matches!(
        plan_one(ReconcilerKind::UnitConfig, &snap, opened_at).actions.as_slice(),
        [Action::InstallUnitConfig { version }] if version == "2.0.0"
    ));

    // What the executor would record: the update ends.
    store
        .write(|tx| {
            tx.set_unit_config_status(&UnitConfigStatus {
                state: UnitConfigState::Installed,
                version: Some(Version::parse("2.0.0").unwrap()),
                error: None,
                config: Some(unit_config("2.0.0")),
            })
        })
        .unwrap();
    until(&mut stream, &mut seen, UpdateKind::Sota, "NO_UPDATE").await;
    assert_eq!(seen.sota.last(), Some(&"NO_UPDATE"));
    assert!(
        seen.sota
            .ends_with(&["READY_TO_UPDATE", "UPDATING", "NO_UPDATE"])
    );
    assert_eq!(seen.fota, ["NO_UPDATE"]);
    let _ = stop.send(true);
}

#[tokio::test(start_paused = true)]
async fn instances_activating_ten_minutes_after_the_last_change_fail_the_update() {
    let desired = DesiredState {
        items: vec![DesiredItem {
            id: "svc".into(),
            item_type: ItemType::Service,
            version: "1.0.0".into(),
            owner_id: "sp".into(),
            index_digest: None,
        }],
        instances: vec![DesiredInstances {
            item_id: "svc".into(),
            subject_id: "subj".into(),
            priority: 0,
            num_instances: 2,
            labels: Vec::new(),
        }],
        ..DesiredState::default()
    };
    let (_dir, store) = store_with(desired, &UpdateSchedules::default());
    let report = |instance: u64, state: InstanceState| {
        let ident = InstanceIdent::new("svc", "subj", instance);
        store
            .write_observed(|tx| {
                tx.put_reported_instance(&ReportedInstance {
                    ident,
                    node_id: "main".into(),
                    runtime_id: "crun".into(),
                    version: "1.0.0".into(),
                    state,
                    error: None,
                    preinstalled: false,
                })
            })
            .unwrap();
    };
    report(0, InstanceState::Activating);
    let clock = paused_clock(0);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (mut client, sched) = serve_scheduler(store.clone(), clock.clone(), stop_rx).await;
    // The timing is followed in process: a message on its way through a socket would let
    // paused time jump to the scheduler's deadline before the test sees it.
    let (current, mut changes) = sched.subscribe();
    let mut seen = Seen::default();
    seen.push(UpdateKind::Sota, pb_state(current.sota.state));
    let mut sota_until = async |state: &str, seen: &mut Seen| {
        while seen.last(UpdateKind::Sota) != Some(state) {
            let change = changes.recv().await.unwrap();
            if change.kind == UpdateKind::Sota {
                seen.push(UpdateKind::Sota, pb_state(change.status.state));
            }
        }
    };
    sota_until("UPDATING", &mut seen).await;
    let started = clock();

    // A change of the instance states (a second instance comes up, activating too) restarts
    // the ten minutes.
    tokio::time::sleep(Duration::from_secs(5 * 60)).await;
    report(1, InstanceState::Activating);
    let changed = clock();

    sota_until("NO_UPDATE", &mut seen).await;
    let failed_at = clock();
    assert!(
        failed_at >= changed + 10 * 60 * 1000 && failed_at < changed + 11 * 60 * 1000,
        "failed {} ms after the change ({} after the start)",
        failed_at - changed,
        failed_at - started
    );
    // A client subscribing now gets the failure over the wire.
    let mut stream = client
        .subscribe_notifications(())
        .await
        .unwrap()
        .into_inner();
    let (_, _, fota) = next(&mut stream).await;
    assert!(matches!(fota, SchedulerNotification::FotaStatus(f) if f.error.is_none()));
    let (_, _, sota) = next(&mut stream).await;
    let SchedulerNotification::SotaStatus(status) = sota else {
        panic!("a SOTA status");
    };
    assert_eq!(name(status.state), "NO_UPDATE");
    let error = status.error.expect("the update failed");
    assert!(
        error.message.contains("still activating"),
        "{}",
        error.message
    );
    assert!(error.message.contains("svc"), "{}", error.message);
    // The first status may already be UPDATING (the task ran before the subscription).
    assert!(
        seen.sota == ["UPDATING", "NO_UPDATE"]
            || seen.sota == ["NO_UPDATE", "UPDATING", "NO_UPDATE"],
        "{:?}",
        seen.sota
    );
    let snap = store.snapshot().unwrap();
    let plan = plan_one(ReconcilerKind::Instances, &snap, failed_at);
    assert!(
        plan.conditions
            .iter()
            .any(|c| c.object == "update sota" && c.reason == "UpdateFailed"),
        "{:?}",
        plan.conditions
    );
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_survives_a_restart_and_a_new_desired_state_needs_a_new_start() {
    let (_dir, store) = store_with(
        DesiredState {
            unit_config: Some(unit_config("2.0.0")),
            ..DesiredState::default()
        },
        &trigger_both(),
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (mut client, _) = serve_scheduler(store.clone(), unit::wall_clock(), stop_rx).await;
    let mut stream = client
        .subscribe_notifications(())
        .await
        .unwrap()
        .into_inner();
    let mut seen = Seen::default();
    until(&mut stream, &mut seen, UpdateKind::Sota, "READY_TO_UPDATE").await;
    client.start_sota_update(()).await.unwrap();
    until(&mut stream, &mut seen, UpdateKind::Sota, "UPDATING").await;
    assert_eq!(seen.sota, ["READY_TO_UPDATE", "UPDATING"]);
    let _ = stop.send(true);
    drop(stream);

    // A new scheduler on the same store: the approval held, the install may go on.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (mut client, _) = serve_scheduler(store.clone(), unit::wall_clock(), stop_rx).await;
    let mut stream = client
        .subscribe_notifications(())
        .await
        .unwrap()
        .into_inner();
    let (_, fota, _) = next(&mut stream).await;
    let (_, sota, _) = next(&mut stream).await;
    assert_eq!((name(fota), name(sota)), ("NO_UPDATE", "UPDATING"));
    let snap = store.snapshot().unwrap();
    assert_eq!(
        plan_one(ReconcilerKind::UnitConfig, &snap, unit::wall_clock()())
            .actions
            .len(),
        1
    );

    // A different desired state before the install: ready again, and waiting for a start.
    store
        .write(|tx| {
            tx.set_desired(Some(&DesiredState {
                unit_config: Some(unit_config("3.0.0")),
                ..DesiredState::default()
            }))
        })
        .unwrap();
    let mut seen = Seen::default();
    seen.push(UpdateKind::Sota, sota);
    let ready = until(&mut stream, &mut seen, UpdateKind::Sota, "READY_TO_UPDATE").await;
    assert_eq!(seen.sota, ["UPDATING", "READY_TO_UPDATE"]);
    let SchedulerNotification::SotaStatus(ready) = ready else {
        panic!("a SOTA status");
    };
    assert_eq!(
        ready.unit_config.map(|u| u.version).as_deref(),
        Some("3.0.0")
    );
    let snap = store.snapshot().unwrap();
    assert!(
        plan_one(ReconcilerKind::UnitConfig, &snap, unit::wall_clock()())
            .actions
            .is_empty()
    );
    client.start_sota_update(()).await.unwrap();
    until(&mut stream, &mut seen, UpdateKind::Sota, "UPDATING").await;
    let _ = stop.send(true);
}
