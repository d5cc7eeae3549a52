//! Certificate renewal, certificate installation and node provisioning (cloud protocol v7
//! §2.8/§2.9).
//!
//! The functions here are about message *content*: each takes the parsed cloud request and an
//! [`Iam`] implementation and builds the reply body. Framing, acknowledgement and copying the
//! request's `correlationId` into the reply belong to the caller.
//!
//! * [`renew`]: `renewCertificatesNotification` → `issueUnitCertificates` (or an error, in which
//!   case nothing is sent).
//! * [`install`]: `issuedUnitCertificates` → `installUnitCertificatesConfirmation` (always).
//! * [`start_provisioning`], [`finish_provisioning`], [`deprovisioning`]: request → response
//!   (always; `errorInfo` on failure).

use std::fmt;
use std::future::Future;

use super::messages::{
    CertType, CsrData, DeprovisioningRequest, DeprovisioningResponse, ErrorInfo,
    FinishProvisioningRequest, FinishProvisioningResponse, Identity, InstallCertData,
    InstallUnitCertificatesConfirmation, IssueCertData, IssueUnitCertificates, IssuedCertData,
    IssuedUnitCertificates, RenewCertificatesNotification, StartProvisioningRequest,
    StartProvisioningResponse,
};

// ---------------------------------------------------------------------------------------------
// Aos error codes used here (§2.1)
// ---------------------------------------------------------------------------------------------

/// `aosCode` 1: generic failure.
pub const AOS_FAILED: i32 = 1;
/// `aosCode` 6: invalid argument.
pub const AOS_INVALID_ARGUMENT: i32 = 6;

// ---------------------------------------------------------------------------------------------
// IAM interface
// ---------------------------------------------------------------------------------------------

/// Error returned by an [`Iam`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamError {
    /// Aos error code reported by IAM, if any. `None` (or a value `<= 0`) becomes
    /// [`AOS_FAILED`] in [`ErrorInfo`], because the cloud only treats `aosCode > 0` as an error.
    pub aos_code: Option<i32>,
    /// errno / exit code reported by IAM (0 when unknown).
    pub exit_code: i32,
    /// Human-readable description.
    pub message: String,
}

impl IamError {
    /// Error with a message only.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            aos_code: None,
            exit_code: 0,
            message: message.into(),
        }
    }

    /// Error with an Aos code and a message.
    pub fn with_code(aos_code: i32, message: impl Into<String>) -> Self {
        Self {
            aos_code: Some(aos_code),
            exit_code: 0,
            message: message.into(),
        }
    }

    /// The cloud `errorInfo` for this error, its message prefixed with `context` when non-empty.
    pub fn to_error_info(&self, context: &str) -> ErrorInfo {
        let message = if context.is_empty() {
            self.message.clone()
        } else {
            format!("{context}: {}", self.message)
        };
        ErrorInfo {
            aos_code: match self.aos_code {
                Some(code) if code > 0 => code,
                _ => AOS_FAILED,
            },
            exit_code: self.exit_code,
            message,
        }
    }
}

impl fmt::Display for IamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.aos_code {
            Some(code) => write!(f, "{} (aosCode {code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for IamError {}

impl From<IamError> for ErrorInfo {
    fn from(err: IamError) -> Self {
        err.to_error_info("")
    }
}

impl From<&IamError> for ErrorInfo {
    fn from(err: &IamError) -> Self {
        err.to_error_info("")
    }
}

/// Result of [`Iam::apply_cert`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedCert {
    /// URL of the installed certificate.
    pub cert_url: String,
    /// Certificate serial number as lower-case hex.
    pub serial: String,
}

/// The IAM services the certificate and provisioning handlers need (IAM v6
/// `IAMCertificateService`, `IAMProvisioningService`, plus the main node's ID).
///
/// Certificate types are the IAM strings (`"online"`, `"iam"`, ...; see [`cert_type_name`]).
pub trait Iam: Send + Sync {
    /// ID of the node the CM runs on (the main node).
    fn main_node_id(&self) -> String;

    /// `CreateKey`: creates a key for `cert_type` on `node_id` and returns the CSR (PEM).
    fn create_key(
        &self,
        node_id: &str,
        cert_type: &str,
        subject: &str,
        password: &str,
    ) -> impl Future<Output = Result<String, IamError>> + Send;

    /// `ApplyCert`: installs the PEM certificate chain for `cert_type` on `node_id`.
    fn apply_cert(
        &self,
        node_id: &str,
        cert_type: &str,
        pem_chain: &str,
    ) -> impl Future<Output = Result<AppliedCert, IamError>> + Send;

    /// `GetCertTypes`: certificate types the node needs, in IAM order.
    fn cert_types(
        &self,
        node_id: &str,
    ) -> impl Future<Output = Result<Vec<String>, IamError>> + Send;

    /// `StartProvisioning`.
    fn start_provisioning(
        &self,
        node_id: &str,
        password: &str,
    ) -> impl Future<Output = Result<(), IamError>> + Send;

    /// `FinishProvisioning`.
    fn finish_provisioning(
        &self,
        node_id: &str,
        password: &str,
    ) -> impl Future<Output = Result<(), IamError>> + Send;

    /// `Deprovision`.
    fn deprovision(
        &self,
        node_id: &str,
        password: &str,
    ) -> impl Future<Output = Result<(), IamError>> + Send;
}

/// IAM / cloud string of a certificate type.
pub fn cert_type_name(cert_type: CertType) -> &'static str {
    match cert_type {
        CertType::Offline => "offline",
        CertType::Online => "online",
        CertType::Sm => "sm",
        CertType::Cm => "cm",
        CertType::Iam => "iam",
    }
}

/// Certificate type from its IAM / cloud string (exact, lower case).
pub fn parse_cert_type(name: &str) -> Option<CertType> {
    match name {
        "offline" => Some(CertType::Offline),
        "online" => Some(CertType::Online),
        "sm" => Some(CertType::Sm),
        "cm" => Some(CertType::Cm),
        "iam" => Some(CertType::Iam),
        _ => None,
    }
}

/// The node ID carried by a node identity: its non-empty `codename`.
fn node_id(node: &Identity) -> Option<&str> {
    node.codename.as_deref().filter(|id| !id.is_empty())
}

/// The node identity used in replies: `{codename}` only (a request's `type:"node"` is dropped).
fn reply_node(node: &Identity) -> Identity {
    Identity {
        codename: node.codename.clone(),
        ..Identity::default()
    }
}

fn invalid_argument(message: impl Into<String>) -> ErrorInfo {
    ErrorInfo {
        aos_code: AOS_INVALID_ARGUMENT,
        exit_code: 0,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Renewal
// ---------------------------------------------------------------------------------------------

/// Why a renewal request was abandoned (no `issueUnitCertificates` is sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewError {
    /// The notification lists no certificates.
    NoCertificates,
    /// `certificates[index]` has no node codename.
    MissingNode { index: usize, cert_type: CertType },
    /// `unitSecrets.nodes` has no secret for the node.
    MissingSecret { node: String, cert_type: CertType },
    /// IAM `CreateKey` failed.
    CreateKey {
        node: String,
        cert_type: CertType,
        error: IamError,
    },
}

impl fmt::Display for RenewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCertificates => f.write_str("renew certificates: no certificates listed"),
            Self::MissingNode { index, cert_type } => write!(
                f,
                "renew certificates: certificate {index} ({}) has no node codename",
                cert_type_name(*cert_type)
            ),
            Self::MissingSecret { node, cert_type } => write!(
                f,
                "renew certificates: no secret for node {node:?} ({} certificate)",
                cert_type_name(*cert_type)
            ),
            Self::CreateKey {
                node,
                cert_type,
                error,
            } => write!(
                f,
                "renew certificates: create {} key on node {node:?}: {error}",
                cert_type_name(*cert_type)
            ),
        }
    }
}

impl std::error::Error for RenewError {}

/// Handles `renewCertificatesNotification`: one CSR per listed certificate, in the listed order,
/// created with subject `""` and the node's secret from `unitSecrets` as password.
///
/// Every certificate's node and secret are checked before IAM is called, so a missing secret
/// abandons the request without creating any key. A failed `CreateKey` abandons it too.
/// The returned message has no `correlationId`.
pub async fn renew<I: Iam>(
    iam: &I,
    notification: &RenewCertificatesNotification,
) -> Result<IssueUnitCertificates, RenewError> {
    if notification.certificates.is_empty() {
        return Err(RenewError::NoCertificates);
    }

    let mut planned = Vec::with_capacity(notification.certificates.len());
    for (index, cert) in notification.certificates.iter().enumerate() {
        let Some(node) = node_id(&cert.node) else {
            return Err(RenewError::MissingNode {
                index,
                cert_type: cert.cert_type,
            });
        };
        let secret = notification
            .unit_secrets
            .nodes
            .iter()
            .find(|s| node_id(&s.node) == Some(node))
            .map(|s| s.secret.as_str());
        let Some(secret) = secret else {
            return Err(RenewError::MissingSecret {
                node: node.to_owned(),
                cert_type: cert.cert_type,
            });
        };
        planned.push((cert, node, secret));
    }

    let mut requests = Vec::with_capacity(planned.len());
    for (cert, node, secret) in planned {
        let csr = iam
            .create_key(node, cert_type_name(cert.cert_type), "", secret)
            .await
            .map_err(|error| RenewError::CreateKey {
                node: node.to_owned(),
                cert_type: cert.cert_type,
                error,
            })?;
        requests.push(IssueCertData {
            cert_type: cert.cert_type,
            node: reply_node(&cert.node),
            csr,
        });
    }

    Ok(IssueUnitCertificates {
        correlation_id: None,
        requests,
    })
}

// ---------------------------------------------------------------------------------------------
// Installation
// ---------------------------------------------------------------------------------------------

/// Handles `issuedUnitCertificates`: applies every certificate and reports each result.
///
/// Order of application (and of the confirmation entries): certificates of other nodes first,
/// sorted by node ID, each node's `iam` certificate after its other ones; then the main node's
/// certificates with its `iam` certificate very last. Ties keep the message order.
///
/// A failed apply (or a certificate without node codename, which is not sent to IAM) yields an
/// entry with `serial: ""` and `errorInfo`; the remaining certificates are still applied.
/// The returned message has no `correlationId`.
pub async fn install<I: Iam>(
    iam: &I,
    issued: &IssuedUnitCertificates,
) -> InstallUnitCertificatesConfirmation {
    let main_node = iam.main_node_id();

    let mut ordered: Vec<_> = issued.certificates.iter().collect();
    // Stable sort: equal keys keep the cloud's order.
    ordered.sort_by(|a, b| install_key(a, &main_node).cmp(&install_key(b, &main_node)));

    let mut certificates = Vec::with_capacity(ordered.len());
    for cert in ordered {
        let type_name = cert_type_name(cert.cert_type);
        let result = match node_id(&cert.node) {
            None => Err(invalid_argument(format!(
                "{type_name} certificate has no node codename"
            ))),
            Some(node) => iam
                .apply_cert(node, type_name, &cert.certificate_chain)
                .await
                .map_err(ErrorInfo::from),
        };
        let (serial, error_info) = match result {
            Ok(applied) => (applied.serial.to_ascii_lowercase(), None),
            Err(info) => (String::new(), Some(info)),
        };
        certificates.push(InstallCertData {
            cert_type: cert.cert_type,
            node: reply_node(&cert.node),
            serial,
            error_info,
        });
    }

    InstallUnitCertificatesConfirmation {
        correlation_id: None,
        certificates,
    }
}

/// Sort key for [`install`]: (is main node, node ID, is `iam` certificate).
fn install_key<'a>(cert: &'a IssuedCertData, main_node: &str) -> (bool, &'a str, bool) {
    let node = node_id(&cert.node).unwrap_or("");
    (node == main_node, node, cert.cert_type == CertType::Iam)
}

// ---------------------------------------------------------------------------------------------
// Provisioning
// ---------------------------------------------------------------------------------------------

/// Handles `startProvisioningRequest`: IAM `StartProvisioning`, then `GetCertTypes`, then one
/// `CreateKey` per type (subject `""`, the request's password). CSRs are listed in IAM's type
/// order. On any failure the response carries `errorInfo` and an empty `csrs` list.
/// The returned message has no `correlationId`.
pub async fn start_provisioning<I: Iam>(
    iam: &I,
    request: &StartProvisioningRequest,
) -> StartProvisioningResponse {
    let (csrs, error_info) = match start_provisioning_steps(iam, request).await {
        Ok(csrs) => (csrs, None),
        Err(info) => (Vec::new(), Some(info)),
    };
    StartProvisioningResponse {
        correlation_id: None,
        node: reply_node(&request.node),
        error_info,
        csrs,
    }
}

async fn start_provisioning_steps<I: Iam>(
    iam: &I,
    request: &StartProvisioningRequest,
) -> Result<Vec<CsrData>, ErrorInfo> {
    let node = node_id(&request.node)
        .ok_or_else(|| invalid_argument("start provisioning: node has no codename"))?;

    iam.start_provisioning(node, &request.password)
        .await
        .map_err(|e| e.to_error_info("start provisioning"))?;

    let names = iam
        .cert_types(node)
        .await
        .map_err(|e| e.to_error_info("get cert types"))?;

    // Resolve every type before creating any key.
    let mut types = Vec::with_capacity(names.len());
    for name in &names {
        let cert_type = parse_cert_type(name).ok_or_else(|| ErrorInfo {
            aos_code: AOS_FAILED,
            exit_code: 0,
            message: format!("get cert types: unknown certificate type {name:?}"),
        })?;
        types.push((name.as_str(), cert_type));
    }

    let mut csrs = Vec::with_capacity(types.len());
    for (name, cert_type) in types {
        let csr = iam
            .create_key(node, name, "", &request.password)
            .await
            .map_err(|e| e.to_error_info(&format!("create {name} key")))?;
        csrs.push(CsrData { cert_type, csr });
    }
    Ok(csrs)
}

/// Handles `finishProvisioningRequest`: IAM `ApplyCert` for each certificate in the listed order,
/// then `FinishProvisioning`. The first failure stops the sequence and is reported in
/// `errorInfo` (`FinishProvisioning` is not called after a failed apply).
/// The returned message has no `correlationId`.
pub async fn finish_provisioning<I: Iam>(
    iam: &I,
    request: &FinishProvisioningRequest,
) -> FinishProvisioningResponse {
    FinishProvisioningResponse {
        correlation_id: None,
        node: reply_node(&request.node),
        error_info: finish_provisioning_steps(iam, request).await.err(),
    }
}

async fn finish_provisioning_steps<I: Iam>(
    iam: &I,
    request: &FinishProvisioningRequest,
) -> Result<(), ErrorInfo> {
    let node = node_id(&request.node)
        .ok_or_else(|| invalid_argument("finish provisioning: node has no codename"))?;

    for cert in &request.certificates {
        let name = cert_type_name(cert.cert_type);
        iam.apply_cert(node, name, &cert.chain)
            .await
            .map_err(|e| e.to_error_info(&format!("apply {name} certificate")))?;
    }

    iam.finish_provisioning(node, &request.password)
        .await
        .map_err(|e| e.to_error_info("finish provisioning"))
}

/// Handles `deprovisioningRequest`: IAM `Deprovision`. The main node (the one the CM runs on) is
/// refused without calling IAM. The returned message has no `correlationId`.
pub async fn deprovisioning<I: Iam>(
    iam: &I,
    request: &DeprovisioningRequest,
) -> DeprovisioningResponse {
    DeprovisioningResponse {
        correlation_id: None,
        node: reply_node(&request.node),
        error_info: deprovisioning_steps(iam, request).await.err(),
    }
}

async fn deprovisioning_steps<I: Iam>(
    iam: &I,
    request: &DeprovisioningRequest,
) -> Result<(), ErrorInfo> {
    let node = node_id(&request.node)
        .ok_or_else(|| invalid_argument("deprovision: node has no codename"))?;

    if node == iam.main_node_id() {
        return Err(invalid_argument("deprovision: can't deprovision main node"));
    }

    iam.deprovision(node, &request.password)
        .await
        .map_err(|e| e.to_error_info("deprovision"))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::super::messages::{
        self, CertChainData, Message, NodeSecret, RenewCertData, UnitSecrets,
    };
    use super::*;
    use serde_json::{Value, json};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Fake IAM: records every call as a string; failures are configured by call key.
    #[derive(Default)]
    struct FakeIam {
        main: String,
        calls: Mutex<Vec<String>>,
        /// Key (e.g. `"apply node1 sm"`, `"start node1"`) → error to return.
        failures: HashMap<String, IamError>,
        cert_types: Vec<String>,
    }

    impl FakeIam {
        fn new(main: &str) -> Self {
            Self {
                main: main.into(),
                cert_types: vec!["iam".into(), "online".into(), "offline".into()],
                ..Self::default()
            }
        }

        fn fail(mut self, key: &str, err: IamError) -> Self {
            self.failures.insert(key.into(), err);
            self
        }

        fn record(&self, call: String, key: &str) -> Result<(), IamError> {
            self.calls.lock().unwrap().push(call);
            match self.failures.get(key) {
                Some(err) => Err(err.clone()),
                None => Ok(()),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Iam for FakeIam {
        fn main_node_id(&self) -> String {
            self.main.clone()
        }

        async fn create_key(
            &self,
            node_id: &str,
            cert_type: &str,
            subject: &str,
            password: &str,
        ) -> Result<String, IamError> {
            self.record(
                format!("create_key {node_id} {cert_type} subject={subject:?} password={password}"),
                &format!("create_key {node_id} {cert_type}"),
            )?;
            Ok(format!("CSR {node_id} {cert_type}"))
        }

        async fn apply_cert(
            &self,
            node_id: &str,
            cert_type: &str,
            pem_chain: &str,
        ) -> Result<AppliedCert, IamError> {
            self.record(
                format!("apply {node_id} {cert_type} {pem_chain}"),
                &format!("apply {node_id} {cert_type}"),
            )?;
            Ok(AppliedCert {
                cert_url: format!("file:///{node_id}/{cert_type}.pem"),
                // Upper case on purpose: the handler must lower-case it.
                serial: format!("0A{}", pem_chain.len()),
            })
        }

        async fn cert_types(&self, node_id: &str) -> Result<Vec<String>, IamError> {
            self.record(
                format!("cert_types {node_id}"),
                &format!("cert_types {node_id}"),
            )?;
            Ok(self.cert_types.clone())
        }

        async fn start_provisioning(&self, node_id: &str, password: &str) -> Result<(), IamError> {
            self.record(
                format!("start {node_id} {password}"),
                &format!("start {node_id}"),
            )
        }

        async fn finish_provisioning(&self, node_id: &str, password: &str) -> Result<(), IamError> {
            self.record(
                format!("finish {node_id} {password}"),
                &format!("finish {node_id}"),
            )
        }

        async fn deprovision(&self, node_id: &str, password: &str) -> Result<(), IamError> {
            self.record(
                format!("deprovision {node_id} {password}"),
                &format!("deprovision {node_id}"),
            )
        }
    }

    fn node(id: &str) -> Identity {
        Identity::with_codename(id)
    }

    /// JSON of a reply as it goes into `data` (with `messageType`).
    fn data_json(message: Message) -> Value {
        serde_json::to_value(message).unwrap()
    }

    fn renew_notification(
        certs: &[(CertType, &str)],
        secrets: &[(&str, &str)],
    ) -> RenewCertificatesNotification {
        RenewCertificatesNotification {
            correlation_id: None,
            certificates: certs
                .iter()
                .map(|(t, n)| RenewCertData {
                    cert_type: *t,
                    node: node(n),
                    serial: "ff".into(),
                    valid_till: None,
                })
                .collect(),
            unit_secrets: UnitSecrets {
                version: "2.0.0".into(),
                nodes: secrets
                    .iter()
                    .map(|(n, s)| NodeSecret {
                        node: node(n),
                        secret: (*s).into(),
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn cert_type_names_match_serde() {
        for t in [
            CertType::Offline,
            CertType::Online,
            CertType::Sm,
            CertType::Cm,
            CertType::Iam,
        ] {
            assert_eq!(serde_json::to_value(t).unwrap(), json!(cert_type_name(t)));
            assert_eq!(parse_cert_type(cert_type_name(t)), Some(t));
        }
        assert_eq!(parse_cert_type("IAM"), None);
        assert_eq!(parse_cert_type("diskencryption"), None);
    }

    #[test]
    fn iam_error_to_error_info() {
        let info: ErrorInfo = IamError::new("boom").into();
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            json!({"aosCode": 1, "exitCode": 0, "message": "boom"})
        );
        let err = IamError {
            aos_code: Some(9),
            exit_code: 2,
            message: "wrong state".into(),
        };
        assert_eq!(
            serde_json::to_value(err.to_error_info("start provisioning")).unwrap(),
            json!({"aosCode": 9, "exitCode": 2, "message": "start provisioning: wrong state"})
        );
        // aosCode 0 would read as "no error" on the cloud side.
        let info: ErrorInfo = IamError::with_code(0, "x").into();
        assert_eq!(info.aos_code, AOS_FAILED);
    }

    #[tokio::test]
    async fn renew_creates_csrs_in_listed_order() {
        let iam = FakeIam::new("main");
        let n = renew_notification(
            &[
                (CertType::Online, "main"),
                (CertType::Iam, "node1"),
                (CertType::Sm, "node1"),
            ],
            &[("node1", "s1"), ("main", "s0")],
        );
        let issue = renew(&iam, &n).await.unwrap();
        assert_eq!(
            iam.calls(),
            vec![
                "create_key main online subject=\"\" password=s0",
                "create_key node1 iam subject=\"\" password=s1",
                "create_key node1 sm subject=\"\" password=s1",
            ]
        );
        assert_eq!(
            data_json(Message::IssueUnitCertificates(issue)),
            json!({"messageType": "issueUnitCertificates", "requests": [
                {"type": "online", "node": {"codename": "main"}, "csr": "CSR main online"},
                {"type": "iam", "node": {"codename": "node1"}, "csr": "CSR node1 iam"},
                {"type": "sm", "node": {"codename": "node1"}, "csr": "CSR node1 sm"}]})
        );
    }

    #[tokio::test]
    async fn renew_missing_secret_abandons_before_any_iam_call() {
        let iam = FakeIam::new("main");
        let n = renew_notification(
            &[(CertType::Online, "main"), (CertType::Iam, "node2")],
            &[("main", "s0"), ("node1", "s1")],
        );
        let err = renew(&iam, &n).await.unwrap_err();
        assert_eq!(
            err,
            RenewError::MissingSecret {
                node: "node2".into(),
                cert_type: CertType::Iam
            }
        );
        assert!(err.to_string().contains("\"node2\""), "{err}");
        assert!(iam.calls().is_empty());
    }

    #[tokio::test]
    async fn renew_create_key_failure_abandons() {
        let iam = FakeIam::new("main").fail("create_key main cm", IamError::new("hsm"));
        let n = renew_notification(
            &[
                (CertType::Online, "main"),
                (CertType::Cm, "main"),
                (CertType::Sm, "main"),
            ],
            &[("main", "s0")],
        );
        let err = renew(&iam, &n).await.unwrap_err();
        assert_eq!(
            err,
            RenewError::CreateKey {
                node: "main".into(),
                cert_type: CertType::Cm,
                error: IamError::new("hsm")
            }
        );
        assert_eq!(iam.calls().len(), 2);
    }

    #[tokio::test]
    async fn renew_rejects_empty_and_nodeless() {
        let iam = FakeIam::new("main");
        let n = renew_notification(&[], &[("main", "s0")]);
        assert_eq!(renew(&iam, &n).await, Err(RenewError::NoCertificates));

        let mut n = renew_notification(&[(CertType::Online, "main")], &[("main", "s0")]);
        n.certificates[0].node = Identity::with_id("main");
        assert_eq!(
            renew(&iam, &n).await,
            Err(RenewError::MissingNode {
                index: 0,
                cert_type: CertType::Online
            })
        );
        assert!(iam.calls().is_empty());
    }

    fn issued(certs: &[(CertType, &str)]) -> IssuedUnitCertificates {
        IssuedUnitCertificates {
            correlation_id: None,
            certificates: certs
                .iter()
                .map(|(t, n)| IssuedCertData {
                    cert_type: *t,
                    node: node(n),
                    certificate_chain: format!("PEM-{n}-{}", cert_type_name(*t)),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn install_applies_in_required_order() {
        let iam = FakeIam::new("main");
        let msg = issued(&[
            (CertType::Iam, "main"),
            (CertType::Online, "main"),
            (CertType::Iam, "node2"),
            (CertType::Sm, "node2"),
            (CertType::Iam, "node1"),
            (CertType::Offline, "main"),
            (CertType::Cm, "node1"),
            (CertType::Sm, "node1"),
        ]);
        let confirmation = install(&iam, &msg).await;
        assert_eq!(
            iam.calls(),
            vec![
                "apply node1 cm PEM-node1-cm",
                "apply node1 sm PEM-node1-sm",
                "apply node1 iam PEM-node1-iam",
                "apply node2 sm PEM-node2-sm",
                "apply node2 iam PEM-node2-iam",
                "apply main online PEM-main-online",
                "apply main offline PEM-main-offline",
                "apply main iam PEM-main-iam",
            ]
        );
        // Results are reported in application order.
        let order: Vec<_> = confirmation
            .certificates
            .iter()
            .map(|c| (c.node.codename.clone().unwrap(), c.cert_type))
            .collect();
        assert_eq!(
            order,
            vec![
                ("node1".to_string(), CertType::Cm),
                ("node1".to_string(), CertType::Sm),
                ("node1".to_string(), CertType::Iam),
                ("node2".to_string(), CertType::Sm),
                ("node2".to_string(), CertType::Iam),
                ("main".to_string(), CertType::Online),
                ("main".to_string(), CertType::Offline),
                ("main".to_string(), CertType::Iam),
            ]
        );
    }

    #[tokio::test]
    async fn install_sorts_node_ids_bytewise_and_main_even_if_smallest() {
        let iam = FakeIam::new("a-main");
        let msg = issued(&[
            (CertType::Online, "node10"),
            (CertType::Online, "a-main"),
            (CertType::Online, "node2"),
            (CertType::Online, "Node3"),
        ]);
        install(&iam, &msg).await;
        assert_eq!(
            iam.calls(),
            vec![
                "apply Node3 online PEM-Node3-online",
                "apply node10 online PEM-node10-online",
                "apply node2 online PEM-node2-online",
                "apply a-main online PEM-a-main-online",
            ]
        );
    }

    #[tokio::test]
    async fn install_failure_still_yields_full_confirmation() {
        let iam = FakeIam::new("main").fail(
            "apply node1 sm",
            IamError {
                aos_code: Some(10),
                exit_code: 0,
                message: "bad chain".into(),
            },
        );
        let msg = issued(&[
            (CertType::Iam, "main"),
            (CertType::Sm, "node1"),
            (CertType::Iam, "node1"),
        ]);
        let confirmation = install(&iam, &msg).await;
        assert_eq!(iam.calls().len(), 3);
        assert_eq!(
            data_json(Message::InstallUnitCertificatesConfirmation(confirmation)),
            json!({"messageType": "installUnitCertificatesConfirmation", "certificates": [
                {"type": "sm", "node": {"codename": "node1"}, "serial": "",
                 "errorInfo": {"aosCode": 10, "exitCode": 0, "message": "bad chain"}},
                {"type": "iam", "node": {"codename": "node1"}, "serial": "0a13"},
                {"type": "iam", "node": {"codename": "main"}, "serial": "0a12"}]})
        );
    }

    #[tokio::test]
    async fn install_nodeless_cert_reported_without_iam_call() {
        let iam = FakeIam::new("main");
        let mut msg = issued(&[(CertType::Online, "main"), (CertType::Sm, "x")]);
        msg.certificates[1].node = Identity::default();
        let confirmation = install(&iam, &msg).await;
        assert_eq!(iam.calls(), vec!["apply main online PEM-main-online"]);
        assert_eq!(
            data_json(Message::InstallUnitCertificatesConfirmation(confirmation)),
            json!({"messageType": "installUnitCertificatesConfirmation", "certificates": [
                {"type": "sm", "node": {}, "serial": "",
                 "errorInfo": {"aosCode": 6, "exitCode": 0,
                               "message": "sm certificate has no node codename"}},
                {"type": "online", "node": {"codename": "main"}, "serial": "0a15"}]})
        );
    }

    #[tokio::test]
    async fn install_empty_message_gives_empty_confirmation() {
        let iam = FakeIam::new("main");
        let confirmation = install(&iam, &issued(&[])).await;
        assert!(iam.calls().is_empty());
        assert_eq!(
            data_json(Message::InstallUnitCertificatesConfirmation(confirmation)),
            json!({"messageType": "installUnitCertificatesConfirmation", "certificates": []})
        );
    }

    fn start_request() -> StartProvisioningRequest {
        // As received: the extra `type: "node"` must not be echoed.
        let text = r#"{"header":{"version":7},"data":{"messageType":"startProvisioningRequest",
            "correlationId":"p-1","node":{"codename":"node1","type":"node"},"password":"pwd"}}"#;
        match messages::parse_incoming(text).unwrap().data {
            Message::StartProvisioningRequest(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn start_provisioning_success() {
        let iam = FakeIam::new("main");
        let response = start_provisioning(&iam, &start_request()).await;
        assert_eq!(
            iam.calls(),
            vec![
                "start node1 pwd",
                "cert_types node1",
                "create_key node1 iam subject=\"\" password=pwd",
                "create_key node1 online subject=\"\" password=pwd",
                "create_key node1 offline subject=\"\" password=pwd",
            ]
        );
        assert_eq!(
            data_json(Message::StartProvisioningResponse(response)),
            json!({"messageType": "startProvisioningResponse", "node": {"codename": "node1"},
                   "csrs": [{"type": "iam", "csr": "CSR node1 iam"},
                            {"type": "online", "csr": "CSR node1 online"},
                            {"type": "offline", "csr": "CSR node1 offline"}]})
        );
    }

    #[tokio::test]
    async fn start_provisioning_iam_failure() {
        let iam = FakeIam::new("main").fail("start node1", IamError::with_code(9, "wrong state"));
        let response = start_provisioning(&iam, &start_request()).await;
        assert_eq!(iam.calls(), vec!["start node1 pwd"]);
        assert_eq!(
            data_json(Message::StartProvisioningResponse(response)),
            json!({"messageType": "startProvisioningResponse", "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 9, "exitCode": 0,
                                 "message": "start provisioning: wrong state"},
                   "csrs": []})
        );
    }

    #[tokio::test]
    async fn start_provisioning_create_key_failure_drops_partial_csrs() {
        let iam = FakeIam::new("main").fail("create_key node1 online", IamError::new("no slot"));
        let response = start_provisioning(&iam, &start_request()).await;
        assert_eq!(iam.calls().len(), 4);
        assert_eq!(
            data_json(Message::StartProvisioningResponse(response)),
            json!({"messageType": "startProvisioningResponse", "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 1, "exitCode": 0,
                                 "message": "create online key: no slot"},
                   "csrs": []})
        );
    }

    #[tokio::test]
    async fn start_provisioning_unknown_cert_type() {
        let mut iam = FakeIam::new("main");
        iam.cert_types = vec!["iam".into(), "diskencryption".into()];
        let response = start_provisioning(&iam, &start_request()).await;
        // No key is created when a type cannot be reported.
        assert_eq!(iam.calls(), vec!["start node1 pwd", "cert_types node1"]);
        assert_eq!(
            data_json(Message::StartProvisioningResponse(response)),
            json!({"messageType": "startProvisioningResponse", "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 1, "exitCode": 0,
                                 "message": "get cert types: unknown certificate type \"diskencryption\""},
                   "csrs": []})
        );
    }

    #[tokio::test]
    async fn start_provisioning_without_node() {
        let iam = FakeIam::new("main");
        let request = StartProvisioningRequest {
            correlation_id: None,
            node: Identity::default(),
            password: "pwd".into(),
        };
        let response = start_provisioning(&iam, &request).await;
        assert!(iam.calls().is_empty());
        assert_eq!(
            data_json(Message::StartProvisioningResponse(response)),
            json!({"messageType": "startProvisioningResponse", "node": {},
                   "errorInfo": {"aosCode": 6, "exitCode": 0,
                                 "message": "start provisioning: node has no codename"},
                   "csrs": []})
        );
    }

    fn finish_request() -> FinishProvisioningRequest {
        FinishProvisioningRequest {
            correlation_id: Some("p-2".into()),
            node: node("node1"),
            certificates: vec![
                CertChainData {
                    cert_type: CertType::Online,
                    chain: "PEM-online".into(),
                },
                CertChainData {
                    cert_type: CertType::Iam,
                    chain: "PEM-iam".into(),
                },
            ],
            password: "pwd".into(),
        }
    }

    #[tokio::test]
    async fn finish_provisioning_success() {
        let iam = FakeIam::new("main");
        let response = finish_provisioning(&iam, &finish_request()).await;
        assert_eq!(
            iam.calls(),
            vec![
                "apply node1 online PEM-online",
                "apply node1 iam PEM-iam",
                "finish node1 pwd",
            ]
        );
        assert_eq!(
            data_json(Message::FinishProvisioningResponse(response)),
            json!({"messageType": "finishProvisioningResponse", "node": {"codename": "node1"}})
        );
    }

    #[tokio::test]
    async fn finish_provisioning_apply_failure_skips_finish() {
        let iam = FakeIam::new("main").fail("apply node1 online", IamError::new("bad chain"));
        let response = finish_provisioning(&iam, &finish_request()).await;
        assert_eq!(iam.calls(), vec!["apply node1 online PEM-online"]);
        assert_eq!(
            data_json(Message::FinishProvisioningResponse(response)),
            json!({"messageType": "finishProvisioningResponse", "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 1, "exitCode": 0,
                                 "message": "apply online certificate: bad chain"}})
        );
    }

    #[tokio::test]
    async fn finish_provisioning_finish_failure() {
        let iam = FakeIam::new("main").fail(
            "finish node1",
            IamError {
                aos_code: Some(1),
                exit_code: 5,
                message: "io".into(),
            },
        );
        let response = finish_provisioning(&iam, &finish_request()).await;
        assert_eq!(iam.calls().len(), 3);
        assert_eq!(
            data_json(Message::FinishProvisioningResponse(response)),
            json!({"messageType": "finishProvisioningResponse", "node": {"codename": "node1"},
                   "errorInfo": {"aosCode": 1, "exitCode": 5,
                                 "message": "finish provisioning: io"}})
        );
    }

    fn deprovision_request(id: &str) -> DeprovisioningRequest {
        DeprovisioningRequest {
            correlation_id: Some("p-3".into()),
            node: node(id),
            password: "pwd".into(),
        }
    }

    #[tokio::test]
    async fn deprovisioning_success_and_failure() {
        let iam = FakeIam::new("main").fail("deprovision node2", IamError::with_code(5, ""));
        let ok = deprovisioning(&iam, &deprovision_request("node1")).await;
        let failed = deprovisioning(&iam, &deprovision_request("node2")).await;
        assert_eq!(
            iam.calls(),
            vec!["deprovision node1 pwd", "deprovision node2 pwd"]
        );
        assert_eq!(
            data_json(Message::DeprovisioningResponse(ok)),
            json!({"messageType": "deprovisioningResponse", "node": {"codename": "node1"}})
        );
        assert_eq!(
            data_json(Message::DeprovisioningResponse(failed)),
            json!({"messageType": "deprovisioningResponse", "node": {"codename": "node2"},
                   "errorInfo": {"aosCode": 5, "exitCode": 0, "message": "deprovision: "}})
        );
    }

    #[tokio::test]
    async fn deprovisioning_main_node_refused() {
        let iam = FakeIam::new("main");
        let response = deprovisioning(&iam, &deprovision_request("main")).await;
        assert!(iam.calls().is_empty());
        assert_eq!(
            data_json(Message::DeprovisioningResponse(response)),
            json!({"messageType": "deprovisioningResponse", "node": {"codename": "main"},
                   "errorInfo": {"aosCode": 6, "exitCode": 0,
                                 "message": "deprovision: can't deprovision main node"}})
        );
    }

    #[test]
    fn handler_futures_are_send() {
        fn assert_send<T: Send>(_: T) {}
        let iam = FakeIam::new("main");
        let renew_msg = renew_notification(&[], &[]);
        let issued_msg = issued(&[]);
        let start = start_request();
        let finish = finish_request();
        let deprovision = deprovision_request("node1");
        assert_send(renew(&iam, &renew_msg));
        assert_send(install(&iam, &issued_msg));
        assert_send(start_provisioning(&iam, &start));
        assert_send(finish_provisioning(&iam, &finish));
        assert_send(deprovisioning(&iam, &deprovision));
    }
}
