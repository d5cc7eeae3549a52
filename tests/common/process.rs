//! The real `aos-cm run` binary as a child process, with the simulated cloud, IAM and SMs on
//! loopback: a working directory and config for the example unit, start, stop, and what the
//! cloud saw.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aos_cm::model::SmInfo;
use aos_cm::scenario;
use aos_cm::sim::cloud::{Frame, SimCloud};
use aos_cm::sim::unit;
use aos_cm::store::Store;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub const SYSTEM_ID: &str = "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17";

pub fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states/fresh-install")
}

/// A working directory with a seeded store (no desired state) and a config pointing at the
/// cloud; returns the config path and the SM infos the simulated nodes send. With `iam` the
/// daemon takes its identity and the nodes from it (the store starts without nodes); without,
/// from the config's `identity` section and the example's nodes file.
pub fn prepare(
    dir: &Path,
    cloud: &SimCloud,
    iam: Option<&aos_cm::sim::iam::SimIam>,
) -> (PathBuf, Vec<(String, SmInfo)>) {
    let sc = scenario::load(&example()).expect("example");
    let mut snap = sc.snapshot;
    let sms = unit::before_sms_connect(&mut snap);
    if iam.is_some() {
        snap.observed.nodes.clear();
    }
    // Nothing downloaded yet: the daemon fetches every blob through the cloud.
    snap.desired = None;
    snap.catalogue = Default::default();
    snap.observed.blobs.clear();
    {
        let store = Store::open(&dir.join("cm.redb")).expect("store");
        store.write(|tx| tx.set_snapshot(&snap)).expect("seed");
    }
    let mut config = json!({
        "workingDir": dir,
        "serviceDiscoveryUrl": cloud.discovery_url(),
        "cmServerUrl": "127.0.0.1:0",
        "storageDir": dir.join("storages"),
        "stateDir": dir.join("states"),
        "unitStatusSendTimeout": "100ms",
        "cloudResponseWaitTimeout": "5s",
        "alerts": {"sendPeriod": "200ms"},
        "monitoring": {"sendPeriod": "1s"},
    });
    match iam {
        Some(iam) => {
            config["iamPublicServerUrl"] = json!(iam.url());
            config["iamProtectedServerUrl"] = json!(iam.url());
        }
        None => {
            config["identity"] = json!({
                "systemId": SYSTEM_ID,
                "nodeId": "main",
                "nodesFile": example().join("nodes.json"),
            });
        }
    }
    let path = dir.join("aos_cm.cfg");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    (path, sms)
}

pub struct Daemon {
    pub child: Child,
    pub sm_addr: SocketAddr,
}

pub async fn spawn(config: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_aos-cm"))
        .args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("aos-cm run");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = lines
        .next_line()
        .await
        .expect("read stdout")
        .expect("the daemon printed its SM address");
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    Daemon {
        child,
        sm_addr: addr,
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("SM server")
}

pub fn acked(frames: &[Frame], txn: &str) -> bool {
    frames.iter().any(|f| {
        f.from_unit && f.message_type().as_deref() == Some("ack") && f.txn().as_deref() == Some(txn)
    })
}

/// A full unitStatus of session `session` (or later) with every instance active.
pub fn converged_status(frames: &[Frame], session: u64) -> Option<Value> {
    frames
        .iter()
        .filter(|f| f.from_unit && f.session >= session)
        .filter(|f| f.message_type().as_deref() == Some("unitStatus"))
        .filter_map(Frame::json)
        .filter(|v| v["data"]["isDeltaInfo"] == json!(false))
        .find(|v| {
            let states: Vec<Value> = v["data"]["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .flat_map(|g| g["instances"].as_array().cloned().unwrap_or_default())
                .map(|i| i["state"].clone())
                .collect();
            states.len() >= 5 && states.iter().all(|s| s == "active")
        })
}

pub fn desired() -> Value {
    let text = std::fs::read_to_string(example().join("desired.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["data"].clone()
}

pub async fn terminate(mut d: Daemon) -> std::process::ExitStatus {
    let pid = d.child.id().expect("running");
    // The shell's own `kill`: no procps package needed.
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .expect("kill");
    assert!(ok.success());
    tokio::time::timeout(Duration::from_secs(5), d.child.wait())
        .await
        .expect("exits within 5 s after SIGTERM")
        .expect("wait")
}

/// The example unit ready for a daemon in IAM mode: a working directory, the simulated cloud
/// (serving the example's blobs) and IAM, which stay up while the daemon restarts, the config
/// and the SM infos of the nodes.
pub struct ExampleUnit {
    pub dir: tempfile::TempDir,
    pub cloud: SimCloud,
    pub iam: aos_cm::sim::iam::SimIam,
    pub config: PathBuf,
    pub sms: Vec<(String, SmInfo)>,
}

pub async fn example_unit() -> ExampleUnit {
    let dir = tempfile::tempdir().unwrap();
    let mut options = aos_cm::sim::cloud::CloudOptions::new(SYSTEM_ID);
    options.blob_dir = Some(example().join("blobs"));
    let cloud = SimCloud::start(options).await.unwrap();
    let iam = aos_cm::sim::iam::SimIam::start(aos_cm::sim::iam::SimIamConfig::example())
        .await
        .expect("IAM");
    let (config, sms) = prepare(dir.path(), &cloud, Some(&iam));
    ExampleUnit {
        dir,
        cloud,
        iam,
        config,
        sms,
    }
}
