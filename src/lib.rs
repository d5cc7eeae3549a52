//! aos-cm: the Communication Manager of an AosEdge unit, built as a declarative reconciler.
//! See ARCHITECTURE.md for the shape of the crate.

pub mod agent;
pub mod api;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod executor;
pub mod fuzzing;
pub mod imagestore;
pub mod journalalerts;
pub mod metrics;
pub mod model;
pub mod reconcilers;
pub mod render;
pub mod runtime;
pub mod scenario;
pub mod sim;
pub mod status;
pub mod storagestate;
pub mod store;
