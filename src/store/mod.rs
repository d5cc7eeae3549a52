//! The store: everything the CM must not forget, in one redb file.
//!
//! Every event from an edge becomes exactly one write transaction ([`Store::write`]), committed
//! durably before its effect is announced (ARCHITECTURE.md, invariant 4); the commit then tells
//! subscribers which tables changed, and the runner wakes the reconcilers that read them.
//! Reconcilers read a [`Snapshot`] taken in one read transaction ([`Store::snapshot`]), so they
//! never see half of an event. The executor records an action's outcome with [`Tx::apply`],
//! which has exactly the stored effect `reconcilers::project::apply` has on a snapshot.
//!
//! Each kind of record has its own table (see [`tables`]) holding serde_json bytes of model
//! values; the layout is versioned and older layouts are migrated at open (see [`migrate`]).
//!
//! This module may import `crate::model` and `crate::reconcilers::project`, nothing from the
//! edges. Its calls block on disk I/O (a commit is an fsync): call them from blocking threads
//! (`spawn_blocking`) rather than directly on the async runtime.

mod keys;
pub mod migrate;
mod read;
pub mod tables;
mod tx;

#[cfg(test)]
mod tests;

pub use migrate::SCHEMA_VERSION;
pub use read::Reader;
pub use tx::Tx;

use crate::model::{Condition, Snapshot};
use read::Source;
use redb::{Database, ReadableDatabase};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A stored record (or its key) does not decode. The rest of the store stays readable.
    #[error("stored record {table}/{key:?} is unreadable: {reason}")]
    BadRecord {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("cannot encode record {table}/{key:?}: {reason}")]
    Encode {
        table: &'static str,
        key: String,
        reason: String,
    },
    /// A snapshot entry whose map key is not the identity inside its record.
    #[error("refusing to store {table}/{key:?}: the record itself is for {identity:?}")]
    Mismatch {
        table: &'static str,
        key: String,
        identity: String,
    },
    #[error("the store has no table {0:?}")]
    UnknownTable(String),
    #[error(
        "the store has schema version {found}, newer than the {supported} this aos-cm supports: \
         it was written by a newer aos-cm; refusing to open it"
    )]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("the store has tables ({tables}) but no schema version; refusing to guess its layout")]
    NoSchemaVersion { tables: String },
    #[error("store database error: {0}")]
    Db(#[from] redb::Error),
}

// redb reports each kind of call with its own error type; all of them are database errors here.
macro_rules! from_redb {
    ($($ty:ty),+) => {$(
        impl From<$ty> for StoreError {
            fn from(e: $ty) -> Self {
                StoreError::Db(e.into())
            }
        }
    )+};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub use crate::model::UpdateProgress;

pub struct Store {
    db: Database,
    /// Senders of the change notifications; closed ones are dropped on the next send.
    subscribers: Mutex<Vec<UnboundedSender<Vec<&'static str>>>>,
    /// The last snapshot and the tables changed since; see `snapshot`.
    cache: Mutex<SnapshotCache>,
}

#[derive(Default)]
struct SnapshotCache {
    /// Shared with the readers that still hold it; a refresh copies it only then.
    snapshot: Option<Arc<Snapshot>>,
    /// What changed since, per table.
    stale: BTreeMap<&'static str, read::Stale>,
}

impl Store {
    /// Opens the store at `path`, creating the file if needed, and brings it to the current
    /// schema in one write transaction. A store written by a newer binary is refused.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path)?;
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(true);
        migrate::prepare(&txn)?;
        txn.commit()?;
        Ok(Store {
            db,
            subscribers: Mutex::new(Vec::new()),
            cache: Mutex::new(SnapshotCache::default()),
        })
    }

    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(migrate::META)?;
        let version = meta.get(migrate::VERSION_KEY)?.map(|v| v.value());
        version.ok_or_else(|| StoreError::BadRecord {
            table: tables::META,
            key: migrate::VERSION_KEY.to_string(),
            reason: "missing".to_string(),
        })
    }

    /// Everything the reconcilers read, as one consistent view (an owned copy; see
    /// [`Store::shared_snapshot`] for reads that do not change it).
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.shared_snapshot().map(Arc::unwrap_or_clone)
    }

    /// Everything the reconcilers read, as one consistent view shared with the other readers.
    ///
    /// The last snapshot is kept and only the tables changed since are read again; writes mark
    /// the tables they change while holding the same lock across their commit, so the parts
    /// read now and those kept always belong to one committed state. Readers share the kept
    /// snapshot until a change: a refresh updates it in place when no reader holds it any
    /// more, and copies it first otherwise.
    pub fn shared_snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = match cache.snapshot.take() {
            None => self.read(|r| r.snapshot()).map(Arc::new),
            Some(snap) if cache.stale.is_empty() => Ok(snap),
            Some(mut snap) => {
                let stale = std::mem::take(&mut cache.stale);
                self.read(|r| r.refresh(Arc::make_mut(&mut snap), &stale))
                    .map(|()| snap)
            }
        };
        match fresh {
            Ok(snap) => {
                cache.snapshot = Some(snap.clone());
                Ok(snap)
            }
            Err(e) => {
                // Start over from a full read next time.
                cache.snapshot = None;
                cache.stale.clear();
                Err(e)
            }
        }
    }

    /// Runs `f` over one read transaction, for reads that must agree with each other.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&Reader<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let txn = self.db.begin_read()?;
        f(&Reader {
            src: Source::Read(&txn),
        })
    }

    pub fn conditions(&self) -> Result<BTreeMap<String, Condition>, StoreError> {
        self.read(|r| r.conditions())
    }

    pub fn update_progress(&self) -> Result<Option<UpdateProgress>, StoreError> {
        self.read(|r| r.update_progress())
    }

    /// The journal cursor the journal alerts reader saved last, if any.
    pub fn journal_cursor(&self) -> Result<Option<String>, StoreError> {
        self.read(|r| r.journal_cursor())
    }

    /// Runs `f` in one write transaction (one per incoming event). If `f` fails nothing is
    /// written. If it changed something, the transaction is committed durably, and only then are
    /// subscribers told the names of the changed tables; a transaction that changed nothing is
    /// dropped and announces nothing.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.write_with(true, f)
    }

    /// Like `write`, for observed state that the nodes report again after a restart (instance
    /// statuses, monitoring): committed without an fsync. It is as consistent as any commit and
    /// visible at once; a crash may lose it back to the last durable commit, which is harmless
    /// because the nodes resend it when they reconnect. Never use it for desired state or
    /// allocations.
    pub fn write_observed<R>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.write_with(false, f)
    }

    fn write_with<R>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Tx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut txn = self.db.begin_write()?;
        if durable {
            // Saves the allocator state with each commit so that reopening after a crash does
            // not walk the whole file; commits stay durable (the default `Immediate`).
            txn.set_quick_repair(true);
        } else {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Db(redb::Error::from(e)))?;
        }
        let mut tx = Tx::new(&txn);
        // On error `txn` is dropped uncommitted, which aborts it.
        let result = f(&mut tx)?;
        let changed = tx.into_changed();
        if changed.is_empty() {
            txn.abort()?;
        } else {
            let changed: Vec<(&'static str, read::Stale)> = changed
                .into_iter()
                .filter(|(table, _)| !tables::UNANNOUNCED.contains(table))
                .collect();
            let announced: Vec<&'static str> = changed.iter().map(|(table, _)| *table).collect();
            {
                // Marked and committed under the cache lock: no snapshot is assembled between
                // this commit and its tables being marked stale.
                let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
                for (table, stale) in changed {
                    match cache.stale.get_mut(table) {
                        Some(kept) => kept.merge(stale),
                        None => {
                            cache.stale.insert(table, stale);
                        }
                    }
                }
                txn.commit()?;
            }
            if !announced.is_empty() {
                self.notify(announced);
            }
        }
        Ok(result)
    }

    /// A receiver of change notifications: after each commit that changed something, the
    /// sorted names of the tables it changed. Notifications say what to look at, not what
    /// happened: a receiver reads the store for the state itself, so that two writers on
    /// different threads announcing in the other order than they committed does no harm.
    pub fn subscribe(&self) -> UnboundedReceiver<Vec<&'static str>> {
        let (tx, rx) = unbounded_channel();
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        rx
    }

    fn notify(&self, changed: Vec<&'static str>) {
        // A panic elsewhere while holding the lock leaves the list itself intact.
        let mut subs = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        subs.retain(|s| s.send(changed.clone()).is_ok());
    }
}
