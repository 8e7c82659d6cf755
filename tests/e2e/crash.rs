//! Durability of acknowledged offsets: the daemon is SIGKILLed at random points in the middle of
//! PATCH requests, twenty times. After each restart HEAD must answer an offset no lower than the
//! last one acknowledged (204) and no higher than what was sent, the staging file must be cut back
//! to it, and the finished upload must be byte-identical to the source.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::common::{Daemon, random_file, sha256_file};
use crate::tus::{head, mint};

const SIZE: u64 = 128 << 20;
const CHUNK: u64 = 4 << 20;

/// Sends PATCHes of CHUNK from `from`, each body in 128 KiB pieces with small pauses so that a
/// kill lands inside a body. Records the last acknowledged offset and the bytes sent.
async fn writer(
    http: reqwest::Client,
    url: String,
    data: Arc<Vec<u8>>,
    from: u64,
    acked: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
) {
    let mut off = from;
    while off < SIZE {
        let end = (off + CHUNK).min(SIZE);
        let pieces: Vec<Bytes> = data[off as usize..end as usize]
            .chunks(128 << 10)
            .map(Bytes::copy_from_slice)
            .collect();
        let sent2 = sent.clone();
        let body = futures::stream::iter(pieces).then(move |p| {
            let sent = sent2.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                sent.fetch_add(p.len() as u64, Ordering::SeqCst);
                Ok::<_, std::io::Error>(p)
            }
        });
        let r = http
            .patch(&url)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", off.to_string())
            .header("Content-Length", (end - off).to_string())
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 204 => {
                let n: u64 = r.headers()["upload-offset"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                acked.store(n, Ordering::SeqCst);
                off = n;
            }
            _ => return, // the daemon died under us
        }
    }
}

use futures::StreamExt;

#[tokio::test]
async fn kill9_mid_patch_twenty_times() {
    let mut d = Daemon::start().await;
    let src = d.dir.path().join("src.bin");
    random_file(&src, SIZE, 7);
    let data = Arc::new(std::fs::read(&src).unwrap());
    let u = mint(&d, "crash/target.bin", SIZE).await;
    let qs = uuid::Uuid::parse_str(u.vfid.split_once(':').unwrap().1.split_once('/').unwrap().0)
        .unwrap();
    let staging = d
        .vol_dir
        .join(qs.simple().to_string())
        .join(".upload")
        .join(&u.session);

    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut offset = 0u64;
    let mut kills = 0;
    let mut saw_partial = 0;
    for round in 0..20 {
        let acked = Arc::new(AtomicU64::new(offset));
        let sent = Arc::new(AtomicU64::new(offset));
        let url = d.url("client", &format!("/upload?token={}", u.token));
        let w = tokio::spawn(writer(
            d.http.clone(),
            url,
            data.clone(),
            offset,
            acked.clone(),
            sent.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(20 + rand() % 230)).await;
        d.kill9();
        kills += 1;
        w.abort();
        let last_acked = acked.load(Ordering::SeqCst);
        let total_sent = sent.load(Ordering::SeqCst);
        d.restart().await;
        let r = head(&d, &u.token).await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        let now: u64 = r.header("upload-offset").unwrap().parse().unwrap();
        assert!(
            now >= last_acked && now <= total_sent,
            "round {round}: offset {now} outside [{last_acked}, {total_sent}]"
        );
        if now < SIZE {
            assert_eq!(
                std::fs::metadata(&staging).unwrap().len(),
                now,
                "round {round}: staging cut back to the acknowledged offset"
            );
        }
        if total_sent > now {
            saw_partial += 1;
        }
        offset = now;
        if offset == SIZE {
            break;
        }
    }
    assert!(kills >= 20 || offset == SIZE);
    assert!(
        saw_partial > 0,
        "some kills landed with unacknowledged bytes in flight"
    );
    // Finish from wherever we are.
    let acked = Arc::new(AtomicU64::new(offset));
    let sent = Arc::new(AtomicU64::new(offset));
    writer(
        d.http.clone(),
        d.url("client", &format!("/upload?token={}", u.token)),
        data.clone(),
        offset,
        acked.clone(),
        sent,
    )
    .await;
    assert_eq!(acked.load(Ordering::SeqCst), SIZE);
    assert_eq!(
        sha256_file(&u.vfpath.join("crash/target.bin")),
        sha256_file(&src)
    );
}

/// The offsets the daemon logged as committed checkpoints for `session`, in order.
fn logged_checkpoints(log: &str, session: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("upload checkpoint committed") && l.contains(session))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("offset="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// One long PATCH (as curl sends, and tus-js-client by default), streamed at about 40 MiB/s and
/// killed (kill -9) ten times at random moments more than a second into the body. After each
/// restart HEAD answers at least the last checkpoint committed before the kill and never more
/// than was sent; the upload always moved on; and the finished file is byte-identical.
#[tokio::test]
async fn kill9_during_one_long_patch_keeps_its_checkpoints() {
    const BIG: u64 = 768 << 20;
    let mut d = Daemon::start().await;
    let src = d.dir.path().join("long.bin");
    random_file(&src, BIG, 11);
    let data = Arc::new(std::fs::read(&src).unwrap());
    let u = mint(&d, "long/target.bin", BIG).await;
    let mut seed: u64 = 0x2545f4914f6cdd1d;
    let mut offset = 0u64;
    for round in 0..10 {
        let sent = Arc::new(AtomicU64::new(offset));
        let pieces: Vec<Bytes> = data[offset as usize..]
            .chunks(256 << 10)
            .map(Bytes::copy_from_slice)
            .collect();
        let sent2 = sent.clone();
        let body = futures::stream::iter(pieces).then(move |p| {
            let sent = sent2.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(6)).await;
                sent.fetch_add(p.len() as u64, Ordering::SeqCst);
                Ok::<_, std::io::Error>(p)
            }
        });
        let req = d
            .http
            .patch(d.url("client", &format!("/upload?token={}", u.token)))
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .header("Content-Length", (BIG - offset).to_string())
            .body(reqwest::Body::wrap_stream(body))
            .send();
        let w = tokio::spawn(req);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(1300 + seed % 1200)).await;
        let log = std::fs::read_to_string(d.log_path()).unwrap_or_default();
        d.kill9();
        w.abort();
        let total_sent = sent.load(Ordering::SeqCst);
        let last_checkpoint = logged_checkpoints(&log, &u.session)
            .last()
            .copied()
            .unwrap_or(0);
        d.restart().await;
        let r = head(&d, &u.token).await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        let now: u64 = r.header("upload-offset").unwrap().parse().unwrap();
        assert!(
            now >= last_checkpoint && now <= total_sent,
            "round {round}: offset {now} outside [{last_checkpoint}, {total_sent}]"
        );
        assert!(
            now > offset,
            "round {round}: the PATCH's progress was kept ({offset} -> {now}, sent {total_sent})"
        );
        offset = now;
    }
    // Finish in one go.
    let url = d.url("client", &format!("/upload?token={}", u.token));
    let r = crate::common::send(
        d.http
            .patch(&url)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .body(data[offset as usize..].to_vec()),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        sha256_file(&u.vfpath.join("long/target.bin")),
        sha256_file(&src)
    );
}
