//! The HTTP side of the benchmarks: tus uploads, small files, manager API latency. Every call is
//! a plain storage-proxy API call, so the same code measures us and the Python proxy.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{arg, report};

fn has(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

pub async fn upload(args: &[String]) {
    let url = arg(args, "--url");
    let file = arg(args, "--file");
    let chunk: u64 = arg(args, "--chunk").parse().expect("chunk");
    let size = std::fs::metadata(&file).expect("file").len();
    let chunk = if chunk == 0 { size } else { chunk };
    // `--checksum`: each PATCH carries `Upload-Checksum: sha1 …` (tus checksum extension),
    // computed before the clock starts.
    let checksums: Vec<String> = if has(args, "--checksum") {
        use base64::Engine;
        use sha1::Digest;
        let data = std::fs::read(&file).expect("read");
        data.chunks(chunk as usize)
            .map(|c| {
                let sum = base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(c));
                format!("sha1 {sum}")
            })
            .collect()
    } else {
        vec![]
    };
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let url = if has(args, "--create") {
        // A tus server's own creation: POST with Upload-Length, then PATCH its Location.
        let r = http
            .post(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", size.to_string())
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 201, "creation: {}", r.status());
        let loc = r.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        reqwest::Url::parse(&url)
            .and_then(|u| u.join(&loc))
            .expect("location URL")
            .to_string()
    } else {
        url
    };
    let mut off = 0u64;
    while off < size {
        let len = chunk.min(size - off);
        // Streamed from the file in 1 MiB reads, so a single 1 GiB PATCH stays small here too.
        let f = tokio::fs::File::open(&file).await.expect("open");
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut f = f;
        f.seek(std::io::SeekFrom::Start(off)).await.expect("seek");
        let body = tokio_util::io::ReaderStream::with_capacity(f.take(len), 1 << 20);
        let mut req = http
            .patch(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", off.to_string())
            .header("Content-Length", len.to_string());
        if let Some(sum) = checksums.get((off / chunk) as usize) {
            req = req.header("Upload-Checksum", sum);
        }
        let r = req
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .expect("PATCH");
        assert_eq!(r.status(), 204, "PATCH at {off}: {}", r.status());
        off += len;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "upload: bytes={size} chunk={chunk} secs={secs:.3} MBps={:.1}",
        size as f64 / secs / 1e6
    );
}

async fn mgr(
    http: &reqwest::Client,
    manager: &str,
    secret: &str,
    path: &str,
    body: serde_json::Value,
) -> reqwest::Response {
    http.post(format!("http://{manager}{path}"))
        .header("X-BackendAI-Storage-Auth-Token", secret)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Small files: mint + one PATCH each, from `concurrency` clients with their own keep-alive
/// connections.
pub async fn smallfiles(args: &[String]) {
    let manager = arg(args, "--manager");
    let client = arg(args, "--client");
    let secret = arg(args, "--secret");
    let volume = arg(args, "--volume");
    let vfid = arg(args, "--vfid");
    let n: usize = arg(args, "--n").parse().expect("n");
    let conc: usize = arg(args, "--concurrency").parse().expect("concurrency");
    let size: usize = arg(args, "--size").parse().expect("size");
    let data = bytes::Bytes::from(vec![0x5au8; size]);
    let per = n.div_ceil(conc);
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..conc {
        let (manager, client, secret, volume, vfid, data) = (
            manager.clone(),
            client.clone(),
            secret.clone(),
            volume.clone(),
            vfid.clone(),
            data.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut mints, mut patches, mut totals) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..per {
                let t0 = Instant::now();
                let r = mgr(
                    &http,
                    &manager,
                    &secret,
                    "/folder/file/upload",
                    json!({"volume": volume, "vfid": vfid, "relpath": format!("s{t}/f{i}.bin"), "size": data.len()}),
                )
                .await;
                assert_eq!(r.status(), 200, "mint: {}", r.status());
                let v: serde_json::Value = r.json().await.expect("token");
                let token = v["token"].as_str().expect("token").to_string();
                let t1 = Instant::now();
                let r = http
                    .patch(format!("http://{client}/upload?token={token}"))
                    .header("Tus-Resumable", "1.0.0")
                    .header("Content-Type", "application/offset+octet-stream")
                    .header("Upload-Offset", "0")
                    .body(data.clone())
                    .send()
                    .await
                    .expect("PATCH");
                assert_eq!(r.status(), 204, "PATCH: {}", r.status());
                let t2 = Instant::now();
                mints.push(t1 - t0);
                patches.push(t2 - t1);
                totals.push(t2 - t0);
            }
            (mints, patches, totals)
        }));
    }
    let (mut mints, mut patches, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for t in tasks {
        let (m, p, a) = t.await.expect("task");
        mints.extend(m);
        patches.extend(p);
        totals.extend(a);
    }
    let wall = wall.elapsed();
    report("files", totals, wall);
    report("mint", mints, wall);
    report("patch", patches, wall);
}

/// Manager API latency: creates, mkdirs, listings.
pub async fn mgrlat(args: &[String]) {
    let manager = arg(args, "--manager");
    let secret = arg(args, "--secret");
    let volume = arg(args, "--volume");
    let n: usize = arg(args, "--n").parse().expect("n");
    let http = reqwest::Client::new();
    let qs = format!("user:{}", uuid::Uuid::new_v4());
    let time = |d: Duration, v: &mut Vec<Duration>| v.push(d);
    let mut vfids = Vec::new();
    let mut lat = Vec::new();
    let wall = Instant::now();
    for _ in 0..n {
        let vfid = format!("{qs}/{}", uuid::Uuid::new_v4().simple());
        let t = Instant::now();
        let r = mgr(
            &http,
            &manager,
            &secret,
            "/folder/create",
            json!({"volume": volume, "vfid": vfid}),
        )
        .await;
        assert!(r.status().is_success(), "create: {}", r.status());
        time(t.elapsed(), &mut lat);
        vfids.push(vfid);
    }
    report("create", lat, wall.elapsed());
    let vfid = &vfids[0];
    let mut lat = Vec::new();
    let wall = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let r = mgr(
            &http,
            &manager,
            &secret,
            "/folder/file/mkdir",
            json!({"volume": volume, "vfid": vfid, "relpath": format!("d{i}")}),
        )
        .await;
        assert!(r.status().is_success(), "mkdir: {}", r.status());
        time(t.elapsed(), &mut lat);
    }
    report("mkdir", lat, wall.elapsed());
    let mut lat = Vec::new();
    let wall = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let r = mgr(
            &http,
            &manager,
            &secret,
            "/folder/file/list",
            json!({"volume": volume, "vfid": vfid, "relpath": "."}),
        )
        .await;
        assert!(r.status().is_success(), "list: {}", r.status());
        let _ = r.bytes().await;
        time(t.elapsed(), &mut lat);
    }
    report("list", lat, wall.elapsed());
}

/// `n` GETs of random `len`-byte ranges of a `size`-byte file at `url`, over one keep-alive
/// connection: requests/s and latency.
pub async fn ranges(args: &[String]) {
    let url = arg(args, "--url");
    let size: u64 = arg(args, "--size").parse().expect("size");
    let n: usize = arg(args, "--n").parse().expect("n");
    let len: u64 = arg(args, "--len").parse().expect("len");
    let http = reqwest::Client::new();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut lat = Vec::with_capacity(n);
    let wall = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let start = x % (size - len);
        let t = Instant::now();
        let r = http
            .get(&url)
            .header("Range", format!("bytes={start}-{}", start + len - 1))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 206, "range: {}", r.status());
        let body = r.bytes().await.expect("body");
        assert_eq!(body.len() as u64, len);
        lat.push(t.elapsed());
    }
    report("ranges", lat, wall.elapsed());
}

/// `n` uploads of `file` at once, each a mint and one PATCH (or, with --tus-endpoint, a tus
/// creation and one PATCH): aggregate MB/s.
pub async fn concurrent_uploads(args: &[String]) {
    let file = arg(args, "--file");
    let n: usize = arg(args, "--n").parse().expect("n");
    let size = std::fs::metadata(&file).expect("file").len();
    let tus = args
        .iter()
        .position(|a| a == "--tus-endpoint")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let http = reqwest::Client::new();
    let mut urls = Vec::new();
    for i in 0..n {
        let url = match &tus {
            Some(endpoint) => {
                let r = http
                    .post(endpoint)
                    .header("Tus-Resumable", "1.0.0")
                    .header("Upload-Length", size.to_string())
                    .send()
                    .await
                    .expect("POST");
                let loc = r.headers()["location"]
                    .to_str()
                    .expect("location")
                    .to_string();
                reqwest::Url::parse(endpoint)
                    .and_then(|u| u.join(&loc))
                    .expect("URL")
                    .to_string()
            }
            None => {
                let r = mgr(
                    &http,
                    &arg(args, "--manager"),
                    &arg(args, "--secret"),
                    "/folder/file/upload",
                    json!({"volume": arg(args, "--volume"), "vfid": arg(args, "--vfid"), "relpath": format!("c{i}.bin"), "size": size}),
                )
                .await;
                let v: serde_json::Value = r.json().await.expect("token");
                format!(
                    "http://{}/upload?token={}",
                    arg(args, "--client"),
                    v["token"].as_str().expect("token")
                )
            }
        };
        urls.push(url);
    }
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for url in urls {
        let (http, file) = (http.clone(), file.clone());
        tasks.push(tokio::spawn(async move {
            let f = tokio::fs::File::open(&file).await.expect("open");
            let body = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20);
            let r = http
                .patch(&url)
                .header("Tus-Resumable", "1.0.0")
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", "0")
                .header("Content-Length", size.to_string())
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
                .expect("PATCH");
            assert_eq!(r.status(), 204, "PATCH: {}", r.status());
        }));
    }
    for t in tasks {
        t.await.expect("upload");
    }
    let secs = wall.elapsed().as_secs_f64();
    println!(
        "concurrent: n={n} bytes={} secs={secs:.3} MBps={:.1}",
        size * n as u64,
        (size * n as u64) as f64 / secs / 1e6
    );
}
