//! The reconcile loop end to end over a real store: the example unit's desired state is
//! committed, the runner plans over store snapshots and an executor carries the actions out
//! (as the edges and well-behaved nodes would), until the unit has converged. Time is paused.

use aos_cm::engine::{self, StoreSink};
use aos_cm::model::*;
use aos_cm::reconcilers::runner::{ExecFuture, Executor, Runner, RunnerConfig};
use aos_cm::reconcilers::{plan_all, project};
use aos_cm::scenario;
use aos_cm::store::Store;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Applies every action to the store, and reports started instances active, as the edges
/// and the nodes would. Fails the first `fail_times` attempts of one key.
struct UnitExecutor {
    store: Arc<Store>,
    log: Mutex<Vec<String>>,
    fail_key: String,
    fail_times: Mutex<u32>,
}

impl Executor<Action> for UnitExecutor {
    fn execute(&self, batch: Vec<Action>) -> ExecFuture {
        let Some(key) = batch.first().map(Action::key) else {
            return Box::pin(async { Ok(()) });
        };
        self.log.lock().unwrap().push(key.clone());
        if key == self.fail_key {
            let mut left = self.fail_times.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Box::pin(async { Err("node secondary-2 did not answer".to_string()) });
            }
        }
        let result = self.store.write(|tx| {
            let mut world = tx.snapshot()?;
            for action in &batch {
                tx.apply(action, 0)?;
                // What the nodes would report back.
                project::apply_as_unit(&mut world, action, 0);
            }
            tx.set_snapshot(&world)
        });
        Box::pin(async move { result.map_err(|e| e.to_string()) })
    }
}

fn converged(store: &Store) -> bool {
    let snap = store.snapshot().unwrap();
    plan_all(&snap, 0).iter().all(|p| p.actions.is_empty())
}

#[tokio::test(start_paused = true)]
async fn example_unit_converges_through_the_store_and_runner() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("cm.redb")).unwrap());
    let scenario_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states/fresh-install");
    let sc = scenario::load(&scenario_dir).unwrap();
    let changes = store.subscribe();

    let exec = Arc::new(UnitExecutor {
        store: store.clone(),
        log: Mutex::new(Vec::new()),
        fail_key: "nodeconfig/secondary-2".into(),
        fail_times: Mutex::new(2),
    });
    let clock: engine::Clock = Arc::new(|| 0);
    let runner = Runner::new(
        engine::reconcilers(store.clone(), clock.clone()),
        exec.clone(),
        Arc::new(StoreSink {
            store: store.clone(),
            clock,
        }),
        RunnerConfig {
            jitter: false,
            ..RunnerConfig::default()
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(runner.run(changes, stop_rx));

    // One event: the desired state and the observed unit arrive.
    store.write(|tx| tx.set_snapshot(&sc.snapshot)).unwrap();

    // While secondary-2 fails its node config, the error is visible as a condition.
    let mut saw_condition = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let conds = store.conditions().unwrap();
        if let Some(c) = conds.get("action/nodeconfig/secondary-2") {
            assert_eq!(c.reason, "ActionFailed");
            assert!(c.message.contains("did not answer"), "{}", c.message);
            saw_condition = true;
        }
        if converged(&store) {
            break;
        }
    }
    assert!(saw_condition, "the failing key's error was never visible");
    assert!(converged(&store), "did not converge");
    // The condition is gone once the key succeeded.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let conds = store.conditions().unwrap();
    assert!(conds.keys().all(|k| !k.starts_with("action/")), "{conds:?}");

    let snap = store.snapshot().unwrap();
    let nodes: BTreeMap<String, String> = snap
        .allocations
        .instances
        .values()
        .map(|p| {
            (
                format!("{}/{}", &p.ident.item_id[..8], p.ident.instance),
                p.node_id.clone(),
            )
        })
        .collect();
    assert_eq!(nodes["8f3a6b2c/0"], "main");
    assert_eq!(nodes["c41e9d7b/0"], "secondary-1");
    assert_eq!(snap.observed.blobs.len(), 28, "every blob once");
    // Every download ran exactly once: shared blobs are not fetched twice.
    let log = exec.log.lock().unwrap().clone();
    let downloads = log.iter().filter(|k| k.starts_with("blob/")).count();
    assert_eq!(downloads, 28);
    assert_eq!(
        log.iter()
            .filter(|k| *k == "nodeconfig/secondary-2")
            .count(),
        3,
        "two failures, then success"
    );

    stop_tx.send(true).unwrap();
    task.await.unwrap();
}
