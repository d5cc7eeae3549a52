//! The reconcilers: pure functions from a `Snapshot` to a `Plan`, one per concern, and the
//! runner that wakes them and hands their actions to an executor. No I/O happens here.

pub mod firmware;
pub mod images;
pub mod instances;
pub mod network;
pub mod placement;
pub mod project;
pub mod runner;
pub mod schedule;
pub mod unitconfig;

use crate::model::*;

/// Plans one reconciler over a snapshot, with the actions the update scheduler holds back
/// removed (see `schedule::apply_gate`).
pub fn plan_one(kind: ReconcilerKind, snap: &Snapshot, now: UnixMillis) -> Plan {
    schedule::apply_gate(plan_ungated(kind, snap, now), snap, now)
}

/// Plans one reconciler over a snapshot as if every update were allowed to go on.
pub fn plan_ungated(kind: ReconcilerKind, snap: &Snapshot, now: UnixMillis) -> Plan {
    match kind {
        ReconcilerKind::Images => images::plan(snap, now),
        ReconcilerKind::Instances => instances::plan(snap, now),
        ReconcilerKind::Network => network::plan(snap, now),
        ReconcilerKind::UnitConfig => unitconfig::plan(snap, now),
        ReconcilerKind::Firmware => firmware::plan(snap, now),
    }
}

/// The order in which the dry run chains the reconcilers: each sees the allocations the ones
/// before it proposed (placement needs the installed unit config, network needs placements).
pub const CHAIN: [ReconcilerKind; 5] = [
    ReconcilerKind::Images,
    ReconcilerKind::UnitConfig,
    ReconcilerKind::Instances,
    ReconcilerKind::Firmware,
    ReconcilerKind::Network,
];

/// How many rounds the dry run looks ahead: a second round shows what follows once the first
/// round's downloads have finished (items installed).
pub const DRY_RUN_ROUNDS: usize = 2;

/// The dry run: every reconciler planned over the snapshot projected by the plans before it,
/// for `DRY_RUN_ROUNDS` rounds; an action is listed once. The conditions are those of the
/// last round (what still cannot converge). Returned in display order.
pub fn plan_all(snap: &Snapshot, now: UnixMillis) -> Vec<Plan> {
    let mut projected = snap.clone();
    let mut plans: Vec<Plan> = ReconcilerKind::ALL.iter().map(|k| Plan::new(*k)).collect();
    let mut seen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for _ in 0..DRY_RUN_ROUNDS {
        for kind in CHAIN {
            let p = plan_one(kind, &projected, now);
            for a in &p.actions {
                project::apply(&mut projected, a, now);
            }
            if let Some(slot) = plans.iter_mut().find(|x| x.reconciler == kind) {
                for a in p.actions {
                    if seen.insert(format!("{a:?}")) {
                        slot.actions.push(a);
                    }
                }
                slot.conditions = p.conditions;
            }
        }
    }
    plans
}

#[cfg(test)]
mod rule_tests;
