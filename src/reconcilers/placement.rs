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
    pub item_type: ItemType,
    pub labels: &'a [String],
    /// When set, only this node and runtime qualify.
    pub pinned: Option<(&'a str, &'a str)>,
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
///
/// One pass without allocation: each candidate either passes every filter and competes for
/// best, or fails at some filter. When none passes, the filter that emptied the list is the
/// furthest one any candidate reached, which is what the sequential chain would report.
pub fn choose_from(
    item_type: ItemType,
    cfg: &ItemConfig,
    nodes: &[NodeBudget],
    candidates: &[(usize, usize)],
) -> Result<Choice, Rejection> {
    let accounted = item_type != ItemType::Component && !cfg.skip_resource_limits;
    let mut furthest = 0u8;
    let mut best: Option<(usize, usize, Reservation)> = None;
    let mut last_node = usize::MAX;
    let mut need = Reservation::default();
    for &(i, r) in candidates {
        let node = &nodes[i];
        if i != last_node {
            // Candidates come grouped by node; the reservation depends on the node only.
            need = reservation(item_type, cfg, &node.config.resource_ratios);
            last_node = i;
        }
        let stage = failing_stage(cfg, node, r, &need, accounted);
        if stage < PASSED {
            furthest = furthest.max(stage);
            continue;
        }
        let better = match best {
            None => true,
            Some((b, rb, _)) => {
                let nb = &nodes[b];
                node.config
                    .priority
                    .cmp(&nb.config.priority)
                    .then_with(|| node.cpu_free.cmp(&nb.cpu_free))
                    .then_with(|| node.ram_free.cmp(&nb.ram_free))
                    // Budgets are in node ID order, so the index stands for the ID.
                    .then_with(|| b.cmp(&i))
                    .then_with(|| rb.cmp(&r))
                    .is_gt()
            }
        };
        if better {
            best = Some((i, r, need));
        }
    }
    match best {
        Some((i, r, need)) => Ok(Choice {
            node_idx: i,
            runtime_idx: r,
            runtime: nodes[i].runtimes[r].clone(),
            reservation: need,
        }),
        None => Err(match furthest {
            2 => no_resource(cfg),
            5 => reject(5, "NoCpu", "not enough CPU on any node".to_string()),
            6 => reject(6, "NoRam", "not enough RAM on any node".to_string()),
            7 => reject(7, "NoStorage", "not enough storage on any node".to_string()),
            8 => reject(
                8,
                "NoState",
                "not enough state space on any node".to_string(),
            ),
            9 => reject(
                9,
                "RuntimeFull",
                "every suitable runtime runs its maximum number of instances".to_string(),
            ),
            _ => reject(10, "NoNodes", "no candidate left".to_string()),
        }),
    }
}

/// Stage past every filter.
const PASSED: u8 = u8::MAX;

/// The first dynamic filter a (node, runtime) pair fails, by stage number, or `PASSED`.
fn failing_stage(
    cfg: &ItemConfig,
    node: &NodeBudget,
    r: usize,
    need: &Reservation,
    accounted: bool,
) -> u8 {
    let free_share = |n: &String| match node.resources.get(n) {
        Some(None) => true,
        Some(Some(left)) => *left > 0,
        None => false,
    };
    if !cfg.resources.iter().all(free_share) {
        return 2;
    }
    let rt = &node.runtime_budgets[r];
    if accounted {
        if need.cpu_dmips > node.cpu_free || rt.cpu_free.is_some_and(|c| need.cpu_dmips > c) {
            return 5;
        }
        if need.ram > node.ram_free || rt.ram_free.is_some_and(|c| need.ram > c) {
            return 6;
        }
        if node.storage_free.is_some_and(|s| need.storage > s) {
            return 7;
        }
        if node.state_free.is_some_and(|s| need.state > s) {
            return 8;
        }
    }
    if rt.instances_left == 0 {
        return 9;
    }
    PASSED
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
