//! A simulated Service Manager: a real gRPC client of SMService that registers as one node
//! (its SMInfo), answers node config and monitoring requests, applies UpdateInstances to an
//! in-memory runtime and reports statuses, with a configurable delay and failure injection.

use crate::api::proto::common::v2 as pbc;
use crate::api::proto::servicemanager::v5 as pb;
use crate::api::proto::servicemanager::v5::sm_incoming_messages::SmIncomingMessage as In;
use crate::api::proto::servicemanager::v5::sm_outgoing_messages::SmOutgoingMessage as Out;
use crate::api::sm::convert;
use crate::model::{InstanceIdent, SmInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How the simulated node behaves.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// Time an UpdateInstances takes before statuses are reported.
    pub delay: Duration,
    /// Items whose instances fail to start (reported `failed`).
    pub fail_items: BTreeSet<String>,
    /// Node configs are rejected by CheckNodeConfig.
    pub reject_node_config: bool,
    /// How many LogData parts a log request is answered with.
    pub log_parts: u64,
}

/// An instance the simulated runtime runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimInstance {
    pub version: String,
    pub runtime_id: String,
    pub manifest_digest: String,
    pub state: String,
    pub uid: u32,
    pub item_type: i32,
}

/// What the simulated node holds; survives reconnects like a real node's runtime does.
#[derive(Debug, Default)]
pub struct SimState {
    pub running: BTreeMap<InstanceIdent, SimInstance>,
    pub node_config_version: String,
    pub node_config: String,
    pub cloud_connected: Option<bool>,
    /// Kinds of the messages received, in order.
    pub received: Vec<String>,
    /// How many times each instance was (re)started.
    pub starts: BTreeMap<InstanceIdent, u32>,
    /// Errors the stream ended with.
    pub stream_errors: Vec<String>,
    /// Woken on every received message.
    pub notify: Arc<tokio::sync::Notify>,
}

pub struct SimSm {
    pub node_id: String,
    info: SmInfo,
    pub options: SimOptions,
    pub state: Arc<Mutex<SimState>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Extra raw messages to send (tests inject bad ones).
    raw: Option<mpsc::Sender<pb::SmOutgoingMessages>>,
}

fn lock(m: &Mutex<SimState>) -> std::sync::MutexGuard<'_, SimState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn status(ident: &InstanceIdent, i: &SimInstance, preinstalled: bool) -> pb::InstanceStatus {
    let mut id = convert::ident_to_pb(ident, crate::model::ItemType::Service, preinstalled);
    id.r#type = i.item_type;
    pb::InstanceStatus {
        instance: Some(id),
        version: i.version.clone(),
        runtime_id: i.runtime_id.clone(),
        manifest_digest: i.manifest_digest.clone(),
        env_vars: vec![],
        state: i.state.clone(),
        error: Some(pbc::ErrorInfo {
            aos_code: if i.state == "failed" { 1 } else { 0 },
            exit_code: 0,
            message: if i.state == "failed" {
                "simulated start failure".into()
            } else {
                String::new()
            },
        }),
    }
}

fn msg(m: Out) -> pb::SmOutgoingMessages {
    pb::SmOutgoingMessages {
        sm_outgoing_message: Some(m),
    }
}

impl SimSm {
    pub fn new(node_id: &str, info: SmInfo, options: SimOptions) -> SimSm {
        SimSm {
            node_id: node_id.to_string(),
            info,
            options,
            state: Arc::new(Mutex::new(SimState::default())),
            task: None,
            raw: None,
        }
    }

    /// Connects and serves until `disconnect` or the stream ends.
    pub async fn connect(&mut self, channel: Channel) -> Result<(), tonic::Status> {
        self.disconnect();
        let mut client = pb::sm_service_client::SmServiceClient::new(channel)
            .max_decoding_message_size(16 << 20);
        let (out_tx, out_rx) = mpsc::channel::<pb::SmOutgoingMessages>(1024);
        let first = msg(Out::SmInfo(convert::sm_info_to_pb(
            &self.node_id,
            &self.info,
        )));
        let running: Vec<pb::InstanceStatus> = lock(&self.state)
            .running
            .iter()
            .map(|(k, v)| status(k, v, false))
            .collect();
        let _ = out_tx.send(first).await;
        let _ = out_tx
            .send(msg(Out::NodeInstancesStatus(pb::NodeInstancesStatus {
                instances: running,
            })))
            .await;
        let response = client.register_sm(ReceiverStream::new(out_rx)).await?;
        let mut inbound = response.into_inner();
        let state = self.state.clone();
        let options = self.options.clone();
        let replies = out_tx.clone();
        self.raw = Some(out_tx);
        self.task = Some(tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if let Some(m) = m.sm_incoming_message {
                            handle(&state, &options, &replies, m).await;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        lock(&state).stream_errors.push(e.message().to_string());
                        break;
                    }
                }
            }
        }));
        Ok(())
    }

    /// Drops the stream, as a node that loses its connection; the runtime keeps running.
    pub fn disconnect(&mut self) {
        self.raw = None;
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Sends a message as it is (tests use it for bad input).
    pub async fn send_raw(&self, m: pb::SmOutgoingMessages) -> bool {
        match &self.raw {
            Some(tx) => tx.send(m).await.is_ok(),
            None => false,
        }
    }

    /// Reports every instance the node runs again, in UpdateInstancesStatus messages of at most
    /// `batch` statuses. With a `note` each status carries it as an error message (exit code
    /// 1), so the record changes while the state stays; without, the statuses are as before.
    /// Returns how many statuses were sent (0 when not connected). Benchmarks use it for
    /// ingestion.
    pub async fn report_running(&self, batch: usize, note: Option<&str>) -> usize {
        let Some(tx) = &self.raw else {
            return 0;
        };
        let statuses: Vec<pb::InstanceStatus> = lock(&self.state)
            .running
            .iter()
            .map(|(k, v)| {
                let mut s = status(k, v, false);
                if let (Some(note), Some(e)) = (note, s.error.as_mut()) {
                    e.exit_code = 1;
                    e.message = note.to_owned();
                }
                s
            })
            .collect();
        let mut sent = 0;
        for chunk in statuses.chunks(batch.max(1)) {
            let m = msg(Out::UpdateInstancesStatus(pb::UpdateInstancesStatus {
                instances: chunk.to_vec(),
            }));
            if tx.send(m).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    }

    /// Waits until a message of this kind (e.g. "UpdateInstances") has been received.
    pub async fn wait_received(&self, kind: &str) {
        loop {
            let notify = lock(&self.state).notify.clone();
            let notified = notify.notified();
            if lock(&self.state).received.iter().any(|k| k == kind) {
                return;
            }
            notified.await;
        }
    }

    /// The version of the node config the node holds ("" before the first).
    pub fn node_config_version(&self) -> String {
        lock(&self.state).node_config_version.clone()
    }

    /// Waits until the node holds the node config of `version`.
    pub async fn wait_node_config_version(&self, version: &str) {
        loop {
            let notify = lock(&self.state).notify.clone();
            let notified = notify.notified();
            if lock(&self.state).node_config_version == version {
                return;
            }
            notified.await;
        }
    }

    /// How many messages of this kind have been received (over every connection).
    pub fn received_count(&self, kind: &str) -> usize {
        lock(&self.state)
            .received
            .iter()
            .filter(|k| *k == kind)
            .count()
    }

    /// Waits until `n` messages of this kind have been received (over every connection).
    pub async fn wait_received_count(&self, kind: &str, n: usize) {
        loop {
            let notify = lock(&self.state).notify.clone();
            let notified = notify.notified();
            if self.received_count(kind) >= n {
                return;
            }
            notified.await;
        }
    }

    /// Forgets the received message kinds, start counts and stream errors recorded so far
    /// (a long run keeps its memory flat); the runtime's instances stay.
    pub fn clear_records(&self) {
        let mut state = lock(&self.state);
        state.received.clear();
        state.starts.clear();
        state.stream_errors.clear();
    }

    /// Waits until the stream has ended (closed by the server or by an error).
    pub async fn wait_closed(&mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.raw = None;
    }

    /// Whether the stream task still runs.
    pub fn is_connected(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub fn running(&self) -> BTreeMap<InstanceIdent, SimInstance> {
        lock(&self.state).running.clone()
    }
}

impl Drop for SimSm {
    fn drop(&mut self) {
        self.disconnect();
    }
}

async fn handle(
    state: &Arc<Mutex<SimState>>,
    options: &SimOptions,
    out: &mpsc::Sender<pb::SmOutgoingMessages>,
    m: In,
) {
    let kind = match &m {
        In::GetNodeConfigStatus(_) => "GetNodeConfigStatus",
        In::CheckNodeConfig(_) => "CheckNodeConfig",
        In::SetNodeConfig(_) => "SetNodeConfig",
        In::UpdateInstances(_) => "UpdateInstances",
        In::SystemLogRequest(_) => "SystemLogRequest",
        In::InstanceLogRequest(_) => "InstanceLogRequest",
        In::InstanceCrashLogRequest(_) => "InstanceCrashLogRequest",
        In::GetAverageMonitoring(_) => "GetAverageMonitoring",
        In::ConnectionStatus(_) => "ConnectionStatus",
    };
    let notify = {
        let mut st = lock(state);
        st.received.push(kind.to_string());
        st.notify.clone()
    };
    notify.notify_waiters();
    let reply = match m {
        In::ConnectionStatus(c) => {
            lock(state).cloud_connected =
                Some(c.cloud_status == pb::ConnectionEnum::Connected as i32);
            None
        }
        In::GetNodeConfigStatus(_) => {
            let s = lock(state);
            Some(vec![node_config_status(&s.node_config_version, None)])
        }
        In::CheckNodeConfig(c) => {
            let err = if options.reject_node_config {
                Some("node config rejected by the simulated node".to_string())
            } else if serde_json::from_str::<serde_json::Value>(&c.node_config).is_err() {
                Some("node config is not JSON".to_string())
            } else {
                None
            };
            Some(vec![node_config_status(&c.version, err)])
        }
        In::SetNodeConfig(c) => {
            let mut s = lock(state);
            s.node_config_version = c.version.clone();
            s.node_config = c.node_config.clone();
            s.notify.notify_waiters();
            Some(vec![node_config_status(&c.version, None)])
        }
        In::UpdateInstances(u) => {
            if !options.delay.is_zero() {
                tokio::time::sleep(options.delay).await;
            }
            Some(vec![msg(Out::UpdateInstancesStatus(apply_update(
                state, options, u,
            )))])
        }
        In::GetAverageMonitoring(_) => {
            let n = lock(state).running.len() as u64;
            Some(vec![msg(Out::AverageMonitoring(pb::AverageMonitoring {
                node_monitoring: Some(pb::MonitoringData {
                    timestamp: None,
                    ram: 100 << 20 | n,
                    cpu: 1000 + n,
                    partitions: vec![],
                    download: 0,
                    upload: 0,
                }),
                instances_monitoring: vec![],
            }))])
        }
        In::SystemLogRequest(r) => Some(log_parts(&r.correlation_id, options.log_parts)),
        In::InstanceLogRequest(r) => Some(log_parts(&r.correlation_id, options.log_parts)),
        In::InstanceCrashLogRequest(r) => Some(log_parts(&r.correlation_id, options.log_parts)),
    };
    for r in reply.into_iter().flatten() {
        if out.send(r).await.is_err() {
            return;
        }
    }
}

fn node_config_status(version: &str, error: Option<String>) -> pb::SmOutgoingMessages {
    msg(Out::NodeConfigStatus(pb::NodeConfigStatus {
        state: if version.is_empty() {
            "absent"
        } else {
            "installed"
        }
        .into(),
        version: version.to_string(),
        error: Some(pbc::ErrorInfo {
            aos_code: i32::from(error.is_some()),
            exit_code: 0,
            message: error.unwrap_or_default(),
        }),
    }))
}

fn log_parts(correlation_id: &str, parts: u64) -> Vec<pb::SmOutgoingMessages> {
    let parts = parts.max(1);
    (1..=parts)
        .map(|part| {
            msg(Out::Log(pb::LogData {
                correlation_id: correlation_id.to_string(),
                part_count: parts,
                part,
                data: format!("log part {part} of {parts}\n").into_bytes(),
                status: "ok".into(),
                error: Some(pbc::ErrorInfo::default()),
            }))
        })
        .collect()
}

fn apply_update(
    state: &Arc<Mutex<SimState>>,
    options: &SimOptions,
    u: pb::UpdateInstances,
) -> pb::UpdateInstancesStatus {
    let mut s = lock(state);
    let mut out = Vec::new();
    for id in &u.stop_instances {
        let ident = convert::ident_from_pb(id);
        if let Some(mut i) = s.running.remove(&ident) {
            i.state = "inactive".into();
            out.push(status(&ident, &i, false));
        } else {
            out.push(pb::InstanceStatus {
                instance: Some(id.clone()),
                state: "inactive".into(),
                ..Default::default()
            });
        }
    }
    for info in &u.start_instances {
        let Some(id) = &info.instance else {
            continue;
        };
        let ident = convert::ident_from_pb(id);
        let want = SimInstance {
            version: info.version.clone(),
            runtime_id: info.runtime_id.clone(),
            manifest_digest: info.manifest_digest.clone(),
            state: if options.fail_items.contains(&id.item_id) {
                "failed".into()
            } else {
                "active".into()
            },
            uid: info.uid,
            item_type: id.r#type,
        };
        // An instance already running as asked is left alone (the start list is the node's
        // whole set); anything else is (re)started.
        let same = s.running.get(&ident).is_some_and(|r| {
            r.version == want.version
                && r.runtime_id == want.runtime_id
                && r.manifest_digest == want.manifest_digest
                && r.state != "failed"
        });
        if !same {
            *s.starts.entry(ident.clone()).or_default() += 1;
            s.running.insert(ident.clone(), want);
        }
        if let Some(i) = s.running.get(&ident) {
            out.push(status(&ident, i, false));
        }
    }
    pb::UpdateInstancesStatus { instances: out }
}
