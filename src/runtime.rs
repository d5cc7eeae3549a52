//! The async runtime that `aos-cm run` and `aos-cm demo` run on.
//!
//! One worker thread per core (tokio's default) and at most [`BLOCKING_THREADS`] threads for
//! blocking work: file operations (`tokio::fs`, state and storage files, blob reads for the
//! file server), blob verification, the update scheduler's pass and a few store writes.
//!
//! Why the bound: tokio's default allows 512 blocking threads and starts a new one whenever a
//! blocking task finds none idle. A desired state that starts many instances issues a burst of
//! file operations at once, so the pool grew to 16–18 threads in the one-second churn, and
//! glibc gives every thread its own malloc arena (up to 8 per core). Each arena keeps the
//! memory freed in it, so the RSS grew with the number of arenas touched: in the one-second
//! churn 28.3 → 30.3 MiB over 14 minutes, still climbing, while the live heap (heaptrack) stayed
//! at 1.5 MiB. With the pool bounded at two threads the same churn holds 20.5–20.7 MiB from the
//! third minute on (benches/README.md, "Soak"). No blocking task here waits for another one, so
//! a small pool queues work but cannot deadlock; the long tasks (verification) are CPU work that
//! would not finish sooner on more threads than cores.

use tokio::runtime::{Builder, Runtime};

/// Most threads the runtime runs blocking tasks on at once; more wait in its queue.
pub const BLOCKING_THREADS: usize = 2;

/// The multi-threaded runtime with every driver (I/O, time) enabled and the blocking pool
/// bounded at [`BLOCKING_THREADS`].
pub fn build() -> std::io::Result<Runtime> {
    Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};

    #[derive(Default)]
    struct Gate {
        running: usize,
        most: usize,
        passes: usize,
    }

    /// Eight blocking tasks that each hold their thread until let through: however they are
    /// let through, no more than the bound ever run at once, and all of them finish.
    #[test]
    fn blocking_tasks_beyond_the_bound_wait_for_a_free_thread() {
        const TASKS: usize = 8;
        let rt = build().unwrap();
        let gate = Arc::new((Mutex::new(Gate::default()), Condvar::new()));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let gate = gate.clone();
                rt.spawn_blocking(move || {
                    let (lock, changed) = &*gate;
                    let mut g = lock.lock().unwrap();
                    g.running += 1;
                    g.most = g.most.max(g.running);
                    changed.notify_all();
                    while g.passes == 0 {
                        g = changed.wait(g).unwrap();
                    }
                    g.passes -= 1;
                    g.running -= 1;
                    changed.notify_all();
                })
            })
            .collect();
        let (lock, changed) = &*gate;
        for released in 0..TASKS {
            let mut g = lock.lock().unwrap();
            // Wait until the pool is full again (or holds all that are left), then let one go.
            let full = BLOCKING_THREADS.min(TASKS - released);
            while g.running < full {
                g = changed.wait(g).unwrap();
            }
            g.passes += 1;
            changed.notify_all();
        }
        rt.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
        let g = lock.lock().unwrap();
        assert_eq!(g.most, BLOCKING_THREADS);
        assert_eq!((g.running, g.passes), (0, 0));
    }
}
