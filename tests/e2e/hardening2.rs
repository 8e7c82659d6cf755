//! The attacks of the second security review (`G1`…`G12`,
//! `../shared/reference/security-review-2.md`), run against the real binary: each test checks
//! the property the finding broke.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::backends::{bucket_of, s3_object};
use crate::common::moto::Moto;
use crate::common::{Daemon, random_vfid};
use crate::memory::{peak_rss_kib, reset_peak};

/// Opens a TCP connection to `addr` from `local` (one of 127.0.0.x).
async fn connect_from(local: [u8; 4], addr: &str) -> tokio::net::TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((local, 0))).unwrap();
    tokio::time::timeout(Duration::from_secs(60), sock.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// A fresh client (no pooled connection) from `local`, so each check opens a new connection.
fn fresh_client(local: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(Some(std::net::IpAddr::from(local)))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// G5: clients that fill the public client port from several addresses cannot take the manager
/// API's or the internal listener's connections.
#[tokio::test]
async fn a_saturated_client_port_does_not_starve_the_other_listeners() {
    let d = Daemon::builder()
        .set("storage-agent.first-byte-timeout", "10m")
        .set("storage-agent.idle-timeout", "10m")
        .set("storage-agent.max-connections", 40)
        .set("storage-agent.max-connections-per-ip", 10)
        .start()
        .await;
    let client = d.addrs["client"].clone();
    // 4 addresses × 10 connections: the client port's cap of 40, held by silent sockets.
    let mut held = Vec::new();
    for host in 2..6u8 {
        for _ in 0..10 {
            held.push(connect_from([127, 0, 0, host], &client).await);
        }
    }

    // The client port is full: a newcomer is closed at once …
    let client_port = d.addrs["client"].rsplit_once(':').unwrap().1.to_string();
    let refused = fresh_client([127, 0, 0, 9])
        .get(format!("http://127.0.0.1:{client_port}/download?token=x"))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "the client port is at its cap: {refused:?}"
    );

    // … while the manager API and the internal listener still answer, from any address.
    for local in [[127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 9]] {
        let http = fresh_client(local);
        let r = http
            .get(d.url("internal", "/readyz"))
            .send()
            .await
            .expect("/readyz answers while the client port is full");
        assert_eq!(r.status(), 200);
        let r = http
            .get(d.url("manager", "/"))
            .header(
                "X-BackendAI-Storage-Auth-Token",
                crate::common::MANAGER_SECRET,
            )
            .send()
            .await
            .expect("the manager API answers while the client port is full");
        assert_eq!(r.status(), 200);
        let r = http
            .get(d.url("internal", "/metrics"))
            .send()
            .await
            .expect("/metrics answers while the client port is full");
        assert_eq!(r.status(), 200);
    }
    drop(held);
}

/// G4: method names are labels; made-up ones must not add series to `/metrics`.
#[tokio::test]
async fn made_up_methods_add_no_metric_series() {
    let d = Daemon::builder().start().await;
    let before = d.get("internal", "/metrics").await.text().len();
    let addr = d.addrs["client"].clone();
    for i in 0..300 {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            continue;
        };
        let method = format!("M{i}{}", "X".repeat(1000));
        let _ = write!(
            s,
            "{method} /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    }
    let metrics = d.get("internal", "/metrics").await.text();
    assert!(
        !metrics.contains("XXXXXXXXXX"),
        "a made-up method became a label"
    );
    assert!(
        metrics.contains("method=\"other\""),
        "made-up methods are counted as \"other\""
    );
    // 300 new methods at ~20 series of ~1 KiB each would be megabytes.
    assert!(
        metrics.len() < before + 64 * 1024,
        "/metrics grew from {before} to {} bytes",
        metrics.len()
    );
}

/// Bytes under `dir` (the object volume's local part buffers), sampled until `stop`.
fn sample_max_bytes(
    dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut max = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let now: u64 = std::fs::read_dir(&dir)
                .map(|it| {
                    it.flatten()
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            max = max.max(now);
            std::thread::sleep(Duration::from_millis(20));
        }
        max
    })
}

/// `patch` with the body's SHA-1 as `Upload-Checksum`.
async fn checksummed_patch(
    d: &Daemon,
    token: &str,
    offset: u64,
    len: u64,
    chunked: bool,
) -> (Option<u16>, Vec<u8>) {
    patch(d, token, offset, len, chunked, true).await
}

/// A PATCH of `len` bytes (a pattern shifted by `offset`), streamed without a Content-Length
/// when `chunked`, with its SHA-1 as `Upload-Checksum` when `checksum`.
async fn patch(
    d: &Daemon,
    token: &str,
    offset: u64,
    len: u64,
    chunked: bool,
    checksum: bool,
) -> (Option<u16>, Vec<u8>) {
    use base64::Engine;
    use sha1::Digest;
    let data: Vec<u8> = (0..len).map(|i| ((i * 7 + offset) % 251) as u8).collect();
    let sum = base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(&data));
    let body = if chunked {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            data.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    } else {
        reqwest::Body::from(data.clone())
    };
    let mut r = reqwest::Client::new()
        .patch(d.url("client", &format!("/upload?token={token}")))
        .header("Tus-Resumable", "1.0.0")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", offset.to_string());
    if checksum {
        r = r.header("Upload-Checksum", format!("sha1 {sum}"));
    }
    let r = r.body(body).send().await;
    (r.ok().map(|r| r.status().as_u16()), data)
}

async fn upload_offset(d: &Daemon, token: &str) -> u64 {
    let r = reqwest::Client::new()
        .head(d.url("client", &format!("/upload?token={token}")))
        .header("Tus-Resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    r.headers()
        .get("Upload-Offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// G2: a checksummed PATCH on an S3 volume cannot fill the state disk or the memory: a 128 MiB
/// one (announced or streamed) keeps local staging under two parts and peak RSS growth under
/// 64 MiB, and loses nothing; checksummed PATCHes of a part each still upload the file.
#[tokio::test]
async fn a_checksummed_patch_on_s3_keeps_disk_and_memory_bounded() {
    let moto = Moto::start();
    let d = Daemon::builder().s3(&moto.endpoint(), "g2-").start().await;
    let vfid = random_vfid();
    crate::s3::create(&d, &vfid).await;
    let size: u64 = 128 << 20;
    let part: u64 = 5 << 20;
    let token = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "big.bin", "size": size}),
        )
        .await;
    let staging = d.state_dir.join("objects/vol1");
    for chunked in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_max_bytes(staging.clone(), stop.clone());
        reset_peak(d.pid());
        let before = peak_rss_kib(d.pid());
        let (status, _) = checksummed_patch(&d, &token, 0, size, chunked).await;
        let grew = peak_rss_kib(d.pid()).saturating_sub(before);
        stop.store(true, Ordering::Relaxed);
        let staged = sampler.join().unwrap();
        assert!(
            matches!(status, Some(413) | None),
            "refused (chunked: {chunked}): {status:?}"
        );
        assert!(staged <= 2 * part, "local staging reached {staged} bytes");
        assert!(grew < 64 * 1024, "peak RSS grew by {grew} KiB");
        assert_eq!(upload_offset(&d, &token).await, 0, "nothing half-kept");
    }

    // A plain PATCH sends parts concurrently: at most `parts-in-flight` (4) of them and the one
    // filling are staged, never the whole body.
    let token = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "plain.bin", "size": size}),
        )
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_max_bytes(staging.clone(), stop.clone());
    let (status, data) = patch(&d, &token, 0, size, true, false).await;
    stop.store(true, Ordering::Relaxed);
    let staged = sampler.join().unwrap();
    assert_eq!(status, Some(204));
    assert!(staged <= 5 * part, "local staging reached {staged} bytes");
    let stored = s3_object(&moto, &bucket_of("g2-", &vfid), "plain.bin").expect("stored");
    assert!(stored == data, "the object is the file uploaded");

    // A file in checksummed PATCHes of one part each: uploaded, whole.
    let total: u64 = 12 << 20;
    let token = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "ok.bin", "size": total}),
        )
        .await;
    let mut whole = Vec::new();
    while (whole.len() as u64) < total {
        let off = whole.len() as u64;
        let (status, data) = checksummed_patch(&d, &token, off, part.min(total - off), false).await;
        assert_eq!(status, Some(204), "at {off}");
        whole.extend_from_slice(&data);
    }
    let stored = s3_object(&moto, &bucket_of("g2-", &vfid), "ok.bin").expect("stored");
    assert!(stored == whole, "the object is the file uploaded");
}

/// `storage-agent config check` of a file with one object volume; its exit code and output.
fn check_volume(dir: &std::path::Path, volume: &str) -> (i32, String) {
    let path = dir.join("check.toml");
    let state = dir.join("state");
    std::fs::write(
        &path,
        format!("[storage-agent]\nstate-dir = {state:?}\n\n[volume.v]\n{volume}"),
    )
    .unwrap();
    let out = std::process::Command::new(crate::common::bin())
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// G1: `hand-out-credentials` is refused wherever nothing narrower than the volume's own keys or
/// a shared container can be handed out, and says why.
#[test]
fn credentials_wider_than_a_vfolder_are_refused_at_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = "backend = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nregion = \"us-east-1\"\n\
              access-key = \"AK\"\nsecret-key = \"SK\"\n";
    let azure = format!(
        "backend = \"azure-blob\"\naccount = \"devstoreaccount1\"\naccount-key = {:?}\n\
         endpoint = \"http://127.0.0.1:9/devstoreaccount1\"\n",
        crate::common::azurite::KEY
    );
    for (volume, says) in [
        (
            format!("{s3}hand-out-credentials = true\n"),
            "every vfolder",
        ),
        (
            format!(
                "{azure}layout = \"prefix-per-vfolder\"\ncontainer = \"shared\"\nhand-out-credentials = true\n"
            ),
            "holds every vfolder",
        ),
        (
            "backend = \"azure-blob\"\naccount = \"devstoreaccount1\"\nsas = \"sv=x&sig=y\"\n\
             endpoint = \"http://127.0.0.1:9/devstoreaccount1\"\nhand-out-credentials = true\n"
                .to_string(),
            "account-key",
        ),
        (
            format!("{azure}hand-out-credentials = true\ncredential-expiry = \"30d\"\n"),
            "credential-expiry",
        ),
    ] {
        let (code, text) = check_volume(dir.path(), &volume);
        assert_eq!(code, 2, "refused:\n{volume}\n{text}");
        assert!(
            text.contains("hand-out-credentials") || text.contains("credential-expiry"),
            "{text}"
        );
        assert!(text.contains(says), "says why ({says}): {text}");
    }
    // A container per vfolder signs a SAS for exactly one vfolder: accepted.
    let (code, text) = check_volume(dir.path(), &format!("{azure}hand-out-credentials = true\n"));
    assert_eq!(code, 0, "{text}");
}

/// G1: what `/folder/mount` hands out on Azure reaches its one vfolder, in its mode, and never
/// carries the account key.
#[tokio::test]
async fn mount_credentials_reach_one_vfolder_in_its_mode() {
    use crate::common::azurite::{Azurite, KEY};
    let az = Azurite::start();
    let d = Daemon::builder()
        .azure(&az.endpoint(), "g1-")
        .set("volume.vol1.hand-out-credentials", true)
        .set("volume.vol1.credential-expiry", "1h")
        .start()
        .await;
    let mine = random_vfid();
    let theirs = random_vfid();
    crate::s3::create(&d, &mine).await;
    crate::s3::create(&d, &theirs).await;
    az.py("svc.create_container('g1-external').upload_blob('keep.txt', b'keep')");
    let ro = random_vfid();
    let r = d
        .mgr(
            "POST",
            "/folder/register",
            json!({"volume": "vol1", "vfid": ro, "bucket": "g1-external", "read_only": true}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());

    let mount_sas = |vfid: String| {
        let d = &d;
        async move {
            let r = d
                .mgr(
                    "GET",
                    "/folder/mount",
                    json!({"volume": "vol1", "vfid": vfid}),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(
                !r.text().contains(KEY),
                "the account key is never handed out"
            );
            r.json()["remote"]["credentials"]["sas_url"]
                .as_str()
                .expect("a SAS")
                .to_string()
        }
    };
    let try_write = |url: &str, container: &str| {
        az.py(&format!(
            "u = {url:?}.split('?')\n\
             u = u[0].rsplit('/', 1)[0] + '/' + {container:?} + '?' + u[1]\n\
             try:\n    ContainerClient.from_container_url(u).upload_blob('planted.txt', b'x', overwrite=True)\n    print('written')\n\
             except Exception as e:\n    print('refused', type(e).__name__)"
        ))
    };
    let sas = mount_sas(mine.clone()).await;
    assert!(sas.contains("sr=c"), "a container SAS: {sas}");
    let expires = sas
        .split('&')
        .find_map(|kv| kv.strip_prefix("se="))
        .map(|v| v.replace("%3A", ":"))
        .expect("an expiry");
    let left = chrono::DateTime::parse_from_rfc3339(&expires)
        .unwrap()
        .signed_duration_since(chrono::Utc::now());
    assert!(
        left <= chrono::Duration::minutes(61),
        "credential-expiry: {left}"
    );
    let own = bucket_of("g1-", &mine);
    let other = bucket_of("g1-", &theirs);
    assert!(try_write(&sas, &own).starts_with("written"));
    assert!(
        try_write(&sas, &other).starts_with("refused"),
        "another vfolder's container"
    );
    let ro_sas = mount_sas(ro).await;
    assert!(
        try_write(&ro_sas, "g1-external").starts_with("refused"),
        "a read-only vfolder's SAS cannot write"
    );
}

/// G3: registration never hands over a bucket (or prefix) of another vfolder, or the buckets the
/// layout names for its own vfolders.
#[tokio::test]
async fn registering_someone_elses_bucket_is_refused() {
    let moto = Moto::start();
    let d = Daemon::builder().s3(&moto.endpoint(), "g3-").start().await;
    let victim = random_vfid();
    crate::s3::create(&d, &victim).await;
    let victim_bucket = bucket_of("g3-", &victim);
    // A bucket named as the layout names vfolders' buckets, made behind our back.
    let lookalike = format!("g3-{}", uuid::Uuid::new_v4().simple());
    moto.boto(&format!(
        "s3.create_bucket(Bucket={lookalike:?})\ns3.create_bucket(Bucket='g3ext')"
    ));
    let register = |bucket: &str, prefix: &str| {
        let body =
            json!({"volume": "vol1", "vfid": random_vfid(), "bucket": bucket, "prefix": prefix});
        let d = &d;
        async move { d.mgr("POST", "/folder/register", body).await }
    };
    for (bucket, prefix) in [
        (victim_bucket.as_str(), ""),
        (victim_bucket.as_str(), "x"),
        (lookalike.as_str(), ""),
    ] {
        let p = register(bucket, prefix).await.problem(400);
        assert!(
            p["msg"]
                .as_str()
                .unwrap_or("")
                .contains("cannot be registered"),
            "{bucket}: {p}"
        );
    }
    assert_eq!(register("g3ext", "team/a").await.status, 204);
    for prefix in ["team/a/b", "team", "", "team/a/"] {
        let p = register("g3ext", prefix).await.problem(400);
        assert!(
            p["msg"].as_str().unwrap_or("").contains("overlap"),
            "{prefix:?}: {p}"
        );
    }
    assert_eq!(
        register("g3ext", "team/ab").await.status,
        204,
        "a sibling prefix is not an overlap"
    );

    // The prefix layout's shared bucket holds every vfolder: never registrable.
    moto.boto("s3.create_bucket(Bucket='g3-shared')");
    let shared = Daemon::builder()
        .s3(&moto.endpoint(), "")
        .set("volume.vol1.layout", "prefix-per-vfolder")
        .set("volume.vol1.bucket", "g3-shared")
        .start()
        .await;
    let body = json!({"volume": "vol1", "vfid": random_vfid(), "bucket": "g3-shared", "prefix": "elsewhere"});
    shared
        .mgr("POST", "/folder/register", body)
        .await
        .problem(400);
}

/// A presigned upload URL for `size` bytes of `relpath`; the problem when refused.
async fn presign_upload(d: &Daemon, vfid: &str, relpath: &str, size: u64) -> crate::common::Resp {
    d.mgr(
        "POST",
        "/folder/file/upload",
        json!({"volume": "vol1", "vfid": vfid, "relpath": relpath, "size": size, "presign": true}),
    )
    .await
}

async fn limit_scope(d: &Daemon, vfid: &str, limit: u64) {
    let qs = vfid.split_once('/').unwrap().0;
    let r = d
        .mgr(
            "PATCH",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": qs, "options": {"limit_bytes": limit}}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
}

/// G6 on S3: a presigned upload counts against the scope when minted, is refused over the
/// quota, and carries the token's length as a signed header (moto does not verify presigned
/// signatures, so the service's refusal of another length is not observable here).
#[tokio::test]
async fn presigned_s3_uploads_are_bound_to_the_token() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .s3(&moto.endpoint(), "g6-")
        .set("volume.vol1.presign", true)
        .start()
        .await;
    let vfid = random_vfid();
    crate::s3::create(&d, &vfid).await;
    limit_scope(&d, &vfid, 1 << 20).await;

    let r = presign_upload(&d, &vfid, "a.bin", 600 << 10).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["presigned_url"].as_str().unwrap().to_string();
    let signed = url
        .split('&')
        .find_map(|kv| {
            kv.split_once("X-Amz-SignedHeaders=")
                .map(|(_, v)| v.to_string())
        })
        .unwrap_or_default();
    assert!(
        signed.contains("content-length"),
        "the length is signed: {url}"
    );
    assert_eq!(
        crate::s3::usage(&d, &vfid, false).await.1,
        600 << 10,
        "charged when minted"
    );
    // A second one for as much would pass the 1 MiB limit: refused, no URL.
    let p = presign_upload(&d, &vfid, "b.bin", 600 << 10).await;
    assert_eq!(p.status, 413, "{}", p.text());
    assert!(p.json().get("presigned_url").is_none());
    // What was really stored counts after a rescan.
    let put = reqwest::Client::new()
        .put(&url)
        .body(vec![7u8; 600 << 10])
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    assert_eq!(crate::s3::usage(&d, &vfid, true).await.1, 600 << 10);
}

/// G6 on Azure: a presigned upload URL creates its one blob once (no overwrite, no blocks,
/// nothing else), and is refused on a scope with a limit, which it could not keep to.
#[tokio::test]
async fn presigned_azure_uploads_create_one_blob_once() {
    use crate::common::azurite::Azurite;
    let az = Azurite::start();
    let d = Daemon::builder()
        .azure(&az.endpoint(), "g6-")
        .set("volume.vol1.presign", true)
        .start()
        .await;
    let vfid = random_vfid();
    crate::s3::create(&d, &vfid).await;
    let r = presign_upload(&d, &vfid, "a.bin", 5).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["presigned_url"].as_str().unwrap().to_string();
    let put = |body: &'static [u8]| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .put(&url)
                .header("x-ms-blob-type", "BlockBlob")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(put(b"first").await, 201, "creates the blob");
    assert_eq!(put(b"again, longer").await, 403, "cannot overwrite it");
    let read = reqwest::get(&url).await.unwrap().status().as_u16();
    assert_eq!(read, 403, "an upload URL does not read");
    let block = reqwest::Client::new()
        .put(format!("{url}&comp=block&blockid=QUFBQQ%3D%3D"))
        .body(vec![0u8; 1024])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(block, 403, "no staged blocks");

    limit_scope(&d, &vfid, 1 << 30).await;
    let p = presign_upload(&d, &vfid, "b.bin", 5).await;
    assert_eq!(p.status, 400, "{}", p.text());
    assert!(p.text().contains("cannot bind"), "{}", p.text());
}

/// G10: one owner's archives, however many tokens it mints, cannot take every archive slot
/// of the node: another user still gets theirs.
#[tokio::test]
async fn one_owner_cannot_hold_every_archive_slot() {
    let d = Daemon::builder()
        .set("storage-agent.max-archives", 4)
        .set("storage-agent.max-archives-per-owner", 2)
        .set("storage-agent.write-idle-timeout", "60s")
        .start()
        .await;
    let (greedy, gpath) = d.create_vfolder().await;
    crate::common::random_file(&gpath.join("big.bin"), 16 << 20, 1);
    let (other, opath) = d.create_vfolder().await;
    std::fs::write(opath.join("mine.txt"), b"mine").unwrap();
    // Four tokens, each for an archive under another name, read by no one.
    let mut stalled = Vec::new();
    for i in 0..4 {
        let t = d
            .token(
                "/folder/file/archive-download-token",
                json!({"volume": "vol1", "virtual_folder_id": greedy, "files": ["big.bin"],
                       "filename": format!("a{i}.zip")}),
            )
            .await;
        let request = format!("GET /download-archive?token={t} HTTP/1.1\r\nHost: x\r\n\r\n");
        stalled.extend(crate::hardening::stalled_readers(
            &d.addrs["client"],
            &request,
            1,
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": other, "relpath": ".", "archive": true}),
        )
        .await;
    let r = d
        .get("client", &format!("/download?token={t}&archive=true"))
        .await;
    assert_eq!(r.status, 200, "another owner gets an archive: {}", r.text());
    assert!(r.body.len() > 4);
    drop(stalled);
}
