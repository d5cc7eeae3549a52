//! The nodes' file server over loopback: blobs served byte for byte, ranges for resumed
//! downloads, nothing outside the blob folder.

use aos_cm::api::fileserver;
use aos_cm::imagestore::download::{DownloadError, DownloadOptions, download};
use tokio::net::TcpListener;

async fn server(content: &[u8]) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let hex = "ab".repeat(32);
    std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
    std::fs::write(dir.path().join("sha256").join(&hex), content).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(fileserver::serve(listener, dir.path().to_path_buf(), rx));
    std::mem::forget(stop);
    (
        dir,
        format!("http://{addr}/blobs/sha256/{hex}"),
        format!("http://{addr}"),
    )
}

#[tokio::test]
async fn blobs_are_served_whole_and_by_range() {
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (_dir, url, base) = server(&content).await;
    let out = tempfile::tempdir().unwrap();
    let whole = out.path().join("whole");
    download(&url, &whole, &DownloadOptions::default(), |_| {})
        .await
        .expect("download");
    assert_eq!(std::fs::read(&whole).unwrap(), content);
    // A partial file is resumed with a Range request and completed byte for byte.
    let partial = out.path().join("partial");
    std::fs::write(&partial, &content[..123_457]).unwrap();
    let outcome = download(&url, &partial, &DownloadOptions::default(), |_| {})
        .await
        .expect("resume");
    assert_eq!(outcome.resumed_from, 123_457);
    assert_eq!(std::fs::read(&partial).unwrap(), content);
    // Unknown blobs and paths outside the folder are not found.
    for bad in [
        format!("{base}/blobs/sha256/{}", "cd".repeat(32)),
        format!("{base}/blobs/sha256/../sha256/{}", "ab".repeat(32)),
        format!("{base}/etc/passwd"),
    ] {
        let err = download(
            &bad,
            &out.path().join("x"),
            &DownloadOptions::default(),
            |_| {},
        )
        .await
        .expect_err("not served");
        assert!(
            matches!(err, DownloadError::Status { code: 404, .. }),
            "{bad}: {err}"
        );
    }
}
