//! The SM side: the SMService server every node's Service Manager connects to, the
//! conversions between servicemanager.v5 messages and the model, and the bounded intake of
//! monitoring, alerts and logs.

pub mod controller;
pub mod convert;
pub mod intake;
pub mod network;
pub mod server;

pub use controller::{SmConfig, SmController, SmError};
