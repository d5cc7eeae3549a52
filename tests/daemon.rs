//! System test: the real `aos-cm run` binary as a child process, with the simulated cloud and
//! simulated SMs over loopback. Desired state → converged → unit status at the cloud; SIGKILL
//! in the middle of an update and a restart converge to the same allocations as an undisturbed
//! run; SIGTERM exits 0 promptly.
//!
//! The store starts with the nodes' IAM information only: the desired state comes over the
//! WebSocket, and every blob of the example's items is requested with `requestBlobUrls`,
//! downloaded from the `file://` URLs the simulated cloud answers with, verified and stored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aos_cm::model::{Allocations, SmInfo};
use aos_cm::scenario;
use aos_cm::sim::cloud::{CloudOptions, Frame, SimCloud};
use aos_cm::sim::sm::{SimOptions, SimSm};
use aos_cm::sim::unit;
use aos_cm::store::Store;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

const SYSTEM_ID: &str = "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states/fresh-install")
}

/// A working directory with a seeded store (no desired state) and a config pointing at the
/// cloud; returns the config path and the SM infos the simulated nodes send.
fn prepare(dir: &Path, cloud: &SimCloud) -> (PathBuf, Vec<(String, SmInfo)>) {
    let sc = scenario::load(&example()).expect("example");
    let mut snap = sc.snapshot;
    let sms = unit::before_sms_connect(&mut snap);
    // Nothing downloaded yet: the daemon fetches every blob through the cloud.
    snap.desired = None;
    snap.catalogue = Default::default();
    snap.observed.blobs.clear();
    {
        let store = Store::open(&dir.join("cm.redb")).expect("store");
        store.write(|tx| tx.set_snapshot(&snap)).expect("seed");
    }
    let config = json!({
        "workingDir": dir,
        "serviceDiscoveryUrl": cloud.discovery_url(),
        "cmServerUrl": "127.0.0.1:0",
        "storageDir": dir.join("storages"),
        "stateDir": dir.join("states"),
        "unitStatusSendTimeout": "100ms",
        "cloudResponseWaitTimeout": "5s",
        "alerts": {"sendPeriod": "200ms"},
        "monitoring": {"sendPeriod": "1s"},
        "identity": {
            "systemId": SYSTEM_ID,
            "nodeId": "main",
            "nodesFile": example().join("nodes.json"),
        }
    });
    let path = dir.join("aos_cm.cfg");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    (path, sms)
}

struct Daemon {
    child: Child,
    sm_addr: SocketAddr,
}

async fn spawn(config: &Path) -> Daemon {
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

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("SM server")
}

fn acked(frames: &[Frame], txn: &str) -> bool {
    frames.iter().any(|f| {
        f.from_unit && f.message_type().as_deref() == Some("ack") && f.txn().as_deref() == Some(txn)
    })
}

/// A full unitStatus of session `session` (or later) with every instance active.
fn converged_status(frames: &[Frame], session: u64) -> Option<Value> {
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

fn desired() -> Value {
    let text = std::fs::read_to_string(example().join("desired.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["data"].clone()
}

async fn terminate(mut d: Daemon) -> std::process::ExitStatus {
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
    let dir = tempfile::tempdir().unwrap();
    let mut options = CloudOptions::new(SYSTEM_ID);
    options.blob_dir = Some(example().join("blobs"));
    let cloud = SimCloud::start(options).await.unwrap();
    let (config, sms) = prepare(dir.path(), &cloud);
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
    let config = json!({
        "workingDir": dir.path(),
        "serviceDiscoveryUrl": cloud.discovery_url(),
        "iamPublicServerUrl": iam.url(),
        "iamProtectedServerUrl": iam.url(),
        "cmServerUrl": "127.0.0.1:0",
        "fileServerUrl": "127.0.0.1:0",
        "stateDir": dir.path().join("states"),
        "unitStatusSendTimeout": "100ms",
    });
    let (config, _) =
        aos_cm::config::Config::from_json_str(&config.to_string(), "test.cfg").unwrap();
    let daemon = aos_cm::daemon::Daemon::start(&config, unit::quick_runner())
        .await
        .expect("daemon");
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
