//! A whole unit against the simulated cloud over loopback: the desired state comes over the
//! WebSocket, the SMs are simulated gRPC clients, and the cloud records what the unit reports.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use aos_cm::agent::AgentConfig;
use aos_cm::api::cloud::certs::{AppliedCert, Iam, IamError};
use aos_cm::api::cloud::link::{LinkConfig, LinkHandle};
use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::api::sm::SmConfig;
use aos_cm::sim::cloud::{AckMode, CloudOptions, Frame, SimCloud};
use aos_cm::sim::sm::{SimOptions, SimSm};
use common::{Unit, converged, example};
use serde_json::{Value, json};

const SYSTEM_ID: &str = "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17";

fn quick_agent() -> AgentConfig {
    AgentConfig {
        unit_status_send_timeout: Duration::from_millis(50),
        alerts_send_period: Duration::from_millis(50),
        monitoring_send_period: Duration::from_millis(100),
    }
}

fn example_desired() -> Value {
    let text =
        std::fs::read_to_string(example("fresh-install").join("desired.json")).expect("example");
    let frame: Value = serde_json::from_str(&text).expect("JSON");
    frame["data"].clone()
}

/// A unit seeded from the example but with no desired state yet: it has to come from the cloud.
async fn unit_without_desired() -> Unit {
    let u = Unit::start(&example("fresh-install"), SmConfig::default(), None).await;
    u.store
        .write(|tx| tx.set_desired(None))
        .expect("clear desired");
    u
}

async fn connect(u: &mut Unit, cloud: &SimCloud) -> LinkHandle {
    let mut link = LinkConfig::new(SYSTEM_ID, &cloud.discovery_url());
    link.backoff_min = Duration::from_millis(10);
    link.backoff_max = Duration::from_millis(100);
    let (handle, _agent) = u.unit.connect_cloud(link, quick_agent());
    handle
        .state()
        .wait_for(|s| s.connected)
        .await
        .expect("link alive");
    handle
}

/// A unit without a desired state, connected to a fresh simulated cloud.
async fn started() -> (Unit, SimCloud, LinkHandle) {
    let mut u = unit_without_desired().await;
    let cloud = SimCloud::start(CloudOptions::new(SYSTEM_ID))
        .await
        .expect("cloud");
    let link = connect(&mut u, &cloud).await;
    (u, cloud, link)
}

async fn sims(u: &Unit, options: SimOptions) -> Vec<SimSm> {
    let mut out = Vec::new();
    for (node, _) in u.nodes.clone() {
        out.push(u.sim(&node, options.clone()).await);
    }
    out
}

fn acked(frames: &[Frame], txn: &str) -> bool {
    frames.iter().any(|f| {
        f.from_unit && f.message_type().as_deref() == Some("ack") && f.txn().as_deref() == Some(txn)
    })
}

/// A full unitStatus in which every instance of the example is active.
fn all_active_full_status(frames: &[Frame]) -> Option<Value> {
    frames
        .iter()
        .filter(|f| f.from_unit && f.message_type().as_deref() == Some("unitStatus"))
        .filter_map(Frame::json)
        .filter(|v| v["data"]["isDeltaInfo"] == json!(false))
        .find(|v| {
            let groups = v["data"]["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let states: Vec<Value> = groups
                .iter()
                .flat_map(|g| g["instances"].as_array().cloned().unwrap_or_default())
                .map(|i| i["state"].clone())
                .collect();
            // 2 telemetry + 1 gateway + 1 vision + the component on each secondary node.
            states.len() >= 5 && states.iter().all(|s| s == "active")
        })
}

#[tokio::test]
async fn desired_state_from_the_cloud_converges_and_is_reported_in_full() {
    let (u, cloud, _link) = started().await;
    // A full status on connect, with the three nodes of the unit.
    let first = cloud.wait_from_unit("unitStatus", 1).await.json().unwrap();
    assert_eq!(first["data"]["isDeltaInfo"], json!(false));
    let nodes: Vec<&str> = first["data"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["identity"]["codename"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["main", "secondary-1", "secondary-2"]);

    let sims = sims(&u, SimOptions::default()).await;
    let txn = cloud.send_data(example_desired()).expect("session");
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    assert!(
        u.store.snapshot().unwrap().desired.is_some(),
        "committed before its ACK"
    );
    u.wait_for("convergence", 60, converged).await;
    // The update run ends with a full status listing every instance active.
    let full = cloud.wait_for(all_active_full_status).await;
    let items: BTreeSet<&str> = full["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["item"]["id"].as_str())
        .collect();
    assert!(items.len() >= 4, "{items:?}");
    // A node's SM goes away: a delta with just the changed section follows.
    let mut sims = sims;
    sims[1].disconnect();
    let delta = cloud
        .wait_for(|frames| {
            frames
                .iter()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some("unitStatus"))
                .filter_map(Frame::json)
                .find(|v| v["data"]["isDeltaInfo"] == json!(true))
        })
        .await;
    let keys: BTreeSet<&str> = delta["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["isDeltaInfo", "messageType", "nodes"]),
        "{delta}"
    );
    let s1 = delta["data"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["identity"]["codename"] == json!("secondary-1"))
        .cloned()
        .unwrap();
    assert_eq!(s1["isConnected"], json!(false));
}

#[tokio::test]
async fn cloud_drop_in_the_middle_of_an_update_loses_nothing() {
    let (u, cloud, link) = started().await;
    let options = SimOptions {
        delay: Duration::from_millis(200),
        ..SimOptions::default()
    };
    let sims = sims(&u, options).await;
    let txn = cloud.send_data(example_desired()).expect("session");
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    // The cloud stops answering; an SM raises an alert, which the unit sends and keeps.
    cloud.set_ack_mode(AckMode::Ignore);
    let alert = common::system_alert("disk almost full");
    assert!(sims[0].send_raw(alert).await);
    let sent = cloud.wait_from_unit("alerts", 1).await;
    assert_eq!(sent.session, 1);
    // Mid-update (the SMs are still starting instances): the connection drops.
    cloud.drop_connection();
    cloud.set_ack_mode(AckMode::Ack);
    link.state()
        .wait_for(|s| s.connected && s.sessions == 2)
        .await
        .unwrap();
    let resent = cloud
        .wait_for(|f| {
            f.iter()
                .find(|f| {
                    f.from_unit && f.session == 2 && f.message_type().as_deref() == Some("alerts")
                })
                .cloned()
        })
        .await;
    assert_eq!(resent.text, sent.text, "same txn, same bytes");
    u.wait_for("convergence", 60, converged).await;
    cloud.wait_for(all_active_full_status).await;
    // Every important message of session 1 that the cloud had not ACKed was written again in
    // session 2 with its txn; nothing was dropped after retries.
    let frames = cloud.frames();
    let important = ["alerts", "pushLog", "stateRequest", "overrideEnvVarsStatus"];
    for f in frames.iter().filter(|f| {
        f.from_unit
            && f.session == 1
            && important.contains(&f.message_type().unwrap_or_default().as_str())
    }) {
        let txn = f.txn().unwrap();
        assert!(
            frames
                .iter()
                .any(|g| g.from_unit && g.session == 2 && g.txn().as_deref() == Some(txn.as_str())),
            "{txn} was not resent"
        );
    }
    let c = link.wait_counters(|c| c.outbox.acked >= 1).await;
    assert_eq!(c.outbox.dropped_after_retries, 0);
    assert_eq!(c.connects, 2);
}

#[tokio::test]
async fn a_burst_of_desired_statuses_is_handled_in_order_and_the_newest_wins() {
    let (u, cloud, link) = started().await;
    let _sims = sims(&u, SimOptions::default()).await;
    const N: usize = 1000;
    let mut txns = Vec::with_capacity(N);
    for i in 0..N {
        let mut data = example_desired();
        // Each one supersedes the last: telemetry runs 1, 2 or 3 instances; the last asks 3.
        data["instances"][0]["numInstances"] = json!(if i == N - 1 { 3 } else { 1 + i % 2 });
        data["correlationId"] = json!(format!("burst-{i}"));
        txns.push(cloud.send_data(data).expect("session"));
    }
    let last = txns.last().cloned().unwrap();
    cloud.wait_for(|f| acked(f, &last).then_some(())).await;
    let acks: Vec<String> = cloud
        .frames()
        .iter()
        .filter(|f| f.from_unit && f.message_type().as_deref() == Some("ack"))
        .filter_map(Frame::txn)
        .collect();
    assert_eq!(acks, txns, "every one ACKed once, in arrival order");
    let c = link.counters();
    assert_eq!(c.desired_accepted, N as u64);
    let snap = u
        .wait_for("convergence on the newest", 120, |s| {
            converged(s)
                && s.allocations
                    .instances
                    .keys()
                    .filter(|k| k.item_id.as_str() == "2d7c4e1a-93b5-4f0e-8a6d-1c5b9e3f7a21")
                    .count()
                    == 3
        })
        .await;
    assert_eq!(
        snap.desired
            .as_ref()
            .and_then(|d| d.correlation_id.clone())
            .as_deref(),
        Some("burst-999")
    );
}

/// An IAM that records every call and answers from fixed data.
#[derive(Default)]
struct FakeIam {
    calls: std::sync::Mutex<Vec<String>>,
}

impl FakeIam {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

impl Iam for FakeIam {
    fn main_node_id(&self) -> String {
        "main".to_owned()
    }

    async fn create_key(
        &self,
        node: &str,
        cert_type: &str,
        _subject: &str,
        password: &str,
    ) -> Result<String, IamError> {
        self.record(format!("create_key {node} {cert_type} {password}"));
        Ok(format!("CSR {node} {cert_type}"))
    }

    async fn apply_cert(
        &self,
        node: &str,
        cert_type: &str,
        _pem: &str,
    ) -> Result<AppliedCert, IamError> {
        self.record(format!("apply_cert {node} {cert_type}"));
        Ok(AppliedCert {
            cert_url: format!("file:///certs/{node}/{cert_type}"),
            serial: format!("{:x}", node.len() * 16 + cert_type.len()),
        })
    }

    async fn cert_types(&self, node: &str) -> Result<Vec<String>, IamError> {
        self.record(format!("cert_types {node}"));
        Ok(vec!["iam".to_owned(), "online".to_owned()])
    }

    async fn start_provisioning(&self, node: &str, password: &str) -> Result<(), IamError> {
        self.record(format!("start_provisioning {node} {password}"));
        Ok(())
    }

    async fn finish_provisioning(&self, node: &str, password: &str) -> Result<(), IamError> {
        self.record(format!("finish_provisioning {node} {password}"));
        Ok(())
    }

    async fn deprovision(&self, node: &str, password: &str) -> Result<(), IamError> {
        self.record(format!("deprovision {node} {password}"));
        Err(IamError::new("node is busy"))
    }
}

async fn unit_with_fake_iam() -> (Unit, SimCloud, Arc<FakeIam>) {
    let mut u = unit_without_desired().await;
    let cloud = SimCloud::start(CloudOptions::new(SYSTEM_ID))
        .await
        .expect("cloud");
    let iam = Arc::new(FakeIam::default());
    let link = LinkConfig::new(SYSTEM_ID, &cloud.discovery_url());
    let (handle, _agent) = u.unit.connect_cloud_with(link, quick_agent(), iam.clone());
    handle.state().wait_for(|s| s.connected).await.unwrap();
    (u, cloud, iam)
}

/// The unit's answer of `message_type`, after the request's ACK.
async fn answer(cloud: &SimCloud, request_txn: &str, message_type: &str) -> Value {
    let frames = cloud
        .wait_for(|f| {
            let ack = f.iter().position(|f| {
                f.from_unit
                    && f.message_type().as_deref() == Some("ack")
                    && f.txn().as_deref() == Some(request_txn)
            })?;
            let answer = f
                .iter()
                .position(|f| f.from_unit && f.message_type().as_deref() == Some(message_type))?;
            Some((ack, answer, f[answer].clone()))
        })
        .await;
    assert!(frames.0 < frames.1, "the ACK comes before the answer");
    assert_eq!(acks(cloud, request_txn), 1, "exactly one ACK");
    frames.2.json().unwrap()["data"].clone()
}

fn acks(cloud: &SimCloud, txn: &str) -> usize {
    cloud
        .frames()
        .iter()
        .filter(|f| {
            f.from_unit
                && f.message_type().as_deref() == Some("ack")
                && f.txn().as_deref() == Some(txn)
        })
        .count()
}

#[tokio::test]
async fn provisioning_requests_are_acked_then_answered_with_their_correlation_id() {
    let (_u, cloud, iam) = unit_with_fake_iam().await;
    let txn = cloud
        .send_data(
            json!({"messageType": "startProvisioningRequest", "correlationId": "prov-1",
            "node": {"codename": "secondary-2", "type": "node"}, "password": "pw"}),
        )
        .unwrap();
    let resp = answer(&cloud, &txn, "startProvisioningResponse").await;
    assert_eq!(
        resp,
        json!({"messageType": "startProvisioningResponse", "correlationId": "prov-1",
               "node": {"codename": "secondary-2"},
               "csrs": [{"type": "iam", "csr": "CSR secondary-2 iam"},
                        {"type": "online", "csr": "CSR secondary-2 online"}]})
    );
    let txn = cloud
        .send_data(json!({"messageType": "finishProvisioningRequest", "correlationId": "prov-2",
            "node": {"codename": "secondary-2"}, "password": "pw",
            "certificates": [{"type": "iam", "chain": "PEM-IAM"}, {"type": "online", "chain": "PEM-ON"}]}))
        .unwrap();
    let resp = answer(&cloud, &txn, "finishProvisioningResponse").await;
    assert_eq!(
        resp,
        json!({"messageType": "finishProvisioningResponse", "correlationId": "prov-2",
               "node": {"codename": "secondary-2"}})
    );
    let txn = cloud
        .send_data(
            json!({"messageType": "deprovisioningRequest", "correlationId": "prov-3",
            "node": {"codename": "secondary-2"}, "password": "pw"}),
        )
        .unwrap();
    let resp = answer(&cloud, &txn, "deprovisioningResponse").await;
    assert_eq!(resp["correlationId"], json!("prov-3"));
    assert_eq!(resp["errorInfo"]["aosCode"], json!(1));
    assert!(
        resp["errorInfo"]["message"]
            .as_str()
            .unwrap()
            .contains("node is busy")
    );
    assert_eq!(
        *iam.calls.lock().unwrap(),
        [
            "start_provisioning secondary-2 pw",
            "cert_types secondary-2",
            "create_key secondary-2 iam pw",
            "create_key secondary-2 online pw",
            "apply_cert secondary-2 iam",
            "apply_cert secondary-2 online",
            "finish_provisioning secondary-2 pw",
            "deprovision secondary-2 pw",
        ]
    );
}

#[tokio::test]
async fn certificate_renewal_and_installation_in_the_required_order() {
    let (_u, cloud, iam) = unit_with_fake_iam().await;
    let txn = cloud
        .send_data(json!({"messageType": "renewCertificatesNotification",
            "certificates": [
                {"type": "iam", "node": {"codename": "main"}, "serial": "01"},
                {"type": "online", "node": {"codename": "secondary-1"}, "serial": "02"}],
            "unitSecrets": {"version": "2.0.0", "nodes": [
                {"node": {"codename": "main"}, "secret": "s-main"},
                {"node": {"codename": "secondary-1"}, "secret": "s-one"}]}}))
        .unwrap();
    let issue = answer(&cloud, &txn, "issueUnitCertificates").await;
    assert_eq!(
        issue,
        json!({"messageType": "issueUnitCertificates", "requests": [
            {"type": "iam", "node": {"codename": "main"}, "csr": "CSR main iam"},
            {"type": "online", "node": {"codename": "secondary-1"}, "csr": "CSR secondary-1 online"}]})
    );
    iam.calls.lock().unwrap().clear();
    let txn = cloud
        .send_data(
            json!({"messageType": "issuedUnitCertificates", "certificates": [
            {"type": "iam", "node": {"codename": "main"}, "certificateChain": "A"},
            {"type": "online", "node": {"codename": "main"}, "certificateChain": "B"},
            {"type": "iam", "node": {"codename": "secondary-1"}, "certificateChain": "C"},
            {"type": "online", "node": {"codename": "secondary-1"}, "certificateChain": "D"}]}),
        )
        .unwrap();
    let confirmation = answer(&cloud, &txn, "installUnitCertificatesConfirmation").await;
    // Other nodes first (their iam cert last), then the main node, its iam cert very last.
    assert_eq!(
        *iam.calls.lock().unwrap(),
        [
            "apply_cert secondary-1 online",
            "apply_cert secondary-1 iam",
            "apply_cert main online",
            "apply_cert main iam",
        ]
    );
    let serials: Vec<(&str, &str, &str)> = confirmation["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["node"]["codename"].as_str().unwrap(),
                c["type"].as_str().unwrap(),
                c["serial"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        serials,
        [
            ("secondary-1", "online", "b6"),
            ("secondary-1", "iam", "b3"),
            ("main", "online", "46"),
            ("main", "iam", "43"),
        ]
    );
}

#[tokio::test]
async fn journal_alerts_of_the_main_node_reach_the_cloud() {
    use aos_cm::api::journal::{CommandSource, JournalAlertsConfig};
    use aos_cm::journalalerts::{JournalAlertsSettings, run_journal_alerts};
    let mut u = unit_without_desired().await;
    let cloud = SimCloud::start(CloudOptions::new(SYSTEM_ID))
        .await
        .expect("cloud");
    let link = LinkConfig::new(SYSTEM_ID, &cloud.discovery_url());
    let (handle, agent) = u.unit.connect_cloud(link, quick_agent());
    handle.state().wait_for(|s| s.connected).await.unwrap();
    // A journal with one error entry, in journalctl's JSON export form.
    let line = r#"{"__CURSOR":"s=1;i=1","__REALTIME_TIMESTAMP":"1709210096000001","PRIORITY":"3","_SYSTEMD_UNIT":"systemd-networkd.service","MESSAGE":"eth0: Could not bring up interface"}"#;
    let script = format!("printf '%s\\n' '{line}'; exec sleep 3600");
    let settings = JournalAlertsSettings::new(JournalAlertsConfig::default(), "main")
        .with_source(CommandSource::new("sh", ["-c", script.as_str()]));
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(run_journal_alerts(settings, u.store.clone(), tx, stop_rx));
    let sink = agent.clone();
    tokio::spawn(async move {
        while let Some(alert) = rx.recv().await {
            sink.push_alert(alert);
        }
    });
    let frame = cloud.wait_from_unit("alerts", 1).await;
    assert_eq!(
        frame.json().unwrap()["data"],
        json!({"messageType": "alerts", "items": [
            {"tag": "systemAlert", "timestamp": "2024-02-29T12:34:56.000001Z",
             "node": {"codename": "main"}, "message": "eth0: Could not bring up interface"}]})
    );
    // The same alert again while one is queued is dropped as a duplicate.
    let item = serde_json::from_value(frame.json().unwrap()["data"]["items"][0].clone()).unwrap();
    assert!(agent.push_alert(item));
    let again = serde_json::from_value(frame.json().unwrap()["data"]["items"][0].clone()).unwrap();
    let kept = agent.push_alert(again);
    // (The period may have sent the first in between; then the second is kept.)
    assert!(!kept || agent.counters().alerts_duplicate == 0);
}

#[tokio::test]
async fn instance_state_is_requested_updated_and_reported() {
    use aos_cm::storagestate::{StorageState, sha3_224_hex};
    let mut u = unit_without_desired().await;
    let cloud = SimCloud::start(CloudOptions::new(SYSTEM_ID))
        .await
        .expect("cloud");
    let states = tempfile::tempdir().unwrap();
    let storage = Arc::new(
        StorageState::new(states.path().to_path_buf())
            .await
            .unwrap(),
    );
    let main = u.unit.main_node();
    let link = LinkConfig::new(SYSTEM_ID, &cloud.discovery_url());
    let (handle, agent) = u.unit.connect_cloud_full(
        link,
        quick_agent(),
        Arc::new(aos_cm::agent::NoIam { main_node: main }),
        Some(storage.clone()),
    );
    handle.state().wait_for(|s| s.connected).await.unwrap();
    let _sims = sims(&u, SimOptions::default()).await;
    let txn = cloud.send_data(example_desired()).expect("session");
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    // telemetry (item 2d7c4e1a…) has a state quota: each new instance asks for its state.
    let request = cloud
        .wait_from_unit("stateRequest", 1)
        .await
        .json()
        .unwrap();
    let data = &request["data"];
    assert_eq!(data["default"], json!(false));
    let item = data["item"]["id"].as_str().unwrap().to_owned();
    let subject = data["subject"]["id"].as_str().unwrap().to_owned();
    let instance = data["instance"].as_u64().unwrap();
    let path = states
        .path()
        .join(&item)
        .join(&subject)
        .join(instance.to_string())
        .join("state.dat");
    // The cloud answers with the state: written into the file the SM mounts.
    let content = "counter=41\n";
    let txn = cloud
        .send_data(json!({"messageType": "updateState", "item": {"id": item}, "subject": {"id": subject},
            "instance": instance, "stateChecksum": sha3_224_hex(content.as_bytes()), "state": content}))
        .unwrap();
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    agent.wait_counters(|c| c.states_updated == 1).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
    // The unit status carries the checksum of the state it now holds.
    let reported = |sum: String| {
        let (item, subject) = (item.clone(), subject.clone());
        move |frames: &[Frame]| {
            frames
                .iter()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some("unitStatus"))
                .filter_map(Frame::json)
                .flat_map(|v| {
                    v["data"]["instances"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter(|g| g["item"]["id"] == json!(item) && g["subject"]["id"] == json!(subject))
                .flat_map(|g| g["instances"].as_array().cloned().unwrap_or_default())
                .any(|i| i["instance"] == json!(instance) && i["stateChecksum"] == json!(sum))
                .then_some(())
        }
    };
    cloud
        .wait_for(reported(sha3_224_hex(content.as_bytes())))
        .await;
    // The instance changes its state: the unit sends it, with its checksum.
    let changed = "counter=42\n";
    // Written whole (a new file renamed over the old): the unit reads the file on a blocking
    // thread, and a truncate-then-write could be seen half done, as an empty state.
    let staged = path.with_extension("new");
    std::fs::write(&staged, changed).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let new_state = cloud
        .wait_for(|frames| {
            frames
                .iter()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some("newState"))
                .filter_map(Frame::json)
                .find(|v| {
                    v["data"]["instance"] == json!(instance)
                        && v["data"]["item"]["id"] == json!(item)
                })
        })
        .await;
    let sent: Vec<Value> = cloud
        .from_unit("newState")
        .iter()
        .filter_map(Frame::json)
        .map(|v| v["data"]["state"].clone())
        .collect();
    assert_eq!(
        new_state["data"]["state"],
        json!(changed),
        "newState sent: {sent:?}"
    );
    assert_eq!(
        new_state["data"]["stateChecksum"],
        json!(sha3_224_hex(changed.as_bytes()))
    );
    assert!(agent.counters().new_states >= 1);
    cloud
        .wait_for(reported(sha3_224_hex(changed.as_bytes())))
        .await;
    // The cloud rejects it: the unit asks for the state again.
    let before = cloud.from_unit("stateRequest").len();
    cloud
        .send_data(json!({"messageType": "stateAcceptance", "item": {"id": item}, "subject": {"id": subject},
            "instance": instance, "checksum": sha3_224_hex(changed.as_bytes()), "result": "rejected",
            "reason": "too old"}))
        .unwrap();
    cloud.wait_from_unit("stateRequest", before + 1).await;
}

#[tokio::test]
async fn log_requests_go_to_the_nodes_and_their_parts_come_back_as_push_log() {
    let (u, cloud, _link) = started().await;
    let options = SimOptions {
        log_parts: 3,
        ..SimOptions::default()
    };
    let mut sims = sims(&u, options).await;
    // secondary-2's SM goes away: its part of the request is answered with an error at once.
    sims.pop().expect("three nodes").disconnect();
    u.wait_for("secondary-2 away", 30, |s| {
        s.observed
            .nodes
            .get("secondary-2")
            .is_some_and(|n| !n.is_connected())
    })
    .await;
    let txn = cloud
        .send_data(
            json!({"messageType": "requestLog", "correlationId": "log-7", "logType": "systemLog",
            "filter": {"nodeIds": [{"codename": "main"}, {"codename": "secondary-2"}]}}),
        )
        .unwrap();
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    let logs: Vec<Value> = cloud
        .wait_for(|frames| {
            let logs: Vec<Value> = frames
                .iter()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some("pushLog"))
                .filter_map(|f| f.json().map(|v| v["data"].clone()))
                .collect();
            (logs.len() >= 4).then_some(logs)
        })
        .await;
    assert!(
        logs.iter().all(|l| l["correlationId"] == json!("log-7")),
        "{logs:?}"
    );
    let from_main: Vec<(u64, u64)> = logs
        .iter()
        .filter(|l| l["node"]["codename"] == json!("main"))
        .map(|l| {
            (
                l["part"].as_u64().unwrap(),
                l["partsCount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(from_main, [(1, 3), (2, 3), (3, 3)]);
    let away = logs
        .iter()
        .find(|l| l["node"]["codename"] == json!("secondary-2"))
        .expect("an answer for the node that is away");
    assert_eq!(away["status"], json!("error"));
    assert!(
        away["errorInfo"]["message"]
            .as_str()
            .unwrap()
            .contains("secondary-2"),
        "{away}"
    );
}

#[tokio::test]
async fn node_monitoring_is_sent_on_its_period() {
    let (u, cloud, _link) = started().await;
    let sims = sims(&u, SimOptions::default()).await;
    let sample = pb::SmOutgoingMessages {
        sm_outgoing_message: Some(
            pb::sm_outgoing_messages::SmOutgoingMessage::InstantMonitoring(pb::InstantMonitoring {
                node_monitoring: Some(pb::MonitoringData {
                    timestamp: Some(prost_types::Timestamp {
                        seconds: 1_790_000_000,
                        nanos: 0,
                    }),
                    ram: 1024,
                    cpu: 50,
                    download: 7,
                    upload: 9,
                    ..Default::default()
                }),
                instances_monitoring: vec![],
            }),
        ),
    };
    assert!(sims[0].send_raw(sample).await);
    let frame = cloud
        .wait_for(|frames| {
            frames
                .iter()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some("monitoringData"))
                .filter_map(Frame::json)
                .find(|v| !v["data"]["nodes"].as_array().is_none_or(Vec::is_empty))
        })
        .await;
    let node = &frame["data"]["nodes"][0];
    assert_eq!(node["node"], json!({"codename": "main"}));
    assert_eq!(
        node["items"][0],
        json!({"timestamp": "2026-09-21T14:13:20.000000Z", "ram": 1024, "cpu": 50,
               "download": 7, "upload": 9})
    );
}

#[tokio::test]
async fn env_var_overrides_restart_the_matching_instances_in_place() {
    const TELEMETRY: &str = "2d7c4e1a-93b5-4f0e-8a6d-1c5b9e3f7a21";
    let (u, cloud, _link) = started().await;
    let sims = sims(&u, SimOptions::default()).await;
    let txn = cloud.send_data(example_desired()).expect("session");
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    let before = u.wait_for("convergence", 60, converged).await;
    let starts = |sims: &[SimSm]| -> Vec<u32> {
        let mut v: Vec<(String, u32)> = sims
            .iter()
            .flat_map(|s| {
                s.state
                    .lock()
                    .unwrap()
                    .starts
                    .iter()
                    .map(|(k, n)| (k.to_string(), *n))
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    };
    let starts_before = starts(&sims);
    let txn = cloud
        .send_data(
            json!({"messageType": "overrideEnvVars", "correlationId": "env-1", "items": [
            {"item": {"id": TELEMETRY}, "variables": [
                {"name": "LOG_LEVEL", "value": "debug"},
                {"name": "OLD", "value": "x", "ttl": "2001-01-01T00:00:00Z"}]}]}),
        )
        .unwrap();
    let status = answer(&cloud, &txn, "overrideEnvVarsStatus").await;
    assert_eq!(status["correlationId"], json!("env-1"));
    let statuses = status["statuses"].as_array().unwrap();
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0]["name"], json!("LOG_LEVEL"));
    assert!(statuses[0].get("errorInfo").is_none(), "{status}");
    assert!(
        statuses[1]["errorInfo"]["message"]
            .as_str()
            .unwrap()
            .contains("ttl"),
        "{status}"
    );
    // The telemetry instances are restarted with the variable; nothing else moves.
    let after = u
        .wait_for("telemetry restarted with its env", 60, |s| {
            converged(s)
                && s.allocations
                    .instances
                    .values()
                    .filter(|p| p.ident.item_id.as_str() == TELEMETRY)
                    .all(|p| p.env == [("LOG_LEVEL".to_owned(), "debug".to_owned())])
        })
        .await;
    for (ident, p) in &after.allocations.instances {
        let old = &before.allocations.instances[ident];
        assert_eq!(
            (&p.node_id, p.uid),
            (&old.node_id, old.uid),
            "{ident} moved"
        );
    }
    // Restarted exactly the two telemetry instances.
    let starts_after = starts(&sims);
    let restarted: u32 = starts_after
        .iter()
        .zip(&starts_before)
        .map(|(a, b)| a - b)
        .sum();
    assert_eq!(restarted, 2, "{starts_before:?} → {starts_after:?}");
    // A new desired status keeps the overrides.
    let txn = cloud.send_data(example_desired()).unwrap();
    cloud.wait_for(|f| acked(f, &txn).then_some(())).await;
    let snap = u.store.snapshot().unwrap();
    assert_eq!(snap.desired.unwrap().env_overrides.len(), 2);
}
