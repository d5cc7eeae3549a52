//! A consistent view of everything the reconcilers read, taken from the store in one read
//! transaction (or assembled from a scenario folder by `aos-cm plan`).

use super::alloc::Allocations;
use super::catalogue::Catalogue;
use super::desired::DesiredState;
use super::observed::ObservedUnit;
use super::schedule::{UpdateProgress, UpdateSchedules};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `None` until the cloud has sent a desired status: nothing is planned before that.
    pub desired: Option<DesiredState>,
    pub observed: ObservedUnit,
    pub allocations: Allocations,
    pub catalogue: Catalogue,
    pub settings: PlanSettings,
    /// The update scheduler's record: which desired state was approved or reached.
    #[serde(default)]
    pub progress: UpdateProgress,
}

/// The configuration values planning depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSettings {
    /// `imageManager.updateItemTtl`: how long a removed item is kept.
    pub update_item_ttl_ms: u64,
    /// The UID pool `[uid_first, uid_end)` for instances (upstream: 5000..10000).
    #[serde(default = "default_uid_first")]
    pub uid_first: u32,
    #[serde(default = "default_uid_end")]
    pub uid_end: u32,
    /// `updateScheduler`: when a downloaded update may change the running unit.
    #[serde(default)]
    pub update_schedules: UpdateSchedules,
}

fn default_uid_first() -> u32 {
    super::alloc::UID_FIRST
}

fn default_uid_end() -> u32 {
    super::alloc::UID_END
}

impl Default for PlanSettings {
    fn default() -> Self {
        PlanSettings {
            update_item_ttl_ms: 30 * 24 * 3600 * 1000,
            uid_first: super::alloc::UID_FIRST,
            uid_end: super::alloc::UID_END,
            update_schedules: UpdateSchedules::default(),
        }
    }
}
