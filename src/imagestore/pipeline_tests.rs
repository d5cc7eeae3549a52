//! The blob pipeline end to end, with one blob tampered with.
//!
//! The daemon runs in-process (static identity, `caCert` = the test root) and fetches the
//! example unit's items from the simulated cloud over loopback. The cloud's `blobUrls` entry for
//! the layer item's layer blob is replaced with a bad one (wrong SHA3, wrong content, cut short,
//! bad signature, untrusted or expired chain, wrong AES key). Each case checks what the cloud
//! is told (the item `failed`, with an errorInfo that says why), that nothing of it is stored
//! or installed, that no partial file is left behind (except a cut-short download, which is
//! kept for a Range resume), and that once the cloud answers correctly the runner's retry
//! installs the item.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::sign::tests::{AT, fp, pki, sign_pkcs1_sha256};
use super::verify::sha3_256_hex;
use super::verify::tests::{encrypt, info};
use crate::api::cloud::messages::{BlobInfo, DecryptInfo, SignInfo};
use crate::daemon::Daemon;
use crate::model::{Digest, ItemState, ItemType};
use crate::scenario;
use crate::sim::cloud::{CloudOptions, Frame, SimCloud};
use crate::sim::sm::{SimOptions, SimSm};
use crate::sim::unit;
use crate::store::Store;

const SYSTEM_ID: &str = "3f9c2a7e51d84b0c9e6a1d2b4c8f0e17";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states/fresh-install")
}

struct Harness {
    dir: tempfile::TempDir,
    cloud: SimCloud,
    daemon: Daemon,
    _sims: Vec<SimSm>,
    /// The layer item's ID and its layer blob, the one tampered with.
    item_id: String,
    target: Digest,
    original: Vec<u8>,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    /// [`Harness::start`] with the daemon's config changed by `patch`.
    async fn start_with(patch: impl FnOnce(&mut Value)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let sc = scenario::load(&example()).expect("example");
        let layer = sc
            .snapshot
            .desired
            .as_ref()
            .and_then(|d| d.items.iter().find(|i| i.item_type == ItemType::Layer))
            .expect("the example has a layer item")
            .clone();
        let index = layer.index_digest.clone().expect("index digest");
        let target = sc.snapshot.catalogue.images[&index].manifests[0].layers[0].clone();
        let original =
            std::fs::read(example().join("blobs/sha256").join(target.hex())).expect("blob");
        let mut snap = sc.snapshot;
        let sms = unit::before_sms_connect(&mut snap);
        snap.desired = None;
        snap.catalogue = Default::default();
        snap.observed.blobs.clear();
        Store::open(&dir.path().join("cm.redb"))
            .expect("store")
            .write(|tx| tx.set_snapshot(&snap))
            .expect("seed");
        std::fs::write(dir.path().join("ca.pem"), &pki().root_pem).expect("ca");
        let mut options = CloudOptions::new(SYSTEM_ID);
        options.blob_dir = Some(example().join("blobs"));
        let cloud = SimCloud::start(options).await.expect("cloud");
        let d = dir.path();
        let mut config = json!({
            "workingDir": d,
            "caCert": d.join("ca.pem"),
            "serviceDiscoveryUrl": cloud.discovery_url(),
            "cmServerUrl": "127.0.0.1:0",
            "storageDir": d.join("storages"),
            "stateDir": d.join("states"),
            "unitStatusSendTimeout": "50ms",
            "imageManager": {"installPath": d.join("install"), "downloadPath": d.join("download")},
            "identity": {
                "systemId": SYSTEM_ID,
                "nodeId": "main",
                "nodesFile": example().join("nodes.json"),
            }
        });
        patch(&mut config);
        let (config, _) =
            crate::config::Config::from_json_str(&config.to_string(), "test.cfg").expect("config");
        let daemon = Daemon::start(&config, unit::quick_runner())
            .await
            .expect("daemon");
        let mut sims = Vec::new();
        for (node, sm) in sms {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", daemon.sm_addr))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("SM server");
            let mut sim = SimSm::new(&node, sm, SimOptions::default());
            sim.connect(channel).await.expect("register");
            sims.push(sim);
        }
        cloud.wait_sessions(1).await;
        Harness {
            dir,
            cloud,
            daemon,
            _sims: sims,
            item_id: layer.id.as_str().to_owned(),
            target,
            original,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `bytes` as a file the cloud can point at.
    fn serve(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.path(name);
        std::fs::write(&path, bytes).expect("write");
        format!("file://{}", path.display())
    }

    /// A correct entry for `bytes` at `url` (as the cloud would send it).
    fn entry(&self, url: String, bytes: &[u8]) -> BlobInfo {
        BlobInfo {
            digest: self.target.as_str().to_owned(),
            urls: vec![url],
            sha256: sha3_256_hex(bytes),
            size: bytes.len() as u64,
            decrypt_info: None,
            sign_info: None,
        }
    }

    /// The example's desired state with the test PKI's certificates and three chains: a good
    /// one, one without the intermediate, and one with an expired signer.
    fn desired(&self) -> Value {
        let text = std::fs::read_to_string(example().join("desired.json")).expect("desired");
        let mut data = serde_json::from_str::<Value>(&text).expect("json")["data"].clone();
        let p = pki();
        let cert = |der: &[u8]| json!({"certificate": B64.encode(der), "fingerprint": fp(der)});
        data["certificates"] = json!([
            cert(&p.leaf_der),
            cert(&p.inter_der),
            cert(&p.expired_leaf_der)
        ]);
        data["certificateChains"] = json!([
            {"name": "chain", "fingerprints": [fp(&p.leaf_der), fp(&p.inter_der)]},
            {"name": "leaf-only", "fingerprints": [fp(&p.leaf_der)]},
            {"name": "expired", "fingerprints": [fp(&p.expired_leaf_der), fp(&p.inter_der)]},
        ]);
        data
    }

    /// The state and error message of the layer item in the last unit status that lists it.
    fn item_status(&self, frames: &[Frame]) -> Option<(String, String)> {
        frames
            .iter()
            .rev()
            .filter(|f| f.from_unit && f.message_type().as_deref() == Some("unitStatus"))
            .filter_map(Frame::json)
            .find_map(|v| {
                v["data"]["items"].as_array()?.iter().find_map(|i| {
                    (i["item"]["id"] == json!(self.item_id)).then(|| {
                        (
                            i["state"].as_str().unwrap_or_default().to_owned(),
                            i["errorInfo"]["message"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                        )
                    })
                })
            })
    }

    async fn wait_item(&self, state: &str) -> String {
        tokio::time::timeout(
            Duration::from_secs(60),
            self.cloud.wait_for(|f| {
                self.item_status(f)
                    .filter(|(s, _)| s == state)
                    .map(|(_, m)| m)
            }),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the item never became {state}; last: {:?}",
                self.item_status(&self.cloud.frames())
            )
        })
    }

    /// Waits for a failed status of the item whose message contains `text`.
    async fn wait_item_message(&self, text: &str) -> String {
        tokio::time::timeout(
            Duration::from_secs(60),
            self.cloud.wait_for(|f| {
                self.item_status(f)
                    .filter(|(s, m)| s == "failed" && m.contains(text))
                    .map(|(_, m)| m)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("no failure saying {text:?}"))
    }

    fn stored(&self) -> bool {
        self.path("install/blobs/sha256")
            .join(self.target.hex())
            .exists()
    }

    fn installed(&self) -> bool {
        self.daemon.store.snapshot().is_ok_and(|s| {
            s.observed
                .items
                .values()
                .any(|i| i.id.as_str() == self.item_id && i.state == ItemState::Installed)
        })
    }

    /// Files of the target blob other than the stored blob itself: partial downloads and
    /// staged (decrypted, not yet checked) copies.
    fn leftovers(&self) -> Vec<String> {
        let hex = self.target.hex();
        let mut out = Vec::new();
        for dir in ["download", "install/blobs/sha256"] {
            let entries = std::fs::read_dir(self.path(dir)).into_iter().flatten();
            for name in entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
            {
                let stored = dir != "download" && name == hex;
                if name.starts_with(hex) && !stored {
                    out.push(format!("{dir}/{name}"));
                }
            }
        }
        out
    }
}

/// How the cloud's answer for the layer blob is spoiled, and what the error must say.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    Sha3,
    Sha256,
    CutShort,
    BadSignature,
    Untrusted,
    Expired,
    WrongKey,
}

fn signed(mut e: BlobInfo, chain: &str, value: String) -> BlobInfo {
    e.sign_info = Some(SignInfo {
        chain_name: chain.to_owned(),
        alg: "RSA/SHA256/PKCS1v1_5".to_owned(),
        value,
        trusted_timestamp: AT.to_owned(),
        ocsp_values: Vec::new(),
    });
    e
}

/// The spoiled entry, the text its error must contain, and the correct entry for the retry.
fn spoil(h: &Harness, how: Tamper) -> (BlobInfo, &'static str, BlobInfo) {
    let p = pki();
    let good_sig = sign_pkcs1_sha256(&p.leaf_key, &h.original);
    let plain = h.entry(h.serve("plain", &h.original), &h.original);
    let signed_good = signed(plain.clone(), "chain", good_sig.clone());
    match how {
        Tamper::Sha3 => {
            let mut bad = plain.clone();
            bad.sha256 = sha3_256_hex(b"something else");
            (bad, "SHA3-256 of the download", plain)
        }
        Tamper::Sha256 => {
            let mut flipped = h.original.clone();
            let middle = flipped.len() / 2;
            flipped[middle] ^= 0xff;
            let bad = h.entry(h.serve("flipped", &flipped), &flipped);
            (bad, "SHA-256 of the content", plain)
        }
        Tamper::CutShort => {
            let half = &h.original[..h.original.len() / 2];
            let mut bad = plain.clone();
            bad.urls = vec![h.serve("half", half)];
            (bad, "ended after", plain)
        }
        Tamper::BadSignature => {
            let other = sign_pkcs1_sha256(&p.leaf_key, b"another file");
            let bad = signed(plain.clone(), "chain", other);
            (bad, "signature does not match", signed_good)
        }
        Tamper::Untrusted => {
            let bad = signed(plain.clone(), "leaf-only", good_sig);
            (bad, "not trusted", signed_good)
        }
        Tamper::Expired => {
            let bad = signed(plain.clone(), "expired", good_sig);
            (bad, "expired", signed_good)
        }
        Tamper::WrongKey => {
            let key = info(32);
            let sealed = encrypt(&key, &h.original);
            let url = h.serve("sealed", &sealed);
            let decrypt = |k: &[u8]| DecryptInfo {
                block_alg: "AES256/CBC/PKCS7".to_owned(),
                block_iv: B64.encode(key.iv),
                block_key: B64.encode(k),
            };
            let mut good = signed(h.entry(url, &sealed), "chain", good_sig);
            good.decrypt_info = Some(decrypt(&key.key));
            let mut wrong = key.key.clone();
            wrong[0] ^= 1;
            let mut bad = good.clone();
            bad.decrypt_info = Some(decrypt(&wrong));
            (bad, "decryption failed", good)
        }
    }
}

async fn tampered(how: Tamper) {
    let h = Harness::start().await;
    let (bad, says, good) = spoil(&h, how);
    h.cloud.set_blob_info(h.target.as_str(), Some(bad));
    h.cloud.send_data(h.desired()).expect("session");
    let message = h.wait_item("failed").await;
    assert!(message.contains(says), "{how:?}: {message}");
    // The runner keeps retrying. With no entry for the blob the next attempt fails before it
    // downloads anything; once that failure is reported, no attempt with the bad entry is
    // running (one at a time per blob) and the files can be looked at.
    h.cloud.set_blob_info(h.target.as_str(), None);
    let message = h.wait_item_message("no entry").await;
    assert!(message.starts_with("blobUrls"), "{message}");
    assert!(!h.stored(), "{how:?}: a tampered blob was stored");
    assert!(!h.installed(), "{how:?}: the item was installed");
    let left = h.leftovers();
    match how {
        // A transfer cut short is kept: the next attempt resumes it with a Range request.
        Tamper::CutShort => assert_eq!(left, vec![format!("download/{}", h.target.hex())]),
        _ => assert!(left.is_empty(), "{how:?}: left behind: {left:?}"),
    }
    // The cloud answers correctly now: the runner's next attempt installs the item.
    h.cloud.set_blob_info(h.target.as_str(), Some(good));
    h.wait_item("installed").await;
    assert!(h.installed());
    let stored = std::fs::read(h.path("install/blobs/sha256").join(h.target.hex())).expect("blob");
    assert!(stored == h.original, "{how:?}: the stored blob differs");
    assert!(h.leftovers().is_empty(), "{how:?}: {:?}", h.leftovers());
    // Generous: the stop deadline itself is tested with the real binary (tests/daemon.rs).
    assert!(h.daemon.shutdown(Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sha3_fails_the_item_until_the_cloud_sends_the_right_one() {
    tampered(Tamper::Sha3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_is_not_the_digest_fails_the_item() {
    tampered(Tamper::Sha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_short_fails_the_item_and_is_resumed_later() {
    tampered(Tamper::CutShort).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_fails_the_item() {
    tampered(Tamper::BadSignature).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_that_does_not_reach_the_root_fails_the_item() {
    tampered(Tamper::Untrusted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_signer_fails_the_item() {
    tampered(Tamper::Expired).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_aes_key_fails_the_item() {
    tampered(Tamper::WrongKey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_room_under_the_partition_limit_nothing_is_downloaded() {
    let h = Harness::start_with(|c| c["imageManager"]["downloadPartLimit"] = json!(0)).await;
    h.cloud.send_data(h.desired()).expect("session");
    let message = h.wait_item("failed").await;
    assert!(
        message.contains("not enough space") && message.contains("downloadPartLimit 0%"),
        "{message}"
    );
    assert!(!h.stored() && !h.installed());
    assert!(h.leftovers().is_empty(), "{:?}", h.leftovers());
    let stored = std::fs::read_dir(h.path("install/blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "blobs were stored without room for them");
    // Generous: the stop deadline itself is tested with the real binary (tests/daemon.rs).
    assert!(h.daemon.shutdown(Duration::from_secs(10)).await);
}
