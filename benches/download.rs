//! The blob pipeline on one 256 MiB blob: served over loopback HTTP by the nodes' file server,
//! downloaded (streamed to the partial file), then verified in one pass: SHA3-256 of the
//! download, AES-256-CBC decryption, SHA-256 of the content. Prints MB/s and the growth of the
//! peak RSS during the pipeline (the peak is reset first through /proc/self/clear_refs).
//!
//! Run: `cargo bench --bench download`

use std::time::Instant;

use aes::cipher::{BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};
use aos_cm::api::fileserver;
use aos_cm::imagestore::download::{DownloadOptions, download};
use aos_cm::imagestore::verify::{DecryptInfo, verify_and_store};
use sha2::Digest as _;

const SIZE: usize = 256 << 20;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = [0x42u8; 32];
    let iv = [0x24u8; 16];
    let (sha3, sha256, name) = {
        // Content that does not compress or repeat: xorshift.
        let mut content = vec![0u8; SIZE + 16];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for chunk in content[..SIZE].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let sha256 = hex(&sha2::Sha256::digest(&content[..SIZE]));
        let n = cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &iv)
            .expect("key")
            .encrypt_padded::<Pkcs7>(&mut content, SIZE)
            .expect("padding")
            .len();
        content.truncate(n);
        let sha3 = hex(&sha3::Sha3_256::digest(&content));
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).expect("dir");
        std::fs::write(dir.path().join("blobs/sha256").join(&sha256), &content).expect("write");
        (sha3, sha256.clone(), sha256)
    };
    // The daemon's runtime (its blocking pool bounded as in `aos-cm run`).
    let runtime = aos_cm::runtime::build().expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(fileserver::serve(listener, dir.path().join("blobs"), stop_rx));
        let url = format!("http://{addr}/blobs/sha256/{name}");
        let decrypt = DecryptInfo {
            key: key.to_vec(),
            iv,
        };
        println!("download + verify of a {} MiB AES-256-CBC blob over loopback", SIZE >> 20);
        for run in 1..=3 {
            let partial = dir.path().join(format!("partial-{run}"));
            let out = dir.path().join(format!("out-{run}"));
            // Reset the peak RSS to the current RSS.
            let _ = std::fs::write("/proc/self/clear_refs", "5");
            let rss_before = status_kib("VmRSS:");
            let started = Instant::now();
            download(&url, &partial, &DownloadOptions::default(), |_| {})
                .await
                .expect("download");
            let downloaded = started.elapsed();
            verify_and_store(&partial, &sha3, Some(&decrypt), &sha256, &out)
                .await
                .expect("verify");
            let total = started.elapsed();
            let peak = status_kib("VmHWM:");
            let mb = SIZE as f64 / 1e6;
            println!(
                "run {run}: {:.0} MB/s end to end ({:.2} s: download {:.2} s, verify {:.2} s); peak RSS growth {} KiB",
                mb / total.as_secs_f64(),
                total.as_secs_f64(),
                downloaded.as_secs_f64(),
                (total - downloaded).as_secs_f64(),
                peak.saturating_sub(rss_before)
            );
            let _ = std::fs::remove_file(&partial);
            let _ = std::fs::remove_file(&out);
        }
    });
}
