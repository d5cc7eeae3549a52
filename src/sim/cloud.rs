//! A simulated AosCloud on loopback: a real HTTP(S) service-discovery endpoint and a real
//! WS(S) server speaking protocol v7. It records every frame, ACKs (or NACKs, or ignores) on
//! command, serves `desiredStatus` and other requests, answers `requestBlobUrls` from a local blob
//! folder (`<dir>/sha256/<hex>`), drops connections and stops/restarts on command.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha3::Digest as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

use crate::api::cloud::messages::{self, BlobInfo, BlobUrls, Envelope, Header, Message};
use crate::api::cloud::transport::{Io, ws_config};

/// Server-side TLS material (PEM): the cloud's certificate chain and key, and the CA that
/// client certificates must chain to (mTLS when set).
#[derive(Clone)]
pub struct ServerTls {
    pub cert_chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// How the simulated cloud answers unit→cloud messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// ACK every message (the default).
    Ack,
    /// Never answer.
    Ignore,
    /// NACK with this `retryAfter` (ms).
    Nack(u64),
}

/// Options of the simulated cloud.
#[derive(Clone)]
pub struct CloudOptions {
    /// The unit's system ID, put in the header of everything the cloud sends.
    pub system_id: String,
    /// Bearer token the WebSocket upgrade must carry ("" = not checked).
    pub auth_token: String,
    /// URLs listed in `connectionInfo` before the real one (unreachable ones, for tests).
    pub extra_urls_before: Vec<String>,
    /// `nextRequestDelay` in the discovery answer (ms; 0 = absent).
    pub next_request_delay_ms: u64,
    /// TLS for both servers (https/wss); plain http/ws when `None`.
    pub tls: Option<ServerTls>,
    /// Blob folder for `requestBlobUrls` (`<dir>/sha256/<hex>`), answered with `file://` URLs.
    pub blob_dir: Option<PathBuf>,
    /// Largest message the WebSocket server reads.
    pub max_message_size: usize,
    /// The first this many WebSocket upgrades are answered with HTTP 401.
    pub reject_first_upgrades: u64,
}

impl CloudOptions {
    pub fn new(system_id: &str) -> Self {
        Self {
            system_id: system_id.to_owned(),
            auth_token: "sim-token".to_owned(),
            extra_urls_before: Vec::new(),
            next_request_delay_ms: 0,
            tls: None,
            blob_dir: None,
            max_message_size: 64 * 1024 * 1024,
            reject_first_upgrades: 0,
        }
    }
}

/// One recorded WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// True for frames the unit sent, false for frames the cloud sent.
    pub from_unit: bool,
    /// True for BINARY, false for TEXT.
    pub binary: bool,
    pub text: String,
    /// Number of the WebSocket session the frame belongs to (1-based).
    pub session: u64,
}

impl Frame {
    /// The frame as JSON (None when it is not JSON).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.text).ok()
    }

    /// `data.messageType`.
    pub fn message_type(&self) -> Option<String> {
        self.json()?
            .get("data")?
            .get("messageType")?
            .as_str()
            .map(str::to_owned)
    }

    /// `header.txn`.
    pub fn txn(&self) -> Option<String> {
        self.json()?
            .get("header")?
            .get("txn")?
            .as_str()
            .map(str::to_owned)
    }
}

#[derive(Default)]
struct Recorded {
    frames: Vec<Frame>,
    discovery_requests: Vec<Value>,
    upgrade_headers: Vec<BTreeMap<String, String>>,
    sessions: u64,
    connected: bool,
    rejected_upgrades: u64,
    /// The client certificate (DER) of each WebSocket session, in order.
    client_certs: Vec<Option<Vec<u8>>>,
}

struct Shared {
    options: CloudOptions,
    ws_url: Mutex<String>,
    rec: Mutex<Recorded>,
    notify: Notify,
    ack_mode: Mutex<AckMode>,
    /// Sender into the current session, if one is open.
    session: Mutex<Option<mpsc::UnboundedSender<SessionCmd>>>,
    /// `blobUrls` entries set by the test instead of the ones made from the blob folder
    /// (`None`: the digest is left out of the answer).
    blob_overrides: Mutex<BTreeMap<String, Option<BlobInfo>>>,
}

impl Shared {
    fn rec(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.rec.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

enum SessionCmd {
    Send(WsMessage),
    Drop,
}

/// The simulated cloud. Dropping it stops both servers.
pub struct SimCloud {
    shared: Arc<Shared>,
    discovery_addr: SocketAddr,
    ws_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SimCloud {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ServerTls {
    /// The rustls server configuration: this certificate, and client certificates required
    /// and verified against `client_ca_pem` when it is set. Also for tests' own TLS servers.
    pub fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        server_tls(self)
    }
}

fn server_tls(tls: &ServerTls) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(&tls.cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| format!("server key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(c.map_err(|e| format!("client CA: {e}"))?)
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// The accepted stream and the client's leaf certificate (DER), if it presented one.
async fn accept_io(
    tcp: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Option<(Box<dyn Io>, Option<Vec<u8>>)> {
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Some((Box::new(tcp), None)),
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(s) => {
                let client = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                Some((Box::new(s), client))
            }
            Err(e) => {
                tracing::debug!("sim cloud: TLS accept failed: {e}");
                None
            }
        },
    }
}

impl SimCloud {
    /// Starts both servers on fresh 127.0.0.1 ports.
    pub async fn start(options: CloudOptions) -> Result<SimCloud, String> {
        let d = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let w = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            options,
            ws_url: Mutex::new(String::new()),
            rec: Mutex::new(Recorded::default()),
            notify: Notify::new(),
            ack_mode: Mutex::new(AckMode::Ack),
            session: Mutex::new(None),
            blob_overrides: Mutex::new(BTreeMap::new()),
        });
        let mut cloud = SimCloud {
            shared,
            discovery_addr: d.local_addr().map_err(|e| e.to_string())?,
            ws_addr: w.local_addr().map_err(|e| e.to_string())?,
            tasks: Vec::new(),
        };
        cloud.serve(d, w)?;
        Ok(cloud)
    }

    fn serve(&mut self, d: TcpListener, w: TcpListener) -> Result<(), String> {
        let tls = match &self.shared.options.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(server_tls(t)?)),
            None => None,
        };
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        *self
            .shared
            .ws_url
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = format!("{scheme}://{}/ws/v7", self.ws_addr);
        self.tasks.push(tokio::spawn(discovery_server(
            d,
            tls.clone(),
            self.shared.clone(),
        )));
        self.tasks
            .push(tokio::spawn(ws_server(w, tls, self.shared.clone())));
        Ok(())
    }

    /// The URL to configure as `serviceDiscoveryUrl`.
    pub fn discovery_url(&self) -> String {
        let scheme = if self.shared.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/sd/v7/", self.discovery_addr)
    }

    /// Stops both servers and drops the open session (the ports stay reserved for
    /// [`SimCloud::restart`]).
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.drop_connection();
    }

    /// Listens again on the same ports.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let d = TcpListener::bind(self.discovery_addr)
            .await
            .map_err(|e| e.to_string())?;
        let w = TcpListener::bind(self.ws_addr)
            .await
            .map_err(|e| e.to_string())?;
        self.serve(d, w)
    }

    /// How the cloud answers from now on.
    pub fn set_ack_mode(&self, mode: AckMode) {
        *self
            .shared
            .ack_mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }

    fn session_send(&self, cmd: SessionCmd) -> bool {
        let guard = self
            .shared
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().is_some_and(|s| s.send(cmd).is_ok())
    }

    /// Sends a message as a BINARY frame with a fresh txn; returns the txn, or `None` when no
    /// session is open.
    pub fn send(&self, data: Message) -> Option<String> {
        let txn = uuid::Uuid::new_v4().to_string();
        let envelope = Envelope {
            header: Header {
                version: messages::PROTOCOL_VERSION,
                system_id: self.shared.options.system_id.clone(),
                created_at: messages::format_time(0),
                txn: txn.clone(),
            },
            data,
        };
        let text = messages::to_json(&envelope).ok()?;
        self.send_raw(WsMessage::binary(text.into_bytes()))
            .then_some(txn)
    }

    /// Sends `data` (a JSON `data` object) with a header; returns the txn.
    pub fn send_data(&self, data: Value) -> Option<String> {
        let txn = uuid::Uuid::new_v4().to_string();
        let frame = json!({
            "header": {"version": 7, "systemId": self.shared.options.system_id,
                       "createdAt": messages::format_time(0), "txn": txn},
            "data": data,
        });
        self.send_raw(WsMessage::binary(frame.to_string().into_bytes()))
            .then_some(txn)
    }

    /// Sends any WebSocket message as is.
    pub fn send_raw(&self, msg: WsMessage) -> bool {
        self.session_send(SessionCmd::Send(msg))
    }

    /// Closes the open session's TCP connection without a WebSocket close.
    pub fn drop_connection(&self) {
        self.session_send(SessionCmd::Drop);
    }

    /// Forgets the frames, discovery requests, upgrade headers and client certificates
    /// recorded so far (a long run keeps its memory flat); counters and state stay.
    pub fn clear_records(&self) {
        let mut rec = self.shared.rec();
        rec.frames.clear();
        rec.discovery_requests.clear();
        rec.upgrade_headers.clear();
        rec.client_certs.clear();
    }

    /// Every frame so far, both directions.
    pub fn frames(&self) -> Vec<Frame> {
        self.shared.rec().frames.clone()
    }

    /// Frames the unit sent of `message_type`.
    pub fn from_unit(&self, message_type: &str) -> Vec<Frame> {
        self.frames()
            .into_iter()
            .filter(|f| f.from_unit && f.message_type().as_deref() == Some(message_type))
            .collect()
    }

    /// Discovery request bodies received.
    pub fn discovery_requests(&self) -> Vec<Value> {
        self.shared.rec().discovery_requests.clone()
    }

    /// Headers of every accepted or refused WebSocket upgrade (lower-case names).
    pub fn upgrade_headers(&self) -> Vec<BTreeMap<String, String>> {
        self.shared.rec().upgrade_headers.clone()
    }

    /// WebSocket sessions opened so far.
    pub fn sessions(&self) -> u64 {
        self.shared.rec().sessions
    }

    /// The client certificate (DER) each WebSocket session was opened with, in session order
    /// (`None` without TLS or without a client certificate).
    pub fn session_client_certs(&self) -> Vec<Option<Vec<u8>>> {
        self.shared.rec().client_certs.clone()
    }

    /// Whether a session is open.
    pub fn connected(&self) -> bool {
        self.shared.rec().connected
    }

    /// Waits until `pred` holds over the recorded frames; returns its value. Event driven: it
    /// re-checks on every frame and session change.
    pub async fn wait_for<T>(&self, mut pred: impl FnMut(&[Frame]) -> Option<T>) -> T {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = pred(&self.shared.rec().frames) {
                return v;
            }
            notified.await;
        }
    }

    /// Waits until a session is open (`true`) or none is (`false`).
    pub async fn wait_connected(&self, connected: bool) {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.rec().connected == connected {
                return;
            }
            notified.await;
        }
    }

    /// Answers `requestBlobUrls` for `digest` with `info` (`None`: no entry) instead of what
    /// the blob folder gives, until [`SimCloud::clear_blob_info`].
    pub fn set_blob_info(&self, digest: &str, info: Option<BlobInfo>) {
        self.shared
            .blob_overrides
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest.to_owned(), info);
    }

    /// Back to the blob folder's answer for `digest`.
    pub fn clear_blob_info(&self, digest: &str) {
        self.shared
            .blob_overrides
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(digest);
    }

    /// Waits until at least `n` WebSocket sessions have been opened and one is open.
    pub async fn wait_sessions(&self, n: u64) {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let rec = self.shared.rec();
                if rec.sessions >= n && rec.connected {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Waits for the `n`-th (1-based) frame the unit sent of `message_type`.
    pub async fn wait_from_unit(&self, message_type: &str, n: usize) -> Frame {
        self.wait_for(|frames| {
            frames
                .iter()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some(message_type))
                .nth(n.saturating_sub(1))
                .cloned()
        })
        .await
    }
}

async fn discovery_server(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let tls = tls.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let Some((io, _)) = accept_io(tcp, tls.as_ref()).await else {
                return;
            };
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let shared = shared.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let answer = {
                            let mut rec = shared.rec();
                            rec.discovery_requests.push(request);
                            let mut urls = shared.options.extra_urls_before.clone();
                            urls.push(
                                shared
                                    .ws_url
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .clone(),
                            );
                            let mut a = json!({
                                "version": 7,
                                "systemId": shared.options.system_id,
                                "connectionInfo": urls,
                                "authToken": shared.options.auth_token,
                                "errorCode": 0,
                            });
                            if shared.options.next_request_delay_ms > 0 {
                                a["nextRequestDelay"] = json!(shared.options.next_request_delay_ms);
                            }
                            a
                        };
                        shared.notify.notify_waiters();
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(answer.to_string()),
                        )))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .await;
        });
    }
}

async fn ws_server(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let tls = tls.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let Some((io, client_cert)) = accept_io(tcp, tls.as_ref()).await else {
                return;
            };
            ws_session(io, client_cert, shared).await;
        });
    }
}

fn record(shared: &Shared, frame: Frame) {
    shared.rec().frames.push(frame);
    shared.notify.notify_waiters();
}

#[allow(
    clippy::result_large_err,
    reason = "the handshake callback's error type is fixed by tungstenite"
)]
async fn ws_session(io: Box<dyn Io>, client_cert: Option<Vec<u8>>, shared: Arc<Shared>) {
    let token = shared.options.auth_token.clone();
    let hs = shared.clone();
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let headers: BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let auth_ok = token.is_empty()
            || headers.get("authorization").map(String::as_str)
                == Some(format!("Bearer {token}").as_str());
        let mut rec = hs.rec();
        rec.upgrade_headers.push(headers);
        if auth_ok && rec.rejected_upgrades >= hs.options.reject_first_upgrades {
            Ok(resp)
        } else {
            rec.rejected_upgrades += 1;
            let mut r = ErrorResponse::new(Some("unauthorized".to_owned()));
            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
            Err(r)
        }
    };
    let config = ws_config(shared.options.max_message_size);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(config)).await
    else {
        shared.notify.notify_waiters();
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // A new session replaces the old one, as a real cloud would for the same unit. It takes
    // the sender before it counts as open, so that whoever sees it open sends into it.
    if let Some(old) = shared
        .session
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .replace(tx)
    {
        let _ = old.send(SessionCmd::Drop);
    }
    let session = {
        let mut rec = shared.rec();
        rec.sessions += 1;
        rec.connected = true;
        rec.client_certs.push(client_cert);
        rec.sessions
    };
    shared.notify.notify_waiters();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(SessionCmd::Send(msg)) => {
                    let (binary, text) = match &msg {
                        WsMessage::Binary(b) => (true, String::from_utf8_lossy(b).into_owned()),
                        WsMessage::Text(t) => (false, t.to_string()),
                        _ => (true, String::new()),
                    };
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                    record(&shared, Frame { from_unit: false, binary, text, session });
                }
                Some(SessionCmd::Drop) | None => break,
            },
            frame = ws.next() => match frame {
                Some(Ok(WsMessage::Binary(b))) => {
                    let text = String::from_utf8_lossy(&b).into_owned();
                    record(&shared, Frame { from_unit: true, binary: true, text: text.clone(), session });
                    for reply in answer(&shared, &text) {
                        let reply_text = reply.to_string();
                        if ws.send(WsMessage::binary(reply_text.clone().into_bytes())).await.is_err() {
                            break;
                        }
                        record(&shared, Frame { from_unit: false, binary: true, text: reply_text, session });
                    }
                }
                Some(Ok(WsMessage::Text(t))) => {
                    record(&shared, Frame { from_unit: true, binary: false, text: t.to_string(), session });
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    {
        let mut rec = shared.rec();
        // Only the newest session counts as the open one.
        if rec.sessions == session {
            rec.connected = false;
        }
    }
    shared.notify.notify_waiters();
}

/// The automatic answers to a frame from the unit: ACK/NACK per the mode, and `blobUrls` for a
/// `requestBlobUrls` when a blob folder is set.
fn answer(shared: &Shared, text: &str) -> Vec<Value> {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let txn = frame["header"]["txn"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let message_type = frame["data"]["messageType"].as_str().unwrap_or_default();
    if message_type == "ack" {
        return Vec::new();
    }
    let header = |txn: &str| {
        json!({"version": 7, "systemId": shared.options.system_id,
               "createdAt": messages::format_time(0), "txn": txn})
    };
    let mode = *shared
        .ack_mode
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut out = Vec::new();
    match mode {
        AckMode::Ack => out.push(json!({"header": header(&txn), "data": {"messageType": "ack"}})),
        AckMode::Nack(ms) => out.push(
            json!({"header": header(&txn), "data": {"messageType": "nack", "retryAfter": ms}}),
        ),
        AckMode::Ignore => {}
    }
    if message_type == "requestBlobUrls"
        && mode == AckMode::Ack
        && let Some(dir) = &shared.options.blob_dir
    {
        let correlation_id = frame["data"]["correlationId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let items = frame["data"]["digests"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|d| {
                        let set = shared
                            .blob_overrides
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get(d)
                            .cloned();
                        set.unwrap_or_else(|| blob_info(dir, d))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let urls = Message::BlobUrls(BlobUrls {
            correlation_id,
            items,
        });
        if let Ok(data) = serde_json::to_value(&urls) {
            out.push(json!({"header": header(&uuid::Uuid::new_v4().to_string()), "data": data}));
        }
    }
    out
}

/// Download information for one blob of the folder (`None` when it is not there).
pub fn blob_info(dir: &std::path::Path, digest: &str) -> Option<BlobInfo> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let path = dir.join("sha256").join(hex);
    let content = std::fs::read(&path).ok()?;
    let sha3 = sha3::Sha3_256::digest(&content);
    let sha3_hex: String = sha3.iter().map(|b| format!("{b:02x}")).collect();
    let abs = std::fs::canonicalize(&path).ok()?;
    Some(BlobInfo {
        digest: digest.to_owned(),
        urls: vec![format!("file://{}", abs.display())],
        sha256: sha3_hex,
        size: content.len() as u64,
        decrypt_info: None,
        sign_info: None,
    })
}
