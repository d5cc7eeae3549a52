//! Verification of a blob's `signInfo` (cloud protocol §2.8, §3.3).
//!
//! A blob downloaded from the cloud may carry
//! `signInfo{chainName, alg, value, trustedTimestamp, ocspValues[]}`. The signer's certificate
//! and its chain come from the desired status (§2.4): `certificates[{certificate, fingerprint}]`
//! (base64 DER) and `certificateChains[{name, fingerprints[]}]`, where `fingerprints[0]` is the
//! signing (leaf) certificate and the rest are intermediates.
//!
//! Verification (same facts as `aos_core_lib_cpp` `CryptoHelper::ValidateSigns`):
//! * fingerprints are opaque labels, matched case-insensitively (upstream upper-cases both
//!   sides); they are not recomputed from the DER;
//! * `alg` is `RSA[/<hash>[/<padding>]]`, hash `SHA256` (default), `SHA384`, `SHA512`,
//!   `SHA512/224`, `SHA512/256`; padding `PKCS1v1_5` (default) or `PSS` (salt length
//!   auto-detected, MGF1 with the same hash, as OpenSSL and mbedTLS verify); case-insensitive;
//! * the certificate chain leaf → intermediates → one of the `caCert` roots must be valid at
//!   `trustedTimestamp` (RFC 3339, e.g. `2023-10-01T12:00:00Z`), not at the current time;
//! * OCSP values are ignored (as upstream).
//!
//! The file is hashed streaming (64 KiB buffer), so memory use does not grow with its size.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rsa::pkcs1v15::Pkcs1v15Sign;
use rsa::pkcs8::DecodePublicKey as _;
use rsa::pss::Pss;
use rsa::traits::SignatureScheme;
use rsa::{PublicKey as RsaPublicKey, sha2};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use sha2::digest::const_oid::AssociatedOid;
use sha2::digest::{Digest, FixedOutputReset};
use sha2::{Sha256, Sha384, Sha512, Sha512_224, Sha512_256};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// No `certificateChains` entry has the `chainName` of the sign info.
    #[error("unknown certificate chain {0:?}")]
    UnknownChain(String),
    /// The named chain lists no fingerprints.
    #[error("certificate chain {0:?} has no fingerprints")]
    EmptyChain(String),
    /// A chain names a fingerprint that no `certificates` entry has.
    #[error("unknown certificate fingerprint {0:?}")]
    UnknownCertificate(String),
    /// A `certificates` entry is not base64 of a DER X.509 certificate.
    #[error("bad certificate {fingerprint:?}: {reason}")]
    BadCertificate { fingerprint: String, reason: String },
    /// The `alg` string (or the signer's key type) is not supported.
    #[error("unsupported signature algorithm: {0}")]
    BadAlgorithm(String),
    /// The signature `value` is not valid base64.
    #[error("bad signature value: {0}")]
    BadValue(String),
    /// The signature does not match the file and the signer's key.
    #[error("signature does not match the file")]
    BadSignature,
    /// The chain does not lead to a trusted root (or a link in it is invalid).
    #[error("certificate chain not trusted: {0}")]
    Untrusted(String),
    /// A certificate of the chain had expired at the trusted timestamp.
    #[error("certificate {subject:?} expired at {at}")]
    Expired { subject: String, at: String },
    /// A certificate of the chain was not yet valid at the trusted timestamp.
    #[error("certificate {subject:?} not yet valid at {at}")]
    NotYetValid { subject: String, at: String },
    /// `trustedTimestamp` is missing or not RFC 3339.
    #[error("bad trusted timestamp {0:?}")]
    BadTimestamp(String),
    /// Reading the file failed.
    #[error("can't read signed file: {0}")]
    Io(#[from] std::io::Error),
}

/// The parts of a blob's `signInfo` that verification uses (`ocspValues` are ignored).
#[derive(Debug, Clone, Copy)]
pub struct SignParams<'a> {
    /// `chainName`: the `certificateChains[].name` to use.
    pub chain_name: &'a str,
    /// `alg`, e.g. `RSA/SHA256/PKCS1v1_5`.
    pub alg: &'a str,
    /// `value`: base64 of the signature.
    pub value_b64: &'a str,
    /// `trustedTimestamp`: RFC 3339 time at which the chain must be valid.
    pub trusted_timestamp: &'a str,
}

/// Certificates and chains of a desired status, indexed for verification.
#[derive(Debug, Clone, Default)]
pub struct Certificates {
    /// Upper-cased fingerprint → DER (or why it could not be decoded).
    certs: HashMap<String, Result<Vec<u8>, String>>,
    /// Chain name → upper-cased fingerprints (leaf first).
    chains: HashMap<String, Vec<String>>,
}

impl Certificates {
    /// Builds the index from `certificates[{certificate: base64 DER, fingerprint}]` and
    /// `certificateChains[{name, fingerprints}]`. For a repeated fingerprint or chain name the
    /// first entry wins (as upstream). A bad entry is reported only when a chain uses it.
    pub fn new(certs: &[(String, String)], chains: &[(String, Vec<String>)]) -> Self {
        let mut index = Self::default();
        for (cert_b64, fingerprint) in certs {
            index
                .certs
                .entry(fingerprint.to_ascii_uppercase())
                .or_insert_with(|| B64.decode(cert_b64.trim()).map_err(|e| e.to_string()));
        }
        for (name, fingerprints) in chains {
            index.chains.entry(name.clone()).or_insert_with(|| {
                fingerprints
                    .iter()
                    .map(|f| f.to_ascii_uppercase())
                    .collect()
            });
        }
        index
    }

    /// Number of distinct certificates.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether there are no certificates.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    fn der(&self, fingerprint: &str) -> Result<&[u8], SignError> {
        match self.certs.get(fingerprint) {
            None => Err(SignError::UnknownCertificate(fingerprint.to_owned())),
            Some(Err(reason)) => Err(SignError::BadCertificate {
                fingerprint: fingerprint.to_owned(),
                reason: format!("base64: {reason}"),
            }),
            Some(Ok(der)) => Ok(der),
        }
    }
}

/// Hash named in the `alg` string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
    Sha512_224,
    Sha512_256,
}

/// RSA signature padding named in the `alg` string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Pkcs1v15,
    Pss,
}

/// Parses `RSA[/<hash>[/<padding>]]` (case-insensitive). The hash may be `SHA512/224` or
/// `SHA512/256`, whose `/` is taken as part of the hash name.
pub fn parse_alg(alg: &str) -> Result<(HashAlg, Padding), SignError> {
    let bad = || SignError::BadAlgorithm(alg.to_owned());
    let upper = alg.trim().to_ascii_uppercase();
    let mut parts: Vec<&str> = upper.split('/').collect();
    if parts.first() != Some(&"RSA") {
        return Err(bad());
    }
    // Join "SHA512" "/" "224|256" into one hash name.
    if parts.len() >= 3 && parts[1] == "SHA512" && matches!(parts[2], "224" | "256") {
        let truncated = if parts[2] == "224" {
            "SHA512/224"
        } else {
            "SHA512/256"
        };
        parts.splice(1..3, [truncated]);
    }
    let hash = match parts.get(1).copied().unwrap_or("SHA256") {
        "SHA256" => HashAlg::Sha256,
        "SHA384" => HashAlg::Sha384,
        "SHA512" => HashAlg::Sha512,
        "SHA512/224" => HashAlg::Sha512_224,
        "SHA512/256" => HashAlg::Sha512_256,
        _ => return Err(bad()),
    };
    let padding = match parts.get(2).copied().unwrap_or("PKCS1V1_5") {
        "PKCS1V1_5" => Padding::Pkcs1v15,
        "PSS" => Padding::Pss,
        _ => return Err(bad()),
    };
    if parts.len() > 3 {
        return Err(bad());
    }
    Ok((hash, padding))
}

/// Parses a `trustedTimestamp` (RFC 3339) to Unix seconds.
pub fn parse_timestamp(ts: &str) -> Result<i64, SignError> {
    time::OffsetDateTime::parse(ts.trim(), &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| SignError::BadTimestamp(ts.to_owned()))
}

/// Verifies the signature of the file at `path`; see [`verify_signature`].
pub fn verify_file_signature(
    path: &Path,
    sign: &SignParams<'_>,
    certs: &Certificates,
    roots_pem: &[u8],
) -> Result<(), SignError> {
    verify_signature(File::open(path)?, sign, certs, roots_pem)
}

/// Verifies `sign` over the content read from `reader` (the decrypted blob).
///
/// Checks, cheapest first: the `alg` string, the timestamp, the signature encoding, the chain
/// lookup, the certificate chain up to a root of `roots_pem` (each certificate valid at the
/// trusted timestamp), and finally the RSA signature over the streamed hash of the content.
pub fn verify_signature<R: Read>(
    reader: R,
    sign: &SignParams<'_>,
    certs: &Certificates,
    roots_pem: &[u8],
) -> Result<(), SignError> {
    let (hash, padding) = parse_alg(sign.alg)?;
    let at = parse_timestamp(sign.trusted_timestamp)?;
    let signature = B64
        .decode(sign.value_b64.trim())
        .map_err(|e| SignError::BadValue(e.to_string()))?;

    let fingerprints = certs
        .chains
        .get(sign.chain_name)
        .ok_or_else(|| SignError::UnknownChain(sign.chain_name.to_owned()))?;
    let (leaf_fp, rest) = fingerprints
        .split_first()
        .ok_or_else(|| SignError::EmptyChain(sign.chain_name.to_owned()))?;

    let leaf = parse_cert(certs.der(leaf_fp)?, leaf_fp)?;
    let mut pool = Vec::with_capacity(rest.len());
    for fp in rest {
        pool.push(parse_cert(certs.der(fp)?, fp)?);
    }

    let root_ders = CertificateDer::pem_slice_iter(roots_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SignError::Untrusted(format!("can't parse root certificates: {e}")))?;
    let mut roots = Vec::with_capacity(root_ders.len());
    for der in &root_ders {
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| SignError::Untrusted(format!("can't parse root certificate: {e}")))?;
        roots.push(cert);
    }
    if roots.is_empty() {
        return Err(SignError::Untrusted("no trusted root certificates".into()));
    }

    verify_chain(&leaf, pool, &roots, at, sign.trusted_timestamp)?;

    let key = RsaPublicKey::from_public_key_der(leaf.public_key().raw).map_err(|e| {
        SignError::BadAlgorithm(format!("signing certificate key is not usable RSA: {e}"))
    })?;

    match hash {
        HashAlg::Sha256 => verify_stream::<Sha256, R>(reader, &key, padding, &signature),
        HashAlg::Sha384 => verify_stream::<Sha384, R>(reader, &key, padding, &signature),
        HashAlg::Sha512 => verify_stream::<Sha512, R>(reader, &key, padding, &signature),
        HashAlg::Sha512_224 => verify_stream::<Sha512_224, R>(reader, &key, padding, &signature),
        HashAlg::Sha512_256 => verify_stream::<Sha512_256, R>(reader, &key, padding, &signature),
    }
}

fn parse_cert<'a>(der: &'a [u8], fingerprint: &str) -> Result<X509Certificate<'a>, SignError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| SignError::BadCertificate {
            fingerprint: fingerprint.to_owned(),
            reason: e.to_string(),
        })
}

fn verify_stream<D, R>(
    mut reader: R,
    key: &RsaPublicKey,
    padding: Padding,
    signature: &[u8],
) -> Result<(), SignError>
where
    D: Digest + FixedOutputReset + AssociatedOid,
    R: Read,
{
    let mut hasher = D::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        Digest::update(&mut hasher, &buf[..n]);
    }
    let hashed = hasher.finalize();
    rsa_verify::<D>(key, padding, &hashed, signature).map_err(|_| SignError::BadSignature)
}

fn rsa_verify<D>(
    key: &RsaPublicKey,
    padding: Padding,
    hashed: &[u8],
    signature: &[u8],
) -> rsa::Result<()>
where
    D: Digest + FixedOutputReset + AssociatedOid,
{
    match padding {
        Padding::Pkcs1v15 => Pkcs1v15Sign::new::<D>().verify(key, hashed, signature),
        Padding::Pss => Pss::<D> {
            blinded: false,
            digest: D::new(),
            // Auto-detect the salt length, as OpenSSL and mbedTLS do on verify.
            salt_len: None,
        }
        .verify(key, hashed, signature),
    }
}

/// Builds and checks the path leaf → pool certificates (any order) → a root.
fn verify_chain(
    leaf: &X509Certificate<'_>,
    mut pool: Vec<X509Certificate<'_>>,
    roots: &[X509Certificate<'_>],
    at: i64,
    at_str: &str,
) -> Result<(), SignError> {
    let mut current = leaf.clone();
    // Each pool certificate can be used once, so the walk ends.
    loop {
        check_validity(&current, at, at_str)?;

        // The chain may itself contain a trusted root.
        if roots.iter().any(|r| r.as_raw() == current.as_raw()) {
            return Ok(());
        }

        let issuer_raw = current.issuer().as_raw();
        let mut last_failure = None;
        for root in roots.iter().filter(|r| r.subject().as_raw() == issuer_raw) {
            match check_issued_by(&current, root) {
                Ok(()) => return check_validity(root, at, at_str),
                Err(reason) => last_failure = Some(reason),
            }
        }

        let mut next = None;
        for (i, candidate) in pool.iter().enumerate() {
            if candidate.subject().as_raw() != issuer_raw {
                continue;
            }
            match check_issued_by(&current, candidate) {
                Ok(()) => {
                    next = Some(i);
                    break;
                }
                Err(reason) => last_failure = Some(reason),
            }
        }

        let Some(i) = next else {
            let reason = last_failure.unwrap_or_else(|| {
                format!(
                    "no trusted root or chain certificate issued {:?}",
                    subject(&current)
                )
            });
            return Err(SignError::Untrusted(reason));
        };
        let issuer = pool.swap_remove(i);
        if !issuer.is_ca() {
            return Err(SignError::Untrusted(format!(
                "{:?} is not a CA certificate",
                subject(&issuer)
            )));
        }
        if let Ok(Some(ku)) = issuer.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(SignError::Untrusted(format!(
                "{:?} may not sign certificates (key usage)",
                subject(&issuer)
            )));
        }
        current = issuer;
    }
}

fn subject(cert: &X509Certificate<'_>) -> String {
    cert.subject().to_string()
}

fn check_validity(cert: &X509Certificate<'_>, at: i64, at_str: &str) -> Result<(), SignError> {
    let validity = cert.validity();
    if at < validity.not_before.timestamp() {
        return Err(SignError::NotYetValid {
            subject: subject(cert),
            at: at_str.to_owned(),
        });
    }
    if at > validity.not_after.timestamp() {
        return Err(SignError::Expired {
            subject: subject(cert),
            at: at_str.to_owned(),
        });
    }
    Ok(())
}

/// Checks `cert`'s signature with `issuer`'s RSA key. Returns the reason on failure.
fn check_issued_by(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> Result<(), String> {
    let what = || format!("{:?} issued by {:?}", subject(cert), subject(issuer));
    let key = RsaPublicKey::from_public_key_der(issuer.public_key().raw)
        .map_err(|e| format!("{}: issuer key is not usable RSA: {e}", what()))?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let tbs = cert.tbs_certificate.as_ref();
    let sig = &cert.signature_value.data;
    let result = match oid.as_str() {
        "1.2.840.113549.1.1.11" => {
            rsa_verify::<Sha256>(&key, Padding::Pkcs1v15, &Sha256::digest(tbs), sig)
        }
        "1.2.840.113549.1.1.12" => {
            rsa_verify::<Sha384>(&key, Padding::Pkcs1v15, &Sha384::digest(tbs), sig)
        }
        "1.2.840.113549.1.1.13" => {
            rsa_verify::<Sha512>(&key, Padding::Pkcs1v15, &Sha512::digest(tbs), sig)
        }
        _ => {
            return Err(format!(
                "{}: unsupported certificate signature algorithm {oid}",
                what()
            ));
        }
    };
    result.map_err(|_| format!("{}: bad certificate signature", what()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        PKCS_RSA_SHA256, date_time_ymd,
    };
    use rsa::PrivateKey as RsaPrivateKey;
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    use std::io::Write as _;
    use std::sync::OnceLock;

    pub(crate) const AT: &str = "2026-05-07T05:44:11.000000Z";
    const DATA: &[u8] = b"hello, signed world\n";

    pub(crate) struct Pki {
        pub(crate) root_pem: String,
        pub(crate) other_root_pem: String,
        pub(crate) inter_der: Vec<u8>,
        pub(crate) leaf_der: Vec<u8>,
        pub(crate) expired_leaf_der: Vec<u8>,
        pub(crate) leaf_key: RsaPrivateKey,
        pub(crate) inter_key: RsaPrivateKey,
    }

    fn new_key() -> RsaPrivateKey {
        RsaPrivateKey::new(&mut getrandom::SysRng, 2048).expect("rsa keygen")
    }

    fn rcgen_key(key: &RsaPrivateKey) -> KeyPair {
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("pkcs8");
        KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &PKCS_RSA_SHA256).expect("rcgen key")
    }

    fn params(cn: &str, ca: bool, from: (i32, u8, u8), to: (i32, u8, u8)) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = date_time_ymd(from.0, from.1, from.2);
        p.not_after = date_time_ymd(to.0, to.1, to.2);
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        } else {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        p
    }

    pub(crate) fn pki() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let (root_k, inter_k, leaf_k, other_k) = (new_key(), new_key(), new_key(), new_key());
            let (root_kp, inter_kp, leaf_kp, other_kp) = (
                rcgen_key(&root_k),
                rcgen_key(&inter_k),
                rcgen_key(&leaf_k),
                rcgen_key(&other_k),
            );

            let root_p = params("Aos Test Root", true, (2020, 1, 1), (2040, 1, 1));
            let root = root_p.self_signed(&root_kp).expect("root");
            let root_issuer = Issuer::from_params(&root_p, &root_kp);

            // Same name as the real root, different key.
            let other_p = params("Aos Test Root", true, (2020, 1, 1), (2040, 1, 1));
            let other = other_p.self_signed(&other_kp).expect("other root");

            let inter_p = params("Aos Test Intermediate", true, (2020, 1, 1), (2035, 1, 1));
            let inter = inter_p.signed_by(&inter_kp, &root_issuer).expect("inter");
            let inter_issuer = Issuer::from_params(&inter_p, &inter_kp);

            let leaf_p = params("Aos Test Signer", false, (2024, 1, 1), (2030, 1, 1));
            let leaf = leaf_p.signed_by(&leaf_kp, &inter_issuer).expect("leaf");
            let old_p = params("Aos Old Signer", false, (2020, 1, 1), (2022, 1, 1));
            let old = old_p.signed_by(&leaf_kp, &inter_issuer).expect("old leaf");

            Pki {
                root_pem: root.pem(),
                other_root_pem: other.pem(),
                inter_der: inter.der().to_vec(),
                leaf_der: leaf.der().to_vec(),
                expired_leaf_der: old.der().to_vec(),
                leaf_key: leaf_k,
                inter_key: inter_k,
            }
        })
    }

    pub(crate) fn fp(der: &[u8]) -> String {
        Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    fn certs_for(leaf_der: &[u8]) -> Certificates {
        let p = pki();
        let certs = vec![
            (B64.encode(leaf_der), fp(leaf_der)),
            // Fingerprints match case-insensitively.
            (B64.encode(&p.inter_der), fp(&p.inter_der).to_lowercase()),
        ];
        let chains = vec![("chain".to_owned(), vec![fp(leaf_der), fp(&p.inter_der)])];
        Certificates::new(&certs, &chains)
    }

    pub(crate) fn sign_pkcs1_sha256(key: &RsaPrivateKey, data: &[u8]) -> String {
        let sig = key
            .sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(data))
            .expect("sign");
        B64.encode(sig)
    }

    fn params_for<'a>(alg: &'a str, value: &'a str) -> SignParams<'a> {
        SignParams {
            chain_name: "chain",
            alg,
            value_b64: value,
            trusted_timestamp: AT,
        }
    }

    #[test]
    fn good_pkcs1_sha256_default_alg_and_file() {
        let p = pki();
        let value = sign_pkcs1_sha256(&p.leaf_key, DATA);
        let certs = certs_for(&p.leaf_der);
        for alg in [
            "RSA/SHA256/PKCS1v1_5",
            "RSA/SHA256",
            "RSA",
            "rsa/sha256/pkcs1v1_5",
        ] {
            verify_signature(
                DATA,
                &params_for(alg, &value),
                &certs,
                p.root_pem.as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        }

        let mut file = tempfile::NamedTempFile::new().expect("tmp");
        file.write_all(DATA).expect("write");
        let sp = params_for("RSA/SHA256", &value);
        verify_file_signature(file.path(), &sp, &certs, p.root_pem.as_bytes()).expect("file");
    }

    #[test]
    fn good_pss_sha512() {
        let p = pki();
        let sig = p
            .leaf_key
            .sign_with_rng(
                &mut getrandom::SysRng,
                Pss::<Sha512>::new(),
                &Sha512::digest(DATA),
            )
            .expect("pss sign");
        let value = B64.encode(sig);
        let certs = certs_for(&p.leaf_der);
        let sp = params_for("RSA/SHA512/PSS", &value);
        verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).expect("pss");

        // PSS with another salt length is accepted too (auto-detected).
        let sig = p
            .leaf_key
            .sign_with_rng(
                &mut getrandom::SysRng,
                Pss::<Sha512>::new_with_salt(20),
                &Sha512::digest(DATA),
            )
            .expect("pss sign");
        let value = B64.encode(sig);
        let sp = params_for("RSA/SHA512/PSS", &value);
        verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).expect("pss salt 20");

        // Same signature but announced as PKCS#1 v1.5: rejected.
        let sp = params_for("RSA/SHA512", &value);
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SignError::BadSignature), "{err}");
    }

    #[test]
    fn tampered_file_is_bad_signature() {
        let p = pki();
        let value = sign_pkcs1_sha256(&p.leaf_key, DATA);
        let certs = certs_for(&p.leaf_der);
        let sp = params_for("RSA/SHA256", &value);
        let err = verify_signature(
            &b"hello, signed world!"[..],
            &sp,
            &certs,
            p.root_pem.as_bytes(),
        )
        .unwrap_err();
        assert!(matches!(err, SignError::BadSignature), "{err}");
    }

    #[test]
    fn wrong_key_is_bad_signature() {
        let p = pki();
        let value = sign_pkcs1_sha256(&p.inter_key, DATA);
        let certs = certs_for(&p.leaf_der);
        let sp = params_for("RSA/SHA256", &value);
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SignError::BadSignature), "{err}");
    }

    #[test]
    fn other_root_is_untrusted() {
        let p = pki();
        let value = sign_pkcs1_sha256(&p.leaf_key, DATA);
        let certs = certs_for(&p.leaf_der);
        let sp = params_for("RSA/SHA256", &value);
        let err = verify_signature(DATA, &sp, &certs, p.other_root_pem.as_bytes()).unwrap_err();
        assert!(
            matches!(err, SignError::Untrusted(ref r) if r.contains("bad certificate signature")),
            "{err}"
        );

        // Missing intermediate: no path to the root.
        let leaf = &p.leaf_der;
        let certs = Certificates::new(
            &[(B64.encode(leaf), fp(leaf))],
            &[("chain".to_owned(), vec![fp(leaf)])],
        );
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(
            matches!(err, SignError::Untrusted(ref r) if r.contains("Aos Test Signer")),
            "{err}"
        );

        // Both roots given: the right one is found.
        let roots = format!("{}{}", p.other_root_pem, p.root_pem);
        let certs = certs_for(&p.leaf_der);
        verify_signature(DATA, &sp, &certs, roots.as_bytes()).expect("two roots");
    }

    #[test]
    fn expired_and_not_yet_valid_at_trusted_timestamp() {
        let p = pki();
        let value = sign_pkcs1_sha256(&p.leaf_key, DATA);
        let certs = certs_for(&p.expired_leaf_der);
        let sp = params_for("RSA/SHA256", &value);
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        match err {
            SignError::Expired { subject, at } => {
                assert!(subject.contains("Aos Old Signer"), "{subject}");
                assert_eq!(at, AT);
            }
            other => panic!("{other}"),
        }

        // The same (expired) certificate is fine at a time inside its validity.
        let sp = SignParams {
            trusted_timestamp: "2021-06-01T00:00:00Z",
            ..sp
        };
        verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).expect("in validity");

        // The current leaf was not yet valid in 2021.
        let certs = certs_for(&p.leaf_der);
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SignError::NotYetValid { .. }), "{err}");
    }

    #[test]
    fn unknown_chain_and_fingerprint() {
        let p = pki();
        let value = sign_pkcs1_sha256(&p.leaf_key, DATA);
        let certs = certs_for(&p.leaf_der);
        let sp = SignParams {
            chain_name: "nope",
            ..params_for("RSA/SHA256", &value)
        };
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(
            matches!(err, SignError::UnknownChain(ref n) if n == "nope"),
            "{err}"
        );

        let leaf = &p.leaf_der;
        let certs = Certificates::new(
            &[(B64.encode(leaf), fp(leaf))],
            &[("chain".to_owned(), vec![fp(leaf), "DEADBEEF".to_owned()])],
        );
        let sp = params_for("RSA/SHA256", &value);
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(
            matches!(err, SignError::UnknownCertificate(ref f) if f == "DEADBEEF"),
            "{err}"
        );

        let certs = Certificates::new(&[], &[("chain".to_owned(), vec![])]);
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SignError::EmptyChain(_)), "{err}");

        let certs = Certificates::new(
            &[("not base64!".to_owned(), "AA".to_owned())],
            &[("chain".to_owned(), vec!["aa".to_owned()])],
        );
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SignError::BadCertificate { .. }), "{err}");
    }

    #[test]
    fn alg_and_timestamp_parsing() {
        use HashAlg::*;
        use Padding::*;
        let ok = [
            ("RSA", (Sha256, Pkcs1v15)),
            ("RSA/SHA384", (Sha384, Pkcs1v15)),
            ("RSA/SHA512/PSS", (Sha512, Pss)),
            ("RSA/SHA512/224", (Sha512_224, Pkcs1v15)),
            ("RSA/SHA512/256/PSS", (Sha512_256, Pss)),
            ("rsa/sha256/pss", (Sha256, Pss)),
        ];
        for (alg, want) in ok {
            assert_eq!(parse_alg(alg).expect(alg), want, "{alg}");
        }
        for alg in [
            "",
            "ECDSA/SHA256",
            "RSA/MD5",
            "RSA/SHA256/OAEP",
            "RSA/SHA256/PSS/X",
        ] {
            assert!(
                matches!(parse_alg(alg), Err(SignError::BadAlgorithm(_))),
                "{alg}"
            );
        }

        assert_eq!(
            parse_timestamp("2023-10-01T12:00:00Z").expect("ts"),
            1_696_161_600
        );
        assert_eq!(
            parse_timestamp("2023-10-01T14:00:00.5+02:00").expect("ts"),
            1_696_161_600
        );
        for ts in ["", "2023-10-01", "yesterday"] {
            assert!(
                matches!(parse_timestamp(ts), Err(SignError::BadTimestamp(_))),
                "{ts}"
            );
        }

        let p = pki();
        let certs = certs_for(&p.leaf_der);
        let sp = SignParams {
            trusted_timestamp: "",
            ..params_for("RSA/SHA256", "AAAA")
        };
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SignError::BadTimestamp(_)), "{err}");
        let sp = params_for("RSA/SHA256", "%%%");
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, SignError::BadValue(_)), "{err}");
    }

    #[test]
    fn chain_with_root_and_non_ca_issuer() {
        let p = pki();
        let value = sign_pkcs1_sha256(&p.leaf_key, DATA);
        let sp = params_for("RSA/SHA256", &value);

        // The chain may list the root itself; intermediates in any order.
        let root_der = CertificateDer::pem_slice_iter(p.root_pem.as_bytes())
            .next()
            .expect("pem")
            .expect("root der");
        let all = [
            p.leaf_der.as_slice(),
            root_der.as_ref(),
            p.inter_der.as_slice(),
        ];
        let certs = Certificates::new(
            &all.map(|d| (B64.encode(d), fp(d))),
            &[("chain".to_owned(), all.iter().map(|d| fp(d)).collect())],
        );
        verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).expect("root in chain");

        // A certificate issued by the (non-CA) signer certificate is rejected.
        let signer_p = params("Aos Test Signer", false, (2024, 1, 1), (2030, 1, 1));
        let signer_kp = rcgen_key(&p.leaf_key);
        let signer = Issuer::from_params(&signer_p, &signer_kp);
        let sub_kp = rcgen_key(&p.inter_key);
        let sub = params("Aos Sub Signer", false, (2024, 1, 1), (2030, 1, 1))
            .signed_by(&sub_kp, &signer)
            .expect("sub");
        let value = sign_pkcs1_sha256(&p.inter_key, DATA);
        let sp = params_for("RSA/SHA256", &value);
        let all = [
            sub.der().as_ref(),
            p.leaf_der.as_slice(),
            p.inter_der.as_slice(),
        ];
        let certs = Certificates::new(
            &all.map(|d| (B64.encode(d), fp(d))),
            &[("chain".to_owned(), all.iter().map(|d| fp(d)).collect())],
        );
        let err = verify_signature(DATA, &sp, &certs, p.root_pem.as_bytes()).unwrap_err();
        assert!(
            matches!(err, SignError::Untrusted(ref r) if r.contains("not a CA")),
            "{err}"
        );
    }

    #[test]
    fn streams_large_input() {
        // 5 MiB from a reader that never holds the whole input.
        let p = pki();
        let mut hasher = Sha256::new();
        let chunk = [0x5au8; 4096];
        for _ in 0..1280 {
            Digest::update(&mut hasher, chunk);
        }
        let sig = p
            .leaf_key
            .sign(Pkcs1v15Sign::new::<Sha256>(), &hasher.finalize())
            .expect("sign");
        let value = B64.encode(sig);
        let reader = std::io::repeat(0x5a).take(5 * 1024 * 1024);
        let certs = certs_for(&p.leaf_der);
        let sp = params_for("RSA/SHA256", &value);
        verify_signature(reader, &sp, &certs, p.root_pem.as_bytes()).expect("stream");
    }
}
