//! Journal alerts on the main node.
//!
//! The CM on the main node turns selected systemd journal entries into v7 cloud alerts
//! (`systemAlert`, `coreAlert`, `updateItemInstanceAlert`), as the Go v6 CM and the C++ SM do.
//!
//! * [`classify`] is the pure part: one entry in journalctl's JSON export form in, one v7 alert
//!   object (or nothing) out. Selection follows upstream: any entry with `PRIORITY` <=
//!   `systemAlertPriority`, and the manager's own messages about units (`_SYSTEMD_UNIT=init.scope`)
//!   with `PRIORITY` <= `serviceAlertPriority`; for those the unit is the entry's `UNIT` field.
//!   An init.scope entry is judged by `serviceAlertPriority` alone, as upstream does.
//! * [`JournalReader`] runs a [`JournalSource`] (normally [`JournalctlSource`]: `journalctl
//!   --follow --output=json` as a child process, no libsystemd), parses each stdout line,
//!   classifies it, collapses repeated alerts, and hands alerts to a bounded channel without
//!   ever waiting on it. A source that ends or fails is restarted with exponential backoff
//!   (backon, with jitter) after the last cursor seen, and the cursor is persisted through a
//!   [`CursorStore`] periodically and at shutdown, so a restarted CM resumes after the last
//!   entry it handled.
//!
//! Start position: after the saved cursor when there is one; otherwise at the current tail of
//! the journal (`--lines=0`), like upstream, so a fresh unit does not replay its whole history as
//! alerts. Delivery is at-least-once across crashes: entries handled after the last periodic
//! save are read again after a crash (the CM's alert cache drops such duplicates); a clean
//! shutdown saves the exact position, so nothing is sent twice and nothing is skipped.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use regex::Regex;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader, ReadBuf};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

/// Default `alerts.journalAlerts.serviceAlertPriority` (warning).
pub const DEFAULT_SERVICE_ALERT_PRIORITY: u8 = 4;
/// Default `alerts.journalAlerts.systemAlertPriority` (error).
pub const DEFAULT_SYSTEM_ALERT_PRIORITY: u8 = 3;
/// Highest syslog priority (debug).
pub const MAX_PRIORITY: u8 = 7;

/// v7 alert tag of a system alert.
pub const TAG_SYSTEM_ALERT: &str = "systemAlert";
/// v7 alert tag of a core component alert.
pub const TAG_CORE_ALERT: &str = "coreAlert";
/// v7 alert tag of an update item instance alert.
pub const TAG_INSTANCE_ALERT: &str = "updateItemInstanceAlert";

const CONFIG_PATH: &str = "alerts.journalAlerts";
const INIT_SCOPE: &str = "init.scope";
const INSTANCE_UNIT_PREFIX: &str = "aos-service@";
const SERVICE_SUFFIX: &str = ".service";

/// Core component units, long and short names; the value is the v7 `coreComponent` string.
const CORE_COMPONENTS: &[(&str, &str)] = &[
    ("aos-communicationmanager.service", "CM"),
    ("aos-servicemanager.service", "SM"),
    ("aos-iamanager.service", "IAM"),
    ("aos-messageproxy.service", "MP"),
    ("aos-cm.service", "CM"),
    ("aos-sm.service", "SM"),
    ("aos-iam.service", "IAM"),
    ("aos-mp.service", "MP"),
];

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `alerts.journalAlerts` of the config file (Go v6 keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalAlertsConfig {
    /// Regexes over MESSAGE; a system alert whose message matches any of them is not sent.
    pub filter: Vec<String>,
    /// Highest priority of init.scope messages about units that raise alerts (default 4).
    pub service_alert_priority: u8,
    /// Highest priority of any entry that raises an alert (default 3).
    pub system_alert_priority: u8,
}

impl Default for JournalAlertsConfig {
    fn default() -> Self {
        Self {
            filter: Vec::new(),
            service_alert_priority: DEFAULT_SERVICE_ALERT_PRIORITY,
            system_alert_priority: DEFAULT_SYSTEM_ALERT_PRIORITY,
        }
    }
}

/// A `journalAlerts` value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalConfigError {
    /// A filter entry is not a valid regex.
    #[error("{CONFIG_PATH}.filter[{index}]: invalid regex: {source}")]
    InvalidFilter {
        index: usize,
        #[source]
        source: regex::Error,
    },
    /// A key has a value of the wrong type.
    #[error("{key}: {message}")]
    InvalidValue { key: String, message: String },
}

impl JournalAlertsConfig {
    /// Reads the value of `alerts.journalAlerts`. Keys are matched case-insensitively and `null`
    /// counts as absent, as in the rest of the config file. A priority outside 0..=7 falls back
    /// to its default with a warning (upstream resets it silently); unknown keys are warnings.
    pub fn from_json(value: &Value) -> Result<(Self, Vec<String>), JournalConfigError> {
        let mut config = Self::default();
        let mut warnings = Vec::new();
        let object = match value {
            Value::Null => return Ok((config, warnings)),
            Value::Object(object) => object,
            other => {
                return Err(invalid(
                    CONFIG_PATH.to_owned(),
                    format!("expected an object, found {}", json_kind(other)),
                ));
            }
        };
        for (key, value) in object {
            if value.is_null() {
                continue;
            }
            if key.eq_ignore_ascii_case("filter") {
                config.filter = parse_filter(value)?;
            } else if key.eq_ignore_ascii_case("serviceAlertPriority") {
                config.service_alert_priority = parse_priority(
                    value,
                    "serviceAlertPriority",
                    DEFAULT_SERVICE_ALERT_PRIORITY,
                    &mut warnings,
                )?;
            } else if key.eq_ignore_ascii_case("systemAlertPriority") {
                config.system_alert_priority = parse_priority(
                    value,
                    "systemAlertPriority",
                    DEFAULT_SYSTEM_ALERT_PRIORITY,
                    &mut warnings,
                )?;
            } else {
                warnings.push(format!("unknown key `{CONFIG_PATH}.{key}` ignored"));
            }
        }
        Ok((config, warnings))
    }

    /// Compiles the filters. An invalid regex is an error naming its entry; an empty entry is
    /// skipped with a warning, because it would match (and so silence) every system alert.
    pub fn compile(&self) -> Result<CompiledFilters, JournalConfigError> {
        let mut regexes = Vec::with_capacity(self.filter.len());
        for (index, pattern) in self.filter.iter().enumerate() {
            if pattern.is_empty() {
                tracing::warn!("{CONFIG_PATH}.filter[{index}] is empty and is ignored");
                continue;
            }
            let regex = Regex::new(pattern)
                .map_err(|source| JournalConfigError::InvalidFilter { index, source })?;
            regexes.push(regex);
        }
        Ok(CompiledFilters { regexes })
    }

    /// Everything [`classify`] needs: the compiled filters, the priorities and the node ID that
    /// system and core alerts carry as `node.codename`.
    pub fn compile_for_node(
        &self,
        node_id: impl Into<String>,
    ) -> Result<CompiledConfig, JournalConfigError> {
        Ok(CompiledConfig {
            filters: self.compile()?,
            service_alert_priority: self.service_alert_priority,
            system_alert_priority: self.system_alert_priority,
            node_id: node_id.into(),
        })
    }
}

fn invalid(key: String, message: String) -> JournalConfigError {
    JournalConfigError::InvalidValue { key, message }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_filter(value: &Value) -> Result<Vec<String>, JournalConfigError> {
    let Value::Array(items) = value else {
        return Err(invalid(
            format!("{CONFIG_PATH}.filter"),
            format!("expected an array of strings, found {}", json_kind(value)),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid(
                format!("{CONFIG_PATH}.filter[{index}]"),
                format!("expected a string, found {}", json_kind(other)),
            )),
        })
        .collect()
}

fn parse_priority(
    value: &Value,
    key: &str,
    default: u8,
    warnings: &mut Vec<String>,
) -> Result<u8, JournalConfigError> {
    let Some(number) = value.as_i64() else {
        return Err(invalid(
            format!("{CONFIG_PATH}.{key}"),
            format!("expected an integer 0..=7, found {}", json_kind(value)),
        ));
    };
    match u8::try_from(number) {
        Ok(priority) if priority <= MAX_PRIORITY => Ok(priority),
        _ => {
            warnings.push(format!(
                "{CONFIG_PATH}.{key}: {number} is outside 0..=7, the default {default} is used"
            ));
            Ok(default)
        }
    }
}

/// The compiled `filter` regexes.
#[derive(Debug, Clone, Default)]
pub struct CompiledFilters {
    regexes: Vec<Regex>,
}

impl CompiledFilters {
    /// True when a system alert with this message must not be sent (unanchored match, as
    /// upstream's `MatchString`).
    pub fn excludes(&self, message: &str) -> bool {
        self.regexes.iter().any(|regex| regex.is_match(message))
    }

    /// Number of active filters.
    pub fn len(&self) -> usize {
        self.regexes.len()
    }

    /// True when no filter is active.
    pub fn is_empty(&self) -> bool {
        self.regexes.is_empty()
    }
}

/// Ready-to-use classification settings, from [`JournalAlertsConfig::compile_for_node`].
#[derive(Debug, Clone)]
pub struct CompiledConfig {
    pub filters: CompiledFilters,
    pub service_alert_priority: u8,
    pub system_alert_priority: u8,
    /// This node's ID, sent as `node.codename` in system and core alerts.
    pub node_id: String,
}

// ---------------------------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------------------------

/// What an instance alert needs to know about an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub item_id: String,
    pub subject_id: String,
    pub instance: u64,
    pub version: String,
    /// Preinstalled instances are identified by `codename` instead of `id` in v7 JSON.
    pub preinstalled: bool,
}

/// Finds an instance by the ID in its unit name (`aos-service@<instance-id>.service`).
pub trait InstanceLookup {
    fn lookup(&self, instance_id: &str) -> Option<InstanceInfo>;
}

impl<T: InstanceLookup + ?Sized> InstanceLookup for Arc<T> {
    fn lookup(&self, instance_id: &str) -> Option<InstanceInfo> {
        (**self).lookup(instance_id)
    }
}

/// Turns one journal entry (journalctl JSON export form) into a v7 alert object, or `None` when
/// the entry raises no alert.
pub fn classify(entry: &Value, cfg: &CompiledConfig, lookup: &dyn InstanceLookup) -> Option<Value> {
    let entry = entry.as_object()?;
    // Entries without a readable priority are never selected: upstream selects by PRIORITY=N
    // matches, which such entries cannot satisfy.
    let priority: u8 = field_str(entry, "PRIORITY")?.trim().parse().ok()?;
    let systemd_unit = field_str(entry, "_SYSTEMD_UNIT");

    let unit = if systemd_unit.as_deref() == Some(INIT_SCOPE) {
        if priority > cfg.service_alert_priority {
            return None;
        }
        field_str(entry, "UNIT")
    } else {
        if priority > cfg.system_alert_priority {
            return None;
        }
        systemd_unit
    };
    // Container payloads may log without _SYSTEMD_UNIT (cgroup v2); their cgroup still names
    // the service unit.
    let unit = match unit {
        Some(unit) if !unit.is_empty() => Some(unit.into_owned()),
        _ => field_str(entry, "_SYSTEMD_CGROUP").and_then(|cgroup| unit_from_cgroup(&cgroup)),
    };

    let message = field_str(entry, "MESSAGE")
        .map(Cow::into_owned)
        .unwrap_or_default();
    let timestamp = format_timestamp(realtime_us(entry).unwrap_or_else(now_us));

    if let Some(unit) = unit.as_deref() {
        if let Some(instance_id) = instance_id(unit) {
            if let Some(info) = lookup.lookup(instance_id) {
                return Some(instance_alert(timestamp, &info, message));
            }
            // Unknown instance (e.g. already removed): still worth reporting, as a system
            // alert, which the filters below apply to.
        } else if let Some(component) = core_component(unit) {
            return Some(json!({
                "timestamp": timestamp,
                "tag": TAG_CORE_ALERT,
                "node": {"codename": cfg.node_id},
                "coreComponent": component,
                "message": message,
            }));
        }
    }

    if cfg.filters.excludes(&message) {
        return None;
    }
    Some(json!({
        "timestamp": timestamp,
        "tag": TAG_SYSTEM_ALERT,
        "node": {"codename": cfg.node_id},
        "message": message,
    }))
}

fn instance_alert(timestamp: String, info: &InstanceInfo, message: String) -> Value {
    let id_key = if info.preinstalled { "codename" } else { "id" };
    let mut alert = Map::new();
    alert.insert("timestamp".into(), Value::String(timestamp));
    alert.insert("tag".into(), TAG_INSTANCE_ALERT.into());
    alert.insert("item".into(), json!({ id_key: info.item_id }));
    alert.insert("subject".into(), json!({ id_key: info.subject_id }));
    alert.insert("instance".into(), info.instance.into());
    alert.insert("version".into(), info.version.clone().into());
    alert.insert("message".into(), Value::String(message));
    Value::Object(alert)
}

/// `aos-service@<id>.service` → `<id>`.
fn instance_id(unit: &str) -> Option<&str> {
    unit.strip_prefix(INSTANCE_UNIT_PREFIX)?
        .strip_suffix(SERVICE_SUFFIX)
        .filter(|id| !id.is_empty())
}

fn core_component(unit: &str) -> Option<&'static str> {
    CORE_COMPONENTS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, component)| *component)
}

/// The last component of a cgroup path that names a service unit.
fn unit_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .split('/')
        .rev()
        .find(|part| part.len() > SERVICE_SUFFIX.len() && part.ends_with(SERVICE_SUFFIX))
        .map(str::to_owned)
}

/// A journal field as text. journalctl's JSON writes a field as a string, as an array of byte
/// values when it is not valid UTF-8 (decoded lossily here), or as an array of such values when
/// the entry has the field more than once (the first one is used). `null` (a field elided for
/// size without `--all`) reads as absent.
fn field_str<'a>(entry: &'a Map<String, Value>, name: &str) -> Option<Cow<'a, str>> {
    decode_field(entry.get(name)?)
}

fn decode_field(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            let bytes = items
                .iter()
                .map(|item| item.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Option<Vec<u8>>>()?;
            Some(Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()))
        }
        Value::Array(items) => items.first().and_then(decode_field),
        _ => None,
    }
}

/// `__REALTIME_TIMESTAMP`: microseconds since the epoch, written by journalctl as a string.
fn realtime_us(entry: &Map<String, Value>) -> Option<u64> {
    match entry.get("__REALTIME_TIMESTAMP")? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 UTC with exactly six fractional digits, as every v7 timestamp is written.
pub fn format_timestamp(micros_since_epoch: u64) -> String {
    // One formatter for every v7 timestamp.
    crate::api::cloud::messages::format_time(i64::try_from(micros_since_epoch).unwrap_or(i64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Sources
// ---------------------------------------------------------------------------------------------

/// The stdout of a journal source: one JSON entry per line.
pub type JournalLines = Box<dyn AsyncBufRead + Send + Unpin>;

/// Starts a stream of journal entries, after `after_cursor` when given, otherwise at the current
/// end of the journal. The reader calls it again whenever a stream ends or fails.
pub trait JournalSource {
    fn spawn(&self, after_cursor: Option<&str>) -> io::Result<JournalLines>;
}

impl<T: JournalSource + ?Sized> JournalSource for Arc<T> {
    fn spawn(&self, after_cursor: Option<&str>) -> io::Result<JournalLines> {
        (**self).spawn(after_cursor)
    }
}

/// The real source: `journalctl --follow --output=json --all` as a child process.
#[derive(Debug, Clone)]
pub struct JournalctlSource {
    program: OsString,
    system_alert_priority: u8,
}

impl JournalctlSource {
    /// `system_alert_priority` lets journalctl do the coarse selection (the same matches as
    /// upstream), so the CM does not parse every info and debug line of the unit.
    pub fn new(system_alert_priority: u8) -> Self {
        Self {
            program: "journalctl".into(),
            system_alert_priority,
        }
    }

    /// Runs another binary than `journalctl` from `PATH`.
    pub fn with_program(mut self, program: impl Into<OsString>) -> Self {
        self.program = program.into();
        self
    }

    /// The command line arguments for one run.
    pub fn args(&self, after_cursor: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> = [
            "--follow",
            "--output=json",
            // Without --all, fields over 4096 bytes are written as null.
            "--all",
            "--quiet",
            // __CURSOR and __REALTIME_TIMESTAMP are always written.
            "--output-fields=MESSAGE,PRIORITY,UNIT,_SYSTEMD_UNIT,_SYSTEMD_CGROUP",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        match after_cursor {
            // --follow alone shows at most 10 backlog entries until the next journal write;
            // --no-tail makes the whole backlog after the cursor come out at once.
            Some(cursor) => {
                args.push(format!("--after-cursor={cursor}"));
                args.push("--no-tail".to_owned());
            }
            None => args.push("--lines=0".to_owned()),
        }
        // (PRIORITY=0 OR .. OR PRIORITY=N) OR _SYSTEMD_UNIT=init.scope: same-field matches are
        // ORed by journalctl, `+` is a disjunction.
        let top = self.system_alert_priority.min(MAX_PRIORITY);
        args.extend((0..=top).map(|p| format!("PRIORITY={p}")));
        args.push("+".to_owned());
        args.push(format!("_SYSTEMD_UNIT={INIT_SCOPE}"));
        args
    }
}

impl JournalSource for JournalctlSource {
    fn spawn(&self, after_cursor: Option<&str>) -> io::Result<JournalLines> {
        let mut command = Command::new(&self.program);
        command.args(self.args(after_cursor));
        spawn_child(command)
    }
}

/// Runs an arbitrary command as a source; the cursor to resume after, if any, is passed in the
/// environment variable [`CommandSource::CURSOR_ENV`]. Used to test the process path without
/// journalctl, and usable for wrappers around it.
#[derive(Debug, Clone)]
pub struct CommandSource {
    program: OsString,
    args: Vec<OsString>,
}

impl CommandSource {
    /// Environment variable holding the cursor to resume after (absent at the journal's end).
    pub const CURSOR_ENV: &'static str = "JOURNAL_AFTER_CURSOR";

    pub fn new<I, A>(program: impl Into<OsString>, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }
}

impl JournalSource for CommandSource {
    fn spawn(&self, after_cursor: Option<&str>) -> io::Result<JournalLines> {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        match after_cursor {
            Some(cursor) => command.env(Self::CURSOR_ENV, cursor),
            None => command.env_remove(Self::CURSOR_ENV),
        };
        spawn_child(command)
    }
}

fn spawn_child(mut command: Command) -> io::Result<JournalLines> {
    // stderr carries the reason a source fails (e.g. a cursor journalctl rejects); it is sent to
    // the log when a runtime is there to read it, else inherited.
    let runtime = tokio::runtime::Handle::try_current().ok();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if runtime.is_some() {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        // Dropping the stream kills the child, so a stopped or restarted reader leaves none
        // behind; tokio reaps it in the background.
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("child stdout was not captured"))?;
    if let (Some(runtime), Some(stderr)) = (runtime, child.stderr.take()) {
        runtime.spawn(log_stderr(stderr));
    }
    Ok(Box::new(ChildLines {
        _child: child,
        stdout: BufReader::new(stdout),
    }))
}

async fn log_stderr(stderr: tokio::process::ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut splitter = LineSplitter::new(4096);
    while let Ok(Some(line)) = splitter.next(&mut reader).await {
        if let Line::Complete(bytes) = line {
            tracing::warn!(
                "journal source: {}",
                String::from_utf8_lossy(&bytes).trim_end()
            );
        }
    }
}

/// A child's stdout that owns the child, so the process lives exactly as long as the stream.
struct ChildLines {
    _child: Child,
    stdout: BufReader<ChildStdout>,
}

impl AsyncRead for ChildLines {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stdout).poll_read(cx, buf)
    }
}

impl AsyncBufRead for ChildLines {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().stdout).poll_fill_buf(cx)
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.get_mut().stdout).consume(amt);
    }
}

enum Line {
    Complete(Vec<u8>),
    TooLong,
}

/// Splits a byte stream into lines with a length cap. Unlike `read_line` it keeps its partial
/// line in `self` and only awaits `fill_buf`, so it can lose the `select!` race against
/// shutdown or the save timer without losing data, and one runaway line cannot exhaust memory.
struct LineSplitter {
    buf: Vec<u8>,
    overflowed: bool,
    max: usize,
}

impl LineSplitter {
    fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            overflowed: false,
            max,
        }
    }

    async fn next<R: AsyncBufRead + Unpin + ?Sized>(
        &mut self,
        reader: &mut R,
    ) -> io::Result<Option<Line>> {
        loop {
            let chunk = reader.fill_buf().await?;
            if chunk.is_empty() {
                // An unterminated last line still counts (and will usually be malformed).
                if std::mem::take(&mut self.overflowed) {
                    self.buf.clear();
                    return Ok(Some(Line::TooLong));
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Line::Complete(std::mem::take(&mut self.buf))));
            }
            let newline = chunk.iter().position(|b| *b == b'\n');
            let part = &chunk[..newline.unwrap_or(chunk.len())];
            if !self.overflowed {
                if self.buf.len() + part.len() > self.max {
                    self.overflowed = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            let used = newline.map_or(chunk.len(), |i| i + 1);
            reader.consume(used);
            if newline.is_some() {
                if std::mem::take(&mut self.overflowed) {
                    return Ok(Some(Line::TooLong));
                }
                return Ok(Some(Line::Complete(std::mem::take(&mut self.buf))));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// Where the reader's position survives CM restarts.
pub trait CursorStore {
    /// The cursor of the last entry handled, if one was saved.
    fn load(&self) -> Option<String>;
    /// Persists the cursor; called from the reader's task, so it should be quick.
    fn save(&self, cursor: &str);
}

impl<T: CursorStore + ?Sized> CursorStore for Arc<T> {
    fn load(&self) -> Option<String> {
        (**self).load()
    }

    fn save(&self, cursor: &str) {
        (**self).save(cursor);
    }
}

/// Tuning of [`JournalReader`]; the defaults suit production.
#[derive(Debug, Clone)]
pub struct ReaderSettings {
    /// How often the cursor is saved while running (it is also saved at shutdown).
    pub cursor_save_period: Duration,
    /// How many distinct recent alerts the duplicate check remembers.
    pub dedup_capacity: usize,
    /// Identical alerts whose entries are this close in journal time are collapsed.
    pub dedup_window: Duration,
    /// First restart delay (before jitter).
    pub restart_min_delay: Duration,
    /// Largest restart delay (before jitter, which adds up to as much again).
    pub restart_max_delay: Duration,
    /// A source that ran at least this long starts the backoff from the beginning again.
    pub restart_reset_after: Duration,
    /// Runs started from a cursor that end without a single line before the cursor is
    /// dropped and reading starts at the journal's end (journalctl rejects a corrupt cursor on
    /// every run, which would otherwise stall alerts forever).
    pub bad_cursor_runs: u32,
    /// Longest accepted line; longer ones are skipped and counted as malformed.
    pub max_line_len: usize,
}

impl Default for ReaderSettings {
    fn default() -> Self {
        Self {
            cursor_save_period: Duration::from_secs(10),
            dedup_capacity: 64,
            dedup_window: Duration::from_secs(10),
            restart_min_delay: Duration::from_secs(1),
            restart_max_delay: Duration::from_secs(30),
            restart_reset_after: Duration::from_secs(60),
            bad_cursor_runs: 3,
            max_line_len: 1 << 20,
        }
    }
}

/// Counters of a reader, readable while it runs.
#[derive(Debug, Default)]
pub struct JournalStats {
    lines: AtomicU64,
    malformed: AtomicU64,
    alerts_sent: AtomicU64,
    duplicates: AtomicU64,
    dropped_full: AtomicU64,
    restarts: AtomicU64,
    cursor_resets: AtomicU64,
}

/// A copy of [`JournalStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStatsSnapshot {
    /// Non-empty lines read from sources.
    pub lines: u64,
    /// Lines that were not a JSON object, or too long.
    pub malformed: u64,
    /// Alerts put into the channel.
    pub alerts_sent: u64,
    /// Alerts collapsed as repeats of a recent identical alert.
    pub duplicates: u64,
    /// Alerts dropped because the channel was full.
    pub dropped_full: u64,
    /// Times the source was started again after ending or failing to start.
    pub restarts: u64,
    /// Times a cursor was given up after `bad_cursor_runs` empty runs.
    pub cursor_resets: u64,
}

impl JournalStats {
    pub fn snapshot(&self) -> JournalStatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        JournalStatsSnapshot {
            lines: get(&self.lines),
            malformed: get(&self.malformed),
            alerts_sent: get(&self.alerts_sent),
            duplicates: get(&self.duplicates),
            dropped_full: get(&self.dropped_full),
            restarts: get(&self.restarts),
            cursor_resets: get(&self.cursor_resets),
        }
    }
}

fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}

/// Remembers the last alerts sent (without their timestamps) to collapse repeats. The window
/// is measured in journal time, not wall time, so a replayed backlog collapses the same way as
/// live entries and the check is deterministic.
struct Dedup {
    recent: VecDeque<(Value, u64)>,
    capacity: usize,
    window_us: u64,
}

impl Dedup {
    fn new(capacity: usize, window: Duration) -> Self {
        Self {
            recent: VecDeque::with_capacity(capacity),
            capacity,
            window_us: u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
        }
    }

    fn is_duplicate(&mut self, alert: &Value, at_us: u64) -> bool {
        let mut key = alert.clone();
        if let Some(object) = key.as_object_mut() {
            object.remove("timestamp");
        }
        let window_us = self.window_us;
        // The window counts from the first occurrence: a steady storm still yields one alert
        // per window, so the cloud keeps hearing about it.
        self.recent
            .retain(|(_, seen)| at_us.abs_diff(*seen) <= window_us);
        if self.recent.iter().any(|(seen, _)| *seen == key) {
            return true;
        }
        if self.capacity > 0 {
            if self.recent.len() >= self.capacity {
                self.recent.pop_front();
            }
            self.recent.push_back((key, at_us));
        }
        false
    }
}

enum LineOutcome {
    /// Nothing to remember (blank, malformed or cursor-less line).
    Skipped,
    /// The entry was handled; this is its cursor.
    Handled(String),
    /// The alert channel is closed: nobody consumes alerts any more.
    ReceiverGone,
}

/// Follows the journal and sends alerts; see the module documentation.
pub struct JournalReader<S, C, L> {
    source: S,
    store: C,
    lookup: L,
    config: CompiledConfig,
    alerts: mpsc::Sender<Value>,
    settings: ReaderSettings,
    stats: Arc<JournalStats>,
}

impl<S, C, L> JournalReader<S, C, L>
where
    S: JournalSource + Send + Sync,
    C: CursorStore + Send + Sync,
    L: InstanceLookup + Send + Sync,
{
    pub fn new(
        source: S,
        store: C,
        lookup: L,
        config: CompiledConfig,
        alerts: mpsc::Sender<Value>,
    ) -> Self {
        Self {
            source,
            store,
            lookup,
            config,
            alerts,
            settings: ReaderSettings::default(),
            stats: Arc::default(),
        }
    }

    pub fn with_settings(mut self, settings: ReaderSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The live counters; take them before [`JournalReader::run`] consumes the reader.
    pub fn stats(&self) -> Arc<JournalStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` completes (or the alert channel is closed), then saves the cursor
    /// and returns the final counters. A source that ends or fails is restarted; this never
    /// returns an error.
    pub async fn run<F: Future<Output = ()>>(self, shutdown: F) -> JournalStatsSnapshot {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut cursor = self.store.load().filter(|c| !c.is_empty());
        let mut saved = cursor.clone();
        let mut dedup = Dedup::new(self.settings.dedup_capacity, self.settings.dedup_window);
        let mut backoff = self.backoff();
        let mut empty_cursor_runs = 0u32;
        let period = self
            .settings
            .cursor_save_period
            .max(Duration::from_millis(1));
        let mut save_tick = tokio::time::interval_at(Instant::now() + period, period);
        save_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

        'runs: loop {
            let started = Instant::now();
            let mut got_line = false;
            let mut spawned = false;
            match self.source.spawn(cursor.as_deref()) {
                Ok(mut lines) => {
                    spawned = true;
                    tracing::debug!(after_cursor = ?cursor, "journal source started");
                    let mut splitter = LineSplitter::new(self.settings.max_line_len);
                    loop {
                        tokio::select! {
                            biased;
                            () = &mut shutdown => break 'runs,
                            _ = save_tick.tick() => self.save_if_changed(&cursor, &mut saved),
                            next = splitter.next(&mut lines) => match next {
                                Ok(Some(line)) => {
                                    got_line = true;
                                    match self.handle_line(line, &mut dedup) {
                                        LineOutcome::Skipped => {}
                                        LineOutcome::Handled(c) => cursor = Some(c),
                                        LineOutcome::ReceiverGone => {
                                            tracing::info!("alert channel closed, journal reader stops");
                                            break 'runs;
                                        }
                                    }
                                }
                                Ok(None) => {
                                    tracing::warn!("journal source ended");
                                    break;
                                }
                                Err(err) => {
                                    tracing::warn!("journal source read failed: {err}");
                                    break;
                                }
                            },
                        }
                    }
                }
                Err(err) => tracing::warn!("can't start journal source: {err}"),
            }

            bump(&self.stats.restarts);
            if started.elapsed() >= self.settings.restart_reset_after {
                backoff = self.backoff();
            }
            // Only a run that started and then ended silently points at the cursor; a source
            // that cannot start at all (journalctl missing) says nothing about it.
            if spawned && cursor.is_some() && !got_line {
                empty_cursor_runs += 1;
                if empty_cursor_runs >= self.settings.bad_cursor_runs.max(1) {
                    tracing::error!(
                        ?cursor,
                        "journal source keeps ending without output after this cursor; \
                         reading from the journal's end instead"
                    );
                    bump(&self.stats.cursor_resets);
                    cursor = None;
                    empty_cursor_runs = 0;
                }
            } else if got_line {
                empty_cursor_runs = 0;
            }

            let delay = backoff.next().unwrap_or(self.settings.restart_max_delay);
            tracing::debug!(?delay, "journal source restarts after a delay");
            let sleep = tokio::time::sleep(delay);
            let mut sleep = std::pin::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'runs,
                    _ = save_tick.tick() => self.save_if_changed(&cursor, &mut saved),
                    () = &mut sleep => break,
                }
            }
        }

        self.save_if_changed(&cursor, &mut saved);
        self.stats.snapshot()
    }

    fn backoff(&self) -> ExponentialBackoff {
        // backon without its `std` feature seeds jitter with a constant, which would make every
        // unit restart in lockstep; std's RandomState gives a per-process random seed.
        let seed = RandomState::new().build_hasher().finish();
        ExponentialBuilder::default()
            .with_min_delay(self.settings.restart_min_delay)
            .with_max_delay(
                self.settings
                    .restart_max_delay
                    .max(self.settings.restart_min_delay),
            )
            .with_factor(2.0)
            .with_jitter()
            .with_jitter_seed(seed)
            .without_max_times()
            .build()
    }

    fn save_if_changed(&self, cursor: &Option<String>, saved: &mut Option<String>) {
        if let Some(current) = cursor
            && saved.as_ref() != Some(current)
        {
            self.store.save(current);
            *saved = Some(current.clone());
        }
    }

    fn handle_line(&self, line: Line, dedup: &mut Dedup) -> LineOutcome {
        let bytes = match line {
            Line::Complete(bytes) => bytes,
            Line::TooLong => {
                bump(&self.stats.lines);
                let n = bump(&self.stats.malformed);
                tracing::warn!(malformed = n, "journal line too long, skipped");
                return LineOutcome::Skipped;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return LineOutcome::Skipped;
        }
        bump(&self.stats.lines);
        let entry = match serde_json::from_slice::<Value>(&bytes) {
            Ok(entry @ Value::Object(_)) => entry,
            _ => {
                let n = bump(&self.stats.malformed);
                // Logged sparsely: a broken source could otherwise flood the log (and the
                // journal this reader follows).
                if n.is_power_of_two() {
                    tracing::warn!(malformed = n, "malformed journal line skipped");
                }
                return LineOutcome::Skipped;
            }
        };
        let cursor = entry
            .get("__CURSOR")
            .and_then(Value::as_str)
            .map(str::to_owned);

        if let Some(alert) = classify(&entry, &self.config, &self.lookup) {
            let at_us = entry
                .as_object()
                .and_then(realtime_us)
                .unwrap_or_else(now_us);
            if dedup.is_duplicate(&alert, at_us) {
                bump(&self.stats.duplicates);
            } else {
                match self.alerts.try_send(alert) {
                    Ok(()) => {
                        bump(&self.stats.alerts_sent);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let n = bump(&self.stats.dropped_full);
                        if n.is_power_of_two() {
                            tracing::warn!(
                                dropped = n,
                                "alert channel full, journal alert dropped"
                            );
                        }
                    }
                    // The entry is not marked handled, so a later run sends it.
                    Err(mpsc::error::TrySendError::Closed(_)) => return LineOutcome::ReceiverGone,
                }
            }
        }
        cursor.map_or(LineOutcome::Skipped, LineOutcome::Handled)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    const NODE: &str = "main-node";
    // 2024-02-29T12:34:56.000789Z
    const TS: u64 = 1_709_210_096_000_789;
    const TS_TEXT: &str = "2024-02-29T12:34:56.000789Z";

    fn cfg(filter: &[&str]) -> CompiledConfig {
        JournalAlertsConfig {
            filter: filter.iter().map(|s| (*s).to_owned()).collect(),
            ..JournalAlertsConfig::default()
        }
        .compile_for_node(NODE)
        .unwrap()
    }

    #[derive(Default)]
    struct MapLookup(HashMap<String, InstanceInfo>);

    impl InstanceLookup for MapLookup {
        fn lookup(&self, instance_id: &str) -> Option<InstanceInfo> {
            self.0.get(instance_id).cloned()
        }
    }

    fn lookup() -> MapLookup {
        let mut map = HashMap::new();
        map.insert(
            "inst-1".to_owned(),
            InstanceInfo {
                item_id: "item-uuid".into(),
                subject_id: "subject-uuid".into(),
                instance: 2,
                version: "1.2.3".into(),
                preinstalled: false,
            },
        );
        map.insert(
            "pre-1".to_owned(),
            InstanceInfo {
                item_id: "preinstalled-item".into(),
                subject_id: "preinstalled-subject".into(),
                instance: 0,
                version: "0.1.0".into(),
                preinstalled: true,
            },
        );
        MapLookup(map)
    }

    /// Parses a hand-written line in journalctl's JSON export form.
    fn entry(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    fn run_classify(line: &str, config: &CompiledConfig) -> Option<Value> {
        classify(&entry(line), config, &lookup())
    }

    fn system(message: &str) -> Value {
        json!({"timestamp": TS_TEXT, "tag": "systemAlert", "node": {"codename": NODE}, "message": message})
    }

    #[test]
    fn system_alert_exact_json() {
        let line = r#"{"__CURSOR":"s=1;i=10","__REALTIME_TIMESTAMP":"1709210096000789","__MONOTONIC_TIMESTAMP":"123","_BOOT_ID":"b","PRIORITY":"3","_SYSTEMD_UNIT":"systemd-networkd.service","_SYSTEMD_CGROUP":"/system.slice/systemd-networkd.service","MESSAGE":"eth0: link down"}"#;
        assert_eq!(
            run_classify(line, &cfg(&[])),
            Some(system("eth0: link down"))
        );
        // Kernel entries carry no unit at all.
        let kernel = r#"{"__CURSOR":"k","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"2","_TRANSPORT":"kernel","MESSAGE":"EXT4-fs error"}"#;
        assert_eq!(
            run_classify(kernel, &cfg(&[])),
            Some(system("EXT4-fs error"))
        );
    }

    #[test]
    fn filtered_system_alert_is_not_sent() {
        let line = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":"bluetooth: hci0 timeout"}"#;
        assert_eq!(run_classify(line, &cfg(&["^bluetooth:", "x{2}"])), None);
        assert_eq!(
            run_classify(line, &cfg(&["^wifi:"])),
            Some(system("bluetooth: hci0 timeout"))
        );
        // Filters are for system alerts only.
        let core = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"3","_SYSTEMD_UNIT":"aos-sm.service","MESSAGE":"bluetooth: x"}"#;
        assert_eq!(
            run_classify(core, &cfg(&["^bluetooth:"])).unwrap()["tag"],
            "coreAlert"
        );
    }

    #[test]
    fn core_component_alert_exact_json() {
        let line = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"2","_SYSTEMD_UNIT":"aos-servicemanager.service","MESSAGE":"runtime failed"}"#;
        assert_eq!(
            run_classify(line, &cfg(&[])),
            Some(json!({
                "timestamp": TS_TEXT,
                "tag": "coreAlert",
                "node": {"codename": NODE},
                "coreComponent": "SM",
                "message": "runtime failed",
            }))
        );
        for (unit, component) in [
            ("aos-communicationmanager.service", "CM"),
            ("aos-cm.service", "CM"),
            ("aos-sm.service", "SM"),
            ("aos-iamanager.service", "IAM"),
            ("aos-iam.service", "IAM"),
            ("aos-messageproxy.service", "MP"),
            ("aos-mp.service", "MP"),
        ] {
            let line = format!(
                r#"{{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1","PRIORITY":"0","_SYSTEMD_UNIT":"{unit}","MESSAGE":"m"}}"#
            );
            let alert = run_classify(&line, &cfg(&[])).unwrap();
            assert_eq!(alert["coreComponent"], component, "{unit}");
        }
    }

    #[test]
    fn instance_alert_exact_json_and_unknown_instance() {
        let line = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"3","_SYSTEMD_UNIT":"aos-service@inst-1.service","MESSAGE":"segfault"}"#;
        assert_eq!(
            run_classify(line, &cfg(&[])),
            Some(json!({
                "timestamp": TS_TEXT,
                "tag": "updateItemInstanceAlert",
                "item": {"id": "item-uuid"},
                "subject": {"id": "subject-uuid"},
                "instance": 2,
                "version": "1.2.3",
                "message": "segfault",
            }))
        );

        let pre = line.replace("inst-1", "pre-1");
        let alert = run_classify(&pre, &cfg(&[])).unwrap();
        assert_eq!(alert["item"], json!({"codename": "preinstalled-item"}));
        assert_eq!(
            alert["subject"],
            json!({"codename": "preinstalled-subject"})
        );

        let unknown = line.replace("inst-1", "gone-7");
        assert_eq!(run_classify(&unknown, &cfg(&[])), Some(system("segfault")));
        // The fallback system alert is subject to the filters.
        assert_eq!(run_classify(&unknown, &cfg(&["segfault"])), None);
    }

    #[test]
    fn init_scope_uses_unit_and_service_priority() {
        let line = |priority: u8| {
            format!(
                r#"{{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"{priority}","_SYSTEMD_UNIT":"init.scope","_SYSTEMD_CGROUP":"/init.scope","UNIT":"aos-service@inst-1.service","MESSAGE":"aos-service@inst-1.service: Main process exited, code=killed, status=9/KILL"}}"#
            )
        };
        // 4 <= serviceAlertPriority (4) although > systemAlertPriority (3).
        let alert = run_classify(&line(4), &cfg(&[])).unwrap();
        assert_eq!(alert["tag"], "updateItemInstanceAlert");
        assert_eq!(alert["instance"], 2);
        assert_eq!(
            run_classify(&line(3), &cfg(&[])).unwrap()["tag"],
            "updateItemInstanceAlert"
        );
        assert_eq!(run_classify(&line(5), &cfg(&[])), None);

        // A manager message about a core unit.
        let core = line(4).replace("aos-service@inst-1.service", "aos-iamanager.service");
        assert_eq!(
            run_classify(&core, &cfg(&[])).unwrap()["coreComponent"],
            "IAM"
        );

        // A manager message without UNIT is a system alert.
        let plain = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"4","_SYSTEMD_UNIT":"init.scope","_SYSTEMD_CGROUP":"/init.scope","MESSAGE":"Freezing execution."}"#;
        assert_eq!(
            run_classify(plain, &cfg(&[])),
            Some(system("Freezing execution."))
        );
    }

    #[test]
    fn cgroup_stands_in_for_a_missing_unit() {
        let line = |cgroup: &str| {
            format!(
                r#"{{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"3","_SYSTEMD_CGROUP":"{cgroup}","MESSAGE":"oops"}}"#
            )
        };
        for cgroup in [
            "/system.slice/aos-service@inst-1.service",
            "/system.slice/system-aos\\\\x2dservice.slice/aos-service@inst-1.service/payload",
        ] {
            let alert = run_classify(&line(cgroup), &cfg(&[])).unwrap();
            assert_eq!(alert["tag"], "updateItemInstanceAlert", "{cgroup}");
        }
        assert_eq!(
            run_classify(&line("/system.slice/aos-cm.service"), &cfg(&[])).unwrap()["coreComponent"],
            "CM"
        );
        assert_eq!(
            run_classify(&line("/user.slice/user-0.slice/session-1.scope"), &cfg(&[])),
            Some(system("oops"))
        );
        // An empty _SYSTEMD_UNIT counts as missing.
        let empty_unit = line("/system.slice/aos-sm.service")
            .replace(r#""PRIORITY":"3""#, r#""PRIORITY":"3","_SYSTEMD_UNIT":"""#);
        assert_eq!(
            run_classify(&empty_unit, &cfg(&[])).unwrap()["coreComponent"],
            "SM"
        );
    }

    #[test]
    fn message_as_byte_array() {
        // "bad \xff byte": not UTF-8, so journalctl writes the bytes.
        let line = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":[98,97,100,32,255,32,98,121,116,101]}"#;
        assert_eq!(
            run_classify(line, &cfg(&[])),
            Some(system("bad \u{fffd} byte"))
        );
        // Valid UTF-8 as bytes (journalctl does this for messages with control characters).
        let utf8 = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":[208,191,27,91,48,109]}"#;
        assert_eq!(run_classify(utf8, &cfg(&[])), Some(system("п\u{1b}[0m")));
        // A field present twice is written as an array of values.
        let twice = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":["first",[115,101,99,111,110,100]]}"#;
        assert_eq!(run_classify(twice, &cfg(&[])), Some(system("first")));
        // Filters see the decoded text.
        assert_eq!(run_classify(line, &cfg(&["^bad"])), None);
    }

    #[test]
    fn priority_selection() {
        let line = |priority: &str| {
            format!(
                r#"{{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1709210096000789","PRIORITY":"{priority}","_SYSTEMD_UNIT":"foo.service","MESSAGE":"m"}}"#
            )
        };
        assert_eq!(run_classify(&line("4"), &cfg(&[])), None);
        assert_eq!(run_classify(&line("7"), &cfg(&[])), None);
        assert_eq!(run_classify(&line("3"), &cfg(&[])), Some(system("m")));
        assert_eq!(run_classify(&line("0"), &cfg(&[])), Some(system("m")));
        assert_eq!(run_classify(&line("x"), &cfg(&[])), None);
        // A service unit is selected by systemAlertPriority, not serviceAlertPriority.
        let instance = line("4").replace("foo.service", "aos-service@inst-1.service");
        assert_eq!(run_classify(&instance, &cfg(&[])), None);
        // No PRIORITY at all.
        let none = r#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1","_SYSTEMD_UNIT":"foo.service","MESSAGE":"m"}"#;
        assert_eq!(run_classify(none, &cfg(&[])), None);
        assert_eq!(classify(&json!([1, 2]), &cfg(&[]), &lookup()), None);
    }

    #[test]
    fn timestamps_have_six_fraction_digits() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_timestamp(1_700_000_000_123_456),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            format_timestamp(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            format_timestamp(4_102_444_799_999_999),
            "2099-12-31T23:59:59.999999Z"
        );
        assert_eq!(format_timestamp(TS), TS_TEXT);
    }

    #[test]
    fn invalid_regex_names_the_entry() {
        let config = JournalAlertsConfig {
            filter: vec!["ok".into(), "".into(), "(unclosed".into()],
            ..JournalAlertsConfig::default()
        };
        let err = config.compile().unwrap_err();
        assert!(matches!(
            err,
            JournalConfigError::InvalidFilter { index: 2, .. }
        ));
        let text = err.to_string();
        assert!(
            text.starts_with("alerts.journalAlerts.filter[2]: "),
            "{text}"
        );
        // The empty entry is skipped, the rest compiles.
        let filters = JournalAlertsConfig {
            filter: vec!["ok".into(), "".into()],
            ..JournalAlertsConfig::default()
        }
        .compile()
        .unwrap();
        assert_eq!(filters.len(), 1);
        assert!(!filters.excludes("anything else"));
    }

    #[test]
    fn config_from_json() {
        let (config, warnings) = JournalAlertsConfig::from_json(&json!({
            "FILTER": ["a", "b"], "serviceAlertPriority": 6, "systemalertpriority": 9, "extra": 1
        }))
        .unwrap();
        assert_eq!(config.filter, vec!["a", "b"]);
        assert_eq!(config.service_alert_priority, 6);
        assert_eq!(config.system_alert_priority, DEFAULT_SYSTEM_ALERT_PRIORITY);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("systemAlertPriority")));

        let (config, warnings) = JournalAlertsConfig::from_json(&Value::Null).unwrap();
        assert_eq!(config, JournalAlertsConfig::default());
        assert!(warnings.is_empty());

        let err = JournalAlertsConfig::from_json(&json!({"filter": ["a", 3]})).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("alerts.journalAlerts.filter[1]: "),
            "{err}"
        );
        let err =
            JournalAlertsConfig::from_json(&json!({"serviceAlertPriority": "4"})).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("alerts.journalAlerts.serviceAlertPriority: ")
        );
    }

    #[test]
    fn journalctl_arguments() {
        let source = JournalctlSource::new(2);
        let tail = source.args(None);
        assert_eq!(
            tail,
            [
                "--follow",
                "--output=json",
                "--all",
                "--quiet",
                "--output-fields=MESSAGE,PRIORITY,UNIT,_SYSTEMD_UNIT,_SYSTEMD_CGROUP",
                "--lines=0",
                "PRIORITY=0",
                "PRIORITY=1",
                "PRIORITY=2",
                "+",
                "_SYSTEMD_UNIT=init.scope",
            ]
        );
        let resumed = source.args(Some("s=abc;i=1f"));
        assert!(resumed.contains(&"--after-cursor=s=abc;i=1f".to_owned()));
        assert!(resumed.contains(&"--no-tail".to_owned()));
        assert!(!resumed.contains(&"--lines=0".to_owned()));
    }

    #[test]
    fn dedup_collapses_within_the_window() {
        let mut dedup = Dedup::new(2, Duration::from_secs(10));
        let a = json!({"timestamp": "t1", "tag": "systemAlert", "message": "a"});
        let a_later = json!({"timestamp": "t2", "tag": "systemAlert", "message": "a"});
        let b = json!({"timestamp": "t1", "tag": "systemAlert", "message": "b"});
        let c = json!({"timestamp": "t1", "tag": "systemAlert", "message": "c"});
        assert!(!dedup.is_duplicate(&a, 0));
        assert!(dedup.is_duplicate(&a_later, 5_000_000));
        assert!(!dedup.is_duplicate(&a, 10_000_001));
        // Bounded: c pushes a out.
        assert!(!dedup.is_duplicate(&b, 10_000_002));
        assert!(!dedup.is_duplicate(&c, 10_000_003));
        assert!(!dedup.is_duplicate(&a, 10_000_004));
    }

    // ----- reader -----

    fn line(cursor: &str, priority: u8, message: &str, ts: u64) -> String {
        json!({
            "__CURSOR": cursor,
            "__REALTIME_TIMESTAMP": ts.to_string(),
            "PRIORITY": priority.to_string(),
            "_SYSTEMD_UNIT": "foo.service",
            "MESSAGE": message,
        })
        .to_string()
    }

    fn cursor_of(line: &str) -> Option<String> {
        serde_json::from_str::<Value>(line)
            .ok()?
            .get("__CURSOR")?
            .as_str()
            .map(str::to_owned)
    }

    /// Serves its data, then stays open without data, like journalctl --follow.
    struct OpenEnded(std::io::Cursor<Vec<u8>>);

    impl AsyncRead for OpenEnded {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.0.position() < this.0.get_ref().len() as u64 {
                Pin::new(&mut this.0).poll_read(cx, buf)
            } else {
                // Nothing more; the reader's other select! branches wake it.
                Poll::Pending
            }
        }
    }

    /// A fake journal: a shared list of lines; `spawn` serves the lines after the given cursor
    /// (all lines without one). Each entry of `eof_after` makes one run end after that many
    /// lines, as a dying child does.
    #[derive(Default)]
    struct FakeSource {
        journal: Mutex<Vec<String>>,
        eof_after: Mutex<VecDeque<usize>>,
        calls: Mutex<Vec<Option<String>>>,
    }

    impl FakeSource {
        fn push(&self, line: String) {
            self.journal.lock().unwrap().push(line);
        }

        fn calls(&self) -> Vec<Option<String>> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl JournalSource for FakeSource {
        fn spawn(&self, after_cursor: Option<&str>) -> io::Result<JournalLines> {
            self.calls
                .lock()
                .unwrap()
                .push(after_cursor.map(str::to_owned));
            let journal = self.journal.lock().unwrap();
            let start = match after_cursor {
                Some(c) => journal
                    .iter()
                    .position(|l| cursor_of(l).as_deref() == Some(c))
                    .map_or(0, |i| i + 1),
                None => 0,
            };
            let mut lines: Vec<&String> = journal[start..].iter().collect();
            let eof = self.eof_after.lock().unwrap().pop_front();
            if let Some(n) = eof {
                lines.truncate(n);
            }
            let mut data = Vec::new();
            for l in lines {
                data.extend_from_slice(l.as_bytes());
                data.push(b'\n');
            }
            Ok(match eof {
                Some(_) => Box::new(BufReader::new(std::io::Cursor::new(data))),
                None => Box::new(BufReader::new(OpenEnded(std::io::Cursor::new(data)))),
            })
        }
    }

    #[derive(Default)]
    struct MemStore {
        cursor: Mutex<Option<String>>,
        saves: Mutex<Vec<String>>,
    }

    impl CursorStore for MemStore {
        fn load(&self) -> Option<String> {
            self.cursor.lock().unwrap().clone()
        }

        fn save(&self, cursor: &str) {
            *self.cursor.lock().unwrap() = Some(cursor.to_owned());
            self.saves.lock().unwrap().push(cursor.to_owned());
        }
    }

    fn settings() -> ReaderSettings {
        ReaderSettings::default()
    }

    struct Running {
        alerts: mpsc::Receiver<Value>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<JournalStatsSnapshot>,
        stats: Arc<JournalStats>,
    }

    fn start<S: JournalSource + Send + Sync + 'static>(
        source: S,
        store: Arc<MemStore>,
        capacity: usize,
        settings: ReaderSettings,
    ) -> Running {
        let (tx, alerts) = mpsc::channel(capacity);
        let (stop, stopped) = oneshot::channel::<()>();
        let reader =
            JournalReader::new(source, store, lookup(), cfg(&[]), tx).with_settings(settings);
        let stats = reader.stats();
        let task = tokio::spawn(reader.run(async move {
            let _ = stopped.await;
        }));
        Running {
            alerts,
            stop,
            task,
            stats,
        }
    }

    impl Running {
        async fn messages(&mut self, n: usize) -> Vec<String> {
            let mut out = Vec::new();
            for _ in 0..n {
                let alert = self.alerts.recv().await.unwrap();
                out.push(alert["message"].as_str().unwrap().to_owned());
            }
            out
        }

        async fn stop(self) -> (JournalStatsSnapshot, mpsc::Receiver<Value>) {
            let _ = self.stop.send(());
            (self.task.await.unwrap(), self.alerts)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn restart_resumes_after_the_saved_cursor() {
        let source = Arc::new(FakeSource::default());
        source.push(line("c1", 3, "one", 1_000_000));
        source.push(line("c2", 6, "info, no alert", 2_000_000));
        source.push(line("c3", 3, "three", 3_000_000));
        let store = Arc::new(MemStore::default());

        let mut run = start(Arc::clone(&source), Arc::clone(&store), 16, settings());
        assert_eq!(run.messages(2).await, ["one", "three"]);
        // Periodic save (paused clock: this advances virtual time only).
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(store.saves.lock().unwrap().as_slice(), ["c3"]);
        // An entry without an alert still moves the cursor.
        source.push(line("c4", 6, "info", 4_000_000));
        let (stats, mut rest) = run.stop().await;
        assert!(rest.try_recv().is_err());
        assert_eq!(store.load().as_deref(), Some("c3"));
        assert_eq!(stats.alerts_sent, 2);
        assert_eq!(stats.restarts, 0);

        // More entries while the CM is down, then a new reader with the same store.
        source.push(line("c5", 2, "five", 5_000_000));
        source.push(line("c6", 3, "six", 6_000_000));
        let mut run = start(Arc::clone(&source), Arc::clone(&store), 16, settings());
        assert_eq!(run.messages(2).await, ["five", "six"]);
        let (stats, mut rest) = run.stop().await;
        assert!(rest.try_recv().is_err(), "nothing after six");
        assert_eq!(stats.alerts_sent, 2);
        assert_eq!(source.calls(), [None, Some("c3".to_owned())]);
        assert_eq!(store.load().as_deref(), Some("c6"));
    }

    #[tokio::test(start_paused = true)]
    async fn reader_restarts_a_source_that_ends() {
        let source = Arc::new(FakeSource::default());
        for (i, m) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            source.push(line(&format!("c{i}"), 3, m, i as u64 * 1_000_000));
        }
        // First run dies after 2 lines, the second after 1 more, the third stays open.
        source.eof_after.lock().unwrap().extend([2, 1]);
        let store = Arc::new(MemStore::default());
        let mut run = start(Arc::clone(&source), Arc::clone(&store), 16, settings());
        assert_eq!(run.messages(5).await, ["a", "b", "c", "d", "e"]);
        let (stats, mut rest) = run.stop().await;
        assert!(rest.try_recv().is_err());
        assert_eq!(
            source.calls(),
            [None, Some("c1".to_owned()), Some("c2".to_owned())]
        );
        assert_eq!(stats.restarts, 2);
        assert_eq!(stats.alerts_sent, 5);
        assert_eq!(store.load().as_deref(), Some("c4"));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_waits_with_exponential_backoff() {
        // A source that cannot start at all.
        struct Failing(Mutex<Vec<(Instant, Option<String>)>>);
        impl JournalSource for Failing {
            fn spawn(&self, after: Option<&str>) -> io::Result<JournalLines> {
                self.0
                    .lock()
                    .unwrap()
                    .push((Instant::now(), after.map(str::to_owned)));
                Err(io::Error::new(io::ErrorKind::NotFound, "no journalctl"))
            }
        }
        let source = Arc::new(Failing(Mutex::new(Vec::new())));
        let store = Arc::new(MemStore::default());
        store.save("kept");
        let run = start(Arc::clone(&source), Arc::clone(&store), 1, settings());
        tokio::time::sleep(Duration::from_secs(200)).await;
        let (stats, _) = run.stop().await;
        let calls = source.0.lock().unwrap().clone();
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
        // Delays are base 1, 2, 4, 8, 16, 30, 30.. seconds plus jitter below the base.
        let bases = [1u64, 2, 4, 8, 16, 30, 30];
        assert!(gaps.len() >= bases.len(), "{gaps:?}");
        for (gap, base) in gaps.iter().zip(bases) {
            assert!(
                *gap >= Duration::from_secs(base) && *gap < Duration::from_secs(2 * base),
                "{gaps:?}"
            );
        }
        assert_eq!(stats.restarts as usize, calls.len());
        // Failing to start says nothing about the cursor: it is kept.
        assert!(calls.iter().all(|(_, c)| c.as_deref() == Some("kept")));
        assert_eq!(stats.cursor_resets, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cursor_that_never_yields_output_is_given_up() {
        // Every run from a cursor ends at once (journalctl rejecting a corrupt cursor); a run
        // from the journal's end works.
        struct RejectsCursors(Mutex<Vec<Option<String>>>);
        impl JournalSource for RejectsCursors {
            fn spawn(&self, after: Option<&str>) -> io::Result<JournalLines> {
                self.0.lock().unwrap().push(after.map(str::to_owned));
                Ok(match after {
                    Some(_) => Box::new(BufReader::new(std::io::Cursor::new(Vec::new()))),
                    None => {
                        let data = format!("{}\n", line("n1", 3, "fresh", 1)).into_bytes();
                        Box::new(BufReader::new(OpenEnded(std::io::Cursor::new(data))))
                    }
                })
            }
        }
        let source = Arc::new(RejectsCursors(Mutex::new(Vec::new())));
        let store = Arc::new(MemStore::default());
        store.save("corrupt");
        let mut run = start(Arc::clone(&source), Arc::clone(&store), 4, settings());
        assert_eq!(run.messages(1).await, ["fresh"]);
        let (stats, _) = run.stop().await;
        let corrupt = Some("corrupt".to_owned());
        assert_eq!(
            source.0.lock().unwrap().as_slice(),
            [corrupt.clone(), corrupt.clone(), corrupt, None]
        );
        assert_eq!(stats.cursor_resets, 1);
        assert_eq!(store.load().as_deref(), Some("n1"));
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_lines_duplicates_and_a_full_channel_are_counted() {
        let source = Arc::new(FakeSource::default());
        source.push("not json".to_owned());
        source.push("[1,2,3]".to_owned());
        source.push(String::new());
        source.push(line("c1", 3, "same", 1_000_000));
        source.push(line("c2", 3, "same", 2_000_000));
        source.push(line("c3", 3, "same", 3_000_000));
        source.push(line("c4", 3, "other", 4_000_000));
        source.push(line("c5", 3, "third", 5_000_000));
        let store = Arc::new(MemStore::default());
        // Room for two alerts; nobody reads until the reader is stopped.
        let run = start(Arc::clone(&source), Arc::clone(&store), 2, settings());
        let stats = run.stats.clone();
        // Wait (virtual time) for the reader to reach the last line.
        while stats.snapshot().lines < 7 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (stats, mut alerts) = run.stop().await;
        assert_eq!(stats.lines, 7);
        assert_eq!(stats.malformed, 2);
        assert_eq!(stats.duplicates, 2);
        assert_eq!(stats.alerts_sent, 2);
        assert_eq!(stats.dropped_full, 1);
        assert_eq!(alerts.recv().await.unwrap()["message"], "same");
        assert_eq!(alerts.recv().await.unwrap()["message"], "other");
        // The reader did not wait for the channel: the position is past the dropped alert.
        assert_eq!(store.load().as_deref(), Some("c5"));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_channel_stops_the_reader_before_the_unsent_entry() {
        let source = Arc::new(FakeSource::default());
        source.push(line("c1", 6, "info", 1));
        source.push(line("c2", 3, "alert", 2));
        let store = Arc::new(MemStore::default());
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let reader = JournalReader::new(source, Arc::clone(&store), lookup(), cfg(&[]), tx);
        let stats = reader.run(std::future::pending()).await;
        assert_eq!(stats.alerts_sent, 0);
        assert_eq!(store.load().as_deref(), Some("c1"));
    }

    #[tokio::test(start_paused = true)]
    async fn overlong_line_is_skipped() {
        let source = Arc::new(FakeSource::default());
        source.push(line("c1", 3, &"x".repeat(500), 1));
        source.push(line("c2", 3, "short", 2));
        let settings = ReaderSettings {
            max_line_len: 200,
            ..settings()
        };
        let mut run = start(source, Arc::new(MemStore::default()), 4, settings);
        assert_eq!(run.messages(1).await, ["short"]);
        let (stats, _) = run.stop().await;
        assert_eq!(stats.malformed, 1);
    }

    /// The process path: a real child that prints two entries and exits 1, is restarted with
    /// the last cursor, prints one more and stays alive until the reader stops (killing it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn command_source_child_is_restarted_after_exit() {
        let script = r#"
if [ -z "$JOURNAL_AFTER_CURSOR" ]; then
  printf '%s\n' '{"__CURSOR":"k1","__REALTIME_TIMESTAMP":"1000000","PRIORITY":"3","_SYSTEMD_UNIT":"foo.service","MESSAGE":"first"}'
  printf '%s\n' 'garbage'
  printf '%s\n' '{"__CURSOR":"k2","__REALTIME_TIMESTAMP":"2000000","PRIORITY":"1","_SYSTEMD_UNIT":"aos-cm.service","MESSAGE":"second"}'
  echo 'child failing on purpose' >&2
  exit 1
fi
printf '{"__CURSOR":"k3","__REALTIME_TIMESTAMP":"3000000","PRIORITY":"2","_SYSTEMD_UNIT":"foo.service","MESSAGE":"resumed after %s"}\n' "$JOURNAL_AFTER_CURSOR"
exec sleep 60
"#;
        let source = CommandSource::new("sh", ["-c", script]);
        let store = Arc::new(MemStore::default());
        let settings = ReaderSettings {
            restart_min_delay: Duration::from_millis(10),
            restart_max_delay: Duration::from_millis(100),
            ..settings()
        };
        let mut run = start(source, Arc::clone(&store), 8, settings);
        let got = tokio::time::timeout(Duration::from_secs(30), run.messages(3))
            .await
            .expect("alerts from the child");
        assert_eq!(got, ["first", "second", "resumed after k2"]);
        let (stats, mut rest) = tokio::time::timeout(Duration::from_secs(30), run.stop())
            .await
            .expect("reader stops");
        assert!(rest.try_recv().is_err());
        assert_eq!(stats.malformed, 1);
        assert_eq!(stats.restarts, 1);
        assert_eq!(store.load().as_deref(), Some("k3"));
    }

    #[tokio::test]
    async fn missing_program_is_an_error_not_a_panic() {
        let source = JournalctlSource::new(3).with_program("/nonexistent/journalctl");
        assert!(source.spawn(None).is_err());
    }
}
