//! Typed reads over either kind of transaction, so that a write transaction (which must see
//! its own uncommitted writes) and a read transaction share one decoding path.

use super::keys;
use super::tables as t;
use super::{StoreError, UpdateProgress};
use crate::model::*;
use redb::{ReadTransaction, ReadableTable, TableDefinition, TableError, WriteTransaction};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};

/// The definition of a data table: every one maps a string key to serde_json bytes.
pub(crate) fn def(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// Tables whose changed keys are remembered, so that a snapshot refresh reads only those records:
/// the ones that change one record at a time while the unit runs (statuses, placements, nodes).
const KEYED_REFRESH: [&str; 3] = [t::REPORTED_INSTANCES, t::PLACEMENTS, t::NODES];

/// Most changed keys remembered for one table; past it the whole table is read again. A refresh
/// also reads the whole table when the changed keys are more than half of it.
const MAX_STALE_KEYS: usize = 4096;

/// What changed in one table since a snapshot was read: the whole table, or these keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stale {
    All,
    Keys(BTreeSet<String>),
}

impl Stale {
    /// `key` of `table` changed.
    pub(crate) fn key(table: &str, key: &str) -> Stale {
        if KEYED_REFRESH.contains(&table) {
            Stale::Keys(BTreeSet::from([key.to_owned()]))
        } else {
            Stale::All
        }
    }

    pub(crate) fn add(&mut self, key: &str) {
        if let Stale::Keys(keys) = self {
            if keys.len() >= MAX_STALE_KEYS {
                *self = Stale::All;
            } else if !keys.contains(key) {
                keys.insert(key.to_owned());
            }
        }
    }

    /// Both this change and `other`.
    pub(crate) fn merge(&mut self, other: Stale) {
        match (&mut *self, other) {
            (Stale::All, _) => {}
            (_, Stale::All) => *self = Stale::All,
            (Stale::Keys(mine), Stale::Keys(theirs)) => {
                mine.extend(theirs);
                if mine.len() > MAX_STALE_KEYS {
                    *self = Stale::All;
                }
            }
        }
    }
}

/// A key looked up, and its record if there is one.
type Found<'k> = (&'k String, Option<Vec<u8>>);

#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    Read(&'a ReadTransaction),
    Write(&'a WriteTransaction),
}

/// Copies every record of a table out (the tables are small: a unit has tens of nodes and
/// hundreds of instances at most).
fn all_of<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

fn one_of<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get(key)?.map(|v| v.value().to_vec()))
}

impl Source<'_> {
    pub(crate) fn all(&self, table: &'static str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            Source::Read(txn) => match txn.open_table(def(table)) {
                Ok(tbl) => all_of(&tbl),
                // Tables are created at open; a missing one simply holds nothing.
                Err(TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
                Err(e) => Err(e.into()),
            },
            Source::Write(txn) => all_of(&txn.open_table(def(table))?),
        }
    }

    /// The records of `keys` (`None` for a key that is not there), from one opening of the
    /// table.
    fn some<'k>(
        &self,
        table: &'static str,
        keys: impl IntoIterator<Item = &'k String>,
    ) -> Result<Vec<Found<'k>>, StoreError> {
        fn each<'k, T: ReadableTable<&'static str, &'static [u8]>>(
            table: &T,
            keys: impl IntoIterator<Item = &'k String>,
        ) -> Result<Vec<Found<'k>>, StoreError> {
            keys.into_iter()
                .map(|k| Ok((k, one_of(table, k)?)))
                .collect()
        }
        match self {
            Source::Read(txn) => match txn.open_table(def(table)) {
                Ok(tbl) => each(&tbl, keys),
                Err(TableError::TableDoesNotExist(_)) => {
                    Ok(keys.into_iter().map(|k| (k, None)).collect())
                }
                Err(e) => Err(e.into()),
            },
            Source::Write(txn) => each(&txn.open_table(def(table))?, keys),
        }
    }

    fn one(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Source::Read(txn) => match txn.open_table(def(table)) {
                Ok(tbl) => one_of(&tbl, key),
                Err(TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.into()),
            },
            Source::Write(txn) => one_of(&txn.open_table(def(table))?, key),
        }
    }
}

pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::BadRecord {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn bad(table: &'static str, key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::BadRecord {
        table,
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// A stored record's key must be the one its own identity encodes to: a record filed under
/// another key is as unreadable as garbage bytes.
fn check_identity(table: &'static str, key: &str, expected: &str) -> Result<(), StoreError> {
    if key == expected {
        Ok(())
    } else {
        Err(bad(
            table,
            key,
            format!("the record belongs under key {expected:?}"),
        ))
    }
}

fn parse_ident_key(table: &'static str, key: &str) -> Result<InstanceIdent, StoreError> {
    keys::parse_ident(key)
        .ok_or_else(|| bad(table, key, "key is not an item/subject/instance ident"))
}

/// Typed reads inside one transaction. Every reader returns what the transaction sees: a read
/// transaction's consistent snapshot, or a write transaction's state including its own writes.
pub struct Reader<'a> {
    pub(crate) src: Source<'a>,
}

impl Reader<'_> {
    fn single<T: DeserializeOwned>(&self, table: &'static str) -> Result<Option<T>, StoreError> {
        self.get(table, t::CURRENT)
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.src
            .one(table, key)?
            .map(|b| decode(table, key, &b))
            .transpose()
    }

    /// Every record of a table whose key is a plain string, decoded.
    fn string_keyed<T: DeserializeOwned>(
        &self,
        table: &'static str,
    ) -> Result<BTreeMap<String, T>, StoreError> {
        self.src
            .all(table)?
            .into_iter()
            .map(|(k, v)| {
                let val = decode(table, &k, &v)?;
                Ok((k, val))
            })
            .collect()
    }

    /// Every record of a table keyed by an instance ident, decoded.
    fn ident_keyed<T: DeserializeOwned>(
        &self,
        table: &'static str,
    ) -> Result<BTreeMap<InstanceIdent, T>, StoreError> {
        self.src
            .all(table)?
            .into_iter()
            .map(|(k, v)| {
                let ident = parse_ident_key(table, &k)?;
                Ok((ident, decode(table, &k, &v)?))
            })
            .collect()
    }

    pub fn desired(&self) -> Result<Option<DesiredState>, StoreError> {
        self.single(t::DESIRED)
    }

    pub fn node(&self, node_id: &str) -> Result<Option<ObservedNode>, StoreError> {
        let node: Option<ObservedNode> = self.get(t::NODES, node_id)?;
        if let Some(n) = &node {
            check_identity(t::NODES, node_id, &n.info.node_id)?;
        }
        Ok(node)
    }

    pub fn nodes(&self) -> Result<BTreeMap<NodeId, ObservedNode>, StoreError> {
        let nodes: BTreeMap<String, ObservedNode> = self.string_keyed(t::NODES)?;
        for (k, n) in &nodes {
            check_identity(t::NODES, k, &n.info.node_id)?;
        }
        Ok(nodes)
    }

    pub fn reported_instance(
        &self,
        ident: &InstanceIdent,
    ) -> Result<Option<ReportedInstance>, StoreError> {
        let key = keys::ident(ident);
        let r: Option<ReportedInstance> = self.get(t::REPORTED_INSTANCES, &key)?;
        if let Some(r) = &r {
            check_identity(t::REPORTED_INSTANCES, &key, &keys::ident(&r.ident))?;
        }
        Ok(r)
    }

    pub fn reported_instances(
        &self,
    ) -> Result<BTreeMap<InstanceIdent, ReportedInstance>, StoreError> {
        let all: BTreeMap<InstanceIdent, ReportedInstance> =
            self.ident_keyed(t::REPORTED_INSTANCES)?;
        for (k, r) in &all {
            check_identity(
                t::REPORTED_INSTANCES,
                &keys::ident(k),
                &keys::ident(&r.ident),
            )?;
        }
        Ok(all)
    }

    /// The installed unit config status; `Absent` when none was ever stored.
    pub fn unit_config_status(&self) -> Result<UnitConfigStatus, StoreError> {
        Ok(self.single(t::UNIT_CONFIG)?.unwrap_or_default())
    }

    pub fn item(&self, item_id: &str, version: &str) -> Result<Option<StoredItem>, StoreError> {
        let key = keys::item(item_id, version);
        let item: Option<StoredItem> = self.get(t::ITEMS, &key)?;
        if let Some(i) = &item {
            check_identity(t::ITEMS, &key, &keys::item(&i.id, &i.version))?;
        }
        Ok(item)
    }

    pub fn items(&self) -> Result<BTreeMap<(ItemId, String), StoredItem>, StoreError> {
        let mut out = BTreeMap::new();
        for (k, v) in self.src.all(t::ITEMS)? {
            let item: StoredItem = decode(t::ITEMS, &k, &v)?;
            check_identity(t::ITEMS, &k, &keys::item(&item.id, &item.version))?;
            out.insert((item.id.clone(), item.version.clone()), item);
        }
        Ok(out)
    }

    pub fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.src.one(t::BLOBS, digest.as_str())?.is_some())
    }

    pub fn blobs(&self) -> Result<BTreeSet<Digest>, StoreError> {
        let mut out = BTreeSet::new();
        for (k, v) in self.src.all(t::BLOBS)? {
            let d: Digest = decode(t::BLOBS, &k, &v)?;
            check_identity(t::BLOBS, &k, d.as_str())?;
            // Digest's serde is transparent: validate the form too.
            Digest::parse(&k).map_err(|e| bad(t::BLOBS, &k, e))?;
            out.insert(d);
        }
        Ok(out)
    }

    pub fn unit_subjects(&self) -> Result<BTreeSet<SubjectId>, StoreError> {
        let mut out = BTreeSet::new();
        for (k, s) in self.string_keyed::<String>(t::UNIT_SUBJECTS)? {
            check_identity(t::UNIT_SUBJECTS, &k, &s)?;
            out.insert(s);
        }
        Ok(out)
    }

    pub fn host_routes(&self) -> Result<Vec<Ipv4Net>, StoreError> {
        Ok(self.single(t::HOST_ROUTES)?.unwrap_or_default())
    }

    pub fn catalogue_image(&self, index_digest: &Digest) -> Result<Option<ItemImage>, StoreError> {
        let img: Option<ItemImage> = self.get(t::CATALOGUE, index_digest.as_str())?;
        if let Some(i) = &img {
            check_identity(t::CATALOGUE, index_digest.as_str(), i.index_digest.as_str())?;
        }
        Ok(img)
    }

    pub fn catalogue(&self) -> Result<Catalogue, StoreError> {
        let mut images = BTreeMap::new();
        for (k, img) in self.string_keyed::<ItemImage>(t::CATALOGUE)? {
            check_identity(t::CATALOGUE, &k, img.index_digest.as_str())?;
            images.insert(img.index_digest.clone(), img);
        }
        Ok(Catalogue { images })
    }

    pub fn placement(
        &self,
        ident: &InstanceIdent,
    ) -> Result<Option<InstancePlacement>, StoreError> {
        let key = keys::ident(ident);
        let p: Option<InstancePlacement> = self.get(t::PLACEMENTS, &key)?;
        if let Some(p) = &p {
            check_identity(t::PLACEMENTS, &key, &keys::ident(&p.ident))?;
        }
        Ok(p)
    }

    pub fn placements(&self) -> Result<BTreeMap<InstanceIdent, InstancePlacement>, StoreError> {
        let all: BTreeMap<InstanceIdent, InstancePlacement> = self.ident_keyed(t::PLACEMENTS)?;
        for (k, p) in &all {
            check_identity(t::PLACEMENTS, &keys::ident(k), &keys::ident(&p.ident))?;
        }
        Ok(all)
    }

    pub fn gid(&self, item_id: &str) -> Result<Option<u32>, StoreError> {
        self.get(t::GIDS, item_id)
    }

    pub fn network(&self, network_id: &str) -> Result<Option<NetworkAllocation>, StoreError> {
        self.get(t::NETWORKS, network_id)
    }

    pub fn instance_ip(
        &self,
        ident: &InstanceIdent,
    ) -> Result<Option<InstanceAddress>, StoreError> {
        self.get(t::INSTANCE_IPS, &keys::ident(ident))
    }

    pub fn firewall(&self, ident: &InstanceIdent) -> Result<Option<Vec<FirewallRule>>, StoreError> {
        self.get(t::FIREWALL, &keys::ident(ident))
    }

    pub fn allocations(&self) -> Result<Allocations, StoreError> {
        Ok(Allocations {
            instances: self.placements()?,
            gids: self.string_keyed(t::GIDS)?,
            networks: self.string_keyed(t::NETWORKS)?,
            instance_ips: self.ident_keyed(t::INSTANCE_IPS)?,
            firewall: self.ident_keyed(t::FIREWALL)?,
        })
    }

    /// The network part of the allocations (networks, addresses, firewall rules); placements
    /// and GIDs are left empty.
    pub fn network_allocations(&self) -> Result<Allocations, StoreError> {
        Ok(Allocations {
            networks: self.string_keyed(t::NETWORKS)?,
            instance_ips: self.ident_keyed(t::INSTANCE_IPS)?,
            firewall: self.ident_keyed(t::FIREWALL)?,
            ..Allocations::default()
        })
    }

    pub fn observed(&self) -> Result<ObservedUnit, StoreError> {
        Ok(ObservedUnit {
            nodes: self.nodes()?,
            instances: self.reported_instances()?,
            unit_config: self.unit_config_status()?,
            items: self.items()?,
            blobs: self.blobs()?,
            unit_subjects: self.unit_subjects()?,
            host_routes: self.host_routes()?,
            network_params: self.ident_keyed(t::NETWORK_PARAMS)?,
        })
    }

    /// Plan settings; the defaults when none were stored.
    pub fn settings(&self) -> Result<PlanSettings, StoreError> {
        Ok(self.single(t::SETTINGS)?.unwrap_or_default())
    }

    pub fn condition(&self, key: &str) -> Result<Option<Condition>, StoreError> {
        self.get(t::CONDITIONS, key)
    }

    pub fn conditions(&self) -> Result<BTreeMap<String, Condition>, StoreError> {
        self.string_keyed(t::CONDITIONS)
    }

    pub fn update_progress(&self) -> Result<Option<UpdateProgress>, StoreError> {
        self.single(t::UPDATE_PROGRESS)
    }

    /// The journal alerts reader's saved cursor (see [`t::JOURNAL_CURSOR`]).
    pub fn journal_cursor(&self) -> Result<Option<String>, StoreError> {
        self.single(t::JOURNAL_CURSOR)
    }

    /// Re-reads only the records `keys` of `table` into `snap`, for the tables kept record by
    /// record and when the keys are at most half of the table; false when it did not.
    fn refresh_keys(
        &self,
        snap: &mut Snapshot,
        table: &'static str,
        keys: &BTreeSet<String>,
    ) -> Result<bool, StoreError> {
        let few = |kept: usize| keys.len() * 2 <= kept;
        match table {
            t::REPORTED_INSTANCES if few(snap.observed.instances.len()) => {
                let map = &mut snap.observed.instances;
                self.refresh_ident_keyed(table, keys, map, |r| keys::ident(&r.ident))?;
            }
            t::PLACEMENTS if few(snap.allocations.instances.len()) => {
                let map = &mut snap.allocations.instances;
                self.refresh_ident_keyed(table, keys, map, |p| keys::ident(&p.ident))?;
            }
            t::NODES if few(snap.observed.nodes.len()) => {
                for key in keys {
                    match self.node(key)? {
                        Some(n) => snap.observed.nodes.insert(key.clone(), n),
                        None => snap.observed.nodes.remove(key),
                    };
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Re-reads the records `keys` of an ident-keyed table into `map`: a record read again
    /// replaces the kept one, a key no longer there removes it. `identity` is the key a record
    /// belongs under.
    fn refresh_ident_keyed<T: DeserializeOwned>(
        &self,
        table: &'static str,
        keys: &BTreeSet<String>,
        map: &mut BTreeMap<InstanceIdent, T>,
        identity: impl Fn(&T) -> String,
    ) -> Result<(), StoreError> {
        for (key, bytes) in self.src.some(table, keys)? {
            let ident = parse_ident_key(table, key)?;
            match bytes {
                Some(bytes) => {
                    let value: T = decode(table, key, &bytes)?;
                    check_identity(table, &keys::ident(&ident), &identity(&value))?;
                    map.insert(ident, value);
                }
                None => {
                    map.remove(&ident);
                }
            }
        }
        Ok(())
    }

    /// Re-reads the parts of `snap` that come from the changed tables: only the changed records
    /// where the keys are known, the whole table otherwise.
    pub(crate) fn refresh(
        &self,
        snap: &mut Snapshot,
        tables: &BTreeMap<&'static str, Stale>,
    ) -> Result<(), StoreError> {
        for (table, stale) in tables {
            if let Stale::Keys(keys) = stale
                && self.refresh_keys(snap, table, keys)?
            {
                continue;
            }
            match *table {
                t::DESIRED => snap.desired = self.desired()?,
                t::NODES => snap.observed.nodes = self.nodes()?,
                t::REPORTED_INSTANCES => snap.observed.instances = self.reported_instances()?,
                t::UNIT_CONFIG => snap.observed.unit_config = self.unit_config_status()?,
                t::ITEMS => snap.observed.items = self.items()?,
                t::BLOBS => snap.observed.blobs = self.blobs()?,
                t::UNIT_SUBJECTS => snap.observed.unit_subjects = self.unit_subjects()?,
                t::HOST_ROUTES => snap.observed.host_routes = self.host_routes()?,
                t::NETWORK_PARAMS => {
                    snap.observed.network_params = self.ident_keyed(t::NETWORK_PARAMS)?
                }
                t::CATALOGUE => snap.catalogue = self.catalogue()?,
                t::PLACEMENTS => snap.allocations.instances = self.placements()?,
                t::GIDS => snap.allocations.gids = self.string_keyed(t::GIDS)?,
                t::NETWORKS => snap.allocations.networks = self.string_keyed(t::NETWORKS)?,
                t::INSTANCE_IPS => {
                    snap.allocations.instance_ips = self.ident_keyed(t::INSTANCE_IPS)?
                }
                t::FIREWALL => snap.allocations.firewall = self.ident_keyed(t::FIREWALL)?,
                t::SETTINGS => snap.settings = self.settings()?,
                t::UPDATE_PROGRESS => snap.progress = self.update_progress()?.unwrap_or_default(),
                // Not part of a snapshot.
                _ => {}
            }
        }
        Ok(())
    }

    /// Everything the reconcilers read, as this transaction sees it.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            desired: self.desired()?,
            observed: self.observed()?,
            allocations: self.allocations()?,
            catalogue: self.catalogue()?,
            settings: self.settings()?,
            progress: self.update_progress()?.unwrap_or_default(),
        })
    }
}
