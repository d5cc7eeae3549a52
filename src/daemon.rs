//! `aos-cm run`: every part wired together from aos_cm.cfg.
//!
//! The store is opened (its state survives restarts), the nodes' IAM information is loaded, the
//! SM server (SMService + NetworkService, TLS when the identity has a certificate) listens on
//! `cmServerUrl`, the embedded DNS server on `dnsIp`, the reconcile runner drives the unit, and
//! the cloud link with its agent talks to AosCloud. [`Daemon::shutdown`] stops everything and
//! waits for it (bounded), so that in-flight store transactions finish.
//!
//! Identity: until the IAM client is wired, the `identity` section of the config gives the
//! system ID, the main node and the certificates (see `config::IdentityConfig`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::{AgentConfig, CloudAgent, NoIam};
use crate::api::cloud::certs::Iam;
use crate::api::cloud::discovery::{self, DiscoveryInputs};
use crate::api::cloud::link::{CloudLink, LinkConfig, LinkHandle, LinkRunner};
use crate::api::cloud::transport;
use crate::api::dns::DnsServer;
use crate::api::dnszone::{self, keep_in_sync};
use crate::api::iam::client::{CertInfo, WatchEvent, read_pem_url};
use crate::api::iam::{ClientTls, IamClient, IamConfig, sync_to_store};
use crate::api::sm::network::NetworkService;
use crate::api::sm::server::{TlsPem, serve};
use crate::api::sm::{SmConfig, SmController};
use crate::config::{Config, IdentityConfig};
use crate::engine::wall_clock;
use crate::engine::{self, StoreSink};
use crate::executor::UnitExecutor;
use crate::imagestore::fetch::{DownloadLimits, Fetcher};
use crate::reconcilers::runner::{Runner, RunnerConfig};
use crate::store::Store;

/// Why the daemon could not start. Each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what}: {reason}")]
    Setup { what: String, reason: String },
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DaemonError + '_ {
    move |e| DaemonError::Setup {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// A running daemon.
pub struct Daemon {
    pub store: Arc<Store>,
    pub sm: SmController,
    /// Where the SM server listens.
    pub sm_addr: SocketAddr,
    pub link: LinkHandle,
    /// This unit's system ID (from the identity section or from IAM).
    pub system_id: String,
    pub dns: Option<Arc<DnsServer>>,
    /// The file server's URL as the nodes are told it (`fileServerUrl`, its port filled in
    /// when the config says 0); empty when there is none.
    pub file_server_url: String,
    /// Where the metrics endpoint listens, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The cloud agent's timing settings, changed by [`Daemon::reload`].
    agent_settings: watch::Sender<AgentConfig>,
    stop: watch::Sender<bool>,
    tasks: Vec<Task>,
}

/// What [`Daemon::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    /// The config keys whose new values are in use now.
    pub applied: Vec<&'static str>,
    /// Other settings changed too; they take effect at the next start.
    pub restart_needed: bool,
}

/// `old` with the settings [`Daemon::reload`] applies taken from `new`: the config the daemon
/// runs with after a reload.
pub fn reloadable_part(old: &Config, new: &Config) -> Config {
    let mut c = old.clone();
    c.unit_status_send_timeout = new.unit_status_send_timeout;
    c.alerts.send_period = new.alerts.send_period;
    c.monitoring.send_period = new.monitoring.send_period;
    c.image_manager.update_item_ttl = new.image_manager.update_item_ttl;
    c
}

/// `cmServerUrl` / `fileServerUrl` as a socket address: `:8093` means every interface.
pub async fn listen_addr(url: &str) -> Result<SocketAddr, String> {
    let url = url.trim();
    let url = url.strip_prefix("tcp://").unwrap_or(url);
    if url.is_empty() {
        return Err("the address is not set".to_owned());
    }
    let full = if url.starts_with(':') {
        format!("0.0.0.0{url}")
    } else {
        url.to_owned()
    };
    if let Ok(a) = full.parse::<SocketAddr>() {
        return Ok(a);
    }
    tokio::net::lookup_host(full.as_str())
        .await
        .map_err(|e| format!("{url:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url:?}: no address"))
}

fn read_pem(path: &Path, what: &str) -> Result<String, DaemonError> {
    std::fs::read_to_string(path).map_err(|e| DaemonError::Setup {
        what: format!("reading the {what} {}", path.display()),
        reason: e.to_string(),
    })
}

/// Where the unit's identity comes from: the config's `identity` section, or IAM.
enum Source {
    Static,
    Iam(IamClient),
}

/// The identity the daemon runs with.
struct Resolved {
    id: IdentityConfig,
    source: Source,
    /// Serial of the `online` certificate IAM gave (IAM and a TLS cloud only).
    online_serial: Option<String>,
    /// Serial of the certStorage certificate the SM server serves (IAM with caCert only).
    sm_serial: Option<String>,
}

/// With an `identity` section: that. Without: IAM at `iamPublicServerUrl` /
/// `iamProtectedServerUrl` (mutual TLS with the `certStorage` certificate when `caCert` is
/// set) gives the system ID, this node's ID and, for a TLS cloud, the `online` certificate.
async fn resolve_identity(config: &Config, ca: Option<&str>) -> Result<Resolved, DaemonError> {
    if let Some(id) = &config.identity {
        return Ok(Resolved {
            id: id.clone(),
            source: Source::Static,
            online_serial: None,
            sm_serial: None,
        });
    }
    if config.iam_public_server_url.trim().is_empty() {
        return Err(DaemonError::Setup {
            what: "identity".to_owned(),
            reason: "the config has neither an `identity` section nor iamPublicServerUrl: \
                     one of them gives the system ID and the nodes (see aos_cm.cfg.sample)"
                .to_owned(),
        });
    }
    let protected =
        Some(config.iam_protected_server_url.trim().to_owned()).filter(|u| !u.is_empty());
    let iam_config = IamConfig {
        public_url: config.iam_public_server_url.trim().to_owned(),
        public_tls: ca.map(|ca| ClientTls {
            ca_cert: ca.to_owned(),
            identity: None,
            domain: None,
        }),
        protected_url: protected.clone(),
        protected_tls: None,
        ..IamConfig::plain("", None)
    };
    let client = match (ca, &protected) {
        (Some(ca), Some(_)) => {
            IamClient::connect_with_cert(&iam_config, ca, &config.cert_storage).await
        }
        _ => IamClient::connect(&iam_config).await,
    }
    .map_err(setup("connecting to IAM"))?;
    let system = client
        .get_system_info()
        .await
        .map_err(setup("IAM GetSystemInfo"))?;
    let mut id = IdentityConfig {
        system_id: system.system_id,
        unit_model: system.unit_model,
        node_id: client.current_node_id(),
        ..IdentityConfig::default()
    };
    let url = discovery::discovery_url(&DiscoveryInputs {
        override_url: &config.override_service_discovery_url,
        config_url: &config.service_discovery_url,
        issuer_alt_uris: &[],
        organization: None,
    })
    .map_err(setup("choosing the service discovery URL"))?;
    let mut online_serial = None;
    if url.starts_with("https://") || url.starts_with("wss://") {
        let online = client
            .get_cert(ONLINE_CERT, &[], "")
            .await
            .map_err(setup("IAM GetCert online"))?;
        id.cert_file = file_path(&online.cert_url);
        id.key_file = file_path(&online.key_url);
        online_serial = Some(online.serial);
    }
    // With caCert the SM server runs mutual TLS with the CM's own certificate (certStorage).
    let mut sm_serial = None;
    if ca.is_some() {
        let own = client
            .get_cert(&config.cert_storage, &[], "")
            .await
            .map_err(setup("IAM GetCert for the SM server (certStorage)"))?;
        id.sm_cert_file = file_path(&own.cert_url);
        id.sm_key_file = file_path(&own.key_url);
        sm_serial = Some(own.serial);
    }
    Ok(Resolved {
        id,
        source: Source::Iam(client),
        online_serial,
        sm_serial,
    })
}

/// The certificate type the cloud link's client certificate has.
const ONLINE_CERT: &str = "online";

/// The SM server's TLS material from an IAM certificate.
fn sm_tls_from(cert: &CertInfo, ca: &str) -> Result<TlsPem, DaemonError> {
    Ok(TlsPem {
        cert: read_pem_url(&cert.cert_url).map_err(setup("reading the SM server certificate"))?,
        key: read_pem_url(&cert.key_url).map_err(setup("reading the SM server key"))?,
        client_ca: ca.to_owned(),
    })
}

/// The cloud link's TLS from the `online` certificate IAM reports.
fn online_tls(cert: &CertInfo, ca: &str) -> Result<Arc<rustls::ClientConfig>, DaemonError> {
    let pem = read_pem_url(&cert.cert_url).map_err(setup("reading the online certificate"))?;
    let key = read_pem_url(&cert.key_url).map_err(setup("reading the online key"))?;
    transport::client_tls(ca.as_bytes(), Some((pem.as_bytes(), key.as_bytes())))
        .map_err(setup("setting up TLS for the cloud"))
}

/// Follows IAM's changes of one certificate type: every new serial (also one missed while the
/// subscription was down, found by asking again when it reopens) goes to `apply`. Runs until
/// `stop`.
async fn follow_cert(
    client: IamClient,
    cert_type: String,
    mut serial: String,
    mut apply: impl FnMut(&CertInfo) -> Result<(), DaemonError> + Send,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = client.watch_cert(&cert_type);
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = stop.wait_for(|s| *s) => return,
        };
        let info = match event {
            None => return,
            Some(WatchEvent::Changed(info)) => info,
            Some(WatchEvent::Opened) => match client.get_cert(&cert_type, &[], "").await {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!("IAM GetCert {cert_type}: {e}");
                    continue;
                }
            },
        };
        if info.serial == serial {
            continue;
        }
        match apply(&info) {
            Ok(()) => {
                tracing::info!(cert_type, serial = %info.serial, "certificate changed; applied");
                serial = info.serial;
            }
            Err(e) => tracing::error!(cert_type, "new certificate not applied: {e}"),
        }
    }
}

/// Runs the SM server on `addr` (first on `listener`) until `stop`; each TLS setting that
/// arrives on `renewed` restarts it: the open SM streams are ended (the nodes reconnect) and
/// the server listens again on the same address with the new certificate.
async fn sm_server(
    listener: tokio::net::TcpListener,
    sm: SmController,
    network: NetworkService,
    mut tls: Option<TlsPem>,
    mut renewed: tokio::sync::mpsc::Receiver<TlsPem>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(addr) = listener.local_addr() else {
        tracing::error!("SM server: no local address");
        return;
    };
    let mut listener = Some(listener);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("SM server: cannot listen on {addr} again: {e}");
                    return;
                }
            },
        };
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let server = serve(l, sm.clone(), Some(network.clone()), tls.clone(), async {
            let _ = end_rx.await;
        });
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => {
                if let Err(e) = r {
                    tracing::error!("SM server stopped: {e}");
                }
                return;
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                let _ = end_tx.send(());
                sm.close_all();
                let _ = server.await;
                return;
            }
            Some(new) = renewed.recv() => {
                tls = Some(new);
                let _ = end_tx.send(());
                sm.close_all_because("the CM's certificate changed; connect again");
                if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
                    tracing::warn!("SM server: old connections did not close in 5 s; dropped");
                }
                tracing::info!("SM server restarted on {addr} with the new certificate");
            }
        }
    }
}

/// Room for alerts of this node (downloads, journal) between their source and the agent,
/// whose own cache holds 64.
const LOCAL_ALERT_QUEUE: usize = 256;

/// How a task is stopped at shutdown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Ends by itself on the stop signal; waited for (store writers finish their transaction).
    Graceful,
    /// Ends by itself, but may wait on peers (the SM server's open streams): waited for briefly.
    Brief,
    /// Runs until aborted; each of its writes is one synchronous transaction.
    Abort,
}

struct Task {
    name: &'static str,
    stop: Stop,
    handle: JoinHandle<()>,
}

impl Task {
    fn new(name: &'static str, stop: Stop, handle: JoinHandle<()>) -> Task {
        Task { name, stop, handle }
    }
}

/// What the cloud agent is made of, whichever IAM it talks to.
struct AgentParts {
    store: Arc<Store>,
    sm: SmController,
    link: LinkHandle,
    config: watch::Receiver<AgentConfig>,
    storage: Arc<crate::storagestate::StorageState>,
    stop: watch::Receiver<bool>,
}

impl AgentParts {
    /// Starts the agent, the link runner that feeds it and the queue of this node's alerts.
    fn spawn<I: Iam + 'static>(
        self,
        iam: Arc<I>,
        link_runner: LinkRunner,
        local_alerts: tokio::sync::mpsc::Receiver<crate::api::cloud::messages::AlertItem>,
        tasks: &mut Vec<Task>,
    ) {
        let initial = *self.config.borrow();
        let agent = Arc::new(
            CloudAgent::new(self.store, self.sm, self.link, iam, initial)
                .with_config_updates(self.config)
                .with_storage_state(self.storage),
        );
        for handle in agent.start(link_runner, self.stop) {
            tasks.push(Task::new("cloud link and agent", Stop::Graceful, handle));
        }
        tasks.push(Task::new(
            "local alerts",
            Stop::Graceful,
            tokio::spawn(agent.forward_alerts(local_alerts)),
        ));
    }
}

/// `host:port` (optionally `tcp://`) with another port.
fn with_port(url: &str, port: u16) -> String {
    match url.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{port}"),
        None => format!("{url}:{port}"),
    }
}

/// Writes `imageManager.updateItemTtl` into the planning settings (one transaction, and none
/// when the store already has it).
fn store_item_ttl(store: &Store, ttl: Duration) -> Result<(), crate::store::StoreError> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    store.write(|tx| {
        let mut settings = tx.settings()?;
        if settings.update_item_ttl_ms != ttl_ms {
            settings.update_item_ttl_ms = ttl_ms;
            tx.set_settings(&settings)?;
        }
        Ok(())
    })
}

/// A `file://` URL or a plain path as a path.
fn file_path(url: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(url.strip_prefix("file://").unwrap_or(url))
}

/// The cloud link settings from the config and the identity.
/// The cloud link settings from the config, the identity and the `caCert` PEM (if set).
pub fn link_config(
    config: &Config,
    id: &IdentityConfig,
    ca: Option<&str>,
) -> Result<LinkConfig, DaemonError> {
    // The online certificate may name the cloud (issuer alternative names, or O=).
    let (uris, organization) = if id.cert_file.as_os_str().is_empty() {
        (Vec::new(), None)
    } else {
        let pem = std::fs::read(&id.cert_file).map_err(|e| DaemonError::Setup {
            what: format!("reading the online certificate {}", id.cert_file.display()),
            reason: e.to_string(),
        })?;
        discovery::certificate_inputs(&pem).map_err(setup("reading the online certificate"))?
    };
    let url = discovery::discovery_url(&DiscoveryInputs {
        override_url: &config.override_service_discovery_url,
        config_url: &config.service_discovery_url,
        issuer_alt_uris: &uris,
        organization: organization.as_deref(),
    })
    .map_err(setup("choosing the service discovery URL"))?;
    let mut link = LinkConfig::new(&id.system_id, &url);
    link.response_wait = config.cloud_response_wait_timeout;
    if !config.cloud_message_log.as_os_str().is_empty() {
        link.message_log = Some(config.cloud_message_log.clone());
    }
    let needs_tls = url.starts_with("https://") || url.starts_with("wss://");
    if needs_tls || ca.is_some() {
        let ca = ca.ok_or_else(|| DaemonError::Setup {
            what: "TLS for the cloud".to_owned(),
            reason: format!("{url} needs caCert, which is not set"),
        })?;
        let client = if id.cert_file.as_os_str().is_empty() {
            None
        } else {
            Some((
                read_pem(&id.cert_file, "online certificate")?,
                read_pem(&id.key_file, "online key")?,
            ))
        };
        let tls = transport::client_tls(
            ca.as_bytes(),
            client.as_ref().map(|(c, k)| (c.as_bytes(), k.as_bytes())),
        )
        .map_err(setup("setting up TLS for the cloud"))?;
        link.tls = Some(tls);
    }
    Ok(link)
}

impl Daemon {
    /// Starts every part; `runner` tunes the reconcile loop (the daemon uses the defaults).
    pub async fn start(config: &Config, runner: RunnerConfig) -> Result<Daemon, DaemonError> {
        // caCert is read once and serves IAM, the SM server, the cloud and signature checks.
        let ca = if config.ca_cert.as_os_str().is_empty() {
            None
        } else {
            Some(read_pem(&config.ca_cert, "caCert")?)
        };
        let ident = resolve_identity(config, ca.as_deref()).await?;
        let id = &ident.id;
        std::fs::create_dir_all(&config.working_dir).map_err(setup("creating workingDir"))?;
        let store =
            Arc::new(Store::open(&config.store_path()).map_err(setup("opening the store"))?);

        // Planning settings from the config; the UID pool stays as the store has it.
        store_item_ttl(&store, config.image_manager.update_item_ttl)
            .map_err(setup("writing the settings"))?;

        // Nodes from the identity's nodes file; what SMs reported stays.
        if !id.nodes_file.as_os_str().is_empty() {
            let nodes = crate::scenario::load_nodes(&id.nodes_file)
                .map_err(setup("reading identity.nodesFile"))?;
            let known = store
                .shared_snapshot()
                .map_err(setup("reading the store"))?;
            store
                .write(|tx| {
                    for (node_id, mut node) in nodes {
                        match known.observed.nodes.get(&node_id) {
                            Some(old) => {
                                node.sm = old.sm.clone();
                                node.connection = old.connection.clone();
                                node.node_config = old.node_config.clone();
                                node.usage = old.usage;
                            }
                            None => {
                                node.sm = None;
                                node.connection =
                                    crate::model::Connection::Disconnected { since: 0 };
                            }
                        }
                        tx.put_node(&node)?;
                    }
                    Ok(())
                })
                .map_err(setup("writing the nodes"))?;
        }

        // The file server is bound first: with port 0 the nodes are told the port it got.
        let mut file_server_url = config.file_server_url.trim().to_owned();
        let file_listener = if file_server_url.is_empty() {
            None
        } else {
            let addr = listen_addr(&file_server_url)
                .await
                .map_err(setup("the file server address (fileServerUrl)"))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(setup("binding the file server (fileServerUrl)"))?;
            if addr.port() == 0 {
                let port = listener
                    .local_addr()
                    .map_err(setup("the file server address (fileServerUrl)"))?
                    .port();
                file_server_url = with_port(&file_server_url, port);
            }
            Some(listener)
        };
        let clock = wall_clock();
        let sm_config = SmConfig {
            sm_connection_timeout: config.node_info_provider.sm_connection_timeout,
            file_server_url: file_server_url.clone(),
            storage_dir: config.storage_dir.to_string_lossy().into_owned(),
            state_dir: config.state_dir.to_string_lossy().into_owned(),
            ..SmConfig::default()
        };
        let sm = SmController::new(store.clone(), sm_config, clock.clone());
        let listen = listen_addr(&config.cm_server_url)
            .await
            .map_err(setup("the SM server address"))?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(setup("binding the SM server (cmServerUrl)"))?;
        let sm_addr = listener
            .local_addr()
            .map_err(setup("the SM server address"))?;
        let tls = if id.sm_cert_file.as_os_str().is_empty() {
            None
        } else {
            Some(TlsPem {
                cert: read_pem(&id.sm_cert_file, "SM server certificate")?,
                key: read_pem(&id.sm_key_file, "SM server key")?,
                client_ca: ca.clone().ok_or_else(|| DaemonError::Setup {
                    what: "the SM server's TLS".to_owned(),
                    reason: "identity.smCertFile needs caCert for the nodes' certificates"
                        .to_owned(),
                })?,
            })
        };

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut metrics_addr = None;
        let resolv = std::fs::read_to_string("/etc/resolv.conf").ok();
        let dns_config = dnszone::dns_config(&config.dns_ip, resolv.as_deref())
            .map_err(setup("the DNS server address (dnsIp)"))?;
        let dns = match dns_config {
            Some(c) => Some(Arc::new(
                DnsServer::start(c)
                    .await
                    .map_err(setup("starting the DNS server (dnsIp)"))?,
            )),
            None => None,
        };
        let dns_servers = dns
            .as_ref()
            .map(|d| vec![d.local_addr().ip().to_string()])
            .unwrap_or_default();
        let network = NetworkService::new(store.clone(), dns_servers);
        if let Some(d) = &dns {
            tasks.push(Task::new(
                "dns zone",
                Stop::Graceful,
                tokio::spawn(keep_in_sync(store.clone(), d.clone(), stop_rx.clone())),
            ));
        }

        if let Some(listener) = file_listener {
            tasks.push(Task::new(
                "file server",
                Stop::Graceful,
                tokio::spawn(crate::api::fileserver::serve(
                    listener,
                    config.image_manager.install_path.join("blobs"),
                    stop_rx.clone(),
                )),
            ));
        }
        // The update scheduler: the task keeps its record and publishes statuses; the gRPC
        // service listens only when updateSchedulerUrl is set.
        {
            use crate::api::scheduler;
            scheduler::apply_policies(&store, &config.update_scheduler)
                .map_err(setup("storing the update scheduler policies"))?;
            let sched = scheduler::Scheduler::new(store.clone(), clock.clone());
            tasks.push(Task::new(
                "update scheduler",
                Stop::Graceful,
                tokio::spawn(sched.clone().run(stop_rx.clone())),
            ));
            if !config.update_scheduler_url.trim().is_empty() {
                let addr = listen_addr(&config.update_scheduler_url)
                    .await
                    .map_err(setup("the update scheduler address (updateSchedulerUrl)"))?;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(setup("binding the update scheduler (updateSchedulerUrl)"))?;
                let mut rx = stop_rx.clone();
                let shutdown = async move {
                    let _ = rx.wait_for(|stopped| *stopped).await;
                };
                tasks.push(Task::new(
                    "update scheduler server",
                    Stop::Brief,
                    tokio::spawn(async move {
                        if let Err(e) = scheduler::serve(listener, sched, shutdown).await {
                            tracing::error!("update scheduler server stopped: {e}");
                        }
                    }),
                ));
            }
        }
        let (sm_renewed, sm_renewed_rx) = tokio::sync::mpsc::channel::<TlsPem>(4);
        let sm_tls_on = tls.is_some();
        tasks.push(Task::new(
            "SM server",
            Stop::Brief,
            tokio::spawn(sm_server(
                listener,
                sm.clone(),
                network,
                tls,
                sm_renewed_rx,
                stop_rx.clone(),
            )),
        ));

        let link_config = link_config(config, id, ca.as_deref())?;
        let (link, link_runner) = CloudLink::build(link_config.clone());
        // Alerts raised on this node (downloads, the journal) go to the agent through one queue.
        let (local_alerts, local_alerts_rx) = tokio::sync::mpsc::channel(LOCAL_ALERT_QUEUE);
        let ca_pem = ca.clone();
        // The Prometheus endpoint, when enabled.
        let metrics = if config.metrics.enabled {
            let addr = listen_addr(&config.metrics.listen)
                .await
                .map_err(setup("the metrics address (metrics.listen)"))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(setup("binding the metrics endpoint (metrics.listen)"))?;
            metrics_addr = listener.local_addr().ok();
            let m = Arc::new(crate::metrics::Metrics::default());
            tasks.push(Task::new(
                "metrics",
                Stop::Graceful,
                tokio::spawn(crate::metrics::serve(
                    listener,
                    m.clone(),
                    link.clone(),
                    sm.clone(),
                    stop_rx.clone(),
                )),
            ));
            Some(m)
        } else {
            None
        };
        let fetcher = Fetcher {
            link: link.clone(),
            install_path: config.image_manager.install_path.clone(),
            download_path: config.image_manager.download_path.clone(),
            roots_pem: ca.map(String::into_bytes).unwrap_or_default(),
            alerts: Some(local_alerts.clone()),
            limits: Arc::new({
                let limits = DownloadLimits::new(
                    usize::try_from(config.image_manager.max_concurrent_downloads).unwrap_or(4),
                    config.image_manager.download_part_limit,
                );
                match &metrics {
                    Some(m) => limits.with_metrics(m.clone()),
                    None => limits,
                }
            }),
        };
        let exec = Arc::new(
            UnitExecutor::new(store.clone(), sm.clone(), clock.clone()).with_fetcher(fetcher),
        );
        let reconcile = Runner::new(
            engine::reconcilers(store.clone(), clock.clone()),
            exec,
            {
                let sink = StoreSink {
                    store: store.clone(),
                    clock,
                };
                match &metrics {
                    Some(m) => Arc::new(crate::metrics::MeteredSink {
                        inner: sink,
                        metrics: m.clone(),
                    }),
                    None => Arc::new(sink) as Arc<dyn crate::reconcilers::runner::OutcomeSink>,
                }
            },
            runner,
        );
        let changes = store.subscribe();
        tasks.push(Task::new(
            "runner",
            Stop::Graceful,
            tokio::spawn(reconcile.run(changes, stop_rx.clone())),
        ));

        let storage = Arc::new(
            crate::storagestate::StorageState::new(config.state_dir.clone())
                .await
                .map_err(setup("opening the instance states (stateDir)"))?,
        );
        let (agent_settings, agent_settings_rx) = watch::channel(AgentConfig::from_config(config));
        let parts = AgentParts {
            store: store.clone(),
            sm: sm.clone(),
            link: link.clone(),
            config: agent_settings_rx,
            storage,
            stop: stop_rx.clone(),
        };
        match &ident.source {
            Source::Static => parts.spawn(
                Arc::new(NoIam {
                    main_node: id.node_id.clone(),
                }),
                link_runner,
                local_alerts_rx,
                &mut tasks,
            ),
            Source::Iam(client) => {
                tasks.push(Task::new(
                    "IAM sync",
                    Stop::Abort,
                    tokio::spawn(sync_to_store(client.clone(), store.clone())),
                ));
                // Certificate changes: a new `online` certificate reconnects the cloud, a new
                // certStorage certificate restarts the SM server.
                if let (Some(ca), Some(serial)) = (ca_pem.clone(), ident.online_serial.clone()) {
                    let link = link.clone();
                    tasks.push(Task::new(
                        "online certificate",
                        Stop::Graceful,
                        tokio::spawn(follow_cert(
                            client.clone(),
                            ONLINE_CERT.to_owned(),
                            serial,
                            move |info| {
                                let tls = online_tls(info, &ca)?;
                                link.reconnect_with(Some(tls))
                                    .map_err(setup("the cloud link"))
                            },
                            stop_rx.clone(),
                        )),
                    ));
                }
                if let (Some(ca), Some(serial), true) =
                    (ca_pem.clone(), ident.sm_serial.clone(), sm_tls_on)
                {
                    tasks.push(Task::new(
                        "SM server certificate",
                        Stop::Graceful,
                        tokio::spawn(follow_cert(
                            client.clone(),
                            config.cert_storage.clone(),
                            serial,
                            move |info| {
                                let pem = sm_tls_from(info, &ca)?;
                                sm_renewed.try_send(pem).map_err(setup("the SM server"))
                            },
                            stop_rx.clone(),
                        )),
                    ));
                }
                parts.spawn(
                    Arc::new(client.clone()),
                    link_runner,
                    local_alerts_rx,
                    &mut tasks,
                )
            }
        }
        if let Some(journal) = &config.alerts.journal_alerts {
            let settings = crate::journalalerts::JournalAlertsSettings::new(
                journal.clone(),
                id.node_id.clone(),
            );
            let journal_store = store.clone();
            let journal_stop = stop_rx.clone();
            tasks.push(Task::new(
                "journal alerts",
                Stop::Graceful,
                tokio::spawn(async move {
                    if let Err(e) = crate::journalalerts::run_journal_alerts(
                        settings,
                        journal_store,
                        local_alerts,
                        journal_stop,
                    )
                    .await
                    {
                        tracing::error!("journal alerts: {e}");
                    }
                }),
            ));
        }

        Ok(Daemon {
            store,
            sm,
            sm_addr,
            link,
            system_id: ident.id.system_id.clone(),
            dns,
            file_server_url,
            metrics_addr,
            agent_settings,
            stop,
            tasks,
        })
    }

    /// Applies what can change while running from `new` (the config was `old`): the cloud
    /// agent's periods (`unitStatusSendTimeout`, `alerts.sendPeriod`, `monitoring.sendPeriod`)
    /// and `imageManager.updateItemTtl`. Returns the keys applied and whether anything else
    /// changed, which takes effect at the next start.
    pub fn reload(&self, old: &Config, new: &Config) -> Result<Reload, DaemonError> {
        let mut applied = Vec::new();
        if new.unit_status_send_timeout != old.unit_status_send_timeout {
            applied.push("unitStatusSendTimeout");
        }
        if new.alerts.send_period != old.alerts.send_period {
            applied.push("alerts.sendPeriod");
        }
        if new.monitoring.send_period != old.monitoring.send_period {
            applied.push("monitoring.sendPeriod");
        }
        if !applied.is_empty() {
            self.agent_settings
                .send_replace(AgentConfig::from_config(new));
        }
        if new.image_manager.update_item_ttl != old.image_manager.update_item_ttl {
            store_item_ttl(&self.store, new.image_manager.update_item_ttl)
                .map_err(setup("writing the settings"))?;
            applied.push("imageManager.updateItemTtl");
        }
        Ok(Reload {
            applied,
            restart_needed: reloadable_part(old, new) != *new,
        })
    }

    /// Stops every part and waits up to `grace` for them; returns whether all ended in time.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        let _ = self.stop.send(true);
        self.sm.close_all();
        let deadline = tokio::time::Instant::now() + grace;
        let mut done = true;
        // Brief tasks last: once the store writers have ended, dropping the SM connections is
        // what a node sees when the CM stops anyway.
        let mut tasks = std::mem::take(&mut self.tasks);
        tasks.sort_by_key(|t| t.stop == Stop::Brief);
        for Task { name, stop, handle } in tasks {
            let abort = handle.abort_handle();
            let until = match stop {
                Stop::Abort => {
                    abort.abort();
                    continue;
                }
                Stop::Brief => {
                    deadline.min(tokio::time::Instant::now() + Duration::from_millis(500))
                }
                Stop::Graceful => deadline,
            };
            if tokio::time::timeout_at(until, handle).await.is_err() {
                abort.abort();
                if stop == Stop::Graceful {
                    tracing::warn!("{name} did not stop in time; aborted");
                    done = false;
                }
            }
        }
        if let Some(d) = self.dns.take().and_then(|d| Arc::try_unwrap(d).ok()) {
            let _ = tokio::time::timeout(Duration::from_secs(1), d.shutdown()).await;
        }
        done
    }
}

/// Tells systemd the daemon is ready when it was started with `Type=notify` (NOTIFY_SOCKET
/// set); a no-op otherwise. Returns whether a notification was sent.
pub fn sd_notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let path = socket.to_string_lossy().into_owned();
    let sent = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("sd_notify {path}: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_put_into_host_port_urls() {
        assert_eq!(with_port("127.0.0.1:0", 40123), "127.0.0.1:40123");
        assert_eq!(with_port("localhost:0", 8), "localhost:8");
        assert_eq!(with_port(":0", 9), ":9");
        assert_eq!(with_port("cm", 7), "cm:7");
    }
}
