//! IAM `NodeInfo` (iamanager.v6) and SM `SMInfo` (servicemanager.v5) converted into the model:
//! in proto3 JSON form, as a scenario's `nodes.json` carries them, and as the IAM client
//! receives them (prost messages). proto3 JSON writes 64-bit integers as strings; both forms are
//! accepted. Both forms share the rules for state, error and empty optional strings.

use crate::api::json::{self, Obj, Problems};
use crate::api::proto::common::v2 as pbc;
use crate::api::proto::iamanager::v6 as pbi;
use crate::model::*;
use serde_json::Value;

/// A node's state from its wire string: absent or empty (proto3 leaves it out) means
/// provisioned, an unknown string means error.
fn node_state(state: Option<&str>) -> NodeState {
    match state {
        None | Some("") => NodeState::Provisioned,
        Some(s) => NodeState::parse(s).unwrap_or(NodeState::Error),
    }
}

/// An `ErrorInfo` is an error only when its Aos code is set; its message is what is kept.
fn error_text(aos_code: i64, message: impl FnOnce() -> String) -> Option<String> {
    (aos_code != 0).then(message)
}

/// proto3 has no optional strings: empty means absent.
fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn arch(o: &Obj<'_>, probs: &mut Problems) -> ArchInfo {
    match o
        .object("archInfo", probs)
        .and_then(|(p, v)| json::obj(v, &p, probs))
    {
        Some(a) => ArchInfo {
            architecture: a.string("architecture", probs).unwrap_or_default(),
            variant: a.string("variant", probs).and_then(non_empty),
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
            version: a.string("version", probs).and_then(non_empty),
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
        None => node_state(None),
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
            error_text(code as i64, || {
                e.string("message", probs).unwrap_or_default()
            })
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

fn arch_from_pb(a: Option<pbc::ArchInfo>) -> ArchInfo {
    let a = a.unwrap_or_default();
    ArchInfo {
        architecture: a.architecture,
        variant: non_empty(a.variant),
    }
}

fn os_from_pb(o: Option<pbc::OsInfo>) -> OsInfo {
    let o = o.unwrap_or_default();
    OsInfo {
        os: o.os,
        version: non_empty(o.version),
        features: o.features,
    }
}

/// `iamanager.v6.NodeInfo` as the IAM client receives it. `None` when it names no node.
pub fn node_info_from_pb(n: pbi::NodeInfo) -> Option<NodeInfo> {
    if n.node_id.is_empty() {
        return None;
    }
    Some(NodeInfo {
        node_id: n.node_id,
        node_type: n.node_type,
        title: n.title,
        max_dmips: n.max_dmips,
        total_ram: n.total_ram,
        physical_ram: n.physical_ram,
        os_info: os_from_pb(n.os_info),
        cpus: n
            .cpus
            .into_iter()
            .map(|c| CpuInfo {
                model_name: c.model_name,
                num_cores: c.num_cores,
                num_threads: c.num_threads,
                arch_info: arch_from_pb(c.arch_info),
                max_dmips: c.max_dmips,
            })
            .collect(),
        partitions: n
            .partitions
            .into_iter()
            .map(|p| PartitionInfo {
                name: p.name,
                types: p.types,
                total_size: p.total_size,
                path: p.path,
            })
            .collect(),
        attrs: n.attrs.into_iter().map(|a| (a.name, a.value)).collect(),
        state: node_state(Some(&n.state)),
        error: n
            .error
            .and_then(|e| error_text(i64::from(e.aos_code), || e.message)),
    })
}

/// The model's node info as `iamanager.v6.NodeInfo` (the simulated IAM serves it).
pub fn node_info_to_pb(n: &NodeInfo) -> pbi::NodeInfo {
    let arch = |a: &ArchInfo| pbc::ArchInfo {
        architecture: a.architecture.clone(),
        variant: a.variant.clone().unwrap_or_default(),
    };
    pbi::NodeInfo {
        node_id: n.node_id.clone(),
        node_type: n.node_type.clone(),
        title: n.title.clone(),
        max_dmips: n.max_dmips,
        total_ram: n.total_ram,
        physical_ram: n.physical_ram,
        os_info: Some(pbc::OsInfo {
            os: n.os_info.os.clone(),
            version: n.os_info.version.clone().unwrap_or_default(),
            features: n.os_info.features.clone(),
        }),
        cpus: n
            .cpus
            .iter()
            .map(|c| pbi::CpuInfo {
                model_name: c.model_name.clone(),
                num_cores: c.num_cores,
                num_threads: c.num_threads,
                arch_info: Some(arch(&c.arch_info)),
                max_dmips: c.max_dmips,
            })
            .collect(),
        partitions: n
            .partitions
            .iter()
            .map(|p| pbi::PartitionInfo {
                name: p.name.clone(),
                types: p.types.clone(),
                total_size: p.total_size,
                path: p.path.clone(),
            })
            .collect(),
        attrs: n
            .attrs
            .iter()
            .map(|(name, value)| pbi::NodeAttribute {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        state: n.state.as_str().to_string(),
        error: n.error.as_ref().map(|m| pbc::ErrorInfo {
            aos_code: 1,
            exit_code: 0,
            message: m.clone(),
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json_node(text: &str) -> NodeInfo {
        let mut probs = Problems::default();
        let v = json::parse(text).unwrap();
        let n = node_info(&v, "$", &mut probs).unwrap();
        assert!(probs.is_empty(), "{probs}");
        n
    }

    #[test]
    fn json_and_prost_forms_agree() {
        let n = json_node(
            r#"{"nodeId":"n1","nodeType":"t","title":"T","maxDmips":"100","totalRam":5,
                "physicalRam":6,"osInfo":{"os":"linux","version":"6"},
                "cpus":[{"modelName":"m","numCores":2,"numThreads":4,
                         "archInfo":{"architecture":"arm64","variant":"v8"},"maxDmips":100}],
                "partitions":[{"name":"p","types":["states"],"totalSize":"7","path":"/p"}],
                "attrs":[{"name":"MainNode","value":""}],"state":"paused",
                "error":{"aosCode":1,"message":"m"}}"#,
        );
        let pb = node_info_to_pb(&n);
        assert_eq!(pb.state, "paused");
        assert_eq!(node_info_from_pb(pb), Some(n));
    }

    #[test]
    fn prost_defaults_follow_the_json_rules() {
        // Empty state (proto3 leaves it out) is provisioned, as an absent JSON state.
        let absent = json_node(r#"{"nodeId":"n1"}"#);
        let from_pb = node_info_from_pb(pbi::NodeInfo {
            node_id: "n1".into(),
            os_info: Some(pbc::OsInfo::default()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(from_pb, absent);
        assert_eq!(from_pb.state, NodeState::Provisioned);
        assert_eq!(from_pb.os_info.version, None);

        let odd = node_info_from_pb(pbi::NodeInfo {
            node_id: "n1".into(),
            state: "exploded".into(),
            error: Some(pbc::ErrorInfo {
                aos_code: 0,
                exit_code: 0,
                message: "not an error".into(),
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(odd.state, NodeState::Error);
        assert_eq!(odd.error, None);
        assert_eq!(node_info_from_pb(pbi::NodeInfo::default()), None);
    }
}
