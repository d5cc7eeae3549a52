//! From a digest to a stored blob: `requestBlobUrls` over the cloud link, the download (first
//! URL, HTTP Range resume of the partial under `downloadPath`), SHA3-256 of the download,
//! AES-CBC decryption, SHA-256 against the digest, the signature check against the desired
//! status' certificate chains, and the move into `<installPath>/blobs/sha256/<hex>`.
//!
//! For an item's index, [`Fetcher::fetch_image`] also fetches the documents the index refers to
//! (manifests, image configs, item configs) until the whole image parses, and returns it for
//! the catalogue; layers are fetched one by one as the images reconciler asks for them.

use std::path::{Path, PathBuf};
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
    /// The `caCert` PEM that signing chains must lead to (empty: signed blobs are refused).
    pub roots_pem: Vec<u8>,
    /// Where `downloadProgressAlert`s go (started, every 30 s, interrupted, finished). A full
    /// queue drops the alert rather than holding the download up.
    pub alerts: Option<tokio::sync::mpsc::Sender<AlertItem>>,
    /// How many blobs download at once and how much space they may take.
    pub limits: Arc<DownloadLimits>,
}

/// Size and free space of a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub available: u64,
}

/// The filesystem holding `path` (statvfs).
pub fn filesystem_space(path: &Path) -> std::io::Result<Space> {
    let st = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(Space {
        total: st.f_blocks.saturating_mul(st.f_frsize),
        available: st.f_bavail.saturating_mul(st.f_frsize),
    })
}

/// The downloader's limits: a number of download slots, and space reserved before each
/// download so that downloads running at once cannot together fill the partition past
/// `part_limit` percent.
pub struct DownloadLimits {
    slots: tokio::sync::Semaphore,
    part_limit: u64,
    reserved: std::sync::Mutex<u64>,
    probe: fn(&Path) -> std::io::Result<Space>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl DownloadLimits {
    /// `max_concurrent` downloads at once (at least one); downloads may fill the download
    /// partition up to `part_limit` percent.
    pub fn new(max_concurrent: usize, part_limit: u64) -> DownloadLimits {
        DownloadLimits {
            slots: tokio::sync::Semaphore::new(max_concurrent.max(1)),
            part_limit: part_limit.min(100),
            reserved: std::sync::Mutex::new(0),
            probe: filesystem_space,
            metrics: None,
        }
    }

    /// Counts downloaded bytes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> DownloadLimits {
        self.metrics = Some(metrics);
        self
    }

    /// Measures free space with `probe` instead of the filesystem (tests).
    pub fn with_probe(mut self, probe: fn(&Path) -> std::io::Result<Space>) -> DownloadLimits {
        self.probe = probe;
        self
    }

    /// Reserves `need` bytes on the filesystem of `dir`; the reservation ends when the guard
    /// is dropped. Refused, with the figures, when it does not fit under the limit.
    pub fn reserve(&self, dir: &Path, need: u64) -> Result<Reservation<'_>, String> {
        let space =
            (self.probe)(dir).map_err(|e| format!("free space of {}: {e}", dir.display()))?;
        let used = space.total.saturating_sub(space.available);
        let allowed = (u128::from(space.total) * u128::from(self.part_limit) / 100)
            .saturating_sub(u128::from(used));
        let allowed = u64::try_from(allowed)
            .unwrap_or(u64::MAX)
            .min(space.available);
        let mut reserved = self
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reserved.saturating_add(need) > allowed {
            return Err(format!(
                "not enough space in {}: the download needs {need} bytes, {} are free within downloadPartLimit {}% ({} reserved by other downloads)",
                dir.display(),
                allowed,
                self.part_limit,
                *reserved
            ));
        }
        *reserved += need;
        Ok(Reservation { limits: self, need })
    }

    /// Bytes reserved by downloads in progress.
    pub fn reserved(&self) -> u64 {
        *self
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for DownloadLimits {
    /// Upstream's downloader: 4 at once, up to 100 % of the partition.
    fn default() -> Self {
        DownloadLimits::new(4, 100)
    }
}

/// Space held for one download; given back on drop.
pub struct Reservation<'a> {
    limits: &'a DownloadLimits,
    need: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self
            .limits
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *reserved = reserved.saturating_sub(self.need);
    }
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
        // One of the download slots, then room for the rest of the download and the stored copy.
        let _slot = self
            .limits
            .slots
            .acquire()
            .await
            .map_err(|_| "the downloader is closed".to_owned())?;
        let have = tokio::fs::metadata(&partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let _space = self.limits.reserve(
            &self.download_path,
            info.size.saturating_sub(have).saturating_add(info.size),
        )?;
        let opts = DownloadOptions {
            // The link's settings at the time of the download, so that a renewed `online`
            // certificate is used from then on.
            tls: self.link.client_tls(),
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
        if let Some(m) = &self.limits.metrics {
            m.download_bytes.fetch_add(
                info.size.saturating_sub(have),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn thousand_bytes_with_four_hundred_free(_: &Path) -> std::io::Result<Space> {
        Ok(Space {
            total: 1000,
            available: 400,
        })
    }

    #[test]
    fn space_is_reserved_until_the_guard_is_dropped() {
        let limits = DownloadLimits::new(2, 100).with_probe(thousand_bytes_with_four_hundred_free);
        let dir = Path::new("/downloads");
        let first = limits.reserve(dir, 300).expect("fits");
        assert_eq!(limits.reserved(), 300);
        let err = limits
            .reserve(dir, 200)
            .err()
            .expect("does not fit beside the first");
        assert!(
            err.contains("needs 200 bytes, 400 are free") && err.contains("300 reserved"),
            "{err}"
        );
        drop(first);
        assert_eq!(limits.reserved(), 0);
        assert!(limits.reserve(dir, 400).is_ok());
    }

    #[test]
    fn the_partition_limit_counts_what_is_already_used() {
        // 600 of 1000 bytes are used: at 80 % only 200 more may be filled, at 50 % none.
        let limits = DownloadLimits::new(1, 80).with_probe(thousand_bytes_with_four_hundred_free);
        let dir = Path::new("/downloads");
        assert!(limits.reserve(dir, 200).is_ok());
        let err = limits.reserve(dir, 201).err().expect("over the limit");
        assert!(err.contains("downloadPartLimit 80%"), "{err}");
        let limits = DownloadLimits::new(1, 50).with_probe(thousand_bytes_with_four_hundred_free);
        assert!(limits.reserve(dir, 1).is_err());
        assert!(limits.reserve(dir, 0).is_ok());
    }

    #[tokio::test]
    async fn downloads_beyond_the_slots_wait() {
        let limits = DownloadLimits::new(2, 100);
        let a = limits.slots.acquire().await.expect("slot");
        let _b = limits.slots.acquire().await.expect("slot");
        assert!(
            limits.slots.try_acquire().is_err(),
            "a third download must wait"
        );
        drop(a);
        assert!(limits.slots.try_acquire().is_ok());
    }

    #[test]
    fn the_real_filesystem_reports_its_space() {
        let dir = tempfile::tempdir().expect("tmp");
        let space = filesystem_space(dir.path()).expect("statvfs");
        assert!(
            space.total > 0 && space.available <= space.total,
            "{space:?}"
        );
    }
}
