//! Domain types of the Communication Manager: identities, the desired state, the observed unit,
//! the item catalogue, allocations, and the plans the reconcilers produce.
//!
//! Nothing here knows about JSON, protobuf or sockets: the edges in `crate::api` convert wire
//! types into these, and `crate::store` persists them. Collections are ordered (`BTreeMap`,
//! sorted `Vec`s) so that planning is deterministic.

pub mod alloc;
pub mod catalogue;
pub mod desired;
pub mod ids;
pub mod observed;
pub mod plan;
pub mod schedule;
pub mod snapshot;
pub mod version;

pub use alloc::*;
pub use catalogue::*;
pub use desired::*;
pub use ids::*;
pub use observed::*;
pub use plan::*;
pub use schedule::*;
pub use snapshot::*;
pub use version::Version;
