//! The cloud link over real loopback sockets against the simulated cloud: discovery, the
//! upgrade, framing, ACK/NACK/resend, ordering, bad input, reconnection and TLS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aos_cm::api::cloud::link::{
    CloudInbox, CloudLink, LinkConfig, LinkError, LinkHandle, LinkState,
};
use aos_cm::api::cloud::messages::{
    self, AlertItem, Alerts, Envelope, Identity, InstanceIdent, Message, MonitoringData, NewState,
    OverrideEnvVarsStatus, PushLog, StateRequest, SystemAlert,
};
use aos_cm::api::cloud::transport;
use aos_cm::sim::cloud::{AckMode, CloudOptions, Frame, ServerTls, SimCloud};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SYSTEM_ID: &str = "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17";

/// Records what the link hands over; `request` can be held back by a gate.
#[derive(Default)]
struct Inbox {
    desired: Mutex<Vec<Map<String, Value>>>,
    requests: Mutex<Vec<Envelope>>,
    reject_desired: Mutex<bool>,
    gate: Mutex<Option<Arc<Notify>>>,
    notify: Notify,
}

impl CloudInbox for Inbox {
    async fn desired_status(&self, data: Map<String, Value>) -> Result<(), String> {
        if data.contains_key("items") && *self.reject_desired.lock().unwrap() {
            return Err("items[0].item.id: missing".to_owned());
        }
        self.desired.lock().unwrap().push(data);
        self.notify.notify_waiters();
        Ok(())
    }

    async fn request(&self, envelope: Envelope) {
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.notified().await;
        }
        self.requests.lock().unwrap().push(envelope);
        self.notify.notify_waiters();
    }
}

impl Inbox {
    async fn wait_requests(&self, n: usize) -> Vec<Envelope> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let r = self.requests.lock().unwrap();
                if r.len() >= n {
                    return r.clone();
                }
            }
            notified.await;
        }
    }
}

struct Harness {
    cloud: SimCloud,
    link: LinkHandle,
    inbox: Arc<Inbox>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_with(options: CloudOptions, tune: impl FnOnce(&mut LinkConfig)) -> Harness {
    let cloud = SimCloud::start(options).await.expect("sim cloud");
    let mut config = LinkConfig::new(SYSTEM_ID, &cloud.discovery_url());
    tune(&mut config);
    let (link, runner) = CloudLink::build(config);
    let inbox = Arc::new(Inbox::default());
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(runner.run(inbox.clone(), stop_rx));
    Harness {
        cloud,
        link,
        inbox,
        stop,
        task,
    }
}

async fn start() -> Harness {
    start_with(CloudOptions::new(SYSTEM_ID), |_| {}).await
}

async fn wait_state(link: &LinkHandle, pred: impl Fn(&LinkState) -> bool) {
    let mut rx = link.state();
    rx.wait_for(|s| pred(s)).await.expect("link alive");
}

fn alert(message: &str) -> Message {
    Message::Alerts(Alerts {
        correlation_id: None,
        items: vec![AlertItem::SystemAlert(SystemAlert {
            timestamp: "2026-11-28T10:00:00.000000Z".to_owned(),
            node: Identity::with_codename("main"),
            message: message.to_owned(),
        })],
    })
}

fn acks_for(frames: &[Frame], txn: &str) -> usize {
    frames
        .iter()
        .filter(|f| {
            f.from_unit
                && f.message_type().as_deref() == Some("ack")
                && f.txn().as_deref() == Some(txn)
        })
        .count()
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn is_v7_time(s: &str) -> bool {
    // YYYY-MM-DDThh:mm:ss.ffffffZ
    let b = s.as_bytes();
    b.len() == 27
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[26] == b'Z'
        && s[20..26].bytes().all(|c| c.is_ascii_digit())
}

/// Asserts the v7 header of a unit frame: exactly version, systemId, createdAt, txn.
fn assert_header(frame: &Frame) {
    assert!(frame.binary, "unit frames are BINARY: {}", frame.text);
    let v = frame.json().expect("JSON frame");
    let header = v["header"].as_object().expect("header object");
    let mut keys: Vec<&str> = header.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["createdAt", "systemId", "txn", "version"],
        "{}",
        frame.text
    );
    assert_eq!(header["version"], json!(7));
    assert_eq!(header["systemId"], json!(SYSTEM_ID));
    assert!(
        is_v7_time(header["createdAt"].as_str().unwrap()),
        "{}",
        frame.text
    );
    assert!(is_uuid(header["txn"].as_str().unwrap()), "{}", frame.text);
    let root: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(root.len(), 2, "only header and data: {}", frame.text);
}

#[tokio::test]
async fn discovery_request_and_upgrade_headers() {
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.extra_urls_before = vec![
        "ws://127.0.0.1:1/unreachable".to_owned(),
        "not a url".to_owned(),
    ];
    let h = start_with(options, |_| {}).await;
    wait_state(&h.link, |s| s.connected).await;
    assert_eq!(
        h.cloud.discovery_requests(),
        vec![json!({"version": 7, "systemId": SYSTEM_ID, "supportedProtocols": ["wss"]})]
    );
    let headers = h.cloud.upgrade_headers();
    assert_eq!(
        headers.len(),
        1,
        "the unreachable URLs never reached the server"
    );
    assert_eq!(headers[0]["authorization"], "Bearer sim-token");
    assert_eq!(headers[0]["accept"], "application/json");
    let c = h.link.counters();
    assert_eq!((c.discovery_ok, c.connect_failed, c.connects), (1, 2, 1));
}

#[tokio::test]
async fn every_outgoing_type_is_framed_with_the_v7_header() {
    let h = start().await;
    wait_state(&h.link, |s| s.connected).await;
    let ident = InstanceIdent {
        item: Identity::with_id("svc"),
        subject: Identity::with_id("subj"),
        instance: 0,
    };
    let messages = vec![
        alert("boom"),
        Message::OverrideEnvVarsStatus(OverrideEnvVarsStatus::default()),
        Message::MonitoringData(MonitoringData::default()),
        Message::PushLog(PushLog::default()),
        Message::StateRequest(StateRequest {
            ident: ident.clone(),
            ..Default::default()
        }),
        Message::NewState(NewState {
            ident,
            ..Default::default()
        }),
    ];
    let mut txns = Vec::new();
    for m in messages {
        let t = m.message_type();
        let txn = h.link.send(m).await.expect("queued");
        let frame = h.cloud.wait_from_unit(t, 1).await;
        assert_eq!(frame.txn().as_deref(), Some(txn.as_str()));
        assert_header(&frame);
        txns.push(txn);
    }
    txns.sort();
    txns.dedup();
    assert_eq!(txns.len(), 6, "every message has its own txn");
    // All were ACKed by the cloud, so nothing is left to resend.
    let c = h.link.wait_counters(|c| c.outbox.acked == 6).await;
    let _ = h.stop.send(true);
    h.task.await.unwrap();
    assert_eq!((c.outbox.sent, c.outbox.acked, c.outbox.resent), (6, 6, 0));
}

#[tokio::test(start_paused = true)]
async fn unacked_message_is_sent_exactly_four_times_then_dropped() {
    let h = start().await;
    wait_state(&h.link, |s| s.connected).await;
    h.cloud.set_ack_mode(AckMode::Ignore);
    let txn = h.link.send(alert("no ack")).await.unwrap();
    let fourth = h.cloud.wait_from_unit("alerts", 4).await;
    // Let well over one more deadline pass (paused clock: no real waiting).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let sent = h.cloud.from_unit("alerts");
    assert_eq!(sent.len(), 4, "one write and three resends");
    assert!(
        sent.iter().all(|f| f.text == fourth.text),
        "resends are byte-identical"
    );
    assert_eq!(fourth.txn().as_deref(), Some(txn.as_str()));
    let c = h.link.counters();
    assert_eq!(c.outbox.dropped_after_retries, 1);
    assert_eq!((c.outbox.sent, c.outbox.resent), (1, 3));
}

#[tokio::test(start_paused = true)]
async fn nack_resends_after_retry_after_without_using_a_retry() {
    let h = start().await;
    wait_state(&h.link, |s| s.connected).await;
    h.cloud.set_ack_mode(AckMode::Nack(700));
    let txn = h.link.send(alert("nacked")).await.unwrap();
    // Five NACKs in a row: more than the three retries a timeout would allow.
    h.cloud.wait_from_unit("alerts", 5).await;
    h.cloud.set_ack_mode(AckMode::Ack);
    let sixth = h.cloud.wait_from_unit("alerts", 6).await;
    assert_eq!(sixth.txn().as_deref(), Some(txn.as_str()));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let c = h.link.counters();
    assert_eq!(c.outbox.acked, 1);
    assert_eq!(c.outbox.nacked, 5);
    assert_eq!(c.outbox.dropped_after_retries, 0);
    assert_eq!(h.cloud.from_unit("alerts").len(), 6);
}

#[tokio::test]
async fn every_incoming_message_gets_exactly_one_ack_and_is_handled_in_order() {
    let h = start().await;
    wait_state(&h.link, |s| s.connected).await;
    let gate = Arc::new(Notify::new());
    *h.inbox.gate.lock().unwrap() = Some(gate.clone());
    // The first request blocks its handler; the others must still be ACKed at once.
    let mut txns = Vec::new();
    for i in 0..3 {
        let txn = h
            .cloud
            .send_data(
                json!({"messageType": "requestLog", "correlationId": format!("log-{i}"),
                "logType": "systemLog", "filter": {"nodeIds": [{"codename": "main"}]}}),
            )
            .expect("session open");
        txns.push(txn);
    }
    for txn in &txns {
        h.cloud
            .wait_for(|f| (acks_for(f, txn) == 1).then_some(()))
            .await;
    }
    assert!(
        h.inbox.requests.lock().unwrap().is_empty(),
        "handler still held"
    );
    *h.inbox.gate.lock().unwrap() = None;
    gate.notify_one();
    let handled = h.inbox.wait_requests(3).await;
    let order: Vec<&str> = handled.iter().map(|e| e.header.txn.as_str()).collect();
    assert_eq!(order, txns.iter().map(String::as_str).collect::<Vec<_>>());
    // The ACK is exactly {"messageType":"ack"} under the request's txn, and is never resent.
    let ack = h
        .cloud
        .frames()
        .into_iter()
        .find(|f| f.from_unit && f.message_type().as_deref() == Some("ack"))
        .unwrap();
    assert_header(&ack);
    assert_eq!(ack.json().unwrap()["data"], json!({"messageType": "ack"}));
    for txn in &txns {
        assert_eq!(acks_for(&h.cloud.frames(), txn), 1);
    }
    assert_eq!(h.link.counters().acks_sent, 3);
}

#[tokio::test]
async fn desired_status_is_acked_only_after_commit_and_not_when_rejected() {
    let h = start().await;
    wait_state(&h.link, |s| s.connected).await;
    *h.inbox.reject_desired.lock().unwrap() = true;
    let bad = h
        .cloud
        .send_data(
            json!({"messageType": "desiredStatus", "items": [{"item": {"type": "service"}}]}),
        )
        .unwrap();
    let good = h
        .cloud
        .send_data(json!({"messageType": "desiredStatus", "nodes": []}))
        .unwrap();
    h.cloud
        .wait_for(|f| (acks_for(f, &good) == 1).then_some(()))
        .await;
    assert_eq!(acks_for(&h.cloud.frames(), &bad), 0, "rejected: no ACK");
    assert_eq!(
        h.inbox.desired.lock().unwrap().len(),
        1,
        "committed before its ACK"
    );
    let c = h.link.counters();
    assert_eq!((c.desired_accepted, c.desired_rejected), (1, 1));
}

#[tokio::test]
async fn bad_frames_are_counted_and_dropped_without_ack() {
    let h = start().await;
    wait_state(&h.link, |s| s.connected).await;
    let frame = |version: u64, system_id: &str, data: Value| {
        WsMessage::binary(
            json!({"header": {"version": version, "systemId": system_id, "txn": "t-bad"},
                   "data": data})
            .to_string()
            .into_bytes(),
        )
    };
    let log = json!({"messageType": "requestLog", "filter": {}});
    h.cloud.send_raw(frame(6, SYSTEM_ID, log.clone()));
    h.cloud.send_raw(frame(7, "someone-else", log.clone()));
    h.cloud.send_raw(WsMessage::text(
        json!({"header": {"version": 7, "systemId": SYSTEM_ID, "txn": "t-bad"}, "data": log})
            .to_string(),
    ));
    h.cloud.send_raw(WsMessage::binary(b"{not json".to_vec()));
    h.cloud.send_raw(frame(
        7,
        SYSTEM_ID,
        json!({"messageType": "firmwareUpdate"}),
    ));
    h.cloud.send_raw(frame(
        7,
        SYSTEM_ID,
        json!({"messageType": "requestLog", "filter": "not an object"}),
    ));
    h.cloud.send_raw(frame(
        7,
        SYSTEM_ID,
        json!({"messageType": "unitStatus", "isDeltaInfo": false}),
    ));
    // A good message after all that is still ACKed on the same session. `systemID` spelled as
    // upstream's tests do: keys are case-insensitive.
    h.cloud.send_raw(WsMessage::binary(
        json!({"header": {"version": 7, "systemID": SYSTEM_ID, "txn": "t-good"},
               "data": {"messageType": "requestLog", "correlationId": "c", "filter": {}}})
        .to_string()
        .into_bytes(),
    ));
    h.cloud
        .wait_for(|f| (acks_for(f, "t-good") == 1).then_some(()))
        .await;
    assert_eq!(acks_for(&h.cloud.frames(), "t-bad"), 0);
    let c = h.link.counters();
    assert_eq!(c.wrong_version, 1);
    assert_eq!(c.wrong_system_id, 1);
    assert_eq!(c.text_ignored, 1);
    assert_eq!(c.malformed, 2, "bad JSON and a bad body");
    assert_eq!(c.unknown_type, 1);
    assert_eq!(c.unexpected, 1);
    assert_eq!(c.acks_sent, 1);
    assert_eq!(h.cloud.sessions(), 1, "no reconnect for bad input");
}

#[tokio::test]
async fn oversized_frame_is_refused_and_the_link_recovers() {
    let h = start_with(CloudOptions::new(SYSTEM_ID), |c| {
        c.max_message_size = 4096;
        c.backoff_min = Duration::from_millis(1);
        c.backoff_max = Duration::from_millis(5);
    })
    .await;
    wait_state(&h.link, |s| s.connected).await;
    h.cloud.send_raw(WsMessage::binary(vec![b' '; 10_000]));
    wait_state(&h.link, |s| s.sessions == 2 && s.connected).await;
    assert_eq!(h.link.counters().oversized, 1);
    // The new session works.
    let txn = h
        .cloud
        .send_data(json!({"messageType": "requestLog", "correlationId": "c", "filter": {}}))
        .unwrap();
    h.cloud
        .wait_for(|f| (acks_for(f, &txn) == 1).then_some(()))
        .await;
}

#[tokio::test]
async fn blob_urls_are_matched_by_correlation_id_and_acked() {
    let dir = tempfile::tempdir().unwrap();
    let content = b"layer bytes";
    let hex = "0000000000000000000000000000000000000000000000000000000000000001";
    std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
    std::fs::write(dir.path().join("sha256").join(hex), content).unwrap();
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.blob_dir = Some(dir.path().to_path_buf());
    let h = start_with(options, |_| {}).await;
    wait_state(&h.link, |s| s.connected).await;
    let digest = format!("sha256:{hex}");
    let urls = h
        .link
        .request_blob_urls(vec![digest.clone()])
        .await
        .expect("answered");
    assert_eq!(urls.items.len(), 1);
    assert_eq!(urls.items[0].digest, digest);
    assert_eq!(urls.items[0].size, content.len() as u64);
    // `sha256` carries the SHA3-256 of the file, as the real cloud does.
    use sha3::Digest as _;
    let sha3: String = sha3::Sha3_256::digest(content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(urls.items[0].sha256, sha3);
    let request = h.cloud.wait_from_unit("requestBlobUrls", 1).await;
    assert_eq!(
        request.json().unwrap()["data"]["correlationId"],
        json!(urls.correlation_id)
    );
    let answer = h
        .cloud
        .frames()
        .into_iter()
        .find(|f| !f.from_unit && f.message_type().as_deref() == Some("blobUrls"))
        .unwrap();
    let answer_txn = answer.txn().unwrap();
    h.cloud
        .wait_for(|f| (acks_for(f, &answer_txn) == 1).then_some(()))
        .await;
}

#[tokio::test(start_paused = true)]
async fn blob_urls_request_times_out_and_is_not_resent() {
    let h = start().await; // the cloud ACKs but never answers (no blob folder)
    wait_state(&h.link, |s| s.connected).await;
    let err = h
        .link
        .request_blob_urls(vec![format!("sha256:{}", "a".repeat(64))])
        .await
        .expect_err("no answer");
    assert!(err.to_string().contains("no blobUrls answer"), "{err}");
    h.cloud.set_ack_mode(AckMode::Ignore);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.cloud.from_unit("requestBlobUrls").len(), 1);
    assert_eq!(h.link.counters().blob_url_timeouts, 1);

    // Without the cloud's ACK either: withdrawn at the timeout, so no resends after it.
    let before = h.cloud.from_unit("requestBlobUrls").len();
    let _ = h
        .link
        .request_blob_urls(vec![format!("sha256:{}", "b".repeat(64))])
        .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    // Written once; the resend deadline equals the wait, so at most one resend raced it.
    let after = h.cloud.from_unit("requestBlobUrls").len() - before;
    assert!((1..=2).contains(&after), "{after} writes");
    assert_eq!(h.link.counters().blob_url_timeouts, 2);
}

/// A download waiting for blob URLs when the link stops is told at once (it held up the
/// daemon's stop for the whole response wait); a request after the stop fails at once too.
#[tokio::test(start_paused = true)]
async fn a_blob_urls_request_ends_when_the_link_stops() {
    let h = start().await; // the cloud ACKs but never answers (no blob folder)
    wait_state(&h.link, |s| s.connected).await;
    let link = h.link.clone();
    let waiting = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let r = link
            .request_blob_urls(vec![format!("sha256:{}", "c".repeat(64))])
            .await;
        (r, started.elapsed())
    });
    h.cloud.wait_from_unit("requestBlobUrls", 1).await;
    h.stop.send(true).unwrap();
    h.task.await.unwrap();
    let (result, took) = waiting.await.unwrap();
    assert!(
        matches!(result, Err(LinkError::Stopped)),
        "{:?}",
        result.map(|_| ())
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    let after = h
        .link
        .request_blob_urls(vec![format!("sha256:{}", "d".repeat(64))])
        .await;
    assert!(matches!(after, Err(LinkError::Stopped)));
}

#[tokio::test(start_paused = true)]
async fn reconnects_after_the_cloud_restarts_and_resends_unacked_important_messages() {
    let mut h = start().await;
    wait_state(&h.link, |s| s.connected).await;
    h.cloud.set_ack_mode(AckMode::Ignore);
    let txn = h.link.send(alert("keep me")).await.unwrap();
    let first = h.cloud.wait_from_unit("alerts", 1).await;
    // Monitoring is not important: it is dropped with the link.
    h.link
        .send(Message::MonitoringData(MonitoringData::default()))
        .await
        .unwrap();
    h.cloud.wait_from_unit("monitoringData", 1).await;
    h.cloud.stop();
    wait_state(&h.link, |s| !s.connected).await;
    let refused = h
        .link
        .send(Message::MonitoringData(MonitoringData::default()))
        .await;
    assert!(
        refused.is_err(),
        "non-important messages are refused while down"
    );
    h.cloud.set_ack_mode(AckMode::Ack);
    h.cloud.restart().await.unwrap();
    wait_state(&h.link, |s| s.connected && s.sessions == 2).await;
    let again = h
        .cloud
        .wait_for(|f| {
            f.iter()
                .find(|f| {
                    f.from_unit && f.session == 2 && f.message_type().as_deref() == Some("alerts")
                })
                .cloned()
        })
        .await;
    assert_eq!(again.text, first.text, "same txn, same bytes");
    assert_eq!(again.txn().as_deref(), Some(txn.as_str()));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let c = h.link.counters();
    assert_eq!(c.outbox.acked, 1);
    assert_eq!(
        c.outbox.dropped_on_disconnect, 2,
        "the monitoring message, and the refused one"
    );
    assert_eq!(c.disconnects, 1);
    assert_eq!(
        h.cloud.discovery_requests().len(),
        2,
        "endpoint list used up: rediscovered"
    );
    let monitoring_in_session_2 = h
        .cloud
        .from_unit("monitoringData")
        .into_iter()
        .filter(|f| f.session == 2)
        .count();
    assert_eq!(monitoring_in_session_2, 0);
}

#[tokio::test(start_paused = true)]
async fn unauthorized_upgrade_drops_the_cache_and_rediscovers() {
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.reject_first_upgrades = 1;
    options.next_request_delay_ms = 3_000;
    let h = start_with(options, |_| {}).await;
    let started = tokio::time::Instant::now();
    wait_state(&h.link, |s| s.connected).await;
    assert_eq!(h.cloud.discovery_requests().len(), 2);
    assert_eq!(h.link.counters().unauthorized, 1);
    // nextRequestDelay (3 s) became the first back-off delay (jitter only adds).
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_and_is_capped() {
    // Nothing listens on the discovery URL.
    let (link, runner) = CloudLink::build({
        let mut c = LinkConfig::new(SYSTEM_ID, "http://127.0.0.1:1/sd/v7/");
        c.backoff_max = Duration::from_secs(20);
        c
    });
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(runner.run(Arc::new(Inbox::default()), stop_rx));
    tokio::time::sleep(Duration::from_secs(600)).await;
    let attempts = link.counters().discovery_failed;
    // Delays 1, 2, 4, 8, 16 (each up to twice that with jitter), then every 20-40 s: in 600 s
    // that is between 15 and 35 attempts; an uncapped doubling would give about 10.
    assert!((15..=35).contains(&attempts), "{attempts} attempts");
    let _ = stop.send(true);
    task.await.unwrap();
}

fn rcgen_ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Sim Cloud Root");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

fn leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    names: &[&str],
    client: bool,
) -> (String, String) {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn mutual_tls_for_discovery_and_websocket() {
    let (ca, issuer) = rcgen_ca();
    let (server_cert, server_key) = leaf(&issuer, &["127.0.0.1"], false);
    let (client_cert, client_key) = leaf(&issuer, &["unit"], true);
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.tls = Some(ServerTls {
        cert_chain_pem: server_cert.into_bytes(),
        key_pem: server_key.into_bytes(),
        client_ca_pem: Some(ca.pem().into_bytes()),
    });
    let ca_pem = ca.pem();
    let with_cert = transport::client_tls(
        ca_pem.as_bytes(),
        Some((client_cert.as_bytes(), client_key.as_bytes())),
    )
    .unwrap();
    let h = start_with(options.clone(), |c| c.tls = Some(with_cert)).await;
    assert!(h.cloud.discovery_url().starts_with("https://127.0.0.1:"));
    wait_state(&h.link, |s| s.connected).await;
    let txn = h.link.send(alert("over TLS")).await.unwrap();
    let frame = h.cloud.wait_from_unit("alerts", 1).await;
    assert_eq!(frame.txn().as_deref(), Some(txn.as_str()));

    // Without a client certificate the handshake is refused: discovery fails.
    let without = transport::client_tls(ca_pem.as_bytes(), None).unwrap();
    let err = transport::discover(
        &h.cloud.discovery_url(),
        SYSTEM_ID,
        Some(&without),
        Duration::from_secs(10),
    )
    .await
    .expect_err("no client cert");
    assert!(!err.to_string().is_empty());
    // A server certificate from another CA is not trusted.
    let (other_ca, _) = rcgen_ca();
    let other = transport::client_tls(
        other_ca.pem().as_bytes(),
        Some((client_cert.as_bytes(), client_key.as_bytes())),
    )
    .unwrap();
    let err = transport::discover(
        &h.cloud.discovery_url(),
        SYSTEM_ID,
        Some(&other),
        Duration::from_secs(10),
    )
    .await
    .expect_err("untrusted server");
    assert!(
        err.to_string().contains("certificate") || err.to_string().contains("Unknown"),
        "{err}"
    );
}

#[test]
fn outgoing_importance_follows_errata_21() {
    assert!(alert("x").is_important());
    assert!(!Message::MonitoringData(MonitoringData::default()).is_important());
    assert!(!Message::UnitStatus(messages::UnitStatus::default()).is_important());
    assert!(Message::PushLog(PushLog::default()).is_important());
}

/// An HTTPS server that requires a client certificate from `ca_pem`, serves `body` for any
/// path and records the client certificate of each request.
async fn mtls_blob_server(
    server: (String, String),
    ca_pem: &str,
    body: Vec<u8>,
) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = ServerTls {
        cert_chain_pem: server.0.into_bytes(),
        key_pem: server.1.into_bytes(),
        client_ca_pem: Some(ca_pem.as_bytes().to_vec()),
    }
    .rustls_config()
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/blob",
        listener.local_addr().unwrap().port()
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            record.lock().unwrap().push(cert);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.write_all(&body).await;
            let _ = tls.shutdown().await;
        }
    });
    (url, seen)
}

#[tokio::test]
async fn blob_downloads_use_the_online_certificate_the_link_was_last_given() {
    use aos_cm::imagestore::fetch::Fetcher;
    use aos_cm::model::Digest;
    use sha2::Digest as _;
    let (ca, issuer) = rcgen_ca();
    let ca_pem = ca.pem();
    let server = leaf(&issuer, &["127.0.0.1"], false);
    let client = |name: &str| {
        let (cert, key) = leaf(&issuer, &[name], true);
        let tls = transport::client_tls(ca_pem.as_bytes(), Some((cert.as_bytes(), key.as_bytes())))
            .unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        (tls, der.to_vec())
    };
    use rustls_pki_types::pem::PemObject;
    let (first_tls, first_der) = client("online1");
    let (renewed_tls, renewed_der) = client("online2");

    let blobs = tempfile::tempdir().unwrap();
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.blob_dir = Some(blobs.path().to_path_buf());
    let h = start_with(options, |c| c.tls = Some(first_tls)).await;
    wait_state(&h.link, |s| s.connected).await;
    let content = b"blob content".to_vec();
    let (url, seen) = mtls_blob_server(server, &ca_pem, content.clone()).await;
    let sha3: String = sha3::Sha3_256::digest(&content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let hex: String = sha2::Sha256::digest(&content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let digest = Digest::parse(&format!("sha256:{hex}")).unwrap();
    h.cloud.set_blob_info(
        digest.as_str(),
        Some(messages::BlobInfo {
            digest: digest.as_str().to_owned(),
            urls: vec![url],
            sha256: sha3,
            size: content.len() as u64,
            decrypt_info: None,
            sign_info: None,
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let fetcher = Fetcher {
        link: h.link.clone(),
        install_path: dir.path().join("install"),
        download_path: dir.path().join("download"),
        roots_pem: Vec::new(),
        alerts: None,
        limits: Default::default(),
    };

    assert_eq!(
        fetcher.fetch_blob(&digest, &[], &[]).await,
        Ok(content.len() as u64)
    );
    assert_eq!(*seen.lock().unwrap(), vec![first_der.clone()]);

    // A renewed online certificate: downloads from then on present it.
    h.link.reconnect_with(Some(renewed_tls.clone())).unwrap();
    assert!(Arc::ptr_eq(&h.link.client_tls().unwrap(), &renewed_tls));
    fetcher.delete(&digest).await.unwrap();
    wait_state(&h.link, |s| s.connected).await;
    assert_eq!(
        fetcher.fetch_blob(&digest, &[], &[]).await,
        Ok(content.len() as u64)
    );
    assert_eq!(*seen.lock().unwrap(), vec![first_der, renewed_der]);
    assert_eq!(
        std::fs::read(dir.path().join("install/blobs/sha256").join(&hex)).unwrap(),
        content
    );
}
