//! `aos-cm demo`: the real daemon (`Daemon::start`, as `aos-cm run` starts it), in-process,
//! against a simulated IAM, a simulated AosCloud and simulated Service Managers, all over
//! loopback, until the unit has converged.
//!
//! The daemon learns the system ID and the nodes from the simulated IAM (gRPC, iamanager v6),
//! connects to the simulated cloud (HTTP service discovery and a v7 WebSocket), and serves the
//! simulated SMs (gRPC, servicemanager v5). For the bundled example the cloud sends the desired
//! state over the WebSocket and the daemon asks for every blob with `requestBlobUrls`,
//! downloads, verifies and stores it, and reports the unit status back. A synthetic unit
//! (`--nodes`) has no blobs; its desired state is put into the store before the daemon starts.

use crate::config::Config;
use crate::daemon::Daemon;
use crate::model::*;
use crate::scenario;
use crate::sim::cloud::{CloudOptions, Frame, SimCloud};
use crate::sim::iam::{SimIam, SimIamConfig};
use crate::sim::sm::{SimOptions, SimSm};
use crate::sim::synthetic;
use crate::sim::unit;
use crate::store::Store;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod churn;

pub use churn::Churn;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/example_unit.rs"));
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// A synthetic unit of this many nodes instead of the bundled example.
    pub nodes: Option<usize>,
    pub instances: usize,
    /// Where the SM server listens (loopback).
    pub sm_listen: Option<std::net::SocketAddr>,
    /// Nodes left to SMs that connect from outside.
    pub external: Vec<String>,
    pub timeout: Duration,
    /// Keep the store here (for `aos-cm status`) instead of a temporary directory.
    pub workdir: Option<PathBuf>,
    /// After converging, keep changing the desired state (bundled example only).
    pub churn: Option<Churn>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("the unit did not converge within {secs} s; open conditions:\n{conditions}")]
    NotConverged { secs: u64, conditions: String },
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// Writes the embedded example unit into `dir`.
pub fn write_example(dir: &Path) -> std::io::Result<()> {
    for (rel, bytes) in embedded::FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

fn workdir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("aos-cm-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The unit to run: its initial store content and the SMInfo of each node's SM.
fn unit_to_run(
    opts: &DemoOptions,
    dir: &Path,
) -> Result<(Snapshot, Vec<(String, SmInfo)>), DemoError> {
    let mut snap = match opts.nodes {
        Some(n) => {
            let items = n.clamp(1, 64);
            synthetic::unit(n, items, opts.instances, true)
        }
        None => {
            let example = dir.join("example");
            write_example(&example).map_err(setup("writing the example unit"))?;
            scenario::load(&example)
                .map_err(setup("loading the example unit"))?
                .snapshot
        }
    };
    let sms = crate::sim::unit::before_sms_connect(&mut snap);
    Ok((snap, sms))
}

struct Progress {
    started: Instant,
    last: String,
    printed_at: Option<Instant>,
}

impl Progress {
    /// Prints the state when it changed, at most every 100 ms unless `force`.
    fn show(&mut self, snap: &Snapshot, out: &mut impl Write, force: bool) {
        if !force
            && self
                .printed_at
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        let placed = snap.allocations.instances.len();
        let items_total = snap.desired.as_ref().map(|d| d.items.len()).unwrap_or(0);
        let items_installed = snap
            .observed
            .items
            .values()
            .filter(|i| i.state == ItemState::Installed)
            .count();
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for r in snap.observed.instances.values() {
            if r.state == InstanceState::Active {
                *per_node.entry(r.node_id.as_str()).or_default() += 1;
            }
        }
        let active: usize = per_node.values().sum();
        let connected = snap
            .observed
            .nodes
            .values()
            .filter(|n| n.is_connected())
            .count();
        let nodes: Vec<String> = if snap.observed.nodes.len() <= 8 {
            snap.observed
                .nodes
                .keys()
                .map(|n| format!("{n} {}", per_node.get(n.as_str()).copied().unwrap_or(0)))
                .collect()
        } else {
            vec![format!("{} nodes", snap.observed.nodes.len())]
        };
        let line = format!(
            "nodes connected {connected}/{} · items installed {items_installed}/{items_total} · instances placed {placed}, active {active} ({})",
            snap.observed.nodes.len(),
            nodes.join(", ")
        );
        if line != self.last {
            let _ = writeln!(
                out,
                "[{:>6.2} s] {line}",
                self.started.elapsed().as_secs_f64()
            );
            self.last = line;
            self.printed_at = Some(Instant::now());
        }
    }
}

/// What the simulated cloud received: the last full unit status and the message counts.
async fn cloud_summary(sim: &SimCloud, deadline: tokio::time::Instant, out: &mut impl Write) {
    // The full status that ends the update run follows the convergence shortly.
    let full = tokio::time::timeout_at(
        deadline,
        sim.wait_for(|frames| {
            frames
                .iter()
                .rev()
                .filter(|f| f.from_unit && f.message_type().as_deref() == Some("unitStatus"))
                .filter_map(Frame::json)
                .find(|v| {
                    v["data"]["isDeltaInfo"] == serde_json::json!(false)
                        && v["data"]["instances"].as_array().is_some_and(|g| {
                            !g.is_empty()
                                && g.iter().all(|g| {
                                    g["instances"]
                                        .as_array()
                                        .is_some_and(|i| i.iter().all(|i| i["state"] == "active"))
                                })
                        })
                })
        }),
    )
    .await;
    let frames = sim.frames();
    let count = |t: &str| {
        frames
            .iter()
            .filter(|f| f.from_unit && f.message_type().as_deref() == Some(t))
            .count()
    };
    let _ = writeln!(
        out,
        "\nthe cloud received {} unitStatus, {} requestBlobUrls, {} acks (every message it sent was ACKed)",
        count("unitStatus"),
        count("requestBlobUrls"),
        count("ack")
    );
    let Ok(full) = full else {
        let _ = writeln!(
            out,
            "  (no full unit status with every instance active yet)"
        );
        return;
    };
    let data = &full["data"];
    let _ = writeln!(out, "its last full unit status says:");
    for item in data["items"].as_array().into_iter().flatten() {
        let id = item["item"]["id"]
            .as_str()
            .or(item["item"]["codename"].as_str())
            .unwrap_or("?");
        let _ = writeln!(
            out,
            "  item {}… {} v{}: {}",
            id.chars().take(8).collect::<String>(),
            item["item"]["type"].as_str().unwrap_or(""),
            item["version"].as_str().unwrap_or(""),
            item["state"].as_str().unwrap_or("")
        );
    }
    let instances: usize = data["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["instances"].as_array().map_or(0, Vec::len))
        .sum();
    let nodes = data["nodes"].as_array().map_or(0, Vec::len);
    let _ = writeln!(out, "  {instances} instance(s) active on {nodes} node(s)");
}

fn summary(snap: &Snapshot, out: &mut impl Write) {
    let _ = writeln!(out, "\nwhere everything runs:");
    let mut by_node: BTreeMap<&str, Vec<&InstancePlacement>> = BTreeMap::new();
    for p in snap.allocations.instances.values() {
        by_node.entry(p.node_id.as_str()).or_default().push(p);
    }
    let name = |id: &str| -> String { id.chars().take(8).collect() };
    for (node, list) in by_node.iter().take(10) {
        let _ = writeln!(out, "  {node}:");
        for p in list.iter().take(12) {
            let ip = snap
                .allocations
                .instance_ips
                .get(&p.ident)
                .map(|a| a.ip.to_string())
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "    item {}… instance {} v{} on {} (uid {}, ip {ip})",
                name(&p.ident.item_id),
                p.ident.instance,
                p.version,
                p.runtime_type,
                p.uid
            );
        }
        if list.len() > 12 {
            let _ = writeln!(out, "    … and {} more", list.len() - 12);
        }
    }
    if by_node.len() > 10 {
        let _ = writeln!(out, "  … and {} more nodes", by_node.len() - 10);
    }
    let _ = writeln!(out, "networks:");
    for (id, n) in &snap.allocations.networks {
        let _ = writeln!(
            out,
            "  owner {}…: subnet {}, vlan {}, {} node(s)",
            name(id),
            n.subnet,
            n.vlan_id,
            n.hosts.len()
        );
    }
}

/// Runs the demo, printing progress to `out`. Ok once converged.
/// The system ID of a synthetic unit (`--nodes`).
const SYNTHETIC_SYSTEM_ID: &str = "aos-cm-demo-synthetic-unit";

/// The daemon's configuration for the demo: everything on loopback and under `dir`.
fn demo_config(
    dir: &Path,
    cloud: &SimCloud,
    iam: &SimIam,
    sm_listen: Option<std::net::SocketAddr>,
) -> Result<Config, DemoError> {
    let config = serde_json::json!({
        "workingDir": dir,
        "serviceDiscoveryUrl": cloud.discovery_url(),
        "iamPublicServerUrl": iam.url(),
        "iamProtectedServerUrl": iam.url(),
        "cmServerUrl": sm_listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string()),
        "fileServerUrl": "127.0.0.1:0",
        "storageDir": dir.join("storages"),
        "stateDir": dir.join("states"),
        "unitStatusSendTimeout": "200ms",
        "alerts": {"sendPeriod": "1s"},
        "monitoring": {"sendPeriod": "5s"},
        "imageManager": {
            "installPath": dir.join("install"),
            "downloadPath": dir.join("download"),
        },
    });
    Config::from_json_str(&config.to_string(), "demo")
        .map(|(c, _)| c)
        .map_err(setup("the demo's configuration"))
}

/// Runs the demo, printing progress to `out`. Ok once converged.
pub async fn run(opts: DemoOptions, out: &mut (impl Write + Send)) -> Result<(), DemoError> {
    let keep = opts.workdir.is_some();
    let dir = match &opts.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(setup("creating the working directory"))?;
            let _ = std::fs::remove_file(d.join("cm.redb"));
            d.clone()
        }
        None => workdir().map_err(setup("creating a working directory"))?,
    };
    let result = run_in(&opts, &dir, out).await;
    if keep {
        let _ = writeln!(
            out,
            "\nthe store is kept in {}: `aos-cm status --store {}` shows it",
            dir.display(),
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(
    opts: &DemoOptions,
    dir: &Path,
    out: &mut (impl Write + Send),
) -> Result<(), DemoError> {
    if let Some(listen) = opts.sm_listen
        && !listen.ip().is_loopback()
    {
        return Err(DemoError::Setup(format!(
            "--sm-listen {listen}: the demo listens on loopback only (127.0.0.1 or [::1])"
        )));
    }
    if opts.churn.is_some() && opts.nodes.is_some() {
        return Err(DemoError::Setup(
            "--churn runs on the bundled example, whose desired state comes from the cloud; drop --nodes".into(),
        ));
    }
    let (mut snap, sms) = unit_to_run(opts, dir)?;
    for ext in &opts.external {
        if !sms.iter().any(|(n, _)| n == ext) {
            return Err(DemoError::Setup(format!(
                "--external {ext}: no such node in the unit"
            )));
        }
    }
    // The bundled example goes through the simulated cloud: desired state over the WebSocket,
    // blobs downloaded. The store starts with the installed unit config only; the nodes come
    // from the simulated IAM.
    let via_cloud = opts.nodes.is_none();
    let mut desired_data = None;
    if via_cloud {
        let text = std::fs::read_to_string(dir.join("example/desired.json"))
            .map_err(setup("reading the example's desired state"))?;
        let frame: serde_json::Value =
            serde_json::from_str(&text).map_err(setup("reading the example's desired state"))?;
        desired_data = Some((
            frame["header"]["systemId"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            frame["data"].clone(),
        ));
        snap.desired = None;
        snap.catalogue = Default::default();
        snap.observed.blobs.clear();
    }
    let desired_view = match &desired_data {
        Some((_, data)) => {
            let mut map = data.as_object().cloned().unwrap_or_default();
            map.remove("messageType");
            crate::agent::parse_desired(map).ok()
        }
        None => snap.desired.clone(),
    };
    let system_id = desired_data
        .as_ref()
        .map_or(SYNTHETIC_SYSTEM_ID, |(id, _)| id.as_str())
        .to_owned();

    // IAM knows the nodes (and the unit's subjects); the daemon reads them from it.
    let mut iam_config = SimIamConfig::for_nodes(
        &system_id,
        snap.observed
            .nodes
            .values()
            .map(|n| n.info.clone())
            .collect(),
    );
    iam_config.subjects = snap
        .observed
        .unit_subjects
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    let iam = SimIam::start(iam_config)
        .await
        .map_err(setup("starting the simulated IAM"))?;
    snap.observed.nodes.clear();
    {
        let store = Store::open(&dir.join("cm.redb")).map_err(setup("opening the store"))?;
        store
            .write(|tx| tx.set_snapshot(&snap))
            .map_err(setup("seeding the store"))?;
    }
    let mut options = CloudOptions::new(&system_id);
    if via_cloud {
        options.blob_dir = Some(dir.join("example/blobs"));
    }
    let cloud = SimCloud::start(options)
        .await
        .map_err(setup("starting the simulated cloud"))?;
    let config = demo_config(dir, &cloud, &iam, opts.sm_listen)?;
    let daemon = Daemon::start(&config, unit::quick_runner())
        .await
        .map_err(setup("starting the CM"))?;
    let _ = writeln!(
        out,
        "aos-cm demo: the Communication Manager daemon, with a simulated AosCloud, IAM and {} Service Manager(s), all on loopback\n\
         \x20 simulated IAM: {} (system ID {system_id}, {} node(s))\n\
         \x20 simulated AosCloud: service discovery at {}\n\
         \x20 the CM's SM server: {}, its file server: http://{}\n",
        sms.len() - opts.external.len().min(sms.len()),
        iam.url(),
        sms.len(),
        cloud.discovery_url(),
        daemon.sm_addr,
        daemon.file_server_url,
    );
    let _ = writeln!(
        out,
        "desired state: {} item(s), {} instance request(s)",
        desired_view.as_ref().map(|d| d.items.len()).unwrap_or(0),
        desired_view
            .as_ref()
            .map(|d| d.instances.len())
            .unwrap_or(0),
    );
    for ext in &opts.external {
        let _ = writeln!(
            out,
            "waiting for an external SM to register as node {ext} at {}",
            daemon.sm_addr
        );
    }
    let _ = writeln!(
        out,
        "\nAn AosEdge unit is a set of nodes; on each a Service Manager (SM) runs what the\n\
         Communication Manager tells it. The CM learns the unit's identity and nodes from IAM,\n\
         gets the desired state from the cloud, downloads and verifies the software, places\n\
         every requested instance on a node, allocates networks, pushes node configs, and\n\
         reports the unit's status back to the cloud.\n"
    );
    let base = desired_data.as_ref().map(|(_, data)| data.clone());
    let result = match converge(opts, &daemon, &sms, &cloud, desired_data, out).await {
        Ok(mut sims) => match (opts.churn, base) {
            (Some(c), Some(base)) => churn::run(c, &daemon, &mut sims, &cloud, &base, out).await,
            _ => Ok(()),
        },
        Err(e) => Err(e),
    };
    if !daemon.shutdown(Duration::from_secs(5)).await {
        let _ = writeln!(out, "(some parts of the CM did not stop within 5 s)");
    }
    result
}

/// Connects a simulated SM to the daemon's SM server.
async fn connect_sm(daemon: &Daemon, sim: &mut SimSm) -> Result<(), DemoError> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", daemon.sm_addr))
        .map_err(setup("the SM server address"))?
        .connect()
        .await
        .map_err(setup("connecting a simulated SM"))?;
    sim.connect(channel)
        .await
        .map_err(setup("connecting a simulated SM"))
}

/// Connects the simulated SMs, sends the desired state and follows the store until the unit
/// has converged or the time is up. Returns the connected SMs.
async fn converge(
    opts: &DemoOptions,
    daemon: &Daemon,
    sms: &[(String, SmInfo)],
    cloud: &SimCloud,
    desired_data: Option<(String, serde_json::Value)>,
    out: &mut (impl Write + Send),
) -> Result<Vec<SimSm>, DemoError> {
    let mut progress = Progress {
        started: Instant::now(),
        last: String::new(),
        printed_at: None,
    };
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let mut sims: Vec<SimSm> = Vec::new();
    for (node, info) in sms {
        if opts.external.contains(node) {
            continue;
        }
        let mut sim = SimSm::new(node, info.clone(), SimOptions::default());
        connect_sm(daemon, &mut sim).await?;
        sims.push(sim);
    }
    if let Some((_, data)) = desired_data {
        let mut state = daemon.link.state();
        let _ = tokio::time::timeout_at(deadline, state.wait_for(|s| s.connected)).await;
        if cloud.send_data(data).is_none() {
            return Err(DemoError::Setup(
                "the CM did not connect to the simulated cloud".into(),
            ));
        }
        let _ = writeln!(
            out,
            "the cloud sent the desired state over the WebSocket; the CM asks for each blob (requestBlobUrls), downloads and verifies it\n"
        );
    }
    let mut changes = daemon.store.subscribe();
    loop {
        let snap = daemon
            .store
            .shared_snapshot()
            .map_err(setup("reading the store"))?;
        let done = !snap.observed.nodes.is_empty() && unit::converged(&snap);
        progress.show(&snap, out, done);
        if done {
            let _ = writeln!(
                out,
                "\nconverged in {:.2} s",
                progress.started.elapsed().as_secs_f64()
            );
            summary(&snap, out);
            cloud_summary(cloud, deadline, out).await;
            return Ok(sims);
        }
        if tokio::time::timeout_at(deadline, changes.recv())
            .await
            .is_err()
        {
            let conds = daemon
                .store
                .conditions()
                .map_err(setup("reading conditions"))?;
            let mut text: Vec<String> = conds.values().map(|c| format!("  {c}")).collect();
            let plans = crate::reconcilers::plan_all(&snap, 0);
            text.extend(
                plans
                    .iter()
                    .flat_map(|p| p.conditions.iter().map(|c| format!("  {c}"))),
            );
            text.sort();
            text.dedup();
            return Err(DemoError::NotConverged {
                secs: opts.timeout.as_secs(),
                conditions: if text.is_empty() {
                    "  none (actions still in flight)".into()
                } else {
                    text.join("\n")
                },
            });
        }
    }
}
