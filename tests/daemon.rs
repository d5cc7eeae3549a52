//! System test: the real `aos-cm run` binary as a child process, with the simulated cloud, IAM
//! and SMs over loopback. Desired state → converged → unit status at the cloud; SIGKILL in the
//! middle of an update and a restart converge to the same allocations as an undisturbed run;
//! SIGTERM exits 0 promptly. In-process daemons test IAM mode details, certificate rotation
//! and reloads.
//!
//! The store starts empty but for the installed unit config: the identity and the nodes come
//! from the simulated IAM, the desired state over the WebSocket, and every blob of the
//! example's items is requested with `requestBlobUrls`, downloaded from the `file://` URLs the
//! simulated cloud answers with, verified and stored.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::model::Allocations;
use aos_cm::scenario;
use aos_cm::sim::cloud::{CloudOptions, Frame, SimCloud};
use aos_cm::sim::sm::{SimOptions, SimSm};
use aos_cm::sim::unit;
use aos_cm::store::Store;
use common::process::*;
use pb::sm_service_client::SmServiceClient;
use serde_json::{Value, json};
use tokio::process::Command;
use tonic::transport::Channel;

/// An in-process daemon in IAM mode (identity and nodes from `iam`), its working directory
/// `dir`, with the keys of `extra` added to its config.
async fn iam_daemon(
    dir: &Path,
    cloud: &SimCloud,
    iam: &aos_cm::sim::iam::SimIam,
    extra: Value,
) -> aos_cm::daemon::Daemon {
    let mut config = json!({
        "workingDir": dir,
        "serviceDiscoveryUrl": cloud.discovery_url(),
        "iamPublicServerUrl": iam.url(),
        "iamProtectedServerUrl": iam.url(),
        "cmServerUrl": "127.0.0.1:0",
        "stateDir": dir.join("states"),
        "unitStatusSendTimeout": "100ms",
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let (config, _) =
        aos_cm::config::Config::from_json_str(&config.to_string(), "test.cfg").unwrap();
    aos_cm::daemon::Daemon::start(&config, unit::quick_runner())
        .await
        .expect("daemon")
}

/// Runs the unit to convergence; with a disturbance, SIGKILLs or SIGTERMs the daemon right after
/// it ACKed the desired state (blobs are downloading, the SMs starting instances) and starts it
/// again. Returns the allocations at the interruption and at the end.
/// How the daemon is interrupted right after it ACKed the desired state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disturb {
    Nothing,
    Kill,
    Term,
}

async fn run_unit(disturb: Disturb) -> (Option<Allocations>, Allocations) {
    // Identity and nodes from the simulated IAM, which stays up while the daemon restarts.
    let ExampleUnit {
        dir,
        cloud,
        iam,
        config,
        sms,
    } = example_unit().await;
    let mut daemon = spawn(&config).await;
    let options = SimOptions {
        delay: Duration::from_millis(300),
        ..SimOptions::default()
    };
    let mut sims = Vec::new();
    for (node, info) in sms {
        let mut sim = SimSm::new(&node, info, options.clone());
        sim.connect(channel(daemon.sm_addr).await).await.unwrap();
        sims.push(sim);
    }
    cloud.wait_from_unit("unitStatus", 1).await;
    let txn = cloud.send_data(desired()).expect("session");
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    let mut session = 1;
    let mut at_kill = None;
    if disturb != Disturb::Nothing {
        if disturb == Disturb::Kill {
            daemon.child.start_kill().unwrap();
            let status = daemon.child.wait().await.unwrap();
            assert!(!status.success());
        } else {
            // SIGTERM in the middle of the update: a clean exit within 5 s.
            let status = terminate(daemon).await;
            assert!(status.success(), "exit status after SIGTERM: {status:?}");
        }
        {
            let store = Store::open(&dir.path().join("cm.redb")).unwrap();
            at_kill = Some(store.snapshot().unwrap().allocations);
        }
        daemon = spawn(&config).await;
        for sim in &mut sims {
            sim.connect(channel(daemon.sm_addr).await).await.unwrap();
        }
        session = 2;
    }
    let full = cloud.wait_for(|f| converged_status(f, session)).await;
    let nodes = full["data"]["nodes"].as_array().unwrap();
    assert!(
        nodes.iter().all(|n| n["isConnected"] == json!(true)),
        "{full}"
    );
    // Downloads are reported: a finished downloadProgressAlert for a blob of the example.
    let finished = cloud
        .wait_for(|frames| {
            frames
                .iter()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some("alerts"))
                .filter_map(Frame::json)
                .flat_map(|v| v["data"]["items"].as_array().cloned().unwrap_or_default())
                .find(|i| {
                    i["tag"] == json!("downloadProgressAlert") && i["state"] == json!("finished")
                })
        })
        .await;
    assert!(
        finished["digest"].as_str().unwrap().starts_with("sha256:"),
        "{finished}"
    );
    assert_eq!(
        finished["downloadedBytes"], finished["totalBytes"],
        "{finished}"
    );
    // Every blob was asked for by digest.
    let asked: std::collections::BTreeSet<String> = cloud
        .from_unit("requestBlobUrls")
        .iter()
        .filter_map(|f| f.json()?["data"]["digests"][0].as_str().map(str::to_owned))
        .collect();
    let status = terminate(daemon).await;
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    // Each start asked IAM who the unit is.
    let starts = if disturb == Disturb::Nothing { 1 } else { 2 };
    assert_eq!(iam.calls_to("GetSystemInfo").len(), starts);
    let store = Store::open(&dir.path().join("cm.redb")).unwrap();
    let snap = store.snapshot().unwrap();
    assert!(unit::converged(&snap));
    assert!(
        snap.observed.blobs.len() >= 10,
        "{} blobs",
        snap.observed.blobs.len()
    );
    for blob in &snap.observed.blobs {
        assert!(
            asked.contains(blob.as_str()),
            "{blob} stored without being asked for"
        );
        let stored = dir.path().join("install/blobs/sha256").join(blob.hex());
        let original = example().join("blobs/sha256").join(blob.hex());
        assert_eq!(
            std::fs::read(stored).unwrap(),
            std::fs::read(original).unwrap()
        );
    }
    (at_kill, snap.allocations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_converges_and_a_kill_mid_update_ends_in_the_same_state() {
    let (_, undisturbed) = run_unit(Disturb::Nothing).await;
    let (at_kill, killed) = run_unit(Disturb::Kill).await;
    // Where each instance runs is a function of the desired state and the nodes: the same as a
    // run that was not disturbed. (UIDs follow the order in which items finish downloading.)
    let placed = |a: &Allocations| {
        a.instances
            .iter()
            .map(|(k, p)| (k.clone(), (p.node_id.clone(), p.runtime_id.clone())))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(placed(&killed), placed(&undisturbed), "placements");
    assert_eq!(killed.networks.len(), undisturbed.networks.len());
    assert!(!killed.instances.is_empty());
    // UIDs, subnets, VLANs and IPs are handed out in the order things happen, which differs
    // from run to run; what the daemon had handed out before it was killed is kept after the
    // restart.
    let at_kill = at_kill.expect("store read after the kill");
    for (ident, ip) in &at_kill.instance_ips {
        assert_eq!(
            killed.instance_ips.get(ident),
            Some(ip),
            "{ident}: IP changed"
        );
    }
    for (ident, placement) in &at_kill.instances {
        assert_eq!(
            killed.instances.get(ident),
            Some(placement),
            "{ident}: moved"
        );
    }
    for (id, net) in &at_kill.networks {
        assert_eq!(killed.networks.get(id), Some(net), "{id}: network changed");
    }
}

#[tokio::test]
async fn a_config_without_identity_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aos_cm.cfg");
    std::fs::write(
        &path,
        json!({"workingDir": dir.path(), "cmServerUrl": "127.0.0.1:0"}).to_string(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("identity"), "{stderr}");
    // A config that does not parse: exit 2 naming the key.
    std::fs::write(&path, r#"{"unitStatusSendTimeout": "soon"}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unitStatusSendTimeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_identity_section_the_daemon_takes_identity_and_nodes_from_iam() {
    use aos_cm::sim::iam::{SimIam, SimIamConfig};
    let iam = SimIam::start(SimIamConfig::example()).await.expect("IAM");
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.blob_dir = Some(example().join("blobs"));
    let cloud = SimCloud::start(options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Nothing in the store: nodes and subjects come from IAM, blobs from the cloud.
    let daemon = iam_daemon(
        dir.path(),
        &cloud,
        &iam,
        json!({"fileServerUrl": "127.0.0.1:0"}),
    )
    .await;
    assert_eq!(daemon.system_id, SYSTEM_ID);
    let sc = scenario::load(&example()).unwrap();
    let mut sims = Vec::new();
    for (node, n) in &sc.snapshot.observed.nodes {
        let mut sim = SimSm::new(node.as_str(), n.sm.clone().unwrap(), SimOptions::default());
        sim.connect(channel(daemon.sm_addr).await).await.unwrap();
        sims.push(sim);
    }
    cloud.wait_from_unit("unitStatus", 1).await;
    let txn = cloud.send_data(desired()).expect("session");
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    let full = cloud.wait_for(|f| converged_status(f, 1)).await;
    // The unit subject IAM reports is in the status.
    assert!(
        !full["data"]["subjects"].as_array().unwrap().is_empty(),
        "{full}"
    );
    assert!(iam.calls().iter().any(|c| c.contains("GetSystemInfo")));
    // fileServerUrl with port 0: the nodes are told the port the file server got, and it
    // serves the blob there.
    let hex = "58b9257874a9963a80e90baa1845e1724103c4608d22756f490c9440df8f8046";
    let mut sm_client = SmServiceClient::new(channel(daemon.sm_addr).await);
    let urls = sm_client
        .get_blobs_infos(pb::BlobsInfosRequest {
            digests: vec![format!("sha256:{hex}")],
        })
        .await
        .expect("GetBlobsInfos")
        .into_inner()
        .urls;
    assert_eq!(
        urls,
        vec![format!(
            "http://{}/blobs/sha256/{hex}",
            daemon.file_server_url
        )]
    );
    assert!(!daemon.file_server_url.ends_with(":0"));
    let mut tcp = tokio::net::TcpStream::connect(&daemon.file_server_url)
        .await
        .expect("file server");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!("HEAD /blobs/sha256/{hex} HTTP/1.1\r\nHost: cm\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(daemon.shutdown(Duration::from_secs(4)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_an_update_exits_cleanly_and_the_next_start_resumes() {
    let (at_term, resumed) = run_unit(Disturb::Term).await;
    let at_term = at_term.expect("store read after the stop");
    for (ident, placement) in &at_term.instances {
        assert_eq!(
            resumed.instances.get(ident),
            Some(placement),
            "{ident}: moved"
        );
    }
    assert!(!resumed.instances.is_empty());
}

/// Test certificates: one CA, leaves for the servers (SAN `localhost` and 127.0.0.1) and the
/// clients, each written as `<name>.pem` / `<name>.key` under `dir`.
struct TestPki {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

impl TestPki {
    fn new(dir: &Path) -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Unit Test Root");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        TestPki {
            issuer,
            dir: dir.to_owned(),
        }
    }

    /// A leaf usable as server and client; returns (cert PEM, key PEM, cert DER).
    fn leaf(&self, name: &str) -> (String, String, Vec<u8>) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn url(&self, name: &str, ext: &str) -> String {
        format!(
            "file://{}",
            self.dir.join(format!("{name}.{ext}")).display()
        )
    }
}

/// The certificate a TLS server at `addr` presents (DER), seen by a client with `client`.
async fn served_cert(addr: SocketAddr, ca: &str, client: (&str, &str)) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(client.0.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(client.1.as_bytes()).unwrap(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the SM server");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn tls_channel(addr: SocketAddr, ca: &str, client: (&str, &str)) -> Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(client.0, client.1))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("SM server over TLS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotation_in_iam_reconnects_the_cloud_and_restarts_the_sm_server() {
    use aos_cm::sim::cloud::ServerTls;
    use aos_cm::sim::iam::{SimCert, SimIam, SimIamConfig, SimIamTls};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let (iam_cert, iam_key, _) = pki.leaf("iam");
    let (cloud_cert, cloud_key, _) = pki.leaf("cloud");
    let (_, _, cm1) = pki.leaf("cm1");
    let (_, _, cm2) = pki.leaf("cm2");
    let (_, _, online1) = pki.leaf("online1");
    let (_, _, online2) = pki.leaf("online2");
    let (sm_cert, sm_key, _) = pki.leaf("sm");
    let sm_client = (sm_cert.as_str(), sm_key.as_str());

    let mut iam_config = SimIamConfig::example();
    let cert = |name: &str, serial: u8| SimCert {
        cert_url: pki.url(name, "pem"),
        key_url: pki.url(name, "key"),
        serial: vec![serial],
    };
    iam_config.certs.insert("cm".into(), cert("cm1", 1));
    iam_config.certs.insert("online".into(), cert("online1", 2));
    iam_config.tls = Some(SimIamTls {
        cert: iam_cert,
        key: iam_key,
        client_ca: Some(ca.clone()),
    });
    let iam = SimIam::start(iam_config).await.expect("IAM");
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.tls = Some(ServerTls {
        cert_chain_pem: cloud_cert.into_bytes(),
        key_pem: cloud_key.into_bytes(),
        client_ca_pem: Some(ca.clone().into_bytes()),
    });
    let cloud = SimCloud::start(options).await.unwrap();
    assert!(cloud.discovery_url().starts_with("https://"));
    let extra = json!({"caCert": dir.path().join("ca.pem"), "certStorage": "cm"});
    let daemon = iam_daemon(dir.path(), &cloud, &iam, extra).await;

    // The first session uses the online certificate IAM gave; the SM server serves certStorage's.
    cloud.wait_sessions(1).await;
    assert_eq!(
        cloud.session_client_certs()[0].as_deref(),
        Some(&online1[..])
    );
    assert_eq!(served_cert(daemon.sm_addr, &ca, sm_client).await, cm1);
    let sc = scenario::load(&example()).unwrap();
    let info = sc.snapshot.observed.nodes["secondary-1"]
        .sm
        .clone()
        .unwrap();
    let mut sim = SimSm::new("secondary-1", info, SimOptions::default());
    sim.connect(tls_channel(daemon.sm_addr, &ca, sm_client).await)
        .await
        .unwrap();

    // Rotation of the online certificate: a new session with the new certificate.
    iam.set_cert_files(
        "online",
        &pki.url("online2", "pem"),
        &pki.url("online2", "key"),
        &[3],
    );
    cloud.wait_sessions(2).await;
    let certs = cloud.session_client_certs();
    assert_eq!(certs.last().unwrap().as_deref(), Some(&online2[..]));
    assert_eq!(daemon.link.counters().renewals, 1);
    // Messages still flow on the new session.
    cloud
        .wait_for(|f| {
            f.iter()
                .any(|f| {
                    f.from_unit
                        && f.session >= 2
                        && f.message_type().as_deref() == Some("unitStatus")
                })
                .then_some(())
        })
        .await;

    // Rotation of the CM's own certificate: the SM's stream ends, the server comes back on the
    // same address with the new certificate, and the SM connects again.
    iam.set_cert_files("cm", &pki.url("cm2", "pem"), &pki.url("cm2", "key"), &[4]);
    sim.wait_closed().await;
    let served = loop {
        // The server is back once a handshake succeeds; it may take a moment to rebind.
        match tokio::net::TcpStream::connect(daemon.sm_addr).await {
            Ok(_) => break served_cert(daemon.sm_addr, &ca, sm_client).await,
            Err(_) => tokio::task::yield_now().await,
        }
    };
    assert_eq!(served, cm2);
    sim.connect(tls_channel(daemon.sm_addr, &ca, sm_client).await)
        .await
        .unwrap();
    assert!(sim.is_connected());
    // The cloud link was not disturbed by the SM server's restart.
    assert_eq!(cloud.sessions(), 2);
    assert!(
        iam.calls()
            .iter()
            .any(|c| c.contains("SubscribeCertChanged"))
    );
    assert!(daemon.shutdown(Duration::from_secs(4)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_the_agent_periods_and_the_item_ttl_at_once() {
    let cloud = SimCloud::start(CloudOptions::new(SYSTEM_ID)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, sms) = prepare(dir.path(), &cloud, None);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut value: Value = serde_json::from_str(&text).unwrap();
    // Alerts wait an hour at first.
    value["alerts"]["sendPeriod"] = json!("1h");
    let (old, _) = aos_cm::config::Config::from_json_str(&value.to_string(), "a.cfg").unwrap();
    let daemon = aos_cm::daemon::Daemon::start(&old, unit::quick_runner())
        .await
        .expect("daemon");
    cloud.wait_sessions(1).await;
    let (node, info) = sms[0].clone();
    let mut sim = SimSm::new(&node, info, SimOptions::default());
    sim.connect(channel(daemon.sm_addr).await).await.unwrap();
    let alert = common::system_alert("disk almost full");
    assert!(sim.send_raw(alert).await);

    value["alerts"]["sendPeriod"] = json!("100ms");
    value["imageManager"] = json!({"updateItemTtl": "2h"});
    let (new, _) = aos_cm::config::Config::from_json_str(&value.to_string(), "a.cfg").unwrap();
    let reload = daemon.reload(&old, &new).unwrap();
    assert_eq!(
        reload.applied,
        vec!["alerts.sendPeriod", "imageManager.updateItemTtl"]
    );
    assert!(!reload.restart_needed);
    // The alert goes out at the new period instead of an hour later.
    let sent = cloud.wait_from_unit("alerts", 1).await;
    assert!(sent.text.contains("disk almost full"), "{}", sent.text);
    let settings = daemon.store.read(|r| r.settings()).unwrap();
    assert_eq!(settings.update_item_ttl_ms, 2 * 3600 * 1000);

    // A setting that needs a restart is reported as such.
    value["cmServerUrl"] = json!("127.0.0.1:1");
    let (newer, _) = aos_cm::config::Config::from_json_str(&value.to_string(), "a.cfg").unwrap();
    let running = aos_cm::daemon::reloadable_part(&old, &new);
    let reload = daemon.reload(&running, &newer).unwrap();
    assert!(reload.applied.is_empty());
    assert!(reload.restart_needed);
    assert!(daemon.shutdown(Duration::from_secs(4)).await);
}

/// A blob server on 127.0.0.1 that records every request's `Range` header. A request without
/// one gets the headers and the first half of the body, then the connection stalls; a ranged
/// request gets the rest (206).
struct StallingBlobServer {
    addr: SocketAddr,
    ranges: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingBlobServer {
    async fn start(body: Vec<u8>) -> StallingBlobServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ranges.clone();
        let task = tokio::spawn(async move {
            let mut stalled = Vec::new();
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let range = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range:"))
                    .map(|r| r.trim().to_owned());
                seen.lock().unwrap().push(range.clone());
                let n = body.len();
                match range.and_then(|r| {
                    r.strip_prefix("bytes=")?
                        .strip_suffix('-')?
                        .parse::<usize>()
                        .ok()
                }) {
                    Some(from) if from < n => {
                        let head = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{n}\r\nConnection: close\r\n\r\n",
                            n - from,
                            n - 1
                        );
                        let _ = tcp.write_all(head.as_bytes()).await;
                        let _ = tcp.write_all(&body[from..]).await;
                    }
                    _ => {
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                        let _ = tcp.write_all(head.as_bytes()).await;
                        let _ = tcp.write_all(&body[..n / 2]).await;
                        let _ = tcp.flush().await;
                        // Hold the connection open with the rest never sent.
                        stalled.push(tcp);
                    }
                }
            }
        });
        StallingBlobServer { addr, ranges, task }
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().unwrap().clone()
    }
}

impl Drop for StallingBlobServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_download_is_resumed_with_a_range_request_after_the_restart() {
    let ExampleUnit {
        dir,
        cloud,
        iam: _iam,
        config,
        sms,
    } = example_unit().await;
    // The layer item's layer blob comes from the stalling HTTP server.
    let sc = scenario::load(&example()).unwrap();
    let layer = sc
        .snapshot
        .desired
        .as_ref()
        .unwrap()
        .items
        .iter()
        .find(|i| i.item_type == aos_cm::model::ItemType::Layer)
        .unwrap()
        .clone();
    let index = layer.index_digest.clone().unwrap();
    let target = sc.snapshot.catalogue.images[&index].manifests[0].layers[0].clone();
    let body = std::fs::read(example().join("blobs/sha256").join(target.hex())).unwrap();
    let server = StallingBlobServer::start(body.clone()).await;
    let mut entry = aos_cm::sim::cloud::blob_info(&example().join("blobs"), target.as_str())
        .expect("blob info");
    entry.urls = vec![format!("http://{}/blobs/{}", server.addr, target.hex())];
    cloud.set_blob_info(target.as_str(), Some(entry));

    let mut daemon = spawn(&config).await;
    let mut sims = Vec::new();
    for (node, info) in sms {
        let mut sim = SimSm::new(&node, info, SimOptions::default());
        sim.connect(channel(daemon.sm_addr).await).await.unwrap();
        sims.push(sim);
    }
    cloud.wait_from_unit("unitStatus", 1).await;
    cloud.send_data(desired()).expect("session");
    // The first half is on disk: the daemon is in the middle of the download. Kill it.
    let partial = dir.path().join("download").join(target.hex());
    let half = (body.len() / 2) as u64;
    tokio::time::timeout(Duration::from_secs(60), async {
        while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < half {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("half of the blob was written");
    daemon.child.start_kill().unwrap();
    assert!(!daemon.child.wait().await.unwrap().success());
    assert_eq!(server.ranges(), vec![None]);

    // After the restart the download goes on from where it stopped.
    daemon = spawn(&config).await;
    for sim in &mut sims {
        sim.connect(channel(daemon.sm_addr).await).await.unwrap();
    }
    cloud.wait_for(|f| converged_status(f, 2)).await;
    assert_eq!(
        server.ranges(),
        vec![None, Some(format!("bytes={half}-"))],
        "the restarted daemon asked for the rest only"
    );
    let stored = dir.path().join("install/blobs/sha256").join(target.hex());
    assert_eq!(std::fs::read(stored).unwrap(), body);
    assert!(!partial.exists());
    let status = terminate(daemon).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_reports_reconciles_nodes_the_cloud_and_downloads() {
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.blob_dir = Some(example().join("blobs"));
    let cloud = SimCloud::start(options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, sms) = prepare(dir.path(), &cloud, None);
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    value["metrics"] = json!({"enabled": true, "listen": "127.0.0.1:0"});
    let (config, _) = aos_cm::config::Config::from_json_str(&value.to_string(), "m.cfg").unwrap();
    let daemon = aos_cm::daemon::Daemon::start(&config, unit::quick_runner())
        .await
        .expect("daemon");
    let addr = daemon.metrics_addr.expect("metrics enabled");
    let mut sims = Vec::new();
    for (node, info) in sms {
        let mut sim = SimSm::new(&node, info, SimOptions::default());
        sim.connect(channel(daemon.sm_addr).await).await.unwrap();
        sims.push(sim);
    }
    cloud.wait_from_unit("unitStatus", 1).await;
    cloud.send_data(desired()).expect("session");
    cloud.wait_for(|f| converged_status(f, 1)).await;

    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.unwrap();
        text
    };
    let text = get("/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(value("aos_cm_nodes_connected"), 3.0);
    assert_eq!(value("aos_cm_cloud_connected"), 1.0);
    assert!(value("aos_cm_reconcile_duration_seconds_count{reconciler=\"instances\"}") >= 1.0);
    assert!(value("aos_cm_cloud_messages_total{event=\"acked\"}") >= 1.0);
    // Every stored blob was downloaded once: the byte count is their total size.
    let stored: u64 = std::fs::read_dir(dir.path().join("install/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(stored > 0);
    assert_eq!(value("aos_cm_download_bytes_total"), stored as f64);
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));
    drop(sims);
    assert!(daemon.shutdown(Duration::from_secs(4)).await);
}
