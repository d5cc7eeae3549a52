//! The update scheduler edge: a task that follows the store, derives where the SOTA and FOTA
//! updates stand (`reconcilers::schedule`), keeps the scheduler's record in the store (updates
//! reached, timetable slots opened, activations timed out), and publishes every change of
//! status; and the `communicationmanager.v3.UpdateSchedulerService` that serves it to a local
//! client on its own listener.
//!
//! It may import the model, the store, the pure scheduler core and the generated protobuf code.

mod service;

pub use service::{SchedulerService, serve};

use crate::engine::Clock;
use crate::model::*;
use crate::reconcilers::schedule::{self, UpdateStatus};
use crate::store::{Store, StoreError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::broadcast;

/// How long to wait before reading the store again after it failed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A pass plans the reconcilers of both kinds: well under a millisecond for a small unit, tens
/// of milliseconds at thousands of instances. The next pass starts no sooner than this many
/// times the last one's duration after it started, so that the scheduler takes at most a
/// third of a core however fast changes arrive (a burst of instance reports is covered by one
/// pass), while a small unit sees every state.
const PASS_SPACING: u32 = 3;

/// Stores the configured policies in the plan settings, where the gate reads them.
pub fn apply_policies(store: &Store, schedules: &UpdateSchedules) -> Result<(), StoreError> {
    store.write(|tx| {
        let mut settings = tx.settings()?;
        if settings.update_schedules != *schedules {
            settings.update_schedules = schedules.clone();
            tx.set_settings(&settings)?;
        }
        Ok(())
    })
}

/// The status of both kinds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statuses {
    pub sota: UpdateStatus,
    pub fota: UpdateStatus,
}

impl Statuses {
    pub fn of(&self, kind: UpdateKind) -> &UpdateStatus {
        match kind {
            UpdateKind::Sota => &self.sota,
            UpdateKind::Fota => &self.fota,
        }
    }
}

/// One change of status, as subscribers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub kind: UpdateKind,
    pub status: UpdateStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("nothing is ready to update: the {kind} update is {state}")]
    NotReady {
        kind: UpdateKind,
        state: UpdateState,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where the instance states last changed: the activation timeout counts from there.
#[derive(Default)]
struct InstanceWatch {
    states: Option<BTreeMap<InstanceIdent, InstanceState>>,
    changed_at: UnixMillis,
}

pub struct Scheduler {
    store: Arc<Store>,
    clock: Clock,
    /// `None` until first asked for or published; see `current`.
    current: Mutex<Option<Statuses>>,
    changes: broadcast::Sender<StatusChange>,
}

impl Scheduler {
    /// The first statuses come from the store, so that a client subscribing right after a
    /// restart sees where the updates stood, not NO_UPDATE. They are read when first needed
    /// rather than here: reading the whole store at construction held up the daemon's start.
    pub fn new(store: Arc<Store>, clock: Clock) -> Arc<Scheduler> {
        let (changes, _) = broadcast::channel(64);
        Arc::new(Scheduler {
            store,
            clock,
            current: Mutex::new(None),
            changes,
        })
    }

    /// The published statuses, first read from the store when none were yet.
    fn current(&self) -> std::sync::MutexGuard<'_, Option<Statuses>> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.is_none() {
            *current = Some(
                self.store
                    .shared_snapshot()
                    .map(|snap| Self::statuses_of(&snap, (self.clock)()))
                    .unwrap_or_default(),
            );
        }
        current
    }

    /// The current statuses and a receiver of every later change, with no gap between them.
    pub fn subscribe(&self) -> (Statuses, broadcast::Receiver<StatusChange>) {
        let current = self.current();
        (
            current.clone().unwrap_or_default(),
            self.changes.subscribe(),
        )
    }

    /// The statuses as last published.
    pub fn statuses(&self) -> Statuses {
        self.current().clone().unwrap_or_default()
    }

    /// Publishes what changed, FOTA first (the order a new subscriber sees).
    fn publish(&self, new: Statuses) {
        let mut guard = self.current();
        let current = guard.get_or_insert_with(Statuses::default);
        for kind in [UpdateKind::Fota, UpdateKind::Sota] {
            if current.of(kind) != new.of(kind) {
                let status = new.of(kind).clone();
                match kind {
                    UpdateKind::Sota => current.sota = status.clone(),
                    UpdateKind::Fota => current.fota = status.clone(),
                }
                tracing::info!(%kind, state = %status.state, "update status");
                // No subscriber is not an error.
                let _ = self.changes.send(StatusChange { kind, status });
            }
        }
    }

    fn statuses_of(snap: &Snapshot, now: UnixMillis) -> Statuses {
        Statuses {
            sota: schedule::status(snap, UpdateKind::Sota, now),
            fota: schedule::status(snap, UpdateKind::Fota, now),
        }
    }

    /// StartSOTAUpdate / StartFOTAUpdate: approves the kind's update that is ready.
    pub fn start_update(&self, kind: UpdateKind) -> Result<(), SchedulerError> {
        let now = (self.clock)();
        let mut snap = self.store.snapshot()?;
        let state = schedule::status(&snap, kind, now).state;
        let (UpdateState::ReadyToUpdate, Some(desired)) = (state, snap.desired.as_ref()) else {
            return Err(SchedulerError::NotReady { kind, state });
        };
        let fp = schedule::fingerprint(desired, kind);
        snap.progress.of_mut(kind).approved = Some(fp);
        let progress = snap.progress.clone();
        self.store.write(|tx| tx.set_update_progress(&progress))?;
        tracing::info!(%kind, "update started by a local client");
        // Published now, so that a subscriber sees UPDATING even when the unit gets there
        // before the task's next pass.
        self.publish(Self::statuses_of(&snap, now));
        Ok(())
    }

    /// One pass: records what the snapshot says was reached, opened or timed out; publishes the
    /// statuses once the record is settled. Returns when to look again without a store change.
    fn pass(&self, watch: &mut InstanceWatch) -> Result<Option<UnixMillis>, StoreError> {
        let now = (self.clock)();
        let snap = self.store.shared_snapshot()?;
        let states: BTreeMap<InstanceIdent, InstanceState> = snap
            .observed
            .instances
            .iter()
            .map(|(k, r)| (k.clone(), r.state))
            .collect();
        if watch.states.as_ref() != Some(&states) {
            watch.states = Some(states);
            watch.changed_at = now;
        }
        let statuses = Self::statuses_of(&snap, now);
        let mut progress = snap.progress.clone();
        let mut wake: Option<UnixMillis> = None;
        let mut sooner = |at: UnixMillis| wake = Some(wake.map_or(at, |w: UnixMillis| w.min(at)));
        if let Some(desired) = snap.desired.as_ref() {
            progress.correlation_id = desired.correlation_id.clone();
            for kind in UpdateKind::ALL {
                let fp = schedule::fingerprint(desired, kind);
                let policy = snap.settings.update_schedules.of(kind);
                let rec = progress.of_mut(kind);
                match statuses.of(kind).state {
                    UpdateState::NoUpdate if rec.done.as_deref() != Some(fp.as_str()) => {
                        rec.done = Some(fp);
                        rec.error = None;
                    }
                    UpdateState::ReadyToUpdate if policy.policy == UpdatePolicy::Timetable => {
                        match policy.next_window(now) {
                            Some(at) if at <= now => {
                                tracing::info!(%kind, "update window open");
                                rec.approved = Some(fp);
                            }
                            Some(at) => sooner(at),
                            None => {}
                        }
                    }
                    UpdateState::Updating => {
                        if let Some(error) =
                            schedule::activation_overdue(&snap, kind, watch.changed_at, now)
                        {
                            tracing::warn!(%kind, %error, "update failed");
                            rec.done = Some(fp);
                            rec.error = Some(error);
                        } else if !schedule::activating(&snap, kind).is_empty() {
                            sooner(watch.changed_at + schedule::ACTIVATION_TIMEOUT_MS);
                        }
                    }
                    _ => {}
                }
            }
        }
        progress.state = format!("sota {}, fota {}", statuses.sota.state, statuses.fota.state);
        if progress != snap.progress {
            // The commit wakes the next pass, which publishes from the settled record.
            self.store.write(|tx| tx.set_update_progress(&progress))?;
            return Ok(Some(now));
        }
        self.publish(statuses);
        Ok(wake)
    }

    /// Follows the store until `stop` turns true (or its sender is dropped).
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut watch = InstanceWatch::default();
        let mut next_allowed: Option<tokio::time::Instant> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            if let Some(at) = next_allowed.filter(|at| *at > tokio::time::Instant::now()) {
                tokio::select! {
                    // A stop seen here must end the task: the wait below would not see it again.
                    changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
                    () = tokio::time::sleep_until(at) => {}
                }
                while changes.try_recv().is_ok() {}
            }
            let started = std::time::Instant::now();
            let started_at = tokio::time::Instant::now();
            let now = (self.clock)();
            // Planning is CPU work: off the async workers.
            let this = self.clone();
            let (result, w) = match tokio::task::spawn_blocking(move || {
                let r = this.pass(&mut watch);
                (r, watch)
            })
            .await
            {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!("update scheduler pass failed: {e}");
                    return;
                }
            };
            watch = w;
            next_allowed = Some(started_at + started.elapsed() * PASS_SPACING);
            let wait = match result {
                Ok(Some(at)) => Some(Duration::from_millis(
                    u64::try_from(at.saturating_sub(now)).unwrap_or(0),
                )),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "update scheduler cannot read the store");
                    Some(RETRY_AFTER)
                }
            };
            let timer = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
                change = changes.recv() => if change.is_none() { return },
                () = timer => {}
            }
            // One pass covers every change queued so far.
            while changes.try_recv().is_ok() {}
        }
    }
}
