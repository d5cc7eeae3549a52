//! Wire identity with upstream servicemanager.v5 / common.v2: messages are encoded by hand
//! from the upstream field numbers (reference grpc-interfaces.md 1.2-1.4) and decoded with the
//! generated types, and the other way round.

#[path = "common/wire.rs"]
mod wire;

use aos_cm::api::proto::common::v2 as common;
use aos_cm::api::proto::servicemanager::v5 as sm;
use prost::Message;
use wire::{W, w};

#[test]
fn sm_info_from_upstream_field_numbers() {
    // SMOutgoingMessages.sm_info = 1 { node_id = 1, runtimes = 2 {...}, resources = 3 {...} }
    let runtime = w()
        .str(1, "rt-1")
        .str(2, "runc")
        .uint(3, 20000)
        .uint(4, 8000)
        .uint(5, 4 << 30)
        .uint(6, 1 << 30)
        .uint(7, 4)
        .msg(8, w().str(1, "linux").str(2, "6.6").str(3, "feat"))
        .msg(9, w().str(1, "arm64").str(2, "v8"));
    let info = w()
        .str(1, "secondary-1")
        .msg(2, runtime)
        .msg(3, w().str(1, "camera").uint(2, 1));
    let bytes = w().msg(1, info).0;
    let decoded = sm::SmOutgoingMessages::decode(bytes.as_slice()).unwrap();
    let Some(sm::sm_outgoing_messages::SmOutgoingMessage::SmInfo(i)) = decoded.sm_outgoing_message
    else {
        panic!("not sm_info: {decoded:?}")
    };
    assert_eq!(i.node_id, "secondary-1");
    let r = &i.runtimes[0];
    assert_eq!(
        (
            r.runtime_id.as_str(),
            r.r#type.as_str(),
            r.max_dmips,
            r.allowed_dmips,
            r.total_ram,
            r.allowed_ram,
            r.max_instances
        ),
        ("rt-1", "runc", 20000, 8000, 4 << 30, 1 << 30, 4)
    );
    assert_eq!(r.os_info.as_ref().unwrap().features, vec!["feat"]);
    assert_eq!(r.arch_info.as_ref().unwrap().variant, "v8");
    assert_eq!(i.resources[0].shared_count, 1);
}

#[test]
fn instance_status_and_other_outgoing_messages() {
    let ident = w()
        .str(1, "item")
        .str(2, "subj")
        .uint(3, 2)
        .uint(4, 1)
        .uint(5, 1);
    let status = w()
        .msg(1, ident)
        .str(2, "1.0.0")
        .str(3, "rt")
        .str(4, "sha256:ab")
        .msg(5, w().str(1, "VAR").msg(2, w().uint(1, 6).str(3, "bad")))
        .str(6, "active")
        .msg(7, w().uint(1, 0));
    for (field, kind) in [(3u32, "update"), (4, "node")] {
        let bytes = w().msg(field, w().msg(1, status_clone(&status))).0;
        let m = sm::SmOutgoingMessages::decode(bytes.as_slice()).unwrap();
        let list = match m.sm_outgoing_message.unwrap() {
            sm::sm_outgoing_messages::SmOutgoingMessage::UpdateInstancesStatus(s)
                if kind == "update" =>
            {
                s.instances
            }
            sm::sm_outgoing_messages::SmOutgoingMessage::NodeInstancesStatus(s)
                if kind == "node" =>
            {
                s.instances
            }
            other => panic!("{kind}: {other:?}"),
        };
        let s = &list[0];
        let id = s.instance.as_ref().unwrap();
        assert_eq!(
            (id.item_id.as_str(), id.subject_id.as_str(), id.instance),
            ("item", "subj", 2)
        );
        assert_eq!(id.r#type(), common::ItemType::Component);
        assert!(id.preinstalled);
        assert_eq!(
            (
                s.version.as_str(),
                s.runtime_id.as_str(),
                s.manifest_digest.as_str(),
                s.state.as_str()
            ),
            ("1.0.0", "rt", "sha256:ab", "active")
        );
        assert_eq!(s.env_vars[0].error.as_ref().unwrap().aos_code, 6);
    }
    // NodeConfigStatus = 2 { state = 1, version = 2, error = 3 }; LogData = 5; Alert = 8.
    let m = sm::SmOutgoingMessages::decode(
        w().msg(2, w().str(1, "installed").str(2, "1.2.0"))
            .0
            .as_slice(),
    )
    .unwrap();
    assert!(
        matches!(m.sm_outgoing_message, Some(sm::sm_outgoing_messages::SmOutgoingMessage::NodeConfigStatus(ref s)) if s.state == "installed" && s.version == "1.2.0")
    );
    let m = sm::SmOutgoingMessages::decode(
        w().msg(
            5,
            w().str(1, "log-1")
                .uint(2, 3)
                .uint(3, 2)
                .bytes(4, b"xyz")
                .str(5, "ok"),
        )
        .0
        .as_slice(),
    )
    .unwrap();
    assert!(
        matches!(m.sm_outgoing_message, Some(sm::sm_outgoing_messages::SmOutgoingMessage::Log(ref l)) if l.correlation_id == "log-1" && l.part_count == 3 && l.part == 2 && l.data == b"xyz")
    );
    let m = sm::SmOutgoingMessages::decode(
        w().msg(8, w().msg(6, w().str(1, "SM").str(2, "boom")))
            .0
            .as_slice(),
    )
    .unwrap();
    assert!(
        matches!(m.sm_outgoing_message, Some(sm::sm_outgoing_messages::SmOutgoingMessage::Alert(sm::Alert { alert_item: Some(sm::alert::AlertItem::CoreAlert(ref c)), .. })) if c.core_component == "SM")
    );
    let m = sm::SmOutgoingMessages::decode(
        w().msg(7, w().msg(1, w().uint(2, 100).uint(3, 7)))
            .0
            .as_slice(),
    )
    .unwrap();
    assert!(
        matches!(m.sm_outgoing_message, Some(sm::sm_outgoing_messages::SmOutgoingMessage::AverageMonitoring(ref a)) if a.node_monitoring.as_ref().unwrap().ram == 100 && a.node_monitoring.as_ref().unwrap().cpu == 7)
    );
}

fn status_clone(x: &W) -> W {
    W(x.0.clone())
}

#[test]
fn update_instances_encodes_to_upstream_field_numbers() {
    let msg = sm::SmIncomingMessages {
        sm_incoming_message: Some(
            sm::sm_incoming_messages::SmIncomingMessage::UpdateInstances(sm::UpdateInstances {
                start_instances: vec![sm::InstanceInfo {
                    instance: Some(common::InstanceIdent {
                        item_id: "i".into(),
                        subject_id: "s".into(),
                        instance: 1,
                        r#type: 0,
                        preinstalled: false,
                    }),
                    version: "1.0".into(),
                    manifest_digest: "m".into(),
                    owner_id: "o".into(),
                    runtime_id: "r".into(),
                    uid: 5000,
                    gid: 5001,
                    priority: 100,
                    storage_path: "st".into(),
                    state_path: "sp".into(),
                    env_vars: vec![],
                    monitoring_parameters: Some(sm::MonitoringParameters {
                        alert_rules: Some(sm::AlertRules {
                            ram: Some(sm::AlertRulePercents {
                                duration: None,
                                min_threshold: 1.5,
                                max_threshold: 2.0,
                            }),
                            ..Default::default()
                        }),
                    }),
                }],
                stop_instances: vec![common::InstanceIdent {
                    item_id: "x".into(),
                    subject_id: "y".into(),
                    instance: 0,
                    r#type: 0,
                    preinstalled: false,
                }],
            }),
        ),
    };
    let info = w()
        .msg(1, w().str(1, "i").str(2, "s").uint(3, 1))
        .str(2, "1.0")
        .str(3, "m")
        .str(4, "o")
        .str(5, "r")
        .uint(6, 5000)
        .uint(7, 5001)
        .uint(8, 100)
        .str(9, "st")
        .str(10, "sp")
        .msg(
            12,
            w().msg(1, w().msg(1, w().double(2, 1.5).double(3, 2.0))),
        );
    let want = w()
        .msg(4, w().msg(1, info).msg(2, w().str(1, "x").str(2, "y")))
        .0;
    assert_eq!(msg.encode_to_vec(), want);
    // ConnectionStatus = 9 { cloud_status = 1 }
    let cs = sm::SmIncomingMessages {
        sm_incoming_message: Some(
            sm::sm_incoming_messages::SmIncomingMessage::ConnectionStatus(sm::ConnectionStatus {
                cloud_status: sm::ConnectionEnum::Connected as i32,
            }),
        ),
    };
    assert_eq!(cs.encode_to_vec(), w().msg(9, w().uint(1, 1)).0);
    // SetNodeConfig = 3 { node_config = 1, version = 2 }
    let set = sm::SmIncomingMessages {
        sm_incoming_message: Some(sm::sm_incoming_messages::SmIncomingMessage::SetNodeConfig(
            sm::SetNodeConfig {
                node_config: "{}".into(),
                version: "1.2.0".into(),
            },
        )),
    };
    assert_eq!(
        set.encode_to_vec(),
        w().msg(3, w().str(1, "{}").str(2, "1.2.0")).0
    );
}

#[test]
fn network_service_messages_use_upstream_field_numbers() {
    let resp = sm::AllocateInstanceNetworkResponse {
        subnet: "172.17.0.0/16".into(),
        ip: "172.17.0.3".into(),
        dns_servers: vec!["172.17.0.1".into()],
        error: None,
        firewall_rules: vec![sm::FirewallRule {
            dst_ip: "d".into(),
            dst_port: "80".into(),
            proto: "tcp".into(),
            src_ip: "s".into(),
        }],
    };
    let want = w()
        .str(1, "172.17.0.0/16")
        .str(2, "172.17.0.3")
        .str(3, "172.17.0.1")
        .msg(5, w().str(1, "d").str(2, "80").str(3, "tcp").str(4, "s"))
        .0;
    assert_eq!(resp.encode_to_vec(), want);
    let req = sm::AllocateInstanceNetworkRequest::decode(
        w().msg(1, w().str(1, "i"))
            .str(2, "net")
            .str(3, "node")
            .msg(4, w().str(1, "h").str(2, "a/1").str(3, "80/tcp"))
            .0
            .as_slice(),
    )
    .unwrap();
    let data = req.service_data.unwrap();
    assert_eq!(
        (req.network_id.as_str(), req.node_id.as_str()),
        ("net", "node")
    );
    assert_eq!(
        (data.hosts, data.allowed_connections, data.exposed_ports),
        (
            vec!["h".to_string()],
            vec!["a/1".to_string()],
            vec!["80/tcp".to_string()]
        )
    );
}
