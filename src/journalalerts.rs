//! The journal alerts task of the main node (issue 8): [`run_journal_alerts`] follows the
//! systemd journal with a [`JournalReader`] and hands each alert, as a v7
//! [`AlertItem`], to the cloud agent's alert path.
//!
//! The store backs the reader's two dependencies:
//!
//! * [`StoreCursor`] keeps the journal cursor in the store's `journal_cursor` table. The reader
//!   saves it every `ReaderSettings::cursor_save_period` (10 s) and at shutdown; the commit
//!   itself runs on a blocking thread, so the reader never waits on an fsync, and
//!   [`run_journal_alerts`] waits for the last one before it returns. After a clean stop a new
//!   task resumes right after the last entry handled (no duplicate, no gap); after a crash,
//!   the entries handled since the last periodic save are read again (at-least-once).
//! * [`StoreInstanceLookup`] maps the instance ID in a unit name
//!   (`aos-service@<instance-id>.service`) to the instance. The CM does not store the SM's
//!   instance IDs: the SM derives them from the instance ident, so the lookup derives them the
//!   same way for every instance the store knows (reported by the SMs first, then placed by
//!   the CM) — see [`sm_instance_id`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};

use crate::api::cloud::messages::AlertItem;
use crate::api::journal::{
    CursorStore, InstanceInfo, InstanceLookup, JournalAlertsConfig, JournalConfigError,
    JournalReader, JournalSource, JournalStatsSnapshot, JournalctlSource, ReaderSettings,
};
use crate::model::InstanceIdent;
use crate::store::Store;

/// Capacity of the channel between the reader and the forwarder; the reader never waits on
/// it (an alert that finds it full is dropped and counted in `dropped_full`).
pub const DEFAULT_CHANNEL_CAPACITY: usize = 64;

/// What [`run_journal_alerts`] runs with.
#[derive(Clone)]
pub struct JournalAlertsSettings {
    /// `alerts.journalAlerts` of the config file.
    pub config: JournalAlertsConfig,
    /// The main node's ID: `node.codename` of system and core alerts.
    pub node_id: String,
    /// Where journal entries come from; `journalctl` by default.
    pub source: Arc<dyn JournalSource + Send + Sync>,
    /// Reader tuning (cursor save period, restart backoff, duplicate suppression).
    pub reader: ReaderSettings,
    /// See [`DEFAULT_CHANNEL_CAPACITY`].
    pub channel_capacity: usize,
}

impl JournalAlertsSettings {
    /// Production settings: `journalctl` from `PATH`, default reader tuning.
    pub fn new(config: JournalAlertsConfig, node_id: impl Into<String>) -> Self {
        let source = JournalctlSource::new(config.system_alert_priority);
        Self {
            config,
            node_id: node_id.into(),
            source: Arc::new(source),
            reader: ReaderSettings::default(),
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
        }
    }

    /// Reads entries from another source (tests, wrappers around journalctl).
    pub fn with_source(mut self, source: impl JournalSource + Send + Sync + 'static) -> Self {
        self.source = Arc::new(source);
        self
    }

    pub fn with_reader_settings(mut self, reader: ReaderSettings) -> Self {
        self.reader = reader;
        self
    }
}

/// What a finished [`run_journal_alerts`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalAlertsReport {
    /// The reader's counters.
    pub reader: JournalStatsSnapshot,
    /// Alerts put into the sink.
    pub forwarded: u64,
    /// Alerts that did not convert to an [`AlertItem`] (a bug: [`classify`] writes v7 JSON).
    ///
    /// [`classify`]: crate::api::journal::classify
    pub unconvertible: u64,
    /// Alerts still queued at stop that the full sink could not take.
    pub dropped_at_stop: u64,
}

/// Follows the journal and sends its alerts into `sink` until `stop` becomes true (or its
/// sender is dropped), or until `sink` is closed. Returns when the reader has stopped and its
/// last cursor is committed to the store. The only error is a config the reader cannot use
/// (an invalid filter regex; `Config::load` already refuses those).
///
/// A full sink slows the forwarder, not the reader: alerts then queue in a bounded channel
/// and are dropped (and counted) when it is full too; the alert path collapses storms anyway.
pub async fn run_journal_alerts(
    settings: JournalAlertsSettings,
    store: Arc<Store>,
    sink: mpsc::Sender<AlertItem>,
    stop: watch::Receiver<bool>,
) -> Result<JournalAlertsReport, JournalConfigError> {
    let compiled = settings.config.compile_for_node(settings.node_id)?;
    let cursor = StoreCursor::new(Arc::clone(&store));
    let lookup = StoreInstanceLookup::new(store);
    let (tx, mut rx) = mpsc::channel(settings.channel_capacity.max(1));
    let reader = JournalReader::new(settings.source, cursor.clone(), lookup, compiled, tx)
        .with_settings(settings.reader);

    let mut reader_stop = stop.clone();
    let sink_gone = sink.clone();
    let shutdown = async move {
        tokio::select! {
            () = stopped(&mut reader_stop) => {}
            // Otherwise the reader would only notice at its next alert.
            () = sink_gone.closed() => tracing::info!("alert sink closed, journal alerts stop"),
        }
    };

    let mut forward_stop = stop;
    let forward = async move {
        let mut report = JournalAlertsReport::default();
        // Ends when the reader has stopped (it owns the only sender) and the queue is empty.
        while let Some(value) = rx.recv().await {
            let item = match serde_json::from_value::<AlertItem>(value) {
                Ok(item) => item,
                Err(err) => {
                    report.unconvertible += 1;
                    tracing::warn!("journal alert does not convert to a v7 alert: {err}");
                    continue;
                }
            };
            let sent = tokio::select! {
                biased;
                sent = sink.send(item.clone()) => sent.is_ok(),
                () = stopped(&mut forward_stop) => match sink.try_send(item) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        report.dropped_at_stop += 1;
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                },
            };
            if !sent {
                // Nobody takes alerts any more; dropping `rx` stops the reader too.
                tracing::info!("alert sink closed, journal alerts stop");
                break;
            }
            report.forwarded += 1;
        }
        report
    };

    let (stats, mut report) = tokio::join!(reader.run(shutdown), forward);
    report.reader = stats;
    cursor.flush().await;
    Ok(report)
}

/// Completes once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped: nobody can ask to keep running any more.
    let _ = stop.wait_for(|stop| *stop).await;
}

// ---------------------------------------------------------------------------------------------
// Cursor
// ---------------------------------------------------------------------------------------------

/// The journal cursor in the store (table `journal_cursor`, never announced to subscribers).
///
/// [`CursorStore::save`] only records the cursor and leaves the commit to a blocking thread;
/// commits are serialised and each takes the newest cursor recorded, so an older cursor never
/// overwrites a newer one. [`StoreCursor::flush`] waits until everything recorded is
/// committed. [`CursorStore::load`] reads the store directly (one read transaction, once per
/// reader start).
#[derive(Clone)]
pub struct StoreCursor {
    inner: Arc<CursorInner>,
}

struct CursorInner {
    store: Arc<Store>,
    /// The newest cursor not committed yet.
    pending: Mutex<Option<String>>,
    /// Held across a commit, so that commits happen one at a time and in order.
    writing: Mutex<()>,
    failures: AtomicU64,
}

impl StoreCursor {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            inner: Arc::new(CursorInner {
                store,
                pending: Mutex::new(None),
                writing: Mutex::new(()),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// Commits the cursor recorded last, if it is not committed yet, and waits for it (and for
    /// a commit already in progress).
    pub async fn flush(&self) {
        let inner = Arc::clone(&self.inner);
        if tokio::task::spawn_blocking(move || inner.commit_pending())
            .await
            .is_err()
        {
            tracing::warn!("journal cursor commit panicked");
        }
    }

    /// Failed commits so far (each is logged; the cursor is kept for the next attempt).
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }
}

impl CursorInner {
    fn commit_pending(&self) {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(cursor) = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        if let Err(err) = self.store.write(|tx| tx.set_journal_cursor(&cursor)) {
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(failures = n, "can't save the journal cursor: {err}");
            // Kept for the next save or flush, unless a newer one came meanwhile.
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(cursor);
        }
    }
}

impl CursorStore for StoreCursor {
    fn load(&self) -> Option<String> {
        match self.inner.store.journal_cursor() {
            Ok(cursor) => cursor,
            Err(err) => {
                tracing::warn!("can't read the saved journal cursor, starting at the end: {err}");
                None
            }
        }
    }

    fn save(&self, cursor: &str) {
        *self
            .inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(cursor.to_owned());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let inner = Arc::clone(&self.inner);
                runtime.spawn_blocking(move || inner.commit_pending());
            }
            Err(_) => self.inner.commit_pending(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instance lookup
// ---------------------------------------------------------------------------------------------

/// Finds the instance of an `aos-service@<instance-id>.service` unit among the instances the
/// store knows: those the SMs report (their version and `preinstalled` flag win), then those
/// the CM placed (not reported yet, or not any more).
#[derive(Clone)]
pub struct StoreInstanceLookup {
    store: Arc<Store>,
}

impl StoreInstanceLookup {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

impl InstanceLookup for StoreInstanceLookup {
    fn lookup(&self, instance_id: &str) -> Option<InstanceInfo> {
        let info = |ident: &InstanceIdent, version: &str, preinstalled: bool| InstanceInfo {
            item_id: ident.item_id.clone(),
            subject_id: ident.subject_id.clone(),
            instance: ident.instance,
            version: version.to_owned(),
            preinstalled,
        };
        // The tables are read one by one, so that an unreadable record in one does not hide
        // the other.
        match self.store.read(|r| r.reported_instances()) {
            Ok(reported) => {
                if let Some(found) = reported
                    .values()
                    .find(|r| is_instance_id(instance_id, &r.ident))
                {
                    return Some(info(&found.ident, &found.version, found.preinstalled));
                }
            }
            Err(err) => tracing::warn!("journal alerts: can't read reported instances: {err}"),
        }
        match self.store.read(|r| r.placements()) {
            Ok(placements) => placements
                .values()
                .find(|p| is_instance_id(instance_id, &p.ident))
                .map(|p| info(&p.ident, &p.version, false)),
            Err(err) => {
                tracing::warn!("journal alerts: can't read placements: {err}");
                None
            }
        }
    }
}

/// True when `id` is the ID an SM runs `ident` under, in either form of [`sm_instance_id`].
pub fn is_instance_id(id: &str, ident: &InstanceIdent) -> bool {
    id.eq_ignore_ascii_case(&sm_instance_id(ident)) || id == legacy_sm_instance_id(ident)
}

fn ident_name(ident: &InstanceIdent) -> String {
    format!("{}:{}:{}", ident.item_id, ident.subject_id, ident.instance)
}

/// The instance ID the AosEdge SM runs an instance under, and so the `<instance-id>` of its
/// `aos-service@<instance-id>.service` unit: the name-based (version 3, MD5) UUID of
/// `<itemID>:<subjectID>:<instance>` in the OID namespace, lowercase (the SM's
/// `GenerateInstanceID`, Poco's `createFromName(UUID::oid(), name)`). The SM keeps no table of
/// IDs, so the CM needs none either.
pub fn sm_instance_id(ident: &InstanceIdent) -> String {
    let mut input = uuid::Uuid::NAMESPACE_OID.as_bytes().to_vec();
    input.extend_from_slice(ident_name(ident).as_bytes());
    uuid::Builder::from_md5_bytes(md5(&input))
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// The instance ID of earlier SM releases: the lowercase hex SHA-256 of the same
/// `<itemID>:<subjectID>:<instance>`. Still recognised, so that a unit whose SM is not updated
/// yet gets instance alerts too.
pub fn legacy_sm_instance_id(ident: &InstanceIdent) -> String {
    Sha256::digest(ident_name(ident).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// MD5 (RFC 1321), only for name-based UUIDs: there is no MD5 crate in the dependency tree,
/// and this is not used for anything where its weakness matters.
fn md5(input: &[u8]) -> [u8; 16] {
    const SHIFTS: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    const K: [u32; 64] = [
        0xd76a_a478,
        0xe8c7_b756,
        0x2420_70db,
        0xc1bd_ceee,
        0xf57c_0faf,
        0x4787_c62a,
        0xa830_4613,
        0xfd46_9501,
        0x6980_98d8,
        0x8b44_f7af,
        0xffff_5bb1,
        0x895c_d7be,
        0x6b90_1122,
        0xfd98_7193,
        0xa679_438e,
        0x49b4_0821,
        0xf61e_2562,
        0xc040_b340,
        0x265e_5a51,
        0xe9b6_c7aa,
        0xd62f_105d,
        0x0244_1453,
        0xd8a1_e681,
        0xe7d3_fbc8,
        0x21e1_cde6,
        0xc337_07d6,
        0xf4d5_0d87,
        0x455a_14ed,
        0xa9e3_e905,
        0xfcef_a3f8,
        0x676f_02d9,
        0x8d2a_4c8a,
        0xfffa_3942,
        0x8771_f681,
        0x6d9d_6122,
        0xfde5_380c,
        0xa4be_ea44,
        0x4bde_cfa9,
        0xf6bb_4b60,
        0xbebf_bc70,
        0x289b_7ec6,
        0xeaa1_27fa,
        0xd4ef_3085,
        0x0488_1d05,
        0xd9d4_d039,
        0xe6db_99e5,
        0x1fa2_7cf8,
        0xc4ac_5665,
        0xf429_2244,
        0x432a_ff97,
        0xab94_23a7,
        0xfc93_a039,
        0x655b_59c3,
        0x8f0c_cc92,
        0xffef_f47d,
        0x8584_5dd1,
        0x6fa8_7e4f,
        0xfe2c_e6e0,
        0xa301_4314,
        0x4e08_11a1,
        0xf753_7e82,
        0xbd3a_f235,
        0x2ad7_d2bb,
        0xeb86_d391,
    ];
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut message = input.to_vec();
    let bit_len = (input.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_le_bytes());
    for block in message.chunks_exact(64) {
        let mut words = [0u32; 16];
        for (word, bytes) in words.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(K[i]).wrapping_add(words[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(SHIFTS[i]));
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }
    let mut out = [0u8; 16];
    for (chunk, s) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&s.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests;
