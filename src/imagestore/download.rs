//! Resumable, streaming download of one update-item blob to a local file.
//!
//! [`download`] fetches `http://`, `https://` or `file://` URLs into `dest`:
//!
//! * **Resume.** If `dest` already holds `N` bytes (a partial left by an earlier, interrupted
//!   run), the request carries `Range: bytes=N-`. A `206 Partial Content` whose `Content-Range`
//!   starts at `N` is appended; a `200 OK` (server ignores ranges) truncates the file and starts
//!   over; a `416 Range Not Satisfiable` counts as "already complete" when `N` equals
//!   [`DownloadOptions::expected_size`] (or, without one, the total the server reports in
//!   `Content-Range: bytes */TOTAL`); any other status is [`DownloadError::Status`]. A partial that
//!   is already larger than `expected_size` is discarded before the request.
//! * **Redirects.** Up to [`MAX_REDIRECTS`] redirects (301, 302, 303, 307, 308) are followed,
//!   including relative `Location`s; each hop is a new connection and always a `GET` (with the
//!   same `Range`). Redirects to anything but `http`/`https` are refused.
//! * **Constant memory.** The body is written chunk by chunk as it arrives (no buffering of the
//!   whole body); the file is flushed and `fsync`ed before success is reported.
//! * **Limits.** The connection set-up (TCP + TLS + HTTP handshake) must finish within
//!   `connect_timeout`; after that, every wait for the response head and for each body chunk is
//!   bounded by `idle_timeout`. With `expected_size`, a larger announced size is refused before a
//!   byte is written and a body that streams past it is stopped before the chunk that would cross
//!   the limit is written, so the file never grows beyond `expected_size`.
//! * **Progress.** The callback receives [`Progress::Started`] once the final response is
//!   accepted, [`Progress::Progress`] whenever `progress_interval` has passed since the previous
//!   report (measured with `tokio::time`, so paused-time tests work) and [`Progress::Finished`]
//!   after the fsync.
//!
//! # Cancellation
//! The returned future may be dropped at any `.await`. The file is then always a *prefix* of the
//! resource (never a mix of two responses, never past `expected_size`), which the next call
//! resumes from. `tokio::fs` performs writes on a blocking thread, so one chunk that was already
//! handed over may still land after the drop; the file is opened without `O_APPEND` and written
//! at explicit positions, so such a late write stores the right bytes at the right offset. Only
//! the final success includes an fsync: a partial may lose its tail on power loss, which is
//! harmless because the file stays a prefix and the caller verifies the digest afterwards.
//! When [`download`] *returns* an error (rather than being dropped), pending writes have been
//! completed first, so the partial on disk is final and can be resumed at once.
//!
//! There is no retry inside: a broken connection is [`DownloadError::Http`] (or
//! [`DownloadError::Timeout`]) and the caller decides when to call again, which resumes.
//!
//! Nothing here checks content: the caller verifies the digest (see `verify_ref`), and a file of
//! exactly `expected_size` bytes is only "complete", not "correct".
//!
//! URLs in errors have their query string removed (pre-signed URLs carry credentials there).
//!
//! Percent-escapes in `file://` URLs are decoded; `?` and `#` are part of the path there. Only
//! `file:///path` and `file://localhost/path` are accepted.

use std::fmt;
use std::io;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;

/// Most redirects followed for one download.
pub const MAX_REDIRECTS: usize = 5;
/// Size of one read when copying a `file://` source.
const FILE_CHUNK: usize = 64 * 1024;
/// `User-Agent` sent with every request.
const USER_AGENT: &str = concat!("aos-cm/", env!("CARGO_PKG_VERSION"));

/// How a download is done.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// TLS client configuration for `https://` URLs (the unit's own trust anchors and client
    /// certificate). Without it, `https://` fails with [`DownloadError::Tls`].
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Exact size of the blob, if known (the cloud's `size`). Used to refuse larger bodies, to
    /// recognise a complete file on `416`, and to detect a short body.
    pub expected_size: Option<u64>,
    /// Limit for TCP connect + TLS handshake + HTTP handshake of each connection.
    pub connect_timeout: Duration,
    /// Longest wait for the response head or for the next body chunk.
    pub idle_timeout: Duration,
    /// Smallest time between two [`Progress::Progress`] reports (`ZERO`: after every chunk).
    pub progress_interval: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            tls: None,
            expected_size: None,
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            progress_interval: Duration::from_secs(30),
        }
    }
}

/// A progress report; the caller turns these into `downloadProgressAlert`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The transfer starts; `resumed_from` bytes were already on disk and are kept.
    Started {
        /// Bytes kept from an earlier partial (0 for a fresh or restarted download).
        resumed_from: u64,
        /// Full size of the resource, if the source told it.
        total: Option<u64>,
    },
    /// Periodic report.
    Progress {
        /// Bytes in the file so far (including the resumed part).
        downloaded: u64,
        /// Full size of the resource, if known.
        total: Option<u64>,
    },
    /// The file is complete and synced to disk.
    Finished {
        /// Final size of the file.
        size: u64,
    },
}

/// What a successful download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadOutcome {
    /// Final size of `dest`.
    pub size: u64,
    /// Bytes kept from an earlier partial.
    pub resumed_from: u64,
    /// A partial existed but had to be discarded (server ignored `Range`, or the partial was
    /// larger than the expected size or than the `file://` source).
    pub restarted: bool,
    /// Nothing was transferred: the partial was already the complete file.
    pub already_complete: bool,
    /// URL the content finally came from (after redirects; query string kept).
    pub final_url: String,
}

/// Which wait timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutStage {
    /// TCP connect, TLS handshake or HTTP handshake.
    Connect,
    /// Waiting for the response head.
    Response,
    /// Waiting for the next body chunk.
    Body,
}

impl fmt::Display for TimeoutStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connecting",
            Self::Response => "waiting for the response",
            Self::Body => "waiting for body data",
        })
    }
}

/// Why a download failed. URLs have their query string removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// The URL (or a redirect target) is malformed or of an unsupported kind.
    #[error("invalid or unsupported URL {url:?}: {reason}")]
    Url {
        /// The offending URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TCP connection could not be established.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// TLS could not be set up (handshake failure, bad certificate, no TLS configuration).
    #[error("TLS with {host} failed: {source}")]
    Tls {
        /// Server name.
        host: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange broke (connection lost, body cut short, protocol error).
    #[error("HTTP exchange with {url} failed: {source}")]
    Http {
        /// Request URL.
        url: String,
        /// Underlying error.
        #[source]
        source: hyper::Error,
    },
    /// The server answered with a status this download cannot use.
    #[error("unexpected HTTP status {code} from {url}")]
    Status {
        /// HTTP status code.
        code: u16,
        /// Request URL.
        url: String,
    },
    /// The response was malformed (bad `Content-Range`, redirect without `Location`, ...).
    #[error("bad response from {url}: {reason}")]
    BadResponse {
        /// Request URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a local file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A wait exceeded its limit.
    #[error("timed out after {after:?} {stage} ({url})")]
    Timeout {
        /// Which wait.
        stage: TimeoutStage,
        /// Request URL.
        url: String,
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The source has (or sends) more bytes than `expected_size`.
    #[error("{url} delivers more than the expected {expected} bytes")]
    TooLarge {
        /// Source URL.
        url: String,
        /// The expected size.
        expected: u64,
    },
    /// The source ended before `expected_size` (or its announced size) was reached.
    #[error("{url} ended after {got} of {expected} bytes")]
    Incomplete {
        /// Source URL.
        url: String,
        /// Bytes in the file.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("more than {max} redirects, last at {url}")]
    Redirects {
        /// The last redirecting URL.
        url: String,
        /// The limit.
        max: usize,
    },
}

/// Downloads `url` into `dest`, resuming a partial `dest` when possible. See the module docs for
/// resume, redirect, timeout, progress and cancellation behaviour.
///
/// # Errors
/// See [`DownloadError`]. On error the partial file is left in place for a later resume.
pub async fn download(
    url: &str,
    dest: &Path,
    opts: &DownloadOptions,
    mut progress: impl FnMut(Progress),
) -> Result<DownloadOutcome, DownloadError> {
    if let Some(rest) = url.strip_prefix("file://") {
        let src = file_url_path(url, rest)?;
        download_file(url, &src, dest, opts, &mut progress).await
    } else {
        let uri = parse_http_uri(url)?;
        download_http(uri, dest, opts, &mut progress).await
    }
}

/// Removes the query string and fragment from a URL for error messages.
fn redact(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url[..end].to_owned()
}

fn url_error(url: &str, reason: impl Into<String>) -> DownloadError {
    DownloadError::Url {
        url: redact(url),
        reason: reason.into(),
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Path of a `file://` URL (`rest` is what follows `file://`).
fn file_url_path(url: &str, rest: &str) -> Result<PathBuf, DownloadError> {
    let path = if rest.starts_with('/') {
        rest
    } else if let Some(p) = rest.strip_prefix("localhost/") {
        // Keep the leading slash.
        &rest[rest.len() - p.len() - 1..]
    } else {
        return Err(url_error(url, "only local file:// URLs are supported"));
    };
    let decoded = percent_decode(path).ok_or_else(|| url_error(url, "bad percent-escape"))?;
    Ok(PathBuf::from(decoded))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_http_uri(url: &str) -> Result<Uri, DownloadError> {
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| url_error(url, e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(url_error(url, format!("unsupported scheme {other:?}"))),
        None => return Err(url_error(url, "not an absolute URL")),
    }
    match uri.authority() {
        None => return Err(url_error(url, "no host")),
        Some(a) if a.as_str().contains('@') => {
            return Err(url_error(url, "user information in URLs is not supported"));
        }
        Some(_) => {}
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(url_error(url, "no host"));
    }
    Ok(uri)
}

/// Resolves a `Location` header against the URL that answered with it (RFC 3986 §5.2, without
/// the corner cases an HTTP server has no reason to produce).
fn resolve_location(base: &Uri, location: &str) -> Result<Uri, DownloadError> {
    let location = location.split('#').next().unwrap_or_default();
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let (path, query) = match location.find('?') {
        Some(i) => location.split_at(i),
        None => (location, ""),
    };
    let absolute = if location.contains("://") {
        location.to_owned()
    } else if location.starts_with("//") {
        format!("{scheme}:{location}")
    } else if path.is_empty() {
        format!("{scheme}://{authority}{}{query}", base.path())
    } else if path.starts_with('/') {
        format!("{scheme}://{authority}{}{query}", remove_dot_segments(path))
    } else {
        let base_path = base.path();
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        let merged = format!("/{}{path}", dir.trim_start_matches('/'));
        format!(
            "{scheme}://{authority}{}{query}",
            remove_dot_segments(&merged)
        )
    };
    parse_http_uri(&absolute)
}

/// Removes `.` and `..` segments from an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." | ".." => {
                if segment == ".." {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`) → `(START, TOTAL)`;
/// `bytes */TOTAL` → `(None, TOTAL)`.
fn parse_content_range(value: &str) -> Option<(Option<u64>, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?.trim();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let start = match range.trim() {
        "*" => None,
        r => {
            let (start, end) = r.split_once('-')?;
            let start: u64 = start.trim().parse().ok()?;
            let end: u64 = end.trim().parse().ok()?;
            if end < start {
                return None;
            }
            Some(start)
        }
    };
    Some((start, total))
}

/// The destination file, positioned at its end, plus the progress bookkeeping.
struct Sink<'a> {
    file: File,
    path: &'a Path,
    /// Bytes in the file (= write position).
    len: u64,
    resumed_from: u64,
    restarted: bool,
    limit: Option<u64>,
    total: Option<u64>,
    interval: Duration,
    last_report: Instant,
}

impl<'a> Sink<'a> {
    /// Opens (creating if needed) `path` for resuming. A partial larger than `limit` is
    /// discarded.
    async fn open(path: &'a Path, opts: &DownloadOptions) -> Result<Self, DownloadError> {
        // No O_APPEND: writes go to explicit positions (see the module docs on cancellation).
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .await
            .map_err(io_error(path))?;
        let mut len = file.metadata().await.map_err(io_error(path))?.len();
        let mut restarted = false;
        if opts.expected_size.is_some_and(|limit| len > limit) {
            file.set_len(0).await.map_err(io_error(path))?;
            len = 0;
            restarted = true;
        }
        file.seek(SeekFrom::Start(len))
            .await
            .map_err(io_error(path))?;
        Ok(Self {
            file,
            path,
            len,
            resumed_from: len,
            restarted,
            limit: opts.expected_size,
            total: None,
            interval: opts.progress_interval,
            last_report: Instant::now(),
        })
    }

    /// Discards the partial and starts from byte 0.
    async fn restart(&mut self) -> Result<(), DownloadError> {
        if self.len > 0 {
            self.file.set_len(0).await.map_err(io_error(self.path))?;
            self.file
                .seek(SeekFrom::Start(0))
                .await
                .map_err(io_error(self.path))?;
            self.restarted = true;
        }
        self.len = 0;
        self.resumed_from = 0;
        Ok(())
    }

    /// Records the source's total size (refusing one beyond the limit) and reports the start.
    fn start(
        &mut self,
        total: Option<u64>,
        url: &str,
        progress: &mut impl FnMut(Progress),
    ) -> Result<(), DownloadError> {
        if let (Some(total), Some(limit)) = (total, self.limit)
            && total > limit
        {
            return Err(DownloadError::TooLarge {
                url: redact(url),
                expected: limit,
            });
        }
        self.total = total.or(self.limit);
        self.last_report = Instant::now();
        progress(Progress::Started {
            resumed_from: self.resumed_from,
            total: self.total,
        });
        Ok(())
    }

    async fn write(
        &mut self,
        chunk: &[u8],
        url: &str,
        progress: &mut impl FnMut(Progress),
    ) -> Result<(), DownloadError> {
        let new_len = self.len.saturating_add(chunk.len() as u64);
        if let Some(limit) = self.limit
            && new_len > limit
        {
            return Err(DownloadError::TooLarge {
                url: redact(url),
                expected: limit,
            });
        }
        self.file
            .write_all(chunk)
            .await
            .map_err(io_error(self.path))?;
        self.len = new_len;
        let now = Instant::now();
        if now.duration_since(self.last_report) >= self.interval {
            self.last_report = now;
            progress(Progress::Progress {
                downloaded: self.len,
                total: self.total,
            });
        }
        Ok(())
    }

    /// Waits for a write still in flight, so that the partial is complete on disk when the
    /// error is returned, and passes the error on.
    async fn settle(&mut self, error: DownloadError) -> DownloadError {
        // The original error matters more than a failure to flush.
        let _ = self.file.flush().await;
        error
    }

    /// Checks completeness, syncs the file and reports the end.
    async fn finish(
        mut self,
        url: &str,
        already_complete: bool,
        progress: &mut impl FnMut(Progress),
    ) -> Result<DownloadOutcome, DownloadError> {
        // `expected_size` is what the caller will verify against, so it wins over the source's
        // own idea of its size.
        if let Some(expected) = self.limit.or(self.total)
            && self.len != expected
        {
            return Err(DownloadError::Incomplete {
                url: redact(url),
                got: self.len,
                expected,
            });
        }
        self.file.flush().await.map_err(io_error(self.path))?;
        self.file.sync_all().await.map_err(io_error(self.path))?;
        progress(Progress::Finished { size: self.len });
        Ok(DownloadOutcome {
            size: self.len,
            resumed_from: self.resumed_from,
            restarted: self.restarted,
            already_complete,
            final_url: url.to_owned(),
        })
    }
}

async fn download_file(
    url: &str,
    src: &Path,
    dest: &Path,
    opts: &DownloadOptions,
    progress: &mut impl FnMut(Progress),
) -> Result<DownloadOutcome, DownloadError> {
    let mut input = File::open(src).await.map_err(io_error(src))?;
    let total = input.metadata().await.map_err(io_error(src))?.len();
    let mut sink = Sink::open(dest, opts).await?;
    if sink.len > total {
        sink.restart().await?;
    }
    let offset = sink.len;
    sink.start(Some(total), url, progress)?;
    if offset == total {
        return sink.finish(url, true, progress).await;
    }
    let copied = async {
        input
            .seek(SeekFrom::Start(offset))
            .await
            .map_err(io_error(src))?;
        let mut buf = vec![0u8; FILE_CHUNK];
        loop {
            let n = input.read(&mut buf).await.map_err(io_error(src))?;
            if n == 0 {
                return Ok(());
            }
            sink.write(&buf[..n], url, progress).await?;
        }
    }
    .await;
    match copied {
        Ok(()) => sink.finish(url, false, progress).await,
        Err(e) => Err(sink.settle(e).await),
    }
}

/// Any byte stream hyper can run over (plain TCP or TLS).
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Aborts the task driving a connection when the download (or its future) goes away.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a connection to the URL's host (TCP, then TLS for `https`) and does the HTTP/1.1
/// handshake, all within `connect_timeout`.
async fn connect(
    uri: &Uri,
    opts: &DownloadOptions,
) -> Result<(SendRequest<Empty<Bytes>>, AbortOnDrop), DownloadError> {
    let url = uri.to_string();
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default();
    // `Uri::host` keeps the brackets of an IPv6 literal.
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let setup = async {
        let tcp = TcpStream::connect((bare_host, port))
            .await
            .map_err(|source| DownloadError::Connect {
                addr: format!("{host}:{port}"),
                source,
            })?;
        // Only affects latency; failure is harmless.
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Conn> = if https {
            let tls_error = |source| DownloadError::Tls {
                host: bare_host.to_owned(),
                source,
            };
            let config = opts
                .tls
                .clone()
                .ok_or_else(|| tls_error(io::Error::other("no TLS client configuration given")))?;
            let name = ServerName::try_from(bare_host.to_owned())
                .map_err(|e| url_error(&url, format!("bad TLS server name: {e}")))?;
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(tls_error)?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|source| DownloadError::Http {
                url: redact(&url),
                source,
            })?;
        // Errors of the connection surface through the request / body, so the result of the
        // connection task itself carries nothing new.
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, AbortOnDrop(task)))
    };
    timeout(opts.connect_timeout, setup)
        .await
        .map_err(|_| DownloadError::Timeout {
            stage: TimeoutStage::Connect,
            url: redact(&url),
            after: opts.connect_timeout,
        })?
}

async fn download_http(
    uri: Uri,
    dest: &Path,
    opts: &DownloadOptions,
    progress: &mut impl FnMut(Progress),
) -> Result<DownloadOutcome, DownloadError> {
    let mut sink = Sink::open(dest, opts).await?;
    match fetch(uri, &mut sink, opts, progress).await {
        Ok((url, already_complete)) => sink.finish(&url, already_complete, progress).await,
        Err(e) => Err(sink.settle(e).await),
    }
}

/// Follows redirects to the final response and streams its body into `sink`. Returns the final
/// URL and whether the partial was complete already.
async fn fetch(
    mut uri: Uri,
    sink: &mut Sink<'_>,
    opts: &DownloadOptions,
    progress: &mut impl FnMut(Progress),
) -> Result<(String, bool), DownloadError> {
    let mut redirects = 0;
    loop {
        let url = uri.to_string();
        let (mut sender, _conn_guard) = connect(&uri, opts).await?;
        let offset = sink.len;
        let host_header = match uri.port() {
            Some(port) => format!("{}:{}", uri.host().unwrap_or_default(), port.as_str()),
            None => uri.host().unwrap_or_default().to_owned(),
        };
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, host_header)
            .header(header::USER_AGENT, USER_AGENT);
        if offset > 0 {
            request = request.header(header::RANGE, format!("bytes={offset}-"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| url_error(&url, e.to_string()))?;
        let response = timeout(opts.idle_timeout, sender.send_request(request))
            .await
            .map_err(|_| DownloadError::Timeout {
                stage: TimeoutStage::Response,
                url: redact(&url),
                after: opts.idle_timeout,
            })?
            .map_err(|source| DownloadError::Http {
                url: redact(&url),
                source,
            })?;
        let status = response.status();
        let bad = |reason: &str| DownloadError::BadResponse {
            url: redact(&url),
            reason: reason.to_owned(),
        };
        let content_range = || -> Result<(Option<u64>, Option<u64>), DownloadError> {
            response
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range)
                .ok_or_else(|| bad("missing or malformed Content-Range"))
        };
        match status {
            StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT => {
                if redirects == MAX_REDIRECTS {
                    return Err(DownloadError::Redirects {
                        url: redact(&url),
                        max: MAX_REDIRECTS,
                    });
                }
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| bad("redirect without a usable Location"))?;
                uri = resolve_location(&uri, location)?;
                redirects += 1;
                continue;
            }
            StatusCode::OK => {
                // The server ignored (or we did not send) a Range: the body is the whole resource.
                sink.restart().await?;
                let total = response
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                sink.start(total, &url, progress)?;
            }
            StatusCode::PARTIAL_CONTENT => {
                let (start, total) = content_range()?;
                if start != Some(offset) {
                    return Err(bad(&format!(
                        "Content-Range does not start at the requested offset {offset}"
                    )));
                }
                sink.start(total, &url, progress)?;
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                let remote_total = content_range().ok().and_then(|(_, total)| total);
                let complete = match opts.expected_size {
                    Some(expected) => expected == offset,
                    None => remote_total == Some(offset),
                };
                if !complete {
                    return Err(DownloadError::Status {
                        code: status.as_u16(),
                        url: redact(&url),
                    });
                }
                sink.start(Some(offset), &url, progress)?;
                return Ok((url, true));
            }
            _ => {
                return Err(DownloadError::Status {
                    code: status.as_u16(),
                    url: redact(&url),
                });
            }
        }

        let mut body = response.into_body();
        loop {
            let frame = timeout(opts.idle_timeout, body.frame())
                .await
                .map_err(|_| DownloadError::Timeout {
                    stage: TimeoutStage::Body,
                    url: redact(&url),
                    after: opts.idle_timeout,
                })?;
            match frame {
                None => break,
                Some(Err(source)) => {
                    return Err(DownloadError::Http {
                        url: redact(&url),
                        source,
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        sink.write(&data, &url, progress).await?;
                    }
                }
            }
        }
        return Ok((url, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use hyper::Response;
    use hyper::body::{Body, Frame, Incoming};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, watch};

    /// Body chunk size of the test server.
    const CHUNK: usize = 1000;
    const LEN: usize = 10_000;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// How the test server misbehaves. `cut_after` and `stall_after` apply to the next `/data`
    /// response only.
    #[derive(Default)]
    struct Behaviour {
        ignore_range: bool,
        /// Send this many body bytes, then break the connection once the gate is opened (hyper
        /// drops unsent output when a body fails, so the client must have the bytes first).
        cut_after: Option<(usize, Arc<tokio::sync::Notify>)>,
        /// Send this many body bytes, then send nothing more until the client goes away.
        stall_after: Option<usize>,
        /// No `Content-Length` (chunked encoding).
        chunked: bool,
        /// `tokio::time` pause before every chunk but the first.
        chunk_delay: Duration,
    }

    struct TestBody(mpsc::Receiver<Result<Bytes, io::Error>>);

    impl Body for TestBody {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
        }
    }

    fn empty_body() -> TestBody {
        let (_, rx) = mpsc::channel(1);
        TestBody(rx)
    }

    struct Shared {
        data: Vec<u8>,
        addr: SocketAddr,
        scheme: &'static str,
        behaviour: Mutex<Behaviour>,
        /// `(path, Range header)` of every request, in order.
        seen: Mutex<Vec<(String, Option<String>)>>,
    }

    struct Server {
        shared: Arc<Shared>,
        _task: AbortOnDrop,
    }

    impl Server {
        async fn start(data: Vec<u8>, behaviour: Behaviour) -> Self {
            Self::start_with(data, behaviour, None).await
        }

        async fn start_with(
            data: Vec<u8>,
            behaviour: Behaviour,
            tls: Option<tokio_rustls::TlsAcceptor>,
        ) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let shared = Arc::new(Shared {
                data,
                addr: listener.local_addr().unwrap(),
                scheme: if tls.is_some() { "https" } else { "http" },
                behaviour: Mutex::new(behaviour),
                seen: Mutex::new(Vec::new()),
            });
            let accept_shared = shared.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let shared = accept_shared.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(handle(&shared, req)) }
                        });
                        let builder = hyper::server::conn::http1::Builder::new();
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    let _ = builder
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await;
                                }
                            }
                            None => {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    });
                }
            });
            Self {
                shared,
                _task: AbortOnDrop(task),
            }
        }

        fn url(&self, path: &str) -> String {
            format!("{}://{}{path}", self.shared.scheme, self.shared.addr)
        }

        fn behaviour(&self) -> std::sync::MutexGuard<'_, Behaviour> {
            self.shared.behaviour.lock().unwrap()
        }

        /// Range headers of the requests for `/data`.
        fn ranges(&self) -> Vec<Option<String>> {
            self.shared
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(path, _)| path == "/data")
                .map(|(_, range)| range.clone())
                .collect()
        }

        fn paths(&self) -> Vec<String> {
            let seen = self.shared.seen.lock().unwrap();
            seen.iter().map(|(path, _)| path.clone()).collect()
        }
    }

    fn redirect(code: u16, location: &str) -> Response<TestBody> {
        Response::builder()
            .status(code)
            .header(header::LOCATION, location)
            .body(empty_body())
            .unwrap()
    }

    fn handle(shared: &Shared, req: Request<Incoming>) -> Response<TestBody> {
        let path = req.uri().path().to_owned();
        let range = req
            .headers()
            .get(header::RANGE)
            .map(|v| v.to_str().unwrap().to_owned());
        shared
            .seen
            .lock()
            .unwrap()
            .push((path.clone(), range.clone()));
        if let Some(n) = path.strip_prefix("/r/") {
            // Chain of relative redirects: /r/N -> /r/N-1 -> ... -> /r/0 -> /data.
            let n: u32 = n.parse().unwrap();
            return match n {
                0 => redirect(302, "/data"),
                n if n % 2 == 1 => redirect(307, &(n - 1).to_string()),
                n => redirect(301, &format!("./{}", n - 1)),
            };
        }
        match path.as_str() {
            "/data" => {}
            "/abs" => {
                return redirect(308, &format!("http://{}/r/1?x=1", shared.addr));
            }
            "/loop" => return redirect(303, "/loop"),
            _ => {
                return Response::builder().status(404).body(empty_body()).unwrap();
            }
        }

        let mut b = shared.behaviour.lock().unwrap();
        let len = shared.data.len();
        let start = match &range {
            Some(r) if !b.ignore_range => {
                let n = r.strip_prefix("bytes=").unwrap().strip_suffix('-').unwrap();
                Some(n.parse::<usize>().unwrap())
            }
            _ => None,
        };
        if start.is_some_and(|s| s >= len) {
            return Response::builder()
                .status(416)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(empty_body())
                .unwrap();
        }
        let mut resp = Response::builder();
        if let Some(s) = start {
            resp = resp.status(206).header(
                header::CONTENT_RANGE,
                format!("bytes {s}-{}/{len}", len - 1),
            );
        }
        let start = start.unwrap_or(0);
        if !b.chunked {
            resp = resp.header(header::CONTENT_LENGTH, len - start);
        }
        let body = shared.data[start..].to_vec();
        let (cut, gate) = b.cut_after.take().unzip();
        let stall = b.stall_after.take();
        let delay = b.chunk_delay;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent = 0;
            for (i, chunk) in body.chunks(CHUNK).enumerate() {
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let limit = cut.or(stall).unwrap_or(usize::MAX);
                let take = chunk.len().min(limit - sent);
                if take > 0
                    && tx
                        .send(Ok(Bytes::copy_from_slice(&chunk[..take])))
                        .await
                        .is_err()
                {
                    return;
                }
                sent += take;
                if sent == limit {
                    break;
                }
            }
            if let Some(gate) = gate {
                gate.notified().await;
                let _ = tx.send(Err(io::Error::other("cut"))).await;
            } else if stall.is_some() {
                tx.closed().await;
            }
        });
        resp.body(TestBody(rx)).unwrap()
    }

    fn opts() -> DownloadOptions {
        DownloadOptions {
            progress_interval: Duration::ZERO,
            ..DownloadOptions::default()
        }
    }

    async fn run(
        url: &str,
        dest: &Path,
        opts: &DownloadOptions,
    ) -> (Result<DownloadOutcome, DownloadError>, Vec<Progress>) {
        let mut events = Vec::new();
        let result = download(url, dest, opts, |p| events.push(p)).await;
        (result, events)
    }

    /// Started first, Finished last, Progress in between with growing counts.
    fn check_events(events: &[Progress], resumed_from: u64, total: Option<u64>, size: u64) {
        assert_eq!(
            events.first(),
            Some(&Progress::Started {
                resumed_from,
                total
            })
        );
        assert_eq!(events.last(), Some(&Progress::Finished { size }));
        let mut last = resumed_from;
        for e in &events[1..events.len() - 1] {
            match *e {
                Progress::Progress {
                    downloaded,
                    total: t,
                } => {
                    assert!(downloaded > last, "{events:?}");
                    assert!(downloaded <= size);
                    assert_eq!(t, total);
                    last = downloaded;
                }
                _ => panic!("unexpected event order {events:?}"),
            }
        }
    }

    #[tokio::test]
    async fn full_download() {
        let content = data(LEN);
        let server = Server::start(content.clone(), Behaviour::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let (result, events) = run(&server.url("/data"), &dest, &opts()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.size, LEN as u64);
        assert_eq!(outcome.resumed_from, 0);
        assert!(!outcome.restarted && !outcome.already_complete);
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        assert_eq!(server.ranges(), vec![None]);
        check_events(&events, 0, Some(LEN as u64), LEN as u64);
        assert!(events.len() > 2, "periodic reports expected: {events:?}");
    }

    #[tokio::test]
    async fn resumes_after_cut_connection() {
        let content = data(LEN);
        let k = 3 * CHUNK;
        let gate = Arc::new(tokio::sync::Notify::new());
        let server = Server::start(
            content.clone(),
            Behaviour {
                cut_after: Some((k, gate.clone())),
                ..Behaviour::default()
            },
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let url = server.url("/data");

        // The cut comes once the client has written the K bytes.
        let result = download(&url, &dest, &opts(), |p| {
            if p == (Progress::Progress {
                downloaded: k as u64,
                total: Some(LEN as u64),
            }) {
                gate.notify_one();
            }
        })
        .await;
        assert!(
            matches!(result, Err(DownloadError::Http { .. })),
            "{result:?}"
        );
        // The error is returned only after the partial is on disk.
        let partial = std::fs::read(&dest).unwrap();
        assert!(
            partial == content[..k],
            "partial of {} bytes",
            partial.len()
        );

        let (result, events) = run(&url, &dest, &opts()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.resumed_from, k as u64);
        assert_eq!(outcome.size, LEN as u64);
        assert_eq!(server.ranges(), vec![None, Some(format!("bytes={k}-"))]);
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        check_events(&events, k as u64, Some(LEN as u64), LEN as u64);
    }

    #[tokio::test]
    async fn server_ignoring_range_restarts_from_zero() {
        let content = data(LEN);
        let server = Server::start(
            content.clone(),
            Behaviour {
                ignore_range: true,
                ..Behaviour::default()
            },
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        // A bogus partial: must be thrown away, not appended to.
        std::fs::write(&dest, vec![0xAA; 500]).unwrap();
        let (result, events) = run(&server.url("/data"), &dest, &opts()).await;
        let outcome = result.unwrap();
        assert!(outcome.restarted);
        assert_eq!(outcome.resumed_from, 0);
        assert_eq!(server.ranges(), vec![Some("bytes=500-".to_owned())]);
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        check_events(&events, 0, Some(LEN as u64), LEN as u64);
    }

    #[tokio::test]
    async fn complete_partial_gets_416_and_is_done() {
        let content = data(LEN);
        let server = Server::start(content.clone(), Behaviour::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        std::fs::write(&dest, &content).unwrap();
        for expected_size in [Some(LEN as u64), None] {
            let o = DownloadOptions {
                expected_size,
                ..opts()
            };
            let (result, events) = run(&server.url("/data"), &dest, &o).await;
            let outcome = result.unwrap();
            assert!(outcome.already_complete);
            assert_eq!(outcome.size, LEN as u64);
            check_events(&events, LEN as u64, Some(LEN as u64), LEN as u64);
        }
        assert_eq!(std::fs::read(&dest).unwrap(), content);
    }

    #[tokio::test]
    async fn not_found_is_status_error() {
        let server = Server::start(data(10), Behaviour::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let url = server.url("/missing?X-Amz-Signature=secret");
        let (result, events) = run(&url, &dest, &opts()).await;
        match result {
            Err(DownloadError::Status { code: 404, url }) => {
                assert!(url.ends_with("/missing"), "{url}");
            }
            other => panic!("{other:?}"),
        }
        assert!(events.is_empty());
        let message = run(&url, &dest, &opts()).await.0.unwrap_err().to_string();
        assert!(
            message.contains("404") && !message.contains("secret"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn follows_redirects() {
        let content = data(LEN);
        let server = Server::start(content.clone(), Behaviour::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        // /abs -> http://addr/r/1?x=1 -> /r/0 (relative "0") -> /data: 3 redirects.
        let (result, _) = run(&server.url("/abs"), &dest, &opts()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.final_url, server.url("/data"));
        assert_eq!(server.paths(), ["/abs", "/r/1", "/r/0", "/data"]);
        assert_eq!(std::fs::read(&dest).unwrap(), content);

        // Exactly the limit: /r/4 -> /r/3 -> /r/2 -> /r/1 -> /r/0 -> /data.
        std::fs::remove_file(&dest).unwrap();
        let (result, _) = run(&server.url("/r/4"), &dest, &opts()).await;
        assert_eq!(result.unwrap().size, LEN as u64);

        // One more is too many.
        std::fs::remove_file(&dest).unwrap();
        let (result, _) = run(&server.url("/r/5"), &dest, &opts()).await;
        assert!(
            matches!(result, Err(DownloadError::Redirects { max: 5, .. })),
            "{result:?}"
        );
        let (result, _) = run(&server.url("/loop"), &dest, &opts()).await;
        assert!(matches!(result, Err(DownloadError::Redirects { .. })));
    }

    #[tokio::test]
    async fn redirect_keeps_range() {
        let content = data(LEN);
        let server = Server::start(content.clone(), Behaviour::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        std::fs::write(&dest, &content[..1234]).unwrap();
        let (result, _) = run(&server.url("/r/2"), &dest, &opts()).await;
        assert_eq!(result.unwrap().resumed_from, 1234);
        assert_eq!(server.ranges(), vec![Some("bytes=1234-".to_owned())]);
        assert_eq!(std::fs::read(&dest).unwrap(), content);
    }

    #[tokio::test]
    async fn file_url_full_and_resume() {
        let content = data(200_000);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("source blob");
        std::fs::write(&src, &content).unwrap();
        let url = format!("file://{}", src.display()).replace(' ', "%20");
        let dest = dir.path().join("blob");

        let (result, events) = run(&url, &dest, &opts()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.size, content.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        check_events(&events, 0, Some(content.len() as u64), content.len() as u64);

        std::fs::write(&dest, &content[..70_000]).unwrap();
        let (result, events) = run(&url, &dest, &opts()).await;
        let outcome = result.unwrap();
        assert_eq!(outcome.resumed_from, 70_000);
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        check_events(
            &events,
            70_000,
            Some(content.len() as u64),
            content.len() as u64,
        );

        // Complete already.
        let (result, _) = run(&url, &dest, &opts()).await;
        assert!(result.unwrap().already_complete);

        let (result, _) = run("file://otherhost/x", &dest, &opts()).await;
        assert!(matches!(result, Err(DownloadError::Url { .. })));
        let missing = format!("file://{}/nope", dir.path().display());
        let (result, _) = run(&missing, &dest, &opts()).await;
        assert!(
            matches!(result, Err(DownloadError::Io { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn larger_than_expected_is_refused() {
        let content = data(LEN);
        let limit = 4500_u64;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let o = DownloadOptions {
            expected_size: Some(limit),
            ..opts()
        };

        // Announced by Content-Length: refused before writing.
        let server = Server::start(content.clone(), Behaviour::default()).await;
        let (result, events) = run(&server.url("/data"), &dest, &o).await;
        assert!(
            matches!(result, Err(DownloadError::TooLarge { expected: 4500, .. })),
            "{result:?}"
        );
        assert!(events.is_empty());
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 0);

        // Chunked: stopped while streaming, the file stays within the limit.
        server.behaviour().chunked = true;
        let (result, events) = run(&server.url("/data"), &dest, &o).await;
        assert!(
            matches!(result, Err(DownloadError::TooLarge { .. })),
            "{result:?}"
        );
        assert!(matches!(events.first(), Some(Progress::Started { .. })));
        let partial = std::fs::read(&dest).unwrap();
        assert!(partial.len() as u64 <= limit);
        assert_eq!(partial, content[..partial.len()]);

        // file:// too.
        let src = dir.path().join("src");
        std::fs::write(&src, &content).unwrap();
        let (result, _) = run(&format!("file://{}", src.display()), &dest, &o).await;
        assert!(matches!(result, Err(DownloadError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn short_body_is_incomplete() {
        let content = data(LEN);
        let dir = tempfile::tempdir().unwrap();
        let o = DownloadOptions {
            expected_size: Some(LEN as u64 + 1),
            ..opts()
        };
        for chunked in [true, false] {
            let server = Server::start(
                content.clone(),
                Behaviour {
                    chunked,
                    ..Behaviour::default()
                },
            )
            .await;
            let dest = dir.path().join(format!("blob-{chunked}"));
            let (result, _) = run(&server.url("/data"), &dest, &o).await;
            assert!(
                matches!(result, Err(DownloadError::Incomplete { got, .. }) if got == LEN as u64),
                "{result:?}"
            );
        }
    }

    /// The future can be handed to `tokio::spawn` when the callback is `Send`.
    #[test]
    fn download_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let o = DownloadOptions::default();
        let fut = download(
            "http://127.0.0.1:1/x",
            Path::new("/nonexistent"),
            &o,
            |_| {},
        );
        assert_send(&fut);
    }

    /// Periodic reports follow `tokio::time`: with a chunk every 10 s and a 30 s interval, a
    /// report comes with chunks 4, 7 and 10.
    #[tokio::test(start_paused = true)]
    async fn progress_interval_uses_tokio_time() {
        let content = data(LEN);
        let server = Server::start(
            content.clone(),
            Behaviour {
                chunk_delay: Duration::from_secs(10),
                ..Behaviour::default()
            },
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let o = DownloadOptions {
            progress_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            ..DownloadOptions::default()
        };
        let started = Instant::now();
        let (result, events) = run(&server.url("/data"), &dest, &o).await;
        result.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(90));
        let total = Some(LEN as u64);
        assert_eq!(
            events,
            [
                Progress::Started {
                    resumed_from: 0,
                    total
                },
                Progress::Progress {
                    downloaded: 4000,
                    total
                },
                Progress::Progress {
                    downloaded: 7000,
                    total
                },
                Progress::Progress {
                    downloaded: 10_000,
                    total
                },
                Progress::Finished { size: LEN as u64 },
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_body_times_out() {
        let server = Server::start(
            data(LEN),
            Behaviour {
                stall_after: Some(2 * CHUNK),
                ..Behaviour::default()
            },
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let o = DownloadOptions {
            idle_timeout: Duration::from_secs(60),
            ..opts()
        };
        let (result, _) = run(&server.url("/data"), &dest, &o).await;
        assert!(
            matches!(
                result,
                Err(DownloadError::Timeout {
                    stage: TimeoutStage::Body,
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 2 * CHUNK as u64);
    }

    /// Dropping the future mid-body leaves a prefix that a later call completes.
    #[tokio::test]
    async fn dropped_download_leaves_resumable_prefix() {
        let content = data(LEN);
        let k = 4 * CHUNK;
        let server = Server::start(
            content.clone(),
            Behaviour {
                stall_after: Some(k),
                ..Behaviour::default()
            },
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let url = server.url("/data");
        let (tx, mut rx) = watch::channel(0u64);
        let o = opts();
        let fut = download(&url, &dest, &o, |p| {
            if let Progress::Progress { downloaded, .. } = p {
                tx.send_replace(downloaded);
            }
        });
        tokio::select! {
            r = fut => panic!("download finished: {r:?}"),
            r = rx.wait_for(|n| *n >= k as u64) => { r.unwrap(); }
        }
        // A write handed to the blocking pool may still be landing: whatever is there is a
        // prefix, and the resume starts at whatever length the file has by then.
        let partial = std::fs::read(&dest).unwrap();
        assert!(partial.len() <= k);
        assert!(partial == content[..partial.len()]);

        let (result, _) = run(&url, &dest, &opts()).await;
        let outcome = result.unwrap();
        let resumed = outcome.resumed_from;
        assert!(resumed <= k as u64);
        assert!(std::fs::read(&dest).unwrap() == content);
        let expected_range = (resumed > 0).then(|| format!("bytes={resumed}-"));
        assert_eq!(server.ranges()[1], expected_range);
    }

    #[tokio::test]
    async fn https_with_given_tls_config() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert_der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(
            rustls_pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let server_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let content = data(LEN);
        let server =
            Server::start_with(content.clone(), Behaviour::default(), Some(acceptor)).await;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");

        // Without a TLS configuration.
        let (result, _) = run(&server.url("/data"), &dest, &opts()).await;
        assert!(
            matches!(result, Err(DownloadError::Tls { .. })),
            "{result:?}"
        );

        // With one that does not trust the server.
        let untrusting = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let o = DownloadOptions {
            tls: Some(Arc::new(untrusting)),
            ..opts()
        };
        let (result, _) = run(&server.url("/data"), &dest, &o).await;
        assert!(
            matches!(result, Err(DownloadError::Tls { .. })),
            "{result:?}"
        );

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let trusting = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let o = DownloadOptions {
            tls: Some(Arc::new(trusting)),
            ..opts()
        };
        let (result, _) = run(&server.url("/data"), &dest, &o).await;
        assert_eq!(result.unwrap().size, LEN as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), content);
    }

    #[tokio::test]
    async fn connect_refused_and_bad_urls() {
        // Bind then drop to get a port nobody listens on.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let (result, _) = run(&format!("http://127.0.0.1:{port}/x"), &dest, &opts()).await;
        assert!(
            matches!(result, Err(DownloadError::Connect { .. })),
            "{result:?}"
        );
        for bad in ["ftp://h/x", "/relative", "http://user@h/x", "no url"] {
            let (result, _) = run(bad, &dest, &opts()).await;
            assert!(
                matches!(result, Err(DownloadError::Url { .. })),
                "{bad}: {result:?}"
            );
        }
    }

    #[test]
    fn resolves_locations() {
        let base: Uri = "https://h:8443/a/b/c?q=1".parse().unwrap();
        let cases = [
            ("http://o/x", "http://o/x"),
            ("//o/x", "https://o/x"),
            ("/x/y?z", "https://h:8443/x/y?z"),
            ("d", "https://h:8443/a/b/d"),
            ("../d", "https://h:8443/a/d"),
            ("./d/./e/..", "https://h:8443/a/b/d/"),
            ("/../../x", "https://h:8443/x"),
            ("?p=2", "https://h:8443/a/b/c?p=2"),
            ("/x#frag", "https://h:8443/x"),
        ];
        for (location, expected) in cases {
            assert_eq!(
                resolve_location(&base, location).unwrap().to_string(),
                expected
            );
        }
        assert!(resolve_location(&base, "file:///etc/passwd").is_err());
    }

    #[test]
    fn parses_content_range() {
        assert_eq!(
            parse_content_range("bytes 5-9/10"),
            Some((Some(5), Some(10)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((Some(5), None)));
        assert_eq!(parse_content_range("bytes */10"), Some((None, Some(10))));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            file_url_path("", "/a%20b/c").unwrap(),
            PathBuf::from("/a b/c")
        );
        assert_eq!(
            file_url_path("", "localhost/x").unwrap(),
            PathBuf::from("/x")
        );
        assert!(file_url_path("", "/bad%zz").is_err());
        assert!(file_url_path("", "/bad%2").is_err());
    }
}
