//! An optional Prometheus endpoint (`metrics.enabled`, on `metrics.listen`, loopback by
//! default): `GET /metrics` answers in the text exposition format (version 0.0.4).
//!
//! What it shows: how long each reconciler's planning takes (histogram) and how many of its
//! actions failed; how many action batches its last plan gave (the work queued for it); the
//! SM nodes connected; whether the cloud link is up; the cloud messages sent, resent, ACKed and
//! NACKed, and the outgoing queue; the bytes of blobs downloaded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::cloud::link::LinkHandle;
use crate::api::sm::SmController;
use crate::reconcilers::runner::OutcomeSink;

/// Upper bounds (seconds) of the reconcile duration buckets.
const BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Default, Clone)]
struct Reconcile {
    /// Plans per bucket (not cumulative; summed when rendered).
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
    errors: u64,
    batches: u64,
}

/// Figures the daemon's parts record as they work.
#[derive(Default)]
pub struct Metrics {
    reconcile: Mutex<BTreeMap<&'static str, Reconcile>>,
    /// Bytes of blobs downloaded and stored.
    pub download_bytes: AtomicU64,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<&'static str, Reconcile>) -> R) -> R {
        f(&mut self
            .reconcile
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// One plan of `reconciler` took `took` and gave `batches` batches of actions.
    pub fn planned(&self, reconciler: &'static str, took: Duration, batches: usize) {
        let secs = took.as_secs_f64();
        self.with(|m| {
            let r = m.entry(reconciler).or_default();
            if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
                r.buckets[i] += 1;
            }
            r.count += 1;
            r.sum += secs;
            r.batches = batches as u64;
        });
    }

    /// An action of `reconciler` failed.
    pub fn failed(&self, reconciler: &'static str) {
        self.with(|m| m.entry(reconciler).or_default().errors += 1);
    }

    /// The exposition text, with the link's and the SM side's current figures.
    pub fn render(&self, link: Option<&LinkHandle>, sm: Option<&SmController>) -> String {
        let mut out = String::new();
        let reconcile = self.with(|m| m.clone());
        out.push_str(
            "# HELP aos_cm_reconcile_duration_seconds Time one plan of a reconciler takes.\n\
             # TYPE aos_cm_reconcile_duration_seconds histogram\n",
        );
        for (name, r) in &reconcile {
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(r.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "aos_cm_reconcile_duration_seconds_bucket{{reconciler=\"{name}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "aos_cm_reconcile_duration_seconds_bucket{{reconciler=\"{name}\",le=\"+Inf\"}} {}\n\
                 aos_cm_reconcile_duration_seconds_sum{{reconciler=\"{name}\"}} {}\n\
                 aos_cm_reconcile_duration_seconds_count{{reconciler=\"{name}\"}} {}",
                r.count, r.sum, r.count
            );
        }
        // One line per reconciler of a counter or gauge.
        let mut per_reconciler =
            |metric: &str, kind: &str, help: &str, value: fn(&Reconcile) -> u64| {
                let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
                for (name, r) in &reconcile {
                    let _ = writeln!(out, "{metric}{{reconciler=\"{name}\"}} {}", value(r));
                }
            };
        per_reconciler(
            "aos_cm_reconcile_errors_total",
            "counter",
            "Actions of a reconciler that failed.",
            |r| r.errors,
        );
        per_reconciler(
            "aos_cm_reconcile_queued_batches",
            "gauge",
            "Action batches the last plan of a reconciler gave.",
            |r| r.batches,
        );
        if let Some(sm) = sm {
            let _ = writeln!(
                out,
                "# HELP aos_cm_nodes_connected SM nodes with an open stream.\n\
                 # TYPE aos_cm_nodes_connected gauge\n\
                 aos_cm_nodes_connected {}",
                sm.connected_nodes().len()
            );
        }
        if let Some(link) = link {
            let c = link.counters();
            let o = c.outbox;
            let queued = c.queued;
            let _ = writeln!(
                out,
                "# HELP aos_cm_cloud_connected Whether the WebSocket to AosCloud is open.\n\
                 # TYPE aos_cm_cloud_connected gauge\n\
                 aos_cm_cloud_connected {}\n\
                 # HELP aos_cm_cloud_messages_total Messages to the cloud, by what happened to them.\n\
                 # TYPE aos_cm_cloud_messages_total counter\n\
                 aos_cm_cloud_messages_total{{event=\"sent\"}} {}\n\
                 aos_cm_cloud_messages_total{{event=\"resent\"}} {}\n\
                 aos_cm_cloud_messages_total{{event=\"acked\"}} {}\n\
                 aos_cm_cloud_messages_total{{event=\"nacked\"}} {}\n\
                 aos_cm_cloud_messages_total{{event=\"dropped\"}} {}\n\
                 # HELP aos_cm_cloud_queue_depth Messages in the outgoing queue, not ACKed yet.\n\
                 # TYPE aos_cm_cloud_queue_depth gauge\n\
                 aos_cm_cloud_queue_depth {queued}\n\
                 # HELP aos_cm_cloud_connects_total WebSocket sessions opened.\n\
                 # TYPE aos_cm_cloud_connects_total counter\n\
                 aos_cm_cloud_connects_total {}",
                u8::from(link.is_connected()),
                o.sent,
                o.resent,
                o.acked,
                o.nacked,
                o.dropped_after_retries + o.dropped_full + o.dropped_on_disconnect,
                c.connects,
            );
        }
        let _ = writeln!(
            out,
            "# HELP aos_cm_download_bytes_total Bytes of blobs downloaded and stored.\n\
             # TYPE aos_cm_download_bytes_total counter\n\
             aos_cm_download_bytes_total {}",
            self.download_bytes.load(Ordering::Relaxed)
        );
        out
    }
}

/// An [`OutcomeSink`] that records plans and failures in [`Metrics`] and passes everything on.
pub struct MeteredSink<S> {
    pub inner: S,
    pub metrics: Arc<Metrics>,
}

impl<S: OutcomeSink> OutcomeSink for MeteredSink<S> {
    fn failed(&self, reconciler: &'static str, key: &str, error: &str, attempts: u32) {
        self.metrics.failed(reconciler);
        self.inner.failed(reconciler, key, error, attempts);
    }

    fn succeeded(&self, reconciler: &'static str, key: &str) {
        self.inner.succeeded(reconciler, key);
    }

    fn resolved(&self, reconciler: &'static str, key: &str) {
        self.inner.resolved(reconciler, key);
    }

    fn planned(&self, reconciler: &'static str, took: Duration, batches: usize) {
        self.metrics.planned(reconciler, took, batches);
        self.inner.planned(reconciler, took, batches);
    }
}

/// Serves `GET /metrics` on `listener` until `stop`; anything else is 404.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    link: LinkHandle,
    sm: SmController,
    stop: watch::Receiver<bool>,
) {
    crate::api::fileserver::serve_http(listener, stop, move |req: hyper::Request<_>| {
        let body = (req.method() == hyper::Method::GET && req.uri().path() == "/metrics")
            .then(|| metrics.render(Some(&link), Some(&sm)));
        async move {
            let response = match body {
                Some(text) => hyper::Response::builder()
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(http_body_util::Full::new(bytes::Bytes::from(text))),
                None => hyper::Response::builder()
                    .status(hyper::StatusCode::NOT_FOUND)
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                        b"only GET /metrics is served here\n",
                    ))),
            };
            response.unwrap_or_default()
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_fill_the_histogram_cumulatively() {
        let m = Metrics::default();
        m.planned("images", Duration::from_micros(300), 2);
        m.planned("images", Duration::from_millis(20), 5);
        m.planned("images", Duration::from_secs(3), 0);
        m.failed("images");
        m.download_bytes.fetch_add(1234, Ordering::Relaxed);
        let text = m.render(None, None);
        for line in [
            "aos_cm_reconcile_duration_seconds_bucket{reconciler=\"images\",le=\"0.0005\"} 1",
            "aos_cm_reconcile_duration_seconds_bucket{reconciler=\"images\",le=\"0.01\"} 1",
            "aos_cm_reconcile_duration_seconds_bucket{reconciler=\"images\",le=\"0.025\"} 2",
            "aos_cm_reconcile_duration_seconds_bucket{reconciler=\"images\",le=\"1\"} 2",
            "aos_cm_reconcile_duration_seconds_bucket{reconciler=\"images\",le=\"+Inf\"} 3",
            "aos_cm_reconcile_duration_seconds_count{reconciler=\"images\"} 3",
            "aos_cm_reconcile_errors_total{reconciler=\"images\"} 1",
            "aos_cm_reconcile_queued_batches{reconciler=\"images\"} 0",
            "aos_cm_download_bytes_total 1234",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
