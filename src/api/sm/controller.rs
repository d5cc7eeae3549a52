//! The SMService server: one `RegisterSM` stream per node, the node registry, synchronous
//! requests correlated by reply type, instance commands that wait for the node's report, and
//! the intake of what nodes send. Everything a node reports is written to the store as
//! observed state.

use super::convert;
use super::intake::Intake;
use crate::api::proto::servicemanager::v5 as pb;
use crate::api::proto::servicemanager::v5::sm_incoming_messages::SmIncomingMessage as In;
use crate::api::proto::servicemanager::v5::sm_outgoing_messages::SmOutgoingMessage as Out;
use crate::engine::Clock;
use crate::model::*;
use crate::store::{Store, StoreError};
use futures::Stream;
use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Settings of the SM side, from aos_cm.cfg.
#[derive(Debug, Clone)]
pub struct SmConfig {
    /// `nodeInfoProvider.smConnectionTimeout`: after this a disconnected node is lost and its
    /// instances are placed elsewhere.
    pub sm_connection_timeout: Duration,
    /// Timeout of a synchronous request (node config, average monitoring).
    pub request_timeout: Duration,
    /// How long UpdateInstances waits for the node to report the instances it was sent.
    pub status_timeout: Duration,
    /// `fileServerUrl` (host:port) for GetBlobsInfos.
    pub file_server_url: String,
    pub storage_dir: String,
    pub state_dir: String,
    /// Largest message accepted from a node, in bytes.
    pub max_message_size: usize,
}

impl Default for SmConfig {
    fn default() -> Self {
        SmConfig {
            sm_connection_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            status_timeout: Duration::from_secs(30),
            file_server_url: "localhost:8094".into(),
            storage_dir: "/var/aos/storages".into(),
            state_dir: "/var/aos/states".into(),
            max_message_size: 4 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SmError {
    #[error("node {0} not found: it has no SM connected")]
    NotConnected(String),
    #[error("node {node}: no {what} reply within {secs} s")]
    Timeout {
        node: String,
        what: &'static str,
        secs: u64,
    },
    #[error("node {0} disconnected before it answered")]
    Disconnected(String),
    #[error("node {node}: {message}")]
    Node { node: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ReplyKind {
    NodeConfig,
    AverageMonitoring,
}

struct Link {
    generation: u64,
    tx: mpsc::Sender<Result<pb::SmIncomingMessages, Status>>,
    pending: HashMap<ReplyKind, oneshot::Sender<Out>>,
    /// One outstanding request per reply type.
    request_locks: Arc<[tokio::sync::Mutex<()>; 2]>,
}

/// What an UpdateInstances waits to hear about one instance.
enum Want {
    Running { version: String },
    Stopped,
}

struct Waiter {
    node: String,
    ident: InstanceIdent,
    want: Want,
    done: Option<oneshot::Sender<()>>,
}

/// Counters of what the server refused or lost.
#[derive(Debug, Default)]
pub struct SmCounters {
    pub bad_messages: AtomicU64,
    pub replaced_streams: AtomicU64,
    /// Instance statuses recorded in the store (full and incremental lists).
    pub statuses: AtomicU64,
}

struct Inner {
    store: Arc<Store>,
    config: SmConfig,
    clock: Clock,
    links: Mutex<HashMap<String, Link>>,
    next_generation: AtomicU64,
    cloud_connected: AtomicBool,
    waiters: Mutex<Vec<Waiter>>,
    intake: Intake,
    counters: SmCounters,
    /// Per node, the instances whose statuses this controller has recorded (after the node's
    /// first full status, which is checked against the whole table): a later full status
    /// removes the ones it no longer lists without reading every instance of the unit.
    reported: Mutex<HashMap<String, BTreeSet<InstanceIdent>>>,
    /// Status lists waiting for the next group commit.
    statuses: Mutex<StatusQueue>,
}

/// One node's status list, converted, waiting to be written.
struct StatusList {
    node: String,
    reported: Vec<ReportedInstance>,
    full: bool,
}

#[derive(Default)]
struct StatusQueue {
    pending: Vec<StatusList>,
    /// A caller is writing; new lists wait for it.
    writing: bool,
}

/// The SM controller; cheap to clone.
#[derive(Clone)]
pub struct SmController {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The status a stream is closed with when reading from it failed: `RESOURCE_EXHAUSTED` for a
/// message over `max_message_size`, `INVALID_ARGUMENT` for anything else.
fn bad_message(status: &Status) -> Status {
    let message = format!("bad message: {}", status.message());
    if super::server::is_too_large(status.code(), status.message()) {
        Status::resource_exhausted(message)
    } else {
        Status::invalid_argument(message)
    }
}

fn conn_msg(connected: bool) -> pb::SmIncomingMessages {
    pb::SmIncomingMessages {
        sm_incoming_message: Some(In::ConnectionStatus(pb::ConnectionStatus {
            cloud_status: if connected {
                pb::ConnectionEnum::Connected as i32
            } else {
                pb::ConnectionEnum::Disconnected as i32
            },
        })),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::SmIncomingMessages, Status>> + Send>>;

impl SmController {
    pub fn new(store: Arc<Store>, config: SmConfig, clock: Clock) -> SmController {
        SmController {
            inner: Arc::new(Inner {
                store,
                config,
                clock,
                links: Mutex::new(HashMap::new()),
                next_generation: AtomicU64::new(1),
                cloud_connected: AtomicBool::new(false),
                waiters: Mutex::new(Vec::new()),
                intake: Intake::default(),
                counters: SmCounters::default(),
                reported: Mutex::new(HashMap::new()),
                statuses: Mutex::new(StatusQueue::default()),
            }),
        }
    }

    /// The gRPC service, with the configured message size limit.
    pub fn service(&self) -> pb::sm_service_server::SmServiceServer<SmController> {
        let max = self.inner.config.max_message_size;
        pb::sm_service_server::SmServiceServer::new(self.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    pub fn intake(&self) -> &Intake {
        &self.inner.intake
    }

    pub fn counters(&self) -> &SmCounters {
        &self.inner.counters
    }

    pub fn config(&self) -> &SmConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// Node IDs with an open stream, sorted.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.links).keys().cloned().collect();
        v.sort();
        v
    }

    /// Tells every node whether the cloud is connected (and remembers it for new streams).
    pub async fn set_cloud_connected(&self, connected: bool) {
        self.inner
            .cloud_connected
            .store(connected, Ordering::SeqCst);
        let senders: Vec<_> = lock(&self.inner.links)
            .values()
            .map(|l| l.tx.clone())
            .collect();
        for tx in senders {
            let _ = tx.send(Ok(conn_msg(connected))).await;
        }
    }

    /// Ends every node's stream with UNAVAILABLE (the CM is stopping), so that the server's
    /// graceful shutdown does not wait for SMs that keep their streams open.
    pub fn close_all(&self) {
        self.close_all_because("the CM is stopping");
    }

    /// Ends every SM stream with UNAVAILABLE and `reason`; the SMs connect again.
    pub fn close_all_because(&self, reason: &str) {
        let links: Vec<_> = lock(&self.inner.links).drain().collect();
        for (_, link) in links {
            let _ = link
                .tx
                .try_send(Err(Status::unavailable(reason.to_owned())));
        }
    }

    fn sender(
        &self,
        node: &str,
    ) -> Result<mpsc::Sender<Result<pb::SmIncomingMessages, Status>>, SmError> {
        lock(&self.inner.links)
            .get(node)
            .map(|l| l.tx.clone())
            .ok_or_else(|| SmError::NotConnected(node.to_string()))
    }

    /// Sends a message that expects no reply (log requests).
    pub async fn send(&self, node: &str, msg: In) -> Result<(), SmError> {
        let tx = self.sender(node)?;
        tx.send(Ok(pb::SmIncomingMessages {
            sm_incoming_message: Some(msg),
        }))
        .await
        .map_err(|_| SmError::Disconnected(node.to_string()))
    }

    async fn request(&self, node: &str, msg: In, kind: ReplyKind) -> Result<Out, SmError> {
        let locks = lock(&self.inner.links)
            .get(node)
            .map(|l| l.request_locks.clone())
            .ok_or_else(|| SmError::NotConnected(node.to_string()))?;
        let _one_at_a_time = locks[kind as usize].lock().await;
        let (done_tx, done_rx) = oneshot::channel();
        let tx = {
            let mut links = lock(&self.inner.links);
            let link = links
                .get_mut(node)
                .ok_or_else(|| SmError::NotConnected(node.to_string()))?;
            link.pending.insert(kind, done_tx);
            link.tx.clone()
        };
        tx.send(Ok(pb::SmIncomingMessages {
            sm_incoming_message: Some(msg),
        }))
        .await
        .map_err(|_| SmError::Disconnected(node.to_string()))?;
        let timeout = self.inner.config.request_timeout;
        match tokio::time::timeout(timeout, done_rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(SmError::Disconnected(node.to_string())),
            Err(_) => {
                if let Some(l) = lock(&self.inner.links).get_mut(node) {
                    l.pending.remove(&kind);
                }
                Err(SmError::Timeout {
                    node: node.to_string(),
                    what: match kind {
                        ReplyKind::NodeConfig => "NodeConfigStatus",
                        ReplyKind::AverageMonitoring => "AverageMonitoring",
                    },
                    secs: timeout.as_secs(),
                })
            }
        }
    }

    async fn node_config_request(
        &self,
        node: &str,
        msg: In,
    ) -> Result<pb::NodeConfigStatus, SmError> {
        match self.request(node, msg, ReplyKind::NodeConfig).await? {
            Out::NodeConfigStatus(s) => Ok(s),
            _ => Err(SmError::Node {
                node: node.to_string(),
                message: "unexpected reply".into(),
            }),
        }
    }

    /// Asks the node which node config it runs, and records the answer.
    pub async fn get_node_config_status(
        &self,
        node: &str,
    ) -> Result<pb::NodeConfigStatus, SmError> {
        let s = self
            .node_config_request(node, In::GetNodeConfigStatus(pb::GetNodeConfigStatus {}))
            .await?;
        self.record_node_config(node, &s);
        Ok(s)
    }

    pub async fn check_node_config(
        &self,
        node: &str,
        config: &str,
        version: &str,
    ) -> Result<pb::NodeConfigStatus, SmError> {
        self.node_config_request(
            node,
            In::CheckNodeConfig(pb::CheckNodeConfig {
                node_config: config.to_string(),
                version: version.to_string(),
            }),
        )
        .await
    }

    /// Installs a node config on the node, and records the status it answers with.
    pub async fn set_node_config(
        &self,
        node: &str,
        config: &str,
        version: &str,
    ) -> Result<pb::NodeConfigStatus, SmError> {
        let s = self
            .node_config_request(
                node,
                In::SetNodeConfig(pb::SetNodeConfig {
                    node_config: config.to_string(),
                    version: version.to_string(),
                }),
            )
            .await?;
        self.record_node_config(node, &s);
        Ok(s)
    }

    pub async fn get_average_monitoring(
        &self,
        node: &str,
    ) -> Result<pb::AverageMonitoring, SmError> {
        match self
            .request(
                node,
                In::GetAverageMonitoring(pb::GetAverageMonitoring {}),
                ReplyKind::AverageMonitoring,
            )
            .await?
        {
            Out::AverageMonitoring(m) => Ok(m),
            _ => Err(SmError::Node {
                node: node.to_string(),
                message: "unexpected reply".into(),
            }),
        }
    }

    /// Sends one UpdateInstances and waits until the node has reported every stopped instance
    /// stopped and every started one (`expect`) running at its version.
    pub async fn update_instances(
        &self,
        node: &str,
        start: Vec<pb::InstanceInfo>,
        stop: Vec<crate::api::proto::common::v2::InstanceIdent>,
        expect: &[(InstanceIdent, String)],
    ) -> Result<(), SmError> {
        let tx = self.sender(node)?;
        let mut receivers = Vec::new();
        {
            let mut waiters = lock(&self.inner.waiters);
            for (ident, version) in expect {
                let (done, rx) = oneshot::channel();
                waiters.push(Waiter {
                    node: node.to_string(),
                    ident: ident.clone(),
                    want: Want::Running {
                        version: version.clone(),
                    },
                    done: Some(done),
                });
                receivers.push(rx);
            }
            for id in &stop {
                let (done, rx) = oneshot::channel();
                waiters.push(Waiter {
                    node: node.to_string(),
                    ident: convert::ident_from_pb(id),
                    want: Want::Stopped,
                    done: Some(done),
                });
                receivers.push(rx);
            }
        }
        let sent = tx
            .send(Ok(pb::SmIncomingMessages {
                sm_incoming_message: Some(In::UpdateInstances(pb::UpdateInstances {
                    start_instances: start,
                    stop_instances: stop,
                })),
            }))
            .await;
        if sent.is_err() {
            self.drop_waiters(node);
            return Err(SmError::Disconnected(node.to_string()));
        }
        let all = futures::future::join_all(receivers);
        match tokio::time::timeout(self.inner.config.status_timeout, all).await {
            Ok(results) if results.iter().all(Result::is_ok) => Ok(()),
            Ok(_) => Err(SmError::Disconnected(node.to_string())),
            Err(_) => {
                self.drop_waiters(node);
                Err(SmError::Timeout {
                    node: node.to_string(),
                    what: "instance status",
                    secs: self.inner.config.status_timeout.as_secs(),
                })
            }
        }
    }

    fn drop_waiters(&self, node: &str) {
        lock(&self.inner.waiters).retain(|w| w.node != node);
    }

    fn resolve_waiters(&self, node: &str, reported: &[ReportedInstance], full: bool) {
        let mut waiters = lock(&self.inner.waiters);
        let listed: BTreeSet<&InstanceIdent> = reported.iter().map(|r| &r.ident).collect();
        for w in waiters.iter_mut().filter(|w| w.node == node) {
            let r = reported.iter().find(|r| r.ident == w.ident);
            let satisfied = match (&w.want, r) {
                (Want::Running { version }, Some(r)) => {
                    r.version == *version && r.state != InstanceState::Inactive
                }
                (Want::Stopped, Some(r)) => r.state == InstanceState::Inactive,
                (Want::Stopped, None) => full && !listed.contains(&w.ident),
                (Want::Running { .. }, None) => false,
            };
            if satisfied && let Some(done) = w.done.take() {
                let _ = done.send(());
            }
        }
        waiters.retain(|w| w.done.is_some());
    }

    fn now(&self) -> UnixMillis {
        (self.inner.clock)()
    }

    /// Registers a node's stream; a previous stream of the same node is closed.
    fn register(
        &self,
        node: &str,
        tx: mpsc::Sender<Result<pb::SmIncomingMessages, Status>>,
    ) -> u64 {
        let generation = self.inner.next_generation.fetch_add(1, Ordering::SeqCst);
        let old = lock(&self.inner.links).insert(
            node.to_string(),
            Link {
                generation,
                tx,
                pending: HashMap::new(),
                request_locks: Arc::new([tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())]),
            },
        );
        if let Some(old) = old {
            self.inner
                .counters
                .replaced_streams
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(node, "a new stream replaces the node's previous one");
            let _ = old.tx.try_send(Err(Status::aborted(
                "replaced by a newer stream of the same node",
            )));
        }
        generation
    }

    fn on_sm_info(&self, info: &pb::SmInfo) -> Result<(), StoreError> {
        let sm = convert::sm_info_from_pb(info);
        let node_id = info.node_id.clone();
        self.inner.store.write(|tx| {
            let mut node = tx.node(&node_id)?.unwrap_or_else(|| {
                // Without IAM's word the node is taken as provisioned, so that a unit without
                // IAM can run.
                ObservedNode {
                    info: NodeInfo {
                        node_id: node_id.clone(),
                        state: NodeState::Provisioned,
                        ..NodeInfo::default()
                    },
                    sm: None,
                    node_config: None,
                    connection: Connection::Connected,
                    usage: None,
                }
            });
            node.sm = Some(sm.clone());
            node.connection = Connection::Connected;
            tx.put_node(&node)
        })
    }

    fn on_disconnect(&self, node: &str, generation: u64) {
        let was_current = {
            let mut links = lock(&self.inner.links);
            match links.get(node) {
                Some(l) if l.generation == generation => {
                    links.remove(node);
                    true
                }
                _ => false,
            }
        };
        if !was_current {
            return; // replaced by a newer stream, which owns the node now
        }
        self.drop_waiters(node);
        let since = self.now();
        let result = self.inner.store.write(|tx| {
            if let Some(mut n) = tx.node(node)? {
                n.connection = Connection::Disconnected { since };
                tx.put_node(&n)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(node, error = %e, "could not record the disconnection");
        }
        tracing::info!(node, "SM disconnected");
        let this = self.clone();
        let node = node.to_string();
        let timeout = self.inner.config.sm_connection_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if lock(&this.inner.links).contains_key(&node) {
                return; // it came back
            }
            let lost_at = this.now();
            let result = this.inner.store.write(|tx| {
                if let Some(mut n) = tx.node(&node)?
                    && matches!(n.connection, Connection::Disconnected { .. })
                {
                    n.connection = Connection::Lost { since: lost_at };
                    tx.put_node(&n)?;
                }
                Ok(())
            });
            match result {
                Ok(()) => {
                    tracing::warn!(node, "SM stayed away past smConnectionTimeout: node lost")
                }
                Err(e) => tracing::warn!(node, error = %e, "could not mark the node lost"),
            }
        });
    }

    fn on_statuses(&self, node: &str, list: &[pb::InstanceStatus], full: bool) {
        let mut reported = Vec::with_capacity(list.len());
        for s in list {
            match convert::status_from_pb(node, s) {
                Ok(r) => reported.push(r),
                Err(e) => {
                    self.inner
                        .counters
                        .bad_messages
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node, error = %e, "ignoring an instance status");
                }
            }
        }
        // Group commit: the lists of every node that arrive while one is being written go
        // into the next transaction together, in arrival order. Whoever finds no writer
        // becomes it and drains the queue; the others return at once.
        {
            let mut queue = lock(&self.inner.statuses);
            queue.pending.push(StatusList {
                node: node.to_owned(),
                reported,
                full,
            });
            if queue.writing {
                return;
            }
            queue.writing = true;
        }
        // Hands the writer's role back even if writing panics, so that statuses are not
        // queued forever behind a writer that is gone.
        struct Writer<'a> {
            queue: &'a Mutex<StatusQueue>,
            armed: bool,
        }
        impl Drop for Writer<'_> {
            fn drop(&mut self) {
                if self.armed {
                    lock(self.queue).writing = false;
                }
            }
        }
        let mut writer = Writer {
            queue: &self.inner.statuses,
            armed: true,
        };
        loop {
            let lists = {
                let mut queue = lock(writer.queue);
                if queue.pending.is_empty() {
                    // Under the same lock that a new list is queued with, so none is left
                    // behind without a writer.
                    queue.writing = false;
                    writer.armed = false;
                    return;
                }
                std::mem::take(&mut queue.pending)
            };
            self.record_statuses(&lists);
        }
    }

    /// Writes status lists in one transaction, keeping up what this controller knows each node
    /// reported, then resolves the waiters, list by list.
    fn record_statuses(&self, lists: &[StatusList]) {
        // Only the writer uses this map, so it is held across the transaction and updated as
        // the lists are applied; if the transaction fails, the nodes' entries are dropped (an
        // unknown node's next full list is checked against the whole table).
        let mut known = lock(&self.inner.reported);
        let result = self.inner.store.write_observed(|tx| {
            // A node's first full list is checked against the whole table: read it once for
            // every such node of the group (at a reconnect, all of them), before any list is
            // applied, so that the lists below keep those sets up like the others.
            let unknown: BTreeSet<&str> = lists
                .iter()
                .filter(|l| l.full && !known.contains_key(&l.node))
                .map(|l| l.node.as_str())
                .collect();
            if !unknown.is_empty() {
                for (ident, r) in tx.reported_instances()? {
                    if unknown.contains(r.node_id.as_str()) {
                        known.entry(r.node_id).or_default().insert(ident);
                    }
                }
                for node in unknown {
                    known.entry(node.to_owned()).or_default();
                }
            }
            for l in lists {
                let node = l.node.as_str();
                if l.full {
                    let listed: BTreeSet<InstanceIdent> =
                        l.reported.iter().map(|r| r.ident.clone()).collect();
                    // Records of this node the new list leaves out.
                    let gone: Vec<InstanceIdent> = known
                        .get(node)
                        .map(|set| set.difference(&listed).cloned().collect())
                        .unwrap_or_default();
                    for ident in gone {
                        // It may have moved to another node meanwhile; that record stays.
                        if tx
                            .reported_instance(&ident)?
                            .is_some_and(|r| r.node_id == node)
                        {
                            tx.remove_reported_instance(&ident)?;
                        }
                    }
                    known.insert(l.node.clone(), listed);
                } else if let Some(set) = known.get_mut(node) {
                    set.extend(l.reported.iter().map(|r| r.ident.clone()));
                }
                for r in &l.reported {
                    tx.put_reported_instance(r)?;
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                let count: usize = lists.iter().map(|l| l.reported.len()).sum();
                self.inner
                    .counters
                    .statuses
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
            Err(e) => {
                for l in lists {
                    known.remove(&l.node);
                }
                tracing::warn!(lists = lists.len(), error = %e, "could not record instance statuses");
            }
        }
        drop(known);
        for l in lists {
            self.resolve_waiters(&l.node, &l.reported, l.full);
        }
    }

    fn on_message(&self, node: &str, msg: Out) {
        match msg {
            Out::SmInfo(info) => {
                if let Err(e) = self.on_sm_info(&info) {
                    tracing::warn!(node, error = %e, "could not record SMInfo");
                }
            }
            Out::NodeInstancesStatus(s) => self.on_statuses(node, &s.instances, true),
            Out::UpdateInstancesStatus(s) => self.on_statuses(node, &s.instances, false),
            Out::NodeConfigStatus(s) => {
                // A reply goes to its request, whose caller knows whether it reports the
                // node's config (Get, Set) or only a check; an unsolicited one is recorded.
                if let Some(unsolicited) =
                    self.reply(node, ReplyKind::NodeConfig, Out::NodeConfigStatus(s))
                    && let Out::NodeConfigStatus(s) = unsolicited
                {
                    self.record_node_config(node, &s);
                }
            }
            Out::AverageMonitoring(m) => {
                if let Some(n) = &m.node_monitoring {
                    let usage = NodeUsage {
                        cpu_dmips: n.cpu,
                        ram: n.ram,
                    };
                    let result = self.inner.store.write_observed(|tx| {
                        if let Some(mut nd) = tx.node(node)? {
                            nd.usage = Some(usage);
                            tx.put_node(&nd)?;
                        }
                        Ok(())
                    });
                    if let Err(e) = result {
                        tracing::warn!(node, error = %e, "could not record usage");
                    }
                }
                let _ = self.reply(
                    node,
                    ReplyKind::AverageMonitoring,
                    Out::AverageMonitoring(m),
                );
            }
            Out::Log(l) => self.inner.intake.log(node, &l),
            Out::InstantMonitoring(m) => self.inner.intake.monitoring(node, &m),
            Out::Alert(a) => {
                self.inner.intake.alert(node, &a);
            }
        }
    }

    /// Hands a reply to the request waiting for it; returns it when nobody waits.
    fn reply(&self, node: &str, kind: ReplyKind, msg: Out) -> Option<Out> {
        let waiter = lock(&self.inner.links)
            .get_mut(node)
            .and_then(|l| l.pending.remove(&kind));
        match waiter {
            Some(w) => w.send(msg).err(),
            None => Some(msg),
        }
    }

    fn record_node_config(&self, node: &str, s: &pb::NodeConfigStatus) {
        let status = NodeConfigStatus {
            version: s.version.clone(),
            error: convert::error_from_pb(s.error.as_ref()),
        };
        let result = self.inner.store.write_observed(|tx| {
            if let Some(mut n) = tx.node(node)? {
                n.node_config = Some(status.clone());
                tx.put_node(&n)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(node, error = %e, "could not record the node config status");
        }
    }

    /// Reads a node's stream until it ends or fails.
    async fn serve(
        self,
        mut inbound: Streaming<pb::SmOutgoingMessages>,
        tx: mpsc::Sender<Result<pb::SmIncomingMessages, Status>>,
    ) {
        // The node ID comes with the first message, which must be SMInfo.
        let first = match inbound.message().await {
            Ok(Some(m)) => m.sm_outgoing_message,
            Ok(None) => return,
            Err(status) => {
                self.bad(None, &tx, bad_message(&status)).await;
                return;
            }
        };
        let Some(Out::SmInfo(info)) = first else {
            self.bad(
                None,
                &tx,
                Status::failed_precondition("the first message must be SMInfo"),
            )
            .await;
            return;
        };
        if info.node_id.is_empty() || info.node_id.len() > 64 {
            self.bad(
                None,
                &tx,
                Status::invalid_argument("SMInfo.node_id must be 1 to 64 characters"),
            )
            .await;
            return;
        }
        let node = info.node_id.clone();
        let generation = self.register(&node, tx.clone());
        tracing::info!(node, "SM connected");
        self.on_message(&node, Out::SmInfo(info));
        // Learn which node config the node runs, as the node-info change does upstream.
        let this = self.clone();
        let asked = node.clone();
        tokio::spawn(async move {
            if let Err(e) = this.get_node_config_status(&asked).await {
                tracing::debug!(node = asked, error = %e, "no node config status");
            }
        });
        loop {
            match inbound.message().await {
                Ok(Some(m)) => match m.sm_outgoing_message {
                    Some(msg) => self.on_message(&node, msg),
                    None => {
                        self.inner
                            .counters
                            .bad_messages
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(node, "empty message ignored");
                    }
                },
                Ok(None) => break,
                Err(status) => {
                    self.bad(Some(&node), &tx, bad_message(&status)).await;
                    break;
                }
            }
        }
        self.on_disconnect(&node, generation);
    }

    async fn bad(
        &self,
        node: Option<&str>,
        tx: &mpsc::Sender<Result<pb::SmIncomingMessages, Status>>,
        status: Status,
    ) {
        self.inner
            .counters
            .bad_messages
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = node.unwrap_or("?"), error = %status.message(), "closing an SM stream");
        let _ = tx.send(Err(status)).await;
    }

    /// URLs of blobs on the file server; an unknown digest fails the whole call.
    fn blob_urls(&self, digests: &[String]) -> Result<Vec<String>, Status> {
        let blobs = self
            .inner
            .store
            .read(|r| r.blobs())
            .map_err(|e| Status::internal(e.to_string()))?;
        digests
            .iter()
            .map(|d| {
                let digest = Digest::parse(d).map_err(Status::internal)?;
                if !blobs.contains(&digest) {
                    return Err(Status::internal(format!("blob {d} not found")));
                }
                Ok(format!(
                    "http://{}/blobs/sha256/{}",
                    self.inner.config.file_server_url,
                    digest.hex()
                ))
            })
            .collect()
    }
}

#[tonic::async_trait]
impl pb::sm_service_server::SmService for SmController {
    type RegisterSMStream = ResponseStream;

    async fn register_sm(
        &self,
        request: Request<Streaming<pb::SmOutgoingMessages>>,
    ) -> Result<Response<Self::RegisterSMStream>, Status> {
        let (tx, rx) = mpsc::channel(256);
        // ConnectionStatus goes first, before anything is received.
        let connected = self.inner.cloud_connected.load(Ordering::SeqCst);
        let _ = tx.send(Ok(conn_msg(connected))).await;
        tokio::spawn(self.clone().serve(request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_blobs_infos(
        &self,
        request: Request<pb::BlobsInfosRequest>,
    ) -> Result<Response<pb::BlobsInfos>, Status> {
        let urls = self.blob_urls(&request.into_inner().digests)?;
        Ok(Response::new(pb::BlobsInfos { urls }))
    }
}
