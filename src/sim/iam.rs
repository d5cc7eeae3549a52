//! A simulated IAM: a real gRPC server (iamanager.v6) on 127.0.0.1 that serves the public and
//! the protected services on one port, optionally over TLS. It holds system info, nodes,
//! subjects and certificates, logs every call, pushes changes to its subscribers, and can be
//! told to fail a call or be stopped and started again on the same port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::api::nodes;
use crate::api::proto::common::v2 as pbc;
use crate::api::proto::iamanager::v6 as pb;
use crate::model::{NodeInfo, NodeState};

use pb::iam_certificate_service_server::{IamCertificateService, IamCertificateServiceServer};
use pb::iam_nodes_service_server::{IamNodesService, IamNodesServiceServer};
use pb::iam_provisioning_service_server::{IamProvisioningService, IamProvisioningServiceServer};
use pb::iam_public_cert_service_server::{IamPublicCertService, IamPublicCertServiceServer};
use pb::iam_public_current_node_service_server::{
    IamPublicCurrentNodeService, IamPublicCurrentNodeServiceServer,
};
use pb::iam_public_identity_service_server::{
    IamPublicIdentityService, IamPublicIdentityServiceServer,
};
use pb::iam_public_nodes_service_server::{IamPublicNodesService, IamPublicNodesServiceServer};

/// The example unit's nodes (`nodes.json` of the bundled scenario).
const EXAMPLE_NODES: &str = include_str!("../../examples/desired-states/fresh-install/nodes.json");

/// Aos error code "not found" (§1.2).
const AOS_NOT_FOUND: i32 = 5;

/// A certificate the simulated IAM holds for one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimCert {
    pub cert_url: String,
    pub key_url: String,
    pub serial: Vec<u8>,
}

/// TLS of the simulated IAM: its certificate and key, and the CA client certificates must
/// chain to. With a client CA, a client certificate is optional for the public services and
/// required for the protected ones (as a real IAM's two ports would have it).
#[derive(Debug, Clone)]
pub struct SimIamTls {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
}

/// What the simulated IAM starts with.
#[derive(Debug, Clone, Default)]
pub struct SimIamConfig {
    pub system_id: String,
    pub unit_model: String,
    pub version: String,
    /// The node this IAM runs on.
    pub current_node: String,
    pub nodes: Vec<NodeInfo>,
    pub subjects: Vec<String>,
    /// Certificates of the current node, by type.
    pub certs: BTreeMap<String, SimCert>,
    /// `GetCertTypes` answers, by node.
    pub cert_types: BTreeMap<String, Vec<String>>,
    pub tls: Option<SimIamTls>,
}

fn sim_cert(node: &str, cert_type: &str, serial: Vec<u8>) -> SimCert {
    SimCert {
        cert_url: format!("file:///var/aos/crypt/{node}/{cert_type}.pem"),
        key_url: format!("file:///var/aos/crypt/{node}/{cert_type}.key"),
        serial,
    }
}

impl SimIamConfig {
    /// The bundled example unit: its three nodes (main node `main`), system ID, one unit
    /// subject, and certificates of the types the upstream main node has.
    pub fn example() -> SimIamConfig {
        let mut probs = crate::api::json::Problems::default();
        let value = crate::api::json::parse(EXAMPLE_NODES).expect("example nodes.json parses");
        let root = crate::api::json::obj(&value, "$", &mut probs).expect("example nodes.json");
        let system_id = root.string("systemId", &mut probs).unwrap_or_default();
        let mut nodes = Vec::new();
        for (p, entry) in root.array("nodes", &mut probs) {
            let Some(e) = crate::api::json::obj(entry, &p, &mut probs) else {
                continue;
            };
            if let Some((ip, iv)) = e.object("nodeInfo", &mut probs)
                && let Some(info) = nodes::node_info(iv, &ip, &mut probs)
            {
                nodes.push(info);
            }
        }
        assert!(probs.is_empty(), "example nodes.json: {probs}");
        let main_types = ["online", "offline", "iam", "cm", "sm"];
        let mut cert_types = BTreeMap::new();
        for n in &nodes {
            let types: &[&str] = if n.node_id == "main" {
                &main_types
            } else {
                &["iam", "sm"]
            };
            cert_types.insert(
                n.node_id.clone(),
                types.iter().map(|t| t.to_string()).collect(),
            );
        }
        let certs = main_types
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), sim_cert("main", t, vec![0x10, i as u8])))
            .collect();
        SimIamConfig {
            system_id,
            unit_model: "aos-example-unit".into(),
            version: "1.0.0".into(),
            current_node: "main".into(),
            nodes,
            subjects: vec!["d3f7a1c9-8b26-4e5d-9f40-1a6e2c8b5d73".into()],
            certs,
            cert_types,
            tls: None,
        }
    }

    /// A unit of these nodes (the main node is the one with the `MainNode` attribute, else the
    /// first), with the example's certificate types and no subjects.
    pub fn for_nodes(system_id: &str, nodes: Vec<NodeInfo>) -> SimIamConfig {
        let example = SimIamConfig::example();
        let main = nodes
            .iter()
            .find(|n| n.attrs.contains_key("MainNode"))
            .or(nodes.first())
            .map(|n| n.node_id.clone())
            .unwrap_or_default();
        let cert_types = nodes
            .iter()
            .map(|n| {
                let types = if n.node_id == main {
                    example.cert_types.get("main").cloned().unwrap_or_default()
                } else {
                    vec!["iam".to_owned(), "sm".to_owned()]
                };
                (n.node_id.clone(), types)
            })
            .collect();
        SimIamConfig {
            system_id: system_id.to_owned(),
            current_node: main,
            nodes,
            subjects: Vec::new(),
            cert_types,
            ..example
        }
    }
}

type Sub<T> = mpsc::Sender<Result<T, Status>>;

struct State {
    config: SimIamConfig,
    nodes: BTreeMap<String, pb::NodeInfo>,
    /// Injected failures by RPC name: (aos code, message).
    failures: BTreeMap<String, (i32, String)>,
    calls: Vec<String>,
    next_serial: u8,
    stopped: bool,
    node_subs: Vec<Sub<pb::NodeInfo>>,
    current_subs: Vec<Sub<pb::NodeInfo>>,
    subject_subs: Vec<Sub<pb::Subjects>>,
    cert_subs: Vec<(String, Sub<pb::CertInfo>)>,
}

struct Shared {
    state: Mutex<State>,
    /// The protected services refuse calls without a verified client certificate.
    require_client_cert: bool,
    /// Woken on every call.
    notify: Notify,
}

impl Shared {
    /// Refuses a protected call made without a client certificate (when one is required).
    fn protected<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.require_client_cert && request.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "the protected IAM API needs a client certificate",
            ));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs a call; refused while stopped (a real IAM that is gone does not answer).
    fn call(&self, entry: String) -> Result<std::sync::MutexGuard<'_, State>, Status> {
        let mut st = self.lock();
        if st.stopped {
            return Err(Status::unavailable("simulated IAM is stopped"));
        }
        st.calls.push(entry);
        self.notify.notify_waiters();
        Ok(st)
    }
}

/// Pushes to the subscribers that are still there.
fn push<T: Clone>(subs: &mut Vec<Sub<T>>, item: &T) {
    subs.retain(|s| s.try_send(Ok(item.clone())).is_ok());
}

fn cert_info(cert_type: &str, c: &SimCert) -> pb::CertInfo {
    pb::CertInfo {
        r#type: cert_type.to_string(),
        cert_url: c.cert_url.clone(),
        key_url: c.key_url.clone(),
        serial: c.serial.clone(),
        issuer: b"CN=Sim IAM CA".to_vec(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl State {
    fn failure(&self, rpc: &str) -> Option<pbc::ErrorInfo> {
        self.failures
            .get(rpc)
            .map(|(code, message)| pbc::ErrorInfo {
                aos_code: *code,
                exit_code: 0,
                message: message.clone(),
            })
    }

    /// An injected failure as a gRPC status (for calls without an `ErrorInfo`).
    fn status_failure(&self, rpc: &str) -> Result<(), Status> {
        match self.failures.get(rpc) {
            Some((_, message)) => Err(Status::internal(message.clone())),
            None => Ok(()),
        }
    }

    fn set_node(&mut self, node: pb::NodeInfo) {
        push(&mut self.node_subs, &node);
        if node.node_id == self.config.current_node {
            push(&mut self.current_subs, &node);
        }
        self.nodes.insert(node.node_id.clone(), node);
    }

    fn set_node_state(&mut self, node_id: &str, state: NodeState) -> Option<pbc::ErrorInfo> {
        let Some(mut node) = self.nodes.get(node_id).cloned() else {
            return Some(not_found(node_id));
        };
        node.state = state.as_str().to_string();
        self.set_node(node);
        None
    }

    fn set_cert(&mut self, cert_type: &str, cert: SimCert) {
        let info = cert_info(cert_type, &cert);
        self.cert_subs
            .retain(|(t, s)| t != cert_type || s.try_send(Ok(info.clone())).is_ok());
        self.config.certs.insert(cert_type.to_string(), cert);
    }
}

fn not_found(node_id: &str) -> pbc::ErrorInfo {
    pbc::ErrorInfo {
        aos_code: AOS_NOT_FOUND,
        exit_code: 0,
        message: format!("node {node_id:?} not found"),
    }
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

fn stream<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> Stream<T> {
    Box::pin(ReceiverStream::new(rx))
}

/// The gRPC services; one clone per service.
#[derive(Clone)]
struct Svc(Arc<Shared>);

#[tonic::async_trait]
impl IamPublicIdentityService for Svc {
    type SubscribeSubjectsChangedStream = Stream<pb::Subjects>;

    async fn get_system_info(&self, _: Request<()>) -> Result<Response<pb::SystemInfo>, Status> {
        let st = self.0.call("GetSystemInfo".into())?;
        st.status_failure("GetSystemInfo")?;
        Ok(Response::new(pb::SystemInfo {
            system_id: st.config.system_id.clone(),
            unit_model: st.config.unit_model.clone(),
            version: st.config.version.clone(),
        }))
    }

    async fn get_subjects(&self, _: Request<()>) -> Result<Response<pb::Subjects>, Status> {
        let st = self.0.call("GetSubjects".into())?;
        st.status_failure("GetSubjects")?;
        Ok(Response::new(pb::Subjects {
            subjects: st.config.subjects.clone(),
        }))
    }

    async fn subscribe_subjects_changed(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::SubscribeSubjectsChangedStream>, Status> {
        let mut st = self.0.call("SubscribeSubjectsChanged".into())?;
        st.status_failure("SubscribeSubjectsChanged")?;
        let (tx, rx) = mpsc::channel(64);
        st.subject_subs.push(tx);
        Ok(Response::new(stream(rx)))
    }
}

#[tonic::async_trait]
impl IamPublicCurrentNodeService for Svc {
    type SubscribeCurrentNodeChangedStream = Stream<pb::NodeInfo>;

    async fn get_current_node_info(
        &self,
        _: Request<()>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let st = self.0.call("GetCurrentNodeInfo".into())?;
        st.status_failure("GetCurrentNodeInfo")?;
        st.nodes
            .get(&st.config.current_node)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("the current node is not known"))
    }

    async fn subscribe_current_node_changed(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::SubscribeCurrentNodeChangedStream>, Status> {
        let mut st = self.0.call("SubscribeCurrentNodeChanged".into())?;
        st.status_failure("SubscribeCurrentNodeChanged")?;
        let (tx, rx) = mpsc::channel(64);
        st.current_subs.push(tx);
        Ok(Response::new(stream(rx)))
    }
}

#[tonic::async_trait]
impl IamPublicCertService for Svc {
    type SubscribeCertChangedStream = Stream<pb::CertInfo>;

    async fn get_cert(
        &self,
        request: Request<pb::GetCertRequest>,
    ) -> Result<Response<pb::CertInfo>, Status> {
        let r = request.into_inner();
        let st = self.0.call(format!("GetCert {} {}", r.r#type, r.serial))?;
        st.status_failure("GetCert")?;
        match st.config.certs.get(&r.r#type) {
            Some(c) if r.serial.is_empty() || r.serial.eq_ignore_ascii_case(&hex(&c.serial)) => {
                Ok(Response::new(cert_info(&r.r#type, c)))
            }
            _ => Err(Status::not_found(format!(
                "no {:?} certificate with serial {:?}",
                r.r#type, r.serial
            ))),
        }
    }

    async fn subscribe_cert_changed(
        &self,
        request: Request<pb::SubscribeCertChangedRequest>,
    ) -> Result<Response<Self::SubscribeCertChangedStream>, Status> {
        let r = request.into_inner();
        let mut st = self.0.call(format!("SubscribeCertChanged {}", r.r#type))?;
        st.status_failure("SubscribeCertChanged")?;
        let (tx, rx) = mpsc::channel(64);
        st.cert_subs.push((r.r#type, tx));
        Ok(Response::new(stream(rx)))
    }
}

#[tonic::async_trait]
impl IamPublicNodesService for Svc {
    type SubscribeNodeChangedStream = Stream<pb::NodeInfo>;
    type RegisterNodeStream = Stream<pb::IamIncomingMessages>;

    async fn get_all_node_i_ds(&self, _: Request<()>) -> Result<Response<pb::NodesId>, Status> {
        let st = self.0.call("GetAllNodeIDs".into())?;
        st.status_failure("GetAllNodeIDs")?;
        Ok(Response::new(pb::NodesId {
            ids: st.nodes.keys().cloned().collect(),
        }))
    }

    async fn get_node_info(
        &self,
        request: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let id = request.into_inner().node_id;
        let st = self.0.call(format!("GetNodeInfo {id}"))?;
        st.status_failure("GetNodeInfo")?;
        st.nodes
            .get(&id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("node {id:?} not found")))
    }

    async fn subscribe_node_changed(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::SubscribeNodeChangedStream>, Status> {
        let mut st = self.0.call("SubscribeNodeChanged".into())?;
        st.status_failure("SubscribeNodeChanged")?;
        let (tx, rx) = mpsc::channel(64);
        st.node_subs.push(tx);
        Ok(Response::new(stream(rx)))
    }

    async fn register_node(
        &self,
        _: Request<tonic::Streaming<pb::IamOutgoingMessages>>,
    ) -> Result<Response<Self::RegisterNodeStream>, Status> {
        Err(Status::unimplemented(
            "the simulated IAM has no secondary IAMs",
        ))
    }
}

#[tonic::async_trait]
impl IamNodesService for Svc {
    async fn pause_node(
        &self,
        request: Request<pb::PauseNodeRequest>,
    ) -> Result<Response<pb::PauseNodeResponse>, Status> {
        self.0.protected(&request)?;
        let id = request.into_inner().node_id;
        let mut st = self.0.call(format!("PauseNode {id}"))?;
        let error = match st.failure("PauseNode") {
            Some(e) => Some(e),
            None => st.set_node_state(&id, NodeState::Paused),
        };
        Ok(Response::new(pb::PauseNodeResponse { error }))
    }

    async fn resume_node(
        &self,
        request: Request<pb::ResumeNodeRequest>,
    ) -> Result<Response<pb::ResumeNodeResponse>, Status> {
        self.0.protected(&request)?;
        let id = request.into_inner().node_id;
        let mut st = self.0.call(format!("ResumeNode {id}"))?;
        let error = match st.failure("ResumeNode") {
            Some(e) => Some(e),
            None => st.set_node_state(&id, NodeState::Provisioned),
        };
        Ok(Response::new(pb::ResumeNodeResponse { error }))
    }
}

#[tonic::async_trait]
impl IamProvisioningService for Svc {
    async fn get_cert_types(
        &self,
        request: Request<pb::GetCertTypesRequest>,
    ) -> Result<Response<pb::CertTypes>, Status> {
        self.0.protected(&request)?;
        let id = request.into_inner().node_id;
        let st = self.0.call(format!("GetCertTypes {id}"))?;
        st.status_failure("GetCertTypes")?;
        st.config
            .cert_types
            .get(&id)
            .map(|types| {
                Response::new(pb::CertTypes {
                    types: types.clone(),
                })
            })
            .ok_or_else(|| Status::not_found(format!("node {id:?} not found")))
    }

    async fn start_provisioning(
        &self,
        request: Request<pb::StartProvisioningRequest>,
    ) -> Result<Response<pb::StartProvisioningResponse>, Status> {
        self.0.protected(&request)?;
        let r = request.into_inner();
        let st = self
            .0
            .call(format!("StartProvisioning {} {}", r.node_id, r.password))?;
        let error = match st.failure("StartProvisioning") {
            Some(e) => Some(e),
            None => (!st.nodes.contains_key(&r.node_id)).then(|| not_found(&r.node_id)),
        };
        Ok(Response::new(pb::StartProvisioningResponse { error }))
    }

    async fn finish_provisioning(
        &self,
        request: Request<pb::FinishProvisioningRequest>,
    ) -> Result<Response<pb::FinishProvisioningResponse>, Status> {
        self.0.protected(&request)?;
        let r = request.into_inner();
        let mut st = self
            .0
            .call(format!("FinishProvisioning {} {}", r.node_id, r.password))?;
        let error = match st.failure("FinishProvisioning") {
            Some(e) => Some(e),
            None => st.set_node_state(&r.node_id, NodeState::Provisioned),
        };
        Ok(Response::new(pb::FinishProvisioningResponse { error }))
    }

    async fn deprovision(
        &self,
        request: Request<pb::DeprovisionRequest>,
    ) -> Result<Response<pb::DeprovisionResponse>, Status> {
        self.0.protected(&request)?;
        let r = request.into_inner();
        let mut st = self
            .0
            .call(format!("Deprovision {} {}", r.node_id, r.password))?;
        let error = match st.failure("Deprovision") {
            Some(e) => Some(e),
            None => st.set_node_state(&r.node_id, NodeState::Unprovisioned),
        };
        Ok(Response::new(pb::DeprovisionResponse { error }))
    }
}

#[tonic::async_trait]
impl IamCertificateService for Svc {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.0.protected(&request)?;
        let r = request.into_inner();
        let st = self.0.call(format!(
            "CreateKey {} {} {:?} {}",
            r.node_id, r.r#type, r.subject, r.password
        ))?;
        let error = match st.failure("CreateKey") {
            Some(e) => Some(e),
            None => (!st.nodes.contains_key(&r.node_id)).then(|| not_found(&r.node_id)),
        };
        let csr = if error.is_none() {
            sim_csr(&r.node_id, &r.r#type)
        } else {
            String::new()
        };
        Ok(Response::new(pb::CreateKeyResponse {
            node_id: r.node_id,
            r#type: r.r#type,
            csr,
            error,
        }))
    }

    async fn apply_cert(
        &self,
        request: Request<pb::ApplyCertRequest>,
    ) -> Result<Response<pb::ApplyCertResponse>, Status> {
        self.0.protected(&request)?;
        let r = request.into_inner();
        let mut st = self
            .0
            .call(format!("ApplyCert {} {}", r.node_id, r.r#type))?;
        if let Some(e) = st.failure("ApplyCert") {
            return Ok(Response::new(pb::ApplyCertResponse {
                node_id: r.node_id,
                cert_info: None,
                error: Some(e),
            }));
        }
        if !st.nodes.contains_key(&r.node_id) {
            return Ok(Response::new(pb::ApplyCertResponse {
                error: Some(not_found(&r.node_id)),
                node_id: r.node_id,
                cert_info: None,
            }));
        }
        st.next_serial = st.next_serial.wrapping_add(1);
        let cert = sim_cert(&r.node_id, &r.r#type, vec![0xa0, st.next_serial]);
        let info = cert_info(&r.r#type, &cert);
        if r.node_id == st.config.current_node {
            st.set_cert(&r.r#type, cert);
        }
        Ok(Response::new(pb::ApplyCertResponse {
            node_id: r.node_id,
            cert_info: Some(info),
            error: None,
        }))
    }
}

/// The CSR the simulated IAM answers `CreateKey` with: PEM-framed, naming node and type.
pub fn sim_csr(node_id: &str, cert_type: &str) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(format!("{node_id}/{cert_type}"));
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// The simulated IAM. Dropping it stops the server.
pub struct SimIam {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<SimIamTls>,
    running: Option<Running>,
}

impl SimIam {
    /// Starts on a free loopback port.
    pub async fn start(config: SimIamConfig) -> std::io::Result<SimIam> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let nodes = config
            .nodes
            .iter()
            .map(|n| (n.node_id.clone(), nodes::node_info_to_pb(n)))
            .collect();
        let tls = config.tls.clone();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                config,
                nodes,
                failures: BTreeMap::new(),
                calls: Vec::new(),
                next_serial: 0,
                stopped: false,
                node_subs: Vec::new(),
                current_subs: Vec::new(),
                subject_subs: Vec::new(),
                cert_subs: Vec::new(),
            }),
            notify: Notify::new(),
            require_client_cert: tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        });
        let mut sim = SimIam {
            addr,
            shared,
            tls,
            running: None,
        };
        sim.serve(listener)?;
        Ok(sim)
    }

    fn serve(&mut self, listener: TcpListener) -> std::io::Result<()> {
        let svc = Svc(self.shared.clone());
        let mut builder = Server::builder();
        if let Some(tls) = &self.tls {
            let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
            if let Some(ca) = &tls.client_ca {
                cfg = cfg
                    .client_ca_root(Certificate::from_pem(ca))
                    .client_auth_optional(true);
            }
            builder = builder
                .tls_config(cfg)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let router = builder
            .add_service(IamPublicIdentityServiceServer::new(svc.clone()))
            .add_service(IamPublicCurrentNodeServiceServer::new(svc.clone()))
            .add_service(IamPublicCertServiceServer::new(svc.clone()))
            .add_service(IamPublicNodesServiceServer::new(svc.clone()))
            .add_service(IamNodesServiceServer::new(svc.clone()))
            .add_service(IamProvisioningServiceServer::new(svc.clone()))
            .add_service(IamCertificateServiceServer::new(svc));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(router.serve_with_incoming_shutdown(
            crate::api::grpc_incoming(listener),
            async move {
                let _ = stopped.await;
            },
        ));
        self.running = Some(Running { stop, task });
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port` (or `https://localhost:port` with TLS).
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("http://{}", self.addr),
            Some(_) => format!("https://localhost:{}", self.addr.port()),
        }
    }

    /// Stops serving: every subscription ends, further calls are refused, the port is closed.
    pub async fn stop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.stopped = true;
            st.node_subs.clear();
            st.current_subs.clear();
            st.subject_subs.clear();
            st.cert_subs.clear();
        }
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            let _ = r.task.await;
        }
    }

    /// Serves again on the same port, with the state it had.
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr).await?;
        self.shared.lock().stopped = false;
        self.serve(listener)
    }

    /// [`SimIam::stop`] then [`SimIam::start_again`]: subscribers see their streams end and
    /// must subscribe again.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop().await;
        self.start_again().await
    }

    /// Adds or replaces a node; its subscribers are told.
    pub fn set_node(&self, info: &NodeInfo) {
        self.shared.lock().set_node(nodes::node_info_to_pb(info));
    }

    /// Changes a node's state; its subscribers are told. False for an unknown node.
    pub fn set_node_state(&self, node_id: &str, state: NodeState) -> bool {
        self.shared.lock().set_node_state(node_id, state).is_none()
    }

    /// The node as the simulated IAM holds it.
    pub fn node(&self, node_id: &str) -> Option<NodeInfo> {
        let n = self.shared.lock().nodes.get(node_id).cloned()?;
        nodes::node_info_from_pb(n)
    }

    /// Replaces the unit subjects; subscribers are told.
    pub fn set_subjects(&self, subjects: &[&str]) {
        let mut st = self.shared.lock();
        st.config.subjects = subjects.iter().map(|s| s.to_string()).collect();
        let msg = pb::Subjects {
            subjects: st.config.subjects.clone(),
        };
        push(&mut st.subject_subs, &msg);
    }

    /// Replaces the current node's certificate of a type (a rotation); subscribers to that type
    /// are told.
    pub fn set_cert(&self, cert_type: &str, cert_url: &str, serial: &[u8]) {
        let mut st = self.shared.lock();
        let node = st.config.current_node.clone();
        let mut cert = sim_cert(&node, cert_type, serial.to_vec());
        cert.cert_url = cert_url.to_string();
        st.set_cert(cert_type, cert);
    }

    /// Like [`SimIam::set_cert`], with the certificate and key at these URLs.
    pub fn set_cert_files(&self, cert_type: &str, cert_url: &str, key_url: &str, serial: &[u8]) {
        self.shared.lock().set_cert(
            cert_type,
            SimCert {
                cert_url: cert_url.to_string(),
                key_url: key_url.to_string(),
                serial: serial.to_vec(),
            },
        );
    }

    /// Makes `rpc` (e.g. "CreateKey") fail: calls with an `ErrorInfo` answer with this code and
    /// message, the others with a gRPC `INTERNAL` status carrying the message.
    pub fn fail(&self, rpc: &str, aos_code: i32, message: &str) {
        self.shared
            .lock()
            .failures
            .insert(rpc.to_string(), (aos_code, message.to_string()));
    }

    /// Stops failing `rpc`.
    pub fn heal(&self, rpc: &str) {
        self.shared.lock().failures.remove(rpc);
    }

    /// Every call received, in order: the RPC name and its main arguments, space-separated
    /// (e.g. `"CreateKey main online \"\" secret"`).
    pub fn calls(&self) -> Vec<String> {
        self.shared.lock().calls.clone()
    }

    /// Calls whose entry starts with `prefix`.
    pub fn calls_to(&self, prefix: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }

    /// Waits until `n` calls starting with `prefix` have been received.
    pub async fn wait_calls(&self, prefix: &str, n: usize) {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.calls_to(prefix).len() >= n {
                return;
            }
            notified.await;
        }
    }

    /// How many subscribers are open, by kind (`nodes`, `current`, `subjects`, `certs`).
    pub fn subscribers(&self) -> [usize; 4] {
        let st = self.shared.lock();
        [
            st.node_subs.iter().filter(|s| !s.is_closed()).count(),
            st.current_subs.iter().filter(|s| !s.is_closed()).count(),
            st.subject_subs.iter().filter(|s| !s.is_closed()).count(),
            st.cert_subs.iter().filter(|(_, s)| !s.is_closed()).count(),
        ]
    }
}

impl Drop for SimIam {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            r.task.abort();
        }
    }
}
