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

fn unit() -> Snapshot {
    // Every instance placed: the upstream UID pool (5,000) is widened for 10,000 instances.
    aos_cm::sim::synthetic::unit(NODES, ITEMS, ITEMS * PER_ITEM as usize, true)
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
