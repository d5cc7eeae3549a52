//! The IAM client against the simulated IAM over loopback gRPC: every call, IAM's errors,
//! subscriptions across a restart of the IAM, the store sync and the cloud agent's `Iam` trait.
//! Tests wait on events (subscription openings, store commits, call logs), never on time.

use std::sync::Arc;
use std::time::Duration;

use aos_cm::api::cloud::certs::{AppliedCert, Iam};
use aos_cm::api::iam::{ClientTls, IamClient, IamConfig, RetryConfig, WatchEvent, sync_to_store};
use aos_cm::model::{Connection, NodeInfo, NodeState, ObservedNode, ResourceInfo, SmInfo};
use aos_cm::sim::iam::{SimIam, SimIamConfig, SimIamTls, sim_csr};
use aos_cm::store::Store;
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(20);

fn config(sim: &SimIam) -> IamConfig {
    let mut c = IamConfig::plain(sim.url(), Some(sim.url()));
    c.request_timeout = Duration::from_secs(10);
    c.retry = RetryConfig {
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(100),
    };
    c
}

async fn start() -> (SimIam, IamClient) {
    let sim = SimIam::start(SimIamConfig::example()).await.unwrap();
    let client = IamClient::connect(&config(&sim)).await.unwrap();
    (sim, client)
}

async fn next<T>(rx: &mut mpsc::Receiver<WatchEvent<T>>) -> WatchEvent<T> {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .expect("no watch event in time")
        .expect("watch ended")
}

/// The next `Changed` event, skipping (re)openings.
async fn next_change<T>(rx: &mut mpsc::Receiver<WatchEvent<T>>) -> T {
    loop {
        if let WatchEvent::Changed(v) = next(rx).await {
            return v;
        }
    }
}

async fn opened<T: std::fmt::Debug>(rx: &mut mpsc::Receiver<WatchEvent<T>>) {
    match next(rx).await {
        WatchEvent::Opened => {}
        other => panic!("expected Opened, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_call_answers_what_the_iam_holds() {
    let (sim, client) = start().await;
    assert_eq!(client.current_node_id(), "main");

    let info = client.get_system_info().await.unwrap();
    assert_eq!(info.system_id, "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17");
    assert_eq!(info.unit_model, "aos-example-unit");
    assert_eq!(info.version, "1.0.0");

    assert_eq!(
        client.get_subjects().await.unwrap(),
        vec!["d3f7a1c9-8b26-4e5d-9f40-1a6e2c8b5d73".to_string()]
    );

    let current = client.get_current_node_info().await.unwrap();
    assert_eq!(current.node_id, "main");
    assert!(current.attrs.contains_key("MainNode"));
    assert_eq!(current.state, NodeState::Provisioned);
    assert_eq!(Some(current.clone()), sim.node("main"));

    let ids = client.get_all_node_ids().await.unwrap();
    assert_eq!(ids, ["main", "secondary-1", "secondary-2"]);
    for id in &ids {
        let n = client.get_node_info(id).await.unwrap();
        assert_eq!(Some(n), sim.node(id), "{id}");
    }
    let err = client.get_node_info("nope").await.unwrap_err();
    assert!(err.message.contains("\"nope\" not found"), "{err}");

    let online = client.get_cert("online", &[], "").await.unwrap();
    assert_eq!(online.cert_type, "online");
    assert_eq!(online.cert_url, "file:///var/aos/crypt/main/online.pem");
    assert_eq!(online.key_url, "file:///var/aos/crypt/main/online.key");
    assert_eq!(online.serial, "1000");
    let by_serial = client
        .get_cert("online", &online.issuer, "1000")
        .await
        .unwrap();
    assert_eq!(by_serial, online);
    let err = client.get_cert("online", &[], "ffff").await.unwrap_err();
    assert!(err.message.contains("NotFound"), "{err}");

    assert_eq!(
        sim.calls(),
        [
            "GetCurrentNodeInfo",
            "GetSystemInfo",
            "GetSubjects",
            "GetCurrentNodeInfo",
            "GetAllNodeIDs",
            "GetNodeInfo main",
            "GetNodeInfo secondary-1",
            "GetNodeInfo secondary-2",
            "GetNodeInfo nope",
            "GetCert online ",
            "GetCert online 1000",
            "GetCert online ffff",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protected_call_reaches_the_iam_and_changes_its_nodes() {
    let (sim, client) = start().await;

    let csr = client
        .create_key("secondary-1", "sm", "sub", "pw1")
        .await
        .unwrap();
    assert_eq!(csr, sim_csr("secondary-1", "sm"));

    let applied = client
        .apply_cert("main", "online", "-----BEGIN CERTIFICATE-----\n...")
        .await
        .unwrap();
    assert_eq!(applied.cert_type, "online");
    assert_eq!(applied.cert_url, "file:///var/aos/crypt/main/online.pem");
    assert_eq!(applied.serial, "a001");
    // Applied on the main node: the new certificate is the current one.
    assert_eq!(
        client.get_cert("online", &[], "").await.unwrap().serial,
        "a001"
    );

    assert_eq!(
        client.get_cert_types("secondary-2").await.unwrap(),
        ["iam", "sm"]
    );
    assert_eq!(
        client.get_cert_types("main").await.unwrap(),
        ["online", "offline", "iam", "cm", "sm"]
    );

    client.pause_node("secondary-2").await.unwrap();
    assert_eq!(sim.node("secondary-2").unwrap().state, NodeState::Paused);
    client.resume_node("secondary-2").await.unwrap();
    assert_eq!(
        sim.node("secondary-2").unwrap().state,
        NodeState::Provisioned
    );

    client.deprovision("secondary-1", "pw1").await.unwrap();
    assert_eq!(
        client.get_node_info("secondary-1").await.unwrap().state,
        NodeState::Unprovisioned
    );
    client
        .start_provisioning("secondary-1", "pw2")
        .await
        .unwrap();
    client
        .finish_provisioning("secondary-1", "pw2")
        .await
        .unwrap();
    assert_eq!(
        client.get_node_info("secondary-1").await.unwrap().state,
        NodeState::Provisioned
    );

    assert_eq!(
        sim.calls()[1..],
        [
            "CreateKey secondary-1 sm \"sub\" pw1",
            "ApplyCert main online",
            "GetCert online ",
            "GetCertTypes secondary-2",
            "GetCertTypes main",
            "PauseNode secondary-2",
            "ResumeNode secondary-2",
            "Deprovision secondary-1 pw1",
            "GetNodeInfo secondary-1",
            "StartProvisioning secondary-1 pw2",
            "FinishProvisioning secondary-1 pw2",
            "GetNodeInfo secondary-1",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_the_iam_error_text_and_codes() {
    let (sim, client) = start().await;

    sim.fail("CreateKey", 6, "wrong password for node secondary-1");
    let err = client
        .create_key("secondary-1", "iam", "", "bad")
        .await
        .unwrap_err();
    assert_eq!(err.aos_code, Some(6));
    assert_eq!(err.message, "wrong password for node secondary-1");

    // IAM's own refusal for an unknown node: notFound (5).
    sim.heal("CreateKey");
    let err = client.create_key("ghost", "iam", "", "").await.unwrap_err();
    assert_eq!(err.aos_code, Some(5));
    assert!(err.message.contains("ghost"), "{err}");

    for rpc in [
        "ApplyCert",
        "StartProvisioning",
        "FinishProvisioning",
        "Deprovision",
        "PauseNode",
        "ResumeNode",
    ] {
        sim.fail(rpc, 1, &format!("{rpc} refused by IAM"));
    }
    let errs = [
        client.apply_cert("main", "iam", "pem").await.unwrap_err(),
        client.start_provisioning("main", "p").await.unwrap_err(),
        client.finish_provisioning("main", "p").await.unwrap_err(),
        client.deprovision("main", "p").await.unwrap_err(),
        client.pause_node("main").await.unwrap_err(),
        client.resume_node("main").await.unwrap_err(),
    ];
    let texts: Vec<_> = errs.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        texts,
        [
            "ApplyCert refused by IAM",
            "StartProvisioning refused by IAM",
            "FinishProvisioning refused by IAM",
            "Deprovision refused by IAM",
            "PauseNode refused by IAM",
            "ResumeNode refused by IAM",
        ]
    );
    assert!(errs.iter().all(|e| e.aos_code == Some(1)));

    // Calls without an ErrorInfo fail with a gRPC status that carries IAM's text.
    sim.fail("GetCertTypes", 1, "no cert storage");
    let err = client.get_cert_types("main").await.unwrap_err();
    assert!(err.message.contains("no cert storage"), "{err}");
    assert!(err.message.contains("GetCertTypes"), "{err}");

    // No protected endpoint configured: the protected calls say so.
    let public_only = IamClient::new(&IamConfig::plain(sim.url(), None)).unwrap();
    let err = public_only.pause_node("main").await.unwrap_err();
    assert!(
        err.message.contains("protected API is not configured"),
        "{err}"
    );
    assert!(public_only.get_system_info().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_deliver_changes() {
    use futures::StreamExt;
    let (sim, client) = start().await;

    let mut nodes = client.subscribe_node_changed().await.unwrap();
    let mut current = client.subscribe_current_node_changed().await.unwrap();
    let mut subjects = client.subscribe_subjects_changed().await.unwrap();
    let mut certs = client.subscribe_cert_changed("online").await.unwrap();
    let mut other_certs = client.subscribe_cert_changed("offline").await.unwrap();

    assert!(sim.set_node_state("secondary-1", NodeState::Error));
    let n = nodes.next().await.unwrap().unwrap();
    assert_eq!(
        (n.node_id.as_str(), n.state),
        ("secondary-1", NodeState::Error)
    );

    assert!(sim.set_node_state("main", NodeState::Paused));
    let n = nodes.next().await.unwrap().unwrap();
    assert_eq!((n.node_id.as_str(), n.state), ("main", NodeState::Paused));
    let n = current.next().await.unwrap().unwrap();
    assert_eq!((n.node_id.as_str(), n.state), ("main", NodeState::Paused));

    sim.set_subjects(&["s1", "s2"]);
    assert_eq!(subjects.next().await.unwrap().unwrap(), ["s1", "s2"]);

    sim.set_cert("online", "file:///new/online.pem", &[0xbe, 0xef]);
    let c = certs.next().await.unwrap().unwrap();
    assert_eq!(
        (c.cert_type.as_str(), c.cert_url.as_str(), c.serial.as_str()),
        ("online", "file:///new/online.pem", "beef")
    );
    // A subscriber to another type hears of its own type only.
    sim.set_cert("offline", "file:///new/offline.pem", &[1]);
    let c = other_certs.next().await.unwrap().unwrap();
    assert_eq!(c.cert_type, "offline");

    // A new node is announced as a whole.
    let mut extra = sim.node("secondary-2").unwrap();
    extra.node_id = "secondary-3".into();
    extra.title = "Added ECU".into();
    sim.set_node(&extra);
    assert_eq!(nodes.next().await.unwrap().unwrap(), extra);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_open_subscriptions_survive_an_iam_restart() {
    let (mut sim, client) = start().await;
    let mut nodes = client.watch_nodes();
    let mut current = client.watch_current_node();
    let mut subjects = client.watch_subjects();
    let mut cert = client.watch_cert("online");
    opened(&mut nodes).await;
    opened(&mut current).await;
    opened(&mut subjects).await;
    opened(&mut cert).await;

    sim.set_node_state("main", NodeState::Paused);
    assert_eq!(next_change(&mut nodes).await.state, NodeState::Paused);
    assert_eq!(next_change(&mut current).await.state, NodeState::Paused);
    sim.set_subjects(&["before"]);
    assert_eq!(next_change(&mut subjects).await, ["before"]);
    sim.set_cert("online", "file:///one.pem", &[1]);
    assert_eq!(next_change(&mut cert).await.serial, "01");

    // IAM goes away and comes back on the same port: every subscription is opened again.
    sim.restart().await.unwrap();
    opened(&mut nodes).await;
    opened(&mut current).await;
    opened(&mut subjects).await;
    opened(&mut cert).await;

    sim.set_node_state("main", NodeState::Provisioned);
    assert_eq!(next_change(&mut nodes).await.state, NodeState::Provisioned);
    assert_eq!(
        next_change(&mut current).await.state,
        NodeState::Provisioned
    );
    sim.set_subjects(&["after"]);
    assert_eq!(next_change(&mut subjects).await, ["after"]);
    sim.set_cert("online", "file:///two.pem", &[2]);
    let c = next_change(&mut cert).await;
    assert_eq!(
        (c.cert_url.as_str(), c.serial.as_str()),
        ("file:///two.pem", "02")
    );

    // Unary calls work again over the same client.
    assert_eq!(client.get_subjects().await.unwrap(), ["after"]);
    // A second restart while stopped for a while: calls fail, then recover.
    sim.stop().await;
    assert!(client.get_system_info().await.is_err());
    sim.start_again().await.unwrap();
    opened(&mut nodes).await;
    assert!(client.get_system_info().await.is_ok());
}

fn sm_info() -> SmInfo {
    SmInfo {
        runtimes: vec![],
        resources: vec![ResourceInfo {
            name: "gpu".into(),
            shared_count: 1,
        }],
    }
}

/// Waits until `check` holds for the store, re-checking after every commit.
async fn wait_store(store: &Store, what: &str, check: impl Fn(&Store) -> bool) {
    let mut changes = store.subscribe();
    let wait = async {
        while !check(store) {
            changes.recv().await.expect("store gone");
        }
    };
    tokio::time::timeout(TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("store never showed {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_to_store_writes_nodes_and_subjects_and_keeps_the_sm_part() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("cm.redb")).unwrap());
    // The main node's SM registered before IAM was read.
    store
        .write(|tx| {
            tx.put_node(&ObservedNode {
                info: NodeInfo {
                    node_id: "main".into(),
                    state: NodeState::Provisioned,
                    ..NodeInfo::default()
                },
                sm: Some(sm_info()),
                node_config: None,
                connection: Connection::Connected,
                usage: None,
            })
        })
        .unwrap();

    let (mut sim, client) = start().await;
    let task = tokio::spawn(sync_to_store(client, store.clone()));

    let expected = |id: &str| sim.node(id).unwrap();
    wait_store(&store, "three nodes and the subject", |s| {
        let nodes = s.read(|r| r.nodes()).unwrap();
        let subjects = s.read(|r| r.unit_subjects()).unwrap();
        nodes.len() == 3
            && nodes.values().all(|n| n.info == expected(&n.info.node_id))
            && subjects.contains("d3f7a1c9-8b26-4e5d-9f40-1a6e2c8b5d73")
    })
    .await;
    let nodes = store.read(|r| r.nodes()).unwrap();
    assert_eq!(
        nodes.keys().collect::<Vec<_>>(),
        ["main", "secondary-1", "secondary-2"]
    );
    let main = &nodes["main"];
    assert_eq!(main.sm, Some(sm_info()));
    assert_eq!(main.connection, Connection::Connected);
    assert_eq!(main.info.title, "Main ECU");
    let secondary = &nodes["secondary-1"];
    assert_eq!(secondary.sm, None);
    assert!(matches!(
        secondary.connection,
        Connection::Disconnected { .. }
    ));

    // Changes arrive through the subscriptions.
    sim.set_node_state("secondary-2", NodeState::Paused);
    sim.set_subjects(&["s-1", "s-2"]);
    wait_store(&store, "the paused node and the new subjects", |s| {
        let n = s.read(|r| r.node("secondary-2")).unwrap().unwrap();
        let subjects = s.read(|r| r.unit_subjects()).unwrap();
        n.info.state == NodeState::Paused && subjects.len() == 2 && subjects.contains("s-1")
    })
    .await;

    // Across an IAM restart: a change made while IAM was away is read again on reconnect.
    sim.stop().await;
    sim.set_node_state("secondary-1", NodeState::Unprovisioned);
    sim.set_subjects(&["s-3"]);
    sim.start_again().await.unwrap();
    wait_store(&store, "the state read after the restart", |s| {
        let n = s.read(|r| r.node("secondary-1")).unwrap().unwrap();
        let subjects = s.read(|r| r.unit_subjects()).unwrap();
        n.info.state == NodeState::Unprovisioned && subjects.iter().collect::<Vec<_>>() == ["s-3"]
    })
    .await;
    // And the main node kept its SM part throughout.
    let main = store.read(|r| r.node("main")).unwrap().unwrap();
    assert_eq!(main.sm, Some(sm_info()));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_agents_iam_trait_answers_what_the_iam_answers() {
    let (sim, client) = start().await;
    let iam = &client;

    assert_eq!(Iam::main_node_id(iam), "main");
    assert_eq!(
        Iam::create_key(iam, "main", "online", "", "secret")
            .await
            .unwrap(),
        sim_csr("main", "online")
    );
    assert_eq!(
        Iam::apply_cert(iam, "secondary-1", "iam", "pem")
            .await
            .unwrap(),
        AppliedCert {
            cert_url: "file:///var/aos/crypt/secondary-1/iam.pem".into(),
            serial: "a001".into(),
        }
    );
    assert_eq!(
        Iam::cert_types(iam, "secondary-1").await.unwrap(),
        ["iam", "sm"]
    );
    Iam::start_provisioning(iam, "secondary-1", "pw")
        .await
        .unwrap();
    Iam::finish_provisioning(iam, "secondary-1", "pw")
        .await
        .unwrap();
    Iam::deprovision(iam, "secondary-2", "pw").await.unwrap();
    assert_eq!(
        sim.node("secondary-2").unwrap().state,
        NodeState::Unprovisioned
    );

    sim.fail("StartProvisioning", 9, "node is already provisioned");
    let err = Iam::start_provisioning(iam, "main", "pw")
        .await
        .unwrap_err();
    assert_eq!(err.aos_code, Some(9));
    assert_eq!(err.message, "node is already provisioned");
    // As the cloud gets it.
    let info = err.to_error_info("start provisioning");
    assert_eq!(info.aos_code, 9);
    assert_eq!(
        info.message,
        "start provisioning: node is already provisioned"
    );

    sim.fail("CreateKey", 10, "key storage full");
    let err = Iam::create_key(iam, "main", "iam", "", "")
        .await
        .unwrap_err();
    assert_eq!(
        (err.aos_code, err.message.as_str()),
        (Some(10), "key storage full")
    );
    sim.fail("GetCertTypes", 1, "unknown node type");
    let err = Iam::cert_types(iam, "main").await.unwrap_err();
    assert!(err.message.contains("unknown node type"), "{err}");
    // The error reaches the cloud as a failure even without an Aos code.
    assert_eq!(err.to_error_info("").aos_code, 1);

    sim.wait_calls("GetCertTypes", 2).await;
    assert_eq!(
        sim.calls_to("CreateKey"),
        [
            "CreateKey main online \"\" secret",
            "CreateKey main iam \"\" ",
        ]
    );
}

// ---- TLS ------------------------------------------------------------------------------------

struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(
                params,
                rcgen::KeyPair::generate().unwrap(),
            )
            .unwrap(),
        }
    }

    fn leaf(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_the_unit_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("unit CA");
    let (cert, key) = ca.leaf("localhost");
    let mut cfg = SimIamConfig::example();
    cfg.tls = Some(SimIamTls {
        cert,
        key,
        client_ca: Some(ca.pem()),
    });
    let sim = SimIam::start(cfg).await.unwrap();

    let tls = |identity| ClientTls {
        ca_cert: ca.pem(),
        identity,
        domain: Some("localhost".into()),
    };
    let mut config = IamConfig::plain(sim.url(), Some(sim.url()));
    config.public_tls = Some(tls(Some(ca.leaf("cm"))));
    config.protected_tls = Some(tls(Some(ca.leaf("cm"))));
    let client = IamClient::connect(&config).await.unwrap();
    assert_eq!(client.current_node_id(), "main");
    client.pause_node("secondary-1").await.unwrap();

    // Without a client certificate the protected API refuses; the public one answers.
    config.public_tls = Some(tls(None));
    config.protected_tls = Some(tls(None));
    let no_cert = IamClient::new(&config).unwrap();
    let err = no_cert.pause_node("secondary-1").await.unwrap_err();
    assert!(err.message.contains("client certificate"), "{err}");
    assert!(no_cert.get_system_info().await.is_ok());

    // As the upstream CM connects: public with the CA, protected with the certificate of its
    // certStorage type that the public API reports (file:// URLs).
    let dir = tempfile::tempdir().unwrap();
    let (cm_cert, cm_key) = ca.leaf("cm");
    let cert_path = dir.path().join("cm.pem");
    let key_path = dir.path().join("cm.key");
    std::fs::write(&cert_path, cm_cert).unwrap();
    std::fs::write(&key_path, cm_key).unwrap();
    sim.set_cert_files(
        "cm",
        &format!("file://{}", cert_path.display()),
        &format!("file://{}", key_path.display()),
        &[7],
    );
    let client = IamClient::connect_with_cert(&config, &ca.pem(), "cm")
        .await
        .unwrap();
    client.resume_node("secondary-1").await.unwrap();
    let missing = IamClient::connect_with_cert(&config, &ca.pem(), "nope").await;
    assert!(missing.is_err());

    // A server certificate from another CA is refused by the client.
    let other = Ca::new("other CA");
    config.public_tls = Some(ClientTls {
        ca_cert: other.pem(),
        identity: Some(ca.leaf("cm")),
        domain: Some("localhost".into()),
    });
    let wrong_ca = IamClient::new(&config).unwrap();
    assert!(wrong_ca.get_system_info().await.is_err());
    assert_eq!(sim.calls_to("PauseNode"), ["PauseNode secondary-1"]);
    assert_eq!(sim.calls_to("ResumeNode"), ["ResumeNode secondary-1"]);
}

// ---- the cloud agent's certificate and provisioning handlers over the real client ----------

fn node(id: &str) -> aos_cm::api::cloud::messages::Identity {
    aos_cm::api::cloud::messages::Identity {
        codename: Some(id.into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_renewal_and_installation_run_through_the_iam() {
    use aos_cm::api::cloud::certs;
    use aos_cm::api::cloud::messages::*;
    let (sim, client) = start().await;
    let base = sim.calls().len();

    // Start: StartProvisioning, GetCertTypes, one CreateKey per type in IAM's order.
    let started = certs::start_provisioning(
        &client,
        &StartProvisioningRequest {
            correlation_id: None,
            node: node("secondary-1"),
            password: "pw".into(),
        },
    )
    .await;
    assert_eq!(started.error_info, None);
    assert_eq!(
        started
            .csrs
            .iter()
            .map(|c| (c.cert_type, c.csr.clone()))
            .collect::<Vec<_>>(),
        [
            (CertType::Iam, sim_csr("secondary-1", "iam")),
            (CertType::Sm, sim_csr("secondary-1", "sm")),
        ]
    );

    // Finish: ApplyCert per certificate, then FinishProvisioning.
    let finished = certs::finish_provisioning(
        &client,
        &FinishProvisioningRequest {
            correlation_id: None,
            node: node("secondary-1"),
            certificates: vec![
                CertChainData {
                    cert_type: CertType::Iam,
                    chain: "iam pem".into(),
                },
                CertChainData {
                    cert_type: CertType::Sm,
                    chain: "sm pem".into(),
                },
            ],
            password: "pw".into(),
        },
    )
    .await;
    assert_eq!(finished.error_info, None);

    // Renewal: CreateKey with each node's secret.
    let renewed = certs::renew(
        &client,
        &RenewCertificatesNotification {
            correlation_id: None,
            certificates: vec![
                RenewCertData {
                    cert_type: CertType::Online,
                    node: node("main"),
                    serial: "1000".into(),
                    valid_till: None,
                },
                RenewCertData {
                    cert_type: CertType::Sm,
                    node: node("secondary-2"),
                    serial: "01".into(),
                    valid_till: None,
                },
            ],
            unit_secrets: UnitSecrets {
                version: "2.0.0".into(),
                nodes: vec![
                    NodeSecret {
                        node: node("main"),
                        secret: "main-secret".into(),
                    },
                    NodeSecret {
                        node: node("secondary-2"),
                        secret: "s2-secret".into(),
                    },
                ],
            },
        },
    )
    .await
    .unwrap();
    assert_eq!(renewed.requests.len(), 2);
    assert_eq!(renewed.requests[0].csr, sim_csr("main", "online"));

    // Installation: other nodes first, the main node's iam certificate last; serials from IAM.
    let mut cert_sub = client.watch_cert("online");
    opened(&mut cert_sub).await;
    let installed = certs::install(
        &client,
        &IssuedUnitCertificates {
            correlation_id: None,
            certificates: vec![
                IssuedCertData {
                    cert_type: CertType::Iam,
                    node: node("main"),
                    certificate_chain: "a".into(),
                },
                IssuedCertData {
                    cert_type: CertType::Online,
                    node: node("main"),
                    certificate_chain: "b".into(),
                },
                IssuedCertData {
                    cert_type: CertType::Sm,
                    node: node("secondary-2"),
                    certificate_chain: "c".into(),
                },
            ],
        },
    )
    .await;
    assert_eq!(
        installed
            .certificates
            .iter()
            .map(|c| (
                c.node.codename.clone().unwrap(),
                c.serial.clone(),
                c.error_info.is_none()
            ))
            .collect::<Vec<_>>(),
        [
            ("secondary-2".to_string(), "a003".to_string(), true),
            ("main".to_string(), "a004".to_string(), true),
            ("main".to_string(), "a005".to_string(), true),
        ]
    );
    // The main node's new online certificate is announced to its subscribers.
    let c = next_change(&mut cert_sub).await;
    assert_eq!(c.serial, "a004");

    // Deprovisioning the main node is refused without asking IAM; another node is asked.
    let refused = certs::deprovisioning(
        &client,
        &DeprovisioningRequest {
            correlation_id: None,
            node: node("main"),
            password: "pw".into(),
        },
    )
    .await;
    assert!(refused.error_info.is_some());
    let done = certs::deprovisioning(
        &client,
        &DeprovisioningRequest {
            correlation_id: None,
            node: node("secondary-2"),
            password: "pw".into(),
        },
    )
    .await;
    assert_eq!(done.error_info, None);

    // An IAM failure reaches the cloud response with IAM's text.
    sim.fail("StartProvisioning", 6, "wrong password");
    let failed = certs::start_provisioning(
        &client,
        &StartProvisioningRequest {
            correlation_id: None,
            node: node("secondary-2"),
            password: "bad".into(),
        },
    )
    .await;
    let info = failed.error_info.unwrap();
    assert_eq!(info.aos_code, 6);
    assert_eq!(info.message, "start provisioning: wrong password");
    assert!(failed.csrs.is_empty());

    assert_eq!(
        sim.calls()[base..]
            .iter()
            .filter(|c| !c.starts_with("Subscribe"))
            .cloned()
            .collect::<Vec<_>>(),
        [
            "StartProvisioning secondary-1 pw",
            "GetCertTypes secondary-1",
            "CreateKey secondary-1 iam \"\" pw",
            "CreateKey secondary-1 sm \"\" pw",
            "ApplyCert secondary-1 iam",
            "ApplyCert secondary-1 sm",
            "FinishProvisioning secondary-1 pw",
            "CreateKey main online \"\" main-secret",
            "CreateKey secondary-2 sm \"\" s2-secret",
            "ApplyCert secondary-2 sm",
            "ApplyCert main online",
            "ApplyCert main iam",
            "Deprovision secondary-2 pw",
            "StartProvisioning secondary-2 bad",
        ]
    );
}
