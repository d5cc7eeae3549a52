//! Schema version and migrations.
//!
//! The `meta` table holds `schema_version`. Each migration takes the store from version N to
//! N+1 inside the open write transaction; all pending ones run in that one transaction, so a
//! crash during an upgrade leaves the old version intact. A store newer than this binary is
//! refused rather than read wrongly. There are no down-migrations.
//!
//! Versions:
//! 1. Everything in one table `kv`, keys prefixed by kind: `desired`, `unit_config`,
//!    `host_routes`, `settings`, `update_progress` for the singletons, and `node/<id>`,
//!    `instance/<ident>`, `item/<item>/<version>`, `blob/<digest>`, `subject/<id>`,
//!    `image/<digest>`, `placement/<ident>`, `gid/<item>`, `network/<id>`, `ip/<ident>`,
//!    `firewall/<ident>`, `condition/<key>` (idents and items encoded as in `keys`).
//! 2. One table per kind (see `tables`), so that a change notification can name what changed.
//!    Values are the same serde_json bytes; singletons are under the key `current`.
//!
//! A new, empty table is not a new version: `prepare` creates every missing table of
//! `tables::ALL` on each open, and a binary that does not know a table leaves it alone. So
//! `journal_cursor` was added within version 2 (an older binary opening a newer file only
//! ignores the cursor).

use super::StoreError;
use super::read::def;
use super::tables as t;
use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};

/// The schema this binary reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

pub(crate) const META: TableDefinition<&str, u32> = TableDefinition::new(t::META);
pub(crate) const VERSION_KEY: &str = "schema_version";

/// The single table of schema version 1.
pub(crate) const V1_KV: &str = "kv";

type Migration = fn(&WriteTransaction) -> Result<(), StoreError>;

/// `MIGRATIONS[i]` takes the store from version `i + 1` to `i + 2`.
const MIGRATIONS: [Migration; 1] = [v1_to_v2];

// A new schema version without its migration would leave old stores unreadable.
const _: () = assert!(MIGRATIONS.len() as u32 + 1 == SCHEMA_VERSION);

/// Brings the store in `txn` to [`SCHEMA_VERSION`]: initialises a new file, runs the pending
/// migrations of an old one, creates any missing table. Returns the version found.
pub(crate) fn prepare(txn: &WriteTransaction) -> Result<u32, StoreError> {
    let stored = txn.open_table(META)?.get(VERSION_KEY)?.map(|v| v.value());
    let found = match stored {
        Some(v) => v,
        None => {
            let others: Vec<String> = txn
                .list_tables()?
                .map(|h| h.name().to_string())
                .filter(|n| n != t::META)
                .collect();
            if !others.is_empty() {
                return Err(StoreError::NoSchemaVersion {
                    tables: others.join(", "),
                });
            }
            // A new, empty file: create the current layout directly.
            SCHEMA_VERSION
        }
    };
    if found == 0 {
        return Err(StoreError::BadRecord {
            table: t::META,
            key: VERSION_KEY.to_string(),
            reason: "schema version 0 does not exist".to_string(),
        });
    }
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for migration in &MIGRATIONS[(found - 1) as usize..] {
        migration(txn)?;
    }
    for name in t::ALL {
        txn.open_table(def(name))?;
    }
    txn.open_table(META)?.insert(VERSION_KEY, SCHEMA_VERSION)?;
    Ok(found)
}

/// Where a version-1 `kv` key goes in version 2: (table, key).
fn v1_destination(key: &str) -> Option<(&'static str, &str)> {
    let singleton = match key {
        "desired" => Some(t::DESIRED),
        "unit_config" => Some(t::UNIT_CONFIG),
        "host_routes" => Some(t::HOST_ROUTES),
        "settings" => Some(t::SETTINGS),
        "update_progress" => Some(t::UPDATE_PROGRESS),
        _ => None,
    };
    if let Some(table) = singleton {
        return Some((table, t::CURRENT));
    }
    let (kind, rest) = key.split_once('/')?;
    let table = match kind {
        "node" => t::NODES,
        "instance" => t::REPORTED_INSTANCES,
        "item" => t::ITEMS,
        "blob" => t::BLOBS,
        "subject" => t::UNIT_SUBJECTS,
        "image" => t::CATALOGUE,
        "placement" => t::PLACEMENTS,
        "gid" => t::GIDS,
        "network" => t::NETWORKS,
        "ip" => t::INSTANCE_IPS,
        "firewall" => t::FIREWALL,
        "condition" => t::CONDITIONS,
        _ => return None,
    };
    Some((table, rest))
}

/// Splits the `kv` table into one table per kind. Values move byte for byte: their encoding
/// did not change, and a record that does not decode is carried over as it is rather than
/// lost (reading it reports it, naming its new table and key).
fn v1_to_v2(txn: &WriteTransaction) -> Result<(), StoreError> {
    let kv = def(V1_KV);
    let mut records = Vec::new();
    for entry in txn.open_table(kv)?.iter()? {
        let (k, v) = entry?;
        records.push((k.value().to_string(), v.value().to_vec()));
    }
    for (key, value) in &records {
        // Refusing the whole upgrade keeps the version-1 store intact for a binary that knows
        // the kind; dropping the record would lose state for good.
        let (table, new_key) = v1_destination(key).ok_or_else(|| StoreError::BadRecord {
            table: V1_KV,
            key: key.clone(),
            reason: "unknown record kind in a version-1 store".to_string(),
        })?;
        txn.open_table(def(table))?
            .insert(new_key, value.as_slice())?;
    }
    txn.delete_table(kv)?;
    Ok(())
}
