//! `aos-cm demo`: the real SM server, store, reconcilers, runner and executor, in-process,
//! driving simulated nodes of the bundled example unit (or a synthetic unit of any size) over
//! loopback gRPC until the unit has converged.
//!
//! For the bundled example a simulated AosCloud runs too (HTTP service discovery and a v7
//! WebSocket on loopback): the unit connects to it, receives the desired state over the
//! WebSocket, asks for every blob with `requestBlobUrls`, downloads, verifies and stores it, and
//! reports its status back. What is simulated: the cloud and the nodes' Service Managers. Not
//! there yet: IAM (the nodes' information comes from the example). A synthetic unit (`--nodes`)
//! has no blobs; its desired state is put into the store directly.

use crate::agent::AgentConfig;
use crate::api::cloud::link::LinkConfig;
use crate::api::sm::SmConfig;
use crate::model::*;
use crate::scenario;
use crate::sim::cloud::{CloudOptions, Frame, SimCloud};
use crate::sim::sm::{SimOptions, SimSm};
use crate::sim::synthetic;
use crate::sim::unit::{self, SimUnit};
use crate::store::Store;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    let (mut snap, sms) = unit_to_run(&opts, &dir)?;
    // The bundled example goes through the simulated cloud: desired state over the WebSocket,
    // blobs downloaded. The store starts with the nodes and the installed unit config only.
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
    let store_path = dir.join("cm.redb");
    {
        let store = Store::open(&store_path).map_err(setup("opening the store"))?;
        store
            .write(|tx| tx.set_snapshot(&snap))
            .map_err(setup("seeding the store"))?;
    }
    let mut cloud = None;
    let unit = match &desired_data {
        Some((system_id, _)) => {
            let mut options = CloudOptions::new(system_id);
            options.blob_dir = Some(dir.join("example/blobs"));
            let sim = SimCloud::start(options)
                .await
                .map_err(setup("starting the simulated cloud"))?;
            let mut link = LinkConfig::new(system_id, &sim.discovery_url());
            link.backoff_min = Duration::from_millis(50);
            link.backoff_max = Duration::from_secs(1);
            let agent = AgentConfig {
                unit_status_send_timeout: Duration::from_millis(200),
                alerts_send_period: Duration::from_secs(1),
                monitoring_send_period: Duration::from_secs(5),
            };
            let started = SimUnit::start_with_cloud(
                &store_path,
                opts.sm_listen,
                SmConfig::default(),
                unit::quick_runner(),
                unit::CloudSetup {
                    link,
                    agent,
                    install_path: dir.join("install"),
                },
            )
            .await
            .map_err(setup("starting the CM"))?;
            let _ = writeln!(
                out,
                "simulated AosCloud: service discovery at {}",
                sim.discovery_url()
            );
            cloud = Some(sim);
            started
        }
        None => SimUnit::start_at(
            &store_path,
            opts.sm_listen,
            SmConfig::default(),
            unit::quick_runner(),
        )
        .await
        .map_err(setup("starting the CM"))?,
    };
    let _ = writeln!(
        out,
        "aos-cm demo: the Communication Manager with {} simulated node(s); SM server on {}",
        sms.len() - opts.external.len().min(sms.len()),
        unit.addr
    );
    let _ = writeln!(
        out,
        "desired state: {} item(s), {} instance request(s); the nodes' SMs connect over gRPC and are told what to run\n",
        desired_view.as_ref().map(|d| d.items.len()).unwrap_or(0),
        desired_view
            .as_ref()
            .map(|d| d.instances.len())
            .unwrap_or(0),
    );
    for ext in &opts.external {
        if !sms.iter().any(|(n, _)| n == ext) {
            return Err(DemoError::Setup(format!(
                "--external {ext}: no such node in the unit"
            )));
        }
        let _ = writeln!(
            out,
            "waiting for an external SM to register as node {ext} at {}",
            unit.addr
        );
    }
    let _ = writeln!(
        out,
        "An AosEdge unit is a set of nodes; on each a Service Manager (SM) runs what the\n\
         Communication Manager tells it. The CM places every requested instance on a node,\n\
         allocates networks, pushes node configs, and waits for the SMs to report back.\n"
    );
    let mut progress = Progress {
        started: Instant::now(),
        last: String::new(),
        printed_at: None,
    };
    progress.show(
        &unit.store.snapshot().map_err(setup("reading the store"))?,
        out,
        true,
    );
    let mut sims: Vec<SimSm> = Vec::new();
    for (node, info) in &sms {
        if opts.external.contains(node) {
            continue;
        }
        sims.push(
            unit.sim(node, info.clone(), SimOptions::default())
                .await
                .map_err(setup("connecting a simulated SM"))?,
        );
    }

    if let (Some(sim), Some((_, data))) = (&cloud, &desired_data) {
        if let Some(link) = unit.cloud.as_ref().map(|(l, _)| l.clone()) {
            let mut state = link.state();
            let _ = tokio::time::timeout(opts.timeout, state.wait_for(|s| s.connected)).await;
        }
        match sim.send_data(data.clone()) {
            Some(_) => {
                let _ = writeln!(
                    out,
                    "the cloud sent the desired state over the WebSocket; the unit asks for each blob (requestBlobUrls), downloads and verifies it\n"
                );
            }
            None => {
                return Err(DemoError::Setup(
                    "the unit did not connect to the simulated cloud".into(),
                ));
            }
        }
    }
    let mut changes = unit.store.subscribe();
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let result = loop {
        let snap = unit.store.snapshot().map_err(setup("reading the store"))?;
        let done = unit::converged(&snap);
        progress.show(&snap, out, done);
        if done {
            let _ = writeln!(
                out,
                "\nconverged in {:.2} s",
                progress.started.elapsed().as_secs_f64()
            );
            summary(&snap, out);
            if let Some(sim) = &cloud {
                cloud_summary(sim, deadline, out).await;
            }
            break Ok(());
        }
        if tokio::time::timeout_at(deadline, changes.recv())
            .await
            .is_err()
        {
            let conds = unit
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
            break Err(DemoError::NotConverged {
                secs: opts.timeout.as_secs(),
                conditions: if text.is_empty() {
                    "  none (actions still in flight)".into()
                } else {
                    text.join("\n")
                },
            });
        }
    };
    drop(sims);
    unit.stop().await;
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
