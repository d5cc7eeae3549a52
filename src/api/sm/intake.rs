//! Bounded buffers for what SMs send and the cloud link drains: monitoring samples, alerts and
//! log parts. Nothing here grows without bound: monitoring keeps the newest samples per node
//! and instance, alerts are deduplicated into a fixed cache, log parts are capped.

use crate::api::proto::servicemanager::v5 as pb;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// Samples kept per node and per instance (upstream capacity).
pub const MONITORING_SAMPLES: usize = 16;
/// Alerts kept until the next send (upstream cache size).
pub const ALERT_CACHE: usize = 64;
/// Log parts kept until the cloud link drains them.
pub const LOG_PARTS: usize = 1024;

#[derive(Default)]
struct Buffers {
    node_monitoring: BTreeMap<String, VecDeque<pb::MonitoringData>>,
    instance_monitoring: BTreeMap<(String, String, String, u64), VecDeque<pb::MonitoringData>>,
    alerts: Vec<(String, pb::Alert)>,
    logs: VecDeque<(String, pb::LogData)>,
}

/// Counters of what the buffers dropped, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntakeCounters {
    pub alerts_duplicate: u64,
    pub alerts_overflow: u64,
    pub logs_overflow: u64,
    pub samples_dropped: u64,
}

#[derive(Default)]
pub struct Intake {
    buffers: Mutex<Buffers>,
    counters: Mutex<IntakeCounters>,
    /// Woken when a log part arrives (log parts are forwarded as they come).
    logs_ready: tokio::sync::Notify,
}

fn push_bounded(q: &mut VecDeque<pb::MonitoringData>, d: pb::MonitoringData) -> bool {
    q.push_back(d);
    if q.len() > MONITORING_SAMPLES {
        q.pop_front();
        return true;
    }
    false
}

impl Intake {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffers> {
        self.buffers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count(&self, f: impl FnOnce(&mut IntakeCounters)) {
        f(&mut self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    pub fn counters(&self) -> IntakeCounters {
        *self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn monitoring(&self, node_id: &str, m: &pb::InstantMonitoring) {
        let mut dropped = 0;
        {
            let mut b = self.lock();
            if let Some(n) = &m.node_monitoring {
                let q = b.node_monitoring.entry(node_id.to_string()).or_default();
                dropped += u64::from(push_bounded(q, n.clone()));
            }
            for i in &m.instances_monitoring {
                let (Some(id), Some(data)) = (&i.instance, &i.monitoring_data) else {
                    continue;
                };
                let key = (
                    node_id.to_string(),
                    id.item_id.clone(),
                    id.subject_id.clone(),
                    id.instance,
                );
                let q = b.instance_monitoring.entry(key).or_default();
                dropped += u64::from(push_bounded(q, data.clone()));
            }
        }
        if dropped > 0 {
            self.count(|c| c.samples_dropped += dropped);
        }
    }

    /// Keeps an alert unless an equal one (ignoring the timestamp) is cached or the cache is
    /// full; returns whether it was kept.
    pub fn alert(&self, node_id: &str, alert: &pb::Alert) -> bool {
        let mut b = self.lock();
        let same = |(n, a): &(String, pb::Alert)| n == node_id && a.alert_item == alert.alert_item;
        if b.alerts.iter().any(same) {
            drop(b);
            self.count(|c| c.alerts_duplicate += 1);
            return false;
        }
        if b.alerts.len() >= ALERT_CACHE {
            drop(b);
            self.count(|c| c.alerts_overflow += 1);
            return false;
        }
        b.alerts.push((node_id.to_string(), alert.clone()));
        true
    }

    /// Keeps a log part; when full, the oldest part goes (counted).
    pub fn log(&self, node_id: &str, part: &pb::LogData) {
        let overflow = {
            let mut b = self.lock();
            let full = b.logs.len() >= LOG_PARTS;
            if full {
                b.logs.pop_front();
            }
            b.logs.push_back((node_id.to_string(), part.clone()));
            full
        };
        self.logs_ready.notify_one();
        if overflow {
            self.count(|c| c.logs_overflow += 1);
        }
    }

    /// Takes every cached alert, oldest first.
    pub fn drain_alerts(&self) -> Vec<(String, pb::Alert)> {
        std::mem::take(&mut self.lock().alerts)
    }

    /// Resolves once a log part has arrived since the last call (a stored permit covers parts
    /// that came before the call).
    pub async fn logs_arrived(&self) {
        self.logs_ready.notified().await;
    }

    /// Takes every log part, in arrival order.
    pub fn drain_logs(&self) -> Vec<(String, pb::LogData)> {
        self.lock().logs.drain(..).collect()
    }

    /// Takes the node samples, per node.
    pub fn drain_node_monitoring(&self) -> BTreeMap<String, Vec<pb::MonitoringData>> {
        std::mem::take(&mut self.lock().node_monitoring)
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect()
    }

    /// Takes the instance samples, per (node, item, subject, instance).
    pub fn drain_instance_monitoring(
        &self,
    ) -> BTreeMap<(String, String, String, u64), Vec<pb::MonitoringData>> {
        std::mem::take(&mut self.lock().instance_monitoring)
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect()
    }
}
