//! Placement rules: which (node, runtime) pairs an instance may run on and which one it gets.
//!
//! The filter chain follows the upstream C++ launcher: node filters (pin, labels, shared
//! resources), runtime filters (runtime type, platform, CPU, RAM, storage, state, instance
//! count), then the best candidate by node priority, most free CPU, most free RAM and node ID;
//! on the chosen node the runtime whose type sorts first. Every filter that empties the
//! candidate list says why, so that an instance that cannot be placed gets a useful condition.

use crate::model::*;
use std::collections::BTreeMap;

/// Default ratio (percent) of an item's quota a node reserves when nothing is requested.
pub const DEFAULT_RATIO: f64 = 50.0;
/// Runtime `max_instances` of 0 means this many.
pub const DEFAULT_MAX_INSTANCES: u64 = 256;
/// Runtime types a service may use when its item config names none.
pub const DEFAULT_RUNTIMES: [&str; 2] = ["crun", "runc"];

/// A node as placement sees it: its config and what is still free on it.
#[derive(Debug, Clone)]
pub struct NodeBudget {
    pub node_id: NodeId,
    pub node_type: String,
    pub config: NodeConfig,
    pub runtimes: Vec<RuntimeInfo>,
    pub cpu_free: u64,
    pub ram_free: u64,
    pub storage_free: Option<u64>,
    pub state_free: Option<u64>,
    /// Free share count per resource name; `None` = unlimited.
    pub resources: BTreeMap<String, Option<u64>>,
    /// Budgets of `runtimes`, by the same index.
    pub runtime_budgets: Vec<RuntimeBudget>,
    pub accepts_new: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct RuntimeBudget {
    pub cpu_free: Option<u64>,
    pub ram_free: Option<u64>,
    pub instances_left: u64,
}

impl NodeBudget {
    pub fn new(node: &ObservedNode, config: NodeConfig, accepts_new: bool) -> NodeBudget {
        let sm = node.sm.clone().unwrap_or_default();
        let mut runtimes = sm.runtimes.clone();
        runtimes.sort_by(|a, b| {
            (a.runtime_type.as_str(), a.runtime_id.as_str())
                .cmp(&(b.runtime_type.as_str(), b.runtime_id.as_str()))
        });
        let runtime_budgets = runtimes
            .iter()
            .map(|r| {
                let max = if r.max_instances == 0 {
                    DEFAULT_MAX_INSTANCES
                } else {
                    r.max_instances
                };
                RuntimeBudget {
                    cpu_free: (r.allowed_dmips > 0).then_some(r.allowed_dmips),
                    ram_free: (r.allowed_ram > 0).then_some(r.allowed_ram),
                    instances_left: max,
                }
            })
            .collect();
        let resources = sm
            .resources
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    (r.shared_count > 0).then_some(r.shared_count),
                )
            })
            .collect();
        NodeBudget {
            node_id: node.info.node_id.clone(),
            node_type: node.info.node_type.clone(),
            config,
            runtimes,
            cpu_free: node.info.max_dmips,
            ram_free: node.info.total_ram,
            storage_free: node.info.partition_capacity("storages"),
            state_free: node.info.partition_capacity("states"),
            resources,
            runtime_budgets,
            accepts_new,
        }
    }

    /// Takes what a placed instance uses. Saturating: an over-committed node stays at zero.
    pub fn charge(&mut self, runtime_id: &str, r: &Reservation, resources: &[String]) {
        self.cpu_free = self.cpu_free.saturating_sub(r.cpu_dmips);
        self.ram_free = self.ram_free.saturating_sub(r.ram);
        self.storage_free = self.storage_free.map(|s| s.saturating_sub(r.storage));
        self.state_free = self.state_free.map(|s| s.saturating_sub(r.state));
        for name in resources {
            if let Some(Some(left)) = self.resources.get_mut(name) {
                *left = left.saturating_sub(1);
            }
        }
        let idx = self
            .runtimes
            .iter()
            .position(|r| r.runtime_id == runtime_id);
        if let Some(rb) = idx.and_then(|i| self.runtime_budgets.get_mut(i)) {
            rb.cpu_free = rb.cpu_free.map(|c| c.saturating_sub(r.cpu_dmips));
            rb.ram_free = rb.ram_free.map(|c| c.saturating_sub(r.ram));
            rb.instances_left = rb.instances_left.saturating_sub(1);
        }
    }
}

/// What one instance asks for, independent of the node.
#[derive(Debug, Clone)]
pub struct InstanceRequest<'a> {
    pub ident: InstanceIdent,
    pub item_type: ItemType,
    pub labels: &'a [String],
    /// When set, only this node and runtime qualify.
    pub pinned: Option<(NodeId, RuntimeId)>,
}

/// The reservation an instance makes on a node, given the node's resource ratios.
pub fn reservation(item_type: ItemType, cfg: &ItemConfig, ratios: &ResourceRatios) -> Reservation {
    if item_type == ItemType::Component || cfg.skip_resource_limits {
        return Reservation::default();
    }
    let q = &cfg.quotas;
    let r = &cfg.requested;
    Reservation {
        cpu_dmips: requested_value(r.cpu, q.cpu_dmips_limit, ratios.cpu),
        ram: requested_value(r.ram, q.ram_limit, ratios.ram),
        storage: requested_value(r.storage, q.storage_limit, ratios.storage),
        state: requested_value(r.state, q.state_limit, ratios.state),
    }
}

/// Requested value clamped to the quota; else the quota times the node ratio (default 50 %,
/// at most 100 %), rounded; else nothing.
pub fn requested_value(requested: Option<u64>, quota: Option<u64>, ratio: Option<f64>) -> u64 {
    match (requested, quota) {
        (Some(req), Some(q)) => req.min(q),
        (Some(req), None) => req,
        (None, Some(q)) => {
            let ratio = ratio.unwrap_or(DEFAULT_RATIO).clamp(0.0, 100.0);
            (q as f64 * ratio / 100.0).round() as u64
        }
        (None, None) => 0,
    }
}

/// Does the runtime run images of this platform? Empty image fields other than the
/// architecture match anything.
pub fn platform_matches(image: &ImageConfig, rt: &RuntimeInfo) -> bool {
    if image.architecture != rt.arch_info.architecture {
        return false;
    }
    if let Some(v) = image.variant.as_deref().filter(|v| !v.is_empty())
        && rt.arch_info.variant.as_deref() != Some(v)
    {
        return false;
    }
    if !image.os.is_empty() && image.os != rt.os_info.os {
        return false;
    }
    if let Some(v) = image.os_version.as_deref().filter(|v| !v.is_empty())
        && rt.os_info.version.as_deref() != Some(v)
    {
        return false;
    }
    image
        .os_features
        .iter()
        .all(|f| rt.os_info.features.contains(f))
}

fn platform_text(image: &ImageConfig) -> String {
    let mut s = image.architecture.clone();
    if let Some(v) = &image.variant {
        s.push('/');
        s.push_str(v);
    }
    if !image.os.is_empty() {
        s.push(' ');
        s.push_str(&image.os);
    }
    s
}

/// Where an instance goes.
#[derive(Debug, Clone)]
pub struct Choice {
    pub node_idx: usize,
    pub runtime_idx: usize,
    pub runtime: RuntimeInfo,
    pub reservation: Reservation,
}

/// Why no candidate was left; `stage` orders the reasons so that the filter that got furthest
/// is the one reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub stage: u8,
    pub reason: &'static str,
    pub message: String,
}

fn reject(stage: u8, reason: &'static str, message: String) -> Rejection {
    Rejection {
        stage,
        reason,
        message,
    }
}

/// The (node, runtime) pairs that pass the filters that do not depend on what is already
/// placed: pin, labels, presence of the named resources, runtime type and platform. The
/// result is the same for every instance of one request and manifest, so callers cache it.
pub fn static_candidates(
    req: &InstanceRequest<'_>,
    manifest: &ManifestInfo,
    cfg: &ItemConfig,
    nodes: &[NodeBudget],
) -> Result<Vec<(usize, usize)>, Rejection> {
    let mut cands: Vec<usize> = (0..nodes.len())
        .filter(|&i| match &req.pinned {
            Some((node, _)) => nodes[i].node_id == *node,
            None => nodes[i].accepts_new,
        })
        .collect();
    if cands.is_empty() {
        return Err(match &req.pinned {
            Some((node, _)) => reject(
                0,
                "PinnedNodeUnavailable",
                format!("pinned to node {node}, which is not available"),
            ),
            None => reject(0, "NoNodes", "no connected, provisioned node".to_string()),
        });
    }
    cands.retain(|&i| {
        req.labels
            .iter()
            .all(|l| nodes[i].config.labels.contains(l))
    });
    if cands.is_empty() {
        return Err(reject(
            1,
            "NoMatchingLabels",
            format!("no node with label {}", req.labels.join(", ")),
        ));
    }
    cands.retain(|&i| {
        cfg.resources
            .iter()
            .all(|n| nodes[i].resources.contains_key(n))
    });
    if cands.is_empty() {
        return Err(no_resource(cfg));
    }
    let allowed: Vec<&str> = if cfg.runtimes.is_empty() {
        DEFAULT_RUNTIMES.to_vec()
    } else {
        cfg.runtimes.iter().map(String::as_str).collect()
    };
    let mut pairs: Vec<(usize, usize)> = cands
        .iter()
        .flat_map(|&i| (0..nodes[i].runtimes.len()).map(move |r| (i, r)))
        .filter(|&(i, r)| match &req.pinned {
            Some((_, rt)) => nodes[i].runtimes[r].runtime_id == *rt,
            None => true,
        })
        .filter(|&(i, r)| allowed.contains(&nodes[i].runtimes[r].runtime_type.as_str()))
        .collect();
    if pairs.is_empty() {
        return Err(reject(
            3,
            "NoRuntime",
            format!("no node with runtime type {}", allowed.join(" or ")),
        ));
    }
    pairs.retain(|&(i, r)| platform_matches(&manifest.image, &nodes[i].runtimes[r]));
    if pairs.is_empty() {
        return Err(reject(
            4,
            "NoPlatform",
            format!("no runtime for platform {}", platform_text(&manifest.image)),
        ));
    }
    Ok(pairs)
}

fn no_resource(cfg: &ItemConfig) -> Rejection {
    reject(
        2,
        "NoResource",
        format!("no node with resource {} free", cfg.resources.join(", ")),
    )
}

/// Runs the filters that depend on what is already placed (free shares of resources, CPU,
/// RAM, storage, state, instance count) over the static candidates, and picks the best.
pub fn choose_from(
    item_type: ItemType,
    cfg: &ItemConfig,
    nodes: &[NodeBudget],
    candidates: &[(usize, usize)],
) -> Result<Choice, Rejection> {
    let mut pairs: Vec<(usize, usize, Reservation)> = candidates
        .iter()
        .filter(|&&(i, _)| {
            cfg.resources.iter().all(|n| {
                matches!(nodes[i].resources.get(n), Some(None))
                    || matches!(nodes[i].resources.get(n), Some(Some(left)) if *left > 0)
            })
        })
        .map(|&(i, r)| {
            (
                i,
                r,
                reservation(item_type, cfg, &nodes[i].config.resource_ratios),
            )
        })
        .collect();
    if pairs.is_empty() {
        return Err(no_resource(cfg));
    }
    let accounted = item_type != ItemType::Component && !cfg.skip_resource_limits;
    if accounted {
        pairs.retain(|&(i, r, need)| {
            let rt = &nodes[i].runtime_budgets[r];
            need.cpu_dmips <= nodes[i].cpu_free && rt.cpu_free.is_none_or(|c| need.cpu_dmips <= c)
        });
        if pairs.is_empty() {
            return Err(reject(5, "NoCpu", "not enough CPU on any node".to_string()));
        }
        pairs.retain(|&(i, r, need)| {
            let rt = &nodes[i].runtime_budgets[r];
            need.ram <= nodes[i].ram_free && rt.ram_free.is_none_or(|c| need.ram <= c)
        });
        if pairs.is_empty() {
            return Err(reject(6, "NoRam", "not enough RAM on any node".to_string()));
        }
        pairs.retain(|&(i, _, need)| nodes[i].storage_free.is_none_or(|s| need.storage <= s));
        if pairs.is_empty() {
            return Err(reject(
                7,
                "NoStorage",
                "not enough storage on any node".to_string(),
            ));
        }
        pairs.retain(|&(i, _, need)| nodes[i].state_free.is_none_or(|s| need.state <= s));
        if pairs.is_empty() {
            return Err(reject(
                8,
                "NoState",
                "not enough state space on any node".to_string(),
            ));
        }
    }
    pairs.retain(|&(i, r, _)| nodes[i].runtime_budgets[r].instances_left > 0);
    if pairs.is_empty() {
        return Err(reject(
            9,
            "RuntimeFull",
            "every suitable runtime runs its maximum number of instances".to_string(),
        ));
    }
    // Best node: highest priority, then most free CPU, then RAM, then node ID; runtimes are
    // sorted by type on each node, so the lowest runtime index of the best node is the one.
    let best = pairs.iter().copied().min_by(|&(a, ra, _), &(b, rb, _)| {
        let (na, nb) = (&nodes[a], &nodes[b]);
        nb.config
            .priority
            .cmp(&na.config.priority)
            .then_with(|| nb.cpu_free.cmp(&na.cpu_free))
            .then_with(|| nb.ram_free.cmp(&na.ram_free))
            .then_with(|| na.node_id.cmp(&nb.node_id))
            .then_with(|| ra.cmp(&rb))
    });
    match best {
        Some((i, r, need)) => Ok(Choice {
            node_idx: i,
            runtime_idx: r,
            runtime: nodes[i].runtimes[r].clone(),
            reservation: need,
        }),
        None => Err(reject(10, "NoNodes", "no candidate left".to_string())),
    }
}

/// The whole filter chain for one manifest over every node.
pub fn choose(
    req: &InstanceRequest<'_>,
    manifest: &ManifestInfo,
    cfg: &ItemConfig,
    nodes: &[NodeBudget],
) -> Result<Choice, Rejection> {
    let candidates = static_candidates(req, manifest, cfg, nodes)?;
    choose_from(req.item_type, cfg, nodes, &candidates)
}
