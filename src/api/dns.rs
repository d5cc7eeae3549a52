//! Embedded authoritative DNS server for instance host names.
//!
//! The network manager computes the host names of every instance (for example
//! `0.subject.item.network`, `subject.item` or a configured `myhostname`) and hands the whole
//! table to [`DnsServer::set_records`]. The table is swapped atomically while the server keeps
//! serving: no restart, no external process (unlike upstream's dnsmasq + SIGHUP, see errata 11),
//! and no query in flight ever sees a half-applied table.
//!
//! # Answering rules
//!
//! Every configured name is taken as a fully-qualified name (the root dot is appended); names are
//! matched case-insensitively. For a query of class IN with exactly one question, in this order:
//!
//! 1. **Known name** (in the table): authoritative answer. `A` (and `ANY`) queries get the name's
//!    A records with the configured TTL; every other type gets NOERROR with no answers (NODATA).
//! 2. **Ancestor of a known name** (e.g. `item.network.` when `0.subject.item.network.` is known):
//!    authoritative NODATA. Such a name exists as an empty non-terminal; answering NXDOMAIN would
//!    let RFC 8020 resolvers conclude that nothing below it exists either.
//! 3. **In zone**: the query's *last label* equals the last label of any name passed to the latest
//!    `set_records` call (conflicting names included). This is the rule "the query ends with a
//!    label sequence that ends one of the table's names": the shortest such sequence is the single
//!    last label, so checking that label is equivalent. Answer: authoritative NXDOMAIN. Example:
//!    with `0.subject.item.network` known, `7.other.item.network.` and `foo.network.` are NXDOMAIN.
//!    Caveat: a configured host name ending in a public top-level label (e.g. `db.example.com`)
//!    puts that whole top-level domain (`com.`) in zone; instance names never do that.
//! 4. **Anything else**: forwarded over UDP to the `upstream` resolvers in order (the first one
//!    that answers wins; 2 s timeout each; SERVFAIL when none answers), or REFUSED when no
//!    upstream is configured.
//!
//! Other classes are REFUSED, opcodes other than QUERY get NOTIMP, a query with zero or several
//! questions gets FORMERR. Negative answers carry no SOA (there is no zone apex), so resolvers do
//! not cache them, which suits names that change with every allocation.
//!
//! # Robustness
//!
//! Packets that do not parse are counted ([`DnsStats::malformed`]) and get a bare FORMERR header if
//! they look like a query (at least 12 bytes, QR bit clear), otherwise nothing. Messages that are
//! responses are never answered, so two servers cannot ping-pong. TCP frames longer than
//! [`MAX_TCP_QUERY_LEN`] close the connection (counted). TCP connections and concurrent UDP
//! forwards are bounded; idle TCP connections time out.
//!
//! # Why not hickory-server's `Server`/`Catalog`
//!
//! hickory-server 0.26 parses packets inside its `Server` before any handler sees them, so
//! malformed packets cannot be counted and TCP frame sizes cannot be capped; it spawns a task per
//! UDP packet without a bound and logs every request at `info`. Its `Catalog`/`ZoneHandler` model
//! needs one zone origin with an SOA per zone, but these names share no suffix (`myhostname`,
//! `subject.item`), and forwarding would need its `resolver` feature (hickory-resolver). The
//! request handling here is small, so it is written directly on hickory-proto's message
//! parser/serializer and tokio sockets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

/// TTL of answers when the configuration does not say otherwise.
pub const DEFAULT_TTL: u32 = 5;
/// How long one upstream resolver gets to answer a forwarded query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest TCP frame accepted from a client. Queries are tiny (a name, EDNS, maybe a cookie);
/// anything larger is not a query we can answer, so the connection is closed instead of
/// buffering up to 64 KiB per client.
pub const MAX_TCP_QUERY_LEN: usize = 4096;
/// A TCP client that sends nothing for this long is disconnected (it holds a connection slot).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent TCP connections; more are closed right after accept.
const MAX_TCP_CONNECTIONS: usize = 64;
/// Concurrent forwarded UDP queries; beyond this the client gets SERVFAIL at once instead of the
/// server piling up tasks and sockets.
const MAX_FORWARDS_IN_FLIGHT: usize = 256;
/// Receive buffer for client datagrams: larger ones are cut by the kernel and then fail to parse.
const UDP_QUERY_BUF: usize = 4096;
/// Payload size we advertise in EDNS and the most we send over UDP (RFC 9715 / DNS flag day 2020).
const EDNS_PAYLOAD: u16 = 1232;
/// Plain DNS over UDP without EDNS is limited to 512 bytes (RFC 1035 4.2.1).
const CLASSIC_UDP_LIMIT: usize = 512;

/// Configuration of the embedded DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Address to serve on; UDP and TCP are bound on the same address and port. Port 0 picks a
    /// free port usable for both.
    pub listen: SocketAddr,
    /// Resolvers for names outside the instance names, tried in order; empty means REFUSED.
    pub upstream: Vec<SocketAddr>,
    /// TTL of the A records served ([`DEFAULT_TTL`] = 5 s).
    pub ttl: u32,
}

impl DnsConfig {
    /// Configuration with no upstream and the default TTL.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            upstream: Vec::new(),
            ttl: DEFAULT_TTL,
        }
    }
}

/// A name that was bound to more than one IPv4 address; it is left out of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConflict {
    /// The name as the caller spelled it.
    pub name: String,
    /// The distinct addresses it was bound to, sorted.
    pub ips: Vec<Ipv4Addr>,
}

/// Errors of [`DnsServer::start`].
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A socket could not be bound (address in use, no permission for port 53, ...).
    #[error("cannot bind DNS {transport} socket on {addr}: {source}")]
    Bind {
        /// `"UDP"` or `"TCP"`.
        transport: &'static str,
        /// The address that was tried.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Counters since start, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Well-formed queries received (UDP and TCP).
    pub queries: u64,
    /// Queries answered from the table with at least one A record.
    pub answered: u64,
    /// Authoritative NXDOMAIN answers.
    pub nxdomain: u64,
    /// REFUSED answers (outside name without upstream, or non-IN class).
    pub refused: u64,
    /// Queries answered by an upstream resolver.
    pub forwarded: u64,
    /// Forwarded queries no upstream answered (client got SERVFAIL).
    pub upstream_failures: u64,
    /// Packets that did not parse as DNS messages, or were not queries.
    pub malformed: u64,
    /// TCP connections closed for an oversized frame length.
    pub tcp_oversized: u64,
    /// Work refused for load: TCP connections over the limit, forwards over the limit.
    pub overload: u64,
    /// Names skipped by `set_records` because they are not valid DNS names.
    pub invalid_names: u64,
}

#[derive(Default)]
struct Counters {
    queries: AtomicU64,
    answered: AtomicU64,
    nxdomain: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    upstream_failures: AtomicU64,
    malformed: AtomicU64,
    tcp_oversized: AtomicU64,
    overload: AtomicU64,
    invalid_names: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> DnsStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStats {
            queries: get(&self.queries),
            answered: get(&self.answered),
            nxdomain: get(&self.nxdomain),
            refused: get(&self.refused),
            forwarded: get(&self.forwarded),
            upstream_failures: get(&self.upstream_failures),
            malformed: get(&self.malformed),
            tcp_oversized: get(&self.tcp_oversized),
            overload: get(&self.overload),
            invalid_names: get(&self.invalid_names),
        }
    }
}

/// One immutable snapshot of the name table; replaced whole by `set_records`.
#[derive(Default)]
struct Table {
    /// Lower-cased FQDN -> addresses (exactly one distinct address per name after conflict checks,
    /// but kept as a list so the answer path does not care).
    records: HashMap<LowerName, Vec<Ipv4Addr>>,
    /// Proper ancestors (empty non-terminals) of the names in `records`, root excluded.
    ancestors: HashSet<LowerName>,
    /// Last labels of every given name, as single-label FQDNs: the "in zone" test.
    zone_labels: HashSet<LowerName>,
}

impl Table {
    fn in_zone(&self, name: &Name) -> bool {
        if name.is_root() {
            return false;
        }
        self.zone_labels.contains(&LowerName::new(&name.trim_to(1)))
    }
}

struct Shared {
    table: RwLock<Arc<Table>>,
    upstream: Vec<SocketAddr>,
    ttl: u32,
    counters: Counters,
}

impl Shared {
    /// Cheap snapshot: a reader holds the lock only for an `Arc` clone, so an update never waits
    /// for a slow query and a query never sees a mix of two tables.
    fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(guard) => Arc::clone(&guard),
            // A poisoned lock only means a writer panicked after or before the swap; the `Arc`
            // inside is always a complete table, so keep serving it.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn replace_table(&self, table: Table) {
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut guard) => *guard = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
    }
}

/// The running DNS server. Dropping it stops serving too; [`DnsServer::shutdown`] also waits
/// until the sockets are closed.
pub struct DnsServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    /// Dropping the sender is the shutdown signal: every task watches it.
    shutdown_tx: watch::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP and starts serving; returns once bound (so tests can query right away).
    pub async fn start(config: DnsConfig) -> Result<DnsServer, DnsError> {
        let (udp, tcp) = bind_pair(config.listen).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            transport: "UDP",
            addr: config.listen,
            source,
        })?;

        let upstream: Vec<SocketAddr> = config
            .upstream
            .iter()
            .copied()
            .filter(|u| {
                // Forwarding to ourselves would loop every outside query until it times out.
                // A wildcard listen address also answers on loopback.
                let own = u.port() == local_addr.port()
                    && (u.ip() == local_addr.ip()
                        || (local_addr.ip().is_unspecified() && u.ip().is_loopback()));
                if own {
                    warn!(upstream = %u, "DNS upstream is this server itself; ignored");
                }
                !own
            })
            .collect();

        let shared = Arc::new(Shared {
            table: RwLock::new(Arc::new(Table::default())),
            upstream,
            ttl: config.ttl,
            counters: Counters::default(),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(());

        let tasks = vec![
            tokio::spawn(udp_loop(Arc::new(udp), shared.clone(), shutdown_rx.clone())),
            tokio::spawn(tcp_loop(tcp, shared.clone(), shutdown_rx)),
        ];
        info!(addr = %local_addr, upstream = ?shared.upstream, "DNS server listening");
        Ok(DnsServer {
            shared,
            local_addr,
            shutdown_tx,
            tasks,
        })
    }

    /// The bound address (port 0 resolved); the same port serves UDP and TCP.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the whole name table atomically: name -> IPv4 addresses.
    ///
    /// Names are case-insensitive and fully qualified (a trailing dot is optional). Duplicate
    /// addresses for a name are merged. A name bound to two or more different addresses is left
    /// out (the rest of the table is still applied) and returned as a [`DnsConflict`] so the
    /// caller can raise a condition. Names with an empty address list are not served. Names that
    /// are not valid DNS names are skipped with a warning and counted in
    /// [`DnsStats::invalid_names`].
    pub fn set_records(
        &self,
        records: &BTreeMap<String, Vec<Ipv4Addr>>,
    ) -> Result<(), Vec<DnsConflict>> {
        // Group by lower-cased name first: "Foo" and "foo" are the same DNS name, so their
        // addresses must be checked together.
        let mut grouped: HashMap<LowerName, (String, Vec<Ipv4Addr>)> = HashMap::new();
        let mut zone_labels = HashSet::new();
        for (raw, ips) in records {
            let Some(name) = parse_fqdn(raw) else {
                bump(&self.shared.counters.invalid_names);
                warn!(name = %raw, "invalid DNS name skipped");
                continue;
            };
            zone_labels.insert(LowerName::new(&name.trim_to(1)));
            let entry = grouped
                .entry(LowerName::new(&name))
                .or_insert_with(|| (raw.clone(), Vec::new()));
            entry.1.extend(ips.iter().copied());
        }

        let mut table = Table {
            zone_labels,
            ..Table::default()
        };
        let mut conflicts = Vec::new();
        for (name, (raw, mut ips)) in grouped {
            ips.sort_unstable();
            ips.dedup();
            match ips.len() {
                0 => continue,
                1 => {}
                _ => {
                    warn!(name = %raw, ?ips, "DNS name bound to several addresses; not served");
                    conflicts.push(DnsConflict { name: raw, ips });
                    continue;
                }
            }
            let mut parent = name.base_name();
            while !parent.is_root() {
                let next = parent.base_name();
                table.ancestors.insert(parent);
                parent = next;
            }
            table.records.insert(name, ips);
        }

        debug!(
            names = table.records.len(),
            conflicts = conflicts.len(),
            "DNS table replaced"
        );
        self.shared.replace_table(table);

        if conflicts.is_empty() {
            Ok(())
        } else {
            // HashMap order is random; callers and tests want a stable list.
            conflicts.sort_by(|a, b| a.name.cmp(&b.name));
            Err(conflicts)
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> DnsStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting queries, closes the sockets and waits for the serving tasks to end.
    /// Queries still waiting for an upstream are dropped.
    pub async fn shutdown(self) {
        let DnsServer {
            shutdown_tx,
            tasks,
            local_addr,
            ..
        } = self;
        drop(shutdown_tx);
        for task in tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "DNS server task ended abnormally");
            }
        }
        info!(addr = %local_addr, "DNS server stopped");
    }
}

/// Binds UDP and TCP on the same port. With port 0 the UDP port is chosen by the OS and may be
/// taken for TCP, so a few fresh ports are tried.
async fn bind_pair(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    const ATTEMPTS_FOR_PORT_ZERO: usize = 16;
    let attempts = if listen.port() == 0 {
        ATTEMPTS_FOR_PORT_ZERO
    } else {
        1
    };
    let mut last_error = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| DnsError::Bind {
                transport: "UDP",
                addr: listen,
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| DnsError::Bind {
            transport: "UDP",
            addr: listen,
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) => {
                last_error = Some(DnsError::Bind {
                    transport: "TCP",
                    addr: bound,
                    source,
                })
            }
        }
    }
    Err(last_error.unwrap_or_else(|| DnsError::Bind {
        transport: "TCP",
        addr: listen,
        source: io::Error::other("no bind attempt made"),
    }))
}

/// Parses a configured name as an FQDN; `None` for empty, root or malformed names.
fn parse_fqdn(raw: &str) -> Option<Name> {
    let trimmed = raw.trim();
    if trimmed.is_empty() || trimmed == "." {
        return None;
    }
    // from_ascii enforces the 63-octet label and 255-octet name limits.
    let mut name = Name::from_ascii(trimmed).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// What to do with one received packet.
enum Action {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Ask the upstream resolvers; the packet is known to be a well-formed query.
    Forward,
    /// Say nothing.
    Drop,
}

/// Decides the answer for one packet without any I/O. Over UDP the reply is limited to 512 bytes,
/// or to the query's EDNS payload size capped at [`EDNS_PAYLOAD`]; larger replies are truncated.
fn handle_packet(shared: &Shared, packet: &[u8], transport: Transport) -> Action {
    let request = match Message::from_vec(packet) {
        Ok(request) => request,
        Err(error) => {
            bump(&shared.counters.malformed);
            debug!(%error, len = packet.len(), "malformed DNS packet");
            return match raw_error_reply(packet, ResponseCode::FormErr) {
                Some(reply) => Action::Reply(reply),
                None => Action::Drop,
            };
        }
    };
    if request.metadata.message_type != MessageType::Query {
        // Never answer responses: that is how two servers end up in a loop.
        bump(&shared.counters.malformed);
        return Action::Drop;
    }
    bump(&shared.counters.queries);

    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match &request.edns {
            Some(edns) => usize::from(edns.max_payload().clamp(512, EDNS_PAYLOAD)),
            None => CLASSIC_UDP_LIMIT,
        },
    };

    match answer(shared, &request) {
        Some(response) => match encode(&response, limit) {
            Some(bytes) => Action::Reply(bytes),
            None => {
                raw_error_reply(packet, ResponseCode::ServFail).map_or(Action::Drop, Action::Reply)
            }
        },
        None => Action::Forward,
    }
}

/// The local answer to a parsed query, or `None` if it must be forwarded.
fn answer(shared: &Shared, request: &Message) -> Option<Message> {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    // We do forward (a kind of recursion) only when an upstream is configured.
    response.metadata.recursion_available = !shared.upstream.is_empty();
    if request.edns.is_some() {
        // RFC 6891 6.1.1: a query with OPT gets a response with OPT.
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }

    if request.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return Some(response);
    }
    let [query] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return Some(response);
    };
    // Echo the question exactly as asked: resolvers using 0x20 case randomisation compare it.
    response.add_query(query.clone());

    if query.query_class() != DNSClass::IN {
        bump(&shared.counters.refused);
        response.metadata.response_code = ResponseCode::Refused;
        return Some(response);
    }

    let table = shared.table();
    let qname = LowerName::new(query.name());
    if let Some(ips) = table.records.get(&qname) {
        response.metadata.authoritative = true;
        if matches!(query.query_type(), RecordType::A | RecordType::ANY) {
            bump(&shared.counters.answered);
            for ip in ips {
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    shared.ttl,
                    RData::A(A(*ip)),
                ));
            }
        }
        return Some(response);
    }
    if table.ancestors.contains(&qname) {
        response.metadata.authoritative = true;
        return Some(response);
    }
    if table.in_zone(query.name()) {
        bump(&shared.counters.nxdomain);
        response.metadata.authoritative = true;
        response.metadata.response_code = ResponseCode::NXDomain;
        return Some(response);
    }
    if shared.upstream.is_empty() {
        bump(&shared.counters.refused);
        response.metadata.response_code = ResponseCode::Refused;
        return Some(response);
    }
    None
}

/// Serialises a response, truncating it (TC bit, question only) if it exceeds `limit`.
fn encode(response: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = match response.to_vec() {
        Ok(bytes) => bytes,
        Err(error) => {
            warn!(%error, "cannot encode DNS response");
            return None;
        }
    };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    match response.truncate().to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        Ok(_) => None,
        Err(error) => {
            warn!(%error, "cannot encode truncated DNS response");
            None
        }
    }
}

/// A bare 12-byte error header for a packet that cannot be (or was not) answered normally: same
/// ID, opcode and RD bit, no sections. `None` if the packet is too short to have an ID or is a
/// response (never answer those).
fn raw_error_reply(packet: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    const QR: u8 = 0x80;
    const OPCODE_MASK: u8 = 0x78;
    const RD: u8 = 0x01;
    if packet.len() < 12 || packet[2] & QR != 0 {
        return None;
    }
    let mut reply = vec![0u8; 12];
    reply[0] = packet[0];
    reply[1] = packet[1];
    reply[2] = QR | (packet[2] & (OPCODE_MASK | RD));
    reply[3] = code.low() & 0x0f;
    Some(reply)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

async fn udp_loop(socket: Arc<UdpSocket>, shared: Arc<Shared>, mut shutdown: watch::Receiver<()>) {
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS_IN_FLIGHT));
    // Dropped (and so aborted) when this loop ends: shutdown does not wait for slow upstreams.
    let mut in_flight = JoinSet::new();
    let mut buf = vec![0u8; UDP_QUERY_BUF];
    loop {
        let (len, src) = tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    // Transient (e.g. ICMP errors surfaced on the socket); back off a little so a
                    // persistent error cannot spin a core.
                    debug!(%error, "DNS UDP receive error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        while in_flight.try_join_next().is_some() {}
        let packet = &buf[..len];
        match handle_packet(&shared, packet, Transport::Udp) {
            Action::Reply(reply) => send_udp(&socket, &reply, src).await,
            Action::Drop => {}
            Action::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    bump(&shared.counters.overload);
                    if let Some(reply) = raw_error_reply(packet, ResponseCode::ServFail) {
                        send_udp(&socket, &reply, src).await;
                    }
                    continue;
                };
                let packet = packet.to_vec();
                let socket = socket.clone();
                let shared = shared.clone();
                in_flight.spawn(async move {
                    let reply = forward_or_servfail(&shared, &packet).await;
                    if let Some(reply) = reply {
                        send_udp(&socket, &reply, src).await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

async fn send_udp(socket: &UdpSocket, reply: &[u8], dst: SocketAddr) {
    if let Err(error) = socket.send_to(reply, dst).await {
        debug!(%error, %dst, "cannot send DNS UDP reply");
    }
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<()>) {
    // Connections are aborted with this set when the loop ends.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE or a connection reset before accept; do not spin on it.
                    debug!(%error, "DNS TCP accept error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_TCP_CONNECTIONS {
            bump(&shared.counters.overload);
            debug!(%peer, "too many DNS TCP connections; closing");
            continue;
        }
        connections.spawn(serve_tcp(stream, peer, shared.clone()));
    }
}

/// Serves one TCP connection: 2-byte length-prefixed messages (RFC 1035 4.2.2), answered in order.
async fn serve_tcp(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_TCP_QUERY_LEN];
    loop {
        let mut prefix = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, read_full(&stream, &mut prefix)).await {
            Ok(Ok(_)) => {}
            // EOF, reset or idle: all normal ways for a client to go away.
            Ok(Err(_)) | Err(_) => return,
        }
        let len = usize::from(u16::from_be_bytes(prefix));
        if len > MAX_TCP_QUERY_LEN {
            bump(&shared.counters.tcp_oversized);
            debug!(%peer, len, "oversized DNS TCP frame; closing");
            return;
        }
        let frame = &mut buf[..len];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, read_full(&stream, frame)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let reply = match handle_packet(&shared, frame, Transport::Tcp) {
            Action::Reply(reply) => Some(reply),
            Action::Drop => None,
            Action::Forward => forward_or_servfail(&shared, frame).await,
        };
        let Some(reply) = reply else { continue };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            continue;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&reply_len.to_be_bytes());
        out.extend_from_slice(&reply);
        if write_full(&stream, &out).await.is_err() {
            return;
        }
    }
}

// The readiness-based loops below stand in for tokio's `AsyncReadExt::read_exact` /
// `AsyncWriteExt::write_all`, which need tokio's `io-util` feature; this module keeps to the
// `net` feature.

/// Fills `buf` completely; `UnexpectedEof` if the peer closes first.
async fn read_full(stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        stream.readable().await?;
        match stream.try_read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf`.
async fn write_full(stream: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < buf.len() {
        stream.writable().await?;
        match stream.try_write(&buf[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards a well-formed query; the upstream's reply with the client's ID, or SERVFAIL.
async fn forward_or_servfail(shared: &Shared, packet: &[u8]) -> Option<Vec<u8>> {
    match forward(&shared.upstream, packet).await {
        Some(reply) => {
            bump(&shared.counters.forwarded);
            Some(reply)
        }
        None => {
            bump(&shared.counters.upstream_failures);
            raw_error_reply(packet, ResponseCode::ServFail)
        }
    }
}

/// Sends the client's query unchanged except for a fresh ID to each upstream in turn and returns
/// the first matching reply with the client's ID restored. The raw bytes are relayed (not
/// re-encoded) so EDNS options and unknown record types pass through untouched.
async fn forward(upstream: &[SocketAddr], packet: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    let question = request.queries.first()?.clone();
    let client_id = [*packet.first()?, *packet.get(1)?];
    for server in upstream {
        match forward_one(*server, packet, &question).await {
            Ok(mut reply) => {
                // `is_reply_to` checked the 12-byte header is there; `get_mut` keeps it panic-free
                // regardless.
                if let Some(header) = reply.get_mut(..4) {
                    header[0] = client_id[0];
                    header[1] = client_id[1];
                    // RA: to the client we are the recursive service, whatever upstream said.
                    header[3] |= 0x80;
                }
                return Some(reply);
            }
            Err(error) => debug!(%error, upstream = %server, "DNS upstream did not answer"),
        }
    }
    None
}

async fn forward_one(
    server: SocketAddr,
    packet: &[u8],
    question: &hickory_proto::op::Query,
) -> io::Result<Vec<u8>> {
    // Bind on loopback for a loopback upstream so forwarding never leaves the host needlessly.
    let bind_ip: IpAddr = match (server.ip(), server.ip().is_loopback()) {
        (IpAddr::V4(_), true) => Ipv4Addr::LOCALHOST.into(),
        (IpAddr::V4(_), false) => Ipv4Addr::UNSPECIFIED.into(),
        (IpAddr::V6(_), true) => Ipv6Addr::LOCALHOST.into(),
        (IpAddr::V6(_), false) => Ipv6Addr::UNSPECIFIED.into(),
    };
    // A fresh socket per query gives a random source port, and `connect` makes the kernel drop
    // datagrams from anyone but the upstream: both against spoofed answers.
    let socket = UdpSocket::bind(SocketAddr::new(bind_ip, 0)).await?;
    socket.connect(server).await?;
    let id = random_id();
    let mut out = packet.to_vec();
    if let Some(header_id) = out.get_mut(..2) {
        header_id.copy_from_slice(&id);
    }
    socket.send(&out).await?;

    let mut buf = vec![0u8; usize::from(u16::MAX)];
    let wait = async {
        loop {
            let len = socket.recv(&mut buf).await?;
            let reply = &buf[..len];
            if is_reply_to(reply, id, question) {
                return Ok(reply.to_vec());
            }
            debug!(upstream = %server, "unrelated datagram from DNS upstream ignored");
        }
    };
    match tokio::time::timeout(UPSTREAM_TIMEOUT, wait).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "upstream timeout")),
    }
}

fn is_reply_to(reply: &[u8], id: [u8; 2], question: &hickory_proto::op::Query) -> bool {
    if reply.len() < 12 || reply[0..2] != id {
        return false;
    }
    let Ok(message) = Message::from_vec(reply) else {
        return false;
    };
    message.metadata.message_type == MessageType::Response
        && message.queries.first().is_some_and(|q| {
            LowerName::new(q.name()) == LowerName::new(question.name())
                && q.query_type() == question.query_type()
                && q.query_class() == question.query_class()
        })
}

/// An unpredictable 16-bit ID without a `rand` dependency: std's `RandomState` is seeded from OS
/// randomness and every instance gets different keys.
fn random_id() -> [u8; 2] {
    let value = RandomState::new().hash_one(std::time::Instant::now());
    let bytes = value.to_le_bytes();
    [bytes[0], bytes[1]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use std::str::FromStr;

    const T: Duration = Duration::from_secs(3);

    fn localhost() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    async fn server(upstream: Vec<SocketAddr>) -> DnsServer {
        let mut config = DnsConfig::new(localhost());
        config.upstream = upstream;
        DnsServer::start(config).await.unwrap()
    }

    fn table(entries: &[(&str, &[Ipv4Addr])]) -> BTreeMap<String, Vec<Ipv4Addr>> {
        entries
            .iter()
            .map(|(n, ips)| (n.to_string(), ips.to_vec()))
            .collect()
    }

    fn query_bytes(name: &str, rtype: RecordType) -> (u16, Vec<u8>) {
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
        (msg.metadata.id, msg.to_vec().unwrap())
    }

    async fn udp(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
        let (id, bytes) = query_bytes(name, rtype);
        let sock = UdpSocket::bind(localhost()).await.unwrap();
        sock.send_to(&bytes, addr).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
            .await
            .expect("udp answer in time")
            .unwrap();
        let msg = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(msg.metadata.id, id);
        msg
    }

    async fn tcp(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
        let (id, bytes) = query_bytes(name, rtype);
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        write_full(&stream, &framed).await.unwrap();
        let mut prefix = [0u8; 2];
        tokio::time::timeout(T, read_full(&stream, &mut prefix))
            .await
            .expect("tcp answer in time")
            .unwrap();
        let mut body = vec![0u8; u16::from_be_bytes(prefix) as usize];
        read_full(&stream, &mut body).await.unwrap();
        let msg = Message::from_vec(&body).unwrap();
        assert_eq!(msg.metadata.id, id);
        msg
    }

    fn a_records(msg: &Message) -> Vec<Ipv4Addr> {
        msg.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    const IP0: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
    const IP1: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 3);
    const IP2: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 4);

    fn instance_table() -> BTreeMap<String, Vec<Ipv4Addr>> {
        table(&[
            ("myhostname", &[IP0]),
            ("0.subject.item", &[IP0]),
            ("0.subject.item.network", &[IP0]),
            ("subject.item", &[IP0]),
            ("subject.item.network.", &[IP0]),
            ("1.subject.item", &[IP1]),
            ("1.subject.item.network", &[IP1]),
        ])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_every_name_form_over_udp_and_tcp() {
        let srv = server(vec![]).await;
        srv.set_records(&instance_table()).unwrap();
        let addr = srv.local_addr();
        let cases = [
            ("myhostname.", IP0),
            ("MyHostName.", IP0),
            ("0.subject.item.", IP0),
            ("0.subject.item.network.", IP0),
            ("0.SUBJECT.Item.NetWork.", IP0),
            ("subject.item.", IP0),
            ("Subject.Item.", IP0),
            ("subject.item.network.", IP0),
            ("1.subject.item.", IP1),
            ("1.subject.ITEM.network.", IP1),
        ];
        for (name, ip) in cases {
            for msg in [
                udp(addr, name, RecordType::A).await,
                tcp(addr, name, RecordType::A).await,
            ] {
                assert_eq!(msg.metadata.response_code, ResponseCode::NoError, "{name}");
                assert!(msg.metadata.authoritative, "{name}");
                assert_eq!(a_records(&msg), vec![ip], "{name}");
                // The question comes back exactly as asked (0x20 case randomisation).
                assert!(
                    msg.queries[0]
                        .name()
                        .eq_case(&Name::from_str(name).unwrap())
                );
                assert_eq!(msg.answers[0].ttl, DEFAULT_TTL);
            }
        }
        // Known name, other type: NODATA.
        let msg = udp(addr, "subject.item.", RecordType::AAAA).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.answers.is_empty());
        // Empty non-terminal: NODATA, not NXDOMAIN.
        let msg = tcp(addr, "item.network.", RecordType::A).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.metadata.authoritative && msg.answers.is_empty());
        srv.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nxdomain_in_zone_refused_outside_and_forwarded_with_upstream() {
        let srv = server(vec![]).await;
        srv.set_records(&instance_table()).unwrap();
        let addr = srv.local_addr();
        for name in ["7.subject.item.network.", "other.item.", "x.myhostname."] {
            let msg = udp(addr, name, RecordType::A).await;
            assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(msg.metadata.authoritative);
        }
        let msg = tcp(addr, "2.subject.item.", RecordType::A).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
        for name in ["example.com.", "."] {
            let msg = udp(addr, name, RecordType::A).await;
            assert_eq!(msg.metadata.response_code, ResponseCode::Refused, "{name}");
        }

        // Upstream = a second instance of this server; the first upstream is a closed port.
        let upstream = server(vec![]).await;
        upstream
            .set_records(&table(&[("www.example.com", &[IP2])]))
            .unwrap();
        let closed = UdpSocket::bind(localhost())
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let front = server(vec![closed, upstream.local_addr()]).await;
        front.set_records(&instance_table()).unwrap();
        for msg in [
            udp(front.local_addr(), "WWW.example.com.", RecordType::A).await,
            tcp(front.local_addr(), "www.example.com.", RecordType::A).await,
        ] {
            assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
            assert_eq!(a_records(&msg), vec![IP2]);
            assert!(msg.metadata.recursion_available);
        }
        // Upstream's own verdicts are relayed too; local names are still answered locally.
        let msg = udp(front.local_addr(), "nope.com.", RecordType::A).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
        let msg = udp(front.local_addr(), "myhostname.", RecordType::A).await;
        assert_eq!(a_records(&msg), vec![IP0]);
        let stats = front.stats();
        assert_eq!(stats.forwarded, 3);
        assert_eq!(stats.upstream_failures, 0);

        // No upstream answers at all: SERVFAIL.
        let dead = server(vec![closed]).await;
        let msg = udp(dead.local_addr(), "www.example.com.", RecordType::A).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);

        for s in [srv, upstream, front, dead] {
            s.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn updates_apply_at_once_and_never_fail_queries_in_flight() {
        let srv = server(vec![]).await;
        let addr = srv.local_addr();
        srv.set_records(&table(&[("svc.item", &[IP0])])).unwrap();
        assert_eq!(
            a_records(&udp(addr, "svc.item.", RecordType::A).await),
            [IP0]
        );
        srv.set_records(&table(&[("svc.item", &[IP1])])).unwrap();
        assert_eq!(
            a_records(&udp(addr, "svc.item.", RecordType::A).await),
            [IP1]
        );
        assert_eq!(
            a_records(&tcp(addr, "svc.item.", RecordType::A).await),
            [IP1]
        );

        let queries = tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..200 {
                let msg = if i % 2 == 0 {
                    udp(addr, "svc.item.", RecordType::A).await
                } else {
                    tcp(addr, "svc.item.", RecordType::A).await
                };
                assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
                seen.extend(a_records(&msg));
            }
            seen
        });
        for i in 0..50 {
            let ip = if i % 2 == 0 { IP0 } else { IP1 };
            // Extra names make each swap a real table rebuild.
            let mut t = instance_table();
            t.insert("svc.item".into(), vec![ip]);
            srv.set_records(&t).unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let seen = queries.await.unwrap();
        assert_eq!(seen.len(), 200, "every query answered with one address");
        assert!(seen.iter().all(|ip| *ip == IP0 || *ip == IP1));
        srv.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conflicting_name_is_reported_and_others_still_served() {
        let srv = server(vec![]).await;
        let addr = srv.local_addr();
        let records = table(&[
            ("a.item", &[IP0, IP1]),
            ("b.item", &[IP2, IP2]),
            ("C.item", &[IP0]),
            ("c.item.", &[IP1]),
        ]);
        let conflicts = srv.set_records(&records).unwrap_err();
        assert_eq!(
            conflicts,
            vec![
                DnsConflict {
                    name: "C.item".into(),
                    ips: vec![IP0, IP1]
                },
                DnsConflict {
                    name: "a.item".into(),
                    ips: vec![IP0, IP1]
                },
            ]
        );
        assert_eq!(a_records(&udp(addr, "b.item.", RecordType::A).await), [IP2]);
        // The conflicting names are left out but stay in zone: NXDOMAIN, not forwarded.
        let msg = udp(addr, "a.item.", RecordType::A).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
        srv.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_is_counted_and_server_keeps_serving() {
        let srv = server(vec![]).await;
        let addr = srv.local_addr();
        srv.set_records(&instance_table()).unwrap();
        let sock = UdpSocket::bind(localhost()).await.unwrap();
        let mut buf = [0u8; 512];

        // Too short to carry an ID: silently dropped.
        sock.send_to(b"\x01\x02\x03", addr).await.unwrap();
        // Header says one question, body is junk: FORMERR with the same ID.
        let mut junk = vec![0xAB, 0xCD, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 40]);
        sock.send_to(&junk, addr).await.unwrap();
        let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 12);
        assert_eq!(&buf[..2], &[0xAB, 0xCD]);
        assert_eq!(buf[2] & 0x80, 0x80, "QR set");
        assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
        // A junk "response" (QR set) gets nothing back.
        let mut junk_response = junk.clone();
        junk_response[2] |= 0x80;
        sock.send_to(&junk_response, addr).await.unwrap();

        // Oversized TCP frame: connection closed, nothing else affected.
        let stream = TcpStream::connect(addr).await.unwrap();
        write_full(&stream, &[0xff, 0xff, 0, 0]).await.unwrap();
        let mut one = [0u8; 1];
        let closed = tokio::time::timeout(T, read_full(&stream, &mut one)).await;
        assert!(matches!(closed, Ok(Err(_))), "server closed the connection");

        let msg = udp(addr, "myhostname.", RecordType::A).await;
        assert_eq!(a_records(&msg), [IP0]);
        let msg = tcp(addr, "myhostname.", RecordType::A).await;
        assert_eq!(a_records(&msg), [IP0]);
        // Nothing else arrived on the junk socket (the QR-set packet was not answered).
        assert!(
            tokio::time::timeout(Duration::from_millis(100), sock.recv_from(&mut buf))
                .await
                .is_err()
        );
        let stats = srv.stats();
        assert_eq!(stats.malformed, 3);
        assert_eq!(stats.tcp_oversized, 1);
        srv.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_names_are_skipped_and_edns_is_honoured() {
        let srv = server(vec![]).await;
        let addr = srv.local_addr();
        let long = "x".repeat(64);
        srv.set_records(&table(&[
            ("", &[IP0]),
            (long.as_str(), &[IP0]),
            ("ok.item", &[IP1]),
        ]))
        .unwrap();
        assert_eq!(srv.stats().invalid_names, 2);

        let mut msg = Message::query();
        msg.add_query(Query::query(
            Name::from_str("ok.item.").unwrap(),
            RecordType::A,
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        msg.set_edns(edns);
        let sock = UdpSocket::bind(localhost()).await.unwrap();
        sock.send_to(&msg.to_vec().unwrap(), addr).await.unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(a_records(&reply), [IP1]);
        assert_eq!(
            reply.edns.as_ref().map(|e| e.max_payload()),
            Some(EDNS_PAYLOAD)
        );
        srv.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_releases_the_port_for_a_restart() {
        let srv = server(vec![]).await;
        let addr = srv.local_addr();
        srv.shutdown().await;
        let again = DnsServer::start(DnsConfig::new(addr)).await.unwrap();
        assert_eq!(again.local_addr(), addr);
        again
            .set_records(&table(&[("myhostname", &[IP0])]))
            .unwrap();
        assert_eq!(
            a_records(&tcp(addr, "myhostname.", RecordType::A).await),
            [IP0]
        );
        // Binding an address in use is an error, not a panic.
        let busy = DnsServer::start(DnsConfig::new(addr)).await;
        assert!(matches!(busy, Err(DnsError::Bind { .. })));
        again.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_answers_are_truncated_over_udp_only() {
        let srv = server(vec![]).await;
        let addr = srv.local_addr();
        // Not reachable through set_records (which rejects multi-address names); built directly
        // to exercise the UDP size limit.
        let ips: Vec<Ipv4Addr> = (0..60).map(|i| Ipv4Addr::new(172, 17, 1, i)).collect();
        let mut t = Table::default();
        t.records
            .insert(LowerName::new(&Name::from_str("big.item.").unwrap()), ips);
        srv.shared.replace_table(t);
        let msg = udp(addr, "big.item.", RecordType::A).await;
        assert!(msg.metadata.truncation);
        assert!(msg.answers.is_empty());
        let msg = tcp(addr, "big.item.", RecordType::A).await;
        assert!(!msg.metadata.truncation);
        assert_eq!(msg.answers.len(), 60);
        srv.shutdown().await;
    }
}
