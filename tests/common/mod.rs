//! Shared harness for integration tests over loopback: a store seeded from a scenario, the SM
//! server on 127.0.0.1, the runner with the daemon's executor, and simulated SMs.
#![allow(dead_code)]

use aos_cm::api::sm::server::{TlsPem, serve};
use aos_cm::api::sm::{SmConfig, SmController};
use aos_cm::engine::{self, Clock, StoreSink};
use aos_cm::executor::UnitExecutor;
use aos_cm::model::*;
use aos_cm::reconcilers::runner::{Runner, RunnerConfig};
use aos_cm::scenario;
use aos_cm::sim::sm::{SimOptions, SimSm};
use aos_cm::store::Store;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

pub struct Unit {
    pub _dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub sm: SmController,
    pub addr: SocketAddr,
    pub nodes: Vec<(String, SmInfo)>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    server_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

pub fn wall_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    })
}

/// The store as a fresh daemon would have it for a scenario: desired state, IAM's node info
/// (no SM connected yet), the installed unit config, the catalogue and every blob present.
pub fn seed(store: &Store, dir: &Path) -> Vec<(String, SmInfo)> {
    let sc = scenario::load(dir).unwrap();
    let mut snap = sc.snapshot;
    let mut sms = Vec::new();
    for (id, n) in snap.observed.nodes.iter_mut() {
        if let Some(sm) = n.sm.take() {
            sms.push((id.clone(), sm));
        }
        n.connection = Connection::Disconnected { since: 0 };
        n.node_config = None;
    }
    let all_blobs: Vec<Digest> = snap
        .catalogue
        .images
        .values()
        .flat_map(|i| i.blobs())
        .collect();
    snap.observed.blobs.extend(all_blobs);
    store.write(|tx| tx.set_snapshot(&snap)).unwrap();
    sms
}

pub fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/desired-states")
        .join(name)
}

impl Unit {
    pub async fn start(scenario_dir: &Path, config: SmConfig, tls: Option<TlsPem>) -> Unit {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("cm.redb")).unwrap());
        let nodes = seed(&store, scenario_dir);
        let clock = wall_clock();
        let sm = SmController::new(store.clone(), config, clock.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server_stop, rx) = tokio::sync::oneshot::channel::<()>();
        let server_sm = sm.clone();
        tokio::spawn(async move {
            let _ = serve(listener, server_sm, tls, async {
                let _ = rx.await;
            })
            .await;
        });
        let exec = Arc::new(UnitExecutor {
            store: store.clone(),
            sm: sm.clone(),
            clock: clock.clone(),
        });
        let runner = Runner::new(
            engine::reconcilers(store.clone(), clock.clone()),
            exec,
            Arc::new(StoreSink {
                store: store.clone(),
                clock,
            }),
            RunnerConfig {
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                resync_period: Duration::from_secs(2),
                ..RunnerConfig::default()
            },
        );
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let changes = store.subscribe();
        tokio::spawn(runner.run(changes, stop_rx));
        Unit {
            _dir: dir,
            store,
            sm,
            addr,
            nodes,
            stop: Some(stop),
            server_stop: Some(server_stop),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A plaintext channel that connects on first use (for refusal tests).
    pub fn channel_lazy(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    pub async fn sim(&self, node: &str, options: SimOptions) -> SimSm {
        let info = self
            .nodes
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, i)| i.clone())
            .unwrap();
        let mut sim = SimSm::new(node, info, options);
        sim.connect(self.channel().await).await.unwrap();
        sim
    }

    /// Waits for a committed state that satisfies `cond`, woken by store changes.
    pub async fn wait_for(
        &self,
        what: &str,
        secs: u64,
        cond: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        wait_for(&self.store, what, secs, cond).await
    }
}

pub async fn wait_for(
    store: &Store,
    what: &str,
    secs: u64,
    cond: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let mut changes = store.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let snap = store.snapshot().unwrap();
        if cond(&snap) {
            return snap;
        }
        // A resync tick as a fallback wake-up, in case the change came from outside the store.
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("store closed while waiting for {what}"),
            Err(_) => {
                let conds = store.conditions().unwrap();
                panic!("timed out waiting for {what}; conditions: {conds:#?}")
            }
        }
    }
}

/// Every desired instance placed and reported active, and no plan left.
pub fn converged(snap: &Snapshot) -> bool {
    let plans_empty = ReconcilerKind::ALL.iter().all(|k| {
        aos_cm::reconcilers::plan_one(*k, snap, 0)
            .actions
            .is_empty()
    });
    plans_empty
        && !snap.allocations.instances.is_empty()
        && snap.allocations.instances.keys().all(|k| {
            snap.observed
                .instances
                .get(k)
                .is_some_and(|r| r.state == InstanceState::Active)
        })
}

impl Drop for Unit {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(s) = self.server_stop.take() {
            let _ = s.send(());
        }
    }
}
