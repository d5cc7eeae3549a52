//! The images reconciler: which blobs to download for the desired items (index first, then
//! manifests, configs, item configs and layers; a blob shared by several items once), which
//! items to mark installed, to remove (kept for `updateItemTtl`) and to delete, and which blobs
//! nothing refers to any more.

use crate::model::*;
use std::collections::{BTreeMap, BTreeSet};

pub fn plan(snap: &Snapshot, now: UnixMillis) -> Plan {
    let mut plan = Plan::new(ReconcilerKind::Images);
    let Some(desired) = snap.desired.as_ref() else {
        return plan;
    };
    let observed = &snap.observed;

    // Downloads, in desired item order, each blob once with every item that needs it.
    let mut downloads: Vec<(Digest, Vec<String>)> = Vec::new();
    let mut complete: Vec<&DesiredItem> = Vec::new();
    for item in &desired.items {
        let Some(index) = &item.index_digest else {
            plan.condition(
                format!("item {}", item.id),
                "NoIndexDigest",
                "the desired status gives no indexDigest: nothing to download",
            );
            continue;
        };
        let blobs = match snap.catalogue.images.get(index) {
            Some(image) => image.blobs(),
            None => vec![index.clone()],
        };
        let missing: Vec<Digest> = blobs
            .into_iter()
            .filter(|d| !observed.blobs.contains(d))
            .collect();
        if missing.is_empty() && snap.catalogue.images.contains_key(index) {
            complete.push(item);
        }
        let name = format!("{} {}", item.id, item.version);
        for d in missing {
            match downloads.iter_mut().find(|(x, _)| *x == d) {
                Some((_, users)) => users.push(name.clone()),
                None => downloads.push((d, vec![name.clone()])),
            }
        }
    }
    for (digest, for_items) in downloads {
        plan.actions
            .push(Action::DownloadBlob { digest, for_items });
    }

    // Installs: complete items not installed yet (a removed one is revived).
    for item in complete {
        let key = (item.id.clone(), item.version.clone());
        let installed = observed
            .items
            .get(&key)
            .is_some_and(|s| s.state == ItemState::Installed);
        if !installed && let Some(index) = &item.index_digest {
            plan.actions.push(Action::InstallItem {
                item_id: item.id.clone(),
                item_type: item.item_type,
                version: item.version.clone(),
                index_digest: index.clone(),
            });
        }
    }

    // Removals: held items that are not desired (by ID and version); removed items past TTL.
    let desired_keys: BTreeSet<(&str, &str)> = desired
        .items
        .iter()
        .map(|i| (i.id.as_str(), i.version.as_str()))
        .collect();
    let ttl = i64::try_from(snap.settings.update_item_ttl_ms).unwrap_or(i64::MAX);
    let mut kept_blobs: BTreeSet<&Digest> = BTreeSet::new();
    let mut deleted: BTreeSet<&Digest> = BTreeSet::new();
    for ((id, version), stored) in &observed.items {
        let is_desired = desired_keys.contains(&(id.as_str(), version.as_str()));
        let expired = stored.state == ItemState::Removed
            && stored
                .removed_at
                .is_some_and(|at| now.saturating_sub(at) >= ttl);
        if is_desired {
            kept_blobs.insert(&stored.index_digest);
        } else if expired {
            plan.actions.push(Action::DeleteItem {
                item_id: id.clone(),
                version: version.clone(),
            });
            deleted.insert(&stored.index_digest);
        } else {
            kept_blobs.insert(&stored.index_digest);
            if stored.state != ItemState::Removed {
                plan.actions.push(Action::RemoveItem {
                    item_id: id.clone(),
                    version: version.clone(),
                });
            }
        }
    }

    // Orphan blobs: present, but no kept or desired item's image refers to them.
    let mut referenced: BTreeSet<Digest> = BTreeSet::new();
    let images: BTreeMap<&Digest, &ItemImage> = snap.catalogue.images.iter().collect();
    let mut roots: Vec<&Digest> = kept_blobs.into_iter().collect();
    roots.extend(desired.items.iter().filter_map(|i| i.index_digest.as_ref()));
    for root in roots {
        match images.get(root) {
            Some(image) => referenced.extend(image.blobs()),
            None => {
                referenced.insert(root.clone());
            }
        }
    }
    // Blobs of an image whose index is missing cannot be attributed: keep them unless the item
    // is being deleted, so that an interrupted download is not thrown away.
    let attributable: BTreeSet<Digest> = images.values().flat_map(|i| i.blobs()).collect();
    for blob in &observed.blobs {
        if referenced.contains(blob) {
            continue;
        }
        let of_deleted = deleted
            .iter()
            .any(|d| images.get(d).is_some_and(|i| i.blobs().contains(blob)));
        if attributable.contains(blob) || of_deleted {
            plan.actions.push(Action::DeleteBlob {
                digest: blob.clone(),
            });
        }
    }
    plan
}
