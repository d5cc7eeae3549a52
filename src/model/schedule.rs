//! The update scheduler's vocabulary: the two kinds of update (software and firmware), the
//! progress states a local client sees, the per-kind policy that decides when a downloaded
//! update may change the running unit, and the small persisted record of what the scheduler
//! decided (which desired state was approved, which one finished).
//!
//! Times of day in a timetable are UTC, like the engine clock.

use super::ids::UnixMillis;
use serde::{Deserialize, Serialize};
use std::fmt;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// SOTA: services, layers, instances, the unit config and node states. FOTA: component items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateKind {
    Sota,
    Fota,
}

impl UpdateKind {
    pub const ALL: [UpdateKind; 2] = [UpdateKind::Sota, UpdateKind::Fota];

    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Sota => "sota",
            UpdateKind::Fota => "fota",
        }
    }
}

impl fmt::Display for UpdateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one kind of update stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    #[default]
    NoUpdate,
    Downloading,
    ReadyToUpdate,
    Updating,
}

impl UpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::NoUpdate => "NO_UPDATE",
            UpdateState::Downloading => "DOWNLOADING",
            UpdateState::ReadyToUpdate => "READY_TO_UPDATE",
            UpdateState::Updating => "UPDATING",
        }
    }
}

impl fmt::Display for UpdateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a downloaded update may start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdatePolicy {
    /// As soon as its downloads are done.
    #[default]
    Auto,
    /// When a local client calls StartSOTAUpdate / StartFOTAUpdate.
    Trigger,
    /// At the next slot of the timetable.
    Timetable,
}

impl UpdatePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePolicy::Auto => "auto",
            UpdatePolicy::Trigger => "trigger",
            UpdatePolicy::Timetable => "timetable",
        }
    }
}

/// A slot of one day, in seconds since midnight: `start` included, `end` excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeSlot {
    pub start: u32,
    pub end: u32,
}

/// The slots of one day of the week (1 = Monday ... 7 = Sunday).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimetableDay {
    pub day_of_week: u8,
    pub slots: Vec<TimeSlot>,
}

/// The policy of one kind of update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindSchedule {
    pub policy: UpdatePolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timetable: Vec<TimetableDay>,
}

/// The ISO day of the week (1 = Monday) of the day `day` days after 1970-01-01 (a Thursday).
fn weekday(day: i64) -> u8 {
    // rem_euclid(7) is in 0..7, so the cast cannot truncate.
    (day + 3).rem_euclid(7) as u8 + 1
}

impl KindSchedule {
    /// The earliest time at or after `now` inside a timetable slot; `None` when the timetable
    /// has no slot at all.
    pub fn next_window(&self, now: UnixMillis) -> Option<UnixMillis> {
        let today = now.div_euclid(DAY_MS);
        let mut best: Option<UnixMillis> = None;
        for d in 0..=7 {
            let day = today + d;
            let day_start = day * DAY_MS;
            let w = weekday(day);
            for entry in self.timetable.iter().filter(|e| e.day_of_week == w) {
                for slot in &entry.slots {
                    let start = day_start + i64::from(slot.start) * 1000;
                    let end = day_start + i64::from(slot.end) * 1000;
                    if now < end {
                        let at = start.max(now);
                        best = Some(best.map_or(at, |b| b.min(at)));
                    }
                }
            }
            if best.is_some() {
                return best;
            }
        }
        best
    }

    /// Whether `now` is inside a timetable slot.
    pub fn in_window(&self, now: UnixMillis) -> bool {
        self.next_window(now) == Some(now)
    }
}

/// The policies of both kinds (`updateScheduler` in the config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSchedules {
    #[serde(default)]
    pub sota: KindSchedule,
    #[serde(default)]
    pub fota: KindSchedule,
}

impl UpdateSchedules {
    pub fn of(&self, kind: UpdateKind) -> &KindSchedule {
        match kind {
            UpdateKind::Sota => &self.sota,
            UpdateKind::Fota => &self.fota,
        }
    }
}

/// What the scheduler decided for one kind, by the fingerprint of that kind's part of the
/// desired state (see `reconcilers::schedule::fingerprint`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindProgress {
    /// The desired state that may change the running unit (started by a trigger or a slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<String>,
    /// The desired state the unit reached (or failed to reach, with `error`): from then on
    /// its changes are repairs, not an update, and go on without waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<String>,
    /// Why the update of `done` failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where the unit's update stands: a summary for `aos-cm status`, the correlation ID of the
/// desired status, and the scheduler's record per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateProgress {
    pub state: String,
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub sota: KindProgress,
    #[serde(default)]
    pub fota: KindProgress,
}

impl UpdateProgress {
    pub fn of(&self, kind: UpdateKind) -> &KindProgress {
        match kind {
            UpdateKind::Sota => &self.sota,
            UpdateKind::Fota => &self.fota,
        }
    }

    pub fn of_mut(&mut self, kind: UpdateKind) -> &mut KindProgress {
        match kind {
            UpdateKind::Sota => &mut self.sota,
            UpdateKind::Fota => &mut self.fota,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(day: u8, s: &[(u32, u32)]) -> TimetableDay {
        TimetableDay {
            day_of_week: day,
            slots: s
                .iter()
                .map(|&(start, end)| TimeSlot { start, end })
                .collect(),
        }
    }

    // 2026-11-23 00:00:00 UTC is a Monday.
    const MONDAY: i64 = 1_795_392_000_000;

    #[test]
    fn weekday_counts_from_a_thursday() {
        assert_eq!(weekday(0), 4);
        assert_eq!(weekday(MONDAY / DAY_MS), 1);
        assert_eq!(weekday(MONDAY / DAY_MS + 6), 7);
    }

    #[test]
    fn next_window_finds_today_later_and_next_week() {
        let s = KindSchedule {
            policy: UpdatePolicy::Timetable,
            timetable: vec![slots(1, &[(3600, 7200)]), slots(3, &[(0, 60)])],
        };
        // Monday 00:00 -> Monday 01:00.
        assert_eq!(s.next_window(MONDAY), Some(MONDAY + 3_600_000));
        // Inside the slot: now.
        assert_eq!(s.next_window(MONDAY + 4_000_000), Some(MONDAY + 4_000_000));
        assert!(s.in_window(MONDAY + 4_000_000));
        // The end is excluded: Wednesday 00:00.
        assert_eq!(s.next_window(MONDAY + 7_200_000), Some(MONDAY + 2 * DAY_MS));
        assert!(!s.in_window(MONDAY + 7_200_000));
        // Thursday -> next Monday 01:00.
        assert_eq!(
            s.next_window(MONDAY + 3 * DAY_MS),
            Some(MONDAY + 7 * DAY_MS + 3_600_000)
        );
        assert_eq!(KindSchedule::default().next_window(MONDAY), None);
    }
}
