//! A whole CM on loopback for tests, benchmarks and the demo: a store, the SM server on
//! 127.0.0.1, the runner with the daemon's executor; simulated SMs connect to it.

use crate::agent::{AgentConfig, CloudAgent, NoIam};
use crate::api::cloud::certs::Iam;
use crate::api::cloud::link::{CloudLink, LinkConfig, LinkHandle};
use crate::api::dns::{DnsConfig, DnsServer};
use crate::api::dnszone::keep_in_sync;
use crate::api::sm::network::NetworkService;
use crate::api::sm::server::{TlsPem, serve};
use crate::api::sm::{SmConfig, SmController};
use crate::engine::{self, StoreSink};
use crate::executor::UnitExecutor;
use crate::imagestore::fetch::Fetcher;
use crate::model::*;
use crate::reconcilers::runner::{Runner, RunnerConfig};
use crate::sim::sm::{SimOptions, SimSm};
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// A cloud for a simulated unit started by [`SimUnit::start_with_cloud`]: the link, the agent's
/// timings, and where downloaded blobs go.
pub struct CloudSetup {
    pub link: LinkConfig,
    pub agent: AgentConfig,
    /// `imageManager.installPath`; partial downloads go under `<install_path>/../download`.
    pub install_path: std::path::PathBuf,
}

pub struct SimUnit {
    /// The cloud link and agent when started with a cloud.
    pub cloud: Option<(LinkHandle, Arc<CloudAgent<NoIam>>)>,
    pub store: Arc<Store>,
    pub sm: SmController,
    pub network: NetworkService,
    /// The embedded DNS server, on 127.0.0.1.
    pub dns: Arc<DnsServer>,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    server_stop: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The node whose IAM reports the `MainNode` attribute ("" when none does).
fn main_node_of(store: &Store) -> String {
    store
        .shared_snapshot()
        .ok()
        .and_then(|s| {
            s.observed
                .nodes
                .iter()
                .find(|(_, n)| n.info.attrs.contains_key("MainNode"))
                .map(|(id, _)| id.as_str().to_owned())
        })
        .unwrap_or_default()
}

pub use crate::engine::wall_clock;

/// Runner timings for a unit on loopback: quick retries, a short resync.
pub fn quick_runner() -> RunnerConfig {
    RunnerConfig {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        resync_period: Duration::from_secs(2),
        max_concurrent: 128,
        ..RunnerConfig::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimUnitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Other(String),
}

impl SimUnit {
    /// Opens (or creates) the store at `store_path` and starts the server and the runner.
    pub async fn start(
        store_path: &Path,
        config: SmConfig,
        tls: Option<TlsPem>,
        runner: RunnerConfig,
    ) -> Result<SimUnit, SimUnitError> {
        Self::start_with(store_path, None, config, tls, runner, None).await
    }

    /// Like `start_at`, with the cloud link, the agent and blob downloads running from the
    /// start (the executor fetches blobs through the link).
    pub async fn start_with_cloud(
        store_path: &Path,
        listen: Option<SocketAddr>,
        config: SmConfig,
        runner: RunnerConfig,
        cloud: CloudSetup,
    ) -> Result<SimUnit, SimUnitError> {
        Self::start_with(store_path, listen, config, None, runner, Some(cloud)).await
    }

    /// Like `start`, with the SM server on a chosen loopback address.
    pub async fn start_at(
        store_path: &Path,
        listen: Option<SocketAddr>,
        config: SmConfig,
        runner: RunnerConfig,
    ) -> Result<SimUnit, SimUnitError> {
        Self::start_with(store_path, listen, config, None, runner, None).await
    }

    async fn start_with(
        store_path: &Path,
        listen: Option<SocketAddr>,
        config: SmConfig,
        tls: Option<TlsPem>,
        runner: RunnerConfig,
        cloud: Option<CloudSetup>,
    ) -> Result<SimUnit, SimUnitError> {
        let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        if !listen.ip().is_loopback() {
            return Err(SimUnitError::Other(format!(
                "{listen}: a simulated unit listens on loopback only"
            )));
        }
        let store = Arc::new(Store::open(store_path)?);
        let clock = wall_clock();
        let sm = SmController::new(store.clone(), config, clock.clone());
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let dns = Arc::new(
            DnsServer::start(DnsConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))))
                .await
                .map_err(|e| SimUnitError::Other(e.to_string()))?,
        );
        let network = NetworkService::new(store.clone(), vec![dns.local_addr().ip().to_string()]);
        let (server_stop, rx) = tokio::sync::oneshot::channel::<()>();
        let server_sm = sm.clone();
        let server_net = network.clone();
        let server = tokio::spawn(async move {
            if let Err(e) = serve(listener, server_sm, Some(server_net), tls, async {
                let _ = rx.await;
            })
            .await
            {
                tracing::error!(error = %e, "SM server stopped");
            }
        });
        let mut exec = UnitExecutor::new(store.clone(), sm.clone(), clock.clone());
        let mut link_parts = None;
        if let Some(c) = cloud {
            let (handle, link_runner) = CloudLink::build(c.link);
            let (alerts_tx, alerts_rx) = tokio::sync::mpsc::channel(256);
            let download_path = c
                .install_path
                .parent()
                .map(|p| p.join("download"))
                .unwrap_or_else(|| c.install_path.join("download"));
            exec = exec.with_fetcher(Fetcher {
                link: handle.clone(),
                install_path: c.install_path,
                download_path,
                roots_pem: Vec::new(),
                alerts: Some(alerts_tx),
                limits: Default::default(),
            });
            link_parts = Some((handle, link_runner, c.agent, alerts_rx));
        }
        let exec = Arc::new(exec);
        let runner = Runner::new(
            engine::reconcilers(store.clone(), clock.clone()),
            exec,
            Arc::new(StoreSink {
                store: store.clone(),
                clock,
            }),
            runner,
        );
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let changes = store.subscribe();
        let zone = tokio::spawn(keep_in_sync(store.clone(), dns.clone(), stop_rx.clone()));
        let runner = tokio::spawn(runner.run(changes, stop_rx.clone()));
        let mut tasks = vec![server, zone, runner];
        let mut cloud = None;
        if let Some((handle, link_runner, agent_config, alerts_rx)) = link_parts {
            let agent = Arc::new(CloudAgent::new(
                store.clone(),
                sm.clone(),
                handle.clone(),
                Arc::new(NoIam {
                    main_node: main_node_of(&store),
                }),
                agent_config,
            ));
            tasks.extend(agent.start(link_runner, stop_rx));
            tasks.push(tokio::spawn(agent.clone().forward_alerts(alerts_rx)));
            cloud = Some((handle, agent));
        }
        Ok(SimUnit {
            cloud,
            store,
            sm,
            network,
            dns,
            addr,
            stop: Some(stop),
            server_stop: Some(server_stop),
            tasks,
        })
    }

    pub async fn channel(&self) -> Result<Channel, SimUnitError> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))
            .map_err(|e| SimUnitError::Other(e.to_string()))?
            .connect()
            .await?)
    }

    /// A simulated SM for a node, connected.
    pub async fn sim(
        &self,
        node: &str,
        info: SmInfo,
        options: SimOptions,
    ) -> Result<SimSm, SimUnitError> {
        let mut sim = SimSm::new(node, info, options);
        sim.connect(self.channel().await?)
            .await
            .map_err(|e| SimUnitError::Other(e.to_string()))?;
        Ok(sim)
    }

    /// Connects the unit to a cloud: starts the link (discovery, WebSocket) and the agent that
    /// handles requests and sends statuses, alerts, monitoring and logs. Both stop with the
    /// unit.
    pub fn connect_cloud(
        &mut self,
        link: LinkConfig,
        agent: AgentConfig,
    ) -> (LinkHandle, Arc<CloudAgent<NoIam>>) {
        let main_node = self.main_node();
        self.connect_cloud_with(link, agent, Arc::new(NoIam { main_node }))
    }

    /// The node whose IAM reports the `MainNode` attribute ("" when none does).
    pub fn main_node(&self) -> String {
        main_node_of(&self.store)
    }

    /// [`SimUnit::connect_cloud`] with a given IAM.
    pub fn connect_cloud_with<I: Iam + 'static>(
        &mut self,
        link: LinkConfig,
        agent: AgentConfig,
        iam: Arc<I>,
    ) -> (LinkHandle, Arc<CloudAgent<I>>) {
        self.connect_cloud_full(link, agent, iam, None)
    }

    /// [`SimUnit::connect_cloud_with`], syncing instance states kept in `storage`.
    pub fn connect_cloud_full<I: Iam + 'static>(
        &mut self,
        link: LinkConfig,
        agent: AgentConfig,
        iam: Arc<I>,
        storage: Option<Arc<crate::storagestate::StorageState>>,
    ) -> (LinkHandle, Arc<CloudAgent<I>>) {
        let (handle, runner) = CloudLink::build(link);
        let mut agent = CloudAgent::new(
            self.store.clone(),
            self.sm.clone(),
            handle.clone(),
            iam,
            agent,
        );
        if let Some(s) = storage {
            agent = agent.with_storage_state(s);
        }
        let agent = Arc::new(agent);
        let stop = self
            .stop
            .as_ref()
            .map(|s| s.subscribe())
            .unwrap_or_else(|| tokio::sync::watch::channel(true).1);
        self.tasks.extend(agent.start(runner, stop));
        (handle, agent)
    }

    /// A synthetic unit (`synthetic::unit`) for benchmarks: the store at `store_path` is seeded
    /// with its nodes and items but no desired state, the unit started with [`quick_runner`],
    /// and one zero-delay simulated SM per node connected and registered. Returns the unit, the
    /// SMs and the desired state, for the caller to commit when its clock starts.
    pub async fn start_synthetic(
        store_path: &Path,
        nodes: usize,
        items: usize,
        instances: usize,
    ) -> Result<(SimUnit, Vec<SimSm>, Option<DesiredState>), SimUnitError> {
        let mut snap = crate::sim::synthetic::unit(nodes, items, instances, false);
        let desired = snap.desired.take();
        {
            let store = Store::open(store_path)?;
            store.write(|tx| tx.set_snapshot(&snap))?;
        }
        let unit = SimUnit::start(store_path, SmConfig::default(), None, quick_runner()).await?;
        let mut sims = Vec::with_capacity(nodes);
        for n in 0..nodes {
            let id = crate::sim::synthetic::node_id(n);
            let info = crate::sim::synthetic::sm_info(&id);
            sims.push(unit.sim(&id, info, SimOptions::default()).await?);
        }
        unit.wait_for(Duration::from_secs(30), |s| {
            s.observed
                .nodes
                .values()
                .all(|n| n.is_connected() && n.sm.is_some())
        })
        .await?;
        Ok((unit, sims, desired))
    }

    /// Commits `desired` and waits until `count` instances are reported active; returns the
    /// time from the commit.
    pub async fn converge_on(
        &self,
        desired: Option<&DesiredState>,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, SimUnitError> {
        let started = std::time::Instant::now();
        self.store.write(|tx| tx.set_desired(desired))?;
        self.wait_active(count, timeout).await?;
        Ok(started.elapsed())
    }

    /// Waits until at least `count` instances are reported active. Reads only the reported
    /// instances, at most every 5 ms, so that a benchmark's harness does not compete with the
    /// unit for the cores.
    pub async fn wait_active(&self, count: usize, timeout: Duration) -> Result<(), SimUnitError> {
        let mut changes = self.store.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let active = self
                .store
                .read(|r| r.reported_instances())?
                .values()
                .filter(|r| r.state == InstanceState::Active)
                .count();
            if active >= count {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changes.recv())
                .await
                .is_err()
            {
                return Err(SimUnitError::Other(format!(
                    "{active} of {count} instances active after {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            while changes.try_recv().is_ok() {}
        }
    }

    /// Waits for a committed state that satisfies `cond`, woken by store changes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        cond: impl Fn(&Snapshot) -> bool,
    ) -> Result<Snapshot, SimUnitError> {
        wait_for(&self.store, timeout, cond).await
    }

    /// Shuts down and waits until the server, runner and zone tasks have ended, so that the
    /// store can be opened again (a restart within one process).
    pub async fn stop(mut self) {
        self.shutdown();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }

    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(s) = self.server_stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for SimUnit {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits for a committed state that satisfies `cond`, woken by store changes; the error says
/// what is still open.
pub async fn wait_for(
    store: &Store,
    timeout: Duration,
    cond: impl Fn(&Snapshot) -> bool,
) -> Result<Snapshot, SimUnitError> {
    let mut changes = store.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Shared while it is only looked at; copied only for the caller.
        let snap = store.shared_snapshot()?;
        if cond(&snap) {
            return Ok(std::sync::Arc::unwrap_or_clone(snap));
        }
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(SimUnitError::Other("the store was closed".into())),
            Err(_) => {
                let conds = store.conditions()?;
                let open: Vec<String> = conds.values().map(|c| c.to_string()).collect();
                return Err(SimUnitError::Other(format!(
                    "timed out; open conditions: {}",
                    if open.is_empty() {
                        "none".to_string()
                    } else {
                        open.join("; ")
                    }
                )));
            }
        }
    }
}

/// Turns a scenario's snapshot into the store of a unit whose SMs have not connected yet, with
/// every item downloaded: IAM's node info stays, each node's SMInfo is taken out and returned
/// (the simulated SMs send it themselves), and every blob of the catalogue is present.
pub fn before_sms_connect(snap: &mut Snapshot) -> Vec<(String, SmInfo)> {
    let mut sms = Vec::new();
    for (id, n) in snap.observed.nodes.iter_mut() {
        if let Some(sm) = n.sm.take() {
            sms.push((id.clone(), sm));
        }
        n.connection = Connection::Disconnected { since: 0 };
        n.node_config = None;
    }
    let blobs: Vec<Digest> = snap
        .catalogue
        .images
        .values()
        .flat_map(|i| i.blobs())
        .collect();
    snap.observed.blobs.extend(blobs);
    sms
}

/// Every node connected, every placed instance reported active, and nothing left to plan.
/// (Without the first condition a unit can look converged before its last node has joined.)
pub fn converged(snap: &Snapshot) -> bool {
    if !snap.observed.nodes.values().all(|n| n.is_connected()) {
        return false;
    }
    let now = wall_clock()();
    let plans_empty = ReconcilerKind::ALL.iter().all(|k| {
        crate::reconcilers::plan_one(*k, snap, now)
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
