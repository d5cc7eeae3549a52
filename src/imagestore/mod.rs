//! Item images: the OCI documents of an item (index, manifests, image config, Aos item
//! config) parsed into the model's catalogue. Download and verification come later.

pub mod oci;
pub mod verify;
