//! The IAM edge (iamanager.v6): the CM is a client of the IAM of its node.
//!
//! * [`client`]: [`IamClient`], every call the CM makes, over one channel for the public
//!   services (plain, or TLS checked against the CA) and one for the protected services (mutual
//!   TLS); errors carry IAM's own `ErrorInfo` text. It implements the cloud agent's
//!   [`Iam`](crate::api::cloud::certs::Iam) trait. [`client::watch`] keeps a subscription open
//!   across reconnects (backoff with jitter) and says when it was (re)opened.
//! * [`sync`]: [`sync::sync_to_store`] keeps the nodes' IAM info and the unit subjects in the
//!   store.
//!
//! May import `api::proto`, `api::nodes`, `api::cloud::certs` (the trait and its error), `model`
//! and `store`.

pub mod client;
pub mod sync;

pub use client::{
    CertInfo, ClientTls, IamClient, IamConfig, RetryConfig, SystemInfo, WatchEvent, read_pem_url,
    watch,
};
pub use sync::sync_to_store;
