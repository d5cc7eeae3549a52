//! Instance state files and their synchronisation with the cloud (`stateRequest`, `newState`,
//! `updateState`, `stateAcceptance`).
//!
//! Every instance that has a state quota gets one state file
//! `<stateDir>/<itemID>/<subjectID>/<instance>/state.dat`; the path handed to the SM is relative
//! to `stateDir` (`<itemID>/<subjectID>/<instance>/state.dat`).
//!
//! Flow (cloud protocol §2.8, §8.2):
//! * [`StorageState::setup`] creates the file (empty) if missing. If the file's SHA3-224 differs
//!   from the last *accepted* checksum (new instance, corrupted file, unaccepted local change) a
//!   `stateRequest` (`default: false`) is queued; fetch it with
//!   [`StorageState::take_state_requests`].
//! * [`StorageState::poll_changes`] (called periodically by the daemon) reads every state file; a
//!   content whose checksum differs from the last known one (accepted, written by the cloud or
//!   already sent) becomes a `newState` and its checksum is remembered as pending.
//! * [`StorageState::accept_state`]: `accepted` makes the pending checksum the accepted one;
//!   `rejected` yields a `stateRequest` asking the cloud for the valid state.
//! * [`StorageState::update_state`] verifies the checksum and size, writes the file atomically
//!   and remembers the checksum as accepted.
//!
//! Checksums are lowercase hex SHA3-224 of the raw file content. Accepted and last known
//! checksums plus quotas are persisted in `<stateDir>/.storagestate.json` so that a restart does
//! not resend unchanged state.

use crate::api::cloud::messages::{
    Identity, InstanceIdent, NewState, StateAcceptance, StateRequest, StateResult, UpdateState,
};
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_224};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use tokio::sync::Mutex;

/// Name of an instance's state file.
pub const STATE_FILE_NAME: &str = "state.dat";

/// Largest state content exchanged with the cloud (64 KiB).
pub const MAX_STATE_SIZE: u64 = 64 * 1024;

/// File in `stateDir` that keeps the known checksums across restarts.
pub const CHECKSUMS_FILE_NAME: &str = ".storagestate.json";

const CHECKSUMS_FILE_VERSION: u32 = 1;

/// Identifies one instance: item ID, subject ID and instance index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceKey {
    pub item_id: String,
    pub subject_id: String,
    pub instance: u64,
}

impl InstanceKey {
    pub fn new(item_id: impl Into<String>, subject_id: impl Into<String>, instance: u64) -> Self {
        Self {
            item_id: item_id.into(),
            subject_id: subject_id.into(),
            instance,
        }
    }

    /// Key of a wire `InstanceIdent`: `id`, falling back to `codename`, of item and subject.
    pub fn from_ident(ident: &InstanceIdent) -> Result<Self, StateError> {
        let pick = |identity: &Identity| {
            identity
                .id
                .as_deref()
                .filter(|s| !s.is_empty())
                .or(identity.codename.as_deref())
                .unwrap_or_default()
                .to_owned()
        };
        let key = Self::new(pick(&ident.item), pick(&ident.subject), ident.instance);
        key.validate()?;
        Ok(key)
    }

    /// Wire `InstanceIdent` with `item.id`, `subject.id` and `instance`.
    pub fn to_ident(&self) -> InstanceIdent {
        InstanceIdent {
            item: Identity::with_id(&self.item_id),
            subject: Identity::with_id(&self.subject_id),
            instance: self.instance,
        }
    }

    /// Both IDs must be usable as a single path component.
    fn validate(&self) -> Result<(), StateError> {
        for (what, value) in [("item ID", &self.item_id), ("subject ID", &self.subject_id)] {
            let reason = if value.is_empty() {
                Some("is empty")
            } else if value == "." || value == ".." {
                Some("is a relative path component")
            } else if value.contains(['/', '\\', '\0']) {
                Some("contains a path separator or NUL")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(StateError::InvalidInstance {
                    instance: self.to_string(),
                    reason: format!("{what} {reason}"),
                });
            }
        }
        Ok(())
    }

    /// `<itemID>/<subjectID>/<instance>`, relative to `stateDir`.
    fn relative_dir(&self) -> PathBuf {
        PathBuf::from(&self.item_id)
            .join(&self.subject_id)
            .join(self.instance.to_string())
    }
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.item_id, self.subject_id, self.instance)
    }
}

/// Storage-state errors; each names the instance (or file) and the reason.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("instance {instance}: invalid identity: {reason}")]
    InvalidInstance { instance: String, reason: String },
    #[error("instance {instance}: no state is set up for this instance")]
    NotFound { instance: String },
    #[error(
        "instance {instance}: state checksum mismatch: message says {declared}, content hashes to {computed}"
    )]
    ChecksumMismatch {
        instance: String,
        declared: String,
        computed: String,
    },
    #[error(
        "instance {instance}: acceptance for checksum {acknowledged} but the last known state checksum is {known}"
    )]
    UnknownChecksum {
        instance: String,
        acknowledged: String,
        known: String,
    },
    #[error("instance {instance}: state of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        instance: String,
        size: u64,
        limit: u64,
    },
    #[error("instance {instance}: {action} {}: {source}", path.display())]
    Io {
        instance: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state checksums file {}: {reason}", path.display())]
    Checksums { path: PathBuf, reason: String },
}

/// Counters of [`StorageState::poll_changes`] problems (each distinct content counted once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PollStats {
    /// Local state larger than the instance quota or 64 KiB: not sent.
    pub skipped_too_large: u64,
    /// Local state that is not valid UTF-8: not sent.
    pub skipped_not_utf8: u64,
    /// State file could not be read.
    pub read_errors: u64,
    /// Checksums file could not be written after a change was detected.
    pub persist_errors: u64,
}

/// Lowercase hex SHA3-224 of `data`.
pub fn sha3_224_hex(data: &[u8]) -> String {
    to_hex(&Sha3_224::digest(data))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

fn normalize_checksum(checksum: &str) -> String {
    checksum.trim().to_ascii_lowercase()
}

#[derive(Debug, Clone, Default)]
struct Entry {
    state_quota: u64,
    /// Checksum the cloud accepted or wrote (`updateState`).
    accepted: Option<String>,
    /// Last checksum seen locally: accepted, written, sent as `newState` or requested at setup.
    known: Option<String>,
    /// Checksum of local content already counted as skipped.
    skipped: Option<String>,
    /// Polled and handled; cleared by [`StorageState::cleanup`].
    active: bool,
}

impl Entry {
    fn limit(&self) -> u64 {
        self.state_quota.min(MAX_STATE_SIZE)
    }

    /// The checksum the unit last knew, else the accepted one.
    fn checksum(&self) -> Option<&String> {
        self.known.as_ref().or(self.accepted.as_ref())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChecksumsFile {
    version: u32,
    instances: Vec<ChecksumRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChecksumRecord {
    #[serde(flatten)]
    key: InstanceKey,
    state_quota: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accepted_checksum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    known_checksum: Option<String>,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<InstanceKey, Entry>,
    requests: Vec<StateRequest>,
    stats: PollStats,
}

/// Result of reading a state file: checksum of the whole file and the content when it fits the
/// limit.
struct FileRead {
    checksum: String,
    content: Option<Vec<u8>>,
}

/// Instance state files under `stateDir`.
pub struct StorageState {
    state_dir: PathBuf,
    inner: Mutex<Inner>,
}

impl StorageState {
    /// Opens the state directory (created if missing) and loads the persisted checksums. Every
    /// persisted instance is polled right away, as after a restart the launcher may not set
    /// all of them up again.
    pub async fn new(state_dir: PathBuf) -> Result<Self, StateError> {
        tokio::fs::create_dir_all(&state_dir)
            .await
            .map_err(|source| StateError::Io {
                instance: "-".into(),
                action: "create state directory",
                path: state_dir.clone(),
                source,
            })?;

        let path = state_dir.join(CHECKSUMS_FILE_NAME);
        let mut inner = Inner::default();
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let file: ChecksumsFile =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Checksums {
                        path: path.clone(),
                        reason: format!("malformed: {e}"),
                    })?;
                if file.version != CHECKSUMS_FILE_VERSION {
                    return Err(StateError::Checksums {
                        path,
                        reason: format!("unsupported version {}", file.version),
                    });
                }
                for record in file.instances {
                    if record.key.validate().is_err() || record.state_quota == 0 {
                        continue;
                    }
                    let accepted = record.accepted_checksum.map(|c| normalize_checksum(&c));
                    let known = record
                        .known_checksum
                        .map(|c| normalize_checksum(&c))
                        .or_else(|| accepted.clone());
                    inner.entries.insert(
                        record.key,
                        Entry {
                            state_quota: record.state_quota,
                            accepted,
                            known,
                            skipped: None,
                            active: true,
                        },
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StateError::Checksums {
                    path,
                    reason: format!("read failed: {e}"),
                });
            }
        }

        Ok(Self {
            state_dir,
            inner: Mutex::new(inner),
        })
    }

    /// Absolute path of the instance's state file.
    pub fn state_path(&self, key: &InstanceKey) -> PathBuf {
        self.state_dir
            .join(key.relative_dir())
            .join(STATE_FILE_NAME)
    }

    /// Prepares the instance's state file and returns its path relative to `stateDir`
    /// (`<itemID>/<subjectID>/<instance>/state.dat`) for the SM.
    ///
    /// `state_quota == 0` means no state: the instance's state directory is removed, the
    /// instance forgotten and an empty path returned. Otherwise the file is created empty if
    /// missing; if its checksum differs from the accepted one a `stateRequest` is queued (see
    /// [`Self::take_state_requests`]). Calling it again for the same instance updates the quota.
    pub async fn setup(&self, key: &InstanceKey, state_quota: u64) -> Result<PathBuf, StateError> {
        key.validate()?;
        let mut inner = self.inner.lock().await;
        let dir = self.state_dir.join(key.relative_dir());

        if state_quota == 0 {
            remove_dir_all_if_exists(&dir)
                .await
                .map_err(|source| io_error(key, "remove state directory", &dir, source))?;
            if inner.entries.remove(key).is_some() {
                self.persist(&inner).await?;
            }
            return Ok(PathBuf::new());
        }

        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| io_error(key, "create state directory", &dir, source))?;
        let path = dir.join(STATE_FILE_NAME);
        let path_clone = path.clone();
        blocking(move || create_file_if_missing(&path_clone))
            .await
            .map_err(|source| io_error(key, "create state file", &path, source))?;

        let entry = inner.entries.entry(key.clone()).or_default();
        entry.state_quota = state_quota;
        entry.active = true;
        entry.skipped = None;
        let limit = entry.limit();

        let read = read_state_file(path.clone(), limit)
            .await
            .map_err(|source| io_error(key, "read state file", &path, source))?;
        if entry.accepted.as_deref() != Some(read.checksum.as_str()) {
            // New, corrupted or never accepted content: ask the cloud for the valid state and
            // do not offer the current content as newState.
            entry.known = Some(read.checksum);
            inner.requests.push(StateRequest {
                correlation_id: None,
                ident: key.to_ident(),
                default: false,
            });
        } else {
            entry.known = Some(read.checksum);
        }
        self.persist(&inner).await?;

        Ok(key.relative_dir().join(STATE_FILE_NAME))
    }

    /// `stateRequest`s queued by [`Self::setup`] since the last call.
    pub async fn take_state_requests(&self) -> Vec<StateRequest> {
        std::mem::take(&mut self.inner.lock().await.requests)
    }

    /// Stops handling the instance's state (instance stopped) without removing anything; the
    /// next [`Self::setup`] resumes it.
    pub async fn cleanup(&self, key: &InstanceKey) {
        if let Some(entry) = self.inner.lock().await.entries.get_mut(key) {
            entry.active = false;
        }
    }

    /// Removes the instance's state directory and forgets its checksums (instance removed).
    pub async fn remove(&self, key: &InstanceKey) -> Result<(), StateError> {
        key.validate()?;
        let mut inner = self.inner.lock().await;
        let dir = self.state_dir.join(key.relative_dir());
        remove_dir_all_if_exists(&dir)
            .await
            .map_err(|source| io_error(key, "remove state directory", &dir, source))?;
        // Drop the subject and item directories when they became empty.
        if let Some(subject_dir) = dir.parent()
            && tokio::fs::remove_dir(subject_dir).await.is_ok()
            && let Some(item_dir) = subject_dir.parent()
        {
            let _ = tokio::fs::remove_dir(item_dir).await;
        }
        if inner.entries.remove(key).is_some() {
            self.persist(&inner).await?;
        }
        Ok(())
    }

    /// Applies an `updateState`: the content must hash to `stateChecksum` and fit the instance
    /// quota and 64 KiB; it is written atomically and its checksum becomes the accepted one.
    pub async fn update_state(&self, update: &UpdateState) -> Result<(), StateError> {
        let key = InstanceKey::from_ident(&update.ident)?;
        let mut inner = self.inner.lock().await;
        let entry = active_entry(&mut inner, &key)?;

        let size = update.state.len() as u64;
        let limit = entry.limit();
        if size > limit {
            return Err(StateError::TooLarge {
                instance: key.to_string(),
                size,
                limit,
            });
        }
        let computed = sha3_224_hex(update.state.as_bytes());
        let declared = normalize_checksum(&update.state_checksum);
        if computed != declared {
            return Err(StateError::ChecksumMismatch {
                instance: key.to_string(),
                declared: update.state_checksum.clone(),
                computed,
            });
        }

        let path = self.state_path(&key);
        let (write_path, content) = (path.clone(), update.state.clone().into_bytes());
        // In place, not by rename: the SM bind-mounts this very file into the instance, which
        // must see the new content (upstream writes in place too).
        blocking(move || write_in_place(&write_path, &content))
            .await
            .map_err(|source| io_error(&key, "write state file", &path, source))?;

        entry.accepted = Some(computed.clone());
        entry.known = Some(computed);
        entry.skipped = None;
        self.persist(&inner).await
    }

    /// Handles a `stateAcceptance` (its `checksum` must be the last sent one). `accepted`
    /// makes it the accepted checksum and returns `None`; `rejected` returns the
    /// `stateRequest` (`default: false`) to send so the cloud pushes the valid state.
    pub async fn accept_state(
        &self,
        acceptance: &StateAcceptance,
    ) -> Result<Option<StateRequest>, StateError> {
        let key = InstanceKey::from_ident(&acceptance.ident)?;
        let mut inner = self.inner.lock().await;
        let entry = active_entry(&mut inner, &key)?;

        let acknowledged = normalize_checksum(&acceptance.checksum);
        if entry.known.as_deref() != Some(acknowledged.as_str()) {
            return Err(StateError::UnknownChecksum {
                instance: key.to_string(),
                acknowledged: acceptance.checksum.clone(),
                known: entry.known.clone().unwrap_or_else(|| "none".into()),
            });
        }

        match acceptance.result {
            StateResult::Accepted => {
                if entry.accepted.as_deref() == Some(acknowledged.as_str()) {
                    return Ok(None);
                }
                entry.accepted = Some(acknowledged);
                self.persist(&inner).await?;
                Ok(None)
            }
            StateResult::Rejected => Ok(Some(StateRequest {
                correlation_id: None,
                ident: acceptance.ident.clone(),
                default: false,
            })),
        }
    }

    /// Reads every active instance's state file and returns a `newState` for each one whose
    /// checksum differs from the last known one; that checksum becomes the pending one.
    /// Content over the limit or not UTF-8 is skipped and counted in [`Self::stats`].
    pub async fn poll_changes(&self) -> Vec<NewState> {
        let mut inner = self.inner.lock().await;
        let Inner { entries, stats, .. } = &mut *inner;
        let mut changes = Vec::new();

        for (key, entry) in entries.iter_mut().filter(|(_, e)| e.active) {
            let path = self.state_path(key);
            let Ok(read) = read_state_file(path, entry.limit()).await else {
                stats.read_errors += 1;
                continue;
            };
            if entry.known.as_deref() == Some(read.checksum.as_str())
                || entry.skipped.as_deref() == Some(read.checksum.as_str())
            {
                continue;
            }
            let Some(content) = read.content else {
                stats.skipped_too_large += 1;
                entry.skipped = Some(read.checksum);
                continue;
            };
            let Ok(state) = String::from_utf8(content) else {
                stats.skipped_not_utf8 += 1;
                entry.skipped = Some(read.checksum);
                continue;
            };
            entry.known = Some(read.checksum.clone());
            entry.skipped = None;
            changes.push(NewState {
                correlation_id: None,
                ident: key.to_ident(),
                state_checksum: read.checksum,
                state,
            });
        }

        if !changes.is_empty() && self.persist(&inner).await.is_err() {
            inner.stats.persist_errors += 1;
        }
        changes
    }

    /// Checksum of the instance's state for `unitStatus.instances[].stateChecksum`: the last
    /// known one (accepted, written by the cloud or sent and pending), `None` when unknown.
    pub async fn checksum(&self, key: &InstanceKey) -> Option<String> {
        let inner = self.inner.lock().await;
        inner.entries.get(key)?.checksum().cloned()
    }

    /// [`StorageState::checksum`] of every instance that has one, read at once.
    pub async fn checksums(&self) -> BTreeMap<InstanceKey, String> {
        let inner = self.inner.lock().await;
        inner
            .entries
            .iter()
            .filter_map(|(key, entry)| Some((key.clone(), entry.checksum()?.clone())))
            .collect()
    }

    /// Accepted checksum of the instance, `None` when the cloud never accepted or wrote one.
    pub async fn accepted_checksum(&self, key: &InstanceKey) -> Option<String> {
        let inner = self.inner.lock().await;
        inner.entries.get(key)?.accepted.clone()
    }

    /// Counters of skipped or failed polls since start.
    pub async fn stats(&self) -> PollStats {
        self.inner.lock().await.stats
    }

    async fn persist(&self, inner: &Inner) -> Result<(), StateError> {
        let file = ChecksumsFile {
            version: CHECKSUMS_FILE_VERSION,
            instances: inner
                .entries
                .iter()
                .map(|(key, entry)| ChecksumRecord {
                    key: key.clone(),
                    state_quota: entry.state_quota,
                    accepted_checksum: entry.accepted.clone(),
                    known_checksum: entry.known.clone(),
                })
                .collect(),
        };
        let path = self.state_dir.join(CHECKSUMS_FILE_NAME);
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StateError::Checksums {
            path: path.clone(),
            reason: format!("encode failed: {e}"),
        })?;
        let write_path = path.clone();
        blocking(move || write_atomic(&write_path, &bytes))
            .await
            .map_err(|e| StateError::Checksums {
                path,
                reason: format!("write failed: {e}"),
            })
    }
}

fn active_entry<'a>(inner: &'a mut Inner, key: &InstanceKey) -> Result<&'a mut Entry, StateError> {
    inner
        .entries
        .get_mut(key)
        .filter(|e| e.active)
        .ok_or_else(|| StateError::NotFound {
            instance: key.to_string(),
        })
}

fn io_error(key: &InstanceKey, action: &'static str, path: &Path, source: io::Error) -> StateError {
    StateError::Io {
        instance: key.to_string(),
        action,
        path: path.to_owned(),
        source,
    }
}

/// Runs blocking file I/O on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

async fn remove_dir_all_if_exists(dir: &Path) -> io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Hashes the whole file in chunks and keeps the content only when it fits `limit`.
async fn read_state_file(path: PathBuf, limit: u64) -> io::Result<FileRead> {
    blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha3_224::new();
        let mut content = Vec::new();
        let mut size = 0u64;
        let mut buf = [0u8; 8192];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let chunk = &buf[..n];
            hasher.update(chunk);
            size += n as u64;
            if size <= limit {
                content.extend_from_slice(chunk);
            }
        }
        Ok(FileRead {
            checksum: to_hex(&hasher.finalize()),
            content: (size <= limit).then_some(content),
        })
    })
    .await
}

fn owner_only_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

fn create_file_if_missing(path: &Path) -> io::Result<()> {
    match owner_only_options().create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `<path>.tmp`, syncs it and renames it over `path`, then syncs the directory.
/// Truncates and rewrites the file itself (its inode stays), then syncs it.
fn write_in_place(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut file = owner_only_options()
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = owner_only_options()
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    if let Some(dir) = path.parent() {
        // Best effort: make the rename durable.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HELLO_SHA3_224: &str = "b87f88c72702fff1748e58b87e9141a42c0dbedc29a78cb0d4a5cd81";
    const EMPTY_SHA3_224: &str = "6b4e03423667dbb73b6e15454f0eb1abd4597f9a1b078e3f5b5a6bc7";

    fn key() -> InstanceKey {
        InstanceKey::new("svc1", "subj1", 1)
    }

    fn update(key: &InstanceKey, state: &str, checksum: &str) -> UpdateState {
        UpdateState {
            correlation_id: None,
            ident: key.to_ident(),
            state_checksum: checksum.into(),
            state: state.into(),
        }
    }

    fn acceptance(key: &InstanceKey, checksum: &str, result: StateResult) -> StateAcceptance {
        StateAcceptance {
            correlation_id: None,
            ident: key.to_ident(),
            checksum: checksum.into(),
            result,
            reason: String::new(),
        }
    }

    async fn setup_store(dir: &Path) -> StorageState {
        let store = StorageState::new(dir.to_path_buf()).await.unwrap();
        store.setup(&key(), 1024).await.unwrap();
        store.take_state_requests().await;
        store
    }

    #[test]
    fn checksum_of_known_content() {
        // Values computed independently with Python's hashlib.sha3_224.
        assert_eq!(sha3_224_hex(b"hello"), HELLO_SHA3_224);
        assert_eq!(sha3_224_hex(b""), EMPTY_SHA3_224);
    }

    #[tokio::test]
    async fn setup_creates_file_and_requests_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StorageState::new(dir.path().to_path_buf()).await.unwrap();

        let rel = store.setup(&key(), 1024).await.unwrap();
        assert_eq!(rel, PathBuf::from("svc1/subj1/1/state.dat"));
        let abs = dir.path().join(&rel);
        assert_eq!(store.state_path(&key()), abs);
        assert_eq!(std::fs::read(&abs).unwrap(), b"");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&abs).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // New instance without an accepted state: ask the cloud, don't offer the empty file.
        let requests = store.take_state_requests().await;
        assert_eq!(requests.len(), 1);
        assert_eq!(
            serde_json::to_value(&requests[0]).unwrap(),
            json!({"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 1,
                   "default": false})
        );
        assert!(store.take_state_requests().await.is_empty());
        assert!(store.poll_changes().await.is_empty());
        assert_eq!(
            store.checksum(&key()).await.as_deref(),
            Some(EMPTY_SHA3_224)
        );
        assert_eq!(store.accepted_checksum(&key()).await, None);
    }

    #[tokio::test]
    async fn update_then_poll_yields_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;

        store
            .update_state(&update(&key(), "hello", HELLO_SHA3_224))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(store.state_path(&key())).unwrap(),
            "hello"
        );
        assert!(store.poll_changes().await.is_empty());
        assert_eq!(
            store.checksum(&key()).await.as_deref(),
            Some(HELLO_SHA3_224)
        );
        assert_eq!(
            store.accepted_checksum(&key()).await.as_deref(),
            Some(HELLO_SHA3_224)
        );
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("svc1/subj1/1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.dat")]);
    }

    #[tokio::test]
    async fn update_accepts_uppercase_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        store
            .update_state(&update(&key(), "hello", &HELLO_SHA3_224.to_uppercase()))
            .await
            .unwrap();
        assert_eq!(
            store.checksum(&key()).await.as_deref(),
            Some(HELLO_SHA3_224)
        );
    }

    #[tokio::test]
    async fn local_change_yields_one_new_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;

        std::fs::write(store.state_path(&key()), "hello").unwrap();
        let changes = store.poll_changes().await;
        assert_eq!(changes.len(), 1);
        assert_eq!(
            serde_json::to_value(&changes[0]).unwrap(),
            json!({"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 1,
                   "stateChecksum": HELLO_SHA3_224, "state": "hello"})
        );
        // Sent once only; pending until accepted.
        assert!(store.poll_changes().await.is_empty());
        assert_eq!(
            store.checksum(&key()).await.as_deref(),
            Some(HELLO_SHA3_224)
        );
        assert_eq!(store.accepted_checksum(&key()).await, None);

        let result = store
            .accept_state(&acceptance(&key(), HELLO_SHA3_224, StateResult::Accepted))
            .await
            .unwrap();
        assert_eq!(result, None);
        assert_eq!(
            store.accepted_checksum(&key()).await.as_deref(),
            Some(HELLO_SHA3_224)
        );
    }

    #[tokio::test]
    async fn rejected_acceptance_yields_state_request() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        std::fs::write(store.state_path(&key()), "hello").unwrap();
        assert_eq!(store.poll_changes().await.len(), 1);

        let request = store
            .accept_state(&acceptance(&key(), HELLO_SHA3_224, StateResult::Rejected))
            .await
            .unwrap()
            .expect("state request");
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            json!({"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 1,
                   "default": false})
        );
        assert_eq!(store.accepted_checksum(&key()).await, None);
    }

    #[tokio::test]
    async fn acceptance_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        std::fs::write(store.state_path(&key()), "hello").unwrap();
        assert_eq!(store.poll_changes().await.len(), 1);

        let other = InstanceKey::new("svc2", "subj1", 0);
        let err = store
            .accept_state(&acceptance(&other, HELLO_SHA3_224, StateResult::Accepted))
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::NotFound { .. }));
        assert!(err.to_string().contains("svc2/subj1/0"), "{err}");

        let err = store
            .accept_state(&acceptance(&key(), EMPTY_SHA3_224, StateResult::Rejected))
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::UnknownChecksum { .. }));
        assert!(err.to_string().contains("svc1/subj1/1"), "{err}");
    }

    #[tokio::test]
    async fn checksum_mismatch_on_update_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        std::fs::write(store.state_path(&key()), "old").unwrap();

        let err = store
            .update_state(&update(&key(), "hello", EMPTY_SHA3_224))
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::ChecksumMismatch { .. }));
        let text = err.to_string();
        assert!(text.contains("svc1/subj1/1"), "{text}");
        assert!(text.contains("checksum mismatch"), "{text}");
        // File untouched.
        assert_eq!(
            std::fs::read_to_string(store.state_path(&key())).unwrap(),
            "old"
        );
    }

    #[tokio::test]
    async fn update_for_unknown_instance_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        let other = InstanceKey::new("svc1", "subj1", 7);
        let err = store
            .update_state(&update(&other, "hello", HELLO_SHA3_224))
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::NotFound { .. }));
        assert!(err.to_string().contains("svc1/subj1/7"), "{err}");
    }

    #[tokio::test]
    async fn over_limit_content_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StorageState::new(dir.path().to_path_buf()).await.unwrap();
        let small = InstanceKey::new("svc1", "subj1", 1);
        let big = InstanceKey::new("svc1", "subj1", 2);
        store.setup(&small, 4).await.unwrap();
        store.setup(&big, 1 << 20).await.unwrap();

        // Over the instance quota.
        let err = store
            .update_state(&update(&small, "hello", HELLO_SHA3_224))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StateError::TooLarge {
                    size: 5,
                    limit: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("svc1/subj1/1"), "{err}");

        // Over 64 KiB although the quota is larger.
        let content = "x".repeat(MAX_STATE_SIZE as usize + 1);
        let err = store
            .update_state(&update(&big, &content, &sha3_224_hex(content.as_bytes())))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StateError::TooLarge {
                    limit: MAX_STATE_SIZE,
                    ..
                }
            ),
            "{err}"
        );

        // Exactly 64 KiB is fine.
        let content = "x".repeat(MAX_STATE_SIZE as usize);
        store
            .update_state(&update(&big, &content, &sha3_224_hex(content.as_bytes())))
            .await
            .unwrap();

        // Local content over the limit is not sent, and counted once.
        std::fs::write(store.state_path(&small), "hello").unwrap();
        assert!(store.poll_changes().await.is_empty());
        assert!(store.poll_changes().await.is_empty());
        assert_eq!(store.stats().await.skipped_too_large, 1);

        // Back within the limit: sent.
        std::fs::write(store.state_path(&small), "ok").unwrap();
        let changes = store.poll_changes().await;
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].state, "ok");
    }

    #[tokio::test]
    async fn non_utf8_local_content_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        std::fs::write(store.state_path(&key()), [0xff, 0xfe, 0x00]).unwrap();
        assert!(store.poll_changes().await.is_empty());
        assert!(store.poll_changes().await.is_empty());
        assert_eq!(store.stats().await.skipped_not_utf8, 1);
    }

    #[tokio::test]
    async fn restart_does_not_resend() {
        let dir = tempfile::tempdir().unwrap();
        let second = InstanceKey::new("svc2", "subj1", 0);
        {
            let store = setup_store(dir.path()).await;
            store.setup(&second, 1024).await.unwrap();
            store
                .update_state(&update(&key(), "hello", HELLO_SHA3_224))
                .await
                .unwrap();
            std::fs::write(store.state_path(&second), "local").unwrap();
            assert_eq!(store.poll_changes().await.len(), 1);
        }

        let store = StorageState::new(dir.path().to_path_buf()).await.unwrap();
        // Polled right after the restart, before any setup: nothing new.
        assert!(store.poll_changes().await.is_empty());
        assert_eq!(
            store.accepted_checksum(&key()).await.as_deref(),
            Some(HELLO_SHA3_224)
        );
        assert_eq!(store.checksum(&second).await, Some(sha3_224_hex(b"local")));

        // Setting the accepted instance up again requests nothing either.
        store.setup(&key(), 1024).await.unwrap();
        assert!(store.take_state_requests().await.is_empty());
        assert!(store.poll_changes().await.is_empty());

        // A change after the restart is still detected.
        std::fs::write(store.state_path(&key()), "changed").unwrap();
        assert_eq!(store.poll_changes().await.len(), 1);
    }

    #[tokio::test]
    async fn setup_requests_state_when_file_corrupted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = setup_store(dir.path()).await;
            store
                .update_state(&update(&key(), "hello", HELLO_SHA3_224))
                .await
                .unwrap();
        }
        std::fs::write(dir.path().join("svc1/subj1/1/state.dat"), "garbage").unwrap();

        let store = StorageState::new(dir.path().to_path_buf()).await.unwrap();
        store.setup(&key(), 1024).await.unwrap();
        assert_eq!(store.take_state_requests().await.len(), 1);
        // The corrupted content is not offered as newState.
        assert!(store.poll_changes().await.is_empty());
    }

    #[tokio::test]
    async fn remove_and_zero_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        store.remove(&key()).await.unwrap();
        assert!(!dir.path().join("svc1").exists());
        assert_eq!(store.checksum(&key()).await, None);
        let err = store
            .update_state(&update(&key(), "hello", HELLO_SHA3_224))
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::NotFound { .. }));
        // Removing twice is fine.
        store.remove(&key()).await.unwrap();

        store.setup(&key(), 1024).await.unwrap();
        assert!(store.state_path(&key()).exists());
        let rel = store.setup(&key(), 0).await.unwrap();
        assert_eq!(rel, PathBuf::new());
        assert!(!dir.path().join("svc1/subj1/1").exists());
        assert_eq!(store.checksum(&key()).await, None);
    }

    #[tokio::test]
    async fn cleanup_stops_polling() {
        let dir = tempfile::tempdir().unwrap();
        let store = setup_store(dir.path()).await;
        store.cleanup(&key()).await;
        std::fs::write(store.state_path(&key()), "hello").unwrap();
        assert!(store.poll_changes().await.is_empty());
        store.setup(&key(), 1024).await.unwrap();
        // Unaccepted local content found at setup: ask the cloud instead of sending it.
        assert_eq!(store.take_state_requests().await.len(), 1);
        assert!(store.poll_changes().await.is_empty());
    }

    #[tokio::test]
    async fn invalid_identity_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StorageState::new(dir.path().to_path_buf()).await.unwrap();
        for bad in [
            InstanceKey::new("..", "subj", 0),
            InstanceKey::new("a/b", "subj", 0),
            InstanceKey::new("svc", "", 0),
        ] {
            let err = store.setup(&bad, 1024).await.unwrap_err();
            assert!(matches!(err, StateError::InvalidInstance { .. }), "{err}");
        }
        let mut ident = key().to_ident();
        ident.item = Identity::default();
        let err = store
            .update_state(&UpdateState {
                ident,
                ..UpdateState::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::InvalidInstance { .. }), "{err}");
    }

    #[tokio::test]
    async fn corrupt_checksums_file_is_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHECKSUMS_FILE_NAME), "{not json").unwrap();
        let err = StorageState::new(dir.path().to_path_buf())
            .await
            .err()
            .expect("error");
        assert!(err.to_string().contains(CHECKSUMS_FILE_NAME), "{err}");
    }
}
