//! Scenario folders: a desired state and an observed unit in upstream formats, assembled into
//! a `Snapshot` for `aos-cm plan` and the snapshot tests.
//!
//! Layout: `desired.json` (a v7 `desiredStatus` frame), `nodes.json` (per node the IAM
//! `nodeInfo` and SM `smInfo` in proto3 JSON), optional `unitconfig.json` (the unit config
//! installed now), optional `blobs/sha256/<hex>` (the item blobs; the plan shows what the
//! daemon does once they are downloaded), and optional `observed.json` for the rest of the
//! observed state (see `examples/desired-states/README.md` for its keys).

use crate::api::cloud::{desired, unitconfig};
use crate::api::json::{self, Problems};
use crate::api::nodes;
use crate::imagestore::oci::{self, BlobSource};
use crate::model::*;
use crate::reconcilers::placement;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{0}: missing (a scenario needs desired.json and nodes.json)")]
    Missing(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{file}:\n{problems}")]
    Invalid { file: PathBuf, problems: Problems },
}

/// A loaded scenario: the snapshot to plan and the time to plan at.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub snapshot: Snapshot,
    pub now: UnixMillis,
}

/// Blobs in a content-addressed folder `<dir>/sha256/<hex>`.
pub struct BlobDir(pub PathBuf);

impl BlobSource for BlobDir {
    fn read(&self, digest: &Digest) -> Option<Vec<u8>> {
        fs::read(self.0.join("sha256").join(digest.hex())).ok()
    }
}

impl BlobDir {
    pub fn digests(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = fs::read_dir(self.0.join("sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                Digest::parse(&format!("sha256:{name}")).ok()
            })
            .collect();
        out.sort();
        out
    }
}

fn read(path: &Path, required: bool) -> Result<Option<String>, ScenarioError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if required {
                Err(ScenarioError::Missing(path.to_path_buf()))
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(ScenarioError::Io(path.to_path_buf(), e)),
    }
}

fn invalid(file: &Path, problems: Problems) -> ScenarioError {
    ScenarioError::Invalid {
        file: file.to_path_buf(),
        problems,
    }
}

/// Parses an RFC 3339 UTC timestamp (`2026-09-01T08:30:00Z`, fractions allowed) to ms.
pub fn parse_rfc3339_ms(s: &str) -> Option<UnixMillis> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let ms: i64 = format!("{:0<3}", &frac.get(..frac.len().min(3))?)
        .parse()
        .ok()?;
    // Days from civil date (proleptic Gregorian).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

/// Reads a `nodes.json` file (per node the IAM `nodeInfo`, optionally the SM's `smInfo`) into
/// observed nodes, all marked connected.
pub fn load_nodes(path: &Path) -> Result<BTreeMap<NodeId, ObservedNode>, ScenarioError> {
    let text = read(path, true)?.unwrap_or_default();
    nodes_from_text(&text, path)
}

fn nodes_from_text(
    nodes_text: &str,
    nodes_path: &Path,
) -> Result<BTreeMap<NodeId, ObservedNode>, ScenarioError> {
    let mut nodes = BTreeMap::new();
    let nv = json::parse(nodes_text).map_err(|p| invalid(nodes_path, p))?;
    let mut probs = Problems::default();
    if let Some(root) = json::obj(&nv, "$", &mut probs) {
        for (p, entry) in root.array("nodes", &mut probs) {
            let Some(e) = json::obj(entry, &p, &mut probs) else {
                continue;
            };
            let info = e
                .object("nodeInfo", &mut probs)
                .and_then(|(ip, iv)| nodes::node_info(iv, &ip, &mut probs));
            let sm = e
                .object("smInfo", &mut probs)
                .and_then(|(sp, sv)| nodes::sm_info(sv, &sp, &mut probs));
            let Some(info) = info else {
                if !e.has("nodeInfo") {
                    probs.push(&e.path_of("nodeInfo"), "is required");
                }
                continue;
            };
            if let Some((sm_node, _)) = &sm
                && *sm_node != info.node_id
            {
                probs.push(
                    &e.path_of("smInfo.nodeId"),
                    format!(
                        "{sm_node:?} differs from nodeInfo.nodeId {:?}",
                        info.node_id
                    ),
                );
            }
            nodes.insert(
                info.node_id.clone(),
                ObservedNode {
                    sm: sm.map(|(_, s)| s),
                    info,
                    node_config: None,
                    connection: Connection::Connected,
                    usage: None,
                },
            );
        }
    }
    if !probs.is_empty() {
        return Err(invalid(nodes_path, probs));
    }

    Ok(nodes)
}

/// Loads a scenario folder.
pub fn load(dir: &Path) -> Result<Scenario, ScenarioError> {
    if !dir.is_dir() {
        return Err(ScenarioError::Missing(dir.to_path_buf()));
    }
    let desired_path = dir.join("desired.json");
    let nodes_path = dir.join("nodes.json");
    let desired_text = read(&desired_path, true)?.unwrap_or_default();
    let nodes_text = read(&nodes_path, true)?.unwrap_or_default();
    let (header, desired) =
        desired::parse_frame(&desired_text).map_err(|p| invalid(&desired_path, p))?;

    let mut snap = Snapshot {
        desired: Some(desired),
        ..Snapshot::default()
    };

    snap.observed.nodes = nodes_from_text(&nodes_text, &nodes_path)?;

    // Installed unit config: parse errors make it `failed`, as upstream.
    let uc_path = dir.join("unitconfig.json");
    if let Some(text) = read(&uc_path, false)? {
        snap.observed.unit_config = match unitconfig::parse(&text) {
            Ok(uc) => UnitConfigStatus {
                state: UnitConfigState::Installed,
                version: Some(uc.version.clone()),
                error: None,
                config: Some(uc),
            },
            Err(p) => UnitConfigStatus {
                state: UnitConfigState::Failed,
                version: None,
                error: Some(p.to_string()),
                config: None,
            },
        };
    }

    // Default time: one hour after the desired status was created.
    let mut now = header
        .created_at
        .as_deref()
        .and_then(parse_rfc3339_ms)
        .map(|t| t + 3_600_000)
        .unwrap_or(0);

    let blobs = BlobDir(dir.join("blobs"));
    let obs_path = dir.join("observed.json");
    if let Some(text) = read(&obs_path, false)? {
        let v = json::parse(&text).map_err(|p| invalid(&obs_path, p))?;
        let mut probs = Problems::default();
        apply_observed(&v, &mut snap, &blobs, &mut now, &mut probs);
        if !probs.is_empty() {
            return Err(invalid(&obs_path, probs));
        }
    }

    // Catalogue: every image the blobs folder holds for a desired or stored item.
    let mut indexes: Vec<Digest> = snap
        .desired
        .iter()
        .flat_map(|d| d.items.iter().filter_map(|i| i.index_digest.clone()))
        .collect();
    indexes.extend(snap.observed.items.values().map(|i| i.index_digest.clone()));
    indexes.sort();
    indexes.dedup();
    let mut probs = Problems::default();
    for index in indexes {
        if blobs.read(&index).is_none() {
            continue;
        }
        match oci::load_image(&blobs, &index) {
            Ok(image) => {
                snap.catalogue.images.insert(index, image);
            }
            Err(p) => probs.0.extend(p.0),
        }
    }
    if !probs.is_empty() {
        return Err(invalid(&dir.join("blobs"), probs));
    }
    fill_reservations(&mut snap);
    Ok(Scenario {
        snapshot: snap,
        now,
    })
}

/// Placements given in observed.json carry no reservation: compute it as placement would.
fn fill_reservations(snap: &mut Snapshot) {
    let Some(desired) = snap.desired.clone() else {
        return;
    };
    for p in snap.allocations.instances.values_mut() {
        let Some(item) = desired.item(&p.ident.item_id) else {
            continue;
        };
        let cfg = item
            .index_digest
            .as_ref()
            .and_then(|d| snap.catalogue.images.get(d))
            .and_then(|img| img.manifests.iter().find(|m| m.digest == p.manifest_digest))
            .and_then(|m| m.item_config.clone())
            .unwrap_or_default();
        let ratios = match (
            &snap.observed.unit_config.config,
            snap.observed.nodes.get(&p.node_id),
        ) {
            (Some(uc), Some(n)) => {
                uc.node_config(&p.node_id, &n.info.node_type)
                    .resource_ratios
            }
            _ => ResourceRatios::default(),
        };
        p.requested = placement::reservation(item.item_type, &cfg, &ratios);
    }
}

fn runtime_id(snap: &Snapshot, node: &str, rt: &str) -> Option<(String, String)> {
    let sm = snap.observed.nodes.get(node)?.sm.as_ref()?;
    sm.runtimes
        .iter()
        .find(|r| r.runtime_type == rt || r.runtime_id == rt)
        .map(|r| (r.runtime_id.clone(), r.runtime_type.clone()))
}

fn ident_of(o: &json::Obj<'_>, probs: &mut Problems) -> Option<InstanceIdent> {
    Some(InstanceIdent {
        item_id: o.id("item", 64, probs)?,
        subject_id: o.id("subject", 64, probs)?,
        instance: o.u64("instance", probs).unwrap_or(0),
    })
}

fn apply_observed(
    v: &Value,
    snap: &mut Snapshot,
    blobs: &BlobDir,
    now: &mut UnixMillis,
    probs: &mut Problems,
) {
    let Some(o) = json::obj(v, "$", probs) else {
        return;
    };
    if let Some(t) = o.string("now", probs) {
        match parse_rfc3339_ms(&t) {
            Some(ms) => *now = ms,
            None => probs.push(
                "now",
                "expected an RFC 3339 UTC time like 2026-09-01T09:00:00Z",
            ),
        }
    }
    snap.observed.unit_subjects = o.strings("unitSubjects", probs).into_iter().collect();
    for (p, r) in o.array("hostRoutes", probs) {
        match r.as_str().map(Ipv4Net::parse) {
            Some(Ok(net)) => snap.observed.host_routes.push(net),
            Some(Err(e)) => probs.push(&p, e),
            None => probs.push(&p, "expected a CIDR string"),
        }
    }
    if let Some(ttl) = o.string("updateItemTtl", probs) {
        match crate::config::parse_duration(&ttl) {
            Ok(d) => {
                snap.settings.update_item_ttl_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            }
            Err(e) => probs.push("updateItemTtl", e),
        }
    }
    match o.get("installedBlobs") {
        Some(Value::String(s)) if s == "all" => {
            snap.observed.blobs.extend(blobs.digests());
        }
        Some(_) => {
            for (p, d) in o.array("installedBlobs", probs) {
                match d.as_str().map(Digest::parse) {
                    Some(Ok(d)) => {
                        snap.observed.blobs.insert(d);
                    }
                    Some(Err(e)) => probs.push(&p, e),
                    None => probs.push(&p, "expected a digest string"),
                }
            }
        }
        None => {}
    }

    // Per-node overrides: connection, IAM state, node config status, usage.
    if let Some((p, nv)) = o.object("nodes", probs)
        && let Some(nodes) = json::obj(nv, &p, probs)
    {
        let entries: Vec<(String, Value)> = nodes
            .entries()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (node_id, ov) in entries {
            let path = format!("nodes.{node_id}");
            let Some(no) = json::obj(&ov, &path, probs) else {
                continue;
            };
            let Some(node) = snap.observed.nodes.get_mut(&node_id) else {
                probs.push(&path, "no such node in nodes.json");
                continue;
            };
            let since = no.u64("sinceMs", probs).unwrap_or(0) as i64;
            match no.string("connection", probs).as_deref() {
                None | Some("connected") => {}
                Some("disconnected") => node.connection = Connection::Disconnected { since },
                Some("lost") => node.connection = Connection::Lost { since },
                Some(other) => probs.push(
                    &no.path_of("connection"),
                    format!("unknown value {other:?}, expected connected, disconnected or lost"),
                ),
            }
            if no.has("state")
                && let Some(s) = no.enumeration("state", NodeState::parse, NodeState::ALL, probs)
            {
                node.info.state = s;
            }
            if let Some(version) = no.string("nodeConfigVersion", probs) {
                node.node_config = Some(NodeConfigStatus {
                    version,
                    error: no.string("nodeConfigError", probs),
                });
            }
        }
    }

    for (p, iv) in o.array("items", probs) {
        let Some(io) = json::obj(iv, &p, probs) else {
            continue;
        };
        let (Some(id), Some(item_type), Some(version), Some(index)) = (
            io.id("id", 64, probs),
            io.enumeration("type", ItemType::parse, ItemType::ALL, probs),
            io.id("version", 32, probs),
            io.string("indexDigest", probs),
        ) else {
            probs.push(&p, "an item needs id, type, version and indexDigest");
            continue;
        };
        let index_digest = match Digest::parse(&index) {
            Ok(d) => d,
            Err(e) => {
                probs.push(&io.path_of("indexDigest"), e);
                continue;
            }
        };
        let state = match io.get("state") {
            None => ItemState::Installed,
            Some(_) => io
                .enumeration("state", ItemState::parse, ItemState::ALL, probs)
                .unwrap_or(ItemState::Installed),
        };
        let removed_at = io.string("removedAt", probs).and_then(|t| {
            let ms = parse_rfc3339_ms(&t);
            if ms.is_none() {
                probs.push(&io.path_of("removedAt"), "expected an RFC 3339 UTC time");
            }
            ms
        });
        snap.observed.items.insert(
            (id.clone(), version.clone()),
            StoredItem {
                id,
                item_type,
                version,
                index_digest,
                state,
                removed_at,
            },
        );
    }

    for (p, iv) in o.array("instances", probs) {
        let Some(io) = json::obj(iv, &p, probs) else {
            continue;
        };
        let Some(ident) = ident_of(&io, probs) else {
            continue;
        };
        let Some(node) = io.id("node", 64, probs) else {
            continue;
        };
        let rt = io.id("runtime", 64, probs).unwrap_or_default();
        let Some((runtime_id, _)) = runtime_id(snap, &node, &rt) else {
            probs.push(
                &io.path_of("runtime"),
                format!("node {node} has no runtime {rt:?}"),
            );
            continue;
        };
        let state = io
            .enumeration("state", InstanceState::parse, InstanceState::ALL, probs)
            .unwrap_or(InstanceState::Active);
        snap.observed.instances.insert(
            ident.clone(),
            ReportedInstance {
                ident,
                node_id: node,
                runtime_id,
                version: io.string("version", probs).unwrap_or_default(),
                state,
                error: io.string("error", probs),
                preinstalled: io.bool("preinstalled", probs).unwrap_or(false),
            },
        );
    }

    for (p, pv) in o.array("placements", probs) {
        let Some(po) = json::obj(pv, &p, probs) else {
            continue;
        };
        let Some(ident) = ident_of(&po, probs) else {
            continue;
        };
        let (Some(node), Some(rt), Some(version)) = (
            po.id("node", 64, probs),
            po.id("runtime", 64, probs),
            po.id("version", 32, probs),
        ) else {
            continue;
        };
        let Some((runtime_id, runtime_type)) = runtime_id(snap, &node, &rt) else {
            probs.push(
                &po.path_of("runtime"),
                format!("node {node} has no runtime {rt:?}"),
            );
            continue;
        };
        let Some(manifest) = po
            .string("manifest", probs)
            .and_then(|m| Digest::parse(&m).ok())
        else {
            probs.push(&po.path_of("manifest"), "is required (sha256:<hex>)");
            continue;
        };
        let uid = po.u64("uid", probs).unwrap_or(0) as u32;
        let gid = po.u64("gid", probs).unwrap_or(0) as u32;
        if gid != 0 {
            snap.allocations.gids.insert(ident.item_id.clone(), gid);
        }
        snap.allocations.instances.insert(
            ident.clone(),
            InstancePlacement {
                ident,
                node_id: node,
                runtime_id,
                runtime_type,
                manifest_digest: manifest,
                version,
                uid,
                gid,
                requested: Reservation::default(),
                env: Vec::new(),
            },
        );
    }

    for (p, nv) in o.array("networks", probs) {
        let Some(no) = json::obj(nv, &p, probs) else {
            continue;
        };
        let (Some(id), Some(subnet), Some(vlan)) = (
            no.id("id", 64, probs),
            no.string("subnet", probs),
            no.u64("vlan", probs),
        ) else {
            probs.push(&p, "a network needs id, subnet and vlan");
            continue;
        };
        let subnet = match Ipv4Net::parse(&subnet) {
            Ok(s) => s,
            Err(e) => {
                probs.push(&no.path_of("subnet"), e);
                continue;
            }
        };
        let mut hosts = BTreeMap::new();
        if let Some((hp, hv)) = no.object("hosts", probs)
            && let Some(ho) = json::obj(hv, &hp, probs)
        {
            for (node, ip) in ho.entries() {
                match ip.as_str().and_then(|s| s.parse().ok()) {
                    Some(ip) => {
                        hosts.insert(node.clone(), ip);
                    }
                    None => probs.push(&format!("{hp}.{node}"), "expected an IPv4 address"),
                }
            }
        }
        snap.allocations.networks.insert(
            id,
            NetworkAllocation {
                subnet,
                vlan_id: u16::try_from(vlan).unwrap_or(0),
                hosts,
                sm_hosts: Default::default(),
            },
        );
    }

    for (p, av) in o.array("instanceIps", probs) {
        let Some(ao) = json::obj(av, &p, probs) else {
            continue;
        };
        let Some(ident) = ident_of(&ao, probs) else {
            continue;
        };
        let (Some(network_id), Some(node_id), Some(ip)) = (
            ao.id("network", 64, probs),
            ao.id("node", 64, probs),
            ao.string("ip", probs).and_then(|s| s.parse().ok()),
        ) else {
            probs.push(&p, "an instance address needs network, node and ip");
            continue;
        };
        snap.allocations.instance_ips.insert(
            ident,
            InstanceAddress {
                network_id,
                node_id,
                ip,
            },
        );
    }
}
