//! The communication manager's configuration file (`aos_cm.cfg`).
//!
//! The file is JSON with the same keys, defaults and derived paths as the upstream C++ CM's
//! `cm.cfg`, so an existing `cm.cfg` can be used unchanged. As upstream, keys are matched
//! case-insensitively at every level and no key is mandatory. Unlike upstream, unknown keys are
//! reported as warnings (a typo should not silently fall back to a default), and every invalid
//! value is reported at once instead of stopping at the first one.
//!
//! Durations accept Go-style strings (`1m30s`, `30d`), ISO-8601 (`PT1M30S`), and plain seconds
//! either as a string (`"30"`) or as a JSON number (`30`, `0.5`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::api::journal::{JournalAlertsConfig, JournalConfigError};
use crate::model::{KindSchedule, TimeSlot, TimetableDay, UpdatePolicy, UpdateSchedules};

const DEFAULT_CERT_STORAGE: &str = "/var/aos/crypt/cm/";
const DEFAULT_DNS_STORAGE_PATH: &str = "/var/aos/dns";
const DEFAULT_MIGRATION_PATH: &str = "/usr/share/aos/communicationmanager/migration";

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(60 * 60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

const TOP_KEYS: &[&str] = &[
    "caCert",
    "workingDir",
    "serviceDiscoveryUrl",
    "overrideServiceDiscoveryUrl",
    "cloudMessageLog",
    "iamProtectedServerUrl",
    "iamPublicServerUrl",
    "cmServerUrl",
    "fileServerUrl",
    "certStorage",
    "storageDir",
    "stateDir",
    "unitConfigFile",
    "unitStatusSendTimeout",
    "cloudResponseWaitTimeout",
    "dnsStoragePath",
    "dnsIp",
    "dnsPidFile",
    "monitoring",
    "alerts",
    "nodeInfoProvider",
    "imageManager",
    "launcher",
    "migration",
    "identity",
    "updateSchedulerUrl",
    "updateScheduler",
    "metrics",
];
const IDENTITY_KEYS: &[&str] = &[
    "systemId",
    "unitModel",
    "nodeId",
    "nodesFile",
    "certFile",
    "keyFile",
    "smCertFile",
    "smKeyFile",
];
const MONITORING_KEYS: &[&str] = &["pollPeriod", "averageWindow", "sendPeriod"];
const ALERTS_KEYS: &[&str] = &["sendPeriod", "journalAlerts"];
const JOURNAL_ALERTS_KEYS: &[&str] = &["filter", "serviceAlertPriority", "systemAlertPriority"];
const NODE_INFO_PROVIDER_KEYS: &[&str] = &["smConnectionTimeout"];
const IMAGE_MANAGER_KEYS: &[&str] = &[
    "installPath",
    "downloadPath",
    "updateItemTtl",
    "removeOutdatedPeriod",
    "maxConcurrentDownloads",
    "downloadPartLimit",
];
const LAUNCHER_KEYS: &[&str] = &[
    "nodesConnectionTimeout",
    "instanceTtl",
    "checkOverrideEnvVarsPeriod",
];
const MIGRATION_KEYS: &[&str] = &["migrationPath", "mergedMigrationPath"];
const UPDATE_SCHEDULER_KEYS: &[&str] = &["sota", "fota"];
const METRICS_KEYS: &[&str] = &["enabled", "listen"];

/// `metrics` section (ours): the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Off by default.
    pub enabled: bool,
    /// Where `GET /metrics` is served; loopback by default.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "127.0.0.1:9464".to_owned(),
        }
    }
}
const KIND_SCHEDULE_KEYS: &[&str] = &["policy", "timetable"];
const TIMETABLE_KEYS: &[&str] = &["dayOfWeek", "timeSlots"];
const TIME_SLOT_KEYS: &[&str] = &["start", "end"];

/// `monitoring` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitoringConfig {
    pub poll_period: Duration,
    pub average_window: Duration,
    pub send_period: Duration,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            poll_period: 35 * SECOND,
            average_window: 35 * SECOND,
            send_period: MINUTE,
        }
    }
}

/// `alerts` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertsConfig {
    pub send_period: Duration,
    /// `alerts.journalAlerts`: journal alerts on the main node; off (`None`) when the section is
    /// absent or `null`. Its filters are checked when the file is loaded.
    pub journal_alerts: Option<JournalAlertsConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            send_period: 10 * SECOND,
            journal_alerts: None,
        }
    }
}

/// `nodeInfoProvider` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfoProviderConfig {
    /// How long a node's SM may stay away before the node is put into the `error` state.
    pub sm_connection_timeout: Duration,
}

impl Default for NodeInfoProviderConfig {
    fn default() -> Self {
        Self {
            sm_connection_timeout: MINUTE,
        }
    }
}

/// `imageManager` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManagerConfig {
    /// Default `<workingDir>/install`.
    pub install_path: PathBuf,
    /// Default `<workingDir>/download`.
    pub download_path: PathBuf,
    pub update_item_ttl: Duration,
    pub remove_outdated_period: Duration,
    /// Blobs downloaded at once (upstream's downloader: 4).
    pub max_concurrent_downloads: u64,
    /// How full (percent) downloads may make the download partition: space for a blob is
    /// reserved before its download, and a blob that does not fit waits (upstream: 100).
    pub download_part_limit: u64,
}

impl ImageManagerConfig {
    fn defaults(working_dir: &Path) -> Self {
        Self {
            install_path: working_dir.join("install"),
            download_path: working_dir.join("download"),
            update_item_ttl: 30 * DAY,
            remove_outdated_period: 24 * HOUR,
            max_concurrent_downloads: 4,
            download_part_limit: 100,
        }
    }
}

/// `launcher` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LauncherConfig {
    pub nodes_connection_timeout: Duration,
    pub instance_ttl: Duration,
    pub check_override_env_vars_period: Duration,
}

impl Default for LauncherConfig {
    fn default() -> Self {
        Self {
            nodes_connection_timeout: 10 * MINUTE,
            instance_ttl: 30 * DAY,
            check_override_env_vars_period: MINUTE,
        }
    }
}

/// `migration` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Shipped migration scripts; must exist at runtime.
    pub migration_path: PathBuf,
    /// Default `<workingDir>/migration`.
    pub merged_migration_path: PathBuf,
}

impl MigrationConfig {
    fn defaults(working_dir: &Path) -> Self {
        Self {
            migration_path: PathBuf::from(DEFAULT_MIGRATION_PATH),
            merged_migration_path: working_dir.join("migration"),
        }
    }
}

/// `identity` section (ours, not upstream's): a static identity for units without IAM. The
/// system ID, unit model and main node ID are given here, the nodes' IAM information comes from
/// `nodesFile` (the `nodes.json` form of the examples: per node `nodeInfo` in proto3 JSON), and
/// the certificates from PEM files. Absent = the identity comes from IAM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityConfig {
    pub system_id: String,
    pub unit_model: String,
    /// The main node's ID (the node this CM runs on).
    pub node_id: String,
    pub nodes_file: PathBuf,
    /// The `online` certificate chain (PEM) presented to the cloud; empty = none.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Certificate and key of the SM server (PEM); empty = plaintext gRPC.
    pub sm_cert_file: PathBuf,
    pub sm_key_file: PathBuf,
}

/// The whole configuration file, with defaults applied.
///
/// Empty strings mean "not set" for the keys whose default is empty (for example
/// `cloud_message_log` empty = cloud message logging off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub ca_cert: PathBuf,
    pub working_dir: PathBuf,
    pub service_discovery_url: String,
    pub override_service_discovery_url: String,
    pub cloud_message_log: PathBuf,
    pub iam_protected_server_url: String,
    pub iam_public_server_url: String,
    pub cm_server_url: String,
    pub file_server_url: String,
    /// A directory or a storage name understood by IAM (the shipped sample says `cm`), so not
    /// a `PathBuf`.
    pub cert_storage: String,
    /// Default `<workingDir>/storages`.
    pub storage_dir: PathBuf,
    /// Default `<workingDir>/states`.
    pub state_dir: PathBuf,
    /// Default `<workingDir>/aos_unit.cfg`.
    pub unit_config_file: PathBuf,
    pub unit_status_send_timeout: Duration,
    pub cloud_response_wait_timeout: Duration,
    pub dns_storage_path: PathBuf,
    pub dns_ip: String,
    /// Default `<dnsStoragePath>/pidfile`.
    pub dns_pid_file: PathBuf,
    pub monitoring: MonitoringConfig,
    pub alerts: AlertsConfig,
    pub node_info_provider: NodeInfoProviderConfig,
    pub image_manager: ImageManagerConfig,
    pub launcher: LauncherConfig,
    pub migration: MigrationConfig,
    /// Static identity; `None` = from IAM.
    pub identity: Option<IdentityConfig>,
    /// Where the update scheduler gRPC service (`communicationmanager.v3`) listens; empty =
    /// not served. Our own key: upstream served it on `cmServerUrl`, which is our SM server.
    pub update_scheduler_url: String,
    /// `updateScheduler`: when a downloaded update may change the running unit, per kind.
    pub update_scheduler: UpdateSchedules,
    /// `metrics`: the optional Prometheus endpoint.
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self::defaults(Path::new(""), Path::new(DEFAULT_DNS_STORAGE_PATH))
    }
}

/// One invalid value found in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted path with the canonical key spelling, e.g. `monitoring.sendPeriod`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is part of the message rather than a `source()`, so that error-chain
    /// printers do not show it twice.
    #[error("cannot read config file {file}: {error}")]
    Io { file: String, error: std::io::Error },
    /// Not valid JSON; `line` and `column` are 1-based as reported by serde_json.
    #[error("{file}:{line}:{column}: invalid JSON: {message}")]
    Json {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// Valid JSON, but not an object (e.g. an array).
    #[error("{file}: the top level must be a JSON object, found {found}")]
    NotObject { file: String, found: String },
    /// One or more values have the wrong type or cannot be parsed; all of them are listed.
    #[error("{file}: {}", join_issues(.issues))]
    Invalid {
        file: String,
        issues: Vec<ConfigIssue>,
    },
}

fn join_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(ConfigIssue::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Config {
    fn defaults(working_dir: &Path, dns_storage_path: &Path) -> Self {
        Self {
            ca_cert: PathBuf::new(),
            working_dir: working_dir.to_path_buf(),
            service_discovery_url: String::new(),
            override_service_discovery_url: String::new(),
            cloud_message_log: PathBuf::new(),
            iam_protected_server_url: String::new(),
            iam_public_server_url: String::new(),
            cm_server_url: String::new(),
            file_server_url: String::new(),
            cert_storage: DEFAULT_CERT_STORAGE.to_string(),
            storage_dir: working_dir.join("storages"),
            state_dir: working_dir.join("states"),
            unit_config_file: working_dir.join("aos_unit.cfg"),
            unit_status_send_timeout: 10 * SECOND,
            cloud_response_wait_timeout: 10 * SECOND,
            dns_storage_path: dns_storage_path.to_path_buf(),
            dns_ip: String::new(),
            dns_pid_file: dns_storage_path.join("pidfile"),
            monitoring: MonitoringConfig::default(),
            alerts: AlertsConfig::default(),
            node_info_provider: NodeInfoProviderConfig::default(),
            image_manager: ImageManagerConfig::defaults(working_dir),
            launcher: LauncherConfig::default(),
            migration: MigrationConfig::defaults(working_dir),
            identity: None,
            update_scheduler_url: String::new(),
            update_scheduler: UpdateSchedules::default(),
            metrics: MetricsConfig::default(),
        }
    }

    /// Our own database (upstream keeps `cm.db` there; the different name keeps the two apart).
    pub fn store_path(&self) -> PathBuf {
        self.working_dir.join("cm.redb")
    }

    /// Reads and parses the file; the second element holds the warnings (unknown or repeated
    /// keys, empty values replaced by defaults), each naming the file and the key.
    pub fn load(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            file: file.clone(),
            error,
        })?;
        Self::from_json_str(&text, &file)
    }

    /// Parses `text`; `file` is only used in messages.
    pub fn from_json_str(text: &str, file: &str) -> Result<(Config, Vec<String>), ConfigError> {
        // Editors on some systems save a byte-order mark, which JSON parsers reject.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);

        // serde_json validates and gives good error positions, but its map does not keep the
        // document order we need for "the later of two keys wins"; the scanner below does.
        let value: Value = serde_json::from_str(text).map_err(|err| json_error(file, &err))?;
        if !value.is_object() {
            return Err(ConfigError::NotObject {
                file: file.to_string(),
                found: describe_value(&value),
            });
        }
        let root = Scanner::new(text).document().map_err(|(pos, message)| {
            let (line, column) = line_column(text, pos);
            ConfigError::Json {
                file: file.to_string(),
                line,
                column,
                message,
            }
        })?;
        let Node::Object(entries) = &root else {
            return Err(ConfigError::NotObject {
                file: file.to_string(),
                found: root.describe(),
            });
        };

        let mut ctx = Ctx::default();
        let config = build(&mut ctx, entries);
        if ctx.issues.is_empty() {
            let warnings = ctx
                .warnings
                .into_iter()
                .map(|w| format!("{file}: {w}"))
                .collect();
            Ok((config, warnings))
        } else {
            Err(ConfigError::Invalid {
                file: file.to_string(),
                issues: ctx.issues,
            })
        }
    }
}

/// True when `v` is an object with at least one known top-level config key (any case).
pub fn looks_like_config(v: &Value) -> bool {
    v.as_object().is_some_and(|map| {
        map.keys()
            .any(|k| TOP_KEYS.iter().any(|known| known.eq_ignore_ascii_case(k)))
    })
}

fn json_error(file: &str, err: &serde_json::Error) -> ConfigError {
    let (line, column) = (err.line(), err.column());
    let full = err.to_string();
    // The position is already in our prefix; do not repeat it.
    let suffix = format!(" at line {line} column {column}");
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
    ConfigError::Json {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

fn line_column(text: &str, pos: usize) -> (usize, usize) {
    let before = text.get(..pos).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// ---------------------------------------------------------------------------------------------
// Building the typed config
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Ctx {
    warnings: Vec<String>,
    issues: Vec<ConfigIssue>,
}

impl Ctx {
    fn issue(&mut self, key: String, message: String) {
        self.issues.push(ConfigIssue { key, message });
    }
}

/// The entries of one JSON object matched against the known keys of that level.
struct Fields<'a> {
    section: Option<&'static str>,
    values: Vec<(&'static str, &'a Node)>,
}

impl<'a> Fields<'a> {
    fn resolve(
        ctx: &mut Ctx,
        section: Option<&'static str>,
        entries: &'a [(String, Node)],
        known: &'static [&'static str],
    ) -> Self {
        let mut values: Vec<(&'static str, &'a Node)> = Vec::new();
        let mut spelled: Vec<(&'static str, &'a str)> = Vec::new();
        for (name, node) in entries {
            let Some(canonical) = known.iter().find(|k| k.eq_ignore_ascii_case(name)) else {
                ctx.warnings
                    .push(format!("unknown key `{}` ignored", dotted(section, name)));
                continue;
            };
            if let Some((_, earlier)) = spelled.iter().find(|(k, _)| k == canonical) {
                ctx.warnings.push(format!(
                    "key `{}` is given more than once (`{earlier}`, then `{name}`); the last one wins",
                    dotted(section, canonical)
                ));
            }
            spelled.retain(|(k, _)| k != canonical);
            spelled.push((canonical, name.as_str()));
            values.retain(|(k, _)| k != canonical);
            // Upstream treats a null value as an absent key.
            if !matches!(node, Node::Scalar(Value::Null)) {
                values.push((canonical, node));
            }
        }
        Self { section, values }
    }

    fn empty() -> Self {
        Self {
            section: None,
            values: Vec::new(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Node> {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, node)| *node)
    }

    fn path_of(&self, key: &str) -> String {
        dotted(self.section, key)
    }

    fn string(&self, ctx: &mut Ctx, key: &str) -> Option<String> {
        match self.get(key)? {
            Node::Scalar(Value::String(s)) => Some(s.clone()),
            other => {
                ctx.issue(
                    self.path_of(key),
                    format!("expected a string, found {}", other.describe()),
                );
                None
            }
        }
    }

    /// A string whose default is not empty: an empty value would otherwise silently put
    /// files into the current directory, so it falls back to the default.
    fn string_or(&self, ctx: &mut Ctx, key: &str, default: String) -> String {
        match self.string(ctx, key) {
            Some(s) if s.is_empty() => {
                ctx.warnings.push(format!(
                    "key `{}` is empty; using the default {default:?}",
                    self.path_of(key)
                ));
                default
            }
            Some(s) => s,
            None => default,
        }
    }

    fn path_or(&self, ctx: &mut Ctx, key: &str, default: PathBuf) -> PathBuf {
        let default = default.to_string_lossy().into_owned();
        PathBuf::from(self.string_or(ctx, key, default))
    }

    fn bool_or(&self, ctx: &mut Ctx, key: &str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Node::Scalar(Value::Bool(b))) => *b,
            Some(other) => {
                ctx.issue(
                    self.path_of(key),
                    format!("expected true or false, found {}", other.describe()),
                );
                default
            }
        }
    }

    /// A whole number in `range`; anything else is an issue naming the key and the range.
    fn integer_in(
        &self,
        ctx: &mut Ctx,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> u64 {
        let Some(node) = self.get(key) else {
            return default;
        };
        match node {
            Node::Scalar(Value::Number(n)) if n.as_u64().is_some_and(|v| range.contains(&v)) => {
                n.as_u64().unwrap_or(default)
            }
            other => {
                ctx.issue(
                    self.path_of(key),
                    format!(
                        "expected a whole number from {} to {}, found {}",
                        range.start(),
                        range.end(),
                        other.describe()
                    ),
                );
                default
            }
        }
    }

    fn duration_or(&self, ctx: &mut Ctx, key: &str, default: Duration) -> Duration {
        let Some(node) = self.get(key) else {
            return default;
        };
        let parsed = match node {
            Node::Scalar(Value::String(s)) => parse_duration(s),
            Node::Scalar(Value::Number(n)) => duration_from_number(n),
            other => Err(format!(
                "expected a duration (a string like \"10s\" or a number of seconds), found {}",
                other.describe()
            )),
        };
        parsed.unwrap_or_else(|message| {
            ctx.issue(self.path_of(key), message);
            default
        })
    }

    fn section(
        &self,
        ctx: &mut Ctx,
        key: &'static str,
        known: &'static [&'static str],
    ) -> Fields<'a> {
        match self.get(key) {
            None => Fields::empty(),
            Some(Node::Object(entries)) => Fields::resolve(ctx, Some(key), entries, known),
            Some(other) => {
                ctx.issue(
                    self.path_of(key),
                    format!("expected an object, found {}", other.describe()),
                );
                Fields::empty()
            }
        }
    }
}

/// `alerts.journalAlerts`: `None` when absent or `null`. Keys go through the same resolution as
/// every other section (any case, the last of repeated keys wins, unknown keys warned about);
/// the values are then read by [`JournalAlertsConfig::from_json`] and the filters compiled, so
/// an invalid regex is a config error naming its entry.
fn journal_alerts(ctx: &mut Ctx, alerts: &Fields<'_>) -> Option<JournalAlertsConfig> {
    const KEY: &str = "alerts.journalAlerts";
    let entries = match alerts.get("journalAlerts")? {
        Node::Object(entries) => entries,
        other => {
            ctx.issue(
                KEY.to_string(),
                format!("expected an object, found {}", other.describe()),
            );
            return None;
        }
    };
    let section = Fields::resolve(ctx, Some(KEY), entries, JOURNAL_ALERTS_KEYS);
    let object: serde_json::Map<String, Value> = section
        .values
        .iter()
        .map(|(key, node)| ((*key).to_string(), node.to_value()))
        .collect();
    let parsed =
        JournalAlertsConfig::from_json(&Value::Object(object)).and_then(|(config, warnings)| {
            config.compile()?;
            Ok((config, warnings))
        });
    match parsed {
        Ok((config, warnings)) => {
            ctx.warnings.extend(warnings);
            Some(config)
        }
        Err(JournalConfigError::InvalidFilter { index, source }) => {
            ctx.issue(
                format!("{KEY}.filter[{index}]"),
                format!("invalid regex: {source}"),
            );
            None
        }
        Err(JournalConfigError::InvalidValue { key, message }) => {
            ctx.issue(key, message);
            None
        }
    }
}

/// `updateScheduler`: the policy of each kind of update (`auto` when absent).
fn update_scheduler(ctx: &mut Ctx, top: &Fields<'_>) -> UpdateSchedules {
    let section = top.section(ctx, "updateScheduler", UPDATE_SCHEDULER_KEYS);
    UpdateSchedules {
        sota: kind_schedule(ctx, section.get("sota"), "updateScheduler.sota"),
        fota: kind_schedule(ctx, section.get("fota"), "updateScheduler.fota"),
    }
}

fn kind_schedule(ctx: &mut Ctx, node: Option<&Node>, path: &'static str) -> KindSchedule {
    let fields = match node {
        None => return KindSchedule::default(),
        Some(Node::Object(entries)) => {
            Fields::resolve(ctx, Some(path), entries, KIND_SCHEDULE_KEYS)
        }
        Some(other) => {
            ctx.issue(
                path.to_string(),
                format!("expected an object, found {}", other.describe()),
            );
            return KindSchedule::default();
        }
    };
    let policy = match fields.string(ctx, "policy") {
        None => UpdatePolicy::Auto,
        Some(s) => match s.to_ascii_lowercase().as_str() {
            "auto" => UpdatePolicy::Auto,
            "trigger" => UpdatePolicy::Trigger,
            "timetable" => UpdatePolicy::Timetable,
            _ => {
                ctx.issue(
                    format!("{path}.policy"),
                    format!("expected one of \"auto\", \"trigger\", \"timetable\", found {s:?}"),
                );
                UpdatePolicy::Auto
            }
        },
    };
    let timetable = match fields.get("timetable") {
        None => Vec::new(),
        Some(Node::Array(days)) => days
            .iter()
            .enumerate()
            .filter_map(|(i, day)| timetable_day(ctx, day, &format!("{path}.timetable[{i}]")))
            .collect(),
        Some(other) => {
            ctx.issue(
                format!("{path}.timetable"),
                format!("expected an array, found {}", other.describe()),
            );
            Vec::new()
        }
    };
    if policy == UpdatePolicy::Timetable && timetable.iter().all(|d| d.slots.is_empty()) {
        ctx.issue(
            format!("{path}.timetable"),
            "policy \"timetable\" needs at least one time slot".to_string(),
        );
    }
    KindSchedule { policy, timetable }
}

/// Warns about the keys of an array entry that are not `known` (any case).
fn warn_unknown(ctx: &mut Ctx, entries: &[(String, Node)], known: &[&str], path: &str) {
    for (name, _) in entries {
        if !known.iter().any(|k| k.eq_ignore_ascii_case(name)) {
            ctx.warnings
                .push(format!("unknown key `{path}.{name}` ignored"));
        }
    }
}

/// The value of `key` in an object's entries (any case; the last one wins; null = absent).
fn entry<'a>(entries: &'a [(String, Node)], key: &str) -> Option<&'a Node> {
    entries
        .iter()
        .rev()
        .find(|(name, _)| name.eq_ignore_ascii_case(key))
        .map(|(_, node)| node)
        .filter(|node| !matches!(node, Node::Scalar(Value::Null)))
}

fn timetable_day(ctx: &mut Ctx, node: &Node, path: &str) -> Option<TimetableDay> {
    let Node::Object(entries) = node else {
        ctx.issue(
            path.to_string(),
            format!("expected an object, found {}", node.describe()),
        );
        return None;
    };
    warn_unknown(ctx, entries, TIMETABLE_KEYS, path);
    let day = match entry(entries, "dayOfWeek") {
        Some(Node::Scalar(Value::Number(n)))
            if n.as_u64().is_some_and(|d| (1..=7).contains(&d)) =>
        {
            n.as_u64().and_then(|d| u8::try_from(d).ok())
        }
        Some(other) => {
            ctx.issue(
                format!("{path}.dayOfWeek"),
                format!(
                    "expected a day of the week 1 (Monday) .. 7 (Sunday), found {}",
                    other.describe()
                ),
            );
            None
        }
        None => {
            ctx.issue(format!("{path}.dayOfWeek"), "is required".to_string());
            None
        }
    };
    let mut slots = Vec::new();
    match entry(entries, "timeSlots") {
        Some(Node::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                if let Some(slot) = time_slot(ctx, item, &format!("{path}.timeSlots[{i}]")) {
                    slots.push(slot);
                }
            }
        }
        Some(Node::Array(_)) | None => ctx.issue(
            format!("{path}.timeSlots"),
            "needs at least one time slot".to_string(),
        ),
        Some(other) => ctx.issue(
            format!("{path}.timeSlots"),
            format!("expected an array, found {}", other.describe()),
        ),
    }
    day.map(|day_of_week| TimetableDay { day_of_week, slots })
}

fn time_slot(ctx: &mut Ctx, node: &Node, path: &str) -> Option<TimeSlot> {
    let Node::Object(entries) = node else {
        ctx.issue(
            path.to_string(),
            format!("expected an object, found {}", node.describe()),
        );
        return None;
    };
    warn_unknown(ctx, entries, TIME_SLOT_KEYS, path);
    let time = |ctx: &mut Ctx, key: &str| -> Option<u32> {
        let at = format!("{path}.{key}");
        match entry(entries, key) {
            Some(Node::Scalar(Value::String(s))) => match parse_time_of_day(s) {
                Ok(secs) => Some(secs),
                Err(message) => {
                    ctx.issue(at, message);
                    None
                }
            },
            Some(other) => {
                ctx.issue(
                    at,
                    format!("expected a time \"HH:MM:SS\", found {}", other.describe()),
                );
                None
            }
            None => {
                ctx.issue(at, "is required".to_string());
                None
            }
        }
    };
    let start = time(ctx, "start");
    let end = time(ctx, "end");
    let (start, end) = (start?, end?);
    if start >= end {
        ctx.issue(
            path.to_string(),
            "start must be before end (a slot cannot cross midnight)".to_string(),
        );
        return None;
    }
    Some(TimeSlot { start, end })
}

/// Seconds since midnight of `HH:MM[:SS]` (24:00:00 allowed as an end of day).
fn parse_time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("expected a time \"HH:MM:SS\", found {s:?}");
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let mut nums = [0u32; 3];
    for (n, p) in nums.iter_mut().zip(&parts) {
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        *n = p.parse().map_err(|_| bad())?;
    }
    let [h, m, sec] = nums;
    let secs = h * 3600 + m * 60 + sec;
    if m >= 60 || sec >= 60 || secs > 24 * 3600 {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(secs)
}

fn dotted(section: Option<&str>, key: &str) -> String {
    match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    }
}

fn build(ctx: &mut Ctx, entries: &[(String, Node)]) -> Config {
    let top = Fields::resolve(ctx, None, entries, TOP_KEYS);

    // Everything derived hangs off these two, so they are read first.
    let working_dir = PathBuf::from(top.string(ctx, "workingDir").unwrap_or_default());
    let dns_storage_path = top.path_or(ctx, "dnsStoragePath", DEFAULT_DNS_STORAGE_PATH.into());
    let d = Config::defaults(&working_dir, &dns_storage_path);

    let monitoring = top.section(ctx, "monitoring", MONITORING_KEYS);
    let alerts = top.section(ctx, "alerts", ALERTS_KEYS);
    let node_info = top.section(ctx, "nodeInfoProvider", NODE_INFO_PROVIDER_KEYS);
    let image = top.section(ctx, "imageManager", IMAGE_MANAGER_KEYS);
    let launcher = top.section(ctx, "launcher", LAUNCHER_KEYS);
    let migration = top.section(ctx, "migration", MIGRATION_KEYS);
    let metrics = top.section(ctx, "metrics", METRICS_KEYS);
    let identity = top
        .get("identity")
        .is_some()
        .then(|| top.section(ctx, "identity", IDENTITY_KEYS));

    Config {
        update_scheduler_url: top.string(ctx, "updateSchedulerUrl").unwrap_or_default(),
        update_scheduler: update_scheduler(ctx, &top),
        metrics: MetricsConfig {
            enabled: metrics.bool_or(ctx, "enabled", d.metrics.enabled),
            listen: metrics.string_or(ctx, "listen", d.metrics.listen.clone()),
        },
        ca_cert: top.string(ctx, "caCert").unwrap_or_default().into(),
        working_dir,
        service_discovery_url: top.string(ctx, "serviceDiscoveryUrl").unwrap_or_default(),
        override_service_discovery_url: top
            .string(ctx, "overrideServiceDiscoveryUrl")
            .unwrap_or_default(),
        cloud_message_log: top
            .string(ctx, "cloudMessageLog")
            .unwrap_or_default()
            .into(),
        iam_protected_server_url: top.string(ctx, "iamProtectedServerUrl").unwrap_or_default(),
        iam_public_server_url: top.string(ctx, "iamPublicServerUrl").unwrap_or_default(),
        cm_server_url: top.string(ctx, "cmServerUrl").unwrap_or_default(),
        file_server_url: top.string(ctx, "fileServerUrl").unwrap_or_default(),
        cert_storage: top.string_or(ctx, "certStorage", d.cert_storage),
        storage_dir: top.path_or(ctx, "storageDir", d.storage_dir),
        state_dir: top.path_or(ctx, "stateDir", d.state_dir),
        unit_config_file: top.path_or(ctx, "unitConfigFile", d.unit_config_file),
        unit_status_send_timeout: top.duration_or(
            ctx,
            "unitStatusSendTimeout",
            d.unit_status_send_timeout,
        ),
        cloud_response_wait_timeout: top.duration_or(
            ctx,
            "cloudResponseWaitTimeout",
            d.cloud_response_wait_timeout,
        ),
        dns_storage_path,
        dns_ip: top.string(ctx, "dnsIp").unwrap_or_default(),
        dns_pid_file: top.path_or(ctx, "dnsPidFile", d.dns_pid_file),
        monitoring: MonitoringConfig {
            poll_period: monitoring.duration_or(ctx, "pollPeriod", d.monitoring.poll_period),
            average_window: monitoring.duration_or(
                ctx,
                "averageWindow",
                d.monitoring.average_window,
            ),
            send_period: monitoring.duration_or(ctx, "sendPeriod", d.monitoring.send_period),
        },
        alerts: AlertsConfig {
            send_period: alerts.duration_or(ctx, "sendPeriod", d.alerts.send_period),
            journal_alerts: journal_alerts(ctx, &alerts),
        },
        node_info_provider: NodeInfoProviderConfig {
            sm_connection_timeout: node_info.duration_or(
                ctx,
                "smConnectionTimeout",
                d.node_info_provider.sm_connection_timeout,
            ),
        },
        image_manager: ImageManagerConfig {
            install_path: image.path_or(ctx, "installPath", d.image_manager.install_path),
            download_path: image.path_or(ctx, "downloadPath", d.image_manager.download_path),
            update_item_ttl: image.duration_or(
                ctx,
                "updateItemTtl",
                d.image_manager.update_item_ttl,
            ),
            remove_outdated_period: image.duration_or(
                ctx,
                "removeOutdatedPeriod",
                d.image_manager.remove_outdated_period,
            ),
            max_concurrent_downloads: image.integer_in(
                ctx,
                "maxConcurrentDownloads",
                1..=64,
                d.image_manager.max_concurrent_downloads,
            ),
            download_part_limit: image.integer_in(
                ctx,
                "downloadPartLimit",
                0..=100,
                d.image_manager.download_part_limit,
            ),
        },
        launcher: LauncherConfig {
            nodes_connection_timeout: launcher.duration_or(
                ctx,
                "nodesConnectionTimeout",
                d.launcher.nodes_connection_timeout,
            ),
            instance_ttl: launcher.duration_or(ctx, "instanceTtl", d.launcher.instance_ttl),
            check_override_env_vars_period: launcher.duration_or(
                ctx,
                "checkOverrideEnvVarsPeriod",
                d.launcher.check_override_env_vars_period,
            ),
        },
        migration: MigrationConfig {
            migration_path: migration.path_or(ctx, "migrationPath", d.migration.migration_path),
            merged_migration_path: migration.path_or(
                ctx,
                "mergedMigrationPath",
                d.migration.merged_migration_path,
            ),
        },
        identity: identity.map(|id| {
            let system_id = id.string(ctx, "systemId").unwrap_or_default();
            if system_id.is_empty() {
                ctx.issue(
                    "identity.systemId".to_string(),
                    "is required when `identity` is given".to_string(),
                );
            }
            let node_id = id.string(ctx, "nodeId").unwrap_or_default();
            if node_id.is_empty() {
                ctx.issue(
                    "identity.nodeId".to_string(),
                    "is required when `identity` is given (the main node's ID)".to_string(),
                );
            }
            IdentityConfig {
                system_id,
                unit_model: id.string(ctx, "unitModel").unwrap_or_default(),
                node_id,
                nodes_file: id.string(ctx, "nodesFile").unwrap_or_default().into(),
                cert_file: id.string(ctx, "certFile").unwrap_or_default().into(),
                key_file: id.string(ctx, "keyFile").unwrap_or_default().into(),
                sm_cert_file: id.string(ctx, "smCertFile").unwrap_or_default().into(),
                sm_key_file: id.string(ctx, "smKeyFile").unwrap_or_default().into(),
            }
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Order-preserving JSON tree
// ---------------------------------------------------------------------------------------------

/// A JSON value whose objects keep every entry in document order, duplicates included.
enum Node {
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    Scalar(Value),
}

impl Node {
    fn describe(&self) -> String {
        match self {
            Node::Object(_) => "an object".to_string(),
            Node::Array(_) => "an array".to_string(),
            Node::Scalar(v) => describe_value(v),
        }
    }

    /// The plain JSON value; of repeated object keys the last one wins.
    fn to_value(&self) -> Value {
        match self {
            Node::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(key, node)| (key.clone(), node.to_value()))
                    .collect(),
            ),
            Node::Array(items) => Value::Array(items.iter().map(Node::to_value).collect()),
            Node::Scalar(v) => v.clone(),
        }
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// Walks text that serde_json has already accepted, so it only needs to find token boundaries;
/// decoding of strings and numbers is left to serde_json to keep its exact semantics.
struct Scanner<'t> {
    text: &'t str,
    pos: usize,
}

type ScanResult<T> = Result<T, (usize, String)>;

impl<'t> Scanner<'t> {
    fn new(text: &'t str) -> Self {
        Self { text, pos: 0 }
    }

    fn document(mut self) -> ScanResult<Node> {
        let node = self.value()?;
        self.skip_ws();
        if self.pos != self.text.len() {
            return Err(self.fail("trailing characters"));
        }
        Ok(node)
    }

    fn fail(&self, what: &str) -> (usize, String) {
        (self.pos, what.to_string())
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn consume(&mut self, byte: u8) -> ScanResult<()> {
        self.skip_ws();
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.fail(&format!("expected `{}`", char::from(byte))))
        }
    }

    fn value(&mut self) -> ScanResult<Node> {
        self.skip_ws();
        match self.peek() {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => Ok(Node::Scalar(Value::String(self.string()?))),
            Some(_) => self.scalar(),
            None => Err(self.fail("unexpected end of input")),
        }
    }

    fn object(&mut self) -> ScanResult<Node> {
        self.consume(b'{')?;
        let mut entries = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Node::Object(entries));
        }
        loop {
            self.skip_ws();
            let key = self.string()?;
            self.consume(b':')?;
            let value = self.value()?;
            entries.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Node::Object(entries));
                }
                _ => return Err(self.fail("expected `,` or `}`")),
            }
        }
    }

    fn array(&mut self) -> ScanResult<Node> {
        self.consume(b'[')?;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Node::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Node::Array(items));
                }
                _ => return Err(self.fail("expected `,` or `]`")),
            }
        }
    }

    fn string(&mut self) -> ScanResult<String> {
        if self.peek() != Some(b'"') {
            return Err(self.fail("expected a string"));
        }
        let start = self.pos;
        let bytes = self.text.as_bytes();
        let mut i = start + 1;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'\\' => i += 2,
                b'"' => {
                    let raw = self.text.get(start..=i).unwrap_or_default();
                    self.pos = i + 1;
                    return serde_json::from_str(raw).map_err(|e| (start, e.to_string()));
                }
                _ => i += 1,
            }
        }
        Err(self.fail("unterminated string"))
    }

    fn scalar(&mut self) -> ScanResult<Node> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.pos += 1;
        }
        let raw = self.text.get(start..self.pos).unwrap_or_default();
        serde_json::from_str(raw)
            .map(Node::Scalar)
            .map_err(|e| (start, e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------------

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Go-style units; two-letter ones first so `ms` is not read as `m` + garbage.
const GO_UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("d", 86_400 * NANOS_PER_SEC),
    ("w", 7 * 86_400 * NANOS_PER_SEC),
    ("y", 365 * 86_400 * NANOS_PER_SEC),
];

/// ISO-8601 designators in the order they must appear; a month is taken as 30 days and a year
/// as 365 days, since a configured period has no calendar anchor.
const ISO_DATE_UNITS: &[(char, u128)] = &[
    ('Y', 365 * 86_400 * NANOS_PER_SEC),
    ('M', 30 * 86_400 * NANOS_PER_SEC),
    ('W', 7 * 86_400 * NANOS_PER_SEC),
    ('D', 86_400 * NANOS_PER_SEC),
];
const ISO_TIME_UNITS: &[(char, u128)] = &[
    ('H', 3_600 * NANOS_PER_SEC),
    ('M', 60 * NANOS_PER_SEC),
    ('S', NANOS_PER_SEC),
];

/// Parses a duration: Go-style (`10s`, `1m30s`, `1.5h`, `30d`; units ns, us, µs, ms, s, m, h,
/// d = 24h, w = 7d, y = 365d), ISO-8601 (`PT5S`, `P1DT3H`, `P2W`, `PT0.5S`), or a plain number
/// of seconds (`30`, `0.5`). Negative values are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let fail = |why: &str| format!("invalid duration {s:?}: {why}");
    if text.is_empty() {
        return Err(fail("empty"));
    }
    if text.starts_with('-') {
        return Err(fail("negative durations are not allowed"));
    }
    let nanos = if text.starts_with(['P', 'p']) {
        parse_iso8601(&text[1..])
    } else if let Some((int, frac, "")) = split_decimal(text, false) {
        scaled(int, frac, NANOS_PER_SEC).ok_or_else(too_large)
    } else {
        parse_go(text)
    }
    .map_err(|why| fail(&why))?;
    nanos_to_duration(nanos).ok_or_else(|| fail(&too_large()))
}

fn too_large() -> String {
    "value is too large".to_string()
}

fn nanos_to_duration(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    let sub = u32::try_from(nanos % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, sub))
}

/// Splits a leading decimal number (`12`, `1.5`, `.5`, `5.`) off `s`: (integer digits,
/// fraction digits, rest). `comma` also allows ISO-8601's decimal comma.
fn split_decimal(s: &str, comma: bool) -> Option<(&str, &str, &str)> {
    let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = s.split_at(int_len);
    let (frac, rest) = match rest.as_bytes().first() {
        Some(b'.') => split_digits(&rest[1..]),
        Some(b',') if comma => split_digits(&rest[1..]),
        _ => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        None
    } else {
        Some((int, frac, rest))
    }
}

fn split_digits(s: &str) -> (&str, &str) {
    let len = s.bytes().take_while(u8::is_ascii_digit).count();
    s.split_at(len)
}

/// `int.frac` times `unit` nanoseconds, truncated to whole nanoseconds; None on overflow.
fn scaled(int: &str, frac: &str, unit: u128) -> Option<u128> {
    let int_value: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let whole = int_value.checked_mul(unit)?;
    // 18 digits are far below a nanosecond even for years, and keep the product in u128.
    let frac = frac.get(..18).unwrap_or(frac);
    if frac.is_empty() {
        return Some(whole);
    }
    let frac_value: u128 = frac.parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    whole.checked_add(frac_value.checked_mul(unit)? / scale)
}

fn parse_go(text: &str) -> Result<u128, String> {
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let Some((int, frac, after)) = split_decimal(rest, false) else {
            return Err(format!(
                "expected a number at {rest:?} (use e.g. \"10s\", \"1m30s\", \"PT1M30S\" or a number of seconds)"
            ));
        };
        let Some((unit, nanos)) = GO_UNITS.iter().find(|(u, _)| after.starts_with(u)) else {
            let bad: String = after.chars().take_while(|c| !c.is_ascii_digit()).collect();
            return Err(if bad.is_empty() {
                format!("missing unit after {:?}", &rest[..rest.len() - after.len()])
            } else {
                format!("unknown unit {bad:?} (expected ns, us, µs, ms, s, m, h, d, w or y)")
            });
        };
        total = scaled(int, frac, *nanos)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(too_large)?;
        rest = &after[unit.len()..];
    }
    Ok(total)
}

/// `body` is what follows the leading `P`.
fn parse_iso8601(body: &str) -> Result<u128, String> {
    let (date, time) = match body.find(['T', 't']) {
        Some(at) => (&body[..at], Some(&body[at + 1..])),
        None => (body, None),
    };
    let mut components = 0;
    let mut total = iso_part(date, ISO_DATE_UNITS, &mut components)?;
    if let Some(time) = time {
        let before = components;
        total = total
            .checked_add(iso_part(time, ISO_TIME_UNITS, &mut components)?)
            .ok_or_else(too_large)?;
        if components == before {
            return Err("ISO-8601 `T` must be followed by at least one of H, M, S".to_string());
        }
    }
    if components == 0 {
        return Err("ISO-8601 duration has no components".to_string());
    }
    Ok(total)
}

fn iso_part(
    mut rest: &str,
    units: &[(char, u128)],
    components: &mut usize,
) -> Result<u128, String> {
    let mut total: u128 = 0;
    let mut next_unit = 0;
    while !rest.is_empty() {
        let Some((int, frac, after)) = split_decimal(rest, true) else {
            return Err(format!(
                "expected a number at {rest:?} in ISO-8601 duration"
            ));
        };
        let Some(designator) = after.chars().next() else {
            return Err(format!(
                "missing designator after {rest:?} in ISO-8601 duration"
            ));
        };
        let upper = designator.to_ascii_uppercase();
        let Some(offset) = units[next_unit..].iter().position(|(u, _)| *u == upper) else {
            let allowed: String = units.iter().map(|(u, _)| *u).collect();
            return Err(format!(
                "unexpected designator {designator:?} in ISO-8601 duration (expected one of {allowed}, in that order)"
            ));
        };
        let index = next_unit + offset;
        total = scaled(int, frac, units[index].1)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(too_large)?;
        next_unit = index + 1;
        *components += 1;
        rest = &after[designator.len_utf8()..];
    }
    Ok(total)
}

fn duration_from_number(n: &serde_json::Number) -> Result<Duration, String> {
    if let Some(secs) = n.as_u64() {
        return Ok(Duration::from_secs(secs));
    }
    let negative = || format!("invalid duration {n}: negative durations are not allowed");
    if n.is_i64() {
        return Err(negative());
    }
    let value = n.as_f64().unwrap_or(f64::NAN);
    if value.is_sign_negative() {
        return Err(negative());
    }
    // Going through the decimal text avoids binary rounding (0.1 s stays exactly 100 ms).
    let text = n.to_string();
    match split_decimal(&text, false) {
        Some((int, frac, "")) => scaled(int, frac, NANOS_PER_SEC).and_then(nanos_to_duration),
        _ => Duration::try_from_secs_f64(value).ok(),
    }
    .ok_or_else(|| format!("invalid duration {n}: value is out of range"))
}

/// Formats `d` as an ISO-8601 duration using days, hours, minutes and (fractional) seconds,
/// e.g. `PT1M30S`, `P1D`, `PT0.5S`, `PT0S`; `parse_duration` reads it back exactly.
pub fn format_iso8601(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (hours, minutes, seconds) = (rem / 3_600, rem % 3_600 / 60, rem % 60);

    let mut out = String::from("P");
    if days > 0 {
        out.push_str(&format!("{days}D"));
    }
    if hours > 0 || minutes > 0 || seconds > 0 || nanos > 0 {
        out.push('T');
        if hours > 0 {
            out.push_str(&format!("{hours}H"));
        }
        if minutes > 0 {
            out.push_str(&format!("{minutes}M"));
        }
        if nanos > 0 {
            let frac = format!("{nanos:09}");
            out.push_str(&format!("{seconds}.{}S", frac.trim_end_matches('0')));
        } else if seconds > 0 {
            out.push_str(&format!("{seconds}S"));
        }
    }
    if out == "P" {
        out.push_str("T0S");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const FILE: &str = "/etc/aos/aos_cm.cfg";

    fn parse(text: &str) -> (Config, Vec<String>) {
        match Config::from_json_str(text, FILE) {
            Ok(ok) => ok,
            Err(err) => panic!("unexpected error: {err}"),
        }
    }

    fn parse_err(text: &str) -> ConfigError {
        match Config::from_json_str(text, FILE) {
            Ok((config, _)) => panic!("expected an error, got {config:?}"),
            Err(err) => err,
        }
    }

    fn invalid_keys(err: &ConfigError) -> Vec<String> {
        match err {
            ConfigError::Invalid { issues, .. } => issues.iter().map(|i| i.key.clone()).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!(
                "aos-cm-config-test-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            );
            let dir = std::env::temp_dir().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn empty_object_gives_defaults() {
        let (config, warnings) = parse("{}");
        assert!(warnings.is_empty());
        assert_eq!(config, Config::default());

        assert_eq!(config.ca_cert, PathBuf::new());
        assert_eq!(config.working_dir, PathBuf::new());
        assert_eq!(config.service_discovery_url, "");
        assert_eq!(config.override_service_discovery_url, "");
        assert_eq!(config.cloud_message_log, PathBuf::new());
        assert_eq!(config.iam_protected_server_url, "");
        assert_eq!(config.iam_public_server_url, "");
        assert_eq!(config.cm_server_url, "");
        assert_eq!(config.file_server_url, "");
        assert_eq!(config.cert_storage, "/var/aos/crypt/cm/");
        assert_eq!(config.storage_dir, Path::new("storages"));
        assert_eq!(config.state_dir, Path::new("states"));
        assert_eq!(config.unit_config_file, Path::new("aos_unit.cfg"));
        assert_eq!(config.unit_status_send_timeout, Duration::from_secs(10));
        assert_eq!(config.cloud_response_wait_timeout, Duration::from_secs(10));
        assert_eq!(config.dns_storage_path, Path::new("/var/aos/dns"));
        assert_eq!(config.dns_ip, "");
        assert_eq!(config.dns_pid_file, Path::new("/var/aos/dns/pidfile"));
        assert_eq!(config.monitoring.poll_period, Duration::from_secs(35));
        assert_eq!(config.monitoring.average_window, Duration::from_secs(35));
        assert_eq!(config.monitoring.send_period, Duration::from_secs(60));
        assert_eq!(config.alerts.send_period, Duration::from_secs(10));
        assert_eq!(
            config.node_info_provider.sm_connection_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(config.image_manager.install_path, Path::new("install"));
        assert_eq!(config.image_manager.download_path, Path::new("download"));
        assert_eq!(
            config.image_manager.update_item_ttl,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            config.image_manager.remove_outdated_period,
            Duration::from_secs(86_400)
        );
        assert_eq!(
            config.launcher.nodes_connection_timeout,
            Duration::from_secs(600)
        );
        assert_eq!(
            config.launcher.instance_ttl,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            config.launcher.check_override_env_vars_period,
            Duration::from_secs(60)
        );
        assert_eq!(
            config.migration.migration_path,
            Path::new("/usr/share/aos/communicationmanager/migration")
        );
        assert_eq!(
            config.migration.merged_migration_path,
            Path::new("migration")
        );
        assert_eq!(config.store_path(), Path::new("cm.redb"));
    }

    #[test]
    fn working_dir_alone_derives_every_path() {
        let (config, warnings) = parse(r#"{"workingDir": "/var/aos/cm"}"#);
        assert!(warnings.is_empty());
        assert_eq!(config.working_dir, Path::new("/var/aos/cm"));
        assert_eq!(config.storage_dir, Path::new("/var/aos/cm/storages"));
        assert_eq!(config.state_dir, Path::new("/var/aos/cm/states"));
        assert_eq!(
            config.unit_config_file,
            Path::new("/var/aos/cm/aos_unit.cfg")
        );
        assert_eq!(
            config.image_manager.install_path,
            Path::new("/var/aos/cm/install")
        );
        assert_eq!(
            config.image_manager.download_path,
            Path::new("/var/aos/cm/download")
        );
        assert_eq!(
            config.migration.merged_migration_path,
            Path::new("/var/aos/cm/migration")
        );
        assert_eq!(config.store_path(), Path::new("/var/aos/cm/cm.redb"));
        // Not derived from workingDir.
        assert_eq!(config.cert_storage, "/var/aos/crypt/cm/");
        assert_eq!(config.dns_pid_file, Path::new("/var/aos/dns/pidfile"));

        let expected = Config {
            working_dir: "/var/aos/cm".into(),
            storage_dir: "/var/aos/cm/storages".into(),
            state_dir: "/var/aos/cm/states".into(),
            unit_config_file: "/var/aos/cm/aos_unit.cfg".into(),
            image_manager: ImageManagerConfig {
                install_path: "/var/aos/cm/install".into(),
                download_path: "/var/aos/cm/download".into(),
                ..Config::default().image_manager
            },
            migration: MigrationConfig {
                merged_migration_path: "/var/aos/cm/migration".into(),
                ..Config::default().migration
            },
            ..Config::default()
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn explicit_paths_override_derived_ones() {
        let (config, warnings) = parse(
            r#"{
                "imageManager": {"downloadPath": "/dl"},
                "storageDir": "/data/storages",
                "dnsStoragePath": "/run/dns",
                "workingDir": "/w"
            }"#,
        );
        assert!(warnings.is_empty());
        assert_eq!(config.storage_dir, Path::new("/data/storages"));
        assert_eq!(config.state_dir, Path::new("/w/states"));
        assert_eq!(config.image_manager.download_path, Path::new("/dl"));
        // workingDir comes after the section in the file, yet the section's defaults use it.
        assert_eq!(config.image_manager.install_path, Path::new("/w/install"));
        assert_eq!(config.dns_pid_file, Path::new("/run/dns/pidfile"));

        let (config, _) = parse(r#"{"dnsStoragePath": "/run/dns", "dnsPidFile": "/run/x.pid"}"#);
        assert_eq!(config.dns_pid_file, Path::new("/run/x.pid"));
    }

    #[test]
    fn keys_are_case_insensitive_at_every_level() {
        for key in ["workingDir", "WorkingDir", "workingdir", "WORKINGDIR"] {
            let (config, warnings) = parse(&format!(r#"{{"{key}": "/w"}}"#));
            assert!(warnings.is_empty(), "{key}: {warnings:?}");
            assert_eq!(config.working_dir, Path::new("/w"), "{key}");
        }
        let (config, warnings) = parse(
            r#"{
                "CMSERVERURL": ":1",
                "DnsIP": "10.0.0.1",
                "Monitoring": {"SENDPERIOD": "5m", "pollperiod": "1s"},
                "nodeinfoprovider": {"SmConnectionTimeout": "2m"},
                "IMAGEMANAGER": {"updateItemTTL": "2d"},
                "Launcher": {"InstanceTTL": "1d"},
                "MIGRATION": {"MigrationPath": "/m"}
            }"#,
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.cm_server_url, ":1");
        assert_eq!(config.dns_ip, "10.0.0.1");
        assert_eq!(config.monitoring.send_period, Duration::from_secs(300));
        assert_eq!(config.monitoring.poll_period, Duration::from_secs(1));
        assert_eq!(
            config.node_info_provider.sm_connection_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(
            config.image_manager.update_item_ttl,
            Duration::from_secs(2 * 86_400)
        );
        assert_eq!(config.launcher.instance_ttl, Duration::from_secs(86_400));
        assert_eq!(config.migration.migration_path, Path::new("/m"));
    }

    #[test]
    fn repeated_key_later_one_wins_with_warning() {
        let (config, warnings) = parse(r#"{"workingDir": "/a", "WorkingDir": "/b"}"#);
        assert_eq!(config.working_dir, Path::new("/b"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("workingDir"), "{}", warnings[0]);
        assert!(warnings[0].contains(FILE), "{}", warnings[0]);

        // Document order decides, not the sort order of the key spellings.
        let (config, warnings) = parse(r#"{"WorkingDir": "/b", "workingDir": "/a"}"#);
        assert_eq!(config.working_dir, Path::new("/a"));
        assert_eq!(warnings.len(), 1);

        // The same spelling twice is also reported.
        let (config, warnings) = parse(r#"{"dnsIp": "1.1.1.1", "dnsIp": "2.2.2.2"}"#);
        assert_eq!(config.dns_ip, "2.2.2.2");
        assert_eq!(warnings.len(), 1);

        // Sections are replaced, not merged.
        let (config, warnings) =
            parse(r#"{"monitoring": {"sendPeriod": "5m"}, "Monitoring": {"pollPeriod": "1s"}}"#);
        assert_eq!(config.monitoring.send_period, Duration::from_secs(60));
        assert_eq!(config.monitoring.poll_period, Duration::from_secs(1));
        assert_eq!(warnings.len(), 1);

        let (config, warnings) = parse(r#"{"alerts": {"sendPeriod": "1s", "SendPeriod": "2s"}}"#);
        assert_eq!(config.alerts.send_period, Duration::from_secs(2));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("alerts.sendPeriod"), "{}", warnings[0]);
    }

    #[test]
    fn duration_forms() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases: &[(&str, Duration)] = &[
            ("10s", s(10)),
            ("0s", s(0)),
            ("1m30s", s(90)),
            ("1h", s(3_600)),
            ("1h30m", s(5_400)),
            ("30d", s(30 * 86_400)),
            ("1.5h", s(5_400)),
            ("0.5s", ms(500)),
            (".5s", ms(500)),
            ("1.s", s(1)),
            ("250ms", ms(250)),
            ("100us", Duration::from_micros(100)),
            ("100µs", Duration::from_micros(100)),
            ("100μs", Duration::from_micros(100)),
            ("42ns", Duration::from_nanos(42)),
            ("2w", s(14 * 86_400)),
            ("1y", s(365 * 86_400)),
            ("1d12h", s(36 * 3_600)),
            ("1h1s1ms", Duration::new(3_601, 1_000_000)),
            (" 10s ", s(10)),
            ("PT5S", s(5)),
            ("P1DT3H", s(27 * 3_600)),
            ("PT1M30S", s(90)),
            ("P2W", s(14 * 86_400)),
            ("PT0.5S", ms(500)),
            ("PT0,25S", ms(250)),
            ("P1D", s(86_400)),
            ("P1Y", s(365 * 86_400)),
            ("P1M", s(30 * 86_400)),
            ("PT1H", s(3_600)),
            ("PT1.5H", s(5_400)),
            (
                "P1Y2M3W4DT5H6M7S",
                s(365 * 86_400 + 60 * 86_400 + 25 * 86_400 + 5 * 3_600 + 6 * 60 + 7),
            ),
            ("pt10s", s(10)),
            ("PT0S", s(0)),
            ("30", s(30)),
            ("0", s(0)),
            ("1.5", ms(1_500)),
            ("0.001", ms(1)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(*expected), "{text:?}");
        }
    }

    #[test]
    fn duration_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("   ", "empty"),
            ("10x", "unknown unit \"x\""),
            ("-5s", "negative"),
            ("-5", "negative"),
            ("-PT5S", "negative"),
            ("P", "no components"),
            ("PT", "at least one"),
            ("P1DT", "at least one"),
            ("abc", "expected a number"),
            ("ten seconds", "expected a number"),
            ("10s5", "missing unit"),
            ("s", "expected a number"),
            ("1h 30m", "expected a number"),
            ("10S", "unknown unit"),
            ("PT5X", "unexpected designator"),
            ("PT1S1M", "unexpected designator"),
            ("P1H", "unexpected designator"),
            ("PT1D", "unexpected designator"),
            ("P5", "missing designator"),
            ("PTS", "expected a number"),
            ("1e3", "unknown unit"),
            ("99999999999999999999999y", "too large"),
        ];
        for (text, needle) in cases {
            match parse_duration(text) {
                Ok(d) => panic!("{text:?} parsed as {d:?}"),
                Err(msg) => {
                    assert!(msg.contains(needle), "{text:?}: {msg}");
                    assert!(msg.starts_with("invalid duration "), "{text:?}: {msg}");
                }
            }
        }
    }

    #[test]
    fn durations_as_json_numbers() {
        let (config, warnings) = parse(
            r#"{
                "unitStatusSendTimeout": 30,
                "cloudResponseWaitTimeout": 0.1,
                "monitoring": {"sendPeriod": 1.5, "pollPeriod": 0},
                "alerts": {"sendPeriod": 1e2}
            }"#,
        );
        assert!(warnings.is_empty());
        assert_eq!(config.unit_status_send_timeout, Duration::from_secs(30));
        assert_eq!(
            config.cloud_response_wait_timeout,
            Duration::from_millis(100)
        );
        assert_eq!(config.monitoring.send_period, Duration::from_millis(1_500));
        assert_eq!(config.monitoring.poll_period, Duration::ZERO);
        assert_eq!(config.alerts.send_period, Duration::from_secs(100));

        let err = parse_err(r#"{"unitStatusSendTimeout": -5, "alerts": {"sendPeriod": -0.5}}"#);
        assert_eq!(
            invalid_keys(&err),
            ["unitStatusSendTimeout", "alerts.sendPeriod"]
        );
        assert!(err.to_string().contains("negative"), "{err}");
    }

    #[test]
    fn iso8601_formatting() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "PT0S"),
            (Duration::from_secs(90), "PT1M30S"),
            (Duration::from_secs(86_400), "P1D"),
            (Duration::from_secs(30 * 86_400), "P30D"),
            (Duration::from_secs(3_600), "PT1H"),
            (Duration::from_secs(86_400 + 1), "P1DT1S"),
            (Duration::from_secs(27 * 3_600), "P1DT3H"),
            (Duration::from_millis(500), "PT0.5S"),
            (Duration::from_nanos(1), "PT0.000000001S"),
            (Duration::new(61, 250_000_000), "PT1M1.25S"),
        ];
        for (d, expected) in cases {
            assert_eq!(format_iso8601(*d), *expected, "{d:?}");
            assert_eq!(parse_duration(expected), Ok(*d), "{expected}");
        }
        for d in [
            Duration::new(123_456_789, 987_654_321),
            Duration::from_secs(u64::MAX / 2),
            Duration::from_micros(1_500),
        ] {
            assert_eq!(parse_duration(&format_iso8601(d)), Ok(d), "{d:?}");
        }
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let (config, warnings) = parse(
            r#"{
                "workingDir": "/w",
                "fcrypt": {"caCert": "x"},
                "monitoring": {"pollPeriodd": "1s", "sendPeriod": "2s"}
            }"#,
        );
        assert_eq!(config.working_dir, Path::new("/w"));
        assert_eq!(config.monitoring.send_period, Duration::from_secs(2));
        assert_eq!(config.monitoring.poll_period, Duration::from_secs(35));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings.iter().any(|w| w.contains("`fcrypt`")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("`monitoring.pollPeriodd`")),
            "{warnings:?}"
        );
        assert!(warnings.iter().all(|w| w.starts_with(FILE)), "{warnings:?}");
    }

    #[test]
    fn wrong_types_are_all_reported() {
        let err = parse_err(
            r#"{
                "cmServerUrl": 5,
                "monitoring": [],
                "unitStatusSendTimeout": true,
                "storageDir": {"a": 1},
                "launcher": "fast",
                "imageManager": {"installPath": 1, "updateItemTtl": "soon"},
                "alerts": {"sendPeriod": null}
            }"#,
        );
        let mut keys = invalid_keys(&err);
        keys.sort();
        assert_eq!(
            keys,
            [
                "cmServerUrl",
                "imageManager.installPath",
                "imageManager.updateItemTtl",
                "launcher",
                "monitoring",
                "storageDir",
                "unitStatusSendTimeout",
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with(&format!("{FILE}: ")), "{text}");
        for key in &keys {
            assert!(
                text.contains(&format!("{key}: ")),
                "{key} missing in {text}"
            );
        }
        assert!(text.contains("expected a string, found number 5"), "{text}");
        assert!(
            text.contains("monitoring: expected an object, found an array"),
            "{text}"
        );
        assert!(text.contains("found boolean true"), "{text}");
    }

    #[test]
    fn bad_duration_message_names_file_key_and_value() {
        let err = parse_err(r#"{"monitoring": {"sendPeriod": "ten seconds"}}"#);
        assert_eq!(invalid_keys(&err), ["monitoring.sendPeriod"]);
        let text = err.to_string();
        assert!(
            text.starts_with(
                "/etc/aos/aos_cm.cfg: monitoring.sendPeriod: invalid duration \"ten seconds\": "
            ),
            "{text}"
        );
    }

    #[test]
    fn null_means_absent() {
        let (config, warnings) =
            parse(r#"{"workingDir": "/w", "storageDir": null, "monitoring": null, "dnsIp": null}"#);
        assert!(warnings.is_empty());
        assert_eq!(config.storage_dir, Path::new("/w/storages"));
        assert_eq!(config.monitoring, MonitoringConfig::default());
        assert_eq!(config.dns_ip, "");
    }

    #[test]
    fn empty_string_for_defaulted_key_falls_back_with_warning() {
        let (config, warnings) =
            parse(r#"{"workingDir": "/w", "storageDir": "", "certStorage": "", "caCert": ""}"#);
        assert_eq!(config.storage_dir, Path::new("/w/storages"));
        assert_eq!(config.cert_storage, "/var/aos/crypt/cm/");
        assert_eq!(config.ca_cert, PathBuf::new());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("certStorage") || warnings[1].contains("certStorage"));
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = parse_err("{\n  \"workingDir\": \"/w\",\n  \"dnsIp\" \"x\"\n}");
        match &err {
            ConfigError::Json {
                file, line, column, ..
            } => {
                assert_eq!(file, FILE);
                assert_eq!(*line, 3);
                assert_eq!(*column, 11);
            }
            other => panic!("expected Json, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.starts_with("/etc/aos/aos_cm.cfg:3:11: invalid JSON: "),
            "{text}"
        );
        assert!(!text.contains("at line"), "{text}");

        assert!(matches!(parse_err(""), ConfigError::Json { line: 1, .. }));
        assert!(matches!(
            parse_err(r#"{"a": 1} x"#),
            ConfigError::Json { .. }
        ));
    }

    #[test]
    fn top_level_must_be_an_object() {
        for text in ["[]", "5", "\"x\"", "null"] {
            let err = parse_err(text);
            assert!(
                matches!(err, ConfigError::NotObject { .. }),
                "{text}: {err:?}"
            );
            assert!(err.to_string().starts_with(FILE), "{err}");
        }
    }

    #[test]
    fn byte_order_mark_is_accepted() {
        let (config, _) = parse("\u{feff}{\"dnsIp\": \"1.2.3.4\"}");
        assert_eq!(config.dns_ip, "1.2.3.4");
    }

    #[test]
    fn escaped_keys_and_nested_unknown_values_are_handled() {
        let (config, warnings) = parse(
            r#"{"work\u0069ngDir": "/w\"q", "extra": [1, {"a": [true, null]}, "x,}]"], "dnsIp":"1"}"#,
        );
        assert_eq!(config.working_dir, Path::new("/w\"q"));
        assert_eq!(config.dns_ip, "1");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn load_from_file() {
        let dir = TempDir::new();
        let path = dir.0.join("aos_cm.cfg");
        std::fs::write(&path, r#"{"workingDir": "/w", "cmServerUrl": ":8093"}"#).unwrap();
        let (config, warnings) = Config::load(&path).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(config.working_dir, Path::new("/w"));
        assert_eq!(config.cm_server_url, ":8093");

        std::fs::write(&path, r#"{"cmServerUrl": 1}"#).unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}: cmServerUrl: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let dir = TempDir::new();
        let path = dir.0.join("nope.cfg");
        let err = Config::load(&path).unwrap_err();
        match &err {
            ConfigError::Io { file, error } => {
                assert_eq!(file, &path.display().to_string());
                assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    fn check_upstream_sample(config: &Config) {
        let expected = Config {
            ca_cert: "/usr/share/ca-certificates/aos/AosRootCA.crt".into(),
            working_dir: "/var/aos/workdirs/cm".into(),
            service_discovery_url: "https://aoscloud.io:9000/sd/v7/".into(),
            override_service_discovery_url: String::new(),
            cloud_message_log: PathBuf::new(),
            iam_protected_server_url: "localhost:8089".into(),
            iam_public_server_url: "localhost:8090".into(),
            cm_server_url: ":8093".into(),
            file_server_url: "localhost:8094".into(),
            cert_storage: "cm".into(),
            storage_dir: "/var/aos/storages".into(),
            state_dir: "/var/aos/states".into(),
            unit_config_file: "/var/aos/workdirs/cm/aos_unit.cfg".into(),
            unit_status_send_timeout: Duration::from_secs(10),
            cloud_response_wait_timeout: Duration::from_secs(10),
            dns_storage_path: "/var/aos/dns".into(),
            dns_ip: "10.0.0.100".into(),
            dns_pid_file: "/run/dnsmasq/dnsmasq.pid".into(),
            monitoring: MonitoringConfig {
                poll_period: Duration::from_secs(35),
                average_window: Duration::from_secs(35),
                send_period: Duration::from_secs(60),
            },
            alerts: AlertsConfig {
                send_period: Duration::from_secs(10),
                journal_alerts: None,
            },
            node_info_provider: NodeInfoProviderConfig {
                sm_connection_timeout: Duration::from_secs(60),
            },
            image_manager: ImageManagerConfig {
                install_path: "/var/aos/workdirs/cm/imagemanager/install".into(),
                download_path: "/var/aos/workdirs/cm/imagemanager/downloads".into(),
                update_item_ttl: Duration::from_secs(30 * 86_400),
                remove_outdated_period: Duration::from_secs(86_400),
                max_concurrent_downloads: 4,
                download_part_limit: 100,
            },
            launcher: LauncherConfig {
                nodes_connection_timeout: Duration::from_secs(600),
                instance_ttl: Duration::from_secs(30 * 86_400),
                check_override_env_vars_period: Duration::from_secs(60),
            },
            migration: MigrationConfig {
                migration_path: "/usr/share/aos/cm/migration".into(),
                merged_migration_path: "/var/aos/workdirs/cm/migration".into(),
            },
            identity: None,
            update_scheduler_url: String::new(),
            update_scheduler: UpdateSchedules::default(),
            metrics: MetricsConfig::default(),
        };
        assert_eq!(*config, expected);
        assert_eq!(
            config.store_path(),
            Path::new("/var/aos/workdirs/cm/cm.redb")
        );
    }

    #[test]
    fn upstream_shipped_sample() {
        // Upstream config/cm.cfg.in with @CMAKE_INSTALL_PREFIX@ = /usr.
        let (config, warnings) = parse(
            r#"{
                "caCert": "/usr/share/ca-certificates/aos/AosRootCA.crt",
                "certStorage": "cm",
                "serviceDiscoveryUrl": "https://aoscloud.io:9000/sd/v7/",
                "iamProtectedServerUrl": "localhost:8089",
                "iamPublicServerUrl": "localhost:8090",
                "cmServerUrl": ":8093",
                "workingDir": "/var/aos/workdirs/cm",
                "storageDir": "/var/aos/storages",
                "stateDir": "/var/aos/states",
                "dnsIp": "10.0.0.100",
                "dnsPidFile": "/run/dnsmasq/dnsmasq.pid",
                "fileServerUrl": "localhost:8094",
                "imageManager": {
                    "installPath": "/var/aos/workdirs/cm/imagemanager/install",
                    "downloadPath": "/var/aos/workdirs/cm/imagemanager/downloads",
                    "updateItemTTL": "30d",
                    "removeOutdatedPeriod": "24h"
                },
                "migration": {
                    "migrationPath": "/usr/share/aos/cm/migration",
                    "mergedMigrationPath": "/var/aos/workdirs/cm/migration"
                }
            }"#,
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        check_upstream_sample(&config);
    }

    #[test]
    fn shipped_sample_file_loads_without_warnings() {
        const SAMPLE: &str = include_str!("../aos_cm.cfg.sample");
        let dir = TempDir::new();
        let path = dir.0.join("aos_cm.cfg");
        std::fs::write(&path, SAMPLE).unwrap();
        let (mut config, warnings) = Config::load(&path).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        // Our own key beside upstream's.
        assert_eq!(config.update_scheduler_url, "localhost:8095");
        config.update_scheduler_url.clear();
        check_upstream_sample(&config);

        let value: Value = serde_json::from_str(SAMPLE).unwrap();
        assert!(looks_like_config(&value));
    }

    #[test]
    fn recognises_config_documents() {
        let yes = [
            r#"{"workingDir": "/w"}"#,
            r#"{"WORKINGDIR": "/w", "other": 1}"#,
            r#"{"monitoring": {}}"#,
            r#"{"dnsip": "1"}"#,
        ];
        for text in yes {
            let value: Value = serde_json::from_str(text).unwrap();
            assert!(looks_like_config(&value), "{text}");
        }
        let no = [
            r#"{}"#,
            r#"{"formatVersion": "1", "version": "1.0.0", "nodes": []}"#,
            r#"[{"workingDir": "/w"}]"#,
            r#""workingDir""#,
            r#"{"pollPeriod": "1s"}"#,
        ];
        for text in no {
            let value: Value = serde_json::from_str(text).unwrap();
            assert!(!looks_like_config(&value), "{text}");
        }
    }

    #[test]
    fn identity_section_is_parsed_and_checked() {
        let (config, warnings) = parse(
            r#"{"identity": {"systemId": "unit-1", "nodeId": "main", "nodesFile": "/etc/aos/nodes.json",
                "certFile": "/etc/aos/online.pem", "keyFile": "/etc/aos/online.key"}}"#,
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let id = config.identity.expect("identity");
        assert_eq!(id.system_id, "unit-1");
        assert_eq!(id.node_id, "main");
        assert_eq!(id.nodes_file, PathBuf::from("/etc/aos/nodes.json"));
        assert!(id.sm_cert_file.as_os_str().is_empty());
        assert_eq!(parse("{}").0.identity, None);
        let err = parse_err(r#"{"identity": {"nodeId": "main"}}"#);
        assert!(err.to_string().contains("identity.systemId"), "{err}");
    }

    #[test]
    fn journal_alerts_are_off_when_absent() {
        let (config, _) = parse(r#"{"alerts": {"sendPeriod": "5s"}}"#);
        assert_eq!(config.alerts.journal_alerts, None);
        let (config, warnings) = parse(r#"{"alerts": {"journalAlerts": null}}"#);
        assert_eq!(config.alerts.journal_alerts, None);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn journal_alerts_are_parsed() {
        let (config, warnings) = parse(
            r#"{"alerts": {"JournalAlerts": {
                "filter": ["^bluetooth:", "test"],
                "SERVICEALERTPRIORITY": 5,
                "systemAlertPriority": 2,
                "systemAlertPriority": 1,
                "colour": "red"
            }}}"#,
        );
        assert_eq!(
            config.alerts.journal_alerts,
            Some(JournalAlertsConfig {
                filter: vec!["^bluetooth:".into(), "test".into()],
                service_alert_priority: 5,
                system_alert_priority: 1,
            })
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("alerts.journalAlerts.systemAlertPriority"));
        assert!(warnings[1].contains("alerts.journalAlerts.colour"));

        // An empty section turns the feature on with the defaults.
        let (config, _) = parse(r#"{"alerts": {"journalAlerts": {}}}"#);
        assert_eq!(
            config.alerts.journal_alerts,
            Some(JournalAlertsConfig::default())
        );
        // Out of range priorities fall back to the defaults with a warning.
        let (config, warnings) =
            parse(r#"{"alerts": {"journalAlerts": {"systemAlertPriority": 9}}}"#);
        assert_eq!(
            config.alerts.journal_alerts.unwrap().system_alert_priority,
            3
        );
        assert!(warnings[0].contains("alerts.journalAlerts.systemAlertPriority"));
    }

    #[test]
    fn journal_alerts_invalid_values_are_config_errors() {
        let err =
            parse_err(r#"{"alerts": {"journalAlerts": {"filter": ["ok", "(unclosed", "fine"]}}}"#);
        assert_eq!(invalid_keys(&err), ["alerts.journalAlerts.filter[1]"]);
        assert!(err.to_string().contains("invalid regex"), "{err}");

        let err = parse_err(r#"{"alerts": {"journalAlerts": {"filter": ["ok", 3]}}}"#);
        assert_eq!(invalid_keys(&err), ["alerts.journalAlerts.filter[1]"]);
        let err = parse_err(r#"{"alerts": {"journalAlerts": {"filter": "x"}}}"#);
        assert_eq!(invalid_keys(&err), ["alerts.journalAlerts.filter"]);
        let err = parse_err(r#"{"alerts": {"journalAlerts": {"serviceAlertPriority": "4"}}}"#);
        assert_eq!(
            invalid_keys(&err),
            ["alerts.journalAlerts.serviceAlertPriority"]
        );
        let err = parse_err(r#"{"alerts": {"journalAlerts": [1]}}"#);
        assert_eq!(invalid_keys(&err), ["alerts.journalAlerts"]);
    }

    #[test]
    fn update_scheduler_defaults_to_auto_and_off() {
        let (config, warnings) = parse("{}");
        assert_eq!(config.update_scheduler_url, "");
        assert_eq!(config.update_scheduler, UpdateSchedules::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn update_scheduler_reads_policies_and_timetables() {
        let (config, warnings) = parse(
            r#"{"updateSchedulerUrl": "127.0.0.1:8095",
                "updateScheduler": {
                  "sota": {"policy": "trigger"},
                  "FOTA": {"policy": "Timetable", "timetable": [
                    {"dayOfWeek": 2, "timeSlots": [{"start": "01:00:00", "end": "03:30"}]},
                    {"dayOfWeek": 7, "timeSlots": [{"start": "22:00:00", "end": "24:00:00", "x": 1}]}
                  ]}}}"#,
        );
        assert_eq!(config.update_scheduler_url, "127.0.0.1:8095");
        assert_eq!(config.update_scheduler.sota.policy, UpdatePolicy::Trigger);
        let fota = &config.update_scheduler.fota;
        assert_eq!(fota.policy, UpdatePolicy::Timetable);
        assert_eq!(
            fota.timetable,
            vec![
                TimetableDay {
                    day_of_week: 2,
                    slots: vec![TimeSlot {
                        start: 3600,
                        end: 3 * 3600 + 1800
                    }]
                },
                TimetableDay {
                    day_of_week: 7,
                    slots: vec![TimeSlot {
                        start: 22 * 3600,
                        end: 24 * 3600
                    }]
                },
            ]
        );
        assert_eq!(
            warnings,
            vec![format!(
                "{FILE}: unknown key `updateScheduler.fota.timetable[1].timeSlots[0].x` ignored"
            )]
        );
    }

    #[test]
    fn update_scheduler_errors_name_the_field() {
        let err = parse_err(
            r#"{"updateScheduler": {
                  "sota": {"policy": "sometimes"},
                  "fota": {"policy": "timetable", "timetable": [
                    {"dayOfWeek": 8, "timeSlots": [{"start": "03:00:00", "end": "01:00:00"}]},
                    {"dayOfWeek": 1, "timeSlots": [{"start": "25:00", "end": "26:00:00"}]},
                    {"dayOfWeek": 1, "timeSlots": []}
                  ]}}}"#,
        );
        assert_eq!(
            invalid_keys(&err),
            vec![
                "updateScheduler.sota.policy",
                "updateScheduler.fota.timetable[0].dayOfWeek",
                "updateScheduler.fota.timetable[0].timeSlots[0]",
                "updateScheduler.fota.timetable[1].timeSlots[0].start",
                "updateScheduler.fota.timetable[1].timeSlots[0].end",
                "updateScheduler.fota.timetable[2].timeSlots",
                "updateScheduler.fota.timetable",
            ]
        );
        let text = err.to_string();
        assert!(text.contains("found \"sometimes\""), "{text}");
        assert!(text.contains("start must be before end"), "{text}");
    }
}
