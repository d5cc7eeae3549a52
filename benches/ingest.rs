//! SM status ingestion over loopback: a converged synthetic unit (the real SM server, store,
//! runner and executor; one simulated SM per node over gRPC) whose nodes all report every
//! instance again at once, as UpdateInstancesStatus messages of one status or of a whole
//! node's instances. The clock runs from the first message sent to the SM controller having
//! recorded the last status (`SmCounters::statuses`). "changed" statuses carry a new error
//! message each round, so every one is written and announced (the runner and the network
//! reconciler wake up meanwhile); "unchanged" ones repeat what is stored, so nothing is
//! committed. Run: `cargo bench --bench ingest` (release build); `INGEST_ONLY="changed 1"` runs
//! only that case.

use aos_cm::sim::sm::SimSm;
use aos_cm::sim::unit::SimUnit;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const NODES: usize = 100;
const INSTANCES: usize = 5000;
const ROUNDS: usize = 5;

/// Every node reports all its instances; returns statuses per second.
async fn round(unit: &SimUnit, sims: &[SimSm], batch: usize, note: Option<&str>) -> f64 {
    let counter = &unit.sm.counters().statuses;
    let before = counter.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let sent: usize = futures::future::join_all(sims.iter().map(|s| s.report_running(batch, note)))
        .await
        .into_iter()
        .sum();
    let target = before + sent as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "statuses not recorded in 120 s");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    sent as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    // The daemon's runtime (its blocking pool bounded as in `aos-cm run`).
    let rt = aos_cm::runtime::build().expect("runtime");
    let dir = std::env::temp_dir().join(format!("aos-cm-bench-ingest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    rt.block_on(async {
        let (unit, sims, desired) =
            SimUnit::start_synthetic(&dir.join("cm.redb"), NODES, NODES, INSTANCES)
                .await
                .expect("unit");
        unit.converge_on(desired.as_ref(), INSTANCES, Duration::from_secs(300))
            .await
            .expect("converged");
        println!(
            "{NODES} nodes x {INSTANCES} instances, converged; every node reports every instance:"
        );
        // INGEST_ONLY="changed 1" (kind, statuses per message) runs one case, for profiling.
        let only = std::env::var("INGEST_ONLY").ok();
        for batch in [1, INSTANCES / NODES] {
            for changed in [true, false] {
                let kind = if changed { "changed" } else { "unchanged" };
                if only
                    .as_deref()
                    .is_some_and(|o| o != format!("{kind} {batch}"))
                {
                    continue;
                }
                let mut rates = Vec::with_capacity(ROUNDS);
                // Round 0 is a warm-up (and makes the unchanged rounds repeat what is stored).
                for r in 0..=ROUNDS {
                    // Alternating notes make each changed round differ from the one before.
                    let note = format!("round {}", r % 2);
                    let note = changed.then_some(note.as_str());
                    let rate = round(&unit, &sims, batch, note).await;
                    if r > 0 {
                        rates.push(rate);
                    }
                }
                rates.sort_by(f64::total_cmp);
                println!(
                    "  {kind} statuses, {batch} per message: median {:.0} statuses/s (runs {})",
                    rates[ROUNDS / 2],
                    rates
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        drop(sims);
        unit.stop().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}
