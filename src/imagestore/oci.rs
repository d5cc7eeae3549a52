//! Parsing of OCI index, manifest, image config and Aos item config documents (reference
//! oci-items.md sections 3-4): keys case-insensitive, unknown keys ignored, absent scalars
//! defaulted, capacity overruns rejected.

use crate::api::cloud::unitconfig::alert_rules;
use crate::api::json::{self, Problems};
use crate::model::*;
use serde_json::Value;

pub const MAX_MANIFESTS: usize = 8;
pub const MAX_LAYERS: usize = 16;
pub const MAX_RUNTIMES: usize = 4;
pub const MAX_RESOURCES: usize = 4;
pub const MAX_ALLOWED_CONNECTIONS: usize = 16;

/// Where the blobs of an image come from: a content-addressed folder, or the store.
pub trait BlobSource {
    /// The bytes of a blob, or `None` when it is not there.
    fn read(&self, digest: &Digest) -> Option<Vec<u8>>;
}

fn digest_at(v: &Value, path: &str, key: &str, probs: &mut Problems) -> Option<Digest> {
    let o = json::obj(v, path, probs)?;
    let s = o.string(key, probs)?;
    Digest::parse(&s)
        .map_err(|e| probs.push(&o.path_of(key), e))
        .ok()
}

fn document(src: &dyn BlobSource, digest: &Digest, probs: &mut Problems) -> Option<Value> {
    let Some(bytes) = src.read(digest) else {
        probs.push(digest.as_str(), "blob is missing");
        return None;
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            probs.push(digest.as_str(), format!("not a JSON document: {e}"));
            None
        }
    }
}

/// Reads an item image starting at its index digest.
pub fn load_image(src: &dyn BlobSource, index: &Digest) -> Result<ItemImage, Problems> {
    let mut probs = Problems::default();
    let image = load(src, index, &mut probs);
    match image {
        Some(i) if probs.is_empty() => Ok(i),
        _ => Err(probs),
    }
}

fn load(src: &dyn BlobSource, index: &Digest, probs: &mut Problems) -> Option<ItemImage> {
    let iv = document(src, index, probs)?;
    let io = json::obj(&iv, index.as_str(), probs)?;
    let descs = io.array("manifests", probs);
    if descs.len() > MAX_MANIFESTS {
        probs.push(
            &io.path_of("manifests"),
            format!("{} manifests, at most {MAX_MANIFESTS} allowed", descs.len()),
        );
        return None;
    }
    let mut manifests = Vec::new();
    for (p, dv) in descs {
        let Some(md) = digest_at(dv, &p, "digest", probs) else {
            continue;
        };
        if let Some(m) = manifest(src, &md, probs) {
            manifests.push(m);
        }
    }
    Some(ItemImage {
        index_digest: index.clone(),
        manifests,
    })
}

fn manifest(src: &dyn BlobSource, digest: &Digest, probs: &mut Problems) -> Option<ManifestInfo> {
    let mv = document(src, digest, probs)?;
    let mo = json::obj(&mv, digest.as_str(), probs)?;
    let (cp, cv) = mo.object("config", probs)?;
    let config_digest = digest_at(cv, &cp, "digest", probs)?;
    let item_config_digest = match mo.object("aosItemConfig", probs) {
        Some((p, v)) => Some(digest_at(v, &p, "digest", probs)?),
        None => None,
    };
    let layer_descs = mo.array("layers", probs);
    if layer_descs.len() > MAX_LAYERS {
        probs.push(
            &mo.path_of("layers"),
            format!("{} layers, at most {MAX_LAYERS} allowed", layer_descs.len()),
        );
    }
    let layers: Vec<Digest> = layer_descs
        .into_iter()
        .filter_map(|(p, v)| digest_at(v, &p, "digest", probs))
        .collect();
    let image = image_config(
        &document(src, &config_digest, probs)?,
        config_digest.as_str(),
        probs,
    );
    let item_config = match &item_config_digest {
        Some(d) => Some(item_config(&document(src, d, probs)?, d.as_str(), probs)?),
        None => None,
    };
    Some(ManifestInfo {
        digest: digest.clone(),
        config_digest,
        item_config_digest,
        layers,
        image: image?,
        item_config,
    })
}

/// The parts of an OCI image config placement needs.
pub fn image_config(v: &Value, path: &str, probs: &mut Problems) -> Option<ImageConfig> {
    let o = json::obj(v, path, probs)?;
    let mut exposed_ports: Vec<String> = match o.object("config", probs) {
        Some((p, cv)) => {
            match json::obj(cv, &p, probs).and_then(|c| c.object("ExposedPorts", probs)) {
                Some((pp, pv)) => json::obj(pv, &pp, probs)
                    .map(|ports| ports.entries().map(|(k, _)| k.clone()).collect())
                    .unwrap_or_default(),
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    exposed_ports.sort();
    Some(ImageConfig {
        architecture: o.string("architecture", probs).unwrap_or_default(),
        variant: o.string("variant", probs).filter(|s| !s.is_empty()),
        os: o.string("os", probs).unwrap_or_default(),
        os_version: o.string("os.version", probs).filter(|s| !s.is_empty()),
        os_features: o.strings("os.features", probs),
        exposed_ports,
    })
}

/// The Aos item config keys the CM reads.
pub fn item_config(v: &Value, path: &str, probs: &mut Problems) -> Option<ItemConfig> {
    let before = probs.0.len();
    let o = json::obj(v, path, probs)?;
    let balancing_policy = match o.get("balancingPolicy") {
        None => BalancingPolicy::Enabled,
        Some(_) => o
            .enumeration(
                "balancingPolicy",
                BalancingPolicy::parse,
                BalancingPolicy::ALL,
                probs,
            )
            .unwrap_or(BalancingPolicy::Enabled),
    };
    let mut runtimes = Vec::new();
    let rts = o.array("runtimes", probs);
    if rts.len() > MAX_RUNTIMES {
        probs.push(
            &o.path_of("runtimes"),
            format!("{} runtimes, at most {MAX_RUNTIMES} allowed", rts.len()),
        );
    }
    for (p, rv) in rts {
        if let Some(r) = json::obj(rv, &p, probs)
            && let Some(c) = r.id("codename", 64, probs)
        {
            runtimes.push(c);
        }
    }
    let mut quotas = Quotas::default();
    if let Some((p, qv)) = o.object("quotas", probs)
        && let Some(q) = json::obj(qv, &p, probs)
    {
        quotas.cpu_dmips_limit = q.u64("cpuDMIPSLimit", probs);
        quotas.ram_limit = q.u64("ramLimit", probs);
        quotas.state_limit = q.u64("stateLimit", probs);
        quotas.storage_limit = q.u64("storageLimit", probs);
    }
    let mut requested = RequestedResources::default();
    if let Some((p, rv)) = o.object("requestedResources", probs)
        && let Some(r) = json::obj(rv, &p, probs)
    {
        requested.cpu = r.u64("cpu", probs);
        requested.ram = r.u64("ram", probs);
        requested.storage = r.u64("storage", probs);
        requested.state = r.u64("state", probs);
    }
    let mut allowed_connections: Vec<String> = match o.object("allowedConnections", probs) {
        Some((p, av)) => json::obj(av, &p, probs)
            .map(|a| a.entries().map(|(k, _)| k.clone()).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    if allowed_connections.len() > MAX_ALLOWED_CONNECTIONS {
        probs.push(
            &o.path_of("allowedConnections"),
            format!(
                "{} connections, at most {MAX_ALLOWED_CONNECTIONS} allowed",
                allowed_connections.len()
            ),
        );
    }
    allowed_connections.sort();
    let mut resources = Vec::new();
    let res = o.array("resources", probs);
    if res.len() > MAX_RESOURCES {
        probs.push(
            &o.path_of("resources"),
            format!("{} resources, at most {MAX_RESOURCES} allowed", res.len()),
        );
    }
    for (p, rv) in res {
        if let Some(r) = json::obj(rv, &p, probs)
            && let Some(n) = r.id("name", 64, probs)
        {
            resources.push(n);
        }
    }
    if let Some(pv) = o.get("permissions")
        && !pv.is_object()
    {
        probs.push(&o.path_of("permissions"), "expected an object");
    }
    let alert_rules = o
        .object("alertRules", probs)
        .and_then(|(p, av)| alert_rules(av, &p, probs));
    let hostname = o.string("hostname", probs).filter(|h| !h.is_empty());
    let skip_resource_limits = o.bool("skipResourceLimits", probs).unwrap_or(false);
    (probs.0.len() == before).then_some(ItemConfig {
        hostname,
        balancing_policy,
        skip_resource_limits,
        runtimes,
        quotas,
        requested,
        allowed_connections,
        resources,
        alert_rules,
    })
}
