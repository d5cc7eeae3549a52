//! The item catalogue: what the OCI blobs of an item say, once parsed at the edge
//! (`crate::imagestore::oci`): manifests in index order, each with its image config (platform,
//! exposed ports) and Aos item config (runtimes, quotas, requests, resources, ...).

use super::desired::AlertRules;
use super::ids::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// All parsed images, by index digest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalogue {
    pub images: BTreeMap<Digest, ItemImage>,
}

/// One item image: the index and what its manifests point to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemImage {
    pub index_digest: Digest,
    pub manifests: Vec<ManifestInfo>,
}

impl ItemImage {
    /// Every blob of the image in download order (index, then per manifest: manifest, config,
    /// item config, layers), each digest once.
    pub fn blobs(&self) -> Vec<Digest> {
        let mut out = vec![self.index_digest.clone()];
        for m in &self.manifests {
            let mut push = |d: &Digest| {
                if !out.contains(d) {
                    out.push(d.clone());
                }
            };
            push(&m.digest);
            push(&m.config_digest);
            if let Some(d) = &m.item_config_digest {
                push(d);
            }
            for l in &m.layers {
                push(l);
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestInfo {
    pub digest: Digest,
    pub config_digest: Digest,
    pub item_config_digest: Option<Digest>,
    pub layers: Vec<Digest>,
    pub image: ImageConfig,
    pub item_config: Option<ItemConfig>,
}

/// The parts of an OCI image config that placement and networking use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub variant: Option<String>,
    pub os: String,
    pub os_version: Option<String>,
    pub os_features: Vec<String>,
    /// `port[/proto]` strings from `config.ExposedPorts`, sorted.
    pub exposed_ports: Vec<String>,
}

/// The parts of the Aos item config that the CM reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemConfig {
    pub hostname: Option<String>,
    pub balancing_policy: BalancingPolicy,
    pub skip_resource_limits: bool,
    /// Runtime types the item may run on (empty: crun or runc for services).
    pub runtimes: Vec<String>,
    pub quotas: Quotas,
    pub requested: RequestedResources,
    /// `itemID/port[/proto]` keys of `allowedConnections`, sorted.
    pub allowed_connections: Vec<String>,
    pub resources: Vec<String>,
    pub alert_rules: Option<AlertRules>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    pub cpu_dmips_limit: Option<u64>,
    pub ram_limit: Option<u64>,
    pub state_limit: Option<u64>,
    pub storage_limit: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedResources {
    pub cpu: Option<u64>,
    pub ram: Option<u64>,
    pub storage: Option<u64>,
    pub state: Option<u64>,
}
