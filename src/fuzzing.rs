//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), so that both feed bytes through the same code.
//!
//! Each function takes arbitrary bytes and runs them through one parser the way the daemon
//! does. `Ok` means the input was accepted; `Err` carries the error the daemon would log or
//! report. Neither may panic: a panic on bad input is a bug.

use crate::agent;
use crate::api::cloud::messages::{self, Message};
use crate::api::cloud::{desired, telemetry, unitconfig, unitstatus};
use crate::api::proto::servicemanager::v5 as pb;
use crate::api::sm::{convert, intake::Intake};
use crate::config::Config;
use crate::model::{Connection, NodeInfo, NodeState, ObservedNode, Snapshot, UnixMillis};
use prost::Message as _;
use std::sync::OnceLock;

/// The system ID the fuzzed frames are checked against (the one of the example scenarios).
pub const SYSTEM_ID: &str = "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17";

/// The node the fuzzed SM messages come from.
const NODE: &str = "main";

fn text(data: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))
}

/// A cloud frame, read as the link reads it (`messages::parse_frame`), serialised back, and a
/// `desiredStatus` body also converted as the agent does; the scenario parser
/// (`desired::parse_frame`) sees the same text.
pub fn cloud_frame(data: &[u8]) -> Result<(), String> {
    let text = text(data)?;
    let _ = desired::parse_frame(text);
    let envelope = messages::parse_frame(text, SYSTEM_ID).map_err(|e| e.to_string())?;
    messages::to_json(&envelope)?;
    match envelope.data {
        Message::DesiredStatus(map) => agent::parse_desired(map).map(drop),
        Message::RequestLog(r) => {
            let _ = telemetry::log_requests(&r, &[NODE.to_owned()]);
            Ok(())
        }
        Message::OverrideEnvVars(o) => {
            let _ = telemetry::override_env_vars_to_sm(&o);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A unit config file (`unitconfig::parse`).
pub fn unit_config(data: &[u8]) -> Result<(), String> {
    unitconfig::parse(text(data)?)
        .map(drop)
        .map_err(|p| p.to_string())
}

/// An `aos_cm.cfg` file (`Config::from_json_str`).
pub fn config_file(data: &[u8]) -> Result<(), String> {
    Config::from_json_str(text(data)?, "aos_cm.cfg")
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The fresh-install scenario without its desired state, loaded once.
fn base_scenario() -> &'static Result<(Snapshot, UnixMillis), String> {
    static BASE: OnceLock<Result<(Snapshot, UnixMillis), String>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/desired-states/fresh-install");
        crate::scenario::load(&dir)
            .map(|s| (s.snapshot, s.now))
            .map_err(|e| e.to_string())
    })
}

/// A `desiredStatus` frame: parsed as the link and the agent do, then planned by every
/// reconciler (`plan_all`) over the observed unit of `examples/desired-states/fresh-install`.
pub fn desired_plan(data: &[u8]) -> Result<(), String> {
    let text = text(data)?;
    let envelope = messages::parse_frame(text, SYSTEM_ID).map_err(|e| e.to_string())?;
    let Message::DesiredStatus(map) = envelope.data else {
        return Err(format!(
            "not a desiredStatus but {}",
            envelope.data.message_type()
        ));
    };
    let desired = agent::parse_desired(map)?;
    let (base, now) = base_scenario().as_ref().map_err(Clone::clone)?;
    let mut snap = base.clone();
    snap.desired = Some(desired);
    let plans = crate::reconcilers::plan_all(&snap, *now);
    let _ = crate::render::plan_text(&plans);
    Ok(())
}

/// One message an SM sends on its stream (`SMOutgoingMessages`, protobuf), decoded and
/// converted into the model and into cloud messages as the SM controller and the cloud agent
/// do.
pub fn sm_message(data: &[u8]) -> Result<(), String> {
    use pb::sm_outgoing_messages::SmOutgoingMessage as Out;
    let msg = pb::SmOutgoingMessages::decode(data).map_err(|e| format!("decode: {e}"))?;
    let Some(msg) = msg.sm_outgoing_message else {
        return Err("empty SMOutgoingMessages".to_owned());
    };
    match msg {
        Out::SmInfo(info) => {
            let sm = convert::sm_info_from_pb(&info);
            let _ = convert::sm_info_to_pb(&info.node_id, &sm);
            let node = ObservedNode {
                info: NodeInfo {
                    node_id: info.node_id.clone(),
                    state: NodeState::Provisioned,
                    ..NodeInfo::default()
                },
                sm: Some(sm),
                node_config: None,
                connection: Connection::Connected,
                usage: None,
            };
            messages_json(&unitstatus::node_status(&node))
        }
        Out::NodeConfigStatus(s) => {
            let _ = convert::error_from_pb(s.error.as_ref());
            Ok(())
        }
        Out::UpdateInstancesStatus(pb::UpdateInstancesStatus { instances })
        | Out::NodeInstancesStatus(pb::NodeInstancesStatus { instances }) => {
            let mut errors = Vec::new();
            for s in &instances {
                if let Err(e) = convert::status_from_pb(NODE, s) {
                    errors.push(e);
                }
            }
            messages_json(&telemetry::env_status_to_cloud(&instances))?;
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        }
        Out::Log(l) => messages_json(&telemetry::push_log(NODE, &l)),
        Out::InstantMonitoring(m) => {
            let intake = Intake::default();
            intake.monitoring(NODE, &m);
            let nodes = intake.drain_node_monitoring();
            let instances = intake.drain_instance_monitoring();
            match telemetry::monitoring_message(nodes, instances) {
                Some(m) => messages_json(&m),
                None => Ok(()),
            }
        }
        Out::AverageMonitoring(_) => Ok(()),
        Out::Alert(a) => {
            let intake = Intake::default();
            intake.alert(NODE, &a);
            for package in telemetry::alert_packages(intake.drain_alerts()) {
                messages_json(&package)?;
            }
            Ok(())
        }
    }
}

fn messages_json<T: serde::Serialize>(v: &T) -> Result<(), String> {
    serde_json::to_string(v)
        .map(drop)
        .map_err(|e| format!("serialize: {e}"))
}

/// One entry point: the input accepted, or the error it was rejected with.
pub type Entry = fn(&[u8]) -> Result<(), String>;

/// The fuzz targets by name, for the replay test.
pub const TARGETS: [(&str, Entry); 5] = [
    ("cloud_frame", cloud_frame),
    ("unit_config", unit_config),
    ("config_file", config_file),
    ("desired_plan", desired_plan),
    ("sm_message", sm_message),
];
