//! A 200 MiB tus upload into an object service, its daemon killed -9 half way: it resumes
//! from its durable offset into the same upload at the service (S3's multipart upload, Azure's
//! staged blocks), never buffers more than `parts-in-flight` + 1 parts locally (the parts on
//! their way up and the one being filled; a kill leaves those on their way up unrecorded, and
//! the resumed upload sends them again), and ends byte-identical. And one killed at its
//! completion: a HEAD never says "complete" before the object is in place.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::common::{Daemon, random_file, send, sha256_file};

const MIB: u64 = 1 << 20;

/// `in_progress`: what the service shows of the unfinished upload (a JSON list, "[]" when
/// none), read with its own SDK; `sha256`: the stored object's digest, likewise. The vfolder
/// `vfid` exists; the upload goes to `data/big.bin` in 5 MiB parts.
pub async fn killed_upload_resumes(
    d: &mut Daemon,
    vfid: &str,
    in_progress: &dyn Fn() -> String,
    sha256: &dyn Fn() -> String,
) {
    const SIZE: u64 = 200 * MIB;
    const FIRST: u64 = 100 * MIB;
    let src = d.dir.path().join("src.bin");
    random_file(&src, SIZE, 42);
    let want = sha256_file(&src);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "data/big.bin", "size": SIZE}),
        )
        .await;
    let url = d.url("client", &format!("/upload?token={t}"));

    // Watch the local part buffers the whole time: never more than the parts in flight (4 by
    // default) and the one being filled, 5 MiB each, on disk.
    let buffers = d.state_dir.join("objects/vol1");
    let (stop, largest) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let watcher = {
        let (stop, largest, dir) = (stop.clone(), largest.clone(), buffers.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let total: u64 = std::fs::read_dir(&dir)
                    .map(|es| {
                        es.flatten()
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0);
                largest.fetch_max(total, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // The first half, then the body stalls: the daemon checkpoints it, and is killed.
    let data = std::fs::read(&src).unwrap();
    let first = bytes::Bytes::copy_from_slice(&data[..FIRST as usize]);
    let body = futures::stream::iter(
        first
            .chunks(MIB as usize)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    )
    .chain(futures::stream::pending());
    let client = reqwest::Client::new();
    let patch = tokio::spawn(
        client
            .patch(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "0")
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    // The client port changes with a restart: the URL is built from the daemon each time.
    let upload_url = |d: &Daemon| d.url("client", &format!("/upload?token={t}"));
    let head = |d: &Daemon| {
        let url = upload_url(d);
        let http = d.http.clone();
        async move {
            let r = send(http.head(&url).header("Tus-Resumable", "1.0.0")).await;
            r.header("upload-offset")
                .and_then(|o| o.parse::<u64>().ok())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while head(d).await.unwrap_or(0) < FIRST - 8 * MIB {
        assert!(
            Instant::now() < deadline,
            "the first half was never checkpointed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: Vec<String> = serde_json::from_str(&in_progress()).unwrap();
    assert!(!before.is_empty(), "an upload in progress at the service");
    // The stalled PATCH lands its parts only when it needs their room or ends: the kill leaves
    // full buffers whose parts went up unrecorded, which the restart must send again.
    let files_at_kill = std::fs::read_dir(&buffers)
        .map(|es| es.count())
        .unwrap_or(0);
    assert!(
        files_at_kill >= 2,
        "killed with parts on their way up ({files_at_kill} local buffers)"
    );
    d.kill9();
    patch.abort();
    d.restart().await;

    // Resumed from the durable offset, into the same multipart upload.
    let offset = head(d).await.expect("the upload survives the kill");
    assert!((FIRST - 8 * MIB..=FIRST).contains(&offset), "{offset}");
    let after: Vec<String> = serde_json::from_str(&in_progress()).unwrap();
    assert_eq!(after, before, "the same upload continues at the service");
    let r = send(
        d.http
            .patch(upload_url(d))
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .body(data[offset as usize..].to_vec()),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert!(
        largest.load(Ordering::Relaxed) <= 5 * 5 * MIB,
        "at most 4 parts in flight and one being filled buffered locally, saw {}",
        largest.load(Ordering::Relaxed)
    );

    // The service's own SDK sees exactly the bytes, and nothing left in progress.
    assert_eq!(sha256().trim(), want);
    assert_eq!(in_progress().trim(), "[]");
}

/// A 12 MiB upload (three 5 MiB parts) whose daemon is killed -9 at its completion: the
/// completing request held back by `hold` (the service never gets it, or completes it and the
/// answer is lost). After the restart the HEAD that reports the full offset has put the object
/// in place (a tus client stops there), nothing is left staged, nothing left in progress. The
/// daemon `d` reaches the service through `hold`.
pub async fn killed_at_completion_is_in_place(
    d: &mut Daemon,
    vfid: &str,
    hold: &crate::common::holdback::Holdback,
    in_progress: &dyn Fn() -> String,
    sha256: &dyn Fn() -> String,
) {
    const SIZE: u64 = 12 * MIB;
    let src = d.dir.path().join("src.bin");
    random_file(&src, SIZE, 7);
    let want = sha256_file(&src);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "data/done.bin", "size": SIZE}),
        )
        .await;
    let patch = tokio::spawn(
        d.http
            .patch(d.url("client", &format!("/upload?token={t}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "0")
            .body(std::fs::read(&src).unwrap())
            .send(),
    );
    hold.wait_held(Duration::from_secs(120)).await;
    d.kill9();
    patch.abort();
    d.restart().await;

    let r = send(
        d.http
            .head(d.url("client", &format!("/upload?token={t}")))
            .header("Tus-Resumable", "1.0.0"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("upload-offset"), Some(SIZE.to_string()));
    assert_eq!(
        sha256().trim(),
        want,
        "in place when the HEAD says complete"
    );
    assert_eq!(in_progress().trim(), "[]");
    let staged: Vec<_> = std::fs::read_dir(d.state_dir.join("objects/vol1"))
        .map(|es| es.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "nothing left staged: {staged:?}");
}
