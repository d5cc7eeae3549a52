//! Serving SMService and NetworkService on `cmServerUrl`: plaintext only when
//! the config says so explicitly, otherwise mTLS with client certificates required and
//! verified against `caCert`. A request over the decoding limit is answered with
//! `RESOURCE_EXHAUSTED` (gRPC's code for it; tonic says `OUT_OF_RANGE`).

use super::SmController;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// PEM material for mTLS.
#[derive(Debug, Clone)]
pub struct TlsPem {
    pub cert: String,
    pub key: String,
    /// The CA client certificates must chain to.
    pub client_ca: String,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    sm: SmController,
    network: Option<super::network::NetworkService>,
    tls: Option<TlsPem>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let mut builder = Server::builder();
    if let Some(pem) = tls {
        builder = builder.tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(pem.cert, pem.key))
                .client_ca_root(Certificate::from_pem(pem.client_ca))
                .client_auth_optional(false),
        )?;
    }
    builder
        .layer(tower::util::MapResponseLayer::new(resource_exhausted))
        .add_service(sm.service())
        .add_optional_service(network.map(|n| n.service()))
        .serve_with_incoming_shutdown(crate::api::grpc_incoming(listener), shutdown)
        .await
}

/// Whether a status is tonic's "message over the decoding limit".
pub fn is_too_large(code: tonic::Code, message: &str) -> bool {
    code == tonic::Code::OutOfRange && message.contains("message length too large")
}

/// Rewrites a trailers-only answer reporting an oversized request (tonic's `OUT_OF_RANGE`,
/// `decoded message length too large: found N bytes, the limit is: M bytes`) to
/// `RESOURCE_EXHAUSTED`, keeping tonic's message with both sizes.
fn resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let too_large = tonic::Status::from_header_map(response.headers())
        .is_some_and(|s| is_too_large(s.code(), s.message()));
    if too_large {
        let code = (tonic::Code::ResourceExhausted as i32).to_string();
        if let Ok(v) = http::HeaderValue::from_str(&code) {
            response.headers_mut().insert("grpc-status", v);
        }
    }
    response
}
