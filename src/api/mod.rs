//! The edges: every conversion between the outside world (cloud JSON, OCI documents, proto3
//! JSON of IAM and SM messages) and the model lives here.

pub mod cloud;
pub mod dns;
pub mod dnszone;
pub mod fileserver;
pub mod iam;
pub mod journal;
pub mod json;
pub mod nodes;
pub mod proto;
pub mod scheduler;
pub mod sm;

/// The connections `listener` accepts, for a gRPC server, with Nagle's algorithm off: the
/// streams carry small messages both ways, and with it on a message can wait for the peer's
/// delayed ACK (up to 40 ms on Linux). tonic sets this only on listeners it binds itself.
pub fn grpc_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|tcp| {
            // Only latency depends on it; a socket that refuses still works.
            let _ = tcp.set_nodelay(true);
        })
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn grpc_connections_are_accepted_with_nagle_off() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = std::pin::pin!(super::grpc_incoming(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
