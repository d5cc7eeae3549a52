//! mTLS on the SM server: client certificates are required and verified against the
//! configured CA. Certificates are made at test time with rcgen.

mod common;

use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::api::sm::SmConfig;
use aos_cm::api::sm::server::TlsPem;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf certificate and key, both PEM.
    fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }
}

async fn call(
    addr: std::net::SocketAddr,
    server_ca: &Ca,
    client: Option<(String, String)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = pb::sm_service_client::SmServiceClient::new(channel);
    client
        .get_blobs_infos(pb::BlobsInfosRequest { digests: vec![] })
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_need_a_certificate_from_the_configured_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("unit CA");
    let other = Ca::new("another CA");
    let (cert, key) = ca.leaf("localhost");
    let tls = TlsPem {
        cert,
        key,
        client_ca: ca.pem(),
    };
    let unit = Unit::start(&example("fresh-install"), SmConfig::default(), Some(tls)).await;

    let good = call(unit.addr, &ca, Some(ca.leaf("main"))).await;
    assert!(
        good.is_ok(),
        "a client with a certificate from the CA is served: {good:?}"
    );
    let none = call(unit.addr, &ca, None).await;
    assert!(none.is_err(), "a client without a certificate is refused");
    let foreign = call(unit.addr, &ca, Some(other.leaf("main"))).await;
    assert!(foreign.is_err(), "a certificate from another CA is refused");
    // Plain HTTP/2 without TLS is refused too.
    let mut plain = pb::sm_service_client::SmServiceClient::new(unit.channel_lazy());
    assert!(
        plain
            .get_blobs_infos(pb::BlobsInfosRequest { digests: vec![] })
            .await
            .is_err()
    );
}
