//! Simulated peers over real sockets, for tests, benchmarks and the demo: a Service Manager
//! that registers as a node and runs instances in memory, a cloud, and an IAM.

pub mod cloud;
pub mod iam;
pub mod sm;
pub mod synthetic;
pub mod unit;
