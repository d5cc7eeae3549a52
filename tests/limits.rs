//! Hostile input at the size limits (reference cloud-protocol 2.10): each test sends something
//! over one limit, checks that the error names what was too big, and that the link or server
//! keeps serving the next good input.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aos_cm::api::cloud::link::{
    CloudInbox, CloudLink, DEFAULT_MAX_MESSAGE, LinkConfig, LinkHandle, LinkState,
};
use aos_cm::api::cloud::messages::{self, Envelope, FrameError, MAX_JSON_DEPTH};
use aos_cm::api::cloud::transport;
use aos_cm::api::iam::client::{IamClient, IamConfig};
use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::api::sm::SmConfig;
use aos_cm::fuzzing::SYSTEM_ID;
use aos_cm::sim::cloud::{CloudOptions, Frame, SimCloud};
use aos_cm::sim::iam::{SimIam, SimIamConfig};
use aos_cm::sim::sm::SimOptions;
use common::{Unit, example};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

// ---- log capture ------------------------------------------------------------------------------

/// Log lines written while a test runs (current-thread runtime: the link's tasks log on the
/// test's thread, where the subscriber is the default).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        (logs.clone(), tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// ---- cloud link harness -----------------------------------------------------------------------

#[derive(Default)]
struct Inbox;

impl CloudInbox for Inbox {
    async fn desired_status(&self, data: Map<String, Value>) -> Result<(), String> {
        aos_cm::agent::parse_desired(data).map(drop)
    }
    async fn request(&self, _envelope: Envelope) {}
}

struct Harness {
    cloud: SimCloud,
    link: LinkHandle,
    _stop: watch::Sender<bool>,
}

async fn start(tune: impl FnOnce(&mut LinkConfig)) -> Harness {
    let cloud = SimCloud::start(CloudOptions::new(SYSTEM_ID))
        .await
        .expect("sim cloud");
    let mut config = LinkConfig::new(SYSTEM_ID, &cloud.discovery_url());
    tune(&mut config);
    let (link, runner) = CloudLink::build(config);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(runner.run(Arc::new(Inbox), stop_rx));
    let mut state = link.state();
    state
        .wait_for(|s: &LinkState| s.connected)
        .await
        .expect("link alive");
    Harness {
        cloud,
        link,
        _stop: stop,
    }
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

fn frame(txn: &str, data: Value) -> Vec<u8> {
    json!({
        "header": {"version": 7, "systemId": SYSTEM_ID, "txn": txn},
        "data": data,
    })
    .to_string()
    .into_bytes()
}

/// A good request after the bad input is ACKed on the same session.
async fn still_serving(h: &Harness, sessions: u64) {
    let txn = h
        .cloud
        .send_data(json!({"messageType": "requestLog", "correlationId": "c", "filter": {}}))
        .unwrap();
    h.cloud
        .wait_for(|f| (acks_for(f, &txn) == 1).then_some(()))
        .await;
    assert_eq!(h.cloud.sessions(), sessions);
}

// ---- WebSocket message size -------------------------------------------------------------------

#[test]
fn websocket_limits_are_set() {
    assert_eq!(
        LinkConfig::new(SYSTEM_ID, "https://x").max_message_size,
        DEFAULT_MAX_MESSAGE
    );
    let ws = transport::ws_config(4096);
    assert_eq!(ws.max_message_size, Some(4096));
    assert_eq!(ws.max_frame_size, Some(4096));
}

#[tokio::test]
async fn limit_websocket_message_size() {
    let (logs, _guard) = Logs::capture();
    let h = start(|c| {
        c.max_message_size = 4096;
        c.backoff_min = Duration::from_millis(1);
        c.backoff_max = Duration::from_millis(5);
    })
    .await;
    h.cloud.send_raw(WsMessage::binary(vec![b' '; 10_000]));
    h.link
        .wait_counters(|c| c.oversized == 1 && c.connects == 2)
        .await;
    let text = logs.text();
    assert!(text.contains("10000 > 4096"), "{text}");
    // The link reconnected and handles the next frame.
    still_serving(&h, 2).await;
}

// ---- JSON nesting -----------------------------------------------------------------------------

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

#[test]
fn json_nesting_is_named_in_the_error() {
    let text = String::from_utf8(frame(
        "t",
        json!({"messageType": "requestLog", "filter": {}, "x": nested(MAX_JSON_DEPTH + 10)}),
    ))
    .unwrap();
    let e = messages::parse_frame(&text, SYSTEM_ID).unwrap_err();
    assert!(
        e.to_string().contains("nested deeper than 128 levels"),
        "{e}"
    );
    // Just under the limit parses (the envelope and data take two levels).
    let ok = String::from_utf8(frame(
        "t",
        json!({"messageType": "requestLog", "filter": {}, "x": nested(MAX_JSON_DEPTH - 3)}),
    ))
    .unwrap();
    messages::parse_frame(&ok, SYSTEM_ID).unwrap();
}

#[tokio::test]
async fn limit_json_nesting_depth() {
    let (logs, _guard) = Logs::capture();
    let h = start(|_| {}).await;
    // Ten thousand levels: far past the limit, and deep enough to overflow a stack if the
    // parser recursed without one.
    let deep = format!(
        r#"{{"header":{{"version":7,"systemId":"{SYSTEM_ID}","txn":"t-deep"}},"data":{{"messageType":"requestLog","filter":{{}},"x":{}1{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(h.cloud.send_raw(WsMessage::binary(deep.into_bytes())));
    h.link.wait_counters(|c| c.malformed == 1).await;
    assert!(logs.text().contains("nested deeper than 128 levels"));
    assert_eq!(acks_for(&h.cloud.frames(), "t-deep"), 0);
    still_serving(&h, 1).await;
}

// ---- array lengths and value sizes per message type ---------------------------------------------

fn many(n: usize, v: Value) -> Value {
    Value::Array(vec![v; n])
}

/// One over-limit body per checked member, and the words its error must contain.
fn over_limit_cases() -> Vec<(Value, &'static str)> {
    let blob = json!({"digest": "sha256:00", "urls": ["http://x"]});
    let var = json!({"name": "A", "value": "1"});
    let env_item = |vars: Value| json!({"item": {"id": "svc"}, "variables": vars});
    let cert = json!({"type": "online", "node": {"codename": "main"}, "certificateChain": "x"});
    vec![
        (
            json!({"messageType": "blobUrls", "items": many(17, blob.clone())}),
            "data.items has 17 entries, at most 16 allowed",
        ),
        (
            json!({"messageType": "blobUrls", "items": [
                {"digest": "sha256:00", "urls": many(9, json!("http://x"))}]}),
            "data.items[0].urls has 9 entries, at most 8 allowed",
        ),
        (
            json!({"messageType": "requestLog", "filter": {
                "nodeIds": many(17, json!({"codename": "n"}))}}),
            "data.filter.nodeIds has 17 entries, at most 16 allowed",
        ),
        (
            json!({"messageType": "updateState", "item": {"id": "svc"}, "subject": {"id": "s"},
                "state": "x".repeat(64 * 1024 + 1)}),
            "data.state is 65537 bytes, at most 65536 allowed",
        ),
        (
            json!({"messageType": "overrideEnvVars", "items": many(257, env_item(json!([])))}),
            "data.items has 257 entries, at most 256 allowed",
        ),
        (
            json!({"messageType": "overrideEnvVars", "items": [env_item(many(17, var))]}),
            "data.items[0].variables has 17 entries, at most 16 allowed",
        ),
        (
            json!({"messageType": "overrideEnvVars", "items": [env_item(json!([
                {"name": "A", "value": "v".repeat(257)}]))]}),
            "data.items[0].variables[0].value is 257 characters long, at most 256 allowed",
        ),
        (
            json!({"messageType": "issuedUnitCertificates", "certificates": many(81, cert.clone())}),
            "data.certificates has 81 entries, at most 80 allowed",
        ),
        (
            json!({"messageType": "renewCertificatesNotification", "certificates": [],
                "unitSecrets": {"version": "1", "nodes": many(17, json!({"node": {"codename": "n"}}))}}),
            "data.unitSecrets.nodes has 17 entries, at most 16 allowed",
        ),
        (
            json!({"messageType": "finishProvisioningRequest", "node": {"codename": "n"},
                "certificates": many(6, json!({"type": "online", "chain": "x"}))}),
            "data.certificates has 6 entries, at most 5 allowed",
        ),
    ]
}

#[test]
fn every_array_limit_is_named_in_the_error() {
    for (data, words) in over_limit_cases() {
        let text = String::from_utf8(frame("t", data)).unwrap();
        match messages::parse_frame(&text, SYSTEM_ID) {
            Err(e @ FrameError::OverLimit { .. }) => {
                assert!(e.to_string().contains(words), "{e} lacks {words:?}")
            }
            other => panic!("{words}: {other:?}"),
        }
    }
    // desiredStatus: its limits are checked when the agent converts it.
    let node = json!({"item": {"codename": "n"}, "state": "provisioned"});
    let mut data = Map::new();
    data.insert("nodes".into(), many(17, node));
    let e = aos_cm::agent::parse_desired(data).unwrap_err();
    assert!(e.contains("has 17 entries, at most 16 allowed"), "{e}");
}

#[tokio::test]
async fn limit_array_lengths_per_message() {
    let (logs, _guard) = Logs::capture();
    let h = start(|_| {}).await;
    let cases = over_limit_cases();
    for (i, (data, _)) in cases.iter().enumerate() {
        assert!(
            h.cloud
                .send_raw(WsMessage::binary(frame(&format!("t-{i}"), data.clone())))
        );
    }
    let n = cases.len() as u64;
    h.link.wait_counters(|c| c.over_limit == n).await;
    let text = logs.text();
    for (_, words) in &cases {
        assert!(text.contains(words), "log lacks {words:?}");
    }
    let frames = h.cloud.frames();
    for i in 0..cases.len() {
        assert_eq!(acks_for(&frames, &format!("t-{i}")), 0, "case {i} ACKed");
    }
    still_serving(&h, 1).await;
}

// ---- gRPC decode size: SM server --------------------------------------------------------------

const SM_LIMIT: usize = 64 * 1024;

async fn sm_unit() -> Unit {
    let config = SmConfig {
        max_message_size: SM_LIMIT,
        ..SmConfig::default()
    };
    Unit::start(&example("fresh-install"), config, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_sm_grpc_unary_decoding_size() {
    let unit = sm_unit().await;
    let mut client = pb::sm_service_client::SmServiceClient::new(unit.channel().await)
        .max_encoding_message_size(usize::MAX);
    let huge = pb::BlobsInfosRequest {
        digests: vec!["sha256:".to_owned() + &"0".repeat(64); 2000],
    };
    let status = client.get_blobs_infos(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("too large") && status.message().contains("65536"),
        "{status:?}"
    );
    // The next call on the same channel is served.
    let ok = client
        .get_blobs_infos(pb::BlobsInfosRequest::default())
        .await
        .unwrap();
    assert!(ok.into_inner().urls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_sm_grpc_stream_message_size() {
    let unit = sm_unit().await;
    let mut sm = unit.sim("main", SimOptions::default()).await;
    unit.wait_for("main connected", 10, |s| {
        s.observed.nodes["main"].is_connected()
    })
    .await;
    let huge = pb::SmOutgoingMessages {
        sm_outgoing_message: Some(pb::sm_outgoing_messages::SmOutgoingMessage::Log(
            pb::LogData {
                correlation_id: "x".into(),
                data: vec![0u8; 2 * SM_LIMIT],
                ..Default::default()
            },
        )),
    };
    assert!(sm.send_raw(huge).await);
    tokio::time::timeout(Duration::from_secs(10), sm.wait_closed())
        .await
        .expect("stream not closed");
    let errors = sm.state.lock().unwrap().stream_errors.clone();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too large") && e.contains("65536")),
        "{errors:?}"
    );
    // The node reconnects and is served again.
    drop(sm);
    let _again = unit.sim("main", SimOptions::default()).await;
    unit.wait_for("main reconnected", 10, |s| {
        s.observed.nodes["main"].is_connected()
    })
    .await;
    unit.sm.get_average_monitoring("main").await.unwrap();
}

// ---- gRPC decode size: IAM client -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_iam_client_decoding_size() {
    let mut config = SimIamConfig::example();
    let big = config.nodes[1].node_id.clone();
    let small = config.nodes[0].node_id.clone();
    config.nodes[1].title = "t".repeat(5 << 20);
    let sim = SimIam::start(config).await.unwrap();
    let mut c = IamConfig::plain(sim.url(), Some(sim.url()));
    c.request_timeout = Duration::from_secs(10);
    let client = IamClient::new(&c).unwrap();
    let e = client.get_node_info(&big).await.unwrap_err();
    assert!(
        e.to_string().contains("too large") && e.to_string().contains("4194304"),
        "{e}"
    );
    let info = client.get_node_info(&small).await.unwrap();
    assert_eq!(info.node_id, small);
}

// ---- bounded queues: what SMs send before the cloud link drains it ----------------------------

#[test]
fn limit_sm_intake_buffers() {
    use aos_cm::api::sm::intake::{ALERT_CACHE, Intake, LOG_PARTS, MONITORING_SAMPLES};
    let intake = Intake::default();
    // Alerts: a fixed cache; the overflow is counted, not queued.
    for i in 0..ALERT_CACHE + 5 {
        let alert = pb::Alert {
            timestamp: None,
            alert_item: Some(pb::alert::AlertItem::SystemAlert(pb::SystemAlert {
                message: format!("alert {i}"),
            })),
        };
        assert_eq!(intake.alert("main", &alert), i < ALERT_CACHE);
    }
    assert_eq!(intake.counters().alerts_overflow, 5);
    assert_eq!(intake.drain_alerts().len(), ALERT_CACHE);
    // Log parts: the newest are kept.
    for part in 0..LOG_PARTS as u64 + 3 {
        let log = pb::LogData {
            part,
            ..Default::default()
        };
        intake.log("main", &log);
    }
    assert_eq!(intake.counters().logs_overflow, 3);
    let logs = intake.drain_logs();
    assert_eq!(logs.len(), LOG_PARTS);
    assert_eq!(logs[0].1.part, 3);
    // Monitoring: the newest samples per node.
    for ram in 0..MONITORING_SAMPLES as u64 + 4 {
        let m = pb::InstantMonitoring {
            node_monitoring: Some(pb::MonitoringData {
                ram,
                ..Default::default()
            }),
            instances_monitoring: Vec::new(),
        };
        intake.monitoring("main", &m);
    }
    assert_eq!(intake.counters().samples_dropped, 4);
    let samples = &intake.drain_node_monitoring()["main"];
    assert_eq!(samples.len(), MONITORING_SAMPLES);
    assert_eq!(samples[0].ram, 4);
    // Still taking new input after the overflow.
    assert!(intake.alert("main", &pb::Alert::default()));
}
