//! [`IamClient`]: the calls the CM makes on its IAM (iamanager.v6), as the upstream C++ CM makes
//! them.
//!
//! Two channels: the public services (identity, current node, certificates, nodes) and the
//! protected ones (node pause/resume, provisioning, keys and certificates). Both connect lazily
//! and reconnect by themselves on the next call after a failure; unary calls are bounded by
//! [`IamConfig::request_timeout`]. A subscription is one server stream; [`watch`] re-opens it
//! after it ends or fails, with exponential backoff and jitter, and reports each (re)opening so
//! that the receiver can read the full state again.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::api::cloud::certs::{self, IamError};
use crate::api::nodes::node_info_from_pb;
use crate::api::proto::common::v2 as pbc;
use crate::api::proto::iamanager::v6 as pb;
use crate::model::NodeInfo;

use pb::iam_certificate_service_client::IamCertificateServiceClient;
use pb::iam_nodes_service_client::IamNodesServiceClient;
use pb::iam_provisioning_service_client::IamProvisioningServiceClient;
use pb::iam_public_cert_service_client::IamPublicCertServiceClient;
use pb::iam_public_current_node_service_client::IamPublicCurrentNodeServiceClient;
use pb::iam_public_identity_service_client::IamPublicIdentityServiceClient;
use pb::iam_public_nodes_service_client::IamPublicNodesServiceClient;

/// Largest message accepted from IAM.
const MAX_MESSAGE: usize = 4 << 20;

/// TLS towards one IAM endpoint (PEM material).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA the server certificate must chain to (`caCert`).
    pub ca_cert: String,
    /// Client certificate and key for mutual TLS (the protected API), PEM.
    pub identity: Option<(String, String)>,
    /// Name the server certificate is checked against; the URL's host when `None`.
    pub domain: Option<String>,
}

impl ClientTls {
    /// Mutual TLS with a certificate as IAM reports it (`GetCert` of the CM's `certStorage`
    /// type): the certificate chain and the key are read from their `file://` URLs.
    pub fn from_cert_info(ca_cert: &str, cert: &CertInfo) -> Result<ClientTls, IamError> {
        Ok(ClientTls {
            ca_cert: ca_cert.to_string(),
            identity: Some((read_pem_url(&cert.cert_url)?, read_pem_url(&cert.key_url)?)),
            domain: None,
        })
    }
}

/// PEM material behind a certificate or key URL: a `file://` URL or a plain path. Keys that
/// live in PKCS#11 tokens or a TPM (`pkcs11:` URLs) are not supported.
pub fn read_pem_url(url: &str) -> Result<String, IamError> {
    let path = match url.split_once("://") {
        Some(("file", path)) => path,
        Some((scheme, _)) => {
            return Err(IamError::new(format!(
                "{url}: {scheme} URLs are not supported, only file://"
            )));
        }
        None if url.starts_with("pkcs11:") => {
            return Err(IamError::new(format!(
                "{url}: PKCS#11 keys are not supported, only file://"
            )));
        }
        None => url,
    };
    std::fs::read_to_string(path).map_err(|e| IamError::new(format!("{url}: {e}")))
}

/// Reconnection backoff of subscriptions (upstream: 1 to 3 s).
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(3),
        }
    }
}

impl RetryConfig {
    fn backoff(&self) -> backon::ExponentialBackoff {
        // backon without its `std` feature seeds jitter with a constant; a per-process random
        // seed keeps units from retrying in lockstep.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay.max(self.min_delay))
            .with_jitter()
            .with_jitter_seed(seed)
            .without_max_times()
            .build()
    }
}

/// Where and how to reach IAM (`iamPublicServerUrl`, `iamProtectedServerUrl`, `caCert`, ...).
#[derive(Debug, Clone)]
pub struct IamConfig {
    /// `host:port` or a URL (`http://` / `https://`); without a scheme, `https` is used when
    /// `public_tls` is set.
    pub public_url: String,
    pub public_tls: Option<ClientTls>,
    /// The protected API; `None` leaves the protected calls failing with an error.
    pub protected_url: Option<String>,
    pub protected_tls: Option<ClientTls>,
    /// Bound on every unary call (upstream: 30 s).
    pub request_timeout: Duration,
    pub retry: RetryConfig,
}

impl IamConfig {
    /// Plain connections to `public` and `protected` (the simulated IAM, tests).
    pub fn plain(public: impl Into<String>, protected: Option<String>) -> IamConfig {
        IamConfig {
            public_url: public.into(),
            public_tls: None,
            protected_url: protected,
            protected_tls: None,
            request_timeout: Duration::from_secs(30),
            retry: RetryConfig::default(),
        }
    }
}

/// `iamanager.v6.SystemInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_id: String,
    pub unit_model: String,
    pub version: String,
}

/// `iamanager.v6.CertInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertInfo {
    pub cert_type: String,
    pub cert_url: String,
    pub key_url: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Issuer, DER.
    pub issuer: Vec<u8>,
}

impl From<pb::CertInfo> for CertInfo {
    fn from(c: pb::CertInfo) -> Self {
        CertInfo {
            cert_type: c.r#type,
            cert_url: c.cert_url,
            key_url: c.key_url,
            serial: hex(&c.serial),
            issuer: c.issuer,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A gRPC failure: the call did not reach IAM or IAM refused it.
fn status_error(rpc: &str, s: &tonic::Status) -> IamError {
    IamError::new(format!("IAM {rpc}: {:?}: {}", s.code(), s.message()))
}

/// IAM's answer to a call that reports its outcome in an `ErrorInfo`: an error when either code
/// is set (as the C++ stack decodes it), with IAM's own text and codes.
fn check(error: Option<pbc::ErrorInfo>) -> Result<(), IamError> {
    match error {
        Some(e) if e.aos_code != 0 || e.exit_code != 0 => Err(IamError {
            aos_code: Some(e.aos_code),
            exit_code: e.exit_code,
            message: e.message,
        }),
        _ => Ok(()),
    }
}

fn node_from_pb(n: pb::NodeInfo) -> Result<NodeInfo, IamError> {
    node_info_from_pb(n).ok_or_else(|| IamError::new("IAM sent a NodeInfo without a node ID"))
}

fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, IamError> {
    let url = if url.contains("://") {
        url.to_string()
    } else if tls.is_some() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    let bad = |e: &dyn std::fmt::Display| IamError::new(format!("IAM endpoint {url}: {e}"));
    let mut ep = Endpoint::from_shared(url.clone())
        .map_err(|e| bad(&e))?
        // Keepalive as upstream: ping every 10 s, 3 s to answer, also without calls.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .connect_timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_cert));
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &tls.domain {
            cfg = cfg.domain_name(domain.clone());
        }
        ep = ep.tls_config(cfg).map_err(|e| bad(&e))?;
    }
    Ok(ep)
}

/// The CM's IAM client. Cheap to clone (channels are shared).
#[derive(Clone)]
pub struct IamClient {
    public: Channel,
    protected: Option<Channel>,
    timeout: Duration,
    retry: RetryConfig,
    /// The node IAM runs on, from the last `GetCurrentNodeInfo`.
    current_node: Arc<Mutex<String>>,
}

impl IamClient {
    /// A client whose channels connect on first use; no I/O here.
    pub fn new(config: &IamConfig) -> Result<IamClient, IamError> {
        let public = endpoint(&config.public_url, config.public_tls.as_ref())?.connect_lazy();
        let protected = match &config.protected_url {
            Some(url) => Some(endpoint(url, config.protected_tls.as_ref())?.connect_lazy()),
            None => None,
        };
        Ok(IamClient {
            public,
            protected,
            timeout: config.request_timeout,
            retry: config.retry,
            current_node: Arc::default(),
        })
    }

    /// A client over existing channels.
    pub fn from_channels(public: Channel, protected: Option<Channel>) -> IamClient {
        IamClient {
            public,
            protected,
            timeout: Duration::from_secs(30),
            retry: RetryConfig::default(),
            current_node: Arc::default(),
        }
    }

    /// [`IamClient::new`], then `GetCurrentNodeInfo`, so that the main node's ID is known.
    pub async fn connect(config: &IamConfig) -> Result<IamClient, IamError> {
        let client = IamClient::new(config)?;
        client.get_current_node_info().await?;
        Ok(client)
    }

    /// As the upstream CM connects: the public API first, then the protected API with mutual
    /// TLS, its client certificate the one of `cert_type` (`certStorage`) that the public API
    /// reports, checked against `ca_cert`. `config.protected_tls` is replaced; its `domain`
    /// is kept.
    pub async fn connect_with_cert(
        config: &IamConfig,
        ca_cert: &str,
        cert_type: &str,
    ) -> Result<IamClient, IamError> {
        let public = IamClient::new(&IamConfig {
            protected_url: None,
            ..config.clone()
        })?;
        let cert = public.get_cert(cert_type, &[], "").await?;
        let mut tls = ClientTls::from_cert_info(ca_cert, &cert)?;
        tls.domain = config.protected_tls.as_ref().and_then(|t| t.domain.clone());
        IamClient::connect(&IamConfig {
            protected_tls: Some(tls),
            ..config.clone()
        })
        .await
    }

    pub fn retry(&self) -> RetryConfig {
        self.retry
    }

    /// The node ID of the last `GetCurrentNodeInfo` (empty before the first).
    pub fn current_node_id(&self) -> String {
        self.current_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn unary<T>(
        &self,
        rpc: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, IamError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(status_error(rpc, &s)),
            Err(_) => Err(IamError::new(format!(
                "IAM {rpc}: no answer within {:?}",
                self.timeout
            ))),
        }
    }

    fn protected(&self, rpc: &str) -> Result<Channel, IamError> {
        self.protected
            .clone()
            .ok_or_else(|| IamError::new(format!("IAM {rpc}: the protected API is not configured")))
    }

    // ---- public: identity -------------------------------------------------------------------

    pub async fn get_system_info(&self) -> Result<SystemInfo, IamError> {
        let mut c = IamPublicIdentityServiceClient::new(self.public.clone());
        let s = self.unary("GetSystemInfo", c.get_system_info(())).await?;
        Ok(SystemInfo {
            system_id: s.system_id,
            unit_model: s.unit_model,
            version: s.version,
        })
    }

    pub async fn get_subjects(&self) -> Result<Vec<String>, IamError> {
        let mut c = IamPublicIdentityServiceClient::new(self.public.clone());
        Ok(self
            .unary("GetSubjects", c.get_subjects(()))
            .await?
            .subjects)
    }

    /// `SubscribeSubjectsChanged`: the whole subject list on every change.
    pub async fn subscribe_subjects_changed(
        &self,
    ) -> Result<BoxStream<'static, Result<Vec<String>, IamError>>, IamError> {
        let mut c = IamPublicIdentityServiceClient::new(self.public.clone());
        let s = self
            .unary("SubscribeSubjectsChanged", c.subscribe_subjects_changed(()))
            .await?;
        Ok(s.map(|r| {
            r.map(|s| s.subjects)
                .map_err(|e| status_error("SubscribeSubjectsChanged", &e))
        })
        .boxed())
    }

    // ---- public: current node ---------------------------------------------------------------

    /// `GetCurrentNodeInfo`; remembers the node ID (see [`IamClient::current_node_id`]).
    pub async fn get_current_node_info(&self) -> Result<NodeInfo, IamError> {
        let mut c = IamPublicCurrentNodeServiceClient::new(self.public.clone());
        let n = node_from_pb(
            self.unary("GetCurrentNodeInfo", c.get_current_node_info(()))
                .await?,
        )?;
        *self
            .current_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = n.node_id.clone();
        Ok(n)
    }

    pub async fn subscribe_current_node_changed(
        &self,
    ) -> Result<BoxStream<'static, Result<NodeInfo, IamError>>, IamError> {
        let mut c = IamPublicCurrentNodeServiceClient::new(self.public.clone());
        let s = self
            .unary(
                "SubscribeCurrentNodeChanged",
                c.subscribe_current_node_changed(()),
            )
            .await?;
        Ok(s.map(|r| {
            r.map_err(|e| status_error("SubscribeCurrentNodeChanged", &e))
                .and_then(node_from_pb)
        })
        .boxed())
    }

    // ---- public: nodes ----------------------------------------------------------------------

    pub async fn get_all_node_ids(&self) -> Result<Vec<String>, IamError> {
        let mut c = IamPublicNodesServiceClient::new(self.public.clone());
        Ok(self
            .unary("GetAllNodeIDs", c.get_all_node_i_ds(()))
            .await?
            .ids)
    }

    pub async fn get_node_info(&self, node_id: &str) -> Result<NodeInfo, IamError> {
        let mut c = IamPublicNodesServiceClient::new(self.public.clone());
        let req = pb::GetNodeInfoRequest {
            node_id: node_id.to_string(),
        };
        node_from_pb(self.unary("GetNodeInfo", c.get_node_info(req)).await?)
    }

    /// `SubscribeNodeChanged`: a node's whole info whenever it changes.
    pub async fn subscribe_node_changed(
        &self,
    ) -> Result<BoxStream<'static, Result<NodeInfo, IamError>>, IamError> {
        let mut c = IamPublicNodesServiceClient::new(self.public.clone());
        let s = self
            .unary("SubscribeNodeChanged", c.subscribe_node_changed(()))
            .await?;
        Ok(s.map(|r| {
            r.map_err(|e| status_error("SubscribeNodeChanged", &e))
                .and_then(node_from_pb)
        })
        .boxed())
    }

    // ---- public: certificates ---------------------------------------------------------------

    /// `GetCert`: the current certificate of `cert_type` (empty issuer and serial), or the one
    /// with that issuer (DER) and serial (hex).
    pub async fn get_cert(
        &self,
        cert_type: &str,
        issuer: &[u8],
        serial: &str,
    ) -> Result<CertInfo, IamError> {
        let mut c = IamPublicCertServiceClient::new(self.public.clone());
        let req = pb::GetCertRequest {
            r#type: cert_type.to_string(),
            issuer: issuer.to_vec(),
            serial: serial.to_string(),
        };
        Ok(self.unary("GetCert", c.get_cert(req)).await?.into())
    }

    /// `SubscribeCertChanged`: the new certificate of `cert_type` whenever it changes.
    pub async fn subscribe_cert_changed(
        &self,
        cert_type: &str,
    ) -> Result<BoxStream<'static, Result<CertInfo, IamError>>, IamError> {
        let mut c = IamPublicCertServiceClient::new(self.public.clone());
        let req = pb::SubscribeCertChangedRequest {
            r#type: cert_type.to_string(),
        };
        let s = self
            .unary("SubscribeCertChanged", c.subscribe_cert_changed(req))
            .await?;
        Ok(s.map(|r| {
            r.map(CertInfo::from)
                .map_err(|e| status_error("SubscribeCertChanged", &e))
        })
        .boxed())
    }

    // ---- protected: certificates ------------------------------------------------------------

    /// `CreateKey`: a new key for `cert_type` on `node_id`; returns the CSR (PEM).
    pub async fn create_key(
        &self,
        node_id: &str,
        cert_type: &str,
        subject: &str,
        password: &str,
    ) -> Result<String, IamError> {
        let mut c = IamCertificateServiceClient::new(self.protected("CreateKey")?)
            .max_decoding_message_size(MAX_MESSAGE);
        let req = pb::CreateKeyRequest {
            node_id: node_id.to_string(),
            subject: subject.to_string(),
            r#type: cert_type.to_string(),
            password: password.to_string(),
        };
        let r = self.unary("CreateKey", c.create_key(req)).await?;
        check(r.error)?;
        Ok(r.csr)
    }

    /// `ApplyCert`: installs the PEM chain for `cert_type` on `node_id`.
    pub async fn apply_cert(
        &self,
        node_id: &str,
        cert_type: &str,
        pem_chain: &str,
    ) -> Result<CertInfo, IamError> {
        let mut c = IamCertificateServiceClient::new(self.protected("ApplyCert")?)
            .max_decoding_message_size(MAX_MESSAGE);
        let req = pb::ApplyCertRequest {
            node_id: node_id.to_string(),
            r#type: cert_type.to_string(),
            cert: pem_chain.to_string(),
        };
        let r = self.unary("ApplyCert", c.apply_cert(req)).await?;
        check(r.error)?;
        Ok(r.cert_info.unwrap_or_default().into())
    }

    // ---- protected: provisioning ------------------------------------------------------------

    pub async fn get_cert_types(&self, node_id: &str) -> Result<Vec<String>, IamError> {
        let mut c = IamProvisioningServiceClient::new(self.protected("GetCertTypes")?);
        let req = pb::GetCertTypesRequest {
            node_id: node_id.to_string(),
        };
        Ok(self
            .unary("GetCertTypes", c.get_cert_types(req))
            .await?
            .types)
    }

    pub async fn start_provisioning(&self, node_id: &str, password: &str) -> Result<(), IamError> {
        let mut c = IamProvisioningServiceClient::new(self.protected("StartProvisioning")?);
        let req = pb::StartProvisioningRequest {
            node_id: node_id.to_string(),
            password: password.to_string(),
        };
        check(
            self.unary("StartProvisioning", c.start_provisioning(req))
                .await?
                .error,
        )
    }

    pub async fn finish_provisioning(&self, node_id: &str, password: &str) -> Result<(), IamError> {
        let mut c = IamProvisioningServiceClient::new(self.protected("FinishProvisioning")?);
        let req = pb::FinishProvisioningRequest {
            node_id: node_id.to_string(),
            password: password.to_string(),
        };
        check(
            self.unary("FinishProvisioning", c.finish_provisioning(req))
                .await?
                .error,
        )
    }

    pub async fn deprovision(&self, node_id: &str, password: &str) -> Result<(), IamError> {
        let mut c = IamProvisioningServiceClient::new(self.protected("Deprovision")?);
        let req = pb::DeprovisionRequest {
            node_id: node_id.to_string(),
            password: password.to_string(),
        };
        check(self.unary("Deprovision", c.deprovision(req)).await?.error)
    }

    // ---- protected: nodes -------------------------------------------------------------------

    pub async fn pause_node(&self, node_id: &str) -> Result<(), IamError> {
        let mut c = IamNodesServiceClient::new(self.protected("PauseNode")?);
        let req = pb::PauseNodeRequest {
            node_id: node_id.to_string(),
        };
        check(self.unary("PauseNode", c.pause_node(req)).await?.error)
    }

    pub async fn resume_node(&self, node_id: &str) -> Result<(), IamError> {
        let mut c = IamNodesServiceClient::new(self.protected("ResumeNode")?);
        let req = pb::ResumeNodeRequest {
            node_id: node_id.to_string(),
        };
        check(self.unary("ResumeNode", c.resume_node(req)).await?.error)
    }

    // ---- kept-open subscriptions ------------------------------------------------------------

    /// [`watch`] over `SubscribeNodeChanged`.
    pub fn watch_nodes(&self) -> mpsc::Receiver<WatchEvent<NodeInfo>> {
        let c = self.clone();
        watch(self.retry, move || {
            let c = c.clone();
            async move { c.subscribe_node_changed().await }
        })
    }

    /// [`watch`] over `SubscribeSubjectsChanged`.
    pub fn watch_subjects(&self) -> mpsc::Receiver<WatchEvent<Vec<String>>> {
        let c = self.clone();
        watch(self.retry, move || {
            let c = c.clone();
            async move { c.subscribe_subjects_changed().await }
        })
    }

    /// [`watch`] over `SubscribeCurrentNodeChanged`.
    pub fn watch_current_node(&self) -> mpsc::Receiver<WatchEvent<NodeInfo>> {
        let c = self.clone();
        watch(self.retry, move || {
            let c = c.clone();
            async move { c.subscribe_current_node_changed().await }
        })
    }

    /// [`watch`] over `SubscribeCertChanged(cert_type)`.
    pub fn watch_cert(&self, cert_type: &str) -> mpsc::Receiver<WatchEvent<CertInfo>> {
        let c = self.clone();
        let cert_type = cert_type.to_string();
        watch(self.retry, move || {
            let c = c.clone();
            let t = cert_type.clone();
            async move { c.subscribe_cert_changed(&t).await }
        })
    }
}

/// What a kept-open subscription delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<T> {
    /// The subscription is (re)opened: changes from before may have been missed, so the
    /// receiver reads the full state again.
    Opened,
    Changed(T),
}

/// Keeps a subscription open: `open` starts it, every item goes to the returned receiver, and
/// after the stream ends or fails (or cannot be opened) it is opened again after a backoff that
/// is reset by every successful opening. Runs until the receiver is dropped.
pub fn watch<T, F, Fut>(retry: RetryConfig, mut open: F) -> mpsc::Receiver<WatchEvent<T>>
where
    T: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<BoxStream<'static, Result<T, IamError>>, IamError>> + Send,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut delays = retry.backoff();
        loop {
            let opened = tokio::select! {
                r = open() => r,
                () = tx.closed() => return,
            };
            match opened {
                Ok(mut stream) => {
                    delays = retry.backoff();
                    if tx.send(WatchEvent::Opened).await.is_err() {
                        return;
                    }
                    loop {
                        let item = tokio::select! {
                            i = stream.next() => i,
                            () = tx.closed() => return,
                        };
                        match item {
                            Some(Ok(v)) => {
                                if tx.send(WatchEvent::Changed(v)).await.is_err() {
                                    return;
                                }
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "IAM subscription failed");
                                break;
                            }
                            None => {
                                tracing::info!("IAM subscription ended");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not subscribe to IAM"),
            }
            let delay = delays.next().unwrap_or(retry.max_delay);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = tx.closed() => return,
            }
        }
    });
    rx
}

impl certs::Iam for IamClient {
    fn main_node_id(&self) -> String {
        self.current_node_id()
    }

    async fn create_key(
        &self,
        node_id: &str,
        cert_type: &str,
        subject: &str,
        password: &str,
    ) -> Result<String, IamError> {
        IamClient::create_key(self, node_id, cert_type, subject, password).await
    }

    async fn apply_cert(
        &self,
        node_id: &str,
        cert_type: &str,
        pem_chain: &str,
    ) -> Result<certs::AppliedCert, IamError> {
        let info = IamClient::apply_cert(self, node_id, cert_type, pem_chain).await?;
        Ok(certs::AppliedCert {
            cert_url: info.cert_url,
            serial: info.serial,
        })
    }

    async fn cert_types(&self, node_id: &str) -> Result<Vec<String>, IamError> {
        self.get_cert_types(node_id).await
    }

    async fn start_provisioning(&self, node_id: &str, password: &str) -> Result<(), IamError> {
        IamClient::start_provisioning(self, node_id, password).await
    }

    async fn finish_provisioning(&self, node_id: &str, password: &str) -> Result<(), IamError> {
        IamClient::finish_provisioning(self, node_id, password).await
    }

    async fn deprovision(&self, node_id: &str, password: &str) -> Result<(), IamError> {
        IamClient::deprovision(self, node_id, password).await
    }
}
