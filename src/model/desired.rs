//! The desired state of the unit, as the cloud's `desiredStatus` describes it.

use super::ids::*;
use super::version::Version;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub correlation_id: Option<String>,
    pub nodes: Vec<DesiredNode>,
    pub unit_config: Option<UnitConfig>,
    pub items: Vec<DesiredItem>,
    pub instances: Vec<DesiredInstances>,
    pub subjects: Vec<DesiredSubject>,
    pub certificates: Vec<Certificate>,
    pub certificate_chains: Vec<CertificateChain>,
    /// Env var overrides from the cloud's last `overrideEnvVars` (kept when a new
    /// `desiredStatus` replaces the rest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_overrides: Vec<EnvOverride>,
}

/// One environment variable set for the instances a filter matches (absent = any), until
/// `expires_at` when given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvOverride {
    pub item_id: Option<String>,
    pub subject_id: Option<String>,
    pub instance: Option<u64>,
    pub name: String,
    pub value: String,
    pub expires_at: Option<UnixMillis>,
}

impl EnvOverride {
    fn matches(&self, ident: &InstanceIdent) -> bool {
        self.item_id
            .as_deref()
            .is_none_or(|i| i == ident.item_id.as_str())
            && self
                .subject_id
                .as_deref()
                .is_none_or(|s| s == ident.subject_id.as_str())
            && self.instance.is_none_or(|n| n == ident.instance)
    }
}

impl DesiredState {
    /// The env vars an instance runs with at `now`: every unexpired override whose filter
    /// matches, by name (a later override of the same name wins).
    pub fn env_for(&self, ident: &InstanceIdent, now: UnixMillis) -> Vec<(String, String)> {
        let mut vars = std::collections::BTreeMap::new();
        for o in &self.env_overrides {
            if o.matches(ident) && o.expires_at.is_none_or(|t| now < t) {
                vars.insert(o.name.clone(), o.value.clone());
            }
        }
        vars.into_iter().collect()
    }

    pub fn item(&self, id: &str) -> Option<&DesiredItem> {
        self.items.iter().find(|i| i.id == id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredNode {
    pub node_id: NodeId,
    pub state: DesiredNodeState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredItem {
    pub id: ItemId,
    pub item_type: ItemType,
    pub version: String,
    pub owner_id: String,
    pub index_digest: Option<Digest>,
}

/// A request to run `num_instances` instances of an item for a subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredInstances {
    pub item_id: ItemId,
    pub subject_id: SubjectId,
    pub priority: u64,
    pub num_instances: u64,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredSubject {
    pub id: SubjectId,
    pub subject_type: SubjectType,
    pub is_reported_from_unit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// base64 of the DER certificate, kept as the cloud sent it.
    pub certificate: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateChain {
    pub name: String,
    pub fingerprints: Vec<String>,
}

/// The unit config: per node (or node type) labels, priority, resource ratios and alert rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitConfig {
    pub format_version: String,
    pub version: Version,
    pub nodes: Vec<NodeConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Set for a node-specific entry; absent for an entry that applies to a node type.
    pub node_id: Option<NodeId>,
    pub node_type: String,
    pub version: Option<String>,
    pub alert_rules: Option<AlertRules>,
    pub resource_ratios: ResourceRatios,
    pub labels: Vec<String>,
    pub priority: u64,
}

/// Percentages of an item's quota that a node reserves when the item does not request a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceRatios {
    pub cpu: Option<f64>,
    pub ram: Option<f64>,
    pub storage: Option<f64>,
    pub state: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertRules {
    pub ram: Option<PercentRule>,
    pub cpu: Option<PercentRule>,
    pub partitions: Vec<PartitionRule>,
    pub download: Option<PointsRule>,
    pub upload: Option<PointsRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PercentRule {
    pub min_timeout_ms: u64,
    pub min_threshold: f64,
    pub max_threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionRule {
    pub name: String,
    pub min_timeout_ms: u64,
    pub min_threshold: f64,
    pub max_threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointsRule {
    pub min_timeout_ms: u64,
    pub min_threshold: u64,
    pub max_threshold: u64,
}

impl UnitConfig {
    /// The node config for a node: the entry for its ID, else the entry for its type, else an
    /// empty config; the unit config version and the node ID are filled in.
    pub fn node_config(&self, node_id: &str, node_type: &str) -> NodeConfig {
        let found = self
            .nodes
            .iter()
            .find(|n| n.node_id.as_deref() == Some(node_id))
            .or_else(|| {
                self.nodes
                    .iter()
                    .find(|n| n.node_id.is_none() && n.node_type == node_type)
            });
        let mut cfg = found.cloned().unwrap_or_else(|| NodeConfig {
            node_type: node_type.to_string(),
            ..NodeConfig::default()
        });
        cfg.node_id = Some(node_id.to_string());
        cfg.version = Some(self.version.to_string());
        cfg
    }
}
