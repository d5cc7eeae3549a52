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
    pub runtime_budgets: BTreeMap<RuntimeId, RuntimeBudget>,
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
        let runtime_budgets = sm
            .runtimes
            .iter()
            .map(|r| {
                let max = if r.max_instances == 0 {
                    DEFAULT_MAX_INSTANCES
                } else {
                    r.max_instances
                };
                (
                    r.runtime_id.clone(),
                    RuntimeBudget {
                        cpu_free: (r.allowed_dmips > 0).then_some(r.allowed_dmips),
                        ram_free: (r.allowed_ram > 0).then_some(r.allowed_ram),
                        instances_left: max,
                    },
                )
            })
            .collect();
        let resources = sm
            .resources
            .iter()
            .map(|r| (r.name.clone(), (r.shared_count > 0).then_some(r.shared_count)))
            .collect();
        let mut runtimes = sm.runtimes.clone();
        runtimes.sort_by(|a, b| {
            (a.runtime_type.as_str(), a.runtime_id.as_str())
                .cmp(&(b.runtime_type.as_str(), b.runtime_id.as_str()))
        });
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
        if let Some(rb) = self.runtime_budgets.get_mut(runtime_id) {
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

/// Runs the filter chain for one manifest over every node and returns the best candidate.
pub fn choose(
    req: &InstanceRequest<'_>,
    manifest: &ManifestInfo,
    cfg: &ItemConfig,
    nodes: &[NodeBudget],
) -> Result<Choice, Rejection> {
    // Node filters.
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
        cfg.resources.iter().all(|name| match nodes[i].resources.get(name) {
            None => false,
            Some(None) => true,
            Some(Some(left)) => *left > 0,
        })
    });
    if cands.is_empty() {
        return Err(reject(
            2,
            "NoResource",
            format!("no node with resource {} free", cfg.resources.join(", ")),
        ));
    }

    // Runtime filters, over (node, runtime) pairs.
    let allowed: Vec<&str> = if cfg.runtimes.is_empty() {
        DEFAULT_RUNTIMES.to_vec()
    } else {
        cfg.runtimes.iter().map(String::as_str).collect()
    };
    let mut pairs: Vec<(usize, &RuntimeInfo)> = cands
        .iter()
        .flat_map(|&i| nodes[i].runtimes.iter().map(move |r| (i, r)))
        .filter(|(_, r)| match &req.pinned {
            Some((_, rt)) => r.runtime_id == *rt,
            None => true,
        })
        .filter(|(_, r)| allowed.contains(&r.runtime_type.as_str()))
        .collect();
    if pairs.is_empty() {
        return Err(reject(
            3,
            "NoRuntime",
            format!("no node with runtime type {}", allowed.join(" or ")),
        ));
    }
    pairs.retain(|(_, r)| platform_matches(&manifest.image, r));
    if pairs.is_empty() {
        return Err(reject(
            4,
            "NoPlatform",
            format!("no runtime for platform {}", platform_text(&manifest.image)),
        ));
    }
    let res_of = |i: usize| reservation(req.item_type, cfg, &nodes[i].config.resource_ratios);
    let accounted = req.item_type != ItemType::Component && !cfg.skip_resource_limits;
    if accounted {
        pairs.retain(|&(i, r)| {
            let need = res_of(i).cpu_dmips;
            let rt = nodes[i].runtime_budgets.get(&r.runtime_id);
            need <= nodes[i].cpu_free && rt.and_then(|b| b.cpu_free).is_none_or(|c| need <= c)
        });
        if pairs.is_empty() {
            return Err(reject(5, "NoCpu", "not enough CPU on any node".to_string()));
        }
        pairs.retain(|&(i, r)| {
            let need = res_of(i).ram;
            let rt = nodes[i].runtime_budgets.get(&r.runtime_id);
            need <= nodes[i].ram_free && rt.and_then(|b| b.ram_free).is_none_or(|c| need <= c)
        });
        if pairs.is_empty() {
            return Err(reject(6, "NoRam", "not enough RAM on any node".to_string()));
        }
        pairs.retain(|&(i, _)| nodes[i].storage_free.is_none_or(|s| res_of(i).storage <= s));
        if pairs.is_empty() {
            return Err(reject(7, "NoStorage", "not enough storage on any node".to_string()));
        }
        pairs.retain(|&(i, _)| nodes[i].state_free.is_none_or(|s| res_of(i).state <= s));
        if pairs.is_empty() {
            return Err(reject(8, "NoState", "not enough state space on any node".to_string()));
        }
    }
    pairs.retain(|&(i, r)| {
        nodes[i]
            .runtime_budgets
            .get(&r.runtime_id)
            .is_none_or(|b| b.instances_left > 0)
    });
    if pairs.is_empty() {
        return Err(reject(
            9,
            "RuntimeFull",
            "every suitable runtime runs its maximum number of instances".to_string(),
        ));
    }

    // Best node: highest priority, then most free CPU, then RAM, then node ID; runtimes are
    // sorted by type on each node, so the first pair of the best node has the runtime to use.
    let best = pairs.iter().copied().min_by(|&(a, ra), &(b, rb)| {
        let (na, nb) = (&nodes[a], &nodes[b]);
        nb.config
            .priority
            .cmp(&na.config.priority)
            .then(nb.cpu_free.cmp(&na.cpu_free))
            .then(nb.ram_free.cmp(&na.ram_free))
            .then(na.node_id.cmp(&nb.node_id))
            .then(ra.runtime_type.cmp(&rb.runtime_type))
            .then(ra.runtime_id.cmp(&rb.runtime_id))
    });
    match best {
        Some((i, r)) => Ok(Choice {
            node_idx: i,
            runtime: r.clone(),
            reservation: res_of(i),
        }),
        None => Err(reject(10, "NoNodes", "no candidate left".to_string())),
    }
}
