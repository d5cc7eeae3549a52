//! The edges: every conversion between the outside world (cloud JSON, OCI documents, proto3
//! JSON of IAM and SM messages) and the model lives here.

pub mod cloud;
pub mod dns;
pub mod dnszone;
pub mod fileserver;
pub mod iam;
pub mod journal;
pub mod json;
pub mod nodes;
pub mod proto;
pub mod scheduler;
pub mod sm;
