//! Convergence time over loopback: the real SM server, store, runner and executor with
//! zero-delay simulated SMs; the clock runs from the desired state being committed to every
//! instance reported active. Run: `cargo bench --bench converge` (release build).

use aos_cm::sim::unit::SimUnit;
use std::time::Duration;

async fn once(nodes: usize, items: usize, instances: usize) -> Duration {
    let dir = std::env::temp_dir().join(format!(
        "aos-cm-bench-{}-{nodes}-{instances}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("cm.redb");
    let (unit, sims, desired) = SimUnit::start_synthetic(&path, nodes, items, instances)
        .await
        .expect("unit");
    let took = unit
        .converge_on(desired.as_ref(), instances, Duration::from_secs(300))
        .await
        .expect("converged");
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
    // The daemon's runtime (its blocking pool bounded as in `aos-cm run`).
    let rt = aos_cm::runtime::build().expect("runtime");
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
