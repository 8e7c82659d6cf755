//! Downloads with curl (every range case, conditional requests, Content-Disposition) and zip
//! archives checked with Python's zipfile, including zip64 past 4 GiB.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use storage_agent::api::token::{ArchiveClaims, DownloadClaims, DownloadOp, Tokens};

use crate::common::tools::require;
use crate::common::{Daemon, JWT_SECRET, run};

struct Curl {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Curl {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Runs curl and parses the final response's status line and headers.
fn curl(url: &str, args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().unwrap();
    curl_to(url, args, &dir.path().join("b"))
}

/// As `curl`, keeping the body in `body`.
fn curl_to(url: &str, args: &[&str], body: &Path) -> Curl {
    require("curl", "apt-get install curl");
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("h");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-g", "-D"]).arg(&hdr).arg("-o").arg(body);
    cmd.args(args).arg(url);
    run(&mut cmd);
    let text = std::fs::read_to_string(&hdr).unwrap();
    // The last response block (after a possible "100 Continue").
    let block = text
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap();
    let mut lines = block.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Curl {
        status,
        headers,
        body: if std::fs::metadata(body)
            .map(|m| m.len() < (64 << 20))
            .unwrap_or(false)
        {
            std::fs::read(body).unwrap_or_default()
        } else {
            Vec::new()
        },
    }
}

async fn dl_token(d: &Daemon, vfid: &str, relpath: &str) -> String {
    d.token(
        "/folder/file/download",
        json!({"volume": "vol1", "vfid": vfid, "relpath": relpath}),
    )
    .await
}

#[tokio::test]
async fn ranges_and_conditionals_with_curl() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::create_dir(path.join("dl")).unwrap();
    std::fs::write(path.join("dl/blob.bin"), &data).unwrap();
    let t = dl_token(&d, &vfid, "dl/blob.bin").await;
    let url = d.url("client", &format!("/download?token={t}"));

    let r = curl(&url, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("content-length"), Some("1000000"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment;filename=\"blob.bin\"; filename*=UTF-8''blob.bin")
    );
    let etag = r.header("etag").unwrap().to_string();
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong ETag: {etag}"
    );
    let lm = r.header("last-modified").unwrap().to_string();
    assert!(r.header("cache-control").is_none());

    // HEAD: the same headers, no body.
    let r = curl(&url, &["-I"]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1000000"));
    assert_eq!(r.header("etag"), Some(etag.as_str()));

    let part = |a: usize, b: usize| data[a..=b].to_vec();
    for (range, from, to) in [
        ("0-99", 0, 99),
        ("999000-", 999_000, 999_999),
        ("-500", 999_500, 999_999),
        ("999990-2000000", 999_990, 999_999),
    ] {
        let r = curl(&url, &["-r", range]);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range").unwrap(),
            format!("bytes {from}-{to}/1000000"),
            "{range}"
        );
        assert_eq!(r.body, part(from, to), "{range}");
    }
    for bad in ["1000010-", "bytes=abc", "5-1"] {
        let hdr = format!(
            "Range: {}",
            if bad.starts_with("bytes") {
                bad.to_string()
            } else {
                format!("bytes={bad}")
            }
        );
        let r = curl(&url, &["-H", &hdr]);
        assert_eq!(r.status, 416, "{bad}");
        assert_eq!(r.header("content-range"), Some("bytes */1000000"), "{bad}");
    }

    // Several ranges: multipart/byteranges, every part checked.
    let r = curl(&url, &["-r", "0-9,100-109,-5"]);
    assert_eq!(r.status, 206);
    let ct = r.header("content-type").unwrap();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
    assert_eq!(
        r.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        r.body.len()
    );
    let body = r.body.clone();
    let sep = format!("--{boundary}");
    let text = unsafe { String::from_utf8_unchecked(body) };
    let parts: Vec<&str> = text
        .split(&sep)
        .filter(|p| p.contains("Content-Range"))
        .collect();
    assert_eq!(parts.len(), 3);
    for (p, (a, b)) in parts
        .iter()
        .zip([(0usize, 9usize), (100, 109), (999_995, 999_999)])
    {
        assert!(
            p.contains(&format!("Content-Range: bytes {a}-{b}/1000000")),
            "{p}"
        );
        let payload = p.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(&payload.as_bytes()[..b - a + 1], &data[a..=b]);
    }

    // Conditional requests.
    let r = curl(&url, &["-H", &format!("If-None-Match: {etag}")]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = curl(&url, &["-H", "If-None-Match: \"other\""]);
    assert_eq!(r.status, 200);
    let r = curl(&url, &["-H", &format!("If-Modified-Since: {lm}")]);
    assert_eq!(r.status, 304);
    let r = curl(&url, &["-r", "0-9", "-H", &format!("If-Range: {etag}")]);
    assert_eq!(r.status, 206);
    let r = curl(&url, &["-r", "0-9", "-H", "If-Range: \"stale-etag\""]);
    assert_eq!(r.status, 200, "a stale validator gets the whole file");
    assert_eq!(r.body.len(), 1_000_000);
    let r = curl(&url, &["-r", "0-9", "-H", &format!("If-Range: {lm}")]);
    assert_eq!(r.status, 206);
    let r = curl(
        &url,
        &["-r", "0-9", "-H", "If-Range: Thu, 01 Jan 1998 00:00:00 GMT"],
    );
    assert_eq!(r.status, 200);
    let r = curl(&url, &["-H", "If-Match: \"nope\""]);
    assert_eq!(r.status, 412);

    let r = curl(&format!("{url}&no_cache=true"), &[]);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // A token is reusable until it expires (resumed downloads rely on it).
    let r = curl(&url, &["-r", "500-"]);
    assert_eq!(r.status, 206);

    // The file changes: the old ETag no longer matches and If-Range falls back to 200.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(path.join("dl/blob.bin"), b"changed").unwrap();
    let r = curl(&url, &["-r", "0-2", "-H", &format!("If-Range: {etag}")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"changed");
}

/// Tokens are remembered once verified (a player's many ranges pay the HMAC once), but never
/// past their expiry: the token that served ranges is refused as expired once its time is up.
#[tokio::test]
async fn a_remembered_token_still_expires() {
    let d = Daemon::builder()
        .set("storage-proxy.session-expire", "15s")
        .start()
        .await;
    let (vfid, path) = d.create_vfolder().await;
    std::fs::write(path.join("r.bin"), vec![5u8; 4096]).unwrap();
    let t = dl_token(&d, &vfid, "r.bin").await;
    let exp = Tokens::new(JWT_SECRET, Duration::from_secs(60))
        .decode::<DownloadClaims>(&t)
        .unwrap()
        .exp;
    let url = d.url("client", &format!("/download?token={t}"));
    for range in ["0-9", "100-199", "4000-"] {
        assert_eq!(curl(&url, &["-r", range]).status, 206, "{range}");
    }
    // Expiry is in whole seconds: wait for the refusal, generously bounded.
    let refused = (0..400).find_map(|_| {
        let started = storage_agent::state::now_unix();
        let r = curl(&url, &["-r", "0-9"]);
        if r.status == 206 {
            // Accepted only while the whole second it was asked in is before the expiry.
            assert!(started < exp, "accepted at {started}, expired at {exp}");
            std::thread::sleep(Duration::from_millis(100));
            None
        } else {
            Some(r)
        }
    });
    let r = refused.expect("the token was still accepted 40 s after it was minted to live 15 s");
    // /download refuses an expired token as a bad parameter, as Backend.AI does.
    assert_eq!(r.status, 400);
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert!(body.contains("expired"), "{body}");
}

#[tokio::test]
async fn names_errors_and_cors() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let name = "데이터 résumé \"q\".txt";
    std::fs::write(path.join(name), b"x").unwrap();
    let t = dl_token(&d, &vfid, name).await;
    let r = curl(
        &d.url("client", &format!("/download?token={t}")),
        &["-H", "Origin: https://webui.example"],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition").unwrap(),
        "attachment;filename=\" rsum \\\"q\\\".txt\"; filename*=UTF-8''%EB%8D%B0%EC%9D%B4%ED%84%B0%20r%C3%A9sum%C3%A9%20%22q%22.txt"
    );
    // Any origin may read a download (the URL token is the authorization), never with
    // credentials (review F14).
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert!(
        r.header("access-control-expose-headers")
            .unwrap()
            .contains("Content-Disposition")
    );
    let r = curl(
        &d.url("client", &format!("/download?token={t}")),
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: https://webui.example",
            "-H",
            "Access-Control-Request-Method: GET",
        ],
    );
    assert_eq!(r.status, 200);
    assert!(
        r.header("access-control-allow-methods")
            .unwrap()
            .contains("GET")
    );
    let r = curl(&d.url("client", &format!("/download?token={t}")), &[]);
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "no Origin, no CORS headers"
    );

    // Missing file → 404 problem; directory without archive → 400; bad tokens → 400.
    let t = dl_token(&d, &vfid, "nope.bin").await;
    let r = d.get("client", &format!("/download?token={t}")).await;
    assert_eq!(
        r.problem(404)["type"],
        "https://api.backend.ai/probs/storage/file-not-found"
    );
    std::fs::create_dir(path.join("adir")).unwrap();
    let t = dl_token(&d, &vfid, "adir").await;
    let r = d.get("client", &format!("/download?token={t}")).await;
    r.problem(400);
    for bad in ["garbage", ""] {
        let r = d.get("client", &format!("/download?token={bad}")).await;
        assert!(r.problem(400)["data"]["token"].is_string());
    }
    let r = d.get("client", "/download").await;
    r.problem(400);
}

fn python_zip_listing(zip: &Path) -> serde_json::Value {
    require("python3", "apt-get install python3");
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import json, sys, zipfile, hashlib
z = zipfile.ZipFile(sys.argv[1])
bad = z.testzip()
entries = []
for i in z.infolist():
    data = b"" if i.is_dir() else z.read(i)
    entries.append({"name": i.filename, "size": i.file_size, "dir": i.is_dir(),
                    "mode": (i.external_attr >> 16), "sha": hashlib.sha256(data).hexdigest(),
                    "data": data.decode("latin-1") if i.file_size < 64 else None})
print(json.dumps({"bad": bad, "entries": entries}))
"#,
        )
        .arg(zip));
    serde_json::from_str(&out).unwrap()
}

fn entry<'a>(listing: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {listing}"))
}

#[tokio::test]
async fn directory_and_selection_archives() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    std::fs::create_dir_all(path.join("zipdir/sub")).unwrap();
    std::fs::create_dir_all(path.join("zipdir/emptydir")).unwrap();
    std::fs::write(path.join("zipdir/a.txt"), b"alpha").unwrap();
    std::fs::write(path.join("zipdir/sub/b.txt"), b"beta").unwrap();
    std::fs::write(path.join("top.bin"), vec![5u8; 300_000]).unwrap();
    let outside = d.dir.path().join("outside-secret.txt");
    std::fs::write(&outside, b"must not leak").unwrap();
    std::os::unix::fs::symlink(&outside, path.join("zipdir/leak")).unwrap();
    std::os::unix::fs::symlink("a.txt", path.join("zipdir/inner-link")).unwrap();

    // A directory with archive=true: entries relative to it.
    let t = dl_token(&d, &vfid, "zipdir").await;
    let zip = d.dir.path().join("dir.zip");
    let r = curl_to(
        &d.url("client", &format!("/download?token={t}&archive=true")),
        &[],
        &zip,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/zip"));
    assert!(r.header("content-length").is_none(), "streamed");
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment;filename=\"zipdir.zip\"; filename*=UTF-8''zipdir.zip")
    );
    let l = python_zip_listing(&zip);
    assert!(l["bad"].is_null(), "{l}");
    assert_eq!(entry(&l, "a.txt")["data"], "alpha");
    assert_eq!(entry(&l, "sub/b.txt")["data"], "beta");
    assert_eq!(entry(&l, "emptydir/")["dir"], true);
    // The link inside stays a link; the one escaping the vfolder is left out entirely.
    assert_eq!(
        entry(&l, "inner-link")["mode"].as_u64().unwrap() & 0o170000,
        0o120000
    );
    assert!(!l.to_string().contains("must not leak"));
    assert!(
        l["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "leak")
    );

    // A selection: entries relative to the vfolder, the token's filename.
    let t = d
        .token("/folder/file/archive-download-token", json!({"volume": "vol1", "virtual_folder_id": vfid, "files": ["zipdir", "top.bin"], "filename": "mine.zip"}))
        .await;
    let zip2 = d.dir.path().join("sel.zip");
    let r = curl_to(
        &d.url("client", &format!("/download-archive?token={t}")),
        &[],
        &zip2,
    );
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-disposition")
            .unwrap()
            .contains("mine.zip")
    );
    let l = python_zip_listing(&zip2);
    assert!(l["bad"].is_null());
    assert_eq!(entry(&l, "zipdir/a.txt")["data"], "alpha");
    assert_eq!(entry(&l, "zipdir/sub/b.txt")["data"], "beta");
    assert_eq!(entry(&l, "top.bin")["size"], 300_000);

    // Before any byte: a missing entry is 404, an escaping one 400.
    for (files, code) in [
        (json!(["zipdir", "nope.txt"]), 404),
        (json!(["zipdir/leak"]), 400),
    ] {
        let t = d
            .token(
                "/folder/file/archive-download-token",
                json!({"volume": "vol1", "virtual_folder_id": vfid, "files": files}),
            )
            .await;
        let r = d
            .get("client", &format!("/download-archive?token={t}"))
            .await;
        r.problem(code);
    }
    // A syntactically escaping entry is refused already when the token is minted.
    let r = d
        .mgr(
            "POST",
            "/folder/file/archive-download-token",
            json!({"volume": "vol1", "virtual_folder_id": vfid, "files": ["../x"]}),
        )
        .await;
    r.problem(400);
    // Tokens: forged or expired → 401, undecodable → 400, bad filename refused at mint.
    let claims = ArchiveClaims {
        operation: DownloadOp::Download,
        volume: "vol1".into(),
        virtual_folder_id: storage_agent::ids::VFolderId::parse(&vfid).unwrap(),
        files: vec!["top.bin".into()],
        filename: None,
        exp: 1_000,
    };
    let expired = Tokens::new(JWT_SECRET, Duration::from_secs(60))
        .mint(&claims)
        .unwrap();
    let r = d
        .get("client", &format!("/download-archive?token={expired}"))
        .await;
    r.problem(401);
    let forged = Tokens::new("not-the-real-secret!", Duration::from_secs(60))
        .mint(&ArchiveClaims {
            exp: 4_000_000_000,
            ..claims.clone()
        })
        .unwrap();
    let r = d
        .get("client", &format!("/download-archive?token={forged}"))
        .await;
    r.problem(401);
    let r = d.get("client", "/download-archive?token=xyz").await;
    r.problem(400);
    for bad in ["..", "a/b.zip", "x\u{7}.zip", ""] {
        let r = d
            .mgr("POST", "/folder/file/archive-download-token", json!({"volume": "vol1", "virtual_folder_id": vfid, "files": ["top.bin"], "filename": bad}))
            .await;
        r.problem(400);
    }
    let r = d
        .mgr(
            "POST",
            "/folder/file/archive-download-token",
            json!({"volume": "vol1", "virtual_folder_id": vfid, "files": []}),
        )
        .await;
    r.problem(400);
}

/// zip64: a 4.5 GiB sparse file (no disk needed) must come out whole, with the right size and
/// CRC, through a streamed archive.
#[tokio::test]
async fn archives_past_4_gib_use_zip64() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    std::fs::create_dir(path.join("huge")).unwrap();
    let f = std::fs::File::create(path.join("huge/sparse.bin")).unwrap();
    let size: u64 = (4u64 << 30) + (512 << 20);
    f.set_len(size).unwrap();
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
    }
    std::fs::write(path.join("huge/small.txt"), b"small").unwrap();
    let t = dl_token(&d, &vfid, "huge").await;
    let zip = d.dir.path().join("huge.zip");
    let r = curl_to(
        &d.url("client", &format!("/download?token={t}&archive=true")),
        &[],
        &zip,
    );
    assert_eq!(r.status, 200);
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import sys, zipfile, zlib
z = zipfile.ZipFile(sys.argv[1])
i = z.getinfo("sparse.bin")
crc = 0
first = last = b""
with z.open(i) as f:
    while True:
        b = f.read(8 << 20)
        if not b:
            break
        if not first:
            first = b[:4]
        last = (last + b)[-4:]
        crc = zlib.crc32(b, crc)
assert crc == i.CRC, (crc, i.CRC)
print(i.file_size, first.decode(), last.decode(), z.read("small.txt").decode())
"#,
        )
        .arg(&zip));
    assert_eq!(out.trim(), format!("{size} head tail small"));
}
