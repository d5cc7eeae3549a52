//! Crash points: the real `aos-cm run` binary with the simulated cloud, IAM and SMs on loopback
//! is SIGKILLed at a random moment of an update (while blobs download, once instances are being
//! placed and started, after a node config push, while instances activate, after the update
//! finished) and started again, once or twice per run. After each run it must:
//!
//! * open its store and converge to the placement an undisturbed run reaches;
//! * hold no IP, VLAN, subnet or UID twice;
//! * hold no installed item whose blobs are not all stored and equal to their digest;
//! * never send again a message the cloud had ACKed (same txn after the ACK).
//!
//! `cargo nextest run --test crash_points` runs 5 seeded iterations (CI);
//! `AOS_CRASH_ITERATIONS=50 AOS_CRASH_SEED=7 cargo nextest run --test crash_points` runs 50 from
//! another seed. A failure prints the seed, the iteration and the kill points;
//! `AOS_CRASH_FIRST=<iteration> AOS_CRASH_ITERATIONS=1` repeats just that one.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aos_cm::model::{Allocations, ItemState};
use aos_cm::sim::cloud::{Frame, SimCloud};
use aos_cm::sim::sm::{SimOptions, SimSm};
use aos_cm::store::Store;
use common::process::*;
use sha2::Digest as _;

/// xorshift64*: a seeded sequence, so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// splitmix64: spreads neighbouring seeds apart before they start a sequence.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where in the update the daemon is killed.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// After the n-th blob was asked for (downloads).
    Download(usize),
    /// After an SM received its first UpdateInstances (placement, starts).
    Placement(usize),
    /// After an SM received a node config.
    NodeConfig(usize),
    /// After the first unit status with an active instance (activation).
    Activation,
    /// After the converged full status (finalize).
    Finished,
}

fn pick(rng: &mut Rng, sms: usize) -> Point {
    match rng.below(5) {
        0 => Point::Download(1 + rng.below(20) as usize),
        1 => Point::Placement(rng.below(sms as u64) as usize),
        2 => Point::NodeConfig(rng.below(sms as u64) as usize),
        3 => Point::Activation,
        _ => Point::Finished,
    }
}

fn active_status(frames: &[Frame], from: usize) -> bool {
    frames[from.min(frames.len())..]
        .iter()
        .filter(|f| f.from_unit && f.message_type().as_deref() == Some("unitStatus"))
        .filter_map(Frame::json)
        .any(|v| v.to_string().contains("\"state\":\"active\""))
}

/// Waits for `point` (bounded: a point the run does not reach, such as a 20th blob, lets the
/// kill happen when the time is up) and then for a random number of scheduler turns.
async fn reach(point: Point, cloud: &SimCloud, sims: &[SimSm], rng: &mut Rng, since: usize) {
    let wait = async {
        match point {
            Point::Download(n) => {
                cloud.wait_from_unit("requestBlobUrls", n).await;
            }
            Point::Placement(i) => {
                let before = sims[i].received_count("UpdateInstances");
                sims[i]
                    .wait_received_count("UpdateInstances", before + 1)
                    .await;
            }
            Point::NodeConfig(i) => {
                let before = sims[i].received_count("SetNodeConfig");
                sims[i]
                    .wait_received_count("SetNodeConfig", before + 1)
                    .await;
            }
            Point::Activation => {
                cloud
                    .wait_for(|f| active_status(f, since).then_some(()))
                    .await;
            }
            Point::Finished => {
                cloud
                    .wait_for(|f| {
                        let later: Vec<Frame> = f[since.min(f.len())..].to_vec();
                        converged_status(&later, 0).map(|_| ())
                    })
                    .await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
    for _ in 0..rng.below(64) {
        tokio::task::yield_now().await;
    }
}

/// Every (node, runtime) an instance is placed on.
fn placement(a: &Allocations) -> BTreeMap<String, (String, String)> {
    a.instances
        .iter()
        .map(|(k, p)| (k.to_string(), (p.node_id.to_string(), p.runtime_id.clone())))
        .collect()
}

fn assert_unique<T: Ord + std::fmt::Debug>(what: &str, values: impl IntoIterator<Item = T>) {
    let mut seen = BTreeSet::new();
    for v in values {
        assert!(!seen.contains(&v), "{what} {v:?} is held twice");
        seen.insert(v);
    }
}

struct Outcome {
    allocations: Allocations,
    points: Vec<Point>,
}

/// One run of the example unit with `kills` kill points drawn from `rng` (none: undisturbed).
async fn run(rng: &mut Rng, kills: usize) -> Outcome {
    let ExampleUnit {
        dir,
        cloud,
        iam: _iam,
        config,
        sms,
    } = example_unit().await;
    let mut daemon = spawn(&config).await;
    let sm_options = SimOptions {
        delay: Duration::from_millis(rng.below(200)),
        ..SimOptions::default()
    };
    let mut sims = Vec::new();
    for (node, info) in &sms {
        let mut sim = SimSm::new(node, info.clone(), sm_options.clone());
        sim.connect(channel(daemon.sm_addr).await).await.unwrap();
        sims.push(sim);
    }
    cloud.wait_from_unit("unitStatus", 1).await;
    cloud.send_data(desired()).expect("session");
    let mut points = Vec::new();
    let mut since = 0;
    for _ in 0..kills {
        let point = pick(rng, sims.len());
        points.push(point);
        reach(point, &cloud, &sims, rng, since).await;
        daemon.child.start_kill().unwrap();
        assert!(!daemon.child.wait().await.unwrap().success());
        since = cloud.frames().len();
        daemon = spawn(&config).await;
        for sim in &mut sims {
            sim.connect(channel(daemon.sm_addr).await).await.unwrap();
        }
    }
    let session = cloud.sessions();
    tokio::time::timeout(
        Duration::from_secs(120),
        cloud.wait_for(|f| converged_status(f, session)),
    )
    .await
    .unwrap_or_else(|_| panic!("no convergence after the kills at {points:?}"));
    // Node configs are not in the unit status: a push that failed while the nodes reconnected
    // may still be waiting for its retry. Wait for every node to hold the desired one.
    let version = desired()["unitConfig"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for sim in &sims {
        tokio::time::timeout(
            Duration::from_secs(60),
            sim.wait_node_config_version(&version),
        )
        .await
        .unwrap_or_else(|_| panic!("node config {version} not pushed after {points:?}"));
    }
    let status = terminate(daemon).await;
    assert!(status.success(), "{status:?} after {points:?}");

    // The store opens and holds a converged unit.
    let store = Store::open(&dir.path().join("cm.redb"))
        .unwrap_or_else(|e| panic!("store after {points:?}: {e}"));
    let snap = store.snapshot().unwrap();
    if !aos_cm::sim::unit::converged(&snap) {
        let plans = aos_cm::reconcilers::plan_all(&snap, aos_cm::engine::wall_clock()());
        let left: Vec<String> = plans
            .iter()
            .flat_map(|p| {
                p.actions
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .chain(p.conditions.iter().map(|c| c.to_string()))
            })
            .collect();
        let nodes: Vec<String> = snap
            .observed
            .nodes
            .values()
            .map(|n| format!("{}: {:?}", n.info.node_id, n.connection))
            .collect();
        panic!("not converged after the kills at {points:?}: {left:#?}\nnodes {nodes:?}");
    }
    // Nothing is held twice.
    let a = &snap.allocations;
    let ips: Vec<String> = a
        .instance_ips
        .iter()
        .map(|(k, x)| format!("{k}: {} in {}", x.ip, x.network_id))
        .collect();
    let held = |what: &str| format!("{what} after {points:?}; IPs {ips:#?}");
    assert_unique(
        &held("IP"),
        a.instance_ips.values().map(|x| x.ip.to_string()),
    );
    assert_unique("VLAN", a.networks.values().map(|n| n.vlan_id));
    assert_unique("subnet", a.networks.values().map(|n| n.subnet.to_string()));
    assert_unique(
        "UID",
        a.instances.values().map(|p| p.uid).filter(|uid| *uid != 0),
    );
    // Every installed item is complete and verified: each blob of its image is stored and its
    // SHA-256 is its digest.
    for item in snap.observed.items.values() {
        if item.state != ItemState::Installed {
            continue;
        }
        let image = snap
            .catalogue
            .images
            .get(&item.index_digest)
            .unwrap_or_else(|| panic!("installed {} has no image", item.id.as_str()));
        for blob in image.blobs() {
            let path = dir.path().join("install/blobs/sha256").join(blob.hex());
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("installed {}: {blob}: {e}", item.id.as_str()));
            let sum: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(sum, blob.hex(), "{points:?}");
        }
    }
    // No message the cloud ACKed went out again.
    let frames = cloud.frames();
    for (i, f) in frames.iter().enumerate() {
        if f.from_unit || f.message_type().as_deref() != Some("ack") {
            continue;
        }
        let Some(txn) = f.txn() else { continue };
        let again = frames[i + 1..].iter().any(|g| {
            g.from_unit
                && g.message_type().as_deref() != Some("ack")
                && g.txn().as_deref() == Some(txn.as_str())
        });
        assert!(
            !again,
            "txn {txn} was sent again after its ACK ({points:?})"
        );
    }
    drop(sims);
    Outcome {
        allocations: snap.allocations,
        points,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_at_random_points_of_an_update_end_in_the_undisturbed_state() {
    let iterations: u64 = std::env::var("AOS_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("AOS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let reference = run(&mut Rng(0x9E37_79B9_7F4A_7C15), 0).await;
    let expected = placement(&reference.allocations);
    let first: u64 = std::env::var("AOS_CRASH_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for i in first..first + iterations {
        let mut rng = Rng(splitmix(seed.wrapping_mul(0x1_0000_0001).wrapping_add(i)) | 1);
        let kills = 1 + rng.below(2) as usize;
        let outcome = run(&mut rng, kills).await;
        assert_eq!(
            placement(&outcome.allocations),
            expected,
            "seed {seed} iteration {i}: placement after kills at {:?}",
            outcome.points
        );
        eprintln!(
            "seed {seed} iteration {i}: kills at {:?}: ok",
            outcome.points
        );
    }
}
