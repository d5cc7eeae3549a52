//! The cloud link: one WebSocket to AosCloud, kept open (cloud-protocol.md §1).
//!
//! [`CloudLink::build`] gives a [`LinkHandle`] (cheap to clone; used by everything that talks to
//! the cloud) and a [`LinkRunner`], whose [`LinkRunner::run`] owns the connection:
//!
//! * **Connect**: service discovery (cached `connectionInfo` consumed URL by URL, dropped on a
//!   401 upgrade) then the WebSocket upgrade with the bearer token. Failed attempts back off
//!   exponentially from 1 s (or the discovery's `nextRequestDelay`) to 10 min with jitter
//!   (`backon`); a successful connect resets the back-off.
//! * **Receive**: BINARY frames only (TEXT ignored and counted; PING answered by the WebSocket
//!   library). Each frame is checked in upstream's order (JSON, version 7, own system ID, known
//!   `messageType`, body); a frame that fails is counted, logged and dropped without an ACK.
//!   A `desiredStatus` is committed by [`CloudInbox::desired_status`] before its ACK is written;
//!   every other request is ACKed first and then handed to one worker that runs
//!   [`CloudInbox::request`] in arrival order, so a slow handler never delays an ACK.
//! * **Send**: every message but ACK goes through the [`Outbox`] (ACK deadline
//!   `cloudResponseWaitTimeout`, 3 resends with the same bytes, NACK → resend after
//!   `retryAfter`); the queue survives reconnects (errata 20–21). `requestBlobUrls` is answered
//!   by a `blobUrls` with the same `correlationId`, or times out and is withdrawn.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backon::BackoffBuilder;
use futures::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::discovery::Endpoints;
use super::messages::{
    self, Ack, BlobUrls, Envelope, FrameError, Header, Message, RequestBlobUrls,
};
use super::outbox::{Outbox, OutboxCounters, Outgoing};
use super::transport::{self, ConnectError, Ws};

/// Settings of the link. [`LinkConfig::new`] gives upstream's defaults.
#[derive(Clone)]
pub struct LinkConfig {
    /// This unit's system ID (header `systemId`; incoming frames must carry it).
    pub system_id: String,
    /// The discovery URL (see `discovery::discovery_url`).
    pub discovery_url: String,
    /// TLS for `https`/`wss` URLs: CA roots and the `online` client certificate, until
    /// [`LinkHandle::reconnect_with`] gives new ones.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `cloudResponseWaitTimeout`: ACK deadline and `blobUrls` wait.
    pub response_wait: Duration,
    /// Resends after the first write (3 in v7).
    pub max_resends: u32,
    /// Largest incoming WebSocket message accepted.
    pub max_message_size: usize,
    /// Most un-acked outgoing messages kept.
    pub outbox_capacity: usize,
    /// Most ACKed requests waiting for the worker before reading pauses.
    pub request_queue: usize,
    /// Time limit of one discovery or one WebSocket upgrade.
    pub connect_timeout: Duration,
    /// Time limit of one frame write (upstream's socket send timeout).
    pub send_timeout: Duration,
    /// First back-off delay (upstream 1 s) unless discovery gives `nextRequestDelay`.
    pub backoff_min: Duration,
    /// Largest back-off delay (upstream 10 min).
    pub backoff_max: Duration,
    /// `cloudMessageLog`: every frame appended as `RX: <json>` / `TX: <json>`.
    pub message_log: Option<PathBuf>,
}

impl LinkConfig {
    /// Upstream defaults for everything but the identity and the discovery URL.
    pub fn new(system_id: &str, discovery_url: &str) -> Self {
        Self {
            system_id: system_id.to_owned(),
            discovery_url: discovery_url.to_owned(),
            tls: None,
            response_wait: Duration::from_secs(10),
            max_resends: 3,
            max_message_size: DEFAULT_MAX_MESSAGE,
            outbox_capacity: 1024,
            request_queue: 256,
            connect_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            message_log: None,
        }
    }
}

/// Default largest incoming message: a desired status at the capacity limits fits easily.
pub const DEFAULT_MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// What the link does with incoming requests. Implemented by the daemon (store, SMs, IAM).
pub trait CloudInbox: Send + Sync + 'static {
    /// Validates and commits a `desiredStatus` body. `Ok` ⇒ the link ACKs it; `Err` (naming the
    /// field) ⇒ no ACK, counted and logged.
    fn desired_status(
        &self,
        data: Map<String, Value>,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Handles any other cloud request (already ACKed), one at a time in arrival order.
    fn request(&self, envelope: Envelope) -> impl Future<Output = ()> + Send;
}

/// Who waits for a `blobUrls` answer, by correlation ID; none once the link has stopped.
#[derive(Default)]
struct BlobWaiters {
    waiting: HashMap<String, oneshot::Sender<BlobUrls>>,
    stopped: bool,
}

/// Whether the link is up, and how many sessions it has had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkState {
    pub connected: bool,
    /// Sessions opened so far (a new value on every connect).
    pub sessions: u64,
}

/// Cumulative counters of the link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub discovery_ok: u64,
    pub discovery_failed: u64,
    pub connect_failed: u64,
    pub unauthorized: u64,
    pub connects: u64,
    pub disconnects: u64,
    /// BINARY frames received.
    pub frames_in: u64,
    pub text_ignored: u64,
    pub malformed: u64,
    pub wrong_version: u64,
    pub wrong_system_id: u64,
    pub unknown_type: u64,
    /// Frames over `max_message_size` (the session is closed and reopened).
    pub oversized: u64,
    /// Frames over a per-message capacity limit (too many entries, too long a value).
    pub over_limit: u64,
    /// Unit→cloud message types received from the cloud (not ACKed).
    pub unexpected: u64,
    pub acks_sent: u64,
    pub desired_accepted: u64,
    pub desired_rejected: u64,
    /// `ack`/`nack` whose txn matched nothing queued.
    pub unmatched_acks: u64,
    /// `blobUrls` whose correlationId matched no waiting request.
    pub unmatched_blob_urls: u64,
    pub blob_url_timeouts: u64,
    pub requests_handled: u64,
    /// New TLS settings taken (certificate renewals), each followed by a new connection.
    pub renewals: u64,
    /// Messages in the outgoing queue (not ACKed yet).
    pub queued: u64,
    pub outbox: OutboxCounters,
}

/// Why a send or request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the cloud link is stopped")]
    Stopped,
    #[error("{message_type} not queued: {reason}")]
    Refused {
        message_type: String,
        reason: String,
    },
    #[error("no blobUrls answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot serialize {0}")]
    Serialize(String),
}

enum Cmd {
    Send {
        out: Outgoing,
        reply: oneshot::Sender<Result<(), LinkError>>,
    },
    Withdraw {
        txn: String,
    },
    /// New TLS settings, already in `Shared::tls` (a renewed `online` certificate): drop the
    /// session and connect again.
    Reconnect,
}

struct Shared {
    counters: watch::Sender<LinkCounters>,
    blob_waiters: Mutex<BlobWaiters>,
    /// The TLS settings in force: the configured ones, then the last `reconnect_with`. The
    /// link connects with these, and the fetcher downloads with them.
    tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
}

impl Shared {
    fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self, f: impl FnOnce(&mut LinkCounters)) {
        self.counters.send_modify(f);
    }

    /// Copies the outbox counters in, waking watchers only when they changed.
    fn publish_outbox(&self, outbox: &Outbox) {
        let counters = outbox.counters();
        let queued = outbox.len() as u64;
        self.counters.send_if_modified(|c| {
            let changed = c.outbox != counters || c.queued != queued;
            c.outbox = counters;
            c.queued = queued;
            changed
        });
    }
}

/// Constructor namespace.
pub struct CloudLink;

impl CloudLink {
    /// A handle and the runner that owns the connection; nothing happens until
    /// [`LinkRunner::run`] is polled.
    pub fn build(config: LinkConfig) -> (LinkHandle, LinkRunner) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(LinkState::default());
        let shared = Arc::new(Shared {
            counters: watch::Sender::new(LinkCounters::default()),
            blob_waiters: Mutex::new(BlobWaiters::default()),
            tls: Mutex::new(config.tls.clone()),
        });
        let handle = LinkHandle {
            cmds: cmd_tx,
            shared: shared.clone(),
            state: state_rx,
            system_id: Arc::from(config.system_id.as_str()),
            response_wait: config.response_wait,
        };
        let outbox = Outbox::new(
            config.response_wait,
            config.max_resends,
            config.outbox_capacity,
        );
        let runner = LinkRunner {
            config,
            cmds: cmd_rx,
            shared,
            state: state_tx,
            outbox,
            endpoints: Endpoints::new(),
        };
        (handle, runner)
    }
}

/// Sends messages to the cloud and watches the link.
#[derive(Clone)]
pub struct LinkHandle {
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    state: watch::Receiver<LinkState>,
    system_id: Arc<str>,
    response_wait: Duration,
}

/// A fresh header with a new txn.
fn header(system_id: &str, txn: String) -> Header {
    Header {
        version: messages::PROTOCOL_VERSION,
        system_id: system_id.to_owned(),
        created_at: messages::format_time(messages::now_micros()),
        txn,
    }
}

fn new_txn() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl LinkHandle {
    /// Queues `msg` (any unit→cloud type but `ack`) with a new txn; returns the txn. Refused when
    /// the queue is full, or when the message is not important and the link is down.
    pub async fn send(&self, msg: Message) -> Result<String, LinkError> {
        let out = self.outgoing(msg)?;
        let txn = out.txn.clone();
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Send { out, reply })
            .map_err(|_| LinkError::Stopped)?;
        rx.await.map_err(|_| LinkError::Stopped)??;
        Ok(txn)
    }

    fn outgoing(&self, msg: Message) -> Result<Outgoing, LinkError> {
        let message_type = msg.message_type().to_owned();
        let important = msg.is_important();
        let envelope = Envelope {
            header: header(&self.system_id, new_txn()),
            data: msg,
        };
        let frame = messages::to_json(&envelope).map_err(LinkError::Serialize)?;
        Ok(Outgoing {
            txn: envelope.header.txn,
            message_type,
            frame: frame.into_bytes(),
            important,
        })
    }

    /// Connects again with `tls` (a renewed `online` certificate): the open session, if any, is
    /// closed, discovery runs again, and queued messages are kept. [`LinkHandle::client_tls`]
    /// gives the new settings at once.
    pub fn reconnect_with(&self, tls: Option<Arc<rustls::ClientConfig>>) -> Result<(), LinkError> {
        *self
            .shared
            .tls
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = tls;
        self.cmds
            .send(Cmd::Reconnect)
            .map_err(|_| LinkError::Stopped)
    }

    /// The TLS client settings the link uses now (with the unit's current `online`
    /// certificate), for other HTTPS requests made on the unit's behalf such as blob downloads.
    pub fn client_tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.shared.tls()
    }

    /// Asks the cloud for download information of `digests` and waits for the `blobUrls` with
    /// the same `correlationId`, at most `cloudResponseWaitTimeout`; on timeout the request is
    /// withdrawn (no more resends).
    pub async fn request_blob_urls(&self, digests: Vec<String>) -> Result<BlobUrls, LinkError> {
        let correlation_id = new_txn();
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self
                .shared
                .blob_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if waiters.stopped {
                return Err(LinkError::Stopped);
            }
            waiters.waiting.insert(correlation_id.clone(), tx);
        }
        let forget = || {
            self.shared
                .blob_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .waiting
                .remove(&correlation_id);
        };
        let txn = match self
            .send(Message::RequestBlobUrls(RequestBlobUrls {
                correlation_id: correlation_id.clone(),
                digests,
            }))
            .await
        {
            Ok(txn) => txn,
            Err(e) => {
                forget();
                return Err(e);
            }
        };
        match tokio::time::timeout(self.response_wait, rx).await {
            Ok(Ok(urls)) => Ok(urls),
            Ok(Err(_)) => Err(LinkError::Stopped),
            Err(_) => {
                forget();
                let _ = self.cmds.send(Cmd::Withdraw { txn });
                self.shared.count(|c| c.blob_url_timeouts += 1);
                Err(LinkError::Timeout(self.response_wait))
            }
        }
    }

    /// The link state; changes on every connect and disconnect.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// Whether the link is up now.
    pub fn is_connected(&self) -> bool {
        self.state.borrow().connected
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> LinkCounters {
        *self.shared.counters.borrow()
    }

    /// Waits until the counters satisfy `pred` (they change on every event of the link).
    pub async fn wait_counters(&self, pred: impl Fn(&LinkCounters) -> bool) -> LinkCounters {
        let mut rx = self.shared.counters.subscribe();
        let found = rx.wait_for(|c| pred(c)).await.map(|c| *c);
        found.unwrap_or_else(|_| *rx.borrow())
    }

    /// This unit's system ID.
    pub fn system_id(&self) -> &str {
        &self.system_id
    }
}

/// How a session ended.
enum End {
    Lost,
    Shutdown,
}

/// Owns the connection; see the module documentation.
pub struct LinkRunner {
    config: LinkConfig,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    shared: Arc<Shared>,
    state: watch::Sender<LinkState>,
    outbox: Outbox,
    endpoints: Endpoints,
}

fn std_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl LinkRunner {
    fn backoff(&self) -> backon::ExponentialBackoff {
        let min = self
            .endpoints
            .next_request_delay()
            .unwrap_or(self.config.backoff_min);
        backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(self.config.backoff_max.max(min))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Runs until `shutdown` turns true (or its sender goes away). Incoming requests go to
    /// `inbox`.
    pub async fn run<I: CloudInbox>(mut self, inbox: Arc<I>, mut shutdown: watch::Receiver<bool>) {
        let (work_tx, mut work_rx) = mpsc::channel::<Envelope>(self.config.request_queue.max(1));
        let worker_inbox = inbox.clone();
        let worker_shared = self.shared.clone();
        let worker = tokio::spawn(async move {
            while let Some(envelope) = work_rx.recv().await {
                worker_inbox.request(envelope).await;
                worker_shared.count(|c| c.requests_handled += 1);
            }
        });
        let mut backoff = self.backoff();
        let mut learned = self.endpoints.next_request_delay();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let mut renewed = None;
            let attempt = {
                let fut = connect(&self.config, &mut self.endpoints, &self.shared);
                tokio::pin!(fut);
                loop {
                    tokio::select! {
                        r = &mut fut => break Some(r),
                        Some(cmd) = self.cmds.recv() => {
                            if let Some(r) = handle_cmd(&mut self.outbox, cmd, &self.shared) {
                                renewed = Some(r);
                            }
                        }
                        _ = shutdown.changed() => break None,
                    }
                }
            };
            let Some(attempt) = attempt else { break };
            if let Some(r) = renewed {
                // The attempt used the old certificate: start over with the new one.
                self.renew(r);
                backoff = self.backoff();
                if let Ok(mut ws) = attempt {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                }
                continue;
            }
            match attempt {
                Ok(ws) => {
                    backoff = self.backoff();
                    match self
                        .session(ws, inbox.as_ref(), &work_tx, &mut shutdown)
                        .await
                    {
                        End::Shutdown => break,
                        End::Lost => continue,
                    }
                }
                Err(e) => {
                    tracing::warn!("cloud: {e}");
                    if self.endpoints.next_request_delay() != learned {
                        // Errata 22: a new nextRequestDelay applies from the next attempt.
                        learned = self.endpoints.next_request_delay();
                        backoff = self.backoff();
                    }
                    let delay = backoff.next().unwrap_or(self.config.backoff_max);
                    tracing::debug!("cloud: next attempt in {delay:?}");
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    let stop = loop {
                        tokio::select! {
                            _ = &mut sleep => break false,
                            Some(cmd) = self.cmds.recv() => {
                                if let Some(r) = handle_cmd(&mut self.outbox, cmd, &self.shared) {
                                    // A new certificate may be what the cloud was waiting
                                    // for: try it now.
                                    self.renew(r);
                                    backoff = self.backoff();
                                    break false;
                                }
                            }
                            _ = shutdown.changed() => break true,
                        }
                    };
                    if stop {
                        break;
                    }
                }
            }
            self.publish_counters();
        }
        // No answer comes any more: whoever waits for blob URLs is told now, not after
        // cloudResponseWaitTimeout (a download waiting for them held up the daemon's stop).
        {
            let mut waiters = self
                .shared
                .blob_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            waiters.stopped = true;
            waiters.waiting.clear();
        }
        drop(work_tx);
        let _ = worker.await;
        self.publish_counters();
    }

    fn publish_counters(&self) {
        self.shared.publish_outbox(&self.outbox);
    }

    /// After new TLS settings: the endpoints learned with the old identity are dropped, so the
    /// next attempt starts with service discovery.
    fn renew(&mut self, _: Reconnect) {
        self.endpoints = Endpoints::new();
        self.shared.count(|c| c.renewals += 1);
    }

    async fn session<I: CloudInbox>(
        &mut self,
        mut ws: Ws,
        inbox: &I,
        work_tx: &mpsc::Sender<Envelope>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        self.outbox.connected(std_now());
        self.shared.count(|c| c.connects += 1);
        self.state.send_modify(|s| {
            s.connected = true;
            s.sessions += 1;
        });
        tracing::info!("cloud: connected");
        let end = loop {
            if let Err(e) = self.flush(&mut ws).await {
                tracing::warn!("cloud: write failed: {e}");
                break End::Lost;
            }
            self.publish_counters();
            let deadline = self
                .outbox
                .next_deadline()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                frame = ws.next() => match frame {
                    None => {
                        tracing::warn!("cloud: connection closed");
                        break End::Lost;
                    }
                    Some(Err(e)) => {
                        if matches!(e, tungstenite::Error::Capacity(_)) {
                            self.shared.count(|c| c.oversized += 1);
                        }
                        tracing::warn!("cloud: receive failed: {e}");
                        break End::Lost;
                    }
                    Some(Ok(WsMessage::Binary(bytes))) => {
                        if let Err(e) = self.incoming(&bytes, &mut ws, inbox, work_tx).await {
                            tracing::warn!("cloud: write failed: {e}");
                            break End::Lost;
                        }
                    }
                    Some(Ok(WsMessage::Text(_))) => {
                        self.shared.count(|c| c.text_ignored += 1);
                        tracing::debug!("cloud: TEXT frame ignored");
                    }
                    Some(Ok(WsMessage::Close(_))) => {
                        tracing::info!("cloud: closed by the cloud");
                        break End::Lost;
                    }
                    Some(Ok(_)) => {}
                },
                Some(cmd) = self.cmds.recv() => {
                    if let Some(r) = handle_cmd(&mut self.outbox, cmd, &self.shared) {
                        tracing::info!("cloud: new client certificate; reconnecting");
                        self.renew(r);
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                        break End::Lost;
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {}
                _ = shutdown.changed() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break End::Shutdown;
                }
            }
        };
        self.outbox.disconnected();
        self.shared.count(|c| c.disconnects += 1);
        self.state.send_modify(|s| s.connected = false);
        self.publish_counters();
        end
    }

    /// Writes every frame the outbox has due.
    async fn flush(&mut self, ws: &mut Ws) -> Result<(), String> {
        for out in self.outbox.due(std_now()) {
            self.write(ws, out.frame).await?;
        }
        Ok(())
    }

    async fn write(&self, ws: &mut Ws, frame: Vec<u8>) -> Result<(), String> {
        self.log("TX", &frame);
        match tokio::time::timeout(self.config.send_timeout, ws.send(WsMessage::binary(frame)))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no progress in {:?}", self.config.send_timeout)),
        }
    }

    fn log(&self, dir: &str, frame: &[u8]) {
        let Some(path) = &self.config.message_log else {
            return;
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| {
                f.write_all(dir.as_bytes())?;
                f.write_all(b": ")?;
                f.write_all(frame)?;
                f.write_all(b"\n")
            });
        if let Err(e) = written {
            tracing::debug!("cloud: message log {}: {e}", path.display());
        }
    }

    async fn ack(&self, ws: &mut Ws, txn: &str) -> Result<(), String> {
        let envelope = Envelope {
            header: header(&self.config.system_id, txn.to_owned()),
            data: Message::Ack(Ack::default()),
        };
        let frame = messages::to_json(&envelope)?;
        self.write(ws, frame.into_bytes()).await?;
        self.shared.count(|c| c.acks_sent += 1);
        Ok(())
    }

    /// One BINARY frame. Errors are write errors (the session ends).
    async fn incoming<I: CloudInbox>(
        &mut self,
        bytes: &[u8],
        ws: &mut Ws,
        inbox: &I,
        work_tx: &mpsc::Sender<Envelope>,
    ) -> Result<(), String> {
        self.shared.count(|c| c.frames_in += 1);
        self.log("RX", bytes);
        let parsed = std::str::from_utf8(bytes)
            .map_err(|e| FrameError::Malformed(format!("not UTF-8: {e}")))
            .and_then(|text| messages::parse_frame(text, &self.config.system_id));
        let envelope = match parsed {
            Ok(e) => e,
            Err(err) => {
                self.shared.count(|c| match err {
                    FrameError::Malformed(_) | FrameError::Body { .. } => c.malformed += 1,
                    FrameError::OverLimit { .. } => c.over_limit += 1,
                    FrameError::WrongVersion(_) => c.wrong_version += 1,
                    FrameError::WrongSystemId(_) => c.wrong_system_id += 1,
                    FrameError::UnknownType(_) => c.unknown_type += 1,
                });
                tracing::warn!("cloud: frame dropped without ACK: {err}");
                return Ok(());
            }
        };
        let txn = envelope.header.txn.clone();
        match envelope.data {
            Message::Ack(_) => {
                if !self.outbox.ack(&txn) {
                    self.shared.count(|c| c.unmatched_acks += 1);
                    tracing::debug!("cloud: ack for unknown txn {txn}");
                }
            }
            Message::Nack(nack) => {
                let after = Duration::from_millis(nack.retry_after);
                if !self.outbox.nack(&txn, after, std_now()) {
                    self.shared.count(|c| c.unmatched_acks += 1);
                    tracing::debug!("cloud: nack for unknown txn {txn}");
                }
            }
            Message::DesiredStatus(data) => match inbox.desired_status(data).await {
                Ok(()) => {
                    self.shared.count(|c| c.desired_accepted += 1);
                    self.ack(ws, &txn).await?;
                }
                Err(e) => {
                    self.shared.count(|c| c.desired_rejected += 1);
                    tracing::warn!("cloud: desiredStatus {txn} rejected, not ACKed: {e}");
                }
            },
            Message::BlobUrls(urls) => {
                self.ack(ws, &txn).await?;
                let waiter = self
                    .shared
                    .blob_waiters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .waiting
                    .remove(&urls.correlation_id);
                match waiter {
                    Some(w) => {
                        let _ = w.send(urls);
                    }
                    None => {
                        self.shared.count(|c| c.unmatched_blob_urls += 1);
                        tracing::warn!(
                            "cloud: blobUrls for unknown correlationId {:?}",
                            urls.correlation_id
                        );
                    }
                }
            }
            data if data.is_cloud_to_unit() => {
                self.ack(ws, &txn).await?;
                let envelope = Envelope {
                    header: envelope.header,
                    data,
                };
                if work_tx.send(envelope).await.is_err() {
                    tracing::warn!("cloud: request worker is gone");
                }
            }
            data => {
                self.shared.count(|c| c.unexpected += 1);
                tracing::warn!(
                    "cloud: {} is a unit→cloud message; dropped without ACK",
                    data.message_type()
                );
            }
        }
        Ok(())
    }
}

/// Sleeps until `deadline`, or forever without one (a `select!` branch that never fires).
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Applies an outbox command; a `Reconnect` is returned for the caller to act on.
fn handle_cmd(outbox: &mut Outbox, cmd: Cmd, shared: &Shared) -> Option<Reconnect> {
    match cmd {
        Cmd::Send { out, reply } => {
            let message_type = out.message_type.clone();
            let result = outbox.push(out, std_now()).map_err(|refused| {
                let reason = if outbox.is_connected() || refused.important {
                    "the outgoing queue is full"
                } else {
                    "the link is down and the message is not kept over reconnects"
                };
                tracing::debug!("cloud: {message_type} refused: {reason}");
                LinkError::Refused {
                    message_type,
                    reason: reason.to_owned(),
                }
            });
            let _ = reply.send(result);
        }
        Cmd::Withdraw { txn } => {
            outbox.remove(&txn);
        }
        Cmd::Reconnect => return Some(Reconnect),
    }
    shared.publish_outbox(outbox);
    None
}

/// New TLS settings to connect with (in `Shared::tls`).
struct Reconnect;

/// One connection attempt: discovery when no endpoint is cached, then the upgrade to the next
/// cached URL.
async fn connect(
    config: &LinkConfig,
    endpoints: &mut Endpoints,
    shared: &Shared,
) -> Result<Ws, ConnectError> {
    let tls = shared.tls();
    if endpoints.is_empty() {
        match transport::discover(
            &config.discovery_url,
            &config.system_id,
            tls.as_ref(),
            config.connect_timeout,
        )
        .await
        {
            Ok(resp) => {
                shared.count(|c| c.discovery_ok += 1);
                tracing::info!(
                    "cloud: discovery gave {} endpoint(s)",
                    resp.connection_info.len()
                );
                endpoints.set(&resp);
            }
            Err(e) => {
                shared.count(|c| c.discovery_failed += 1);
                return Err(e);
            }
        }
    }
    // Every cached URL is tried in turn; each failure removes its URL (§1.3).
    let mut last = None;
    while let Some(url) = endpoints.next() {
        let token = endpoints.auth_token().to_owned();
        match transport::connect_ws(
            &url,
            &token,
            tls.as_ref(),
            config.max_message_size,
            config.connect_timeout,
        )
        .await
        {
            Ok(ws) => return Ok(ws),
            Err(e) => {
                shared.count(|c| c.connect_failed += 1);
                tracing::warn!("cloud: {e}");
                if matches!(e, ConnectError::Unauthorized { .. }) {
                    shared.count(|c| c.unauthorized += 1);
                    endpoints.unauthorized();
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::Response {
        url: config.discovery_url.clone(),
        reason: "no endpoint to connect to".to_owned(),
    }))
}
