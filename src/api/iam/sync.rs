//! Keeps the store equal to what IAM says about the unit: every node's IAM info and the unit
//! subjects.
//!
//! Subscriptions are opened first and the full state is read after each (re)opening, so that no
//! change falls between the read and the subscription. One write transaction per event.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::api::cloud::certs::IamError;
use crate::model::{Connection, NodeInfo, ObservedNode, UnixMillis};
use crate::store::{Store, StoreError};

use super::client::{IamClient, WatchEvent};

/// Writes a node's IAM info. An SM-reported part of a known node (SM info, node config,
/// connection, usage) is kept; a node the store does not know yet is written as disconnected
/// until its SM registers.
pub fn write_node(store: &Store, info: NodeInfo, now_ms: UnixMillis) -> Result<(), StoreError> {
    store.write(|tx| {
        let node = match tx.node(&info.node_id)? {
            Some(mut n) => {
                n.info = info;
                n
            }
            None => ObservedNode {
                info,
                sm: None,
                node_config: None,
                connection: Connection::Disconnected { since: now_ms },
                usage: None,
            },
        };
        tx.put_node(&node)
    })
}

/// Writes the unit subjects (the whole set).
pub fn write_subjects(store: &Store, subjects: Vec<String>) -> Result<(), StoreError> {
    let set: BTreeSet<String> = subjects.into_iter().collect();
    store.write(|tx| tx.set_unit_subjects(&set))
}

fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as UnixMillis)
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Iam(#[from] IamError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

async fn all_nodes(client: &IamClient, store: &Store) -> Result<usize, SyncError> {
    let ids = client.get_all_node_ids().await?;
    for id in &ids {
        let info = client.get_node_info(id).await?;
        write_node(store, info, now_ms())?;
    }
    Ok(ids.len())
}

async fn subjects(client: &IamClient, store: &Store) -> Result<(), SyncError> {
    write_subjects(store, client.get_subjects().await?)?;
    Ok(())
}

/// Runs until aborted: node infos (`GetAllNodeIDs` + `GetNodeInfo`, then `SubscribeNodeChanged`)
/// and unit subjects (`GetSubjects`, then `SubscribeSubjectsChanged`) into `store`. After IAM
/// goes away the subscriptions are re-opened with backoff and the full state is read again.
///
/// Nodes IAM no longer lists are left in the store (their SM part may still be live).
pub async fn sync_to_store(client: IamClient, store: Arc<Store>) {
    let mut nodes = client.watch_nodes();
    let mut subs = client.watch_subjects();
    loop {
        tokio::select! {
            ev = nodes.recv() => match ev {
                None => return,
                Some(WatchEvent::Opened) => match all_nodes(&client, &store).await {
                    Ok(n) => tracing::info!(nodes = n, "node infos read from IAM"),
                    // The subscription fails as well and is re-opened, which reads again.
                    Err(e) => tracing::warn!(error = %e, "could not read the nodes from IAM"),
                },
                Some(WatchEvent::Changed(info)) => {
                    let node = info.node_id.clone();
                    match write_node(&store, info, now_ms()) {
                        Ok(()) => tracing::info!(node, "node info changed"),
                        Err(e) => tracing::warn!(node, error = %e, "could not store a node info"),
                    }
                }
            },
            ev = subs.recv() => match ev {
                None => return,
                Some(WatchEvent::Opened) => {
                    if let Err(e) = subjects(&client, &store).await {
                        tracing::warn!(error = %e, "could not read the subjects from IAM");
                    }
                }
                Some(WatchEvent::Changed(s)) => {
                    if let Err(e) = write_subjects(&store, s) {
                        tracing::warn!(error = %e, "could not store the unit subjects");
                    }
                }
            },
        }
    }
}
