//! Conversions between servicemanager.v5 / common.v2 messages and the model.

use crate::api::proto::common::v2 as pbc;
use crate::api::proto::servicemanager::v5 as pb;
use crate::model::*;

pub fn ident_to_pb(
    ident: &InstanceIdent,
    item_type: ItemType,
    preinstalled: bool,
) -> pbc::InstanceIdent {
    pbc::InstanceIdent {
        item_id: ident.item_id.clone(),
        subject_id: ident.subject_id.clone(),
        instance: ident.instance,
        r#type: if item_type == ItemType::Component {
            pbc::ItemType::Component as i32
        } else {
            pbc::ItemType::Service as i32
        },
        preinstalled,
    }
}

pub fn ident_from_pb(id: &pbc::InstanceIdent) -> InstanceIdent {
    InstanceIdent::new(&id.item_id, &id.subject_id, id.instance)
}

fn os_from_pb(os: Option<&pbc::OsInfo>) -> OsInfo {
    os.map(|o| OsInfo {
        os: o.os.clone(),
        version: (!o.version.is_empty()).then(|| o.version.clone()),
        features: o.features.clone(),
    })
    .unwrap_or_default()
}

fn arch_from_pb(a: Option<&pbc::ArchInfo>) -> ArchInfo {
    a.map(|a| ArchInfo {
        architecture: a.architecture.clone(),
        variant: (!a.variant.is_empty()).then(|| a.variant.clone()),
    })
    .unwrap_or_default()
}

pub fn sm_info_from_pb(info: &pb::SmInfo) -> SmInfo {
    SmInfo {
        runtimes: info
            .runtimes
            .iter()
            .map(|r| RuntimeInfo {
                runtime_id: r.runtime_id.clone(),
                runtime_type: r.r#type.clone(),
                arch_info: arch_from_pb(r.arch_info.as_ref()),
                os_info: os_from_pb(r.os_info.as_ref()),
                max_dmips: r.max_dmips,
                allowed_dmips: r.allowed_dmips,
                total_ram: r.total_ram,
                allowed_ram: r.allowed_ram,
                max_instances: r.max_instances,
            })
            .collect(),
        resources: info
            .resources
            .iter()
            .map(|r| ResourceInfo {
                name: r.name.clone(),
                shared_count: r.shared_count,
            })
            .collect(),
    }
}

pub fn sm_info_to_pb(node_id: &str, info: &SmInfo) -> pb::SmInfo {
    pb::SmInfo {
        node_id: node_id.to_string(),
        runtimes: info
            .runtimes
            .iter()
            .map(|r| pb::RuntimeInfo {
                runtime_id: r.runtime_id.clone(),
                r#type: r.runtime_type.clone(),
                max_dmips: r.max_dmips,
                allowed_dmips: r.allowed_dmips,
                total_ram: r.total_ram,
                allowed_ram: r.allowed_ram,
                max_instances: r.max_instances,
                os_info: Some(pbc::OsInfo {
                    os: r.os_info.os.clone(),
                    version: r.os_info.version.clone().unwrap_or_default(),
                    features: r.os_info.features.clone(),
                }),
                arch_info: Some(pbc::ArchInfo {
                    architecture: r.arch_info.architecture.clone(),
                    variant: r.arch_info.variant.clone().unwrap_or_default(),
                }),
            })
            .collect(),
        resources: info
            .resources
            .iter()
            .map(|r| pb::ResourceInfo {
                name: r.name.clone(),
                shared_count: r.shared_count,
            })
            .collect(),
    }
}

/// An error message when the error info says there is one (aos_code or exit_code non-zero).
pub fn error_from_pb(e: Option<&pbc::ErrorInfo>) -> Option<String> {
    let e = e?;
    (e.aos_code != 0 || e.exit_code != 0).then(|| {
        if e.message.is_empty() {
            format!("error {} (exit code {})", e.aos_code, e.exit_code)
        } else {
            e.message.clone()
        }
    })
}

/// An instance status as the model keeps it; `None` for an unknown state string.
pub fn status_from_pb(node_id: &str, s: &pb::InstanceStatus) -> Result<ReportedInstance, String> {
    let id = s
        .instance
        .as_ref()
        .ok_or_else(|| "instance status without instance".to_string())?;
    let state = InstanceState::parse(&s.state).ok_or_else(|| {
        format!(
            "instance status {}: unknown state {:?}, expected one of: {}",
            ident_from_pb(id),
            s.state,
            InstanceState::ALL.join(", ")
        )
    })?;
    Ok(ReportedInstance {
        ident: ident_from_pb(id),
        node_id: node_id.to_string(),
        runtime_id: s.runtime_id.clone(),
        version: s.version.clone(),
        state,
        error: error_from_pb(s.error.as_ref()),
        preinstalled: id.preinstalled,
    })
}

fn duration_pb(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    })
}

fn alert_rules_to_pb(r: &AlertRules) -> pb::AlertRules {
    let pct = |p: &PercentRule| pb::AlertRulePercents {
        duration: duration_pb(p.min_timeout_ms),
        min_threshold: p.min_threshold,
        max_threshold: p.max_threshold,
    };
    let pts = |p: &PointsRule| pb::AlertRulePoints {
        duration: duration_pb(p.min_timeout_ms),
        min_threshold: p.min_threshold,
        max_threshold: p.max_threshold,
    };
    pb::AlertRules {
        ram: r.ram.as_ref().map(pct),
        cpu: r.cpu.as_ref().map(pct),
        partitions: r
            .partitions
            .iter()
            .map(|p| pb::PartitionAlertRule {
                name: p.name.clone(),
                duration: duration_pb(p.min_timeout_ms),
                min_threshold: p.min_threshold,
                max_threshold: p.max_threshold,
            })
            .collect(),
        download: r.download.as_ref().map(pts),
        upload: r.upload.as_ref().map(pts),
    }
}

/// Where an instance keeps its storage and state, under the configured roots.
pub struct InstancePaths<'a> {
    pub storage_dir: &'a str,
    pub state_dir: &'a str,
}

pub fn instance_info(s: &InstanceStart, paths: &InstancePaths<'_>) -> pb::InstanceInfo {
    let p = &s.placement;
    let rel = format!(
        "{}/{}/{}",
        p.ident.item_id, p.ident.subject_id, p.ident.instance
    );
    let component = s.item_type == ItemType::Component;
    pb::InstanceInfo {
        instance: Some(ident_to_pb(&p.ident, s.item_type, false)),
        version: p.version.clone(),
        manifest_digest: p.manifest_digest.to_string(),
        owner_id: s.owner_id.clone(),
        runtime_id: p.runtime_id.clone(),
        uid: p.uid,
        gid: p.gid,
        priority: s.priority,
        storage_path: if component || s.storage_quota == 0 {
            String::new()
        } else {
            format!("{}/{rel}", paths.storage_dir)
        },
        state_path: if component || s.state_quota == 0 {
            String::new()
        } else {
            format!("{}/{rel}/state.dat", paths.state_dir)
        },
        env_vars: p
            .env
            .iter()
            .map(|(name, value)| pb::EnvVarInfo {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        monitoring_parameters: s.alert_rules.as_ref().map(|r| pb::MonitoringParameters {
            alert_rules: Some(alert_rules_to_pb(r)),
        }),
    }
}

fn rule_json_pct(p: &PercentRule) -> serde_json::Value {
    serde_json::json!({
        "minTimeout": crate::config::format_iso8601(std::time::Duration::from_millis(p.min_timeout_ms)),
        "minThreshold": p.min_threshold,
        "maxThreshold": p.max_threshold,
    })
}

/// The node config as the SM expects it in Check/SetNodeConfig: the v7 unit config node entry.
pub fn node_config_json(cfg: &NodeConfig) -> String {
    let mut o = serde_json::Map::new();
    if let Some(id) = &cfg.node_id {
        o.insert("node".into(), serde_json::json!({ "codename": id }));
    }
    o.insert(
        "nodeGroupSubject".into(),
        serde_json::json!({ "codename": cfg.node_type }),
    );
    if let Some(v) = &cfg.version {
        o.insert("version".into(), serde_json::json!(v));
    }
    if let Some(r) = &cfg.alert_rules {
        let mut a = serde_json::Map::new();
        if let Some(x) = &r.ram {
            a.insert("ram".into(), rule_json_pct(x));
        }
        if let Some(x) = &r.cpu {
            a.insert("cpu".into(), rule_json_pct(x));
        }
        // Always present when alert rules are (errata 23).
        a.insert(
            "partitions".into(),
            r.partitions
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name,
                        "minTimeout": crate::config::format_iso8601(std::time::Duration::from_millis(p.min_timeout_ms)),
                        "minThreshold": p.min_threshold,
                        "maxThreshold": p.max_threshold,
                    })
                })
                .collect(),
        );
        for (key, rule) in [("download", &r.download), ("upload", &r.upload)] {
            if let Some(x) = rule {
                a.insert(
                    key.into(),
                    serde_json::json!({
                        "minTimeout": crate::config::format_iso8601(std::time::Duration::from_millis(x.min_timeout_ms)),
                        "minThreshold": x.min_threshold,
                        "maxThreshold": x.max_threshold,
                    }),
                );
            }
        }
        o.insert("alertRules".into(), serde_json::Value::Object(a));
    }
    let r = &cfg.resource_ratios;
    let mut ratios = serde_json::Map::new();
    for (k, v) in [
        ("cpu", r.cpu),
        ("ram", r.ram),
        ("storage", r.storage),
        ("state", r.state),
    ] {
        if let Some(v) = v {
            ratios.insert(k.into(), serde_json::json!(v));
        }
    }
    if !ratios.is_empty() {
        o.insert("resourceRatios".into(), serde_json::Value::Object(ratios));
    }
    o.insert("labels".into(), serde_json::json!(cfg.labels));
    o.insert("priority".into(), serde_json::json!(cfg.priority));
    serde_json::Value::Object(o).to_string()
}
