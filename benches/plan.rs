//! Planning time at scale: 10,000 instances (100 items × 100 instances) over 100 nodes.
//! Run: `cargo bench --bench plan` (release build). Prints the median of several runs for the
//! instances reconciler alone, for a fresh unit (every instance placed) and for a converged
//! one (every placement kept), and for the whole dry run (five reconcilers, two rounds).

use aos_cm::model::*;
use aos_cm::reconcilers::{self, CHAIN, plan_one, project};
use std::time::{Duration, Instant};

const NODES: usize = 100;
const ITEMS: usize = 100;
const PER_ITEM: u64 = 100;

fn digest(n: u64) -> Digest {
    Digest::parse(&format!("sha256:{n:064x}")).expect("valid digest")
}

fn unit() -> Snapshot {
    let mut snap = Snapshot::default();
    // The upstream UID pool [5000, 10000) holds 5,000 instances; widen it so that all 10,000
    // are placed and the figure measures placement, not pool exhaustion.
    snap.settings.uid_end = 20_000;
    for n in 0..NODES {
        let id = format!("node-{n:03}");
        let runtimes = ["crun", "runc"]
            .iter()
            .map(|t| RuntimeInfo {
                runtime_id: format!("{t}-{id}"),
                runtime_type: t.to_string(),
                arch_info: ArchInfo {
                    architecture: "amd64".into(),
                    variant: None,
                },
                os_info: OsInfo {
                    os: "linux".into(),
                    ..OsInfo::default()
                },
                ..RuntimeInfo::default()
            })
            .collect();
        snap.observed.nodes.insert(
            id.clone(),
            ObservedNode {
                info: NodeInfo {
                    node_id: id.clone(),
                    node_type: "edge".into(),
                    max_dmips: 100_000,
                    total_ram: 64 << 30,
                    state: NodeState::Provisioned,
                    ..NodeInfo::default()
                },
                sm: Some(SmInfo {
                    runtimes,
                    resources: vec![],
                }),
                node_config: None,
                connection: Connection::Connected,
                usage: None,
            },
        );
    }
    let mut desired = DesiredState::default();
    for i in 0..ITEMS as u64 {
        let index = digest(i * 2 + 1);
        let manifest = digest(i * 2 + 2);
        snap.catalogue.images.insert(
            index.clone(),
            ItemImage {
                index_digest: index.clone(),
                manifests: vec![ManifestInfo {
                    digest: manifest.clone(),
                    config_digest: manifest,
                    item_config_digest: None,
                    layers: vec![],
                    image: ImageConfig {
                        architecture: "amd64".into(),
                        os: "linux".into(),
                        ..ImageConfig::default()
                    },
                    item_config: Some(ItemConfig {
                        requested: RequestedResources {
                            cpu: Some(100),
                            ram: Some(16 << 20),
                            ..Default::default()
                        },
                        ..ItemConfig::default()
                    }),
                }],
            },
        );
        let id = format!("item-{i:03}");
        desired.items.push(DesiredItem {
            id: id.clone(),
            item_type: ItemType::Service,
            version: "1.0.0".into(),
            owner_id: format!("owner-{}", i % 10),
            index_digest: Some(index),
        });
        desired.instances.push(DesiredInstances {
            item_id: id,
            subject_id: "subject".into(),
            priority: i % 7,
            num_instances: PER_ITEM,
            labels: vec![],
        });
    }
    snap.desired = Some(desired);
    snap
}

fn median(mut f: impl FnMut() -> usize, runs: usize) -> (Duration, usize) {
    let mut times = Vec::new();
    let mut n = 0;
    for _ in 0..runs {
        let t = Instant::now();
        n = f();
        times.push(t.elapsed());
    }
    times.sort();
    (times[runs / 2], n)
}

fn main() {
    let fresh = unit();
    let (t, n) = median(|| reconcilers::instances::plan(&fresh, 0).actions.len(), 9);
    println!(
        "instances reconciler, fresh unit ({n} starts): median {:.1} ms",
        t.as_secs_f64() * 1e3
    );

    let mut converged = fresh.clone();
    for _ in 0..3 {
        for kind in CHAIN {
            for a in plan_one(kind, &converged, 0).actions {
                project::apply_as_unit(&mut converged, &a, 0);
            }
        }
    }
    let placed = converged.allocations.instances.len();
    // For profiling one path: AOS_BENCH_PROFILE=instances|network loops it alone.
    if let Ok(which) = std::env::var("AOS_BENCH_PROFILE") {
        let kind = if which == "network" {
            aos_cm::model::ReconcilerKind::Network
        } else {
            aos_cm::model::ReconcilerKind::Instances
        };
        for _ in 0..50 {
            std::hint::black_box(plan_one(kind, &converged, 0));
        }
        return;
    }
    let (t, n) = median(
        || reconcilers::instances::plan(&converged, 0).actions.len(),
        9,
    );
    println!(
        "instances reconciler, converged unit ({placed} placements, {n} actions): median {:.1} ms",
        t.as_secs_f64() * 1e3
    );
    let mut total = Duration::ZERO;
    for kind in aos_cm::model::ReconcilerKind::ALL {
        let (t, _) = median(|| plan_one(kind, &converged, 0).actions.len(), 9);
        total += t;
        println!(
            "  {kind} reconciler, converged unit: median {:.1} ms",
            t.as_secs_f64() * 1e3
        );
    }
    println!(
        "five reconcilers one after another (as the daemon plans), converged unit: {:.1} ms",
        total.as_secs_f64() * 1e3
    );
    let (t, n) = median(
        || {
            reconcilers::plan_all(&converged, 0)
                .iter()
                .map(|p| p.actions.len())
                .sum()
        },
        9,
    );
    println!(
        "dry run (five reconcilers chained, two rounds), converged unit ({n} actions): median {:.1} ms",
        t.as_secs_f64() * 1e3
    );
    let (t, n) = median(
        || {
            reconcilers::plan_all(&fresh, 0)
                .iter()
                .map(|p| p.actions.len())
                .sum()
        },
        5,
    );
    println!(
        "dry run (five reconcilers, two rounds), fresh unit ({n} actions): median {:.1} ms",
        t.as_secs_f64() * 1e3
    );
}
