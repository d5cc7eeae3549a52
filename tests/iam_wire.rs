//! Wire identity with upstream iamanager.v6 (reference grpc-interfaces.md 1.7): messages are
//! encoded by hand from the upstream field numbers and decoded with the generated types (and
//! the other way round), and RPCs are called by their upstream paths on the simulated IAM.

#[path = "common/wire.rs"]
mod wire;

use aos_cm::api::proto::common::v2 as common;
use aos_cm::api::proto::iamanager::v6 as iam;
use aos_cm::sim::iam::{SimIam, SimIamConfig};
use prost::Message;
use wire::{W, w};

fn error(code: u64, exit: u64, message: &str) -> W {
    w().uint(1, code).uint(2, exit).str(3, message)
}

#[test]
fn node_info_from_upstream_field_numbers() {
    let cpu = w()
        .str(1, "Cortex-A72")
        .uint(2, 4)
        .uint(3, 8)
        .msg(4, w().str(1, "arm64").str(2, "v8"))
        .uint(5, 12000);
    let partition = w()
        .str(1, "aos")
        .str(2, "storages")
        .str(2, "states")
        .uint(3, 1 << 30)
        .str(4, "/var/aos");
    let bytes = w()
        .str(1, "node-1")
        .str(2, "type-1")
        .str(3, "Node one")
        .uint(4, 12000)
        .uint(5, 2 << 30)
        .uint(6, 4 << 30)
        .msg(7, w().str(1, "linux").str(2, "6.6").str(3, "f1"))
        .msg(8, cpu)
        .msg(9, partition)
        .msg(10, w().str(1, "AosComponents").str(2, "cm,sm"))
        .str(11, "paused")
        .msg(12, error(1, 2, "broken"))
        .0;
    let n = iam::NodeInfo::decode(bytes.as_slice()).unwrap();
    assert_eq!(
        n,
        iam::NodeInfo {
            node_id: "node-1".into(),
            node_type: "type-1".into(),
            title: "Node one".into(),
            max_dmips: 12000,
            total_ram: 2 << 30,
            physical_ram: 4 << 30,
            os_info: Some(common::OsInfo {
                os: "linux".into(),
                version: "6.6".into(),
                features: vec!["f1".into()],
            }),
            cpus: vec![iam::CpuInfo {
                model_name: "Cortex-A72".into(),
                num_cores: 4,
                num_threads: 8,
                arch_info: Some(common::ArchInfo {
                    architecture: "arm64".into(),
                    variant: "v8".into(),
                }),
                max_dmips: 12000,
            }],
            partitions: vec![iam::PartitionInfo {
                name: "aos".into(),
                types: vec!["storages".into(), "states".into()],
                total_size: 1 << 30,
                path: "/var/aos".into(),
            }],
            attrs: vec![iam::NodeAttribute {
                name: "AosComponents".into(),
                value: "cm,sm".into(),
            }],
            state: "paused".into(),
            error: Some(common::ErrorInfo {
                aos_code: 1,
                exit_code: 2,
                message: "broken".into(),
            }),
        }
    );
    assert_eq!(n.encode_to_vec(), bytes);
}

#[test]
fn certificate_messages_use_upstream_field_numbers() {
    let cert = w()
        .str(1, "online")
        .str(2, "file:///c.pem")
        .str(3, "file:///c.key")
        .bytes(4, &[0xab, 0xcd])
        .bytes(5, b"CN=ca");
    let info = iam::CertInfo {
        r#type: "online".into(),
        cert_url: "file:///c.pem".into(),
        key_url: "file:///c.key".into(),
        serial: vec![0xab, 0xcd],
        issuer: b"CN=ca".to_vec(),
    };
    assert_eq!(info.encode_to_vec(), cert.0);

    let apply = w().str(1, "main").msg(2, cert).msg(3, error(6, 0, "bad")).0;
    let r = iam::ApplyCertResponse::decode(apply.as_slice()).unwrap();
    assert_eq!(r.node_id, "main");
    assert_eq!(r.cert_info, Some(info));
    assert_eq!(r.error.unwrap().aos_code, 6);

    let req = iam::CreateKeyRequest {
        node_id: "n".into(),
        subject: "s".into(),
        r#type: "iam".into(),
        password: "p".into(),
    };
    assert_eq!(
        req.encode_to_vec(),
        w().str(1, "n").str(2, "s").str(3, "iam").str(4, "p").0
    );
    let resp = w()
        .str(1, "n")
        .str(2, "iam")
        .str(3, "CSR")
        .msg(4, error(0, 0, ""))
        .0;
    let r = iam::CreateKeyResponse::decode(resp.as_slice()).unwrap();
    assert_eq!(
        (r.node_id.as_str(), r.r#type.as_str(), r.csr.as_str()),
        ("n", "iam", "CSR")
    );

    let get = iam::GetCertRequest {
        r#type: "offline".into(),
        issuer: b"I".to_vec(),
        serial: "0a".into(),
    };
    assert_eq!(
        get.encode_to_vec(),
        w().str(1, "offline").bytes(2, b"I").str(3, "0a").0
    );
    let apply_req = iam::ApplyCertRequest {
        node_id: "n".into(),
        r#type: "sm".into(),
        cert: "PEM".into(),
    };
    assert_eq!(
        apply_req.encode_to_vec(),
        w().str(1, "n").str(2, "sm").str(3, "PEM").0
    );
}

#[test]
fn identity_provisioning_and_register_node_messages() {
    let s = iam::SystemInfo::decode(w().str(1, "sys").str(2, "model").str(3, "v1").0.as_slice())
        .unwrap();
    assert_eq!(
        (
            s.system_id.as_str(),
            s.unit_model.as_str(),
            s.version.as_str()
        ),
        ("sys", "model", "v1")
    );
    let p = iam::StartProvisioningRequest {
        node_id: "n".into(),
        password: "pw".into(),
    };
    assert_eq!(p.encode_to_vec(), w().str(1, "n").str(2, "pw").0);
    let r = iam::DeprovisionResponse::decode(w().msg(1, error(9, 0, "x")).0.as_slice()).unwrap();
    assert_eq!(r.error.unwrap().aos_code, 9);
    let ids = iam::NodesId::decode(w().str(1, "a").str(1, "b").0.as_slice()).unwrap();
    assert_eq!(ids.ids, ["a", "b"]);
    // RegisterNode oneofs: apply_cert_request = 8, apply_cert_response = 9.
    let incoming =
        iam::IamIncomingMessages::decode(w().msg(8, w().str(1, "n")).0.as_slice()).unwrap();
    assert!(matches!(
        incoming.iam_incoming_message,
        Some(iam::iam_incoming_messages::IamIncomingMessage::ApplyCertRequest(_))
    ));
    let outgoing =
        iam::IamOutgoingMessages::decode(w().msg(3, w().str(1, "iam")).0.as_slice()).unwrap();
    assert!(matches!(
        outgoing.iam_outgoing_message,
        Some(iam::iam_outgoing_messages::IamOutgoingMessage::CertTypesResponse(_))
    ));
}

/// One unary call by its full upstream path.
async fn raw<Req, Resp>(channel: tonic::transport::Channel, path: &'static str, req: Req) -> Resp
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(req),
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{path}: {e:?}"))
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_answer_on_their_upstream_paths() {
    let sim = SimIam::start(SimIamConfig::example()).await.unwrap();
    let ch = tonic::transport::Channel::from_shared(sim.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let s: iam::SystemInfo = raw(
        ch.clone(),
        "/iamanager.v6.IAMPublicIdentityService/GetSystemInfo",
        (),
    )
    .await;
    assert!(!s.system_id.is_empty());
    let ids: iam::NodesId = raw(
        ch.clone(),
        "/iamanager.v6.IAMPublicNodesService/GetAllNodeIDs",
        (),
    )
    .await;
    assert_eq!(ids.ids.len(), 3);
    let n: iam::NodeInfo = raw(
        ch.clone(),
        "/iamanager.v6.IAMPublicCurrentNodeService/GetCurrentNodeInfo",
        (),
    )
    .await;
    assert_eq!(n.node_id, "main");
    let c: iam::CertInfo = raw(
        ch.clone(),
        "/iamanager.v6.IAMPublicCertService/GetCert",
        iam::GetCertRequest {
            r#type: "online".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(c.r#type, "online");
    let _: iam::PauseNodeResponse = raw(
        ch.clone(),
        "/iamanager.v6.IAMNodesService/PauseNode",
        iam::PauseNodeRequest {
            node_id: "secondary-1".into(),
        },
    )
    .await;
    let t: iam::CertTypes = raw(
        ch.clone(),
        "/iamanager.v6.IAMProvisioningService/GetCertTypes",
        iam::GetCertTypesRequest {
            node_id: "main".into(),
        },
    )
    .await;
    assert!(t.types.contains(&"online".to_string()));
    let k: iam::CreateKeyResponse = raw(
        ch,
        "/iamanager.v6.IAMCertificateService/CreateKey",
        iam::CreateKeyRequest {
            node_id: "main".into(),
            r#type: "online".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(k.csr.contains("CERTIFICATE REQUEST"));
}
