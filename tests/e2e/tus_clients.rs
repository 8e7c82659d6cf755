//! Real tus clients, unchanged: tuspy (PyPI) and tus-js-client (npm, under Node) upload 100 MiB
//! in chunks, are killed mid-upload (a real interruption: the connection drops mid-PATCH) and
//! resume in a new process, both with an upload URL handed to them (Backend.AI's flow) and with
//! tus creation. The result must be byte-identical.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::tools::{require, require_python_module};
use crate::common::{Daemon, random_file, sha256_file};
use crate::tus::mint;

const SIZE: u64 = 100 << 20;
const CHUNK: u64 = 8 << 20;

#[derive(Clone, Copy)]
enum Client {
    Tuspy,
    TusJs,
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn command(c: Client, mode: &str, url: &str, file: &Path) -> Command {
    let mut cmd = match c {
        Client::Tuspy => {
            let mut cmd = Command::new("python3");
            cmd.arg(clients_dir().join("tuspy_upload.py"));
            cmd
        }
        Client::TusJs => {
            let mut cmd = Command::new("node");
            cmd.arg(clients_dir().join("tusjs_upload.mjs"));
            cmd
        }
    };
    cmd.args([mode, url])
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs a client; with `kill_at`, SIGKILLs it once it reports that offset. Returns the upload URL
/// it printed and whether it finished.
fn run(c: Client, mode: &str, url: &str, file: &Path, kill_at: Option<u64>) -> (String, bool) {
    let mut child = command(c, mode, url, file)
        .arg(CHUNK.to_string())
        .spawn()
        .expect("spawn tus client");
    let stdout = child.stdout.take().unwrap();
    let mut upload_url = String::new();
    let mut done = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(u) = line.strip_prefix("url ") {
            upload_url = u.to_string();
        }
        if let (Some(limit), Some(off)) = (kill_at, line.strip_prefix("offset "))
            && off.parse::<u64>().unwrap_or(0) >= limit
        {
            child.kill().unwrap();
            break;
        }
        if line.starts_with("done") {
            done = true;
        }
    }
    let out = child.wait_with_output().unwrap();
    if kill_at.is_none() {
        assert!(
            out.status.success() && done,
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (upload_url, done)
}

async fn interrupted_upload(c: Client, create: bool) {
    match c {
        Client::Tuspy => require_python_module("tusclient", "tuspy"),
        Client::TusJs => {
            require("node", "apt-get install nodejs");
            assert!(
                clients_dir().join("node_modules/tus-js-client").is_dir(),
                "tus-js-client is missing: (cd tests/clients && npm ci)"
            );
        }
    }
    let d = Daemon::start().await;
    let src = d.dir.path().join("src.bin");
    random_file(&src, SIZE, 42);
    let u = mint(&d, "big/upload.bin", SIZE).await;
    let url = d.url("client", &format!("/upload?token={}", u.token));
    let mode = if create { "create" } else { "resume" };
    let c1 = c;
    let s1 = src.clone();
    let url1 = url.clone();
    let (upload_url, done) =
        tokio::task::spawn_blocking(move || run(c1, mode, &url1, &s1, Some(SIZE * 3 / 10)))
            .await
            .unwrap();
    assert!(!done, "the first run was killed before finishing");
    assert!(!upload_url.is_empty(), "the client printed its upload URL");
    let head = crate::tus::head(&d, &u.token).await;
    let acked: u64 = head.header("upload-offset").unwrap().parse().unwrap();
    assert!(
        (SIZE * 3 / 10..SIZE).contains(&acked),
        "server offset {acked}"
    );
    // A new process resumes from the server's offset.
    let s2 = src.clone();
    tokio::task::spawn_blocking(move || run(c, "resume", &upload_url, &s2, None))
        .await
        .unwrap();
    assert_eq!(
        sha256_file(&u.vfpath.join("big/upload.bin")),
        sha256_file(&src),
        "byte-identical after interruption and resume"
    );
}

#[tokio::test]
async fn tuspy_resumes_a_handed_upload_url() {
    interrupted_upload(Client::Tuspy, false).await;
}

#[tokio::test]
async fn tuspy_with_creation() {
    interrupted_upload(Client::Tuspy, true).await;
}

#[tokio::test]
async fn tus_js_client_resumes_a_handed_upload_url() {
    interrupted_upload(Client::TusJs, false).await;
}

#[tokio::test]
async fn tus_js_client_with_creation_with_upload() {
    interrupted_upload(Client::TusJs, true).await;
}

/// tus-js-client with its default chunk size (Infinity: the whole file in one PATCH) while the
/// daemon is killed and restarted on the same port: the client retries by itself and resumes from
/// the checkpoint the daemon kept, not from zero.
#[tokio::test]
async fn tus_js_client_default_chunk_resumes_from_a_checkpoint() {
    require("node", "apt-get install nodejs");
    assert!(
        clients_dir().join("node_modules/tus-js-client").is_dir(),
        "tus-js-client is missing: (cd tests/clients && npm ci)"
    );
    const BIG: u64 = 1 << 30;
    let port = crate::common::redis::free_port();
    let mut d = Daemon::builder()
        .set("api.client.service-addr", format!("127.0.0.1:{port}"))
        .start()
        .await;
    let src = d.dir.path().join("big.bin");
    random_file(&src, BIG, 5);
    let u = mint(&d, "js/big.bin", BIG).await;
    let url = d.url("client", &format!("/upload?token={}", u.token));
    let staging = crate::tus::staging_file(&d, &u);
    let child = command(Client::TusJs, "resume", &url, &src)
        .arg("Infinity")
        .spawn()
        .expect("spawn tus-js-client");
    // Kill the daemon once a quarter of the file is in staging (past a 64 MiB checkpoint).
    let start = std::time::Instant::now();
    loop {
        let staged = std::fs::metadata(&staging).map(|m| m.len()).unwrap_or(0);
        if staged >= BIG / 4 {
            break;
        }
        assert!(
            start.elapsed() < crate::common::OUTCOME,
            "the upload did not progress ({staged} bytes staged)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let log_before = std::fs::read_to_string(d.log_path())
        .unwrap_or_default()
        .len();
    d.restart().await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "tus-js-client did not finish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The PATCH after the restart started where the checkpoint left off.
    let log = std::fs::read_to_string(d.log_path()).unwrap();
    let resumed: Vec<u64> = log[log_before..]
        .lines()
        .filter(|l| l.contains("upload PATCH") && l.contains(&u.session))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("offset="))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    assert!(
        resumed.first().is_some_and(|&o| o >= 64 << 20),
        "resumed from {resumed:?}, not from a checkpoint"
    );
    assert_eq!(
        sha256_file(&u.vfpath.join("js/big.bin")),
        sha256_file(&src),
        "byte-identical"
    );
}

/// tus-js-client's `parallelUploads`: it splits the file into partial uploads, sends them at
/// once, then creates the final upload naming them (tus concatenation). `upload_url` is the
/// Backend.AI upload URL the client starts from (its endpoint). Returns what the client printed.
pub fn tusjs_parallel(upload_url: &str, file: &Path, streams: usize) -> Vec<String> {
    require("node", "apt-get install nodejs");
    assert!(
        clients_dir().join("node_modules/tus-js-client").is_dir(),
        "tus-js-client is missing: (cd tests/clients && npm ci)"
    );
    let out = command(Client::TusJs, "parallel", upload_url, file)
        .arg(CHUNK.to_string())
        .arg(streams.to_string())
        .output()
        .expect("spawn tus-js-client");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        out.status.success() && lines.iter().any(|l| l == "done"),
        "tus-js-client failed: {}\n{lines:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

#[tokio::test]
async fn tus_js_client_parallel_uploads_are_concatenated() {
    let d = Daemon::start().await;
    let src = d.dir.path().join("src.bin");
    random_file(&src, SIZE + 12_345, 43);
    let u = mint(&d, "par/upload.bin", SIZE + 12_345).await;
    let url = d.url("client", &format!("/upload?token={}", u.token));
    let s = src.clone();
    let lines = tokio::task::spawn_blocking(move || tusjs_parallel(&url, &s, 4))
        .await
        .unwrap();
    let partials = lines
        .iter()
        .filter(|l| l.starts_with("created partial"))
        .count();
    let finals = lines
        .iter()
        .filter(|l| l.starts_with("created final;"))
        .count();
    assert_eq!((partials, finals), (4, 1), "{lines:?}");
    assert_eq!(
        sha256_file(&u.vfpath.join("par/upload.bin")),
        sha256_file(&src),
        "byte-identical"
    );
}

/// tus-js-client's parallel uploads into the object stores: 4 partials of 25 MiB, joined by
/// server-side copies (S3) or one block list (Azure).
async fn tusjs_parallel_into(d: &Daemon, peek: &dyn Fn(&str, &str) -> Option<Vec<u8>>) {
    let vfid = d.new_vfolder().await;
    let src = d.dir.path().join("src.bin");
    random_file(&src, SIZE + 3, 44);
    let t = d
        .token(
            "/folder/file/upload",
            serde_json::json!({"volume": "vol1", "vfid": vfid, "relpath": "par.bin", "size": SIZE + 3}),
        )
        .await;
    let url = d.url("client", &format!("/upload?token={t}"));
    let s = src.clone();
    let lines = tokio::task::spawn_blocking(move || tusjs_parallel(&url, &s, 4))
        .await
        .unwrap();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("created partial"))
            .count(),
        4,
        "{lines:?}"
    );
    assert!(
        peek(&vfid, "par.bin") == Some(std::fs::read(&src).unwrap()),
        "byte-identical"
    );
}

#[tokio::test]
async fn tus_js_client_parallel_uploads_into_s3() {
    let moto = crate::common::moto::Moto::start();
    let d = Daemon::builder().s3(&moto.endpoint(), "tjs-").start().await;
    let peek = |vfid: &str, rel: &str| {
        crate::backends::s3_object(&moto, &crate::backends::bucket_of("tjs-", vfid), rel)
    };
    tusjs_parallel_into(&d, &peek).await;
}

#[tokio::test]
async fn tus_js_client_parallel_uploads_into_azure() {
    let az = crate::common::azurite::Azurite::start();
    let d = Daemon::builder()
        .azure(&az.endpoint(), "tjs-")
        .start()
        .await;
    let peek = |vfid: &str, rel: &str| az.blob(&crate::backends::bucket_of("tjs-", vfid), rel);
    tusjs_parallel_into(&d, &peek).await;
}
