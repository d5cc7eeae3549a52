//! Convergence time over loopback: the real SM server, store, runner and executor with
//! zero-delay simulated SMs; the clock runs from the desired state being committed to every
//! instance reported active. Run: `cargo bench --bench converge` (release build).

use aos_cm::api::sm::SmConfig;
use aos_cm::model::*;
use aos_cm::sim::sm::SimOptions;
use aos_cm::sim::synthetic;
use aos_cm::sim::unit::{self, SimUnit};
use aos_cm::store::Store;
use std::time::{Duration, Instant};

async fn once(nodes: usize, items: usize, instances: usize) -> Duration {
    let dir = std::env::temp_dir().join(format!(
        "aos-cm-bench-{}-{nodes}-{instances}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("cm.redb");
    let mut snap = synthetic::unit(nodes, items, instances, false);
    let desired = snap.desired.take();
    {
        let store = Store::open(&path).expect("store");
        store.write(|tx| tx.set_snapshot(&snap)).expect("seed");
    }
    let unit = SimUnit::start(&path, SmConfig::default(), None, unit::quick_runner())
        .await
        .expect("unit");
    let mut sims = Vec::new();
    for n in 0..nodes {
        let id = synthetic::node_id(n);
        sims.push(
            unit.sim(&id, synthetic::sm_info(&id), SimOptions::default())
                .await
                .expect("sim"),
        );
    }
    unit.wait_for(Duration::from_secs(30), |s| {
        s.observed
            .nodes
            .values()
            .all(|n| n.is_connected() && n.sm.is_some())
    })
    .await
    .expect("nodes connected");

    let t0 = Instant::now();
    unit.store
        .write(|tx| tx.set_desired(desired.as_ref()))
        .expect("desired");
    // Woken by each commit; reads only the reported instances, to stay out of the way.
    let mut changes = unit.store.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let active = unit
            .store
            .read(|r| r.reported_instances())
            .expect("read")
            .values()
            .filter(|r| r.state == InstanceState::Active)
            .count();
        if active >= instances {
            break;
        }
        tokio::time::timeout_at(deadline, changes.recv())
            .await
            .expect("did not converge in 300 s");
        // Counting is a full read of the statuses: at most every 5 ms, so that the harness
        // does not compete with the unit for the two cores.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while changes.try_recv().is_ok() {}
    }
    let took = t0.elapsed();
    drop(sims);
    // Wait for the unit's tasks (network allocations may still run) so that runs do not overlap.
    unit.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    took
}

fn main() {
    if std::env::var("RUST_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // AOS_BENCH_ONLY=large runs the 100-node case once (for profiling).
    let cases: Vec<(usize, usize, usize, usize)> = match std::env::var("AOS_BENCH_ONLY").as_deref()
    {
        Ok("large") => vec![(100, 100, 5000, 1)],
        _ => vec![(16, 16, 256, 5), (100, 100, 5000, 3)],
    };
    for (nodes, items, instances, runs) in cases {
        let mut times: Vec<Duration> = (0..runs)
            .map(|_| rt.block_on(once(nodes, items, instances)))
            .collect();
        times.sort();
        println!(
            "{nodes} nodes x {instances} instances: median {:.0} ms (runs: {})",
            times[runs / 2].as_secs_f64() * 1e3,
            times
                .iter()
                .map(|t| format!("{:.0}", t.as_secs_f64() * 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
