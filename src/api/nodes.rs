//! IAM `NodeInfo` (iamanager.v6) and SM `SMInfo` (servicemanager.v5) in proto3 JSON form, as a
//! scenario's `nodes.json` carries them, converted into the model. proto3 JSON writes 64-bit
//! integers as strings; both forms are accepted.

use crate::api::json::{self, Obj, Problems};
use crate::model::*;
use serde_json::Value;

fn arch(o: &Obj<'_>, probs: &mut Problems) -> ArchInfo {
    match o
        .object("archInfo", probs)
        .and_then(|(p, v)| json::obj(v, &p, probs))
    {
        Some(a) => ArchInfo {
            architecture: a.string("architecture", probs).unwrap_or_default(),
            variant: a.string("variant", probs).filter(|v| !v.is_empty()),
        },
        None => ArchInfo::default(),
    }
}

fn os(o: &Obj<'_>, probs: &mut Problems) -> OsInfo {
    match o
        .object("osInfo", probs)
        .and_then(|(p, v)| json::obj(v, &p, probs))
    {
        Some(a) => OsInfo {
            os: a.string("os", probs).unwrap_or_default(),
            version: a.string("version", probs).filter(|v| !v.is_empty()),
            features: a.strings("features", probs),
        },
        None => OsInfo::default(),
    }
}

/// `iamanager.v6.NodeInfo`.
pub fn node_info(v: &Value, path: &str, probs: &mut Problems) -> Option<NodeInfo> {
    let o = json::obj(v, path, probs)?;
    let node_id = o.id("nodeId", 64, probs)?;
    let state = match o.get("state") {
        None => NodeState::Provisioned,
        Some(_) => o
            .enumeration("state", NodeState::parse, NodeState::ALL, probs)
            .unwrap_or(NodeState::Error),
    };
    let mut cpus = Vec::new();
    for (p, cv) in o.array("cpus", probs) {
        let Some(c) = json::obj(cv, &p, probs) else {
            continue;
        };
        cpus.push(CpuInfo {
            model_name: c.string("modelName", probs).unwrap_or_default(),
            num_cores: c.u64("numCores", probs).unwrap_or(0),
            num_threads: c.u64("numThreads", probs).unwrap_or(0),
            arch_info: arch(&c, probs),
            max_dmips: c.u64("maxDmips", probs).unwrap_or(0),
        });
    }
    let mut partitions = Vec::new();
    for (p, pv) in o.array("partitions", probs) {
        let Some(c) = json::obj(pv, &p, probs) else {
            continue;
        };
        partitions.push(PartitionInfo {
            name: c.string("name", probs).unwrap_or_default(),
            types: c.strings("types", probs),
            total_size: c.u64("totalSize", probs).unwrap_or(0),
            path: c.string("path", probs).unwrap_or_default(),
        });
    }
    let mut attrs = std::collections::BTreeMap::new();
    for (p, av) in o.array("attrs", probs) {
        let Some(a) = json::obj(av, &p, probs) else {
            continue;
        };
        if let Some(name) = a.string("name", probs) {
            attrs.insert(name, a.string("value", probs).unwrap_or_default());
        }
    }
    let error = o
        .object("error", probs)
        .and_then(|(p, ev)| json::obj(ev, &p, probs))
        .and_then(|e| {
            let code = e.u64("aosCode", probs).unwrap_or(0);
            (code != 0).then(|| e.string("message", probs).unwrap_or_default())
        });
    Some(NodeInfo {
        node_id,
        node_type: o.string("nodeType", probs).unwrap_or_default(),
        title: o.string("title", probs).unwrap_or_default(),
        max_dmips: o.u64("maxDmips", probs).unwrap_or(0),
        total_ram: o.u64("totalRam", probs).unwrap_or(0),
        physical_ram: o.u64("physicalRam", probs).unwrap_or(0),
        os_info: os(&o, probs),
        cpus,
        partitions,
        attrs,
        state,
        error,
    })
}

/// `servicemanager.v5.SMInfo`; returns the node ID it names and the info.
pub fn sm_info(v: &Value, path: &str, probs: &mut Problems) -> Option<(String, SmInfo)> {
    let o = json::obj(v, path, probs)?;
    let node_id = o.id("nodeId", 64, probs)?;
    let mut runtimes = Vec::new();
    for (p, rv) in o.array("runtimes", probs) {
        let Some(r) = json::obj(rv, &p, probs) else {
            continue;
        };
        let Some(runtime_id) = r.id("runtimeId", 64, probs) else {
            continue;
        };
        runtimes.push(RuntimeInfo {
            runtime_id,
            runtime_type: r.id("type", 64, probs).unwrap_or_default(),
            arch_info: arch(&r, probs),
            os_info: os(&r, probs),
            max_dmips: r.u64("maxDmips", probs).unwrap_or(0),
            allowed_dmips: r.u64("allowedDmips", probs).unwrap_or(0),
            total_ram: r.u64("totalRam", probs).unwrap_or(0),
            allowed_ram: r.u64("allowedRam", probs).unwrap_or(0),
            max_instances: r.u64("maxInstances", probs).unwrap_or(0),
        });
    }
    let mut resources = Vec::new();
    for (p, rv) in o.array("resources", probs) {
        let Some(r) = json::obj(rv, &p, probs) else {
            continue;
        };
        resources.push(ResourceInfo {
            name: r.id("name", 64, probs).unwrap_or_default(),
            shared_count: r.u64("sharedCount", probs).unwrap_or(0),
        });
    }
    Some((
        node_id,
        SmInfo {
            runtimes,
            resources,
        },
    ))
}
