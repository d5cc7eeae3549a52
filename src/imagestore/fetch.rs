//! From a digest to a stored blob: `requestBlobUrls` over the cloud link, the download (first
//! URL, HTTP Range resume of the partial under `downloadPath`), SHA3-256 of the download,
//! AES-CBC decryption, SHA-256 against the digest, the signature check against the desired
//! status' certificate chains, and the move into `<installPath>/blobs/sha256/<hex>`.
//!
//! For an item's index, [`Fetcher::fetch_image`] also fetches the documents the index refers to
//! (manifests, image configs, item configs) until the whole image parses, and returns it for
//! the catalogue; layers are fetched one by one as the images reconciler asks for them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use super::download::{self, DownloadOptions};
use super::oci::{self, BlobSource};
use super::sign;
use super::verify::{self, DecryptInfo};
use crate::api::cloud::link::LinkHandle;
use crate::api::cloud::messages::{AlertItem, BlobInfo, DownloadProgressAlert, DownloadState};
use crate::model::{Certificate, CertificateChain, Digest, ItemImage};

/// Where blobs go and how they are fetched.
#[derive(Clone)]
pub struct Fetcher {
    pub link: LinkHandle,
    /// `imageManager.installPath`: blobs live in `<installPath>/blobs/sha256/<hex>`.
    pub install_path: PathBuf,
    /// `imageManager.downloadPath`: partial downloads, resumed after a restart.
    pub download_path: PathBuf,
    /// TLS for `https://` blob URLs.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The `caCert` PEM that signing chains must lead to (empty: signed blobs are refused).
    pub roots_pem: Vec<u8>,
    /// Where `downloadProgressAlert`s go (started, every 30 s, interrupted, finished). A full
    /// queue drops the alert rather than holding the download up.
    pub alerts: Option<tokio::sync::mpsc::Sender<AlertItem>>,
}

fn progress_alert(
    digest: &Digest,
    url: &str,
    downloaded: u64,
    total: u64,
    state: DownloadState,
    error: Option<&str>,
) -> AlertItem {
    AlertItem::DownloadProgressAlert(DownloadProgressAlert {
        timestamp: crate::api::cloud::messages::format_time(
            crate::api::cloud::messages::now_micros(),
        ),
        digest: digest.as_str().to_owned(),
        url: url.to_owned(),
        downloaded_bytes: downloaded,
        total_bytes: total,
        state,
        reason: error.map(str::to_owned),
        error_info: error.map(crate::api::cloud::unitstatus::error_info),
    })
}

/// The content-addressed folder as a [`BlobSource`].
pub struct StoredBlobs(pub PathBuf);

impl BlobSource for StoredBlobs {
    fn read(&self, digest: &Digest) -> Option<Vec<u8>> {
        std::fs::read(self.0.join("sha256").join(digest.hex())).ok()
    }
}

fn b64(field: &str, value: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| format!("blobUrls {field}: not base64: {e}"))
}

fn decrypt_info(info: &BlobInfo) -> Result<Option<DecryptInfo>, String> {
    let Some(d) = &info.decrypt_info else {
        return Ok(None);
    };
    let key = b64("decryptInfo.blockKey", &d.block_key)?;
    let iv_bytes = b64("decryptInfo.blockIv", &d.block_iv)?;
    let iv: [u8; 16] = iv_bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("decryptInfo.blockIv: {} bytes, expected 16", iv_bytes.len()))?;
    let info = DecryptInfo { key, iv };
    info.check_block_alg(&d.block_alg)
        .map_err(|e| format!("decryptInfo.blockAlg: {e}"))?;
    Ok(Some(info))
}

impl Fetcher {
    /// The stored blob folder.
    pub fn blobs_dir(&self) -> PathBuf {
        self.install_path.join("blobs")
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join("sha256").join(digest.hex())
    }

    /// Whether the blob's file is in place.
    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Fetches one blob into the store folder (nothing to do when it is there). The error says
    /// which step failed and why.
    pub async fn fetch_blob(
        &self,
        digest: &Digest,
        certificates: &[Certificate],
        chains: &[CertificateChain],
    ) -> Result<u64, String> {
        let final_path = self.blob_path(digest);
        if let Ok(meta) = std::fs::metadata(&final_path) {
            return Ok(meta.len());
        }
        let urls = self
            .link
            .request_blob_urls(vec![digest.as_str().to_owned()])
            .await
            .map_err(|e| format!("requestBlobUrls: {e}"))?;
        let info = urls
            .items
            .iter()
            .find(|i| i.digest.eq_ignore_ascii_case(digest.as_str()))
            .ok_or_else(|| "blobUrls: the cloud sent no entry for this digest".to_owned())?;
        let url = info
            .urls
            .first()
            .ok_or_else(|| "blobUrls: no URL for this digest".to_owned())?;
        let decrypt = decrypt_info(info)?;
        for dir in [&self.download_path, &self.blob_path_dir()] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let partial = self.download_path.join(digest.hex());
        let opts = DownloadOptions {
            tls: self.tls.clone(),
            expected_size: (info.size > 0).then_some(info.size),
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            progress_interval: Duration::from_secs(30),
        };
        let total = info.size;
        let mut last = 0;
        let alerts = self.alerts.clone();
        let send = |a: AlertItem| {
            if let Some(tx) = &alerts {
                let _ = tx.try_send(a);
            }
        };
        let result = download::download(url, &partial, &opts, |p| {
            let (bytes, state) = match p {
                download::Progress::Started { resumed_from, .. } => {
                    (resumed_from, DownloadState::Started)
                }
                download::Progress::Progress { downloaded, .. } => {
                    (downloaded, DownloadState::Started)
                }
                download::Progress::Finished { size } => (size, DownloadState::Finished),
            };
            last = bytes;
            send(progress_alert(digest, url, bytes, total, state, None));
        })
        .await;
        if let Err(e) = result {
            let reason = format!("download: {e}");
            send(progress_alert(
                digest,
                url,
                last,
                total,
                DownloadState::Interrupted,
                Some(&reason),
            ));
            return Err(reason);
        }
        let staged = final_path.with_extension("part");
        let verified = verify::verify_and_store(
            &partial,
            &info.sha256,
            decrypt.as_ref(),
            digest.hex(),
            &staged,
        )
        .await;
        let size = match verified {
            Ok(size) => size,
            Err(e) => {
                // A download that does not verify is useless for a resume: start over.
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(format!("verification: {e}"));
            }
        };
        if let Some(s) = &info.sign_info {
            let certs: Vec<(String, String)> = certificates
                .iter()
                .map(|c| (c.certificate.clone(), c.fingerprint.clone()))
                .collect();
            let chains: Vec<(String, Vec<String>)> = chains
                .iter()
                .map(|c| (c.name.clone(), c.fingerprints.clone()))
                .collect();
            let (chain_name, alg, value, at) = (
                s.chain_name.clone(),
                s.alg.clone(),
                s.value.clone(),
                s.trusted_timestamp.clone(),
            );
            let roots = self.roots_pem.clone();
            let path = staged.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let params = sign::SignParams {
                    chain_name: &chain_name,
                    alg: &alg,
                    value_b64: &value,
                    trusted_timestamp: &at,
                };
                sign::verify_file_signature(
                    &path,
                    &params,
                    &sign::Certificates::new(&certs, &chains),
                    &roots,
                )
            })
            .await
            .map_err(|e| format!("signature check: {e}"))?;
            if let Err(e) = checked {
                let _ = tokio::fs::remove_file(&staged).await;
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(format!("signature: {e}"));
            }
        }
        tokio::fs::rename(&staged, &final_path)
            .await
            .map_err(|e| format!("storing {}: {e}", final_path.display()))?;
        let _ = tokio::fs::remove_file(&partial).await;
        Ok(size)
    }

    fn blob_path_dir(&self) -> PathBuf {
        self.blobs_dir().join("sha256")
    }

    /// Fetches an item's index and every document it refers to until the image parses; returns
    /// the image and the digests fetched.
    pub async fn fetch_image(
        &self,
        index: &Digest,
        certificates: &[Certificate],
        chains: &[CertificateChain],
    ) -> Result<(ItemImage, Vec<Digest>), String> {
        let mut fetched = Vec::new();
        if !self.has(index) {
            self.fetch_blob(index, certificates, chains).await?;
            fetched.push(index.clone());
        }
        // index → manifests → configs: three rounds at most for a well-formed image.
        for _ in 0..4 {
            match oci::load_image(&StoredBlobs(self.blobs_dir()), index) {
                Ok(image) => return Ok((image, fetched)),
                Err(problems) => {
                    let missing: Vec<Digest> = problems
                        .0
                        .iter()
                        .filter(|p| p.message == "blob is missing")
                        .filter_map(|p| Digest::parse(&p.path).ok())
                        .collect();
                    if missing.is_empty() {
                        return Err(format!("image {index}: {problems}"));
                    }
                    for d in missing {
                        self.fetch_blob(&d, certificates, chains).await?;
                        fetched.push(d);
                    }
                }
            }
        }
        Err(format!(
            "image {index}: documents refer to documents too deeply"
        ))
    }

    /// Removes a stored blob's file.
    pub async fn delete(&self, digest: &Digest) -> Result<(), String> {
        match tokio::fs::remove_file(self.blob_path(digest)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("deleting blob {digest}: {e}")),
        }
    }
}
