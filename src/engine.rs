//! The reconcile loop wired to the store: the five reconcilers as runner entries that plan over
//! a fresh store snapshot, the tables each one reads, and the outcome sink that keeps the last
//! real error of an action, and each plan's conditions, in the store's conditions table.
//!
//! The executor that carries actions out through the edges is supplied by the caller (the
//! daemon, or a test).

use crate::model::*;
use crate::reconcilers::plan_one;
use crate::reconcilers::runner::{OutcomeSink, Reconciler, RunnerAction};
use crate::store::{Store, tables};
use std::collections::BTreeSet;
use std::sync::Arc;

impl RunnerAction for Action {
    fn key(&self) -> String {
        Action::key(self)
    }
}

/// A source of the current time for planning.
pub type Clock = Arc<dyn Fn() -> UnixMillis + Send + Sync>;

/// Milliseconds since the epoch from the system clock.
pub fn wall_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
}

/// The tables a reconciler reads; a committed change to any of them wakes it. The conditions
/// table is written by the loop itself and wakes nobody; the update progress (the scheduler's
/// approvals) wakes the reconcilers whose actions it holds back.
pub fn watches(kind: ReconcilerKind) -> Vec<&'static str> {
    use tables::*;
    match kind {
        ReconcilerKind::Images => vec![DESIRED, ITEMS, BLOBS, CATALOGUE, SETTINGS, UPDATE_PROGRESS],
        ReconcilerKind::Instances => vec![
            DESIRED,
            NODES,
            REPORTED_INSTANCES,
            UNIT_CONFIG,
            UNIT_SUBJECTS,
            CATALOGUE,
            PLACEMENTS,
            GIDS,
            SETTINGS,
            UPDATE_PROGRESS,
        ],
        ReconcilerKind::Network => vec![
            DESIRED,
            CATALOGUE,
            PLACEMENTS,
            NETWORKS,
            INSTANCE_IPS,
            FIREWALL,
            HOST_ROUTES,
        ],
        ReconcilerKind::UnitConfig => {
            vec![
                DESIRED,
                NODES,
                UNIT_CONFIG,
                ITEMS,
                SETTINGS,
                UPDATE_PROGRESS,
            ]
        }
        ReconcilerKind::Firmware => vec![
            DESIRED,
            NODES,
            REPORTED_INSTANCES,
            CATALOGUE,
            PLACEMENTS,
            ITEMS,
            SETTINGS,
            UPDATE_PROGRESS,
        ],
    }
}

/// Key of a plan condition in the conditions table.
fn plan_condition_key(kind: ReconcilerKind, c: &Condition) -> String {
    format!("plan/{kind}/{}/{}", c.object, c.reason)
}

/// Replaces the stored conditions of one reconciler's plan with the new ones, keeping the
/// `since` of those that persist. Writes nothing when nothing changed. Returns whether the
/// store now holds them.
fn record_plan_conditions(
    store: &Store,
    kind: ReconcilerKind,
    conds: &[Condition],
    now: UnixMillis,
) -> bool {
    let prefix = format!("plan/{kind}/");
    let result = store.write(|tx| {
        let existing = tx.conditions()?;
        let mut keep: BTreeSet<String> = BTreeSet::new();
        for c in conds {
            let key = plan_condition_key(kind, c);
            let mut c = c.clone();
            c.since = existing.get(&key).and_then(|old| old.since).or(Some(now));
            if existing.get(&key) != Some(&c) {
                tx.put_condition(&key, &c)?;
            }
            keep.insert(key);
        }
        for key in existing.keys() {
            if key.starts_with(&prefix) && !keep.contains(key) {
                tx.remove_condition(key)?;
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(reconciler = %kind, error = %e, "could not record plan conditions");
            false
        }
    }
}

/// The five reconcilers as runner entries planning over store snapshots.
pub fn reconcilers(store: Arc<Store>, clock: Clock) -> Vec<Reconciler<Action>> {
    ReconcilerKind::ALL
        .iter()
        .map(|&kind| {
            let store = store.clone();
            let clock = clock.clone();
            // The conditions this reconciler last recorded: most plans repeat them, and an
            // unchanged set needs no write transaction. `None` until the first record, so a
            // restart always reconciles with what the store kept.
            let recorded: std::sync::Mutex<Option<Vec<Condition>>> = std::sync::Mutex::new(None);
            Reconciler::new(kind.as_str(), watches(kind), move || {
                let now = clock();
                match store.shared_snapshot() {
                    Ok(snap) => {
                        let plan = plan_one(kind, &snap, now);
                        let mut last = recorded
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if last.as_deref() != Some(plan.conditions.as_slice())
                            && record_plan_conditions(&store, kind, &plan.conditions, now)
                        {
                            *last = Some(plan.conditions.clone());
                        }
                        plan.actions
                    }
                    Err(e) => {
                        // A bad stored record must not take the loop down: plan nothing
                        // until it is repaired, and say why.
                        tracing::error!(reconciler = %kind, error = %e, "cannot read the store");
                        Vec::new()
                    }
                }
            })
        })
        .collect()
}

/// Keeps the last real error of each failing action key as a condition `action/<key>` until
/// the key succeeds or is no longer planned.
pub struct StoreSink {
    pub store: Arc<Store>,
    pub clock: Clock,
}

impl OutcomeSink for StoreSink {
    fn failed(&self, reconciler: &'static str, key: &str, error: &str, attempts: u32) {
        let ckey = format!("action/{key}");
        let now = (self.clock)();
        let result = self.store.write(|tx| {
            let since = if attempts > 1 {
                tx.condition(&ckey)?.and_then(|c| c.since).or(Some(now))
            } else {
                Some(now)
            };
            tx.put_condition(
                &ckey,
                &Condition {
                    object: key.to_string(),
                    reason: "ActionFailed".to_string(),
                    message: format!("{reconciler}: {error} (attempt {attempts})"),
                    since,
                },
            )
        });
        if let Err(e) = result {
            tracing::warn!(key, error = %e, "could not record a failed action");
        }
    }

    fn succeeded(&self, _reconciler: &'static str, key: &str) {
        let ckey = format!("action/{key}");
        let result = self.store.write(|tx| {
            if tx.condition(&ckey)?.is_some() {
                tx.remove_condition(&ckey)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(key, error = %e, "could not clear a condition");
        }
    }
}
