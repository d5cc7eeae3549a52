//! The reconcile runner: the only place where plans turn into effects.
//!
//! Reconcilers are pure functions from a store snapshot to a list of actions (ARCHITECTURE
//! invariant 1). This module owns everything around them that involves time and concurrency:
//! when to plan (a watched table changed, a periodic resync, an action finished, a backoff came
//! due), which planned actions to start, and what to do with their outcomes. It guarantees
//! invariant 5: no two executions of the same key at once, and per-key exponential backoff with
//! jitter, reset on success, that never holds back other keys. Outcomes go to an [`OutcomeSink`],
//! which keeps the last error visible as a condition until the key succeeds.
//!
//! The runner never queues actions: when a key is busy, backing off or over the concurrency
//! limit, the action is dropped and the reconciler is planned again when that changes. A plan
//! is therefore always computed from a fresh snapshot, and a stale action is never executed.
//!
//! All time comes from tokio, so the whole scheduling core is tested with paused time.

use std::any::Any;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio::task::{Id as TaskId, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// An action a reconciler asks the runner to carry out.
pub trait RunnerAction: Clone + Send + Sync + fmt::Debug + 'static {
    /// Actions with the same key never run at the same time and share one backoff.
    fn key(&self) -> String;
}

/// The future an [`Executor`] returns for one action; `Err` carries the message shown to users.
pub type ExecFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Carries actions out through the edges (SM, image store, DNS, cloud).
pub trait Executor<A>: Send + Sync + 'static {
    /// Carries out every action one plan gave under one key, in plan order, as one execution
    /// (for example all starts and stops of one node, sent in one message).
    fn execute(&self, batch: Vec<A>) -> ExecFuture;
}

/// Where outcomes go (the integrator writes them to the store as conditions).
///
/// Called from the runner's loop: keep it quick, or hand the work to another task.
pub trait OutcomeSink: Send + Sync + 'static {
    /// The key's action failed; `attempts` counts the consecutive failures, starting at 1.
    fn failed(&self, reconciler: &'static str, key: &str, error: &str, attempts: u32);
    /// The key's action succeeded; any failure recorded for the key is over.
    fn succeeded(&self, reconciler: &'static str, key: &str);
    /// A key that had failed is no longer planned by any reconciler: what needed it is gone, or
    /// the unit converged without it. Its error no longer describes the unit, so by default the
    /// failure is cleared as if the key had succeeded.
    fn resolved(&self, reconciler: &'static str, key: &str) {
        self.succeeded(reconciler, key);
    }
    /// One plan of `reconciler` took `took` and gave `batches` batches of actions (metrics).
    fn planned(&self, _reconciler: &'static str, _took: std::time::Duration, _batches: usize) {}
}

/// The planning function every reconciler exposes.
pub type PlanFn<A> = Arc<dyn Fn() -> Vec<A> + Send + Sync>;

/// One reconciler as the runner sees it.
pub struct Reconciler<A> {
    pub name: &'static str,
    /// Names of the store tables this reconciler reads; a change to any wakes it.
    pub watches: Vec<&'static str>,
    /// Pure planning over a fresh snapshot; returns the actions that would converge the unit.
    pub plan: PlanFn<A>,
}

impl<A> Reconciler<A> {
    pub fn new(
        name: &'static str,
        watches: Vec<&'static str>,
        plan: impl Fn() -> Vec<A> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            watches,
            plan: Arc::new(plan),
        }
    }
}

impl<A> fmt::Debug for Reconciler<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconciler")
            .field("name", &self.name)
            .field("watches", &self.watches)
            .finish_non_exhaustive()
    }
}

/// Timing and concurrency limits of a [`Runner`].
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Longest time a reconciler goes without being planned; the safety net for missed changes.
    pub resync_period: Duration,
    /// Delay after a key's first failure.
    pub backoff_min: Duration,
    /// Ceiling of the delay between two attempts of a failing key, jitter included.
    pub backoff_max: Duration,
    /// Adds up to 100 % of the delay at random, so that keys which failed together (a node
    /// going away) do not retry together.
    pub jitter: bool,
    /// Actions running at once, over all keys.
    pub max_concurrent: usize,
    /// How long shutdown waits for running actions before abandoning them. Abandoning is safe
    /// because actions are idempotent and the plan after the restart redoes what is missing.
    pub shutdown_grace: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            resync_period: Duration::from_secs(30),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5 * 60),
            jitter: true,
            max_concurrent: 16,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl RunnerConfig {
    /// Zero periods would turn the loop into a busy loop and zero concurrency would stall it,
    /// so out-of-range values are raised to the smallest workable ones instead of failing.
    fn sanitized(mut self) -> Self {
        const FLOOR: Duration = Duration::from_millis(1);
        self.resync_period = self.resync_period.max(FLOOR);
        self.backoff_min = self.backoff_min.max(FLOOR);
        self.backoff_max = self.backoff_max.max(self.backoff_min);
        self.max_concurrent = self.max_concurrent.max(1);
        self
    }
}

/// Runs reconcilers and executes their plans; see the module documentation.
pub struct Runner<A> {
    reconcilers: Vec<Reconciler<A>>,
    executor: Arc<dyn Executor<A>>,
    sink: Arc<dyn OutcomeSink>,
    config: RunnerConfig,
}

impl<A: RunnerAction> Runner<A> {
    pub fn new(
        reconcilers: Vec<Reconciler<A>>,
        executor: Arc<dyn Executor<A>>,
        sink: Arc<dyn OutcomeSink>,
        config: RunnerConfig,
    ) -> Self {
        Self {
            reconcilers,
            executor,
            sink,
            config: config.sanitized(),
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped); `changes` carries the names
    /// of tables changed by each committed write.
    ///
    /// On shutdown no more plans are made; running actions get `shutdown_grace` to finish and
    /// their outcomes still reach the sink.
    pub async fn run(
        self,
        mut changes: mpsc::UnboundedReceiver<Vec<&'static str>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut state = LoopState::new(self);
        let mut changes_open = true;
        // Every reconciler plans once at start: nothing is known about what changed before.
        state.dirty.extend(0..state.reconcilers.len());

        loop {
            if *shutdown.borrow() {
                break;
            }
            if state.plan_dirty() {
                // Planning runs on this task's worker thread for as long as it takes (tens of
                // ms for a large unit), and while changes keep arriving the select below is
                // always ready at once, so without a yield this task could keep the thread
                // for many rounds: the actions it just spawned, queued on the same thread,
                // would wait that long to start (0.8 s was seen at 100 x 5,000).
                tokio::task::yield_now().await;
            }
            let deadline = state.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                Some(joined) = state.tasks.join_next_with_id(), if !state.tasks.is_empty() => {
                    state.on_joined(joined);
                    while let Some(joined) = state.tasks.try_join_next_with_id() {
                        state.on_joined(joined);
                    }
                }
                received = changes.recv(), if changes_open => match received {
                    Some(tables) => {
                        state.on_change(&tables);
                        // Coalesce a burst of writes into one planning round.
                        while let Ok(tables) = changes.try_recv() {
                            state.on_change(&tables);
                        }
                    }
                    None => {
                        warn!("store change channel closed; planning continues on resync only");
                        changes_open = false;
                    }
                },
                () = sleep_until_opt(deadline) => state.on_timers(),
            }
        }

        state.drain().await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The failure history of one key, kept until it succeeds or nobody plans it any more.
struct Backoff {
    delays: ExponentialBackoff,
    failures: u32,
    due: Instant,
    /// Reconcilers whose latest plan contains the key; when none is left the failure is moot.
    owners: BTreeSet<usize>,
}

#[derive(Default)]
struct KeyState {
    /// The reconciler whose action for this key is running.
    running: Option<usize>,
    /// Reconcilers that planned the key while it was busy or backing off, to be planned again
    /// as soon as it frees up.
    waiters: BTreeSet<usize>,
    backoff: Option<Backoff>,
}

impl KeyState {
    fn is_idle(&self) -> bool {
        self.running.is_none() && self.waiters.is_empty() && self.backoff.is_none()
    }
}

struct LoopState<A> {
    reconcilers: Vec<Reconciler<A>>,
    executor: Arc<dyn Executor<A>>,
    sink: Arc<dyn OutcomeSink>,
    config: RunnerConfig,
    watchers: HashMap<&'static str, Vec<usize>>,
    next_resync: Vec<Instant>,
    /// Per reconciler, the keys it planned that are backing off; lets a plan that no longer
    /// contains such a key release it.
    backing_off: Vec<BTreeSet<String>>,
    keys: HashMap<String, KeyState>,
    /// Backoff due times; an entry whose key has since moved on is skipped when it fires.
    timers: BTreeSet<(Instant, String)>,
    /// Reconcilers that were turned away by the concurrency limit; they plan again when a slot
    /// frees up.
    starved: BTreeSet<usize>,
    dirty: BTreeSet<usize>,
    tasks: JoinSet<Result<(), String>>,
    in_flight: HashMap<TaskId, (usize, String)>,
    jitter_seeds: RandomState,
}

impl<A: RunnerAction> LoopState<A> {
    fn new(runner: Runner<A>) -> Self {
        let Runner {
            reconcilers,
            executor,
            sink,
            config,
        } = runner;
        let mut watchers: HashMap<&'static str, Vec<usize>> = HashMap::new();
        for (idx, reconciler) in reconcilers.iter().enumerate() {
            for table in &reconciler.watches {
                let list = watchers.entry(table).or_default();
                if !list.contains(&idx) {
                    list.push(idx);
                }
            }
        }
        let now = Instant::now();
        Self {
            next_resync: vec![now; reconcilers.len()],
            backing_off: vec![BTreeSet::new(); reconcilers.len()],
            reconcilers,
            executor,
            sink,
            config,
            watchers,
            keys: HashMap::new(),
            timers: BTreeSet::new(),
            starved: BTreeSet::new(),
            dirty: BTreeSet::new(),
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            jitter_seeds: RandomState::new(),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let resync = self.next_resync.iter().min().copied();
        let backoff = self.timers.first().map(|(due, _)| *due);
        match (resync, backoff) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_change(&mut self, tables: &[&'static str]) {
        for table in tables {
            if let Some(list) = self.watchers.get(table) {
                self.dirty.extend(list.iter().copied());
            }
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        for (idx, at) in self.next_resync.iter().enumerate() {
            if *at <= now {
                self.dirty.insert(idx);
            }
        }
        while let Some((due, key)) = self.timers.pop_first() {
            if due > now {
                self.timers.insert((due, key));
                break;
            }
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            let current = state.backoff.as_ref().is_some_and(|b| b.due == due);
            if current && state.running.is_none() {
                self.dirty.append(&mut state.waiters);
            }
        }
    }

    /// Plans every dirty reconciler; whether there was any.
    fn plan_dirty(&mut self) -> bool {
        let dirty = std::mem::take(&mut self.dirty);
        let any = !dirty.is_empty();
        for idx in dirty {
            self.plan(idx);
        }
        any
    }

    fn plan(&mut self, idx: usize) {
        let now = Instant::now();
        self.next_resync[idx] = now + self.config.resync_period;
        let name = self.reconcilers[idx].name;
        let plan = Arc::clone(&self.reconcilers[idx].plan);
        // A panicking planner is a bug in one reconciler; it must not stop the others. Its keys
        // keep their state and the resync tries again.
        let started = std::time::Instant::now();
        let actions = match catch_unwind(AssertUnwindSafe(|| plan())) {
            Ok(actions) => actions,
            Err(panic) => {
                error!(reconciler = name, panic = %panic_message(&*panic), "planning panicked");
                return;
            }
        };
        debug!(reconciler = name, actions = actions.len(), "planned");

        // Actions that share a key form one batch, executed together, in plan order; keys in
        // the order of their first action.
        let mut order: Vec<String> = Vec::new();
        let mut batches: HashMap<String, Vec<A>> = HashMap::new();
        for action in actions {
            let key = action.key();
            let batch = batches.entry(key.clone()).or_default();
            if batch.is_empty() {
                order.push(key);
            }
            batch.push(action);
        }
        let planned: BTreeSet<String> = order.iter().cloned().collect();
        self.sink.planned(name, started.elapsed(), order.len());
        for key in order {
            if let Some(batch) = batches.remove(&key) {
                self.consider(idx, key, batch, now);
            }
        }
        self.release_unplanned(idx, &planned);
    }

    fn consider(&mut self, idx: usize, key: String, action: Vec<A>, now: Instant) {
        let name = self.reconcilers[idx].name;
        let state = self.keys.entry(key.clone()).or_default();
        if state.running.is_some() {
            debug!(
                reconciler = name,
                key, "key is running; planned again when it ends"
            );
            state.waiters.insert(idx);
            return;
        }
        if let Some(backoff) = state.backoff.as_mut() {
            backoff.owners.insert(idx);
            self.backing_off[idx].insert(key.clone());
            if now < backoff.due {
                debug!(reconciler = name, key, "key is backing off");
                state.waiters.insert(idx);
                return;
            }
        }
        if self.tasks.len() >= self.config.max_concurrent {
            debug!(reconciler = name, key, "concurrency limit reached");
            self.starved.insert(idx);
            if state.is_idle() {
                self.keys.remove(&key);
            }
            return;
        }

        state.running = Some(idx);
        debug!(reconciler = name, key, ?action, "executing");
        let executor = Arc::clone(&self.executor);
        // `execute` is called inside the task so that a panic in it is caught like one in the
        // future it returns.
        let handle = self
            .tasks
            .spawn(async move { executor.execute(action).await });
        self.in_flight.insert(handle.id(), (idx, key));
    }

    /// Keys this reconciler no longer plans stop being its failures; a failed key that nobody
    /// plans any more is forgotten and its condition resolved.
    fn release_unplanned(&mut self, idx: usize, planned: &BTreeSet<String>) {
        let released: Vec<String> = self.backing_off[idx]
            .iter()
            .filter(|key| !planned.contains(*key))
            .cloned()
            .collect();
        for key in released {
            self.backing_off[idx].remove(&key);
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            state.waiters.remove(&idx);
            let Some(backoff) = state.backoff.as_mut() else {
                continue;
            };
            backoff.owners.remove(&idx);
            // A running key keeps its history: its outcome decides what happens next.
            if backoff.owners.is_empty() && state.running.is_none() {
                state.backoff = None;
                info!(
                    reconciler = self.reconcilers[idx].name,
                    key, "failed key no longer planned"
                );
                self.sink.resolved(self.reconcilers[idx].name, &key);
                if state.is_idle() {
                    self.keys.remove(&key);
                }
            }
        }
    }

    fn on_joined(&mut self, joined: Result<(TaskId, Result<(), String>), JoinError>) {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, outcome),
            Err(err) if err.is_panic() => {
                let id = err.id();
                let message = panic_message(&*err.into_panic());
                (id, Err(format!("action panicked: {message}")))
            }
            Err(err) => {
                // Only shutdown aborts tasks; the outcome is unknown, so nothing is reported.
                if let Some((idx, key)) = self.in_flight.remove(&err.id()) {
                    warn!(
                        reconciler = self.reconcilers[idx].name,
                        key, "action abandoned"
                    );
                }
                return;
            }
        };
        let Some((idx, key)) = self.in_flight.remove(&id) else {
            return;
        };
        self.finish(idx, key, outcome);
    }

    fn finish(&mut self, idx: usize, key: String, outcome: Result<(), String>) {
        let name = self.reconcilers[idx].name;
        let now = Instant::now();
        // A freed key or slot may unblock a plan that was turned away.
        self.dirty.insert(idx);
        self.dirty.append(&mut self.starved);
        let state = self.keys.entry(key.clone()).or_default();
        state.running = None;
        self.dirty.append(&mut state.waiters);

        match outcome {
            Ok(()) => {
                if let Some(backoff) = state.backoff.take() {
                    for owner in backoff.owners {
                        self.backing_off[owner].remove(&key);
                    }
                    info!(reconciler = name, key, "key recovered");
                }
                debug!(reconciler = name, key, "action succeeded");
                self.sink.succeeded(name, &key);
                if state.is_idle() {
                    self.keys.remove(&key);
                }
            }
            Err(message) => {
                let backoff = state.backoff.get_or_insert_with(|| Backoff {
                    delays: backoff_delays(&self.config, &self.jitter_seeds, &key),
                    failures: 0,
                    due: now,
                    owners: BTreeSet::new(),
                });
                backoff.failures = backoff.failures.saturating_add(1);
                // Backon caps the base delay; jitter is added on top, so cap once more to keep
                // `backoff_max` a true ceiling. The builder never runs dry, but if it did the
                // ceiling is the sensible delay.
                let delay = backoff
                    .delays
                    .next()
                    .unwrap_or(self.config.backoff_max)
                    .min(self.config.backoff_max);
                backoff.due = now + delay;
                backoff.owners.insert(idx);
                self.backing_off[idx].insert(key.clone());
                state.waiters.insert(idx);
                self.timers.insert((backoff.due, key.clone()));
                warn!(
                    reconciler = name,
                    key,
                    error = %message,
                    attempts = backoff.failures,
                    retry_in = ?delay,
                    "action failed"
                );
                self.sink.failed(name, &key, &message, backoff.failures);
            }
        }
    }

    /// Lets running actions finish within the grace period, reporting their outcomes.
    async fn drain(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        info!(
            running = self.tasks.len(),
            "shutdown: waiting for running actions"
        );
        let grace = self.config.shutdown_grace;
        let finished = tokio::time::timeout(grace, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.on_joined(joined);
            }
        })
        .await;
        if finished.is_err() {
            warn!(
                running = self.tasks.len(),
                "shutdown grace period over; abandoning actions"
            );
            self.tasks.abort_all();
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.on_joined(joined);
            }
        }
    }
}

fn backoff_delays(config: &RunnerConfig, seeds: &RandomState, key: &str) -> ExponentialBackoff {
    let mut builder = ExponentialBuilder::default()
        .with_min_delay(config.backoff_min)
        .with_max_delay(config.backoff_max)
        .without_max_times();
    if config.jitter {
        // Without backon's `std` feature every backoff would draw the same jitter sequence from
        // a fixed seed, which defeats the point of jitter; seed each key differently instead.
        builder = builder.with_jitter().with_jitter_seed(seeds.hash_one(key));
    }
    builder.build()
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Mutex;
    use tokio::time::sleep;

    const SEC: Duration = Duration::from_secs(1);

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct TestAction(String);

    impl RunnerAction for TestAction {
        fn key(&self) -> String {
            self.0.clone()
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Phase {
        Start,
        Finish,
    }

    #[derive(Debug, Clone)]
    struct Event {
        key: String,
        phase: Phase,
        at: Instant,
    }

    /// What the test scripts and what the executor records; doubles as the "store" the
    /// planners read, so an action that succeeds converges its key unless it is sticky.
    #[derive(Default)]
    struct World {
        /// Keys the planners still want acted on.
        pending: BTreeSet<String>,
        /// Keys that stay pending after success, to keep an executor busy.
        sticky: BTreeSet<String>,
        /// Remaining scripted failures per key.
        failures: HashMap<String, u32>,
        /// Scripted outcomes per key (`false` fails), taking precedence over `failures`; the key
        /// stays pending until its script is used up.
        script: HashMap<String, VecDeque<bool>>,
        durations: HashMap<String, Duration>,
        /// Panic instead of failing, for the given key.
        panics: BTreeSet<String>,
        events: Vec<Event>,
        running: HashMap<String, u32>,
        max_running_per_key: HashMap<String, u32>,
        running_total: u32,
        max_running_total: u32,
        attempts: HashMap<String, u32>,
        batch_sizes: Vec<(String, usize)>,
    }

    type Shared = Arc<Mutex<World>>;

    struct RecordingExecutor(Shared);

    impl Executor<TestAction> for RecordingExecutor {
        fn execute(&self, batch: Vec<TestAction>) -> ExecFuture {
            let world = Arc::clone(&self.0);
            Box::pin(async move {
                let Some(action) = batch.first().cloned() else {
                    return Ok(());
                };
                world
                    .lock()
                    .unwrap()
                    .batch_sizes
                    .push((action.0.clone(), batch.len()));
                let key = action.0;
                let duration = {
                    let mut w = world.lock().unwrap();
                    let now = Instant::now();
                    w.events.push(Event {
                        key: key.clone(),
                        phase: Phase::Start,
                        at: now,
                    });
                    let running = w.running.entry(key.clone()).or_default();
                    *running += 1;
                    let running = *running;
                    let max = w.max_running_per_key.entry(key.clone()).or_default();
                    *max = (*max).max(running);
                    w.running_total += 1;
                    w.max_running_total = w.max_running_total.max(w.running_total);
                    w.durations.get(&key).copied().unwrap_or_default()
                };
                sleep(duration).await;
                let mut w = world.lock().unwrap();
                w.events.push(Event {
                    key: key.clone(),
                    phase: Phase::Finish,
                    at: Instant::now(),
                });
                *w.running.get_mut(&key).unwrap() -= 1;
                w.running_total -= 1;
                let attempt = {
                    let a = w.attempts.entry(key.clone()).or_default();
                    *a += 1;
                    *a
                };
                let scripted = w.script.get_mut(&key).and_then(VecDeque::pop_front);
                let fail = match (scripted, w.failures.get_mut(&key)) {
                    (Some(ok), _) => !ok,
                    (None, Some(n)) if *n > 0 => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                };
                let script_left = w.script.get(&key).is_some_and(|s| !s.is_empty());
                if fail {
                    if w.panics.contains(&key) {
                        drop(w);
                        panic!("boom in {key}");
                    }
                    return Err(format!("boom {attempt}"));
                }
                if !w.sticky.contains(&key) && !script_left {
                    w.pending.remove(&key);
                }
                Ok(())
            })
        }
    }

    /// Keeps what a condition table would: the last error per key until it is cleared.
    #[derive(Default)]
    struct RecordingSink {
        conditions: Mutex<BTreeMap<String, (String, u32)>>,
        failures: Mutex<Vec<(String, u32)>>,
        successes: Mutex<Vec<String>>,
        resolved: Mutex<Vec<String>>,
    }

    impl OutcomeSink for RecordingSink {
        fn failed(&self, _reconciler: &'static str, key: &str, error: &str, attempts: u32) {
            self.conditions
                .lock()
                .unwrap()
                .insert(key.to_owned(), (error.to_owned(), attempts));
            self.failures
                .lock()
                .unwrap()
                .push((key.to_owned(), attempts));
        }
        fn succeeded(&self, _reconciler: &'static str, key: &str) {
            self.conditions.lock().unwrap().remove(key);
            self.successes.lock().unwrap().push(key.to_owned());
        }
        fn resolved(&self, _reconciler: &'static str, key: &str) {
            self.conditions.lock().unwrap().remove(key);
            self.resolved.lock().unwrap().push(key.to_owned());
        }
    }

    impl RecordingSink {
        fn condition(&self, key: &str) -> Option<(String, u32)> {
            self.conditions.lock().unwrap().get(key).cloned()
        }
    }

    /// A reconciler that plans one action per pending key accepted by `filter`, and counts
    /// how often it was planned.
    fn reconciler(
        name: &'static str,
        watches: Vec<&'static str>,
        world: &Shared,
        filter: fn(&str) -> bool,
    ) -> (Reconciler<TestAction>, Arc<Mutex<u32>>) {
        let world = Arc::clone(world);
        let count = Arc::new(Mutex::new(0));
        let counter = Arc::clone(&count);
        let rec = Reconciler::new(name, watches, move || {
            *counter.lock().unwrap() += 1;
            let w = world.lock().unwrap();
            w.pending
                .iter()
                .filter(|k| filter(k))
                .map(|k| TestAction(k.clone()))
                .collect()
        });
        (rec, count)
    }

    fn all(_: &str) -> bool {
        true
    }

    struct Harness {
        world: Shared,
        sink: Arc<RecordingSink>,
        changes: mpsc::UnboundedSender<Vec<&'static str>>,
        shutdown: watch::Sender<bool>,
        handle: tokio::task::JoinHandle<()>,
        t0: Instant,
    }

    impl Harness {
        fn start(
            world: Shared,
            reconcilers: Vec<Reconciler<TestAction>>,
            config: RunnerConfig,
        ) -> Self {
            let sink = Arc::new(RecordingSink::default());
            let runner = Runner::new(
                reconcilers,
                Arc::new(RecordingExecutor(Arc::clone(&world))),
                Arc::clone(&sink) as Arc<dyn OutcomeSink>,
                config,
            );
            let (changes, changes_rx) = mpsc::unbounded_channel();
            let (shutdown, shutdown_rx) = watch::channel(false);
            let t0 = Instant::now();
            let handle = tokio::spawn(runner.run(changes_rx, shutdown_rx));
            Self {
                world,
                sink,
                changes,
                shutdown,
                handle,
                t0,
            }
        }

        /// Sleeps until `secs` after the start, letting the runner work through paused time.
        async fn until(&self, secs: f64) {
            tokio::time::sleep_until(self.t0 + Duration::from_secs_f64(secs)).await;
        }

        fn starts(&self, key: &str) -> Vec<Duration> {
            self.events(key, Phase::Start)
        }

        fn events(&self, key: &str, phase: Phase) -> Vec<Duration> {
            let w = self.world.lock().unwrap();
            w.events
                .iter()
                .filter(|e| e.key == key && e.phase == phase)
                .map(|e| e.at - self.t0)
                .collect()
        }

        async fn stop(self) {
            self.shutdown.send(true).unwrap();
            self.handle.await.unwrap();
        }
    }

    fn world(pending: &[&str]) -> Shared {
        let world = World {
            pending: pending.iter().map(|k| (*k).to_owned()).collect(),
            ..World::default()
        };
        Arc::new(Mutex::new(world))
    }

    fn no_jitter() -> RunnerConfig {
        RunnerConfig {
            jitter: false,
            ..RunnerConfig::default()
        }
    }

    fn gaps(times: &[Duration]) -> Vec<Duration> {
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn failing_key_backs_off_exponentially_while_other_keys_run() {
        let world = world(&["bad", "good"]);
        {
            let mut w = world.lock().unwrap();
            w.failures.insert("bad".into(), u32::MAX);
            w.sticky.insert("good".into());
            w.durations
                .insert("good".into(), Duration::from_millis(250));
        }
        let (rec, _) = reconciler("r", vec!["t"], &world, all);
        let config = RunnerConfig {
            backoff_max: Duration::from_secs(8),
            resync_period: Duration::from_secs(3600),
            ..no_jitter()
        };
        let h = Harness::start(Arc::clone(&world), vec![rec], config);
        h.until(40.0).await;

        let bad = h.starts("bad");
        assert_eq!(
            gaps(&bad)[..7],
            [1, 2, 4, 8, 8, 8, 8].map(Duration::from_secs),
            "starts of bad: {bad:?}"
        );
        assert_eq!(bad[0], Duration::ZERO);
        // The healthy key ran back to back the whole time, never waiting on the failing one.
        let good = h.starts("good");
        assert!(good.len() >= 160, "good ran {} times", good.len());
        assert!(
            gaps(&good).iter().all(|g| *g == Duration::from_millis(250)),
            "good was delayed: {:?}",
            gaps(&good)
        );
        assert_eq!(h.sink.condition("bad").map(|c| c.1), Some(bad.len() as u32));
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_backoff_grows_within_min_and_max() {
        let world = world(&["bad"]);
        world
            .lock()
            .unwrap()
            .failures
            .insert("bad".into(), u32::MAX);
        let (rec, _) = reconciler("r", vec!["t"], &world, all);
        let config = RunnerConfig {
            backoff_min: SEC,
            backoff_max: Duration::from_secs(10),
            jitter: true,
            resync_period: Duration::from_secs(3600),
            ..RunnerConfig::default()
        };
        let h = Harness::start(Arc::clone(&world), vec![rec], config);
        h.until(200.0).await;

        let gaps = gaps(&h.starts("bad"));
        assert!(gaps.len() >= 10, "{gaps:?}");
        let mut base = SEC;
        for (n, gap) in gaps.iter().enumerate() {
            let ceiling = (base * 2).min(Duration::from_secs(10));
            assert!(
                *gap >= base && *gap <= ceiling,
                "gap {n} = {gap:?} outside [{base:?}, {ceiling:?}]"
            );
            base = (base * 2).min(Duration::from_secs(10));
        }
        assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_backoff() {
        let world = world(&["k"]);
        // Still planned after its success (the script is not used up), so nothing but the
        // success itself can reset the backoff.
        world.lock().unwrap().script.insert(
            "k".into(),
            VecDeque::from([false, false, false, true, false, true]),
        );
        let (rec, _) = reconciler("r", vec!["t"], &world, all);
        let h = Harness::start(Arc::clone(&world), vec![rec], no_jitter());
        h.until(30.0).await;

        // Delays 1, 2, 4; success at 7 and an immediate re-plan that fails; had the backoff
        // survived the success, the retry would come at 15, not at 8.
        assert_eq!(h.starts("k"), [0, 1, 3, 7, 7, 8].map(Duration::from_secs));
        let attempts: Vec<u32> = h
            .sink
            .failures
            .lock()
            .unwrap()
            .iter()
            .map(|f| f.1)
            .collect();
        assert_eq!(attempts, [1, 2, 3, 1]);
        assert_eq!(h.sink.condition("k"), None);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn same_key_never_runs_twice_at_once() {
        let world = world(&["slow"]);
        {
            let mut w = world.lock().unwrap();
            w.sticky.insert("slow".into());
            w.durations.insert("slow".into(), Duration::from_secs(10));
        }
        // Two reconcilers planning the same key must share its exclusion too.
        let (a, _) = reconciler("a", vec!["t"], &world, all);
        let (b, _) = reconciler("b", vec!["t"], &world, all);
        let h = Harness::start(Arc::clone(&world), vec![a, b], no_jitter());
        for second in 1..=35 {
            h.until(f64::from(second)).await;
            h.changes.send(vec!["t"]).unwrap();
        }
        h.until(35.5).await;

        let starts = h.starts("slow");
        assert_eq!(starts, [0, 10, 20, 30].map(Duration::from_secs));
        assert_eq!(h.world.lock().unwrap().max_running_per_key["slow"], 1);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn actions_sharing_a_key_run_as_one_batch() {
        let world = world(&["node-a", "other"]);
        // A planner that names "node-a" three times in one plan (three instances of one node)
        // and "other" once; a key leaves the plan once it succeeded.
        let w2 = Arc::clone(&world);
        let rec = Reconciler::new("r", vec!["t"], move || {
            let w = w2.lock().unwrap();
            let mut out = Vec::new();
            for k in &w.pending {
                let n = if k == "node-a" { 3 } else { 1 };
                out.extend(std::iter::repeat_n(TestAction(k.clone()), n));
            }
            out
        });
        let h = Harness::start(Arc::clone(&world), vec![rec], no_jitter());
        h.until(0.5).await;
        let sizes = h.world.lock().unwrap().batch_sizes.clone();
        assert!(sizes.contains(&("node-a".to_string(), 3)), "{sizes:?}");
        assert!(sizes.contains(&("other".to_string(), 1)), "{sizes:?}");
        assert_eq!(
            h.starts("node-a").len(),
            1,
            "one execution for the whole batch"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn missed_change_is_caught_by_resync() {
        let world = world(&[]);
        let (rec, count) = reconciler("r", vec!["t"], &world, all);
        let config = RunnerConfig {
            resync_period: Duration::from_secs(30),
            ..no_jitter()
        };
        let h = Harness::start(Arc::clone(&world), vec![rec], config);
        h.until(5.0).await;
        // The store changed, but the notification was lost.
        h.world.lock().unwrap().pending.insert("k".into());
        h.until(36.0).await;

        let starts = h.starts("k");
        assert_eq!(starts.len(), 1, "{starts:?}");
        assert!(starts[0] > Duration::from_secs(5) && starts[0] <= Duration::from_secs(35));
        assert_eq!(starts[0], Duration::from_secs(30));
        // Start, resync at 30, and the re-plan after the action finished.
        assert_eq!(*count.lock().unwrap(), 3);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn error_stays_visible_until_success() {
        let world = world(&["k"]);
        world.lock().unwrap().failures.insert("k".into(), 3);
        let (rec, _) = reconciler("r", vec!["t"], &world, all);
        let h = Harness::start(Arc::clone(&world), vec![rec], no_jitter());

        h.until(0.5).await;
        assert_eq!(h.sink.condition("k"), Some(("boom 1".into(), 1)));
        h.until(2.5).await;
        assert_eq!(h.sink.condition("k"), Some(("boom 2".into(), 2)));
        // Changes while backing off neither retry early nor clear the error.
        h.changes.send(vec!["t"]).unwrap();
        h.until(6.5).await;
        assert_eq!(h.sink.condition("k"), Some(("boom 3".into(), 3)));
        assert_eq!(h.starts("k").len(), 3);
        h.until(7.5).await;
        assert_eq!(h.sink.condition("k"), None);
        assert_eq!(*h.sink.successes.lock().unwrap(), ["k"]);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn failed_key_no_longer_planned_is_resolved_and_forgotten() {
        let world = world(&["k"]);
        world.lock().unwrap().failures.insert("k".into(), u32::MAX);
        let (rec, _) = reconciler("r", vec!["t"], &world, all);
        let h = Harness::start(Arc::clone(&world), vec![rec], no_jitter());
        h.until(2.5).await;
        assert_eq!(h.sink.condition("k"), Some(("boom 2".into(), 2)));

        // The desired state dropped the key: its error no longer describes the unit.
        h.world.lock().unwrap().pending.remove("k");
        h.changes.send(vec!["t"]).unwrap();
        h.until(3.0).await;
        assert_eq!(h.sink.condition("k"), None);
        assert_eq!(*h.sink.resolved.lock().unwrap(), ["k"]);

        // Wanted again, it starts fresh: immediately, with the minimum backoff after.
        h.world.lock().unwrap().pending.insert("k".into());
        h.changes.send(vec!["t"]).unwrap();
        h.until(5.0).await;
        assert_eq!(
            h.starts("k"),
            [0.0, 1.0, 3.0, 4.0].map(Duration::from_secs_f64)
        );
        assert_eq!(h.sink.condition("k").map(|c| c.1), Some(2));
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn unwatched_table_does_not_wake() {
        let world = world(&[]);
        let (images, images_count) = reconciler("images", vec!["desired", "items"], &world, all);
        let (network, network_count) = reconciler("network", vec!["nodes"], &world, all);
        let h = Harness::start(Arc::clone(&world), vec![images, network], no_jitter());
        h.until(1.0).await;
        assert_eq!(*images_count.lock().unwrap(), 1);
        assert_eq!(*network_count.lock().unwrap(), 1);

        h.changes.send(vec!["items"]).unwrap();
        h.until(2.0).await;
        assert_eq!(*images_count.lock().unwrap(), 2);
        assert_eq!(*network_count.lock().unwrap(), 1);

        h.changes.send(vec!["conditions"]).unwrap();
        h.until(3.0).await;
        assert_eq!(*images_count.lock().unwrap(), 2);
        assert_eq!(*network_count.lock().unwrap(), 1);

        h.changes.send(vec!["nodes", "desired"]).unwrap();
        h.until(4.0).await;
        assert_eq!(*images_count.lock().unwrap(), 3);
        assert_eq!(*network_count.lock().unwrap(), 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_running_actions() {
        let world = world(&["slow"]);
        world
            .lock()
            .unwrap()
            .durations
            .insert("slow".into(), Duration::from_secs(10));
        let (rec, count) = reconciler("r", vec!["t"], &world, all);
        let h = Harness::start(Arc::clone(&world), vec![rec], no_jitter());
        h.until(1.0).await;
        h.shutdown.send(true).unwrap();
        // Neither a change nor a newly pending key leads to planning once shutdown began.
        h.world.lock().unwrap().pending.insert("other".into());
        h.changes.send(vec!["t"]).unwrap();
        h.until(5.0).await;
        assert!(!h.handle.is_finished());

        let Harness {
            handle,
            world,
            sink,
            t0,
            ..
        } = h;
        handle.await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_secs(10));
        let w = world.lock().unwrap();
        assert_eq!(w.events.len(), 2, "{:?}", w.events);
        assert_eq!(w.events[1].phase, Phase::Finish);
        assert_eq!(*sink.successes.lock().unwrap(), ["slow"]);
        assert_eq!(*count.lock().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_abandons_actions_after_grace() {
        let world = world(&["stuck"]);
        world
            .lock()
            .unwrap()
            .durations
            .insert("stuck".into(), Duration::from_secs(1000));
        let (rec, _) = reconciler("r", vec!["t"], &world, all);
        let config = RunnerConfig {
            shutdown_grace: Duration::from_secs(5),
            ..no_jitter()
        };
        let h = Harness::start(Arc::clone(&world), vec![rec], config);
        h.until(1.0).await;
        let (t0, sink) = (h.t0, Arc::clone(&h.sink));
        h.stop().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(6));
        assert!(sink.successes.lock().unwrap().is_empty());
        assert_eq!(sink.condition("stuck"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_shutdown_sender_stops_the_runner() {
        let world = world(&[]);
        let (rec, _) = reconciler("r", vec!["t"], &world, all);
        let h = Harness::start(Arc::clone(&world), vec![rec], no_jitter());
        h.until(1.0).await;
        let Harness {
            handle, shutdown, ..
        } = h;
        drop(shutdown);
        tokio::time::timeout(SEC, handle).await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded_and_every_key_runs() {
        let keys = ["a", "b", "c", "d", "e"];
        let world = world(&keys);
        {
            let mut w = world.lock().unwrap();
            for k in keys {
                w.durations.insert(k.into(), SEC);
            }
        }
        // The second reconciler finds no free slot at start; it must get one when a slot
        // frees up, not only at the next resync.
        let (first, _) = reconciler("first", vec!["t"], &world, |k| k < "c");
        let (second, _) = reconciler("second", vec!["t"], &world, |k| k >= "c");
        let config = RunnerConfig {
            max_concurrent: 2,
            ..no_jitter()
        };
        let h = Harness::start(Arc::clone(&world), vec![first, second], config);
        h.until(3.5).await;
        {
            let w = h.world.lock().unwrap();
            assert_eq!(w.max_running_total, 2);
            assert!(w.pending.is_empty());
            let starts = w.events.iter().filter(|e| e.phase == Phase::Start).count();
            assert_eq!(starts, 5);
        }
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn panics_are_contained() {
        let world = world(&["p", "ok"]);
        {
            let mut w = world.lock().unwrap();
            w.failures.insert("p".into(), 1);
            w.panics.insert("p".into());
        }
        let (good, _) = reconciler("good", vec!["t"], &world, all);
        let broken = Reconciler::new("broken", vec!["t"], || -> Vec<TestAction> {
            panic!("planner bug")
        });
        let h = Harness::start(Arc::clone(&world), vec![broken, good], no_jitter());
        h.until(0.5).await;
        let condition = h.sink.condition("p").unwrap();
        assert!(condition.0.contains("boom in p"), "{condition:?}");
        assert_eq!(condition.1, 1);
        h.until(1.5).await;
        assert_eq!(h.sink.condition("p"), None);
        assert!(h.sink.successes.lock().unwrap().contains(&"ok".to_owned()));
        h.stop().await;
    }

    #[tokio::test]
    async fn an_action_starts_while_writes_keep_landing_during_planning() {
        let world: Shared = Arc::default();
        world.lock().unwrap().pending.insert("k".into());
        let (changes, changes_rx) = mpsc::unbounded_channel();
        let plans = Arc::new(Mutex::new(0u32));
        let (w, p) = (Arc::clone(&world), Arc::clone(&plans));
        let rec = Reconciler::new("busy", vec!["t"], move || {
            *p.lock().unwrap() += 1;
            // A write lands during every planning round, as statuses do in a busy unit, so
            // the runner always has a change waiting when it finishes planning.
            let _ = changes.send(vec!["t"]);
            let w = w.lock().unwrap();
            w.pending.iter().map(|k| TestAction(k.clone())).collect()
        });
        let runner = Runner::new(
            vec![rec],
            Arc::new(RecordingExecutor(Arc::clone(&world))),
            Arc::new(RecordingSink::default()) as Arc<dyn OutcomeSink>,
            RunnerConfig::default(),
        );
        let (shutdown, shutdown_rx) = watch::channel(false);
        let handle = tokio::spawn(runner.run(changes_rx, shutdown_rx));
        while world.lock().unwrap().events.is_empty() {
            tokio::task::yield_now().await;
        }
        // The action spawned by the first round starts after at most one more round.
        let rounds = *plans.lock().unwrap();
        assert!(
            rounds <= 2,
            "the action waited for {rounds} planning rounds"
        );
        shutdown.send(true).unwrap();
        handle.await.unwrap();
    }
}
