//! The unit config reconciler: installs a newer desired unit config (an equal version is
//! already installed, a lower one is rejected), pushes the resolved node config to every
//! connected node whose reported version differs or reports an error, and asks IAM to pause or
//! resume nodes as the desired status says.

use crate::model::*;

pub fn plan(snap: &Snapshot, _now: UnixMillis) -> Plan {
    let mut plan = Plan::new(ReconcilerKind::UnitConfig);
    let Some(desired) = snap.desired.as_ref() else {
        return plan;
    };
    let status = &snap.observed.unit_config;

    if let Some(uc) = &desired.unit_config {
        match (&status.state, &status.version) {
            (UnitConfigState::Installed, Some(installed)) if uc.version == *installed => {}
            (UnitConfigState::Installed, Some(installed)) if uc.version < *installed => {
                plan.condition(
                    "unitconfig",
                    "UnitConfigRejected",
                    format!(
                        "desired version {} is lower than the installed {installed}",
                        uc.version
                    ),
                );
            }
            _ => plan.actions.push(Action::InstallUnitConfig {
                version: uc.version.to_string(),
            }),
        }
    }

    // Node configs come from the installed unit config only.
    if status.state == UnitConfigState::Installed
        && let Some(installed) = &status.config
    {
        let version = installed.version.to_string();
        for node in snap.observed.nodes.values() {
            if !node.is_connected() || node.sm.is_none() {
                continue;
            }
            let up_to_date = node
                .node_config
                .as_ref()
                .is_some_and(|s| s.version == version && s.error.is_none());
            if !up_to_date {
                plan.actions.push(Action::PushNodeConfig {
                    node_id: node.info.node_id.clone(),
                    version: version.clone(),
                });
            }
        }
    } else if status.state == UnitConfigState::Failed {
        plan.condition(
            "unitconfig",
            "UnitConfigFailed",
            status
                .error
                .clone()
                .unwrap_or_else(|| "the installed unit config is invalid".into()),
        );
    }

    for want in &desired.nodes {
        let Some(node) = snap.observed.nodes.get(&want.node_id) else {
            plan.condition(
                format!("node {}", want.node_id),
                "UnknownNode",
                "the desired status names a node IAM does not know",
            );
            continue;
        };
        let is = node.info.state;
        let differs = match want.state {
            DesiredNodeState::Paused => is == NodeState::Provisioned,
            DesiredNodeState::Provisioned => is == NodeState::Paused,
        };
        if differs {
            plan.actions.push(Action::SetNodeState {
                node_id: want.node_id.clone(),
                state: want.state,
            });
        }
    }
    plan
}
