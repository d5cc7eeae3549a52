//! The executor the daemon hands the runner: it carries each batch of actions out through the
//! edge that owns it and records the outcome in the store.
//!
//! - Starts and stops of one node: the placements are committed first (an allocation is durable
//!   before anyone hears of it), then one `UpdateInstances` goes to the node with the starts
//!   and stops of the batch (v5 UpdateInstances is a delta), and the batch succeeds once the
//!   node has reported each of them.
//! - Node configs: CheckNodeConfig, then SetNodeConfig, each answered by NodeConfigStatus.
//! - Allocations, item states and the unit config: store writes.
//! - Downloads and node pause/resume need the image store and the IAM client; until those are
//!   wired, such actions fail with a message that says so (and stay visible as conditions).

use crate::api::proto::common::v2 as pbc;
use crate::api::sm::SmController;
use crate::api::sm::convert::{self, InstancePaths};
use crate::engine::Clock;
use crate::imagestore::fetch::Fetcher;
use crate::model::*;
use crate::reconcilers::runner::{ExecFuture, Executor};
use crate::store::Store;
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct UnitExecutor {
    store: Arc<Store>,
    sm: SmController,
    clock: Clock,
    placements: PlacementCommitter,
    fetcher: Option<Arc<Fetcher>>,
}

impl UnitExecutor {
    /// Needs a tokio runtime: it starts the placement committer.
    pub fn new(store: Arc<Store>, sm: SmController, clock: Clock) -> UnitExecutor {
        UnitExecutor {
            placements: PlacementCommitter::start(store.clone()),
            store,
            sm,
            clock,
            fetcher: None,
        }
    }

    /// Blobs are fetched from the cloud with `fetcher` (without one, downloads fail with a
    /// condition that says so).
    pub fn with_fetcher(mut self, fetcher: Fetcher) -> UnitExecutor {
        self.fetcher = Some(Arc::new(fetcher));
        self
    }
}

impl Executor<Action> for UnitExecutor {
    fn execute(&self, batch: Vec<Action>) -> ExecFuture {
        let store = self.store.clone();
        let sm = self.sm.clone();
        let committer = self.placements.clone();
        let fetcher = self.fetcher.clone();
        let now = (self.clock)();
        Box::pin(
            async move { run_batch(&store, &sm, &committer, fetcher.as_deref(), batch, now).await },
        )
    }
}

type CommitRequest = (
    Vec<InstancePlacement>,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Group commit of placements: node batches run concurrently and each must have its
/// placements durable before the node hears of them; one task takes every request waiting and
/// commits them in one transaction (one fsync) instead of one each.
#[derive(Clone)]
struct PlacementCommitter {
    tx: tokio::sync::mpsc::UnboundedSender<CommitRequest>,
}

impl PlacementCommitter {
    fn start(store: Arc<Store>) -> PlacementCommitter {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<CommitRequest>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while let Ok(more) = rx.try_recv() {
                    group.push(more);
                }
                // Plans made before an earlier batch was committed may hand the same UID to
                // two instances: a batch whose UID is held by another instance is refused (its
                // key is planned again from the committed state); the others go in.
                let mut refused: Vec<Option<String>> = vec![None; group.len()];
                let result = store
                    .write(|tx| {
                        let mut held: BTreeMap<u32, InstanceIdent> = tx
                            .placements()?
                            .into_values()
                            .filter(|p| p.uid != 0)
                            .map(|p| (p.uid, p.ident))
                            .collect();
                        for (i, (placements, _)) in group.iter().enumerate() {
                            let clash = placements.iter().find_map(|p| {
                                held.get(&p.uid)
                                    .filter(|other| p.uid != 0 && **other != p.ident)
                                    .map(|other| {
                                        format!(
                                            "UID {} for {} is held by {other}; planning again",
                                            p.uid, p.ident
                                        )
                                    })
                            });
                            if clash.is_some() {
                                refused[i] = clash;
                                continue;
                            }
                            for p in placements {
                                if p.gid != 0 && tx.gid(&p.ident.item_id)?.is_none() {
                                    tx.set_gid(&p.ident.item_id, p.gid)?;
                                }
                                held.retain(|_, ident| *ident != p.ident);
                                if p.uid != 0 {
                                    held.insert(p.uid, p.ident.clone());
                                }
                                tx.put_placement(p)?;
                            }
                        }
                        Ok(())
                    })
                    .map_err(|e| e.to_string());
                for ((_, done), refusal) in group.into_iter().zip(refused) {
                    let outcome = match refusal {
                        Some(reason) => Err(reason),
                        None => result.clone(),
                    };
                    let _ = done.send(outcome);
                }
            }
        });
        PlacementCommitter { tx }
    }

    async fn commit(&self, placements: Vec<InstancePlacement>) -> Result<(), String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send((placements, done))
            .map_err(|_| "the placement committer has stopped".to_string())?;
        wait.await
            .map_err(|_| "the placement committer has stopped".to_string())?
    }
}

/// Fetches one blob; for an item's index the whole image's documents too, and records the
/// parsed image in the catalogue.
async fn download_blob(store: &Arc<Store>, f: &Fetcher, digest: &Digest) -> Result<(), String> {
    let snap = store.shared_snapshot().map_err(|e| e.to_string())?;
    let (certs, chains) = snap
        .desired
        .as_ref()
        .map(|d| (d.certificates.clone(), d.certificate_chains.clone()))
        .unwrap_or_default();
    let is_index = snap.desired.as_ref().is_some_and(|d| {
        d.items
            .iter()
            .any(|i| i.index_digest.as_ref() == Some(digest))
    }) && !snap.catalogue.images.contains_key(digest);
    if is_index {
        let (image, fetched) = f.fetch_image(digest, &certs, &chains).await?;
        store
            .write(|tx| {
                tx.add_blob(digest)?;
                for d in &fetched {
                    tx.add_blob(d)?;
                }
                tx.put_catalogue_image(&image)
            })
            .map_err(|e| e.to_string())?;
    } else {
        f.fetch_blob(digest, &certs, &chains).await?;
        store
            .write(|tx| tx.add_blob(digest))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn run_batch(
    store: &Arc<Store>,
    sm: &SmController,
    committer: &PlacementCommitter,
    fetcher: Option<&Fetcher>,
    batch: Vec<Action>,
    now: UnixMillis,
) -> Result<(), String> {
    let Some(first) = batch.first() else {
        return Ok(());
    };
    match first {
        Action::StartInstance(_) | Action::StopInstance { .. } => {
            update_node(store, sm, committer, &batch).await
        }
        Action::PushNodeConfig { .. } => {
            for a in &batch {
                if let Action::PushNodeConfig { node_id, .. } = a {
                    push_node_config(store, sm, node_id).await?;
                }
            }
            Ok(())
        }
        Action::DownloadBlob { digest, .. } => match fetcher {
            Some(f) => {
                for a in &batch {
                    if let Action::DownloadBlob { digest, .. } = a {
                        download_blob(store, f, digest).await?;
                    }
                }
                Ok(())
            }
            None => Err(format!(
                "cannot download {digest}: no cloud link to fetch blobs from"
            )),
        },
        Action::DeleteBlob { .. } if fetcher.is_some() => {
            if let Some(f) = fetcher {
                for a in &batch {
                    if let Action::DeleteBlob { digest } = a {
                        f.delete(digest).await?;
                    }
                }
            }
            store
                .write(|tx| tx.apply_batch(&batch, now))
                .map_err(|e| e.to_string())
        }
        Action::SetNodeState { node_id, state } => Err(format!(
            "cannot {} node {node_id}: no IAM client is configured",
            match state {
                DesiredNodeState::Paused => "pause",
                DesiredNodeState::Provisioned => "resume",
            }
        )),
        _ => store
            .write(|tx| tx.apply_batch(&batch, now))
            .map_err(|e| e.to_string()),
    }
}

async fn update_node(
    store: &Arc<Store>,
    sm: &SmController,
    committer: &PlacementCommitter,
    batch: &[Action],
) -> Result<(), String> {
    let mut node = String::new();
    let mut stops: Vec<pbc::InstanceIdent> = Vec::new();
    let mut expect: Vec<(InstanceIdent, String)> = Vec::new();
    let mut starts: Vec<&InstanceStart> = Vec::new();
    for a in batch {
        match a {
            Action::StartInstance(s) => {
                node = s.placement.node_id.clone();
                expect.push((s.placement.ident.clone(), s.placement.version.clone()));
                starts.push(s);
            }
            Action::StopInstance { ident, node_id, .. } => {
                node = node_id.clone();
                let desired = store.read(|r| r.desired()).map_err(|e| e.to_string())?;
                let item_type = desired
                    .as_ref()
                    .and_then(|d| d.item(&ident.item_id))
                    .map(|i| i.item_type)
                    .unwrap_or(ItemType::Service);
                stops.push(convert::ident_to_pb(ident, item_type, false));
            }
            _ => {}
        }
    }
    // Allocations first, durably: the placement and the item's GID are recorded before the
    // node hears of them.
    if !starts.is_empty() {
        committer
            .commit(starts.iter().map(|s| s.placement.clone()).collect())
            .await?;
    }

    let cfg = sm.config();
    let paths = InstancePaths {
        storage_dir: &cfg.storage_dir,
        state_dir: &cfg.state_dir,
    };
    let infos: Vec<_> = starts
        .iter()
        .map(|s| convert::instance_info(s, &paths))
        .collect();
    sm.update_instances(&node, infos, stops, &expect)
        .await
        .map_err(|e| e.to_string())
}

async fn push_node_config(
    store: &Arc<Store>,
    sm: &SmController,
    node_id: &str,
) -> Result<(), String> {
    let (status, node) = store
        .read(|r| Ok((r.unit_config_status()?, r.node(node_id)?)))
        .map_err(|e| e.to_string())?;
    let (Some(uc), Some(node)) = (status.config, node) else {
        return Err(format!("no installed unit config or no node {node_id}"));
    };
    let cfg = uc.node_config(node_id, &node.info.node_type);
    let json = convert::node_config_json(&cfg);
    let version = uc.version.to_string();
    let check = sm
        .check_node_config(node_id, &json, &version)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(err) = convert::error_from_pb(check.error.as_ref()) {
        return Err(format!(
            "node {node_id} rejected node config {version}: {err}"
        ));
    }
    let set = sm
        .set_node_config(node_id, &json, &version)
        .await
        .map_err(|e| e.to_string())?;
    match convert::error_from_pb(set.error.as_ref()) {
        Some(err) => Err(format!(
            "node {node_id} failed to apply node config {version}: {err}"
        )),
        None => Ok(()),
    }
}
