//! The cloud agent: what the daemon does with the cloud link.
//!
//! * Incoming (as [`CloudInbox`]): a `desiredStatus` is validated (errors name the field) and
//!   committed to the store before its ACK; `requestLog` goes to the listed nodes' SMs (nodes
//!   that are not connected get an error `pushLog` at once); certificate renewal, installation
//!   and provisioning go through the [`Iam`] trait and are always answered; requests the unit
//!   cannot serve yet (storage state, env var overrides) are answered where the protocol has an
//!   answer and counted.
//! * Outgoing ([`CloudAgent::run`]): a full `unitStatus` on every connect and when an update run
//!   has converged, delta statuses debounced by `unitStatusSendTimeout` (the timer restarts on
//!   each change); alerts every `alerts.sendPeriod` in packages of at most 16; monitoring every
//!   `monitoring.sendPeriod`; log parts as they arrive. SMs are told when the cloud link goes
//!   up or down.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::api::cloud::certs::{self, Iam, IamError};
use crate::api::cloud::link::{CloudInbox, LinkHandle, sleep_until};
use crate::api::cloud::messages::{self, Envelope, Message, OverrideEnvVarsStatus};
use crate::api::cloud::{desired, telemetry, unitstatus};
use crate::api::json::{self, Problems};
use crate::api::sm::SmController;
use crate::storagestate::{InstanceKey, StorageState};
use crate::store::Store;

/// Timings of the agent (config keys in parentheses).
#[derive(Debug, Clone, Copy)]
pub struct AgentConfig {
    /// `unitStatusSendTimeout`: quiet time before a delta status is sent.
    pub unit_status_send_timeout: Duration,
    /// `alerts.sendPeriod`.
    pub alerts_send_period: Duration,
    /// `monitoring.sendPeriod`.
    pub monitoring_send_period: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            unit_status_send_timeout: Duration::from_secs(10),
            alerts_send_period: Duration::from_secs(10),
            monitoring_send_period: Duration::from_secs(60),
        }
    }
}

impl AgentConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            unit_status_send_timeout: c.unit_status_send_timeout,
            alerts_send_period: c.alerts.send_period,
            monitoring_send_period: c.monitoring.send_period,
        }
    }
}

/// Counters of the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentCounters {
    pub full_statuses: u64,
    pub delta_statuses: u64,
    pub alert_packages: u64,
    pub monitoring_messages: u64,
    pub log_parts: u64,
    /// Requests the unit has no handler for yet (storage state).
    pub unsupported: u64,
    /// Sends the link refused (queue full, or not important while down).
    pub refused: u64,
    pub store_errors: u64,
    /// `newState` messages sent.
    pub new_states: u64,
    /// `updateState` requests written into state files.
    pub states_updated: u64,
    /// Local alerts dropped as duplicates of a queued one.
    pub alerts_duplicate: u64,
    /// Local alerts dropped because the cache was full.
    pub alerts_overflow: u64,
}

/// An IAM that is not there: every call fails with one message. Used until the IAM client is
/// configured, so that certificate and provisioning requests still get their answers.
pub struct NoIam {
    pub main_node: String,
}

impl Iam for NoIam {
    fn main_node_id(&self) -> String {
        self.main_node.clone()
    }

    async fn create_key(&self, _: &str, _: &str, _: &str, _: &str) -> Result<String, IamError> {
        Err(IamError::new("no IAM client is configured"))
    }

    async fn apply_cert(&self, _: &str, _: &str, _: &str) -> Result<certs::AppliedCert, IamError> {
        Err(IamError::new("no IAM client is configured"))
    }

    async fn cert_types(&self, _: &str) -> Result<Vec<String>, IamError> {
        Err(IamError::new("no IAM client is configured"))
    }

    async fn start_provisioning(&self, _: &str, _: &str) -> Result<(), IamError> {
        Err(IamError::new("no IAM client is configured"))
    }

    async fn finish_provisioning(&self, _: &str, _: &str) -> Result<(), IamError> {
        Err(IamError::new("no IAM client is configured"))
    }

    async fn deprovision(&self, _: &str, _: &str) -> Result<(), IamError> {
        Err(IamError::new("no IAM client is configured"))
    }
}

/// See the module documentation.
pub struct CloudAgent<I: Iam> {
    store: Arc<Store>,
    sm: SmController,
    link: LinkHandle,
    iam: Arc<I>,
    /// The timing settings; a new value (config reload) applies from the next period.
    config: watch::Receiver<AgentConfig>,
    counters: watch::Sender<AgentCounters>,
    /// A new desired state was committed and its update run has not been reported in full.
    run_pending: Mutex<bool>,
    /// Alerts raised on this node (journal, downloads), waiting for the next alerts period,
    /// each with its duplicate key.
    local_alerts: Mutex<Vec<(Option<serde_json::Value>, messages::AlertItem)>>,
    /// Instance state sync with the cloud, when the unit keeps states.
    storage: Option<Arc<StorageState>>,
    /// An instance's state checksum changed (sent, written or set up): the status loop sends
    /// a delta, as it does for a store change.
    checksum_changed: tokio::sync::Notify,
}

/// How often instance state files are checked for local changes.
pub const STATE_POLL_PERIOD: Duration = Duration::from_secs(5);

/// Alerts of this node kept between sends (upstream's cache size).
pub const LOCAL_ALERT_CACHE: usize = 64;

/// An alert without its timestamp, for duplicate detection.
fn alert_key(item: &messages::AlertItem) -> Option<serde_json::Value> {
    let mut v = serde_json::to_value(item).ok()?;
    if let Some(o) = v.as_object_mut() {
        o.remove("timestamp");
    }
    Some(v)
}

impl<I: Iam + 'static> CloudAgent<I> {
    pub fn new(
        store: Arc<Store>,
        sm: SmController,
        link: LinkHandle,
        iam: Arc<I>,
        config: AgentConfig,
    ) -> Self {
        Self {
            store,
            sm,
            link,
            iam,
            config: watch::channel(config).1,
            counters: watch::Sender::new(AgentCounters::default()),
            // An update interrupted by a restart resumes: its end is reported in full too.
            run_pending: Mutex::new(true),
            local_alerts: Mutex::new(Vec::new()),
            storage: None,
            checksum_changed: tokio::sync::Notify::new(),
        }
    }

    /// Syncs instance states (`stateDir`) with the cloud: `newState` for local changes,
    /// `stateRequest` for new instances and rejected states, `updateState`/`stateAcceptance`
    /// applied.
    pub fn with_storage_state(mut self, storage: Arc<StorageState>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Takes its timing settings from `config` from now on, and every new value sent there
    /// (the daemon's config reload).
    pub fn with_config_updates(mut self, config: watch::Receiver<AgentConfig>) -> Self {
        self.config = config;
        self
    }

    /// Starts the agent's senders and the link runner that feeds it; both end with `stop`.
    pub fn start(
        self: &Arc<Self>,
        link_runner: crate::api::cloud::link::LinkRunner,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(link_runner.run(self.clone(), stop.clone())),
            tokio::spawn(self.clone().run(stop)),
        ]
    }

    /// Queues every alert that arrives on `alerts` (journal reader, downloads) until the
    /// senders are gone.
    pub async fn forward_alerts(
        self: Arc<Self>,
        mut alerts: tokio::sync::mpsc::Receiver<messages::AlertItem>,
    ) {
        while let Some(alert) = alerts.recv().await {
            self.push_alert(alert);
        }
    }

    /// Queues an alert raised on this node (the journal reader) for the next alerts period.
    /// Duplicates of a queued alert (same but for the timestamp) and alerts beyond the cache
    /// are dropped and counted. Returns whether it was kept.
    pub fn push_alert(&self, item: messages::AlertItem) -> bool {
        let key = alert_key(&item);
        let mut cache = self
            .local_alerts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if key.is_some() && cache.iter().any(|(k, _)| *k == key) {
            drop(cache);
            self.count(|c| c.alerts_duplicate += 1);
            return false;
        }
        if cache.len() >= LOCAL_ALERT_CACHE {
            drop(cache);
            self.count(|c| c.alerts_overflow += 1);
            return false;
        }
        cache.push((key, item));
        true
    }

    fn take_alert_packages(&self) -> Vec<messages::Alerts> {
        let mut items: Vec<messages::AlertItem> = self
            .sm
            .intake()
            .drain_alerts()
            .iter()
            .filter_map(|(node, alert)| telemetry::alert_to_cloud(node, alert))
            .collect();
        let local = std::mem::take(
            &mut *self
                .local_alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        items.extend(local.into_iter().map(|(_, item)| item));
        telemetry::packages(items)
    }

    pub fn counters(&self) -> AgentCounters {
        *self.counters.borrow()
    }

    /// Waits until the counters satisfy `pred`.
    pub async fn wait_counters(&self, pred: impl Fn(&AgentCounters) -> bool) -> AgentCounters {
        let mut rx = self.counters.subscribe();
        let found = rx.wait_for(|c| pred(c)).await.map(|c| *c);
        found.unwrap_or_else(|_| *rx.borrow())
    }

    fn count(&self, f: impl FnOnce(&mut AgentCounters)) {
        self.counters.send_modify(f);
    }

    async fn send(&self, msg: Message) {
        let t = msg.message_type();
        if let Err(e) = self.link.send(msg).await {
            self.count(|c| c.refused += 1);
            tracing::debug!("cloud agent: {t} not sent: {e}");
        }
    }

    /// Runs the senders until `stop` turns true.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let tasks = [
            tokio::spawn(self.clone().status_loop(stop.clone())),
            tokio::spawn(self.clone().periodic_loop(stop.clone())),
            tokio::spawn(self.clone().log_loop(stop.clone())),
            tokio::spawn(self.clone().state_loop(stop.clone())),
        ];
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn full_status(&self) -> Option<messages::UnitStatus> {
        match self.store.shared_snapshot() {
            Ok(snap) => {
                let conditions = self.store.conditions().unwrap_or_default();
                let mut status = unitstatus::full_status_of(&snap, &conditions);
                if let Some(storage) = &self.storage {
                    let sums = storage.checksums().await;
                    unitstatus::set_state_checksums(&mut status, |item, subject, instance| {
                        sums.get(&InstanceKey::new(item, subject, instance))
                            .cloned()
                    });
                }
                Some(status)
            }
            Err(e) => {
                self.count(|c| c.store_errors += 1);
                tracing::error!("cloud agent: reading the store: {e}");
                None
            }
        }
    }

    fn update_run_finished(&self) -> bool {
        let pending = *self
            .run_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending
            && self
                .store
                .shared_snapshot()
                .is_ok_and(|s| crate::sim::unit::converged(&s))
    }

    /// Sends a full status; `run_done` when it reports the end of an update run.
    async fn send_full(&self, run_done: bool) -> Option<messages::UnitStatus> {
        let full = self.full_status().await?;
        if run_done {
            *self
                .run_pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = false;
        }
        self.send(Message::UnitStatus(full.clone())).await;
        self.count(|c| c.full_statuses += 1);
        Some(full)
    }

    /// When a status change seen now is sent: every change restarts the timer.
    fn debounced(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.config.borrow().unit_status_send_timeout
    }

    async fn status_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut link = self.link.state();
        let mut changes = self.store.subscribe();
        let mut sent: Option<messages::UnitStatus> = None;
        let mut due: Option<tokio::time::Instant> = None;
        let mut session = 0;
        loop {
            let state = *link.borrow_and_update();
            if state.connected && state.sessions != session {
                // Full status on every connect.
                session = state.sessions;
                sent = self.send_full(false).await;
                due = None;
            } else if !state.connected {
                // Nothing accumulates while disconnected.
                sent = None;
                due = None;
            }
            tokio::select! {
                r = link.changed() => if r.is_err() { break },
                change = changes.recv() => {
                    let Some(tables) = change else { break };
                    if tables.contains(&"desired") {
                        *self.run_pending.lock().unwrap_or_else(PoisonError::into_inner) = true;
                    }
                    if sent.is_some() {
                        // Debounce: every change restarts the timer.
                        due = Some(self.debounced());
                    }
                }
                () = self.checksum_changed.notified() => if sent.is_some() {
                    due = Some(self.debounced());
                },
                _ = sleep_until(due), if due.is_some() => {
                    due = None;
                    if self.update_run_finished() {
                        sent = self.send_full(true).await;
                        continue;
                    }
                    let (Some(last), Some(now)) = (sent.as_ref(), self.full_status().await) else { continue };
                    if let Some(d) = unitstatus::delta(last, &now) {
                        self.send(Message::UnitStatus(d)).await;
                        self.count(|c| c.delta_statuses += 1);
                        sent = Some(now);
                    }
                }
                _ = stop.changed() => break,
            }
        }
    }

    async fn periodic_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut settings = self.config.clone();
        let periods = |c: &AgentConfig| {
            let mut alerts = tokio::time::interval(c.alerts_send_period);
            let mut monitoring = tokio::time::interval(c.monitoring_send_period);
            alerts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            monitoring.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (alerts, monitoring)
        };
        let (mut alerts, mut monitoring) = periods(&settings.borrow_and_update());
        let mut settings_open = true;
        let mut link = self.link.state();
        loop {
            tokio::select! {
                r = settings.changed(), if settings_open => match r {
                    Ok(()) => {
                        let (a, m) = periods(&settings.borrow_and_update());
                        // The first tick of a new interval is immediate; skip it so that what
                        // waits is sent at the new period, not at once.
                        (alerts, monitoring) = (a, m);
                        alerts.reset();
                        monitoring.reset();
                    }
                    Err(_) => settings_open = false,
                },
                _ = alerts.tick() => {
                    if !self.link.is_connected() { continue }
                    for package in self.take_alert_packages() {
                        self.send(Message::Alerts(package)).await;
                        self.count(|c| c.alert_packages += 1);
                    }
                }
                _ = monitoring.tick() => {
                    if !self.link.is_connected() { continue }
                    let intake = self.sm.intake();
                    let msg = telemetry::monitoring_message(
                        intake.drain_node_monitoring(),
                        intake.drain_instance_monitoring(),
                    );
                    if let Some(m) = msg {
                        self.send(Message::MonitoringData(m)).await;
                        self.count(|c| c.monitoring_messages += 1);
                    }
                }
                r = link.changed() => {
                    if r.is_err() { break }
                    let connected = link.borrow_and_update().connected;
                    self.sm.set_cloud_connected(connected).await;
                }
                _ = stop.changed() => break,
            }
        }
    }

    async fn log_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            for (node, part) in self.sm.intake().drain_logs() {
                self.send(Message::PushLog(telemetry::push_log(&node, &part)))
                    .await;
                self.count(|c| c.log_parts += 1);
            }
            tokio::select! {
                _ = self.sm.intake().logs_arrived() => {}
                _ = stop.changed() => break,
            }
        }
    }

    /// Instance states: set up the state of every placed instance with a state quota (a new
    /// one asks the cloud for its state), forget the ones no longer placed, and send local
    /// changes. Runs every [`STATE_POLL_PERIOD`] and on placement changes.
    async fn state_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(storage) = self.storage.clone() else {
            return;
        };
        let mut known: std::collections::BTreeSet<InstanceKey> = Default::default();
        let mut tick = tokio::time::interval(STATE_POLL_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.store.subscribe();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                change = changes.recv() => {
                    let Some(tables) = change else { break };
                    if !tables.contains(&"placements") { continue }
                }
                _ = stop.changed() => break,
            }
            if let Ok(snap) = self.store.shared_snapshot() {
                // State quota by manifest, once per pass.
                let quotas: std::collections::BTreeMap<&crate::model::Digest, u64> = snap
                    .catalogue
                    .images
                    .values()
                    .flat_map(|i| i.manifests.iter())
                    .filter_map(|m| {
                        let limit = m.item_config.as_ref()?.quotas.state_limit?;
                        Some((&m.digest, limit))
                    })
                    .collect();
                let mut wanted = std::collections::BTreeMap::new();
                for p in snap.allocations.instances.values() {
                    let quota = quotas.get(&p.manifest_digest).copied().unwrap_or(0);
                    if quota > 0 {
                        let key = InstanceKey::new(
                            p.ident.item_id.as_str(),
                            p.ident.subject_id.as_str(),
                            p.ident.instance,
                        );
                        wanted.insert(key, quota);
                    }
                }
                for (key, quota) in &wanted {
                    if !known.contains(key) {
                        match storage.setup(key, *quota).await {
                            Ok(_) => {
                                known.insert(key.clone());
                                self.checksum_changed.notify_one();
                            }
                            Err(e) => tracing::warn!("instance state {key}: {e}"),
                        }
                    }
                }
                let gone: Vec<InstanceKey> = known
                    .iter()
                    .filter(|k| !wanted.contains_key(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    storage.cleanup(&key).await;
                    known.remove(&key);
                }
            }
            for request in storage.take_state_requests().await {
                self.send(Message::StateRequest(request)).await;
            }
            for new_state in storage.poll_changes().await {
                self.send(Message::NewState(new_state)).await;
                self.count(|c| c.new_states += 1);
                self.checksum_changed.notify_one();
            }
        }
    }

    /// Stores the cloud's env var overrides with the desired state (replacing the previous
    /// set); the instances reconciler restarts the instances whose variables change. Returns
    /// one status per variable: an error for a variable that cannot be applied.
    async fn override_env_vars(
        &self,
        o: &messages::OverrideEnvVars,
    ) -> Vec<messages::EnvVarStatus> {
        let now = crate::engine::wall_clock()();
        let mut overrides = Vec::new();
        let mut statuses = Vec::new();
        for item in &o.items {
            let ident = messages::InstanceIdent {
                item: item.filter.item.clone().unwrap_or_default(),
                subject: item.filter.subject.clone().unwrap_or_default(),
                instance: item.filter.instance.unwrap_or_default(),
            };
            for var in &item.variables {
                let expires_at = match var.ttl.as_deref().filter(|t| !t.is_empty()) {
                    None => Ok(None),
                    Some(t) => crate::scenario::parse_rfc3339_ms(t)
                        .map(Some)
                        .ok_or_else(|| format!("ttl {t:?} is not an RFC 3339 time")),
                };
                let error = match expires_at {
                    Ok(expires_at) => {
                        overrides.push(crate::model::EnvOverride {
                            item_id: item.filter.item.as_ref().and_then(|i| i.id.clone()),
                            subject_id: item.filter.subject.as_ref().and_then(|s| s.id.clone()),
                            instance: item.filter.instance,
                            name: var.name.clone(),
                            value: var.value.clone(),
                            expires_at,
                        });
                        if expires_at.is_some_and(|t| t <= now) {
                            Some("the ttl has already passed".to_owned())
                        } else {
                            None
                        }
                    }
                    Err(e) => Some(e),
                };
                statuses.push(messages::EnvVarStatus {
                    ident: ident.clone(),
                    name: var.name.clone(),
                    error_info: error.as_deref().map(unitstatus::error_info),
                });
            }
        }
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            let current = store.read(|r| r.desired())?;
            match current {
                Some(mut d) => {
                    d.env_overrides = overrides;
                    store.write(|tx| tx.set_desired(Some(&d)))?;
                    Ok(true)
                }
                None => Ok::<bool, crate::store::StoreError>(false),
            }
        })
        .await;
        let failure = match written {
            Ok(Ok(true)) => None,
            Ok(Ok(false)) => {
                Some("no desired state yet: overrides apply to desired instances".to_owned())
            }
            Ok(Err(e)) => Some(format!("storing the overrides: {e}")),
            Err(e) => Some(format!("storing the overrides: {e}")),
        };
        if let Some(f) = failure {
            for s in &mut statuses {
                s.error_info
                    .get_or_insert_with(|| unitstatus::error_info(&f));
            }
        }
        statuses
    }

    async fn request_log(&self, req: messages::RequestLog) {
        let connected = self.sm.connected_nodes();
        let plan = telemetry::log_requests(&req, &connected);
        for (node, msg) in plan.requests {
            if let Err(e) = self.sm.send(&node, msg).await {
                self.send(Message::PushLog(telemetry::log_error_for_node(
                    &req.correlation_id,
                    &node,
                    &e.to_string(),
                )))
                .await;
            }
        }
        for (node, reason) in plan.failed {
            self.send(Message::PushLog(telemetry::log_error_for_node(
                &req.correlation_id,
                &node,
                &reason,
            )))
            .await;
        }
    }
}

/// Parses a `desiredStatus` body; the error lists every problem by its JSON path.
pub fn parse_desired(data: Map<String, Value>) -> Result<crate::model::DesiredState, String> {
    let value = Value::Object(data);
    let mut probs = Problems::default();
    let parsed =
        json::obj(&value, "data", &mut probs).and_then(|o| desired::from_data(&o, &mut probs));
    match parsed {
        Some(d) if probs.is_empty() => Ok(d),
        _ => Err(probs.to_string().replace('\n', "; ")),
    }
}

impl<I: Iam + 'static> CloudInbox for CloudAgent<I> {
    async fn desired_status(&self, data: Map<String, Value>) -> Result<(), String> {
        let mut desired = parse_desired(data)?;
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            // Env var overrides come in their own message and outlive a new desired status.
            if let Some(current) = store.read(|r| r.desired())? {
                desired.env_overrides = current.env_overrides;
            }
            store.write(|tx| tx.set_desired(Some(&desired)))
        })
        .await;
        match written {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.count(|c| c.store_errors += 1);
                Err(format!("storing the desired status: {e}"))
            }
            Err(e) => Err(format!("storing the desired status: {e}")),
        }
    }

    async fn request(&self, envelope: Envelope) {
        let iam = self.iam.as_ref();
        match envelope.data {
            Message::RequestLog(r) => self.request_log(r).await,
            Message::RenewCertificatesNotification(n) => match certs::renew(iam, &n).await {
                Ok(mut issue) => {
                    issue.correlation_id = n.correlation_id.clone();
                    self.send(Message::IssueUnitCertificates(issue)).await;
                }
                Err(e) => tracing::warn!("cloud agent: certificate renewal abandoned: {e}"),
            },
            Message::IssuedUnitCertificates(issued) => {
                let mut confirmation = certs::install(iam, &issued).await;
                confirmation.correlation_id = issued.correlation_id.clone();
                self.send(Message::InstallUnitCertificatesConfirmation(confirmation))
                    .await;
            }
            Message::StartProvisioningRequest(r) => {
                let mut resp = certs::start_provisioning(iam, &r).await;
                resp.correlation_id = r.correlation_id.clone();
                self.send(Message::StartProvisioningResponse(resp)).await;
            }
            Message::FinishProvisioningRequest(r) => {
                let mut resp = certs::finish_provisioning(iam, &r).await;
                resp.correlation_id = r.correlation_id.clone();
                self.send(Message::FinishProvisioningResponse(resp)).await;
            }
            Message::DeprovisioningRequest(r) => {
                let mut resp = certs::deprovisioning(iam, &r).await;
                resp.correlation_id = r.correlation_id.clone();
                self.send(Message::DeprovisioningResponse(resp)).await;
            }
            Message::OverrideEnvVars(o) => {
                let statuses = self.override_env_vars(&o).await;
                self.send(Message::OverrideEnvVarsStatus(OverrideEnvVarsStatus {
                    correlation_id: o.correlation_id.clone(),
                    statuses,
                }))
                .await;
            }
            Message::UpdateState(update) => match &self.storage {
                Some(storage) => match storage.update_state(&update).await {
                    Ok(()) => {
                        self.count(|c| c.states_updated += 1);
                        self.checksum_changed.notify_one();
                    }
                    Err(e) => tracing::warn!("cloud agent: updateState not applied: {e}"),
                },
                None => {
                    self.count(|c| c.unsupported += 1);
                    tracing::warn!("cloud agent: updateState: this unit keeps no instance states");
                }
            },
            Message::StateAcceptance(acceptance) => match &self.storage {
                Some(storage) => match storage.accept_state(&acceptance).await {
                    Ok(Some(request)) => {
                        self.send(Message::StateRequest(request)).await;
                        self.checksum_changed.notify_one();
                    }
                    Ok(None) => self.checksum_changed.notify_one(),
                    Err(e) => tracing::warn!("cloud agent: stateAcceptance: {e}"),
                },
                None => {
                    self.count(|c| c.unsupported += 1);
                    tracing::warn!(
                        "cloud agent: stateAcceptance: this unit keeps no instance states"
                    );
                }
            },
            other => {
                self.count(|c| c.unsupported += 1);
                tracing::warn!(
                    "cloud agent: {} is not handled by this unit yet",
                    other.message_type()
                );
            }
        }
    }
}
