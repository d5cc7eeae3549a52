//! The file server the nodes fetch item blobs from (`fileServerUrl`): `GET`/`HEAD
//! /blobs/sha256/<hex>` serves `<installPath>/blobs/sha256/<hex>`, with a single `Range`
//! (`bytes=N-` or `bytes=N-M`) answered by 206. Only well-formed digests are served, so no
//! path can leave the blob folder. Bodies are streamed in 64 KiB chunks: memory stays flat.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

const CHUNK: usize = 64 * 1024;

type Body = BoxBody<Bytes, std::io::Error>;

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

/// The byte range asked for, if any: `(start, end inclusive)` within `size`. `Err` when it
/// cannot be satisfied.
fn range(value: Option<&header::HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let spec = v.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        // One range only; several would need a multipart answer.
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (s, e) => {
            let e: u64 = e.parse().map_err(|_| ())?;
            (s.parse().map_err(|_| ())?, e.min(size.saturating_sub(1)))
        }
    };
    if size == 0 || start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// The blob file a request path names, when it names one.
fn blob_path(root: &std::path::Path, path: &str) -> Option<PathBuf> {
    let hex = path.strip_prefix("/blobs/sha256/")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| root.join("sha256").join(hex))
}

async fn serve_one(root: Arc<PathBuf>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(path) = blob_path(&root, req.uri().path()) else {
        return empty(StatusCode::NOT_FOUND);
    };
    let Ok(mut file) = tokio::fs::File::open(&path).await else {
        return empty(StatusCode::NOT_FOUND);
    };
    let size = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return empty(StatusCode::NOT_FOUND),
    };
    let (status, start, len) = match range(req.headers().get(header::RANGE), size) {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        Err(()) => {
            let mut r = empty(StatusCode::RANGE_NOT_SATISFIABLE);
            if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let body = if req.method() == Method::HEAD {
        Empty::new().map_err(|never| match never {}).boxed()
    } else {
        if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
            return empty(StatusCode::INTERNAL_SERVER_ERROR);
        }
        let stream = futures::stream::unfold((file, len), |(mut file, left)| async move {
            if left == 0 {
                return None;
            }
            let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            let mut buf = vec![0u8; want];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Frame::data(Bytes::from(buf))), (file, left - n as u64)))
                }
                Err(e) => Some((Err(e), (file, 0))),
            }
        });
        StreamBody::new(stream).boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) =
            header::HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// Serves `<blobs_dir>/sha256/<hex>` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, blobs_dir: PathBuf, stop: watch::Receiver<bool>) {
    let root = Arc::new(blobs_dir);
    serve_http(listener, stop, move |req| serve_one(root.clone(), req)).await;
}

/// Accepts HTTP/1.1 connections on `listener` until `stop` changes; every request of every
/// connection is answered by `handle`. Shared by the file server and the metrics endpoint.
pub(crate) async fn serve_http<F, Fut, B>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let hv = |s: &str| header::HeaderValue::from_str(s).unwrap();
        assert_eq!(range(None, 10), Ok(None));
        assert_eq!(range(Some(&hv("bytes=3-")), 10), Ok(Some((3, 9))));
        assert_eq!(range(Some(&hv("bytes=3-5")), 10), Ok(Some((3, 5))));
        assert_eq!(range(Some(&hv("bytes=3-99")), 10), Ok(Some((3, 9))));
        assert_eq!(range(Some(&hv("bytes=-4")), 10), Ok(Some((6, 9))));
        for bad in [
            "bytes=10-",
            "bytes=5-3",
            "items=1-2",
            "bytes=1-2,4-5",
            "bytes=-0",
            "bytes=x-",
        ] {
            assert_eq!(range(Some(&hv(bad)), 10), Err(()), "{bad}");
        }
    }

    #[test]
    fn only_digests_name_files() {
        let root = std::path::Path::new("/b");
        let hex = "a".repeat(64);
        assert!(blob_path(root, &format!("/blobs/sha256/{hex}")).is_some());
        for bad in [
            "/blobs/sha256/../../etc/passwd".to_owned(),
            format!("/blobs/sha256/{}", "A".repeat(64)),
            format!("/blobs/sha256/{hex}/x"),
            "/etc/passwd".to_owned(),
        ] {
            assert!(blob_path(root, &bad).is_none(), "{bad}");
        }
    }
}
