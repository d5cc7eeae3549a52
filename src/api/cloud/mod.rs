//! The cloud side: protocol v7. The link (`link`, `transport`, `outbox`, `discovery`), the
//! message types (`messages`), the `desiredStatus` frame and unit config converted into model
//! types with every error named by its JSON path (`desired`, `unitconfig`), SM telemetry turned
//! into cloud messages (`telemetry`), certificate and provisioning handlers over IAM (`certs`).

pub mod certs;
pub mod desired;
pub mod discovery;
pub mod link;
pub mod messages;
pub mod outbox;
pub mod telemetry;
pub mod transport;
pub mod unitconfig;
pub mod unitstatus;

/// Protocol version carried in every envelope header.
pub const PROTOCOL_VERSION: u64 = 7;
/// Capacity limits of upstream (reference 2.10); inputs beyond them are rejected.
pub const MAX_ID_LEN: usize = 64;
pub const MAX_VERSION_LEN: usize = 32;
pub const MAX_LABELS: usize = 4;
pub const MAX_LABEL_LEN: usize = 64;
pub const MAX_NODES: usize = 16;
pub const MAX_ITEMS: usize = 64;
pub const MAX_INSTANCES: usize = 256;
pub const MAX_SUBJECTS: usize = 64;
