//! The write side: one [`Tx`] per incoming event, with typed setters that remember which tables
//! really changed, so that the commit wakes only the reconcilers that read them.

use super::keys;
use super::read::{Reader, Source, Stale, def};
use super::tables as t;
use super::{StoreError, UpdateProgress};
use crate::model::*;
use crate::reconcilers::project;
use redb::WriteTransaction;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

/// One write transaction. Reads (through [`Reader`], which `Tx` derefs to) see the writes made
/// so far in it. Nothing is visible to others until [`Store::write`](super::Store::write)
/// commits.
pub struct Tx<'a> {
    txn: &'a WriteTransaction,
    reader: Reader<'a>,
    /// The tables changed so far, each with the keys changed when they are few.
    changed: BTreeMap<&'static str, Stale>,
}

impl<'a> Deref for Tx<'a> {
    type Target = Reader<'a>;

    fn deref(&self) -> &Reader<'a> {
        &self.reader
    }
}

fn encode<T: Serialize + ?Sized>(
    table: &'static str,
    key: &str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// The least set of writes that turns `before` into `after`: the keys only `before` has, and
/// the entries of `after` that differ from `before`.
fn diff_map<'m, K: Ord, V: PartialEq>(
    before: &'m BTreeMap<K, V>,
    after: &'m BTreeMap<K, V>,
) -> (Vec<&'m K>, Vec<(&'m K, &'m V)>) {
    let gone = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let put = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .collect();
    (gone, put)
}

/// A map entry whose key disagrees with the identity inside its record cannot be stored: the
/// record would come back under another key.
fn same_identity(table: &'static str, map_key: String, identity: String) -> Result<(), StoreError> {
    if map_key == identity {
        Ok(())
    } else {
        Err(StoreError::Mismatch {
            table,
            key: map_key,
            identity,
        })
    }
}

impl<'a> Tx<'a> {
    pub(crate) fn new(txn: &'a WriteTransaction) -> Tx<'a> {
        Tx {
            txn,
            reader: Reader {
                src: Source::Write(txn),
            },
            changed: BTreeMap::new(),
        }
    }

    /// The tables this transaction changed so far, sorted.
    pub fn changed_tables(&self) -> Vec<&'static str> {
        self.changed.keys().copied().collect()
    }

    pub(crate) fn into_changed(self) -> BTreeMap<&'static str, Stale> {
        self.changed
    }

    /// Notes that `key` of `table` changed.
    fn mark(&mut self, table: &'static str, key: &str) {
        match self.changed.get_mut(table) {
            Some(stale) => stale.add(key),
            None => {
                self.changed.insert(table, Stale::key(table, key));
            }
        }
    }

    // --- raw records -------------------------------------------------------------------------

    /// Stores bytes under a key; the table counts as changed only if the bytes differ from what
    /// was there, so that an edge re-reporting the same state wakes nobody.
    fn put_raw(&mut self, table: &'static str, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let mut tbl = self.txn.open_table(def(table))?;
        let changed = match tbl.insert(key, bytes)? {
            Some(old) => old.value() != bytes,
            None => true,
        };
        if changed {
            self.mark(table, key);
        }
        Ok(())
    }

    fn put<T: Serialize + ?Sized>(
        &mut self,
        table: &'static str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = encode(table, key, value)?;
        self.put_raw(table, key, &bytes)
    }

    /// Removes a key; returns whether it was there.
    fn remove(&mut self, table: &'static str, key: &str) -> Result<bool, StoreError> {
        let mut tbl = self.txn.open_table(def(table))?;
        let existed = tbl.remove(key)?.is_some();
        if existed {
            self.mark(table, key);
        }
        Ok(existed)
    }

    /// Deletes one record whatever its bytes, e.g. to clear a record that no longer decodes
    /// (an operator's repair). Returns whether it was there.
    pub fn remove_record(&mut self, table: &str, key: &str) -> Result<bool, StoreError> {
        let Some(table) = t::ALL.iter().copied().find(|n| *n == table) else {
            return Err(StoreError::UnknownTable(table.to_string()));
        };
        self.remove(table, key)
    }

    // --- desired and observed state ----------------------------------------------------------

    /// Replaces the desired state; `None` forgets it.
    pub fn set_desired(&mut self, desired: Option<&DesiredState>) -> Result<(), StoreError> {
        match desired {
            Some(d) => self.put(t::DESIRED, t::CURRENT, d),
            None => self.remove(t::DESIRED, t::CURRENT).map(|_| ()),
        }
    }

    pub fn put_node(&mut self, node: &ObservedNode) -> Result<(), StoreError> {
        self.put(t::NODES, &node.info.node_id, node)
    }

    pub fn remove_node(&mut self, node_id: &str) -> Result<bool, StoreError> {
        self.remove(t::NODES, node_id)
    }

    pub fn put_reported_instance(&mut self, inst: &ReportedInstance) -> Result<(), StoreError> {
        self.put(t::REPORTED_INSTANCES, &keys::ident(&inst.ident), inst)
    }

    pub fn remove_reported_instance(&mut self, ident: &InstanceIdent) -> Result<bool, StoreError> {
        self.remove(t::REPORTED_INSTANCES, &keys::ident(ident))
    }

    pub fn set_unit_config_status(&mut self, status: &UnitConfigStatus) -> Result<(), StoreError> {
        self.put(t::UNIT_CONFIG, t::CURRENT, status)
    }

    pub fn put_item(&mut self, item: &StoredItem) -> Result<(), StoreError> {
        self.put(t::ITEMS, &keys::item(&item.id, &item.version), item)
    }

    pub fn remove_item(&mut self, item_id: &str, version: &str) -> Result<bool, StoreError> {
        self.remove(t::ITEMS, &keys::item(item_id, version))
    }

    pub fn add_blob(&mut self, digest: &Digest) -> Result<(), StoreError> {
        self.put(t::BLOBS, digest.as_str(), digest)
    }

    pub fn remove_blob(&mut self, digest: &Digest) -> Result<bool, StoreError> {
        self.remove(t::BLOBS, digest.as_str())
    }

    /// Replaces the set of unit subjects.
    pub fn set_unit_subjects(&mut self, subjects: &BTreeSet<SubjectId>) -> Result<(), StoreError> {
        // By stored key, without decoding: replacing the set also clears a record that no
        // longer decodes.
        for (old, _) in self.reader.src.all(t::UNIT_SUBJECTS)? {
            if !subjects.contains(&old) {
                self.remove(t::UNIT_SUBJECTS, &old)?;
            }
        }
        for s in subjects {
            self.put(t::UNIT_SUBJECTS, s, s)?;
        }
        Ok(())
    }

    pub fn set_host_routes(&mut self, routes: &[Ipv4Net]) -> Result<(), StoreError> {
        self.put(t::HOST_ROUTES, t::CURRENT, routes)
    }

    pub fn put_catalogue_image(&mut self, image: &ItemImage) -> Result<(), StoreError> {
        self.put(t::CATALOGUE, image.index_digest.as_str(), image)
    }

    pub fn remove_catalogue_image(&mut self, index_digest: &Digest) -> Result<bool, StoreError> {
        self.remove(t::CATALOGUE, index_digest.as_str())
    }

    pub fn set_settings(&mut self, settings: &PlanSettings) -> Result<(), StoreError> {
        self.put(t::SETTINGS, t::CURRENT, settings)
    }

    // --- allocations -------------------------------------------------------------------------

    pub fn put_placement(&mut self, placement: &InstancePlacement) -> Result<(), StoreError> {
        self.put(t::PLACEMENTS, &keys::ident(&placement.ident), placement)
    }

    pub fn remove_placement(&mut self, ident: &InstanceIdent) -> Result<bool, StoreError> {
        self.remove(t::PLACEMENTS, &keys::ident(ident))
    }

    pub fn set_gid(&mut self, item_id: &str, gid: u32) -> Result<(), StoreError> {
        self.put(t::GIDS, item_id, &gid)
    }

    pub fn remove_gid(&mut self, item_id: &str) -> Result<bool, StoreError> {
        self.remove(t::GIDS, item_id)
    }

    pub fn put_network(
        &mut self,
        network_id: &str,
        network: &NetworkAllocation,
    ) -> Result<(), StoreError> {
        self.put(t::NETWORKS, network_id, network)
    }

    pub fn remove_network(&mut self, network_id: &str) -> Result<bool, StoreError> {
        self.remove(t::NETWORKS, network_id)
    }

    pub fn put_instance_ip(
        &mut self,
        ident: &InstanceIdent,
        address: &InstanceAddress,
    ) -> Result<(), StoreError> {
        self.put(t::INSTANCE_IPS, &keys::ident(ident), address)
    }

    pub fn remove_instance_ip(&mut self, ident: &InstanceIdent) -> Result<bool, StoreError> {
        self.remove(t::INSTANCE_IPS, &keys::ident(ident))
    }

    pub fn set_network_params(
        &mut self,
        ident: &InstanceIdent,
        params: &InstanceNetworkParams,
    ) -> Result<(), StoreError> {
        self.put(t::NETWORK_PARAMS, &keys::ident(ident), params)
    }

    pub fn remove_network_params(&mut self, ident: &InstanceIdent) -> Result<bool, StoreError> {
        self.remove(t::NETWORK_PARAMS, &keys::ident(ident))
    }

    pub fn set_firewall(
        &mut self,
        ident: &InstanceIdent,
        rules: &[FirewallRule],
    ) -> Result<(), StoreError> {
        self.put(t::FIREWALL, &keys::ident(ident), rules)
    }

    pub fn remove_firewall(&mut self, ident: &InstanceIdent) -> Result<bool, StoreError> {
        self.remove(t::FIREWALL, &keys::ident(ident))
    }

    // --- conditions and update progress ------------------------------------------------------

    pub fn put_condition(&mut self, key: &str, condition: &Condition) -> Result<(), StoreError> {
        self.put(t::CONDITIONS, key, condition)
    }

    pub fn remove_condition(&mut self, key: &str) -> Result<bool, StoreError> {
        self.remove(t::CONDITIONS, key)
    }

    pub fn set_update_progress(&mut self, progress: &UpdateProgress) -> Result<(), StoreError> {
        self.put(t::UPDATE_PROGRESS, t::CURRENT, progress)
    }

    /// Saves the journal alerts reader's cursor. The commit is not announced (the table is in
    /// [`t::UNANNOUNCED`]): no reconciler or status reads it.
    pub fn set_journal_cursor(&mut self, cursor: &str) -> Result<(), StoreError> {
        self.put(t::JOURNAL_CURSOR, t::CURRENT, cursor)
    }

    // --- whole snapshots and actions ---------------------------------------------------------

    /// Makes the stored snapshot tables equal to `target`, writing only the entries that differ
    /// (used to import a scenario, and by [`Tx::apply`]). Conditions and update progress are not
    /// part of a snapshot and are left alone.
    pub fn set_snapshot(&mut self, target: &Snapshot) -> Result<(), StoreError> {
        let current = self.snapshot()?;
        self.write_diff(&current, target)
    }

    /// Carries out the stored effect of an action, exactly as `project::apply` does on a
    /// snapshot: the action is applied to the snapshot this transaction sees and the entries
    /// that differ afterwards are written back.
    pub fn apply(&mut self, action: &Action, now: UnixMillis) -> Result<(), StoreError> {
        // The projection is the one implementation of an action's effect. It runs over the part
        // of the state the action touches (or over everything for the few actions that look
        // at whole tables), and the entries that differ afterwards are written back.
        let before = match self.partial(action)? {
            Some(part) => part,
            None => self.snapshot()?,
        };
        let mut after = before.clone();
        project::apply(&mut after, action, now);
        self.write_diff(&before, &after)
    }

    /// Carries out several actions in this transaction: one read of whatever they touch, the
    /// projections in order, one write of what differs.
    pub fn apply_batch(&mut self, actions: &[Action], now: UnixMillis) -> Result<(), StoreError> {
        match actions {
            [] => Ok(()),
            [one] => self.apply(one, now),
            many => {
                // Network allocations only look at the allocations; other batches at everything.
                let allocations_only = many.iter().all(|a| {
                    matches!(
                        a,
                        Action::AllocateNetwork { .. }
                            | Action::AttachHost { .. }
                            | Action::DetachHost { .. }
                            | Action::AssignInstanceIp { .. }
                            | Action::SetFirewallRules { .. }
                            | Action::ReleaseInstanceIp { .. }
                            | Action::ReleaseNetwork { .. }
                    )
                });
                let before = if allocations_only {
                    // Host routes too: a network whose planned subnet was taken meanwhile gets
                    // a free one, which must not overlap them.
                    Snapshot {
                        allocations: self.network_allocations()?,
                        observed: crate::model::ObservedUnit {
                            host_routes: self.host_routes()?,
                            ..Default::default()
                        },
                        ..Snapshot::default()
                    }
                } else {
                    self.snapshot()?
                };
                let mut after = before.clone();
                for action in many {
                    project::apply(&mut after, action, now);
                }
                self.write_diff(&before, &after)
            }
        }
    }

    /// The entries an action's projection reads and writes, when that is a known few;
    /// `None` when it needs whole tables.
    fn partial(&self, action: &Action) -> Result<Option<Snapshot>, StoreError> {
        let mut s = Snapshot::default();
        match action {
            Action::DownloadBlob { digest, .. } | Action::DeleteBlob { digest } => {
                if self.has_blob(digest)? {
                    s.observed.blobs.insert(digest.clone());
                }
            }
            Action::InstallItem {
                item_id, version, ..
            }
            | Action::RemoveItem { item_id, version }
            | Action::DeleteItem { item_id, version } => {
                if let Some(i) = self.item(item_id, version)? {
                    s.observed
                        .items
                        .insert((item_id.clone(), version.clone()), i);
                }
            }
            Action::StartInstance(start) => {
                let ident = &start.placement.ident;
                if let Some(p) = self.placement(ident)? {
                    s.allocations.instances.insert(ident.clone(), p);
                }
                if let Some(g) = self.gid(&ident.item_id)? {
                    s.allocations.gids.insert(ident.item_id.clone(), g);
                }
            }
            Action::StopInstance { .. } => {}
            Action::AllocateNetwork { network_id, .. } | Action::DetachHost { network_id, .. } => {
                if let Some(n) = self.network(network_id)? {
                    s.allocations.networks.insert(network_id.clone(), n);
                }
            }
            Action::SetFirewallRules { ident, .. } | Action::ReleaseInstanceIp { ident } => {
                if let Some(a) = self.instance_ip(ident)? {
                    s.allocations.instance_ips.insert(ident.clone(), a);
                }
                if let Some(f) = self.firewall(ident)? {
                    s.allocations.firewall.insert(ident.clone(), f);
                }
            }
            Action::PushNodeConfig { node_id, .. } | Action::SetNodeState { node_id, .. } => {
                if let Some(n) = self.node(node_id)? {
                    s.observed.nodes.insert(node_id.clone(), n);
                }
            }
            // These look at whole tables (the last placement of an item, every address of a
            // network) or at the desired state.
            Action::ReleaseInstance { .. }
            | Action::ReleaseNetwork { .. }
            | Action::AttachHost { .. }
            | Action::AssignInstanceIp { .. }
            | Action::InstallUnitConfig { .. } => return Ok(None),
        }
        Ok(Some(s))
    }

    fn write_diff(&mut self, before: &Snapshot, after: &Snapshot) -> Result<(), StoreError> {
        // Refuse a snapshot whose map keys disagree with the identities in the records before
        // writing anything: such a record would come back under another key.
        let (bo, ao) = (&before.observed, &after.observed);
        for (k, n) in &ao.nodes {
            same_identity(t::NODES, k.clone(), n.info.node_id.clone())?;
        }
        for (k, r) in &ao.instances {
            same_identity(t::REPORTED_INSTANCES, keys::ident(k), keys::ident(&r.ident))?;
        }
        for ((id, ver), i) in &ao.items {
            same_identity(t::ITEMS, keys::item(id, ver), keys::item(&i.id, &i.version))?;
        }
        for (k, img) in &after.catalogue.images {
            same_identity(
                t::CATALOGUE,
                k.as_str().to_string(),
                img.index_digest.as_str().to_string(),
            )?;
        }
        for (k, p) in &after.allocations.instances {
            same_identity(t::PLACEMENTS, keys::ident(k), keys::ident(&p.ident))?;
        }

        if before.desired != after.desired {
            self.set_desired(after.desired.as_ref())?;
        }

        let (gone, put) = diff_map(&bo.nodes, &ao.nodes);
        for k in gone {
            self.remove_node(k)?;
        }
        for (_, n) in put {
            self.put_node(n)?;
        }
        let (gone, put) = diff_map(&bo.instances, &ao.instances);
        for k in gone {
            self.remove_reported_instance(k)?;
        }
        for (_, r) in put {
            self.put_reported_instance(r)?;
        }
        if bo.unit_config != ao.unit_config {
            self.set_unit_config_status(&ao.unit_config)?;
        }
        let (gone, put) = diff_map(&bo.items, &ao.items);
        for (id, ver) in gone {
            self.remove_item(id, ver)?;
        }
        for (_, i) in put {
            self.put_item(i)?;
        }
        for d in bo.blobs.difference(&ao.blobs) {
            self.remove_blob(d)?;
        }
        for d in ao.blobs.difference(&bo.blobs) {
            self.add_blob(d)?;
        }
        if bo.unit_subjects != ao.unit_subjects {
            self.set_unit_subjects(&ao.unit_subjects)?;
        }
        if bo.host_routes != ao.host_routes {
            self.set_host_routes(&ao.host_routes)?;
        }
        let (gone, put) = diff_map(&bo.network_params, &ao.network_params);
        for k in gone {
            self.remove_network_params(k)?;
        }
        for (k, v) in put {
            self.set_network_params(k, v)?;
        }

        let (gone, put) = diff_map(&before.catalogue.images, &after.catalogue.images);
        for k in gone {
            self.remove_catalogue_image(k)?;
        }
        for (_, img) in put {
            self.put_catalogue_image(img)?;
        }

        let (ba, aa) = (&before.allocations, &after.allocations);
        let (gone, put) = diff_map(&ba.instances, &aa.instances);
        for k in gone {
            self.remove_placement(k)?;
        }
        for (_, p) in put {
            self.put_placement(p)?;
        }
        let (gone, put) = diff_map(&ba.gids, &aa.gids);
        for k in gone {
            self.remove_gid(k)?;
        }
        for (k, g) in put {
            self.set_gid(k, *g)?;
        }
        let (gone, put) = diff_map(&ba.networks, &aa.networks);
        for k in gone {
            self.remove_network(k)?;
        }
        for (k, n) in put {
            self.put_network(k, n)?;
        }
        let (gone, put) = diff_map(&ba.instance_ips, &aa.instance_ips);
        for k in gone {
            self.remove_instance_ip(k)?;
        }
        for (k, ip) in put {
            self.put_instance_ip(k, ip)?;
        }
        let (gone, put) = diff_map(&ba.firewall, &aa.firewall);
        for k in gone {
            self.remove_firewall(k)?;
        }
        for (k, r) in put {
            self.set_firewall(k, r)?;
        }

        if before.settings != after.settings {
            self.set_settings(&after.settings)?;
        }
        Ok(())
    }
}
