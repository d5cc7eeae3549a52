//! AosEdge cloud protocol v7 message types (serde).
//!
//! Every WebSocket frame is an [`Envelope`]: a `header` ([`Header`]) and a `data` object
//! ([`Message`]) whose `messageType` member selects the variant. Key names, enum strings and
//! "omitted when empty" rules follow the v7 C++ codec (`aos_core_cpp/src/common/cloudprotocol`)
//! as summarised in the project reference (cloud-protocol.md §1.6–§2.9, errata 17–24).
//!
//! Conventions:
//! * Timestamps are held as `String` in the form `YYYY-MM-DDThh:mm:ss.ffffffZ`
//!   (see [`format_time`]).
//! * `errorInfo`, when present, always carries `aosCode`, `exitCode` and `message`.
//! * Optional sub-objects are `Option<_>` and omitted when `None`; optional arrays are omitted
//!   when empty.
//! * Incoming JSON keys are matched case-insensitively: use [`parse_incoming`], which rewrites
//!   keys to their canonical spelling before deserialising. Missing scalar fields default to
//!   `0`/`""`/`false` (lenient parser), except the few sub-objects the reference marks required.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Protocol version carried in every header.
pub const PROTOCOL_VERSION: u64 = 7;

/// Default `nack.retryAfter` in milliseconds when the cloud omits it.
pub const DEFAULT_RETRY_AFTER_MS: u64 = 500;

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// Microseconds since the Unix epoch, now (0 before 1970, saturating far in the future).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats microseconds since the Unix epoch as `YYYY-MM-DDThh:mm:ss.ffffffZ` (UTC, exactly six
/// fractional digits).
pub fn format_time(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------------------------
// Lenient number helpers (instance indexes are sometimes sent as strings)
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Num(u64),
    Str(String),
}

fn de_u64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrString::deserialize(d)? {
        NumOrString::Num(n) => Ok(n),
        NumOrString::Str(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

fn de_opt_u64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<NumOrString>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrString::Num(n)) => Ok(Some(n)),
        Some(NumOrString::Str(s)) => s.trim().parse().map(Some).map_err(serde::de::Error::custom),
    }
}

fn default_retry_after() -> u64 {
    DEFAULT_RETRY_AFTER_MS
}

// ---------------------------------------------------------------------------------------------
// Enum strings (§2.2)
// ---------------------------------------------------------------------------------------------

/// `UpdateItemType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UpdateItemType {
    #[serde(rename = "service")]
    Service,
    #[serde(rename = "component")]
    Component,
    #[serde(rename = "layer")]
    Layer,
    #[serde(rename = "subject")]
    Subject,
    #[serde(rename = "oem")]
    Oem,
    #[serde(rename = "sp")]
    Sp,
    #[serde(rename = "fleet")]
    Fleet,
    #[serde(rename = "node")]
    Node,
    #[serde(rename = "node-subject")]
    NodeSubject,
    #[serde(rename = "runtime")]
    Runtime,
}

/// Item status `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ItemState {
    #[default]
    #[serde(rename = "unknown")]
    Unknown,
    #[serde(rename = "downloading")]
    Downloading,
    #[serde(rename = "pending")]
    Pending,
    #[serde(rename = "installing")]
    Installing,
    #[serde(rename = "installed")]
    Installed,
    #[serde(rename = "removing")]
    Removing,
    #[serde(rename = "removed")]
    Removed,
    #[serde(rename = "failed")]
    Failed,
}

/// Instance `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum InstanceState {
    #[default]
    #[serde(rename = "activating")]
    Activating,
    #[serde(rename = "active")]
    Active,
    #[serde(rename = "inactive")]
    Inactive,
    #[serde(rename = "failed")]
    Failed,
}

/// Node `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum NodeState {
    #[default]
    #[serde(rename = "unprovisioned")]
    Unprovisioned,
    #[serde(rename = "provisioned")]
    Provisioned,
    #[serde(rename = "paused")]
    Paused,
    #[serde(rename = "error")]
    Error,
}

/// Desired node state in `desiredStatus.nodes[].state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DesiredNodeState {
    #[serde(rename = "provisioned")]
    Provisioned,
    #[serde(rename = "paused")]
    Paused,
}

/// Unit config status `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum UnitConfigState {
    #[default]
    #[serde(rename = "absent")]
    Absent,
    #[serde(rename = "installed")]
    Installed,
    #[serde(rename = "failed")]
    Failed,
}

/// Subject `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubjectType {
    #[serde(rename = "group")]
    Group,
    #[serde(rename = "user")]
    User,
}

/// Certificate `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum CertType {
    #[default]
    #[serde(rename = "offline")]
    Offline,
    #[serde(rename = "online")]
    Online,
    #[serde(rename = "sm")]
    Sm,
    #[serde(rename = "cm")]
    Cm,
    #[serde(rename = "iam")]
    Iam,
}

/// `coreAlert.coreComponent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum CoreComponent {
    #[default]
    #[serde(rename = "CM")]
    Cm,
    #[serde(rename = "SM")]
    Sm,
    #[serde(rename = "IAM")]
    Iam,
    #[serde(rename = "MP")]
    Mp,
}

/// Alert `tag` values. [`AlertItem`] uses the same strings as its discriminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlertTag {
    #[serde(rename = "systemAlert")]
    SystemAlert,
    #[serde(rename = "coreAlert")]
    CoreAlert,
    #[serde(rename = "resourceAllocateAlert")]
    ResourceAllocateAlert,
    #[serde(rename = "systemQuotaAlert")]
    SystemQuotaAlert,
    #[serde(rename = "instanceQuotaAlert")]
    InstanceQuotaAlert,
    #[serde(rename = "downloadProgressAlert")]
    DownloadProgressAlert,
    #[serde(rename = "updateItemInstanceAlert")]
    UpdateItemInstanceAlert,
}

/// `downloadProgressAlert.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum DownloadState {
    #[default]
    #[serde(rename = "started")]
    Started,
    #[serde(rename = "paused")]
    Paused,
    #[serde(rename = "interrupted")]
    Interrupted,
    #[serde(rename = "finished")]
    Finished,
}

/// `requestLog.logType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum LogType {
    #[default]
    #[serde(rename = "systemLog")]
    SystemLog,
    #[serde(rename = "instanceLog")]
    InstanceLog,
    #[serde(rename = "crashLog")]
    CrashLog,
}

/// `pushLog.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum LogStatus {
    #[default]
    #[serde(rename = "ok")]
    Ok,
    #[serde(rename = "error")]
    Error,
    #[serde(rename = "empty")]
    Empty,
    #[serde(rename = "absent")]
    Absent,
}

/// `requestLog.uploadOptions.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum LogUploadType {
    #[default]
    #[serde(rename = "https")]
    Https,
}

/// `stateAcceptance.result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum StateResult {
    #[default]
    #[serde(rename = "accepted")]
    Accepted,
    #[serde(rename = "rejected")]
    Rejected,
}

// ---------------------------------------------------------------------------------------------
// Common sub-objects (§2.1)
// ---------------------------------------------------------------------------------------------

/// `AosIdentity`: every member optional and omitted when absent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Identity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codename: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub item_type: Option<UpdateItemType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

impl Identity {
    /// Identity with only `id`.
    pub fn with_id(id: &str) -> Self {
        Self {
            id: Some(id.to_owned()),
            ..Self::default()
        }
    }

    /// Identity with only `codename`.
    pub fn with_codename(codename: &str) -> Self {
        Self {
            codename: Some(codename.to_owned()),
            ..Self::default()
        }
    }
}

/// `InstanceIdent`, flattened into its parent: `item`, `subject`, `instance`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceIdent {
    pub item: Identity,
    pub subject: Identity,
    #[serde(deserialize_with = "de_u64_lenient")]
    pub instance: u64,
}

/// `InstanceFilter`, flattened into its parent; every member optional.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Identity>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_u64_lenient"
    )]
    pub instance: Option<u64>,
}

/// `errorInfo`: all three keys always emitted (errata 23).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ErrorInfo {
    pub aos_code: i32,
    pub exit_code: i32,
    pub message: String,
}

impl ErrorInfo {
    /// On input only `aosCode > 0` denotes an error (§2.1).
    pub fn is_error(&self) -> bool {
        self.aos_code > 0
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope (§1.6)
// ---------------------------------------------------------------------------------------------

/// Frame header.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Header {
    pub version: u64,
    pub system_id: String,
    pub created_at: String,
    pub txn: String,
}

/// One WebSocket frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub header: Header,
    pub data: Message,
}

/// The `data` member; `messageType` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "messageType", rename_all = "camelCase")]
pub enum Message {
    Ack(Ack),
    Nack(Nack),
    /// Body kept as raw JSON (without `messageType`); parsed and validated elsewhere.
    DesiredStatus(Map<String, Value>),
    UnitStatus(UnitStatus),
    RequestBlobUrls(RequestBlobUrls),
    BlobUrls(BlobUrls),
    Alerts(Alerts),
    MonitoringData(MonitoringData),
    RequestLog(RequestLog),
    PushLog(PushLog),
    StateRequest(StateRequest),
    NewState(NewState),
    UpdateState(UpdateState),
    StateAcceptance(StateAcceptance),
    OverrideEnvVars(OverrideEnvVars),
    OverrideEnvVarsStatus(OverrideEnvVarsStatus),
    RenewCertificatesNotification(RenewCertificatesNotification),
    IssueUnitCertificates(IssueUnitCertificates),
    IssuedUnitCertificates(IssuedUnitCertificates),
    InstallUnitCertificatesConfirmation(InstallUnitCertificatesConfirmation),
    StartProvisioningRequest(StartProvisioningRequest),
    StartProvisioningResponse(StartProvisioningResponse),
    FinishProvisioningRequest(FinishProvisioningRequest),
    FinishProvisioningResponse(FinishProvisioningResponse),
    DeprovisioningRequest(DeprovisioningRequest),
    DeprovisioningResponse(DeprovisioningResponse),
}

impl Message {
    /// The `messageType` string of this message.
    pub fn message_type(&self) -> &'static str {
        match self {
            Self::Ack(_) => "ack",
            Self::Nack(_) => "nack",
            Self::DesiredStatus(_) => "desiredStatus",
            Self::UnitStatus(_) => "unitStatus",
            Self::RequestBlobUrls(_) => "requestBlobUrls",
            Self::BlobUrls(_) => "blobUrls",
            Self::Alerts(_) => "alerts",
            Self::MonitoringData(_) => "monitoringData",
            Self::RequestLog(_) => "requestLog",
            Self::PushLog(_) => "pushLog",
            Self::StateRequest(_) => "stateRequest",
            Self::NewState(_) => "newState",
            Self::UpdateState(_) => "updateState",
            Self::StateAcceptance(_) => "stateAcceptance",
            Self::OverrideEnvVars(_) => "overrideEnvVars",
            Self::OverrideEnvVarsStatus(_) => "overrideEnvVarsStatus",
            Self::RenewCertificatesNotification(_) => "renewCertificatesNotification",
            Self::IssueUnitCertificates(_) => "issueUnitCertificates",
            Self::IssuedUnitCertificates(_) => "issuedUnitCertificates",
            Self::InstallUnitCertificatesConfirmation(_) => "installUnitCertificatesConfirmation",
            Self::StartProvisioningRequest(_) => "startProvisioningRequest",
            Self::StartProvisioningResponse(_) => "startProvisioningResponse",
            Self::FinishProvisioningRequest(_) => "finishProvisioningRequest",
            Self::FinishProvisioningResponse(_) => "finishProvisioningResponse",
            Self::DeprovisioningRequest(_) => "deprovisioningRequest",
            Self::DeprovisioningResponse(_) => "deprovisioningResponse",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ack / nack (§1.7)
// ---------------------------------------------------------------------------------------------

/// `ack`: data is just `{"messageType":"ack"}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Ack {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// `nack`: resend after `retryAfter` ms (default 500).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default = "default_retry_after")]
    pub retry_after: u64,
}

impl Default for Nack {
    fn default() -> Self {
        Self {
            correlation_id: None,
            retry_after: DEFAULT_RETRY_AFTER_MS,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// unitStatus (§2.5)
// ---------------------------------------------------------------------------------------------

/// `unitStatus`: `isDeltaInfo` always present; each section only when `Some`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UnitStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub is_delta_info: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_config: Option<Vec<UnitConfigStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<ItemStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstancesStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Vec<Identity>>,
}

/// `unitStatus.unitConfig[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UnitConfigStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub state: UnitConfigState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

/// Node identity in node info: `codename` and `title` always emitted (errata 23).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeIdentity {
    pub codename: String,
    pub title: String,
}

/// `osInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OsInfo {
    pub os: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// `archInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ArchInfo {
    pub architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// `cpus[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CpuInfo {
    pub model_name: String,
    pub total_num_cores: u64,
    pub total_num_threads: u64,
    pub arch_info: ArchInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_dmips: Option<u64>,
}

/// `partitions[]` in node info.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PartitionInfo {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub types: Vec<String>,
    pub total_size: u64,
}

/// `runtimes[]` in node info.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RuntimeInfo {
    pub identity: Identity,
    pub runtime_type: String,
    pub arch_info: ArchInfo,
    pub os_info: OsInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_dmips: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_dmips: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ram: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_ram: Option<u64>,
    pub max_instances: u64,
}

/// `resources[]` in node info.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceInfo {
    pub name: String,
    pub shared_count: u64,
}

/// `unitStatus.nodes[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeInfo {
    pub identity: NodeIdentity,
    pub node_group_subject: Identity,
    pub max_dmips: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub physical_ram: Option<u64>,
    pub total_ram: u64,
    pub os_info: OsInfo,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<CpuInfo>,
    /// Attribute name → value; names are data and are not case-folded by [`parse_incoming`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionInfo>,
    pub state: NodeState,
    pub is_connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runtimes: Vec<RuntimeInfo>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceInfo>,
}

/// `unitStatus.items[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ItemStatus {
    pub item: Identity,
    pub version: String,
    pub state: ItemState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

/// `unitStatus.instances[]`: grouped by item, subject and version.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstancesStatus {
    pub item: Identity,
    pub subject: Identity,
    pub version: String,
    pub instances: Vec<InstanceStatus>,
}

/// `unitStatus.instances[].instances[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceStatus {
    pub node: Identity,
    pub runtime: Identity,
    #[serde(deserialize_with = "de_u64_lenient")]
    pub instance: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_checksum: Option<String>,
    pub state: InstanceState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

// ---------------------------------------------------------------------------------------------
// Blobs (§2.8)
// ---------------------------------------------------------------------------------------------

/// `requestBlobUrls`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RequestBlobUrls {
    pub correlation_id: String,
    pub digests: Vec<String>,
}

/// `blobUrls`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BlobUrls {
    pub correlation_id: String,
    pub items: Vec<BlobInfo>,
}

/// `blobUrls.items[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BlobInfo {
    pub digest: String,
    pub urls: Vec<String>,
    /// Hex SHA3-256 of the downloaded (still encrypted) file, despite the key name.
    pub sha256: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decrypt_info: Option<DecryptInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sign_info: Option<SignInfo>,
}

/// `decryptInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DecryptInfo {
    pub block_alg: String,
    pub block_iv: String,
    pub block_key: String,
}

/// `signInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SignInfo {
    pub chain_name: String,
    pub alg: String,
    pub value: String,
    pub trusted_timestamp: String,
    pub ocsp_values: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Alerts (§2.6)
// ---------------------------------------------------------------------------------------------

/// `alerts`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Alerts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub items: Vec<AlertItem>,
}

/// One alert; the `tag` member selects the variant (strings as [`AlertTag`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "tag", rename_all = "camelCase")]
pub enum AlertItem {
    SystemAlert(SystemAlert),
    CoreAlert(CoreAlert),
    ResourceAllocateAlert(ResourceAllocateAlert),
    SystemQuotaAlert(SystemQuotaAlert),
    InstanceQuotaAlert(InstanceQuotaAlert),
    DownloadProgressAlert(DownloadProgressAlert),
    UpdateItemInstanceAlert(UpdateItemInstanceAlert),
}

impl AlertItem {
    /// The alert's tag.
    pub fn tag(&self) -> AlertTag {
        match self {
            Self::SystemAlert(_) => AlertTag::SystemAlert,
            Self::CoreAlert(_) => AlertTag::CoreAlert,
            Self::ResourceAllocateAlert(_) => AlertTag::ResourceAllocateAlert,
            Self::SystemQuotaAlert(_) => AlertTag::SystemQuotaAlert,
            Self::InstanceQuotaAlert(_) => AlertTag::InstanceQuotaAlert,
            Self::DownloadProgressAlert(_) => AlertTag::DownloadProgressAlert,
            Self::UpdateItemInstanceAlert(_) => AlertTag::UpdateItemInstanceAlert,
        }
    }
}

/// `systemAlert`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SystemAlert {
    pub timestamp: String,
    pub node: Identity,
    pub message: String,
}

/// `coreAlert`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CoreAlert {
    pub timestamp: String,
    pub node: Identity,
    pub core_component: CoreComponent,
    pub message: String,
}

/// `resourceAllocateAlert`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceAllocateAlert {
    pub timestamp: String,
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub node: Identity,
    pub device_id: String,
    pub message: String,
}

/// `systemQuotaAlert` (raise/continue/fall status is not serialised).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SystemQuotaAlert {
    pub timestamp: String,
    pub node: Identity,
    pub parameter: String,
    pub value: u64,
}

/// `instanceQuotaAlert`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceQuotaAlert {
    pub timestamp: String,
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub parameter: String,
    pub value: u64,
}

/// `downloadProgressAlert`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DownloadProgressAlert {
    pub timestamp: String,
    pub digest: String,
    pub url: String,
    pub downloaded_bytes: u64,
    pub total_bytes: u64,
    pub state: DownloadState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

/// `updateItemInstanceAlert`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UpdateItemInstanceAlert {
    pub timestamp: String,
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub version: String,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Monitoring (§2.7)
// ---------------------------------------------------------------------------------------------

/// `monitoringData`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MonitoringData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub nodes: Vec<NodeMonitoring>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceMonitoring>,
}

/// One monitoring sample.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MonitoringItem {
    pub timestamp: String,
    pub ram: u64,
    pub cpu: u64,
    pub download: u64,
    pub upload: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionUsage>,
}

/// `partitions[]` in a monitoring sample.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PartitionUsage {
    pub name: String,
    pub used_size: u64,
}

/// `nodeStates[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStateEntry {
    pub timestamp: String,
    pub state: NodeState,
    pub is_connected: bool,
}

/// `monitoringData.nodes[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeMonitoring {
    pub node: Identity,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub node_states: Vec<NodeStateEntry>,
    pub items: Vec<MonitoringItem>,
}

/// `itemStates[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceStateEntry {
    pub timestamp: String,
    pub state: InstanceState,
}

/// `monitoringData.instances[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstanceMonitoring {
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub node: Identity,
    pub item_states: Vec<InstanceStateEntry>,
    pub items: Vec<MonitoringItem>,
}

// ---------------------------------------------------------------------------------------------
// Logs (§2.8)
// ---------------------------------------------------------------------------------------------

/// `requestLog` (`filter` is required).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestLog {
    #[serde(default)]
    pub correlation_id: String,
    #[serde(default)]
    pub log_type: LogType,
    pub filter: LogFilter,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_options: Option<UploadOptions>,
}

/// `requestLog.filter`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub till: Option<String>,
    pub node_ids: Vec<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Identity>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_u64_lenient"
    )]
    pub instance: Option<u64>,
}

/// `requestLog.uploadOptions`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UploadOptions {
    #[serde(rename = "type")]
    pub upload_type: LogUploadType,
    pub url: String,
    pub bearer_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_ttl: Option<String>,
}

/// `pushLog`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PushLog {
    pub correlation_id: String,
    pub node: Identity,
    pub part: u64,
    pub parts_count: u64,
    pub content: String,
    pub status: LogStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

// ---------------------------------------------------------------------------------------------
// Instance state (§2.8)
// ---------------------------------------------------------------------------------------------

/// `stateRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StateRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub default: bool,
}

/// `newState`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NewState {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub state_checksum: String,
    pub state: String,
}

/// `updateState`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UpdateState {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub state_checksum: String,
    pub state: String,
}

/// `stateAcceptance` (note: `checksum`, not `stateChecksum`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StateAcceptance {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub checksum: String,
    pub result: StateResult,
    pub reason: String,
}

// ---------------------------------------------------------------------------------------------
// Env vars (§2.8)
// ---------------------------------------------------------------------------------------------

/// `overrideEnvVars`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OverrideEnvVars {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub items: Vec<EnvVarsInstanceInfo>,
}

/// `overrideEnvVars.items[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvVarsInstanceInfo {
    #[serde(flatten)]
    pub filter: InstanceFilter,
    pub variables: Vec<EnvVarInfo>,
}

/// `variables[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvVarInfo {
    pub name: String,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// `overrideEnvVarsStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OverrideEnvVarsStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub statuses: Vec<EnvVarStatus>,
}

/// `statuses[]`: one per variable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvVarStatus {
    #[serde(flatten)]
    pub ident: InstanceIdent,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

// ---------------------------------------------------------------------------------------------
// Certificates (§2.8)
// ---------------------------------------------------------------------------------------------

/// `renewCertificatesNotification` (`unitSecrets` is required).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewCertificatesNotification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub certificates: Vec<RenewCertData>,
    pub unit_secrets: UnitSecrets,
}

/// `renewCertificatesNotification.certificates[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RenewCertData {
    #[serde(rename = "type")]
    pub cert_type: CertType,
    pub node: Identity,
    pub serial: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_till: Option<String>,
}

/// `unitSecrets`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UnitSecrets {
    pub version: String,
    pub nodes: Vec<NodeSecret>,
}

/// `unitSecrets.nodes[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeSecret {
    pub node: Identity,
    pub secret: String,
}

/// `issueUnitCertificates`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IssueUnitCertificates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub requests: Vec<IssueCertData>,
}

/// `issueUnitCertificates.requests[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IssueCertData {
    #[serde(rename = "type")]
    pub cert_type: CertType,
    pub node: Identity,
    pub csr: String,
}

/// `issuedUnitCertificates`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IssuedUnitCertificates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub certificates: Vec<IssuedCertData>,
}

/// `issuedUnitCertificates.certificates[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IssuedCertData {
    #[serde(rename = "type")]
    pub cert_type: CertType,
    pub node: Identity,
    pub certificate_chain: String,
}

/// `installUnitCertificatesConfirmation`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstallUnitCertificatesConfirmation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub certificates: Vec<InstallCertData>,
}

/// `installUnitCertificatesConfirmation.certificates[]`: `serial` always emitted (`""` on error).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InstallCertData {
    #[serde(rename = "type")]
    pub cert_type: CertType,
    pub node: Identity,
    /// Lower-case hex.
    pub serial: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

// ---------------------------------------------------------------------------------------------
// Provisioning (§2.8)
// ---------------------------------------------------------------------------------------------

/// `startProvisioningRequest` (a `type:"node"` inside `node` is accepted and ignored).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StartProvisioningRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub node: Identity,
    pub password: String,
}

/// `startProvisioningResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StartProvisioningResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub node: Identity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
    pub csrs: Vec<CsrData>,
}

/// `startProvisioningResponse.csrs[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CsrData {
    #[serde(rename = "type")]
    pub cert_type: CertType,
    pub csr: String,
}

/// `finishProvisioningRequest` (`certificates` is required).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FinishProvisioningRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub node: Identity,
    pub certificates: Vec<CertChainData>,
    #[serde(default)]
    pub password: String,
}

/// `finishProvisioningRequest.certificates[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertChainData {
    #[serde(rename = "type")]
    pub cert_type: CertType,
    pub chain: String,
}

/// `finishProvisioningResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FinishProvisioningResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub node: Identity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

/// `deprovisioningRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeprovisioningRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub node: Identity,
    pub password: String,
}

/// `deprovisioningResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeprovisioningResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub node: Identity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

// ---------------------------------------------------------------------------------------------
// Case-insensitive incoming parse
// ---------------------------------------------------------------------------------------------

/// Every canonical key spelling used by the v7 protocol (envelope, all message bodies and the
/// `desiredStatus`/unit-config keys that are parsed elsewhere).
const CANONICAL_KEYS: &[&str] = &[
    // envelope
    "header",
    "data",
    "version",
    "systemId",
    "createdAt",
    "txn",
    "messageType",
    "correlationId",
    // common
    "id",
    "codename",
    "type",
    "title",
    "item",
    "subject",
    "instance",
    "errorInfo",
    "aosCode",
    "exitCode",
    "message",
    "node",
    "timestamp",
    "state",
    "items",
    "instances",
    "nodes",
    "subjects",
    "certificates",
    "name",
    "value",
    // nack
    "retryAfter",
    // desiredStatus / unit config
    "unitConfig",
    "owner",
    "indexDigest",
    "priority",
    "numInstances",
    "labels",
    "identity",
    "isReportedFromUnit",
    "certificate",
    "fingerprint",
    "certificateChains",
    "fingerprints",
    "formatVersion",
    "nodeGroupSubject",
    "alertRules",
    "ram",
    "cpu",
    "partitions",
    "download",
    "upload",
    "minTimeout",
    "minThreshold",
    "maxThreshold",
    "resourceRatios",
    "storage",
    // unitStatus
    "isDeltaInfo",
    "maxDmips",
    "physicalRam",
    "totalRam",
    "osInfo",
    "os",
    "features",
    "cpus",
    "modelName",
    "totalNumCores",
    "totalNumThreads",
    "archInfo",
    "architecture",
    "variant",
    "attrs",
    "path",
    "types",
    "totalSize",
    "isConnected",
    "runtimes",
    "runtimeType",
    "allowedDmips",
    "allowedRam",
    "maxInstances",
    "resources",
    "sharedCount",
    "runtime",
    "stateChecksum",
    // blobs
    "digests",
    "digest",
    "urls",
    "sha256",
    "size",
    "decryptInfo",
    "blockAlg",
    "blockIv",
    "blockKey",
    "signInfo",
    "chainName",
    "alg",
    "trustedTimestamp",
    "ocspValues",
    // alerts
    "tag",
    "coreComponent",
    "deviceId",
    "parameter",
    "url",
    "downloadedBytes",
    "totalBytes",
    "reason",
    // monitoring
    "usedSize",
    "nodeStates",
    "itemStates",
    // logs
    "logType",
    "filter",
    "from",
    "till",
    "nodeIds",
    "uploadOptions",
    "bearerToken",
    "bearerTokenTtl",
    "part",
    "partsCount",
    "content",
    "status",
    // state
    "default",
    "checksum",
    "result",
    // env vars
    "variables",
    "ttl",
    "statuses",
    // certificates / provisioning
    "serial",
    "validTill",
    "unitSecrets",
    "secret",
    "requests",
    "csr",
    "certificateChain",
    "password",
    "csrs",
    "chain",
];

/// Object keys whose member names are data (not protocol keys) and must not be rewritten.
const OPAQUE_KEYS: &[&str] = &["attrs"];

fn canonical_key(key: &str) -> Option<&'static str> {
    CANONICAL_KEYS
        .iter()
        .copied()
        .find(|c| c.eq_ignore_ascii_case(key))
}

/// Recursively renames object keys that equal a canonical key ignoring ASCII case.
fn canonicalize_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, val) in map {
                let canonical = canonical_key(&key);
                let new_key = canonical.map_or(key, str::to_owned);
                let new_val = if canonical.is_some_and(|c| OPAQUE_KEYS.contains(&c)) {
                    val
                } else {
                    canonicalize_keys(val)
                };
                out.insert(new_key, new_val);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonicalize_keys).collect()),
        other => other,
    }
}

/// Parses an incoming frame, matching keys case-insensitively.
///
/// Errors name the part that failed (`header` or the `data` message type) and carry the serde
/// error text.
pub fn parse_incoming(text: &str) -> Result<Envelope, String> {
    let raw: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let mut root = match canonicalize_keys(raw) {
        Value::Object(map) => map,
        _ => return Err("frame is not a JSON object".to_owned()),
    };
    let header_value = root
        .remove("header")
        .ok_or_else(|| "missing `header`".to_owned())?;
    let data_value = root
        .remove("data")
        .ok_or_else(|| "missing `data`".to_owned())?;
    let header =
        Header::deserialize(&header_value).map_err(|e| format!("invalid `header`: {e}"))?;
    let message_type = data_value
        .get("messageType")
        .and_then(Value::as_str)
        .ok_or_else(|| "`data.messageType` missing or not a string".to_owned())?
        .to_owned();
    let data = Message::deserialize(&data_value)
        .map_err(|e| format!("invalid `{message_type}` message in `data`: {e}"))?;
    Ok(Envelope { header, data })
}

/// Why an incoming frame was not accepted. Upstream drops all of these without an ACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, not an object, or `header`/`data` missing or of the wrong shape.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// `header.version` is not 7.
    #[error("header.version is {0}, expected 7")]
    WrongVersion(u64),
    /// `header.systemId` is not this unit's.
    #[error("header.systemId is {0:?}, not this unit's")]
    WrongSystemId(String),
    /// `data.messageType` names no v7 message.
    #[error("data.messageType: unknown value {0:?}")]
    UnknownType(String),
    /// The body of a known message type does not parse.
    #[error("data ({message_type}): {error}")]
    Body { message_type: String, error: String },
    /// The body parses but is over one of upstream's capacity limits (reference 2.10); the
    /// error names the member and the limit.
    #[error("data ({message_type}): {error}")]
    OverLimit { message_type: String, error: String },
}

/// Capacity limits of upstream (reference 2.10) for the cloud→unit messages other than
/// `desiredStatus` (whose limits `desired` checks).
pub mod limits {
    /// Blobs per `blobUrls`.
    pub const BLOBS: usize = 16;
    /// URLs per blob.
    pub const URLS_PER_BLOB: usize = 8;
    /// OCSP values per signature (not capped upstream at a documented value; kept small).
    pub const OCSP_VALUES: usize = 8;
    /// Nodes in a log filter, in unit secrets.
    pub const NODES: usize = super::super::MAX_NODES;
    /// Instances in `overrideEnvVars`.
    pub const ENV_INSTANCES: usize = super::super::MAX_INSTANCES;
    /// Variables per instance, and the lengths of a name and a value.
    pub const ENV_VARS: usize = 16;
    pub const ENV_NAME_LEN: usize = 64;
    pub const ENV_VALUE_LEN: usize = 256;
    /// Certificate types (`offline`, `online`, `sm`, `cm`, `iam`): certificates per node.
    pub const CERTS_PER_NODE: usize = 5;
    /// Certificates in one unit-wide renewal.
    pub const CERTS: usize = NODES * CERTS_PER_NODE;
    /// Instance state content, bytes.
    pub const STATE_LEN: usize = 64 * 1024;
}

fn check_count(path: &str, n: usize, max: usize) -> Result<(), String> {
    if n > max {
        return Err(format!("{path} has {n} entries, at most {max} allowed"));
    }
    Ok(())
}

fn check_len(path: &str, s: &str, max: usize) -> Result<(), String> {
    let n = s.chars().count();
    if n > max {
        return Err(format!(
            "{path} is {n} characters long, at most {max} allowed"
        ));
    }
    Ok(())
}

/// Checks a parsed cloud→unit message against upstream's capacity limits.
pub fn check_limits(msg: &Message) -> Result<(), String> {
    use limits::*;
    match msg {
        Message::BlobUrls(b) => {
            check_count("data.items", b.items.len(), BLOBS)?;
            for (i, item) in b.items.iter().enumerate() {
                check_count(
                    &format!("data.items[{i}].urls"),
                    item.urls.len(),
                    URLS_PER_BLOB,
                )?;
                if let Some(sign) = &item.sign_info {
                    check_count(
                        &format!("data.items[{i}].signInfo.ocspValues"),
                        sign.ocsp_values.len(),
                        OCSP_VALUES,
                    )?;
                }
            }
        }
        Message::RequestLog(r) => {
            check_count("data.filter.nodeIds", r.filter.node_ids.len(), NODES)?
        }
        Message::UpdateState(u) => {
            let n = u.state.len();
            if n > STATE_LEN {
                return Err(format!(
                    "data.state is {n} bytes, at most {STATE_LEN} allowed"
                ));
            }
        }
        Message::OverrideEnvVars(o) => {
            check_count("data.items", o.items.len(), ENV_INSTANCES)?;
            for (i, item) in o.items.iter().enumerate() {
                let path = format!("data.items[{i}].variables");
                check_count(&path, item.variables.len(), ENV_VARS)?;
                for (j, v) in item.variables.iter().enumerate() {
                    check_len(&format!("{path}[{j}].name"), &v.name, ENV_NAME_LEN)?;
                    check_len(&format!("{path}[{j}].value"), &v.value, ENV_VALUE_LEN)?;
                }
            }
        }
        Message::RenewCertificatesNotification(n) => {
            check_count("data.certificates", n.certificates.len(), CERTS)?;
            check_count("data.unitSecrets.nodes", n.unit_secrets.nodes.len(), NODES)?;
        }
        Message::IssuedUnitCertificates(c) => {
            check_count("data.certificates", c.certificates.len(), CERTS)?
        }
        Message::FinishProvisioningRequest(r) => {
            check_count("data.certificates", r.certificates.len(), CERTS_PER_NODE)?
        }
        _ => {}
    }
    Ok(())
}

/// How deep JSON may nest: serde_json's recursion limit, which also bounds our recursion over
/// the parsed value.
pub const MAX_JSON_DEPTH: usize = 128;

/// A JSON syntax error; running into serde_json's recursion limit is named as the nesting
/// limit it is.
fn json_error(e: &serde_json::Error) -> String {
    match e.to_string() {
        s if s.starts_with("recursion limit exceeded") => format!(
            "invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels (line {}, column {})",
            e.line(),
            e.column()
        ),
        s => format!("invalid JSON: {s}"),
    }
}

/// Parses and checks an incoming frame in the order upstream does: JSON, header (version 7, own
/// system ID, keys matched case-insensitively), then `data.messageType`, then the body.
pub fn parse_frame(text: &str, system_id: &str) -> Result<Envelope, FrameError> {
    let raw: Value =
        serde_json::from_str(text).map_err(|e| FrameError::Malformed(json_error(&e)))?;
    let mut root = match canonicalize_keys(raw) {
        Value::Object(map) => map,
        _ => {
            return Err(FrameError::Malformed(
                "frame is not a JSON object".to_owned(),
            ));
        }
    };
    let header_value = root
        .remove("header")
        .ok_or_else(|| FrameError::Malformed("missing `header`".to_owned()))?;
    let header = Header::deserialize(&header_value)
        .map_err(|e| FrameError::Malformed(format!("header: {e}")))?;
    if header.version != PROTOCOL_VERSION {
        return Err(FrameError::WrongVersion(header.version));
    }
    if header.system_id != system_id {
        return Err(FrameError::WrongSystemId(header.system_id));
    }
    let data_value = root
        .remove("data")
        .ok_or_else(|| FrameError::Malformed("missing `data`".to_owned()))?;
    let message_type = match data_value.get("messageType") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(FrameError::Malformed(
                "data.messageType: not a string".to_owned(),
            ));
        }
        None => {
            return Err(FrameError::Malformed(
                "data.messageType: missing".to_owned(),
            ));
        }
    };
    if !crate::api::cloud::desired::MESSAGE_TYPES.contains(&message_type.as_str()) {
        return Err(FrameError::UnknownType(message_type));
    }
    let data = Message::deserialize(&data_value).map_err(|e| FrameError::Body {
        message_type: message_type.clone(),
        error: e.to_string(),
    })?;
    check_limits(&data).map_err(|error| FrameError::OverLimit {
        message_type,
        error,
    })?;
    Ok(Envelope { header, data })
}

impl Message {
    /// Whether an unacknowledged message of this type survives a link drop (errata 21).
    /// Monitoring, unit status, new state, `issueUnitCertificates` and the provisioning responses
    /// are dropped; the rest is kept and resent after the reconnect.
    pub fn is_important(&self) -> bool {
        !matches!(
            self,
            Self::MonitoringData(_)
                | Self::UnitStatus(_)
                | Self::NewState(_)
                | Self::IssueUnitCertificates(_)
                | Self::StartProvisioningResponse(_)
                | Self::FinishProvisioningResponse(_)
                | Self::DeprovisioningResponse(_)
        )
    }

    /// Whether the cloud sends this type to the unit (the unit only receives these).
    pub fn is_cloud_to_unit(&self) -> bool {
        matches!(
            self,
            Self::Ack(_)
                | Self::Nack(_)
                | Self::DesiredStatus(_)
                | Self::BlobUrls(_)
                | Self::RequestLog(_)
                | Self::UpdateState(_)
                | Self::StateAcceptance(_)
                | Self::OverrideEnvVars(_)
                | Self::RenewCertificatesNotification(_)
                | Self::IssuedUnitCertificates(_)
                | Self::StartProvisioningRequest(_)
                | Self::FinishProvisioningRequest(_)
                | Self::DeprovisioningRequest(_)
        )
    }
}

/// Serialises an envelope to its JSON text.
pub fn to_json(envelope: &Envelope) -> Result<String, String> {
    serde_json::to_string(envelope)
        .map_err(|e| format!("serialize {}: {e}", envelope.data.message_type()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header_json() -> Value {
        json!({
            "version": 7,
            "systemId": "unit-1",
            "createdAt": "2026-05-07T05:44:11.061622Z",
            "txn": "5f0c1a2e-6f55-4c8e-9a3c-3c2b1c7d9e01"
        })
    }

    /// Changes the case of every key (except inside `attrs`) to exercise case-insensitive input.
    fn mangle(value: Value, upper: bool) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| {
                        let v = if k == "attrs" { v } else { mangle(v, upper) };
                        let k = if upper {
                            k.to_ascii_uppercase()
                        } else {
                            k.to_ascii_lowercase()
                        };
                        (k, v)
                    })
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.into_iter().map(|v| mangle(v, upper)).collect()),
            other => other,
        }
    }

    /// Asserts every key of `value` (outside `attrs`) is spelled canonically.
    fn assert_canonical(value: &Value) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    assert_eq!(canonical_key(k), Some(k.as_str()), "key {k} not canonical");
                    if k != "attrs" {
                        assert_canonical(v);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(assert_canonical),
            _ => {}
        }
    }

    #[test]
    fn canonical_keys_unique_ignoring_case() {
        for (i, a) in CANONICAL_KEYS.iter().enumerate() {
            for b in &CANONICAL_KEYS[i + 1..] {
                assert!(
                    !a.eq_ignore_ascii_case(b),
                    "duplicate canonical key {a}/{b}"
                );
            }
        }
    }

    fn check(msg: Message, expected: Value) {
        assert_canonical(&expected);
        let got = serde_json::to_value(&msg).unwrap();
        assert_eq!(got, expected, "serialize {}", msg.message_type());
        let frame = json!({"header": header_json(), "data": expected});
        for text in [
            frame.to_string(),
            mangle(frame.clone(), true).to_string(),
            mangle(frame.clone(), false).to_string(),
        ] {
            let parsed = parse_incoming(&text).unwrap();
            assert_eq!(parsed.data, msg, "parse {text}");
        }
    }

    fn err(aos: i32, exit: i32, msg: &str) -> ErrorInfo {
        ErrorInfo {
            aos_code: aos,
            exit_code: exit,
            message: msg.to_owned(),
        }
    }

    fn ident(item: &str, subject: &str, instance: u64) -> InstanceIdent {
        InstanceIdent {
            item: Identity::with_id(item),
            subject: Identity::with_id(subject),
            instance,
        }
    }

    fn node(codename: &str) -> Identity {
        Identity::with_codename(codename)
    }

    #[test]
    fn format_time_six_digits_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_time(1_778_132_651_061_622),
            "2026-05-07T05:44:11.061622Z"
        );
        assert_eq!(
            format_time(951_782_400_000_001),
            "2000-02-29T00:00:00.000001Z"
        );
        assert_eq!(format_time(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn envelope() {
        let env = Envelope {
            header: Header {
                version: 7,
                system_id: "unit-1".into(),
                created_at: format_time(1_778_132_651_061_622),
                txn: "5f0c1a2e-6f55-4c8e-9a3c-3c2b1c7d9e01".into(),
            },
            data: Message::Ack(Ack::default()),
        };
        let expected = json!({"header": header_json(), "data": {"messageType": "ack"}});
        assert_eq!(serde_json::to_value(&env).unwrap(), expected);
        let text = to_json(&env).unwrap();
        assert_eq!(parse_incoming(&text).unwrap(), env);
        let odd = r#"{"Header":{"VERSION":7,"systemID":"unit-1","createdat":"2026-05-07T05:44:11.061622Z","Txn":"5f0c1a2e-6f55-4c8e-9a3c-3c2b1c7d9e01"},"DATA":{"MessageType":"ack"}}"#;
        assert_eq!(parse_incoming(odd).unwrap(), env);
    }

    #[test]
    fn parse_errors_name_message_type() {
        let e = parse_incoming(
            r#"{"header":{"version":7},"data":{"messageType":"pushLog","part":"x"}}"#,
        )
        .unwrap_err();
        assert!(e.contains("pushLog"), "{e}");
        let e = parse_incoming(r#"{"header":{"version":7},"data":{"messageType":"bogus"}}"#)
            .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = parse_incoming(
            r#"{"header":{"version":7},"data":{"messageType":"requestLog","logType":"systemLog"}}"#,
        )
        .unwrap_err();
        assert!(e.contains("requestLog") && e.contains("filter"), "{e}");
        assert!(parse_incoming("[]").is_err());
    }

    #[test]
    fn ack() {
        check(Message::Ack(Ack::default()), json!({"messageType": "ack"}));
    }

    #[test]
    fn nack() {
        check(
            Message::Nack(Nack {
                correlation_id: None,
                retry_after: 1500,
            }),
            json!({"messageType": "nack", "retryAfter": 1500}),
        );
        let parsed =
            parse_incoming(r#"{"header":{"version":7},"data":{"messageType":"nack"}}"#).unwrap();
        assert_eq!(parsed.data, Message::Nack(Nack::default()));
        assert_eq!(Nack::default().retry_after, 500);
    }

    #[test]
    fn desired_status() {
        let body = json!({
            "correlationId": "c-1",
            "nodes": [{"item": {"codename": "node0"}, "state": "paused"}],
            "items": [{"item": {"id": "svc1", "type": "service"}, "version": "1.0.0",
                       "owner": {"id": "sp1"}, "indexDigest": "sha256:abcd"}],
            "instances": [{"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "priority": 10,
                           "numInstances": 2, "labels": ["a"]}],
            "subjects": [{"identity": {"id": "subj1"}, "type": "group", "isReportedFromUnit": false}],
            "certificates": [{"certificate": "MIIB", "fingerprint": "fp1"}],
            "certificateChains": [{"name": "chain1", "fingerprints": ["fp1"]}]
        });
        let Value::Object(mut map) = body.clone() else {
            panic!("object")
        };
        let msg = Message::DesiredStatus(map.clone());
        map.insert("messageType".into(), json!("desiredStatus"));
        check(msg, Value::Object(map));
    }

    #[test]
    fn unit_status_full() {
        let expected = json!({
            "messageType": "unitStatus",
            "isDeltaInfo": false,
            "unitConfig": [
                {"version": "1.0.0", "state": "installed"},
                {"version": "1.1.0", "state": "failed",
                 "errorInfo": {"aosCode": 9, "exitCode": 0, "message": "wrong version"}}
            ],
            "nodes": [{
                "identity": {"codename": "node0", "title": "Main node"},
                "nodeGroupSubject": {"codename": "mainType"},
                "maxDmips": 10000,
                "physicalRam": 8192,
                "totalRam": 4096,
                "osInfo": {"os": "linux", "version": "6.1", "features": ["feat1"]},
                "cpus": [{"modelName": "Cortex", "totalNumCores": 4, "totalNumThreads": 8,
                          "archInfo": {"architecture": "arm64", "variant": "v8"}, "maxDmips": 5000}],
                "attrs": {"MainNode": "", "AosComponents": "CM,SM,IAM"},
                "partitions": [{"name": "storages", "path": "/var/aos/storages",
                                "types": ["storages", "state"], "totalSize": 1024}],
                "state": "provisioned",
                "isConnected": true,
                "errorInfo": {"aosCode": 1, "exitCode": 0, "message": ""},
                "runtimes": [{"identity": {"codename": "runc"}, "runtimeType": "runc",
                              "archInfo": {"architecture": "arm64"}, "osInfo": {"os": "linux"},
                              "maxDmips": 100, "allowedDmips": 50, "totalRam": 200,
                              "allowedRam": 100, "maxInstances": 8}],
                "resources": [{"name": "camera", "sharedCount": 2}]
            }, {
                "identity": {"codename": "node1", "title": ""},
                "nodeGroupSubject": {"codename": "secType"},
                "maxDmips": 1,
                "totalRam": 2,
                "osInfo": {"os": "linux"},
                "state": "unprovisioned",
                "isConnected": false
            }],
            "items": [
                {"item": {"id": "svc1", "type": "service"}, "version": "1.0.0", "state": "installed"},
                {"item": {"codename": "pre1", "type": "component"}, "version": "2.0.0",
                 "state": "failed", "errorInfo": {"aosCode": 5, "exitCode": 2, "message": "not found"}}
            ],
            "instances": [{
                "item": {"id": "svc1", "type": "service"},
                "subject": {"id": "subj1"},
                "version": "1.0.0",
                "instances": [
                    {"node": {"codename": "node0"}, "runtime": {"codename": "runc"}, "instance": 0,
                     "stateChecksum": "abcdef", "state": "active"},
                    {"node": {"codename": "node1"}, "runtime": {"codename": "runc"}, "instance": 1,
                     "state": "failed", "errorInfo": {"aosCode": 2, "exitCode": 137, "message": "killed"}}
                ]
            }],
            "subjects": [{"codename": "subj1"}]
        });
        let mut attrs = BTreeMap::new();
        attrs.insert("MainNode".to_owned(), String::new());
        attrs.insert("AosComponents".to_owned(), "CM,SM,IAM".to_owned());
        let item_svc = Identity {
            id: Some("svc1".into()),
            item_type: Some(UpdateItemType::Service),
            ..Identity::default()
        };
        let msg = Message::UnitStatus(UnitStatus {
            correlation_id: None,
            is_delta_info: false,
            unit_config: Some(vec![
                UnitConfigStatus {
                    version: Some("1.0.0".into()),
                    state: UnitConfigState::Installed,
                    error_info: None,
                },
                UnitConfigStatus {
                    version: Some("1.1.0".into()),
                    state: UnitConfigState::Failed,
                    error_info: Some(err(9, 0, "wrong version")),
                },
            ]),
            nodes: Some(vec![
                NodeInfo {
                    identity: NodeIdentity {
                        codename: "node0".into(),
                        title: "Main node".into(),
                    },
                    node_group_subject: node("mainType"),
                    max_dmips: 10000,
                    physical_ram: Some(8192),
                    total_ram: 4096,
                    os_info: OsInfo {
                        os: "linux".into(),
                        version: Some("6.1".into()),
                        features: vec!["feat1".into()],
                    },
                    cpus: vec![CpuInfo {
                        model_name: "Cortex".into(),
                        total_num_cores: 4,
                        total_num_threads: 8,
                        arch_info: ArchInfo {
                            architecture: "arm64".into(),
                            variant: Some("v8".into()),
                        },
                        max_dmips: Some(5000),
                    }],
                    attrs,
                    partitions: vec![PartitionInfo {
                        name: "storages".into(),
                        path: Some("/var/aos/storages".into()),
                        types: vec!["storages".into(), "state".into()],
                        total_size: 1024,
                    }],
                    state: NodeState::Provisioned,
                    is_connected: true,
                    error_info: Some(err(1, 0, "")),
                    runtimes: vec![RuntimeInfo {
                        identity: node("runc"),
                        runtime_type: "runc".into(),
                        arch_info: ArchInfo {
                            architecture: "arm64".into(),
                            variant: None,
                        },
                        os_info: OsInfo {
                            os: "linux".into(),
                            ..OsInfo::default()
                        },
                        max_dmips: Some(100),
                        allowed_dmips: Some(50),
                        total_ram: Some(200),
                        allowed_ram: Some(100),
                        max_instances: 8,
                    }],
                    resources: vec![ResourceInfo {
                        name: "camera".into(),
                        shared_count: 2,
                    }],
                },
                NodeInfo {
                    identity: NodeIdentity {
                        codename: "node1".into(),
                        title: String::new(),
                    },
                    node_group_subject: node("secType"),
                    max_dmips: 1,
                    total_ram: 2,
                    os_info: OsInfo {
                        os: "linux".into(),
                        ..OsInfo::default()
                    },
                    state: NodeState::Unprovisioned,
                    ..NodeInfo::default()
                },
            ]),
            items: Some(vec![
                ItemStatus {
                    item: item_svc.clone(),
                    version: "1.0.0".into(),
                    state: ItemState::Installed,
                    error_info: None,
                },
                ItemStatus {
                    item: Identity {
                        codename: Some("pre1".into()),
                        item_type: Some(UpdateItemType::Component),
                        ..Identity::default()
                    },
                    version: "2.0.0".into(),
                    state: ItemState::Failed,
                    error_info: Some(err(5, 2, "not found")),
                },
            ]),
            instances: Some(vec![InstancesStatus {
                item: item_svc,
                subject: Identity::with_id("subj1"),
                version: "1.0.0".into(),
                instances: vec![
                    InstanceStatus {
                        node: node("node0"),
                        runtime: node("runc"),
                        instance: 0,
                        state_checksum: Some("abcdef".into()),
                        state: InstanceState::Active,
                        error_info: None,
                    },
                    InstanceStatus {
                        node: node("node1"),
                        runtime: node("runc"),
                        instance: 1,
                        state_checksum: None,
                        state: InstanceState::Failed,
                        error_info: Some(err(2, 137, "killed")),
                    },
                ],
            }]),
            subjects: Some(vec![node("subj1")]),
        });
        check(msg, expected);
    }

    #[test]
    fn unit_status_delta_sections_only() {
        check(
            Message::UnitStatus(UnitStatus {
                is_delta_info: true,
                items: Some(vec![]),
                ..UnitStatus::default()
            }),
            json!({"messageType": "unitStatus", "isDeltaInfo": true, "items": []}),
        );
    }

    #[test]
    fn request_blob_urls() {
        check(
            Message::RequestBlobUrls(RequestBlobUrls {
                correlation_id: "c-2".into(),
                digests: vec!["sha256:1111".into()],
            }),
            json!({"messageType": "requestBlobUrls", "correlationId": "c-2",
                   "digests": ["sha256:1111"]}),
        );
    }

    #[test]
    fn blob_urls() {
        let expected = json!({
            "messageType": "blobUrls",
            "correlationId": "c-2",
            "items": [{
                "digest": "sha256:1111",
                "urls": ["https://example.com/blob", "file:///tmp/blob"],
                "sha256": "deadbeef",
                "size": 4096,
                "decryptInfo": {"blockAlg": "AES256/CBC/pkcs7", "blockIv": "aXY=", "blockKey": "a2V5"},
                "signInfo": {"chainName": "chain1", "alg": "RSA/SHA256", "value": "c2ln",
                             "trustedTimestamp": "2026-05-07T05:44:11.000000Z",
                             "ocspValues": ["o1"]}
            }, {
                "digest": "sha256:2222",
                "urls": ["https://example.com/blob2"],
                "sha256": "cafe",
                "size": 1
            }]
        });
        let msg = Message::BlobUrls(BlobUrls {
            correlation_id: "c-2".into(),
            items: vec![
                BlobInfo {
                    digest: "sha256:1111".into(),
                    urls: vec!["https://example.com/blob".into(), "file:///tmp/blob".into()],
                    sha256: "deadbeef".into(),
                    size: 4096,
                    decrypt_info: Some(DecryptInfo {
                        block_alg: "AES256/CBC/pkcs7".into(),
                        block_iv: "aXY=".into(),
                        block_key: "a2V5".into(),
                    }),
                    sign_info: Some(SignInfo {
                        chain_name: "chain1".into(),
                        alg: "RSA/SHA256".into(),
                        value: "c2ln".into(),
                        trusted_timestamp: "2026-05-07T05:44:11.000000Z".into(),
                        ocsp_values: vec!["o1".into()],
                    }),
                },
                BlobInfo {
                    digest: "sha256:2222".into(),
                    urls: vec!["https://example.com/blob2".into()],
                    sha256: "cafe".into(),
                    size: 1,
                    decrypt_info: None,
                    sign_info: None,
                },
            ],
        });
        check(msg, expected);
    }

    #[test]
    fn alerts() {
        let ts = "2026-05-07T05:44:11.061622Z";
        let expected = json!({
            "messageType": "alerts",
            "items": [
                {"timestamp": ts, "tag": "systemAlert", "node": {"codename": "node0"}, "message": "sys"},
                {"timestamp": ts, "tag": "coreAlert", "node": {"codename": "node0"},
                 "coreComponent": "IAM", "message": "core"},
                {"timestamp": ts, "tag": "resourceAllocateAlert", "item": {"id": "svc1"},
                 "subject": {"id": "subj1"}, "instance": 1, "node": {"codename": "node0"},
                 "deviceId": "camera", "message": "busy"},
                {"timestamp": ts, "tag": "systemQuotaAlert", "node": {"codename": "node0"},
                 "parameter": "cpu", "value": 95},
                {"timestamp": ts, "tag": "instanceQuotaAlert", "item": {"id": "svc1"},
                 "subject": {"id": "subj1"}, "instance": 0, "parameter": "ram", "value": 1000},
                {"timestamp": ts, "tag": "downloadProgressAlert", "digest": "sha256:1111",
                 "url": "https://example.com/blob", "downloadedBytes": 10, "totalBytes": 100,
                 "state": "interrupted", "reason": "net",
                 "errorInfo": {"aosCode": 7, "exitCode": 0, "message": "timeout"}},
                {"timestamp": ts, "tag": "downloadProgressAlert", "digest": "sha256:1111",
                 "url": "https://example.com/blob", "downloadedBytes": 0, "totalBytes": 100,
                 "state": "started"},
                {"timestamp": ts, "tag": "updateItemInstanceAlert", "item": {"id": "svc1"},
                 "subject": {"id": "subj1"}, "instance": 2, "version": "1.0.0", "message": "crash"}
            ]
        });
        let n0 = node("node0");
        let msg = Message::Alerts(Alerts {
            correlation_id: None,
            items: vec![
                AlertItem::SystemAlert(SystemAlert {
                    timestamp: ts.into(),
                    node: n0.clone(),
                    message: "sys".into(),
                }),
                AlertItem::CoreAlert(CoreAlert {
                    timestamp: ts.into(),
                    node: n0.clone(),
                    core_component: CoreComponent::Iam,
                    message: "core".into(),
                }),
                AlertItem::ResourceAllocateAlert(ResourceAllocateAlert {
                    timestamp: ts.into(),
                    ident: ident("svc1", "subj1", 1),
                    node: n0.clone(),
                    device_id: "camera".into(),
                    message: "busy".into(),
                }),
                AlertItem::SystemQuotaAlert(SystemQuotaAlert {
                    timestamp: ts.into(),
                    node: n0,
                    parameter: "cpu".into(),
                    value: 95,
                }),
                AlertItem::InstanceQuotaAlert(InstanceQuotaAlert {
                    timestamp: ts.into(),
                    ident: ident("svc1", "subj1", 0),
                    parameter: "ram".into(),
                    value: 1000,
                }),
                AlertItem::DownloadProgressAlert(DownloadProgressAlert {
                    timestamp: ts.into(),
                    digest: "sha256:1111".into(),
                    url: "https://example.com/blob".into(),
                    downloaded_bytes: 10,
                    total_bytes: 100,
                    state: DownloadState::Interrupted,
                    reason: Some("net".into()),
                    error_info: Some(err(7, 0, "timeout")),
                }),
                AlertItem::DownloadProgressAlert(DownloadProgressAlert {
                    timestamp: ts.into(),
                    digest: "sha256:1111".into(),
                    url: "https://example.com/blob".into(),
                    downloaded_bytes: 0,
                    total_bytes: 100,
                    state: DownloadState::Started,
                    reason: None,
                    error_info: None,
                }),
                AlertItem::UpdateItemInstanceAlert(UpdateItemInstanceAlert {
                    timestamp: ts.into(),
                    ident: ident("svc1", "subj1", 2),
                    version: "1.0.0".into(),
                    message: "crash".into(),
                }),
            ],
        });
        if let Message::Alerts(a) = &msg {
            assert_eq!(a.items[1].tag(), AlertTag::CoreAlert);
        }
        check(msg, expected);
    }

    #[test]
    fn instance_as_string_accepted() {
        let text = r#"{"header":{"version":7},"data":{"messageType":"updateState",
            "item":{"id":"svc1"},"subject":{"id":"subj1"},"instance":"3",
            "stateChecksum":"aa","state":"s"}}"#;
        let Message::UpdateState(u) = parse_incoming(text).unwrap().data else {
            panic!("variant")
        };
        assert_eq!(u.ident.instance, 3);
    }

    #[test]
    fn monitoring_data() {
        let t1 = "2026-05-07T05:44:11.000001Z";
        let expected = json!({
            "messageType": "monitoringData",
            "nodes": [{
                "node": {"codename": "node0"},
                "nodeStates": [{"timestamp": t1, "state": "provisioned", "isConnected": true}],
                "items": [{"timestamp": t1, "ram": 100, "cpu": 20, "download": 3, "upload": 4,
                           "partitions": [{"name": "storages", "usedSize": 50}]}]
            }],
            "instances": [{
                "item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0,
                "node": {"codename": "node0"},
                "itemStates": [{"timestamp": t1, "state": "active"}],
                "items": [{"timestamp": t1, "ram": 1, "cpu": 2, "download": 0, "upload": 0}]
            }]
        });
        let msg = Message::MonitoringData(MonitoringData {
            correlation_id: None,
            nodes: vec![NodeMonitoring {
                node: node("node0"),
                node_states: vec![NodeStateEntry {
                    timestamp: t1.into(),
                    state: NodeState::Provisioned,
                    is_connected: true,
                }],
                items: vec![MonitoringItem {
                    timestamp: t1.into(),
                    ram: 100,
                    cpu: 20,
                    download: 3,
                    upload: 4,
                    partitions: vec![PartitionUsage {
                        name: "storages".into(),
                        used_size: 50,
                    }],
                }],
            }],
            instances: vec![InstanceMonitoring {
                ident: ident("svc1", "subj1", 0),
                node: node("node0"),
                item_states: vec![InstanceStateEntry {
                    timestamp: t1.into(),
                    state: InstanceState::Active,
                }],
                items: vec![MonitoringItem {
                    timestamp: t1.into(),
                    ram: 1,
                    cpu: 2,
                    ..MonitoringItem::default()
                }],
            }],
        });
        check(msg, expected);
        // Without instances the key is omitted.
        check(
            Message::MonitoringData(MonitoringData::default()),
            json!({"messageType": "monitoringData", "nodes": []}),
        );
    }

    #[test]
    fn request_log() {
        check(
            Message::RequestLog(RequestLog {
                correlation_id: "log-1".into(),
                log_type: LogType::InstanceLog,
                filter: LogFilter {
                    from: Some("2026-05-07T00:00:00.000000Z".into()),
                    till: Some("2026-05-08T00:00:00.000000Z".into()),
                    node_ids: vec![node("node0"), node("node1")],
                    item: Some(Identity::with_id("svc1")),
                    subject: Some(Identity::with_id("subj1")),
                    instance: Some(0),
                },
                upload_options: Some(UploadOptions {
                    upload_type: LogUploadType::Https,
                    url: "https://up.example.com".into(),
                    bearer_token: "tok".into(),
                    bearer_token_ttl: Some("2026-05-09T00:00:00.000000Z".into()),
                }),
            }),
            json!({
                "messageType": "requestLog",
                "correlationId": "log-1",
                "logType": "instanceLog",
                "filter": {"from": "2026-05-07T00:00:00.000000Z",
                           "till": "2026-05-08T00:00:00.000000Z",
                           "nodeIds": [{"codename": "node0"}, {"codename": "node1"}],
                           "item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0},
                "uploadOptions": {"type": "https", "url": "https://up.example.com",
                                  "bearerToken": "tok",
                                  "bearerTokenTtl": "2026-05-09T00:00:00.000000Z"}
            }),
        );
        check(
            Message::RequestLog(RequestLog {
                correlation_id: "log-2".into(),
                log_type: LogType::SystemLog,
                filter: LogFilter::default(),
                upload_options: None,
            }),
            json!({"messageType": "requestLog", "correlationId": "log-2", "logType": "systemLog",
                   "filter": {"nodeIds": []}}),
        );
    }

    #[test]
    fn push_log() {
        check(
            Message::PushLog(PushLog {
                correlation_id: "log-1".into(),
                node: node("node0"),
                part: 1,
                parts_count: 2,
                content: "bG9n".into(),
                status: LogStatus::Ok,
                error_info: None,
            }),
            json!({"messageType": "pushLog", "correlationId": "log-1", "node": {"codename": "node0"},
                   "part": 1, "partsCount": 2, "content": "bG9n", "status": "ok"}),
        );
        check(
            Message::PushLog(PushLog {
                correlation_id: "log-1".into(),
                node: node("node0"),
                part: 0,
                parts_count: 0,
                content: String::new(),
                status: LogStatus::Error,
                error_info: Some(err(1, 0, "failed")),
            }),
            json!({"messageType": "pushLog", "correlationId": "log-1", "node": {"codename": "node0"},
                   "part": 0, "partsCount": 0, "content": "", "status": "error",
                   "errorInfo": {"aosCode": 1, "exitCode": 0, "message": "failed"}}),
        );
    }

    #[test]
    fn state_request() {
        check(
            Message::StateRequest(StateRequest {
                correlation_id: None,
                ident: ident("svc1", "subj1", 0),
                default: false,
            }),
            json!({"messageType": "stateRequest", "item": {"id": "svc1"}, "subject": {"id": "subj1"},
                   "instance": 0, "default": false}),
        );
    }

    #[test]
    fn new_state() {
        check(
            Message::NewState(NewState {
                correlation_id: None,
                ident: ident("svc1", "subj1", 1),
                state_checksum: "abc123".into(),
                state: "state content".into(),
            }),
            json!({"messageType": "newState", "item": {"id": "svc1"}, "subject": {"id": "subj1"},
                   "instance": 1, "stateChecksum": "abc123", "state": "state content"}),
        );
    }

    #[test]
    fn update_state() {
        check(
            Message::UpdateState(UpdateState {
                correlation_id: None,
                ident: ident("svc1", "subj1", 1),
                state_checksum: "abc123".into(),
                state: "new content".into(),
            }),
            json!({"messageType": "updateState", "item": {"id": "svc1"}, "subject": {"id": "subj1"},
                   "instance": 1, "stateChecksum": "abc123", "state": "new content"}),
        );
    }

    #[test]
    fn state_acceptance() {
        check(
            Message::StateAcceptance(StateAcceptance {
                correlation_id: None,
                ident: ident("svc1", "subj1", 1),
                checksum: "abc123".into(),
                result: StateResult::Rejected,
                reason: "bad".into(),
            }),
            json!({"messageType": "stateAcceptance", "item": {"id": "svc1"}, "subject": {"id": "subj1"},
                   "instance": 1, "checksum": "abc123", "result": "rejected", "reason": "bad"}),
        );
    }

    #[test]
    fn override_env_vars() {
        check(
            Message::OverrideEnvVars(OverrideEnvVars {
                correlation_id: None,
                items: vec![
                    EnvVarsInstanceInfo {
                        filter: InstanceFilter {
                            item: Some(Identity::with_id("svc1")),
                            subject: Some(Identity::with_id("subj1")),
                            instance: Some(0),
                        },
                        variables: vec![
                            EnvVarInfo {
                                name: "A".into(),
                                value: "1".into(),
                                ttl: Some("2026-06-01T00:00:00.000000Z".into()),
                            },
                            EnvVarInfo {
                                name: "B".into(),
                                value: "2".into(),
                                ttl: None,
                            },
                        ],
                    },
                    EnvVarsInstanceInfo {
                        filter: InstanceFilter::default(),
                        variables: vec![],
                    },
                ],
            }),
            json!({"messageType": "overrideEnvVars", "items": [
                {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0,
                 "variables": [{"name": "A", "value": "1", "ttl": "2026-06-01T00:00:00.000000Z"},
                               {"name": "B", "value": "2"}]},
                {"variables": []}
            ]}),
        );
    }

    #[test]
    fn override_env_vars_status() {
        check(
            Message::OverrideEnvVarsStatus(OverrideEnvVarsStatus {
                correlation_id: None,
                statuses: vec![
                    EnvVarStatus {
                        ident: ident("svc1", "subj1", 0),
                        name: "A".into(),
                        error_info: None,
                    },
                    EnvVarStatus {
                        ident: ident("svc1", "subj1", 0),
                        name: "B".into(),
                        error_info: Some(err(6, 0, "bad name")),
                    },
                ],
            }),
            json!({"messageType": "overrideEnvVarsStatus", "statuses": [
                {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0, "name": "A"},
                {"item": {"id": "svc1"}, "subject": {"id": "subj1"}, "instance": 0, "name": "B",
                 "errorInfo": {"aosCode": 6, "exitCode": 0, "message": "bad name"}}
            ]}),
        );
    }

    #[test]
    fn renew_certificates_notification() {
        check(
            Message::RenewCertificatesNotification(RenewCertificatesNotification {
                correlation_id: None,
                certificates: vec![
                    RenewCertData {
                        cert_type: CertType::Online,
                        node: node("node0"),
                        serial: "0a1b".into(),
                        valid_till: Some("2027-01-01T00:00:00.000000Z".into()),
                    },
                    RenewCertData {
                        cert_type: CertType::Iam,
                        node: node("node1"),
                        serial: "ff".into(),
                        valid_till: None,
                    },
                ],
                unit_secrets: UnitSecrets {
                    version: "2.0.0".into(),
                    nodes: vec![NodeSecret {
                        node: node("node0"),
                        secret: "pwd".into(),
                    }],
                },
            }),
            json!({"messageType": "renewCertificatesNotification",
                   "certificates": [
                       {"type": "online", "node": {"codename": "node0"}, "serial": "0a1b",
                        "validTill": "2027-01-01T00:00:00.000000Z"},
                       {"type": "iam", "node": {"codename": "node1"}, "serial": "ff"}],
                   "unitSecrets": {"version": "2.0.0",
                                   "nodes": [{"node": {"codename": "node0"}, "secret": "pwd"}]}}),
        );
    }

    #[test]
    fn issue_unit_certificates() {
        check(
            Message::IssueUnitCertificates(IssueUnitCertificates {
                correlation_id: None,
                requests: vec![IssueCertData {
                    cert_type: CertType::Sm,
                    node: node("node0"),
                    csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
                }],
            }),
            json!({"messageType": "issueUnitCertificates", "requests": [
                {"type": "sm", "node": {"codename": "node0"},
                 "csr": "-----BEGIN CERTIFICATE REQUEST-----"}]}),
        );
    }

    #[test]
    fn issued_unit_certificates() {
        check(
            Message::IssuedUnitCertificates(IssuedUnitCertificates {
                correlation_id: None,
                certificates: vec![IssuedCertData {
                    cert_type: CertType::Cm,
                    node: node("node0"),
                    certificate_chain: "-----BEGIN CERTIFICATE-----".into(),
                }],
            }),
            json!({"messageType": "issuedUnitCertificates", "certificates": [
                {"type": "cm", "node": {"codename": "node0"},
                 "certificateChain": "-----BEGIN CERTIFICATE-----"}]}),
        );
    }

    #[test]
    fn install_unit_certificates_confirmation() {
        check(
            Message::InstallUnitCertificatesConfirmation(InstallUnitCertificatesConfirmation {
                correlation_id: None,
                certificates: vec![
                    InstallCertData {
                        cert_type: CertType::Offline,
                        node: node("node0"),
                        serial: "0a1b".into(),
                        error_info: None,
                    },
                    InstallCertData {
                        cert_type: CertType::Iam,
                        node: node("node1"),
                        serial: String::new(),
                        error_info: Some(err(1, 0, "apply failed")),
                    },
                ],
            }),
            json!({"messageType": "installUnitCertificatesConfirmation", "certificates": [
                {"type": "offline", "node": {"codename": "node0"}, "serial": "0a1b"},
                {"type": "iam", "node": {"codename": "node1"}, "serial": "",
                 "errorInfo": {"aosCode": 1, "exitCode": 0, "message": "apply failed"}}]}),
        );
    }

    #[test]
    fn start_provisioning_request() {
        check(
            Message::StartProvisioningRequest(StartProvisioningRequest {
                correlation_id: Some("p-1".into()),
                node: node("node1"),
                password: "pwd".into(),
            }),
            json!({"messageType": "startProvisioningRequest", "correlationId": "p-1",
                   "node": {"codename": "node1"}, "password": "pwd"}),
        );
        // Extra `type: "node"` is accepted.
        let text = r#"{"header":{"version":7},"data":{"messageType":"startProvisioningRequest",
            "correlationId":"p-1","node":{"codename":"node1","type":"node"},"password":"pwd"}}"#;
        let Message::StartProvisioningRequest(r) = parse_incoming(text).unwrap().data else {
            panic!("variant")
        };
        assert_eq!(r.node.codename.as_deref(), Some("node1"));
    }

    #[test]
    fn start_provisioning_response() {
        check(
            Message::StartProvisioningResponse(StartProvisioningResponse {
                correlation_id: Some("p-1".into()),
                node: node("node1"),
                error_info: None,
                csrs: vec![
                    CsrData {
                        cert_type: CertType::Iam,
                        csr: "csr-iam".into(),
                    },
                    CsrData {
                        cert_type: CertType::Online,
                        csr: "csr-online".into(),
                    },
                ],
            }),
            json!({"messageType": "startProvisioningResponse", "correlationId": "p-1",
                   "node": {"codename": "node1"},
                   "csrs": [{"type": "iam", "csr": "csr-iam"}, {"type": "online", "csr": "csr-online"}]}),
        );
        check(
            Message::StartProvisioningResponse(StartProvisioningResponse {
                correlation_id: Some("p-1".into()),
                node: node("node1"),
                error_info: Some(err(9, 0, "wrong state")),
                csrs: vec![],
            }),
            json!({"messageType": "startProvisioningResponse", "correlationId": "p-1",
                   "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 9, "exitCode": 0, "message": "wrong state"},
                   "csrs": []}),
        );
    }

    #[test]
    fn finish_provisioning_request() {
        check(
            Message::FinishProvisioningRequest(FinishProvisioningRequest {
                correlation_id: Some("p-2".into()),
                node: node("node1"),
                certificates: vec![CertChainData {
                    cert_type: CertType::Iam,
                    chain: "-----BEGIN CERTIFICATE-----".into(),
                }],
                password: "pwd".into(),
            }),
            json!({"messageType": "finishProvisioningRequest", "correlationId": "p-2",
                   "node": {"codename": "node1"},
                   "certificates": [{"type": "iam", "chain": "-----BEGIN CERTIFICATE-----"}],
                   "password": "pwd"}),
        );
    }

    #[test]
    fn finish_provisioning_response() {
        check(
            Message::FinishProvisioningResponse(FinishProvisioningResponse {
                correlation_id: Some("p-2".into()),
                node: node("node1"),
                error_info: None,
            }),
            json!({"messageType": "finishProvisioningResponse", "correlationId": "p-2",
                   "node": {"codename": "node1"}}),
        );
        check(
            Message::FinishProvisioningResponse(FinishProvisioningResponse {
                correlation_id: Some("p-2".into()),
                node: node("node1"),
                error_info: Some(err(1, 5, "io")),
            }),
            json!({"messageType": "finishProvisioningResponse", "correlationId": "p-2",
                   "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 1, "exitCode": 5, "message": "io"}}),
        );
    }

    #[test]
    fn deprovisioning_request() {
        check(
            Message::DeprovisioningRequest(DeprovisioningRequest {
                correlation_id: Some("p-3".into()),
                node: node("node1"),
                password: "pwd".into(),
            }),
            json!({"messageType": "deprovisioningRequest", "correlationId": "p-3",
                   "node": {"codename": "node1"}, "password": "pwd"}),
        );
    }

    #[test]
    fn deprovisioning_response() {
        check(
            Message::DeprovisioningResponse(DeprovisioningResponse {
                correlation_id: Some("p-3".into()),
                node: node("node1"),
                error_info: Some(err(5, 0, "")),
            }),
            json!({"messageType": "deprovisioningResponse", "correlationId": "p-3",
                   "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 5, "exitCode": 0, "message": ""}}),
        );
    }
}
