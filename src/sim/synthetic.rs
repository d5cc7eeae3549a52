//! Synthetic units of any size, for benchmarks and `aos-cm demo --nodes N --instances M`:
//! identical nodes with crun and runc runtimes, service items spread over ten owners, and
//! enough CPU and RAM for every instance.

use crate::model::*;

fn digest(n: u64) -> Digest {
    // 64 hex digits always form a valid digest.
    Digest::parse(&format!("sha256:{n:064x}")).unwrap_or_else(|_| unreachable!())
}

/// The SMInfo a synthetic node reports.
pub fn sm_info(node_id: &str) -> SmInfo {
    SmInfo {
        runtimes: ["crun", "runc"]
            .iter()
            .map(|t| RuntimeInfo {
                runtime_id: format!("{t}-{node_id}"),
                runtime_type: t.to_string(),
                arch_info: ArchInfo {
                    architecture: "amd64".into(),
                    variant: None,
                },
                os_info: OsInfo {
                    os: "linux".into(),
                    ..OsInfo::default()
                },
                ..RuntimeInfo::default()
            })
            .collect(),
        resources: vec![],
    }
}

pub fn node_id(n: usize) -> String {
    format!("node-{n:03}")
}

/// A unit of `nodes` nodes (known to IAM, their SMs not connected) and the desired state
/// that runs `instances` instances of `items` items, with the items' images in the catalogue
/// and every blob present. `with_sm` also fills in the SMs' info, as if connected.
pub fn unit(nodes: usize, items: usize, instances: usize, with_sm: bool) -> Snapshot {
    let mut snap = Snapshot::default();
    // The upstream UID pool [5000, 10000) holds 5,000 instances; larger units need more.
    if instances > 5000 {
        snap.settings.uid_end = UID_FIRST + u32::try_from(instances).unwrap_or(u32::MAX / 2) + 1000;
    }
    let per_node = instances.div_ceil(nodes.max(1)) as u64;
    for n in 0..nodes {
        let id = node_id(n);
        snap.observed.nodes.insert(
            id.clone(),
            ObservedNode {
                sm: with_sm.then(|| sm_info(&id)),
                info: NodeInfo {
                    node_id: id.clone(),
                    node_type: "edge".into(),
                    title: format!("edge node {n}"),
                    max_dmips: 200 * per_node.max(1) + 10_000,
                    total_ram: (32 << 20) * per_node.max(1) + (1 << 30),
                    state: NodeState::Provisioned,
                    ..NodeInfo::default()
                },
                node_config: None,
                connection: if with_sm {
                    Connection::Connected
                } else {
                    Connection::Disconnected { since: 0 }
                },
                usage: None,
            },
        );
    }
    let items = items.max(1);
    let mut desired = DesiredState::default();
    let mut left = instances as u64;
    for i in 0..items as u64 {
        let index = digest(i * 2 + 1);
        let manifest = digest(i * 2 + 2);
        snap.catalogue.images.insert(
            index.clone(),
            ItemImage {
                index_digest: index.clone(),
                manifests: vec![ManifestInfo {
                    digest: manifest.clone(),
                    config_digest: manifest.clone(),
                    item_config_digest: None,
                    layers: vec![],
                    image: ImageConfig {
                        architecture: "amd64".into(),
                        os: "linux".into(),
                        ..ImageConfig::default()
                    },
                    item_config: Some(ItemConfig {
                        requested: RequestedResources {
                            cpu: Some(100),
                            ram: Some(16 << 20),
                            ..Default::default()
                        },
                        ..ItemConfig::default()
                    }),
                }],
            },
        );
        snap.observed.blobs.insert(index.clone());
        snap.observed.blobs.insert(manifest);
        let id = format!("item-{i:03}");
        let count = left.div_ceil(items as u64 - i);
        left -= count;
        desired.items.push(DesiredItem {
            id: id.clone(),
            item_type: ItemType::Service,
            version: "1.0.0".into(),
            owner_id: format!("owner-{}", i % 10),
            index_digest: Some(index),
        });
        desired.instances.push(DesiredInstances {
            item_id: id,
            subject_id: "subject".into(),
            priority: i % 7,
            num_instances: count,
            labels: vec![],
        });
    }
    snap.desired = Some(desired);
    snap
}
