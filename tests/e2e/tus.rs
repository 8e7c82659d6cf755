//! tus 1.0 on the client API: the protocol matrix (core, creation, creation-with-upload,
//! termination, checksum, expiration), locking, durability of what was received, and staging.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use sha2::Digest;
use storage_agent::api::token::{DownloadClaims, DownloadOp, Tokens, UploadClaims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Daemon, JWT_SECRET, Resp, send};

pub struct Upload {
    pub token: String,
    pub vfid: String,
    pub vfpath: PathBuf,
    pub session: String,
}

pub async fn mint(d: &Daemon, relpath: &str, size: u64) -> Upload {
    let (vfid, vfpath) = d.create_vfolder().await;
    mint_in(d, &vfid, vfpath, relpath, size).await
}

pub async fn mint_in(d: &Daemon, vfid: &str, vfpath: PathBuf, relpath: &str, size: u64) -> Upload {
    let token = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": relpath, "size": size}),
        )
        .await;
    let claims: UploadClaims = tokens().decode(&token).unwrap();
    Upload {
        token,
        vfid: vfid.to_string(),
        vfpath,
        session: claims.session,
    }
}

pub fn tokens() -> Tokens {
    Tokens::new(JWT_SECRET, Duration::from_secs(3600))
}

pub async fn head(d: &Daemon, token: &str) -> Resp {
    send(
        d.http
            .head(d.url("client", &format!("/upload?token={token}"))),
    )
    .await
}

pub async fn patch(
    d: &Daemon,
    token: &str,
    offset: u64,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) -> Resp {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("tus-resumable", "1.0.0".parse().unwrap());
    h.insert(
        "content-type",
        "application/offset+octet-stream".parse().unwrap(),
    );
    h.insert("upload-offset", offset.to_string().parse().unwrap());
    // Extras replace the defaults (to send a bad Upload-Offset, say).
    for (k, v) in extra {
        h.insert(
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    send(
        d.http
            .patch(d.url("client", &format!("/upload?token={token}")))
            .headers(h)
            .body(body),
    )
    .await
}

fn offset(r: &Resp) -> u64 {
    r.header("upload-offset").unwrap().parse().unwrap()
}

pub fn staging_file(d: &Daemon, u: &Upload) -> PathBuf {
    let qs = uuid::Uuid::parse_str(u.vfid.split_once(':').unwrap().1.split_once('/').unwrap().0)
        .unwrap();
    d.vol_dir
        .join(qs.simple().to_string())
        .join(".upload")
        .join(&u.session)
}

#[tokio::test]
async fn options_advertises_the_extensions() {
    let d = Daemon::start().await;
    let r = send(
        d.http
            .request(reqwest::Method::OPTIONS, d.url("client", "/upload")),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("tus-version").unwrap(), "1.0.0");
    assert_eq!(r.header("tus-resumable").unwrap(), "1.0.0");
    assert_eq!(
        r.header("tus-max-size").unwrap(),
        (100u64 << 30).to_string()
    );
    assert_eq!(
        r.header("tus-extension").unwrap(),
        "creation,creation-with-upload,termination,checksum,expiration,concatenation"
    );
    let algos = r.header("tus-checksum-algorithm").unwrap();
    for a in ["sha1", "sha256", "md5"] {
        assert!(algos.split(',').any(|x| x == a), "{algos}");
    }
    assert_eq!(r.header("access-control-allow-origin").unwrap(), "*");
    assert!(
        r.header("access-control-expose-headers")
            .unwrap()
            .contains("Upload-Offset")
    );
}

#[tokio::test]
async fn core_protocol_matrix() {
    let d = Daemon::start().await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let u = mint(&d, "dir/sub/file.bin", data.len() as u64).await;

    let r = head(&d, &u.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(offset(&r), 0);
    assert_eq!(r.header("upload-length").unwrap(), "300000");
    assert_eq!(r.header("cache-control").unwrap(), "no-store");
    assert_eq!(r.header("tus-resumable").unwrap(), "1.0.0");
    let exp = httpdate::parse_http_date(&r.header("upload-expires").unwrap()).unwrap();
    let left = exp.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
        "{left:?}"
    );

    // Minting wrote nothing: the token describes the upload, and staging is made (outside the
    // vfolder, invisible in its listing) by the first write.
    assert!(!staging_file(&d, &u).exists());
    let r = d
        .mgr(
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": u.vfid, "relpath": "."}),
        )
        .await;
    assert_eq!(r.json()["items"], json!([]));

    // 415, 400s, 412, 409: nothing written.
    let r = send(
        d.http
            .patch(d.url("client", &format!("/upload?token={}", u.token)))
            .header("Upload-Offset", "0")
            .header("Content-Type", "text/plain")
            .body(data[..10].to_vec()),
    )
    .await;
    r.problem(415);
    let r = send(
        d.http
            .patch(d.url("client", &format!("/upload?token={}", u.token)))
            .header("Content-Type", "application/offset+octet-stream")
            .body(data[..10].to_vec()),
    )
    .await;
    assert!(
        r.problem(400)["msg"]
            .as_str()
            .unwrap()
            .contains("Upload-Offset")
    );
    for bad in ["abc", "-1", "+5", "1.5", "0x10", "99999999999999999999999"] {
        let r = patch(
            &d,
            &u.token,
            0,
            data[..10].to_vec(),
            &[("Upload-Offset", bad)],
        )
        .await;
        r.problem(400);
    }
    let r = patch(
        &d,
        &u.token,
        0,
        data[..10].to_vec(),
        &[("Tus-Resumable", "0.2.2")],
    )
    .await;
    r.problem(412);
    assert_eq!(r.header("tus-version").unwrap(), "1.0.0");
    let r = patch(&d, &u.token, 5, data[..10].to_vec(), &[]).await;
    let p = r.problem(409);
    assert_eq!(p["error_code"], "storage-proxy_update_conflict");
    assert_eq!(p["msg"], "Upload offset mismatch: expected 0, got 5");
    assert_eq!(offset(&head(&d, &u.token).await), 0);

    // Chunks at exactly the right offsets.
    let r = patch(&d, &u.token, 0, data[..100_000].to_vec(), &[]).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(offset(&r), 100_000);
    assert!(r.header("upload-expires").is_some());
    // Replaying an acknowledged chunk (Backend.AI's #7708) is a conflict, never an append.
    let r = patch(&d, &u.token, 0, data[..100_000].to_vec(), &[]).await;
    r.problem(409);
    assert_eq!(
        std::fs::metadata(staging_file(&d, &u)).unwrap().len(),
        100_000
    );

    // Past the length: 413 (announced or discovered), nothing kept.
    let r = patch(&d, &u.token, 100_000, vec![0u8; 200_001], &[]).await;
    r.problem(413);
    let mut big = data[100_000..].to_vec();
    big.extend_from_slice(&[1, 2, 3]);
    let stream = futures::stream::iter(
        big.chunks(50_000)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let r = send(
        d.http
            .patch(d.url("client", &format!("/upload?token={}", u.token)))
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "100000")
            .body(reqwest::Body::wrap_stream(stream)),
    )
    .await;
    r.problem(413);
    assert_eq!(offset(&head(&d, &u.token).await), 100_000);
    assert_eq!(
        std::fs::metadata(staging_file(&d, &u)).unwrap().len(),
        100_000
    );

    // The last chunk completes the upload: moved into place, parents created.
    let r = patch(&d, &u.token, 100_000, data[100_000..].to_vec(), &[]).await;
    assert_eq!(r.status, 204);
    assert_eq!(offset(&r), 300_000);
    assert_eq!(
        std::fs::read(u.vfpath.join("dir/sub/file.bin")).unwrap(),
        data
    );
    assert!(!staging_file(&d, &u).exists());
    // A completed upload still answers HEAD with its full offset (a resuming client is done).
    let r = head(&d, &u.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(offset(&r), 300_000);
    let r = patch(&d, &u.token, 300_000, vec![], &[]).await;
    assert_eq!(r.status, 204);
    let r = patch(&d, &u.token, 0, vec![1], &[]).await;
    r.problem(409);
}

#[tokio::test]
async fn checksums() {
    let d = Daemon::start().await;
    let data = b"hello, checksummed world".to_vec();
    let u = mint(&d, "c.txt", data.len() as u64).await;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let sha256_wrong = format!("sha256 {}", b64(&sha2::Sha256::digest(b"something else")));
    let r = patch(
        &d,
        &u.token,
        0,
        data[..10].to_vec(),
        &[("Upload-Checksum", &sha256_wrong)],
    )
    .await;
    assert_eq!(r.status, 460, "{}", r.text());
    assert_eq!(offset(&head(&d, &u.token).await), 0);
    assert_eq!(
        std::fs::metadata(staging_file(&d, &u)).unwrap().len(),
        0,
        "the chunk is discarded"
    );
    let r = patch(
        &d,
        &u.token,
        0,
        data[..10].to_vec(),
        &[("Upload-Checksum", "crc32 AAAAAA==")],
    )
    .await;
    r.problem(400);
    let r = patch(
        &d,
        &u.token,
        0,
        data[..10].to_vec(),
        &[("Upload-Checksum", "sha1")],
    )
    .await;
    r.problem(400);
    let sha1 = format!("sha1 {}", b64(&sha1::Sha1::digest(&data[..10])));
    let r = patch(
        &d,
        &u.token,
        0,
        data[..10].to_vec(),
        &[("Upload-Checksum", &sha1)],
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let md5 = format!("md5 {}", b64(&md5::Md5::digest(&data[10..])));
    let r = patch(
        &d,
        &u.token,
        10,
        data[10..].to_vec(),
        &[("Upload-Checksum", &md5)],
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(std::fs::read(u.vfpath.join("c.txt")).unwrap(), data);
}

#[tokio::test]
async fn tokens_are_checked() {
    let d = Daemon::start().await;
    let u = mint(&d, "t.bin", 10).await;
    let t = tokens();
    let claims: UploadClaims = t.decode(&u.token).unwrap();
    // Expired but genuine: 410 Gone (tus expiration).
    let expired = t
        .mint(&UploadClaims {
            exp: 1_000_000,
            ..claims.clone()
        })
        .unwrap();
    let r = head(&d, &expired).await;
    assert_eq!(r.status, 410);
    let r = patch(&d, &expired, 0, vec![0; 10], &[]).await;
    r.problem(410);
    // Forged (another key), garbage, missing, unknown session.
    let forged = Tokens::new("some-other-secret-value", Duration::from_secs(60))
        .mint(&claims)
        .unwrap();
    for bad in [forged.as_str(), "garbage", "a.b.c"] {
        let r = patch(&d, bad, 0, vec![0; 10], &[]).await;
        assert!(r.problem(400)["data"]["token"].is_string());
    }
    let r = send(
        d.http
            .patch(d.url("client", "/upload"))
            .header("Upload-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream"),
    )
    .await;
    assert_eq!(r.problem(400)["data"]["token"], "is required");
    let unknown = t
        .mint(&UploadClaims {
            session: "f".repeat(32),
            ..claims.clone()
        })
        .unwrap();
    // A session never used before is a new upload (tokens are self-describing)...
    let r = head(&d, &unknown).await;
    assert_eq!((r.status, offset(&r)), (200, 0));
    // ...and a terminated one is gone for good: its token cannot start it again.
    let r = send(
        d.http
            .delete(d.url("client", &format!("/upload?token={unknown}")))
            .header("Tus-Resumable", "1.0.0"),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(head(&d, &unknown).await.status, 404);
    assert_eq!(patch(&d, &unknown, 0, vec![0; 10], &[]).await.status, 404);
    // Wrong operation both ways.
    let dl = t
        .mint(&DownloadClaims {
            op: DownloadOp::Download,
            volume: "vol1".into(),
            vfid: claims.vfid,
            relpath: claims.relpath.clone(),
            exp: t.expiry(),
            archive: false,
            unmanaged_path: None,
        })
        .unwrap();
    let r = patch(&d, &dl, 0, vec![0; 10], &[]).await;
    r.problem(400);
    let r = d
        .get("client", &format!("/download?token={}", u.token))
        .await;
    r.problem(400);
}

#[tokio::test]
async fn termination_and_creation() {
    let d = Daemon::start().await;
    let u = mint(&d, "gone.bin", 1000).await;
    patch(&d, &u.token, 0, vec![7; 500], &[]).await;
    let r = send(
        d.http
            .delete(d.url("client", &format!("/upload?token={}", u.token)))
            .header("Tus-Resumable", "1.0.0"),
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(!staging_file(&d, &u).exists());
    assert_eq!(head(&d, &u.token).await.status, 404);

    // Creation: POST confirms the length and returns the upload URL.
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let u = mint(&d, "created.bin", data.len() as u64).await;
    let url = d.url("client", &format!("/upload?token={}", u.token));
    let r = send(d.http.post(&url).header("Tus-Resumable", "1.0.0")).await;
    assert_eq!(r.problem(400)["data"]["upload-length"], "is required");
    let r = send(
        d.http
            .post(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", "4999"),
    )
    .await;
    r.problem(400);
    let r = send(
        d.http
            .post(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Defer-Length", "1"),
    )
    .await;
    r.problem(400);
    let r = send(
        d.http
            .post(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", "5000")
            .header("Upload-Metadata", "filename Y3JlYXRlZC5iaW4="),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let loc = r.header("location").unwrap();
    assert!(loc.starts_with("upload?token="), "{loc}");
    let resolved = reqwest::Url::parse(&url).unwrap().join(&loc).unwrap();
    // creation-with-upload on a second upload.
    let r = send(
        d.http
            .patch(resolved.clone())
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "0")
            .body(data.clone()),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(std::fs::read(u.vfpath.join("created.bin")).unwrap(), data);

    let u2 = mint_in(&d, &u.vfid, u.vfpath.clone(), "cwu.bin", data.len() as u64).await;
    let r = send(
        d.http
            .post(d.url(
                "client",
                &format!("/upload?token={}&dst_dir=into/here", u2.token),
            ))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", "5000")
            .header("Content-Type", "application/offset+octet-stream")
            .body(data[..3000].to_vec()),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(offset(&r), 3000);
    assert!(
        r.header("location")
            .unwrap()
            .contains("dst_dir=into%2Fhere")
    );
    // X-HTTP-Method-Override for clients that cannot send PATCH.
    let r = send(
        d.http
            .post(d.url(
                "client",
                &format!("/upload?token={}&dst_dir=into/here", u2.token),
            ))
            .header("X-HTTP-Method-Override", "PATCH")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "3000")
            .body(data[3000..].to_vec()),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        std::fs::read(u.vfpath.join("into/here/cwu.bin")).unwrap(),
        data
    );
}

#[tokio::test]
async fn destination_rules() {
    let d = Daemon::start().await;
    let (vfid, vfpath) = d.create_vfolder().await;
    let outside = d.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, vfpath.join("out")).unwrap();
    std::fs::create_dir(vfpath.join("adir")).unwrap();
    std::fs::write(vfpath.join("existing.txt"), b"old contents").unwrap();

    // Minting refuses destinations that can never be written.
    for (rel, code) in [
        ("out/x.bin", 400),
        ("adir", 400),
        ("existing.txt/x", 400),
        ("../x", 400),
        ("/abs", 400),
    ] {
        let r = d
            .mgr(
                "POST",
                "/folder/file/upload",
                json!({"volume": "vol1", "vfid": vfid, "relpath": rel, "size": 3}),
            )
            .await;
        assert_eq!(r.status, code, "{rel}: {}", r.text());
    }
    let r = d
        .mgr(
            "POST",
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "x", "size": 200u64 << 30}),
        )
        .await;
    assert!(
        r.problem(400)["data"]["size"]
            .as_str()
            .unwrap()
            .contains("max-upload-size")
    );

    // dst_dir is checked on every request, before any byte is written.
    let u = mint_in(&d, &vfid, vfpath.clone(), "f.txt", 3).await;
    for dst in ["../..", "/tmp", "out", "existing.txt"] {
        let r = send(
            d.http
                .patch(d.url(
                    "client",
                    &format!("/upload?token={}&dst_dir={dst}", u.token),
                ))
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", "0")
                .body(b"abc".to_vec()),
        )
        .await;
        assert!((400..500).contains(&r.status), "{dst}: {}", r.status);
        assert_eq!(offset(&head(&d, &u.token).await), 0, "{dst}");
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // An existing file is replaced atomically.
    let u = mint_in(&d, &vfid, vfpath.clone(), "existing.txt", 3).await;
    let r = patch(&d, &u.token, 0, b"new".to_vec(), &[]).await;
    assert_eq!(r.status, 204);
    assert_eq!(std::fs::read(vfpath.join("existing.txt")).unwrap(), b"new");
    // A zero-length upload completes with one empty PATCH.
    let u = mint_in(&d, &vfid, vfpath.clone(), "empty.txt", 0).await;
    let r = patch(&d, &u.token, 0, vec![], &[]).await;
    assert_eq!(r.status, 204);
    assert_eq!(std::fs::read(vfpath.join("empty.txt")).unwrap(), b"");
}

/// Sends a PATCH by hand so the body can stall or break off.
async fn raw_patch_start(
    d: &Daemon,
    token: &str,
    offset: u64,
    length: u64,
) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(&d.addrs["client"])
        .await
        .unwrap();
    let head = format!(
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\nContent-Length: {length}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

async fn read_status(s: &mut tokio::net::TcpStream) -> u16 {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(crate::common::OUTCOME, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

#[tokio::test]
async fn one_writer_at_a_time_and_stale_takeover() {
    let d = Daemon::builder()
        .set("storage-agent.upload-lock-stale-after", "1s")
        .start()
        .await;
    let u = mint(&d, "locked.bin", 10_000).await;

    // A live writer keeps its lock: a second PATCH gets 423.
    let mut first = raw_patch_start(&d, &u.token, 0, 10_000).await;
    first.write_all(&[1u8; 1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = patch(&d, &u.token, 0, vec![2u8; 10_000], &[]).await;
    r.problem(423);
    // HEAD never blocks and reports only acknowledged bytes.
    assert_eq!(offset(&head(&d, &u.token).await), 0);

    // The first writer stalls beyond the stale limit: the next PATCH takes over. The first one's
    // received bytes are kept, so the new PATCH at offset 0 is told the real offset (409).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = patch(&d, &u.token, 0, vec![2u8; 10_000], &[]).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        read_status(&mut first).await,
        423,
        "the stale writer is told it lost the lock"
    );
    let at = offset(&head(&d, &u.token).await);
    assert_eq!(at, 1000);
    let r = patch(&d, &u.token, at, vec![3u8; 9000], &[]).await;
    assert_eq!(r.status, 204);
    let got = std::fs::read(u.vfpath.join("locked.bin")).unwrap();
    assert_eq!(&got[..1000], &[1u8; 1000][..]);
    assert_eq!(&got[1000..], &[3u8; 9000][..]);
}

#[tokio::test]
async fn broken_and_idle_bodies_keep_what_arrived() {
    let d = Daemon::builder()
        .set("storage-agent.upload-idle-timeout", "1s")
        .start()
        .await;
    let u = mint(&d, "partial.bin", 100_000).await;
    // The client disconnects after 30 000 of 100 000 bytes.
    let mut s = raw_patch_start(&d, &u.token, 0, 100_000).await;
    s.write_all(&[9u8; 30_000]).await.unwrap();
    s.flush().await.unwrap();
    drop(s);
    let mut at = 0;
    for _ in 0..100 {
        at = offset(&head(&d, &u.token).await);
        if at > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        at, 30_000,
        "what arrived before the break is durable and acknowledged"
    );
    // A body that stops sending is cut off after the idle timeout, its bytes kept.
    let mut s = raw_patch_start(&d, &u.token, 30_000, 70_000).await;
    s.write_all(&[8u8; 5_000]).await.unwrap();
    assert_eq!(read_status(&mut s).await, 408);
    assert_eq!(offset(&head(&d, &u.token).await), 35_000);
    let r = patch(&d, &u.token, 35_000, vec![7u8; 65_000], &[]).await;
    assert_eq!(r.status, 204);
    let got = std::fs::read(u.vfpath.join("partial.bin")).unwrap();
    assert_eq!(got.len(), 100_000);
    assert!(got[..30_000].iter().all(|&b| b == 9) && got[30_000..35_000].iter().all(|&b| b == 8));
}

#[tokio::test]
async fn expired_uploads_are_reaped() {
    let d = Daemon::builder()
        .set("storage-proxy.session-expire", "2s")
        .set("storage-agent.upload-reap-interval", "1s")
        .start()
        .await;
    let u = mint(&d, "late.bin", 100).await;
    patch(&d, &u.token, 0, vec![1; 50], &[]).await;
    assert!(staging_file(&d, &u).exists());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let r = head(&d, &u.token).await;
    assert_eq!(r.status, 410);
    let r = patch(&d, &u.token, 50, vec![1; 50], &[]).await;
    r.problem(410);
    assert!(
        !staging_file(&d, &u).exists(),
        "the reaper deleted the staging data"
    );
    assert!(!u.vfpath.join("late.bin").exists());
}
