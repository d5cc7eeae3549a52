//! Item images: the OCI documents of an item (index, manifests, image config, Aos item
//! config) parsed into the model's catalogue (`oci`); blobs downloaded with HTTP Range resume
//! (`download`), verified and decrypted in one streaming pass (`verify`), signatures checked
//! against the desired status' certificate chains (`sign`), and the pipeline that turns a
//! digest into a stored blob (`fetch`).

pub mod download;
pub mod fetch;
pub mod oci;
pub mod sign;
pub mod verify;

#[cfg(test)]
mod pipeline_tests;
