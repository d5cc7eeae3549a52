//! Network side of the cloud link: TCP (+ TLS) streams, the discovery POST and the WebSocket
//! upgrade (cloud-protocol.md §1.2–§1.4).
//!
//! TLS is used when the URL scheme is `https` or `wss`; `http`/`ws` are plain, as upstream
//! allows. One rustls client config (client certificate of type `online`, roots from `caCert`)
//! serves discovery and the WebSocket. The HTTP exchange is done by hyper (already in the
//! dependency tree through tonic), the WebSocket by tokio-tungstenite over the same stream type.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::discovery::{self, DiscoveryResponse};

/// Largest discovery response body accepted.
pub const MAX_DISCOVERY_BODY: usize = 64 * 1024;

/// A byte stream: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The WebSocket type the link uses.
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: TLS is needed but no TLS configuration is set")]
    NoTls { url: String },
    #[error("{url}: {reason}")]
    Io { url: String, reason: String },
    #[error("{url}: timed out after {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    /// The WebSocket upgrade was answered with 401: the cached endpoints must be dropped.
    #[error("{url}: unauthorized (HTTP 401)")]
    Unauthorized { url: String },
    #[error("{url}: bad discovery response: {reason}")]
    Response { url: String, reason: String },
}

/// Where to connect, from a URL.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

fn target(url: &str) -> Result<Target, ConnectError> {
    let bad = |reason: &str| ConnectError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.trim().parse().map_err(|e| bad(&format!("{e}")))?;
    let scheme = uri.scheme_str().ok_or_else(|| bad("no scheme"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" | "wss" => true,
        "http" | "ws" => false,
        other => return Err(bad(&format!("unsupported scheme {other:?}"))),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    Ok(Target {
        tls,
        host,
        port,
        authority,
        path,
    })
}

/// Opens a TCP connection to the URL's host, wrapped in TLS when the scheme asks for it.
async fn open(
    url: &str,
    t: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Io>, ConnectError> {
    let io_err = |e: std::io::Error| ConnectError::Io {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    let tcp = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(io_err)?;
    // Nagle off: frames are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    if !t.tls {
        return Ok(Box::new(tcp));
    }
    let config = tls.ok_or_else(|| ConnectError::NoTls {
        url: url.to_owned(),
    })?;
    let name = ServerName::try_from(t.host.clone()).map_err(|e| ConnectError::Url {
        url: url.to_owned(),
        reason: format!("server name: {e}"),
    })?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(io_err)?;
    Ok(Box::new(stream))
}

/// Runs `fut` with a time limit, mapping expiry to [`ConnectError::Timeout`].
async fn limited<T>(
    url: &str,
    after: Duration,
    fut: impl Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            url: url.to_owned(),
            after,
        }),
    }
}

/// The discovery POST (§1.2): flat JSON body, `Accept`/`Content-Type: application/json`,
/// `Connection: close`; a non-200 answer or an unusable body is a failure.
pub async fn discover(
    url: &str,
    system_id: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<DiscoveryResponse, ConnectError> {
    limited(url, timeout, discover_inner(url, system_id, tls)).await
}

async fn discover_inner(
    url: &str,
    system_id: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<DiscoveryResponse, ConnectError> {
    let t = target(url)?;
    let io = open(url, &t, tls).await?;
    let io_err = |e: &dyn std::fmt::Display| ConnectError::Io {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| io_err(&e))?;
    let driver = tokio::spawn(conn);
    let body = discovery::request_body(system_id).to_string();
    let request = http::Request::post(t.path.as_str())
        .header(http::header::HOST, t.authority.as_str())
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONNECTION, "close")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| io_err(&e))?;
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| io_err(&e))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(ConnectError::Status {
                url: url.to_owned(),
                status,
            });
        }
        let collected = Limited::new(response.into_body(), MAX_DISCOVERY_BODY)
            .collect()
            .await
            .map_err(|e| ConnectError::Response {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
        let parsed = discovery::parse_response(&text).map_err(|reason| ConnectError::Response {
            url: url.to_owned(),
            reason,
        })?;
        parsed
            .ensure_usable()
            .map_err(|reason| ConnectError::Response {
                url: url.to_owned(),
                reason,
            })?;
        Ok(parsed)
    }
    .await;
    driver.abort();
    result
}

/// The WebSocket upgrade (§1.3) with `Authorization: Bearer <token>` and
/// `Accept: application/json`; frames larger than `max_message_size` are refused by the reader.
pub async fn connect_ws(
    url: &str,
    auth_token: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    max_message_size: usize,
    timeout: Duration,
) -> Result<Ws, ConnectError> {
    limited(url, timeout, async {
        let t = target(url)?;
        let io = open(url, &t, tls).await?;
        let mut request = url
            .trim()
            .into_client_request()
            .map_err(|e| ConnectError::Url {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        if !auth_token.is_empty() {
            let value =
                http::HeaderValue::from_str(&format!("Bearer {auth_token}")).map_err(|_| {
                    ConnectError::Url {
                        url: url.to_owned(),
                        reason: "auth token is not a valid header value".to_owned(),
                    }
                })?;
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let config = ws_config(max_message_size);
        match tokio_tungstenite::client_async_with_config(request, io, Some(config)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(resp)) if resp.status().as_u16() == 401 => {
                Err(ConnectError::Unauthorized {
                    url: url.to_owned(),
                })
            }
            Err(tungstenite::Error::Http(resp)) => Err(ConnectError::Status {
                url: url.to_owned(),
                status: resp.status().as_u16(),
            }),
            Err(e) => Err(ConnectError::Io {
                url: url.to_owned(),
                reason: e.to_string(),
            }),
        }
    })
    .await
}

/// WebSocket limits: one message and one frame may be at most `max_message_size` bytes.
pub fn ws_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// Builds the client TLS config: roots from the `caCert` PEM, optional client certificate chain
/// and key (PEM) of cert type `online`.
pub fn client_tls(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("CA certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("CA file holds no certificate".to_owned());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match client {
        Some((chain_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(chain_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate: {e}"))?;
            if chain.is_empty() {
                return Err("client certificate file holds no certificate".to_owned());
            }
            let key =
                PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("client key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_urls() {
        let t = target("wss://cloud.example:9443/ws/v7?x=1").expect("url");
        assert!(t.tls);
        assert_eq!(t.host, "cloud.example");
        assert_eq!(t.port, 9443);
        assert_eq!(t.authority, "cloud.example:9443");
        assert_eq!(t.path, "/ws/v7?x=1");
        let t = target("http://127.0.0.1/").expect("url");
        assert!(!t.tls);
        assert_eq!(t.port, 80);
        let t = target("https://[::1]:9000/sd/v7/").expect("url");
        assert_eq!(t.host, "::1");
        assert_eq!(t.port, 9000);
        for bad in ["ftp://x/", "not a url", "wss://", "/relative"] {
            assert!(target(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tls_config_errors_are_named() {
        let err = client_tls(b"", None).expect_err("empty CA");
        assert!(err.contains("no certificate"), "{err}");
    }
}
