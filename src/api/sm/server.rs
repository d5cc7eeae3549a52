//! Serving SMService and NetworkService on `cmServerUrl`: plaintext only when
//! the config says so explicitly, otherwise mTLS with client certificates required and
//! verified against `caCert`.

use super::SmController;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
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
        .add_service(sm.service())
        .add_optional_service(network.map(|n| n.service()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
