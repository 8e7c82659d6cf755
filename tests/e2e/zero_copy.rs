//! Zero-copy downloads (`src/api/zerocopy.rs`): bytes spliced from the page cache are the
//! file's, in every response of a pipelined keep-alive connection (HEAD, 304, ranges,
//! multipart, whole files across chunk boundaries); a file truncated mid-download ends the
//! connection without inventing bytes; TLS and the switch-off get the copying path; small
//! ranges read from a cold, partly cached or warm page cache are the file's bytes too; slow
//! readers and stalled ones (fds held: one pipe per connection).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::common::tools::require;
use crate::common::{Daemon, OUTCOME, random_file};

/// Bytes the daemon has sent by splice so far.
async fn spliced(d: &Daemon) -> u64 {
    let m = d.get("internal", "/metrics").await.text();
    m.lines()
        .find_map(|l| l.strip_prefix("storage_agent_download_spliced_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no spliced-bytes counter in /metrics:\n{m}"))
}

async fn dl_token(d: &Daemon, vfid: &str, relpath: &str) -> String {
    d.token(
        "/folder/file/download",
        json!({"volume": "vol1", "vfid": vfid, "relpath": relpath}),
    )
    .await
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// Reads one HTTP/1.1 response; `bodiless` for HEAD.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, bodiless: bool) -> Reply {
    let mut status_line = String::new();
    r.read_line(&mut status_line).await.unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("status line {status_line:?}"))
        .parse()
        .unwrap();
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = if bodiless || status == 304 {
        0
    } else {
        headers["content-length"].parse().unwrap()
    };
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

#[tokio::test]
async fn pipelined_responses_carry_the_files_bytes() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    // 3.5 MiB: whole downloads cross the 1 MiB chunks of the spliced path.
    let size = 3 * (1 << 20) + (1 << 19) + 17;
    random_file(&path.join("blob.bin"), size, 7);
    let data = std::fs::read(path.join("blob.bin")).unwrap();
    let t = dl_token(&d, &vfid, "blob.bin").await;
    let target = format!("/download?token={t}");
    let etag = d
        .get("client", &target)
        .await
        .header("etag")
        .expect("an ETag");
    let before = spliced(&d).await;

    let requests: Vec<(&str, Vec<String>)> = vec![
        ("HEAD", vec![]),
        ("GET", vec![format!("If-None-Match: {etag}")]),
        ("GET", vec!["Range: bytes=0-9".into()]),
        ("GET", vec!["Range: bytes=0-9,1048570-1348590,-5".into()]),
        ("GET", vec![]),
        ("GET", vec!["Range: bytes=1048570-2097160".into()]),
        ("HEAD", vec!["Range: bytes=5-".into()]),
        ("GET", vec!["Range: bytes=-100".into()]),
        ("GET", vec![]),
    ];
    let mut wire = String::new();
    for (method, extra) in &requests {
        wire.push_str(&format!("{method} {target} HTTP/1.1\r\nHost: x\r\n"));
        for h in extra {
            wire.push_str(h);
            wire.push_str("\r\n");
        }
        wire.push_str("\r\n");
    }
    let tcp = TcpStream::connect(&d.addrs["client"]).await.unwrap();
    let (rd, mut wr) = tcp.into_split();
    // All requests in one write: hyper answers them in order on one connection.
    wr.write_all(wire.as_bytes()).await.unwrap();
    let mut rd = BufReader::new(rd);
    let mut replies = Vec::new();
    for (method, _) in &requests {
        let r = tokio::time::timeout(OUTCOME, read_reply(&mut rd, *method == "HEAD"))
            .await
            .expect("a reply in time");
        replies.push(r);
    }
    let size = size as usize;
    assert_eq!(replies[0].status, 200);
    assert_eq!(replies[0].headers["content-length"], size.to_string());
    assert_eq!(replies[1].status, 304);
    assert_eq!(replies[2].status, 206);
    assert_eq!(replies[2].body, &data[0..10]);
    let multi = &replies[3];
    assert_eq!(multi.status, 206);
    let text = String::from_utf8_lossy(&multi.body).to_string();
    for (a, b) in [(0, 9), (1_048_570, 1_348_590), (size - 5, size - 1)] {
        let head = format!("Content-Range: bytes {a}-{b}/{size}\r\n\r\n");
        let at = multi
            .body
            .windows(head.len())
            .position(|w| w == head.as_bytes())
            .unwrap_or_else(|| panic!("part {a}-{b} in {text:.400}"))
            + head.len();
        assert_eq!(
            &multi.body[at..at + b - a + 1],
            &data[a..=b],
            "part {a}-{b}"
        );
    }
    assert_eq!(replies[4].status, 200);
    assert!(replies[4].body == data, "whole file, 1st time");
    assert_eq!(replies[5].status, 206);
    assert!(replies[5].body == data[1_048_570..=2_097_160]);
    assert_eq!(replies[6].status, 206);
    assert_eq!(replies[7].body, &data[size - 100..]);
    assert!(replies[8].body == data, "whole file, 2nd time");

    // Bodies of 256 KiB and more are spliced (the multipart's middle part among them, between
    // copied part headers); smaller ones are copied.
    let sent = (300_021 + size + (2_097_160 - 1_048_570 + 1) + size) as u64;
    assert_eq!(
        spliced(&d).await - before,
        sent,
        "every large body's bytes went out by splice, none twice"
    );
}

#[tokio::test]
async fn a_file_truncated_mid_download_ends_the_connection_short() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let size: u64 = 64 << 20;
    random_file(&path.join("big.bin"), size, 11);
    let data = std::fs::read(path.join("big.bin")).unwrap();
    let t = dl_token(&d, &vfid, "big.bin").await;
    let tcp = TcpStream::connect(&d.addrs["client"]).await.unwrap();
    let (rd, mut wr) = tcp.into_split();
    wr.write_all(format!("GET /download?token={t} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        rd.read_line(&mut line).await.unwrap();
    }
    // Read a little, then cut the file short while the rest is still to be sent.
    let mut got = vec![0u8; 1 << 20];
    rd.read_exact(&mut got).await.unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path.join("big.bin"))
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(OUTCOME, rd.read_to_end(&mut rest))
        .await
        .expect("the connection ends, it does not hang");
    // A reset is as good as a close here; what matters is what arrived before it.
    let _ = end;
    got.extend_from_slice(&rest);
    assert!(
        (got.len() as u64) < size,
        "the response ends short of its Content-Length ({} bytes arrived)",
        got.len()
    );
    assert!(
        got[..] == data[..got.len()],
        "what arrived is the file's own beginning"
    );
    // The daemon serves on.
    let t = dl_token(&d, &vfid, "big.bin").await;
    let r = d.get("client", &format!("/download?token={t}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 2 << 20);
}

fn curl_sha(url: &str, extra: &[&str]) -> String {
    require("curl", "apt-get install curl");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -sSf {} '{url}' | sha256sum",
            extra
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn sha_of(p: &Path) -> String {
    crate::common::sha256_file(p)
}

/// Open fds of the daemon.
fn fds(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count()
}

#[tokio::test]
async fn many_spliced_parts_and_readers_that_stall_hold_one_pipe_per_connection() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let size: usize = 4 << 20;
    random_file(&path.join("m.bin"), size as u64, 5);
    let data = std::fs::read(path.join("m.bin")).unwrap();
    let t = dl_token(&d, &vfid, "m.bin").await;
    // Ten parts of 300 000 bytes: every one spliced.
    let parts: Vec<(usize, usize)> = (0..10)
        .map(|i| (i * 400_000, i * 400_000 + 299_999))
        .collect();
    let spec = parts
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",");
    let request =
        format!("GET /download?token={t} HTTP/1.1\r\nHost: x\r\nRange: bytes={spec}\r\n\r\n");

    // One reader takes it all: every part is the file's.
    let tcp = TcpStream::connect(&d.addrs["client"]).await.unwrap();
    let (rd, mut wr) = tcp.into_split();
    wr.write_all(request.as_bytes()).await.unwrap();
    let mut rd = BufReader::new(rd);
    let r = tokio::time::timeout(OUTCOME, read_reply(&mut rd, false))
        .await
        .expect("a reply in time");
    assert_eq!(r.status, 206);
    for (a, b) in &parts {
        let head = format!("Content-Range: bytes {a}-{b}/{size}\r\n\r\n");
        let at = r
            .body
            .windows(head.len())
            .position(|w| w == head.as_bytes())
            .unwrap_or_else(|| panic!("part {a}-{b}"))
            + head.len();
        assert!(r.body[at..=at + b - a] == data[*a..=*b], "part {a}-{b}");
    }

    // Twenty clients ask and never read: each connection holds its socket, the open file and
    // one pipe, not a pipe per part.
    let before = fds(&d);
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(&d.addrs["client"]).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        stalled.push(tcp);
    }
    // Wait until all twenty are being answered (their files are open).
    let deadline = std::time::Instant::now() + OUTCOME;
    while fds(&d) < before + 40 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let during = fds(&d);
    assert!(
        during <= before + 20 * 5,
        "{during} fds with 20 stalled readers (from {before}): more than socket, file and one pipe each"
    );
    drop(stalled);
}

#[tokio::test]
async fn a_slow_reader_gets_every_byte() {
    // A small receive buffer and paced reads: the socket fills, splices come back short and
    // the writer waits for room again and again.
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let size: usize = 3 << 20;
    random_file(&path.join("s.bin"), size as u64, 9);
    let data = std::fs::read(path.join("s.bin")).unwrap();
    let t = dl_token(&d, &vfid, "s.bin").await;
    let before = spliced(&d).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock
        .connect(d.addrs["client"].parse().unwrap())
        .await
        .unwrap();
    let (rd, mut wr) = tcp.into_split();
    wr.write_all(format!("GET /download?token={t} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut rd = BufReader::with_capacity(8192, rd);
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        rd.read_line(&mut line).await.unwrap();
    }
    let mut got = Vec::with_capacity(size);
    let mut buf = vec![0u8; 16 << 10];
    let deadline = std::time::Instant::now() + OUTCOME;
    while got.len() < size {
        assert!(
            std::time::Instant::now() < deadline,
            "{} bytes in time",
            got.len()
        );
        let n = rd.read(&mut buf).await.unwrap();
        assert!(n > 0, "early end at {}", got.len());
        got.extend_from_slice(&buf[..n]);
        if got.len() % (64 << 10) < n {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
    assert!(got == data, "every byte, in order");
    assert_eq!(spliced(&d).await - before, size as u64);
}

#[tokio::test]
async fn tls_h2_and_the_switch_off_copy() {
    // TLS on the client API: bytes are encrypted in the process, so they are copied.
    let d = Daemon::builder()
        .set("api.client.ssl-enabled", true)
        .start()
        .await;
    let (vfid, path) = d.create_vfolder().await;
    random_file(&path.join("f.bin"), 5 << 20, 3);
    let t = dl_token(&d, &vfid, "f.bin").await;
    let ca = d.state_dir.join("tls/ca.crt");
    let port = d.addrs["client"].rsplit(':').next().unwrap().to_string();
    let url = format!("https://127.0.0.1:{port}/download?token={t}");
    assert_eq!(
        curl_sha(&url, &["--cacert", ca.to_str().unwrap()]),
        sha_of(&path.join("f.bin"))
    );
    assert_eq!(spliced(&d).await, 0, "nothing spliced over TLS");

    // HTTP/2 on the plain port (prior knowledge): framed by hyper, so copied.
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    random_file(&path.join("f.bin"), 5 << 20, 5);
    let t = dl_token(&d, &vfid, "f.bin").await;
    let url = d.url("client", &format!("/download?token={t}"));
    assert_eq!(
        curl_sha(&url, &["--http2-prior-knowledge"]),
        sha_of(&path.join("f.bin"))
    );
    assert_eq!(spliced(&d).await, 0, "nothing spliced over HTTP/2");
    assert_eq!(curl_sha(&url, &["--http1.0"]), sha_of(&path.join("f.bin")));
    assert_eq!(spliced(&d).await, 5 << 20, "HTTP/1.0 is spliced");

    let d = Daemon::builder()
        .set("storage-agent.zero-copy-downloads", false)
        .start()
        .await;
    let (vfid, path) = d.create_vfolder().await;
    random_file(&path.join("f.bin"), 5 << 20, 4);
    let t = dl_token(&d, &vfid, "f.bin").await;
    let url = d.url("client", &format!("/download?token={t}"));
    assert_eq!(curl_sha(&url, &[]), sha_of(&path.join("f.bin")));
    assert_eq!(spliced(&d).await, 0, "switched off: copied");
}

/// Drops `p`'s pages from the page cache, so the next read has to wait for the disk.
fn evict(p: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).unwrap();
    f.sync_all().unwrap();
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

#[tokio::test]
async fn cold_and_warm_reads_serve_the_same_bytes() {
    // Small ranges are read from the page cache without a blocking hand-over when it holds
    // them, and by a blocking read when it does not (or holds only part); large bodies are
    // spliced. Every mix gives the file's bytes.
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let size: usize = 8 << 20;
    random_file(&path.join("c.bin"), size as u64, 21);
    let data = std::fs::read(path.join("c.bin")).unwrap();
    let t = dl_token(&d, &vfid, "c.bin").await;
    let url = d.url("client", &format!("/download?token={t}"));
    let http = reqwest::Client::new();
    let get = |range: Option<String>| {
        let mut r = http.get(&url);
        if let Some(range) = range {
            r = r.header("Range", range);
        }
        async move {
            let r = r.send().await.unwrap();
            r.bytes().await.unwrap().to_vec()
        }
    };
    for (a, b) in [
        (0usize, 65_535usize),
        (4_000_000, 4_100_000),
        (size - 300_000, size - 1),
    ] {
        evict(&path.join("c.bin"));
        // Cold, then part of it cached (the first half read), then warm.
        assert!(
            get(Some(format!("bytes={a}-{b}"))).await == data[a..=b],
            "cold {a}-{b}"
        );
        evict(&path.join("c.bin"));
        let mid = (a + b) / 2;
        assert!(get(Some(format!("bytes={a}-{mid}"))).await == data[a..=mid]);
        assert!(
            get(Some(format!("bytes={a}-{b}"))).await == data[a..=b],
            "partly cached {a}-{b}"
        );
        assert!(
            get(Some(format!("bytes={a}-{b}"))).await == data[a..=b],
            "warm {a}-{b}"
        );
    }
    evict(&path.join("c.bin"));
    assert!(get(None).await == data, "whole file, cold");
    assert!(get(None).await == data, "whole file, warm");
}
