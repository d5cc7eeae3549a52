//! AosCloud service discovery: the pure logic, with no HTTP client, socket or clock.
//!
//! * [`discovery_url`] picks the URL the discovery POST goes to (cloud-protocol.md §1.1, errata 19):
//!   `overrideServiceDiscoveryUrl` first; else the first usable issuer-alternative-name URI of the
//!   online certificate; else `https://<O>:9000` from the certificate subject's `O=`; else
//!   `serviceDiscoveryUrl`. Scheme, host and port come from the chosen source; the POST path (and
//!   query) always comes from `serviceDiscoveryUrl` when that is set.
//! * [`request_body`] builds the flat request object (§1.2).
//! * [`parse_response`] reads the response leniently: keys match case-insensitively, missing fields
//!   default, a present field of the wrong type is an error naming the field.
//! * [`Endpoints`] caches the `connectionInfo` list, hands it out URL by URL, and is dropped on an
//!   HTTP 401 from the WebSocket upgrade or when exhausted (§1.2, §1.3). The `nextRequestDelay` it
//!   holds is meant for the very next reconnect attempt (errata 22), not the next retry cycle.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Map, Value, json};

/// Protocol version sent in the discovery request.
pub const PROTOCOL_VERSION: i64 = 7;

/// Port used with the certificate's `O=` host.
pub const ORGANIZATION_PORT: u16 = 9000;

/// Where the discovery URL may come from, in the order they are tried (overridden by `override_url`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DiscoveryInputs<'a> {
    /// Config `overrideServiceDiscoveryUrl`; empty = not set.
    pub override_url: &'a str,
    /// Config `serviceDiscoveryUrl`; empty = not set. Also the source of the POST path.
    pub config_url: &'a str,
    /// Issuer-alternative-name URIs of the online certificate, in certificate order.
    pub issuer_alt_uris: &'a [String],
    /// `O=` of the online certificate subject, if any.
    pub organization: Option<&'a str>,
}

/// A URL split into the parts discovery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UrlParts<'a> {
    scheme: &'a str,
    authority: &'a str,
    /// Path plus query, without fragment; empty when the URL has none.
    target: &'a str,
}

/// Splits `scheme://authority[/path][?query][#fragment]`; `None` when it is not such a URL.
fn split_url(url: &str) -> Option<UrlParts<'_>> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://")?;
    let scheme_ok = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return None;
    }
    let rest = rest.split('#').next().unwrap_or_default();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(end);
    if !valid_host_port(authority) || target.chars().any(char::is_whitespace) {
        return None;
    }
    Some(UrlParts {
        scheme,
        authority,
        target,
    })
}

/// True for a non-empty `host[:port]` without whitespace or URL delimiters.
fn valid_host_port(authority: &str) -> bool {
    !authority.is_empty()
        && !authority.starts_with(':')
        && !authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '\\'))
}

/// True when the scheme can carry an HTTP POST (TLS for `https`/`wss`, plain for `http`/`ws`).
fn supported_scheme(scheme: &str) -> bool {
    ["https", "http", "wss", "ws"]
        .iter()
        .any(|s| s.eq_ignore_ascii_case(scheme))
}

/// Builds `scheme://authority` + the POST target (defaulting to `/`).
fn compose(scheme: &str, authority: &str, target: &str) -> String {
    let target = if target.is_empty() { "/" } else { target };
    format!("{scheme}://{authority}{target}")
}

/// What service discovery takes from the unit's `online` certificate (the first of a PEM
/// chain): the issuer-alternative-name URIs, in order, and the subject's `O=`.
pub fn certificate_inputs(chain_pem: &[u8]) -> Result<(Vec<String>, Option<String>), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let der = CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .ok_or_else(|| "the online certificate file holds no certificate".to_owned())?
        .map_err(|e| format!("online certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("online certificate: {e}"))?;
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::IssuerAlternativeName(ian) = ext.parsed_extension() {
            for name in &ian.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push((*uri).to_owned());
                }
            }
        }
    }
    let organization = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_owned);
    Ok((uris, organization))
}

/// Chooses the discovery URL (see the module doc for the rules).
///
/// Errors when the override or config URL is set but malformed, or when no source is usable.
/// Malformed certificate URIs or `O=` values are skipped.
pub fn discovery_url(inputs: &DiscoveryInputs) -> Result<String, String> {
    let config = inputs.config_url.trim();
    let config_parts = if config.is_empty() {
        None
    } else {
        match split_url(config) {
            Some(parts) if supported_scheme(parts.scheme) => Some(parts),
            _ => return Err(format!("invalid serviceDiscoveryUrl {config:?}")),
        }
    };

    // The POST path: from the config URL when set, else the chosen URL's own.
    let target_for = |own: &str| -> String {
        match &config_parts {
            Some(parts) => parts.target.to_string(),
            None => own.to_string(),
        }
    };

    let override_url = inputs.override_url.trim();
    if !override_url.is_empty() {
        return match split_url(override_url) {
            Some(parts) if supported_scheme(parts.scheme) => Ok(compose(
                parts.scheme,
                parts.authority,
                &target_for(parts.target),
            )),
            _ => Err(format!(
                "invalid overrideServiceDiscoveryUrl {override_url:?}"
            )),
        };
    }

    let first_uri = inputs
        .issuer_alt_uris
        .iter()
        .filter_map(|uri| split_url(uri))
        .find(|parts| supported_scheme(parts.scheme));
    if let Some(parts) = first_uri {
        return Ok(compose(
            parts.scheme,
            parts.authority,
            &target_for(parts.target),
        ));
    }

    if let Some(org) = inputs.organization.map(str::trim)
        && valid_host_port(org)
        && !org.contains(':')
    {
        let authority = format!("{org}:{ORGANIZATION_PORT}");
        return Ok(compose("https", &authority, &target_for("")));
    }

    match config_parts {
        Some(parts) => Ok(compose(parts.scheme, parts.authority, parts.target)),
        None => Err(
            "no service discovery URL: overrideServiceDiscoveryUrl, the online \
                     certificate (issuer alternative names, O=) and serviceDiscoveryUrl \
                     give none"
                .to_string(),
        ),
    }
}

/// The discovery request body: `{"version": 7, "systemId": <id>, "supportedProtocols": ["wss"]}`.
pub fn request_body(system_id: &str) -> Value {
    json!({
        "version": PROTOCOL_VERSION,
        "systemId": system_id,
        "supportedProtocols": ["wss"],
    })
}

/// A parsed discovery response. Missing fields default (empty / `None` / 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryResponse {
    /// `version` (parsed, not checked).
    pub version: i64,
    /// `systemId` (parsed, not checked).
    pub system_id: String,
    /// `connectionInfo`: WebSocket endpoint URLs, in order.
    pub connection_info: Vec<String>,
    /// `nextRequestDelay` in milliseconds; `None` when absent or not > 0.
    pub next_request_delay_ms: Option<u64>,
    /// `authToken`, sent as `Authorization: Bearer <token>` on the WebSocket upgrade.
    pub auth_token: String,
    /// `errorCode` (0 NoError, 1 Redirect, 2 RepeatLater, 3 Error); informational only.
    pub error_code: Option<i64>,
    /// `errorMessage`, if the cloud sent one; informational only.
    pub error_message: Option<String>,
}

impl DiscoveryResponse {
    /// Discovery counts as failed when `connectionInfo` is empty; the error carries the cloud's
    /// `errorCode` / `errorMessage` when present.
    pub fn ensure_usable(&self) -> Result<(), String> {
        if !self.connection_info.is_empty() {
            return Ok(());
        }
        let mut msg = String::from("discovery response has no connectionInfo");
        if let Some(code) = self.error_code {
            msg.push_str(&format!(", errorCode {code}"));
        }
        if let Some(text) = &self.error_message {
            msg.push_str(&format!(", errorMessage {text:?}"));
        }
        Err(msg)
    }
}

/// Looks up `key` case-insensitively; `null` counts as absent. Two keys differing only in case
/// are ambiguous and an error.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Value>, String> {
    let mut found: Option<(&String, &Value)> = None;
    for (k, v) in obj {
        if k.eq_ignore_ascii_case(key) {
            if let Some((prev, _)) = found {
                return Err(format!(
                    "discovery response: keys {prev:?} and {k:?} both match {key:?}"
                ));
            }
            found = Some((k, v));
        }
    }
    Ok(found.map(|(_, v)| v).filter(|v| !v.is_null()))
}

fn int_field(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, String> {
    match field(obj, key)? {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("discovery response: {key} must be an integer, got {v}")),
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match field(obj, key)? {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!(
            "discovery response: {key} must be a string, got {v}"
        )),
    }
}

/// Parses a discovery response body.
///
/// Errors on invalid JSON, a non-object top level, a field of the wrong type, or ambiguous keys;
/// the message names the problem.
pub fn parse_response(text: &str) -> Result<DiscoveryResponse, String> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("discovery response is not valid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("discovery response is not a JSON object".to_string());
    };

    let connection_info = match field(&obj, "connectionInfo")? {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "discovery response: connectionInfo[{i}] must be a string, got {other}"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(format!(
                "discovery response: connectionInfo must be an array of strings, got {v}"
            ));
        }
    };

    let next_request_delay_ms = int_field(&obj, "nextRequestDelay")?
        .filter(|ms| *ms > 0)
        .and_then(|ms| u64::try_from(ms).ok());

    Ok(DiscoveryResponse {
        version: int_field(&obj, "version")?.unwrap_or_default(),
        system_id: string_field(&obj, "systemId")?.unwrap_or_default(),
        connection_info,
        next_request_delay_ms,
        auth_token: string_field(&obj, "authToken")?.unwrap_or_default(),
        error_code: int_field(&obj, "errorCode")?,
        error_message: string_field(&obj, "errorMessage")?,
    })
}

/// The cached `connectionInfo` list, consumed URL by URL.
///
/// Discovery has to be repeated when [`Endpoints::is_empty`] is true: the list is exhausted, was
/// never set, or was dropped by [`Endpoints::unauthorized`].
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    urls: VecDeque<String>,
    auth_token: String,
    next_request_delay: Option<Duration>,
}

impl Endpoints {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the cache with the response's `connectionInfo` and `authToken`. The delay becomes
    /// the response's `nextRequestDelay` (or `None` when it carries none): the latest answer wins,
    /// and it applies from the next attempt.
    pub fn set(&mut self, resp: &DiscoveryResponse) {
        self.urls = resp.connection_info.iter().cloned().collect();
        self.auth_token = resp.auth_token.clone();
        self.next_request_delay = resp.next_request_delay_ms.map(Duration::from_millis);
    }

    /// Takes the next URL to try, removing it from the cache; `None` when exhausted.
    #[allow(
        clippy::should_implement_trait,
        reason = "the cache is refilled by `set`; it is not a one-shot iterator"
    )]
    pub fn next(&mut self) -> Option<String> {
        self.urls.pop_front()
    }

    /// The WebSocket upgrade answered HTTP 401: drops the cached URLs and token so discovery runs
    /// again. The learned delay is kept.
    pub fn unauthorized(&mut self) {
        self.urls.clear();
        self.auth_token.clear();
    }

    /// True when no URL is left and discovery must be repeated.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// The bearer token that came with the cached list (empty when none).
    pub fn auth_token(&self) -> &str {
        &self.auth_token
    }

    /// The `nextRequestDelay` learned from the last discovery, for the next reconnect attempt.
    pub fn next_request_delay(&self) -> Option<Duration> {
        self.next_request_delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "https://aoscloud.io:9000/sd/v7/";

    fn uris(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn override_wins_over_everything() {
        let ian = uris(&["https://ian.example:8443"]);
        let inputs = DiscoveryInputs {
            override_url: "https://override.example:7000",
            config_url: CONFIG,
            issuer_alt_uris: &ian,
            organization: Some("org.example"),
        };
        assert_eq!(
            discovery_url(&inputs).unwrap(),
            "https://override.example:7000/sd/v7/"
        );
    }

    #[test]
    fn override_path_replaced_by_config_path() {
        let inputs = DiscoveryInputs {
            override_url: "https://override.example:7000/other/path",
            config_url: CONFIG,
            ..Default::default()
        };
        assert_eq!(
            discovery_url(&inputs).unwrap(),
            "https://override.example:7000/sd/v7/"
        );
    }

    #[test]
    fn override_kept_whole_without_config_url() {
        let inputs = DiscoveryInputs {
            override_url: "https://override.example:7000/own/",
            ..Default::default()
        };
        assert_eq!(
            discovery_url(&inputs).unwrap(),
            "https://override.example:7000/own/"
        );
    }

    #[test]
    fn malformed_override_is_an_error() {
        let inputs = DiscoveryInputs {
            override_url: "not a url",
            config_url: CONFIG,
            ..Default::default()
        };
        let err = discovery_url(&inputs).unwrap_err();
        assert!(err.contains("overrideServiceDiscoveryUrl"), "{err}");
    }

    #[test]
    fn first_ian_uri_when_several() {
        let ian = uris(&["https://first.example:9443", "https://second.example:9444"]);
        let inputs = DiscoveryInputs {
            config_url: CONFIG,
            issuer_alt_uris: &ian,
            organization: Some("org.example"),
            ..Default::default()
        };
        assert_eq!(
            discovery_url(&inputs).unwrap(),
            "https://first.example:9443/sd/v7/"
        );
    }

    #[test]
    fn ian_uri_path_replaced_by_config_path() {
        let ian = uris(&["https://first.example:9443/ignored?x=1"]);
        let inputs = DiscoveryInputs {
            config_url: CONFIG,
            issuer_alt_uris: &ian,
            ..Default::default()
        };
        assert_eq!(
            discovery_url(&inputs).unwrap(),
            "https://first.example:9443/sd/v7/"
        );
    }

    #[test]
    fn malformed_ian_uris_are_skipped() {
        let ian = uris(&["", "mailto:ops@example", "https://good.example"]);
        let inputs = DiscoveryInputs {
            config_url: CONFIG,
            issuer_alt_uris: &ian,
            ..Default::default()
        };
        assert_eq!(
            discovery_url(&inputs).unwrap(),
            "https://good.example/sd/v7/"
        );
    }

    #[test]
    fn organization_host_with_config_path() {
        let inputs = DiscoveryInputs {
            config_url: CONFIG,
            organization: Some("org.example"),
            ..Default::default()
        };
        assert_eq!(
            discovery_url(&inputs).unwrap(),
            "https://org.example:9000/sd/v7/"
        );
    }

    #[test]
    fn organization_without_config_url_gets_root_path() {
        let inputs = DiscoveryInputs {
            organization: Some("org.example"),
            ..Default::default()
        };
        assert_eq!(discovery_url(&inputs).unwrap(), "https://org.example:9000/");
    }

    #[test]
    fn unusable_organization_is_skipped() {
        for org in ["", "  ", "Example Org", "a/b", "host:1"] {
            let inputs = DiscoveryInputs {
                config_url: CONFIG,
                organization: Some(org),
                ..Default::default()
            };
            assert_eq!(discovery_url(&inputs).unwrap(), CONFIG, "O={org:?}");
        }
    }

    #[test]
    fn config_url_last() {
        let inputs = DiscoveryInputs {
            config_url: CONFIG,
            ..Default::default()
        };
        assert_eq!(discovery_url(&inputs).unwrap(), CONFIG);
    }

    #[test]
    fn config_url_without_path_gets_root() {
        let inputs = DiscoveryInputs {
            config_url: "https://aoscloud.io:9000",
            ..Default::default()
        };
        assert_eq!(discovery_url(&inputs).unwrap(), "https://aoscloud.io:9000/");
    }

    #[test]
    fn malformed_config_url_is_an_error() {
        let inputs = DiscoveryInputs {
            config_url: "aoscloud.io/sd/v7/",
            organization: Some("org.example"),
            ..Default::default()
        };
        let err = discovery_url(&inputs).unwrap_err();
        assert!(err.contains("serviceDiscoveryUrl"), "{err}");
    }

    #[test]
    fn nothing_usable_is_an_error() {
        let ian = uris(&["", "urn:bad"]);
        let inputs = DiscoveryInputs {
            override_url: "  ",
            config_url: "",
            issuer_alt_uris: &ian,
            organization: Some(""),
        };
        let err = discovery_url(&inputs).unwrap_err();
        assert!(err.contains("no service discovery URL"), "{err}");
        assert!(discovery_url(&DiscoveryInputs::default()).is_err());
    }

    #[test]
    fn request_body_exact_json() {
        let body = request_body("unit-42");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"supportedProtocols":["wss"],"systemId":"unit-42","version":7}"#
        );
        assert_eq!(
            body,
            json!({"version": 7, "systemId": "unit-42", "supportedProtocols": ["wss"]})
        );
        assert_eq!(body.as_object().unwrap().len(), 3);
    }

    #[test]
    fn parse_full_response() {
        let resp = parse_response(
            r#"{"version":7,"systemId":"unit-42","nextRequestDelay":1500,
                "connectionInfo":["wss://a.example/ws","https://b.example/ws"],
                "authToken":"tok","errorCode":0,"errorMessage":"ok"}"#,
        )
        .unwrap();
        assert_eq!(
            resp,
            DiscoveryResponse {
                version: 7,
                system_id: "unit-42".into(),
                connection_info: uris(&["wss://a.example/ws", "https://b.example/ws"]),
                next_request_delay_ms: Some(1500),
                auth_token: "tok".into(),
                error_code: Some(0),
                error_message: Some("ok".into()),
            }
        );
        assert!(resp.ensure_usable().is_ok());
    }

    #[test]
    fn parse_keys_case_insensitively() {
        let resp = parse_response(
            r#"{"VERSION":7,"systemID":"u","NextRequestDelay":20,
                "connectioninfo":["wss://a"],"AUTHTOKEN":"t","ErrorCode":2}"#,
        )
        .unwrap();
        assert_eq!(resp.version, 7);
        assert_eq!(resp.system_id, "u");
        assert_eq!(resp.next_request_delay_ms, Some(20));
        assert_eq!(resp.connection_info, uris(&["wss://a"]));
        assert_eq!(resp.auth_token, "t");
        assert_eq!(resp.error_code, Some(2));
    }

    #[test]
    fn parse_missing_optional_fields() {
        let resp = parse_response(r#"{"connectionInfo":["wss://a"]}"#).unwrap();
        assert_eq!(resp.version, 0);
        assert_eq!(resp.system_id, "");
        assert_eq!(resp.next_request_delay_ms, None);
        assert_eq!(resp.auth_token, "");
        assert_eq!(resp.error_code, None);
        assert_eq!(resp.error_message, None);

        let empty = parse_response("{}").unwrap();
        assert_eq!(empty, DiscoveryResponse::default());
        let err = empty.ensure_usable().unwrap_err();
        assert!(err.contains("connectionInfo"), "{err}");

        let nulls = parse_response(r#"{"nextRequestDelay":null,"errorCode":null}"#).unwrap();
        assert_eq!(nulls, DiscoveryResponse::default());
    }

    #[test]
    fn non_positive_delay_is_none() {
        for text in [r#"{"nextRequestDelay":0}"#, r#"{"nextRequestDelay":-5}"#] {
            assert_eq!(parse_response(text).unwrap().next_request_delay_ms, None);
        }
    }

    #[test]
    fn unusable_response_reports_cloud_error() {
        let resp = parse_response(r#"{"errorCode":2,"errorMessage":"later"}"#).unwrap();
        let err = resp.ensure_usable().unwrap_err();
        assert!(
            err.contains("errorCode 2") && err.contains("later"),
            "{err}"
        );
    }

    #[test]
    fn bad_json_is_an_error_naming_the_problem() {
        let err = parse_response("{\"connectionInfo\": [").unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
        let err = parse_response("[1,2]").unwrap_err();
        assert!(err.contains("not a JSON object"), "{err}");
        let err = parse_response(r#"{"connectionInfo":"wss://a"}"#).unwrap_err();
        assert!(err.contains("connectionInfo must be an array"), "{err}");
        let err = parse_response(r#"{"connectionInfo":["wss://a",5]}"#).unwrap_err();
        assert!(err.contains("connectionInfo[1]"), "{err}");
        let err = parse_response(r#"{"nextRequestDelay":"10"}"#).unwrap_err();
        assert!(err.contains("nextRequestDelay must be an integer"), "{err}");
        let err = parse_response(r#"{"errorCode":"Error"}"#).unwrap_err();
        assert!(err.contains("errorCode must be an integer"), "{err}");
        let err = parse_response(r#"{"authToken":1}"#).unwrap_err();
        assert!(err.contains("authToken must be a string"), "{err}");
        let err = parse_response(r#"{"authToken":"a","AuthToken":"b"}"#).unwrap_err();
        assert!(err.contains("both match"), "{err}");
    }

    fn response(urls: &[&str], delay: Option<u64>) -> DiscoveryResponse {
        DiscoveryResponse {
            connection_info: uris(urls),
            next_request_delay_ms: delay,
            auth_token: "tok".into(),
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_consumed_in_order_then_empty() {
        let mut eps = Endpoints::new();
        assert!(eps.is_empty());
        assert_eq!(eps.next(), None);
        eps.set(&response(&["wss://a", "wss://b", "wss://c"], None));
        assert!(!eps.is_empty());
        assert_eq!(eps.auth_token(), "tok");
        assert_eq!(eps.next().as_deref(), Some("wss://a"));
        assert_eq!(eps.next().as_deref(), Some("wss://b"));
        assert!(!eps.is_empty());
        assert_eq!(eps.next().as_deref(), Some("wss://c"));
        assert!(eps.is_empty());
        assert_eq!(eps.next(), None);
    }

    #[test]
    fn set_replaces_previous_list() {
        let mut eps = Endpoints::new();
        eps.set(&response(&["wss://a", "wss://b"], None));
        eps.set(&response(&["wss://x"], None));
        assert_eq!(eps.next().as_deref(), Some("wss://x"));
        assert!(eps.is_empty());
    }

    #[test]
    fn unauthorized_drops_cache() {
        let mut eps = Endpoints::new();
        eps.set(&response(&["wss://a", "wss://b"], Some(250)));
        assert_eq!(eps.next().as_deref(), Some("wss://a"));
        eps.unauthorized();
        assert!(eps.is_empty());
        assert_eq!(eps.next(), None);
        assert_eq!(eps.auth_token(), "");
        assert_eq!(eps.next_request_delay(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn next_request_delay_exposed_and_latest_wins() {
        let mut eps = Endpoints::new();
        assert_eq!(eps.next_request_delay(), None);
        eps.set(
            &parse_response(r#"{"connectionInfo":["wss://a"],"nextRequestDelay":3000}"#).unwrap(),
        );
        assert_eq!(eps.next_request_delay(), Some(Duration::from_secs(3)));
        eps.set(&parse_response(r#"{"connectionInfo":["wss://a"]}"#).unwrap());
        assert_eq!(eps.next_request_delay(), None);
    }

    #[test]
    fn online_certificate_gives_issuer_alt_uris_and_organization() {
        let uri = "https://sd.example.com:9000";
        // GeneralNames ::= SEQUENCE { [6] IA5String }
        let mut value = vec![0x30, (uri.len() + 2) as u8, 0x86, uri.len() as u8];
        value.extend_from_slice(uri.as_bytes());
        let mut params = rcgen::CertificateParams::new(vec!["unit".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "cloud.example.com");
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 18],
                value,
            ));
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let (uris, org) = certificate_inputs(pem.as_bytes()).unwrap();
        assert_eq!(uris, [uri]);
        assert_eq!(org.as_deref(), Some("cloud.example.com"));
        let url = discovery_url(&DiscoveryInputs {
            config_url: CONFIG,
            issuer_alt_uris: &uris,
            organization: org.as_deref(),
            ..DiscoveryInputs::default()
        })
        .unwrap();
        assert_eq!(url, "https://sd.example.com:9000/sd/v7/");
        assert!(certificate_inputs(b"not a pem").is_err());
    }
}
