use super::*;
use crate::reconcilers::plan_one;

fn unit_config(version: &str) -> UnitConfig {
    UnitConfig {
        format_version: "7".into(),
        version: Version::parse(version).unwrap(),
        nodes: Vec::new(),
    }
}

/// A unit whose desired state asks only for unit config 1.0.0 (nothing to download), and one
/// component item whose index is not downloaded yet.
fn snap(policy: UpdatePolicy) -> Snapshot {
    let mut s = Snapshot {
        desired: Some(DesiredState {
            unit_config: Some(unit_config("1.0.0")),
            ..DesiredState::default()
        }),
        ..Snapshot::default()
    };
    s.settings.update_schedules.sota.policy = policy;
    s.settings.update_schedules.fota.policy = policy;
    s
}

fn with_component(mut s: Snapshot) -> Snapshot {
    if let Some(d) = s.desired.as_mut() {
        d.items.push(DesiredItem {
            id: "boot".into(),
            item_type: ItemType::Component,
            version: "2.0.0".into(),
            owner_id: "oem".into(),
            index_digest: Some(Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap()),
        });
    }
    s
}

fn approve(s: &mut Snapshot, kind: UpdateKind) {
    let fp = fingerprint(s.desired.as_ref().unwrap(), kind);
    s.progress.of_mut(kind).approved = Some(fp);
}

#[test]
fn auto_goes_straight_to_updating() {
    let s = snap(UpdatePolicy::Auto);
    let st = status(&s, UpdateKind::Sota, 0);
    assert_eq!(st.state, UpdateState::Updating);
    assert_eq!(st.unit_config.as_deref(), Some("1.0.0"));
    let plan = plan_one(ReconcilerKind::UnitConfig, &s, 0);
    assert_eq!(plan.actions.len(), 1);
    assert!(plan.conditions.is_empty());
}

#[test]
fn trigger_holds_sota_until_approved() {
    let mut s = snap(UpdatePolicy::Trigger);
    assert_eq!(
        status(&s, UpdateKind::Sota, 0).state,
        UpdateState::ReadyToUpdate
    );
    let plan = plan_one(ReconcilerKind::UnitConfig, &s, 0);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.conditions.len(), 1);
    assert_eq!(plan.conditions[0].object, "update sota");
    assert_eq!(plan.conditions[0].reason, "WaitingForStart");
    // Nothing of FOTA in this desired state.
    assert_eq!(status(&s, UpdateKind::Fota, 0).state, UpdateState::NoUpdate);

    approve(&mut s, UpdateKind::Sota);
    assert_eq!(status(&s, UpdateKind::Sota, 0).state, UpdateState::Updating);
    let plan = plan_one(ReconcilerKind::UnitConfig, &s, 0);
    assert!(matches!(
        plan.actions.as_slice(),
        [Action::InstallUnitConfig { version }] if version == "1.0.0"
    ));

    // Installed: nothing left, NO_UPDATE.
    s.observed.unit_config = UnitConfigStatus {
        state: UnitConfigState::Installed,
        version: Some(Version::parse("1.0.0").unwrap()),
        error: None,
        config: Some(unit_config("1.0.0")),
    };
    let st = status(&s, UpdateKind::Sota, 0);
    assert_eq!(st.state, UpdateState::NoUpdate);
    assert_eq!(st.unit_config, None);
}

#[test]
fn a_new_desired_state_needs_a_new_start() {
    let mut s = snap(UpdatePolicy::Trigger);
    approve(&mut s, UpdateKind::Sota);
    assert_eq!(status(&s, UpdateKind::Sota, 0).state, UpdateState::Updating);
    s.desired.as_mut().unwrap().unit_config = Some(unit_config("2.0.0"));
    assert_eq!(
        status(&s, UpdateKind::Sota, 0).state,
        UpdateState::ReadyToUpdate
    );
    assert!(
        plan_one(ReconcilerKind::UnitConfig, &s, 0)
            .actions
            .is_empty()
    );
}

#[test]
fn fota_downloads_then_waits_independently() {
    let s = with_component(snap(UpdatePolicy::Trigger));
    let st = status(&s, UpdateKind::Fota, 0);
    assert_eq!(st.state, UpdateState::Downloading);
    assert_eq!(
        st.components,
        vec![("boot".to_string(), String::new(), "2.0.0".to_string())]
    );
    // Downloads are never held.
    let plan = plan_one(ReconcilerKind::Images, &s, 0);
    assert!(matches!(
        plan.actions.as_slice(),
        [Action::DownloadBlob { .. }]
    ));
    // The component changes nothing of SOTA's fingerprint.
    assert_eq!(
        fingerprint(s.desired.as_ref().unwrap(), UpdateKind::Sota),
        fingerprint(
            snap(UpdatePolicy::Trigger).desired.as_ref().unwrap(),
            UpdateKind::Sota
        )
    );
}

#[test]
fn timetable_waits_for_the_slot_and_names_it() {
    let mut s = snap(UpdatePolicy::Timetable);
    s.settings.update_schedules.sota.timetable = vec![TimetableDay {
        day_of_week: 4,
        slots: vec![TimeSlot {
            start: 3600,
            end: 7200,
        }],
    }];
    // 1970-01-01 (a Thursday) 00:00.
    assert_eq!(
        gate(&s, UpdateKind::Sota, 0),
        Gate::WaitingForUpdateWindow(Some(3_600_000))
    );
    let plan = plan_one(ReconcilerKind::UnitConfig, &s, 0);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.conditions[0].reason, "WaitingForUpdateWindow");
    assert!(
        plan.conditions[0].message.contains("1970-01-01T01:00:00Z"),
        "{}",
        plan.conditions[0].message
    );
}

#[test]
fn done_updates_never_wait_and_report_their_error() {
    let mut s = snap(UpdatePolicy::Trigger);
    let fp = fingerprint(s.desired.as_ref().unwrap(), UpdateKind::Sota);
    s.progress.sota.done = Some(fp);
    s.progress.sota.error = Some("boom".into());
    let st = status(&s, UpdateKind::Sota, 0);
    assert_eq!(st.state, UpdateState::NoUpdate);
    assert_eq!(st.error.as_deref(), Some("boom"));
    assert_eq!(plan_one(ReconcilerKind::UnitConfig, &s, 0).actions.len(), 1);
    let plan = plan_one(ReconcilerKind::Instances, &s, 0);
    assert!(
        plan.conditions
            .iter()
            .any(|c| c.reason == "UpdateFailed" && c.message == "boom")
    );
}

#[test]
fn activation_overdue_after_ten_minutes_without_change() {
    let mut s = snap(UpdatePolicy::Auto);
    let ident = InstanceIdent::new("svc", "subj", 0);
    s.observed.instances.insert(
        ident.clone(),
        ReportedInstance {
            ident,
            node_id: "n".into(),
            runtime_id: "r".into(),
            version: "1.0.0".into(),
            state: InstanceState::Activating,
            error: None,
            preinstalled: false,
        },
    );
    assert_eq!(
        activation_overdue(&s, UpdateKind::Sota, 1000, 1000 + ACTIVATION_TIMEOUT_MS - 1),
        None
    );
    let err = activation_overdue(&s, UpdateKind::Sota, 1000, 1000 + ACTIVATION_TIMEOUT_MS).unwrap();
    assert!(err.contains("svc"), "{err}");
    assert_eq!(
        activation_overdue(&s, UpdateKind::Fota, 0, ACTIVATION_TIMEOUT_MS),
        None
    );
}

/// A new instance asked for while no node is connected: the planner has nothing to do, but the
/// update is not done (the scheduler would record it done, and that opens the gate: the
/// instance would start without a start once a node is back). It waits for its start.
#[test]
fn an_update_that_no_node_can_take_now_still_waits_for_its_start() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/desired-states/scale-up-down");
    let mut s = crate::scenario::load(&dir).expect("scenario").snapshot;
    s.settings.update_schedules.sota.policy = UpdatePolicy::Trigger;
    assert_eq!(
        status(&s, UpdateKind::Sota, 0).state,
        UpdateState::ReadyToUpdate
    );
    for n in s.observed.nodes.values_mut() {
        n.connection = Connection::Lost { since: 0 };
    }
    let now = 10_000_000_000;
    let plan = plan_one(ReconcilerKind::Instances, &s, now);
    assert!(
        plan.actions
            .iter()
            .all(|a| action_kind(a, &s) != Some(UpdateKind::Sota)),
        "{:?}",
        plan.actions
    );
    assert!(plan.conditions.iter().any(|c| c.reason == "NoNodes"));
    assert_eq!(
        status(&s, UpdateKind::Sota, now).state,
        UpdateState::ReadyToUpdate
    );
    // Started while no node can take it: the update runs, finds nothing to do, and ends.
    approve(&mut s, UpdateKind::Sota);
    assert_eq!(
        status(&s, UpdateKind::Sota, now).state,
        UpdateState::NoUpdate
    );
}
