//! Starts the real `storage-agent` binary with a temporary config, volume and state directory on
//! free loopback ports, and talks to it over HTTP. The daemon's stdout announces each listener
//! (`listening api=<name> addr=<ip:port>`) and `ready`; stderr goes to a log file whose tail is
//! printed when a test fails.

#![allow(dead_code)]

pub mod agent;
pub mod azurite;
pub mod ceph;
pub mod cluster;
pub mod holdback;
pub mod loopfs;
pub mod moto;
pub mod redis;
pub mod tools;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The bound on waiting for an outcome that usually comes within a second or two (a heartbeat,
/// an event, a task's end, a server starting). Generous on purpose: a machine loaded by other
/// jobs makes the outcome late, not wrong, while a real hang still fails the test.
pub const OUTCOME: Duration = Duration::from_secs(180);

/// The bound on "answers at once" where the failure it guards against is a hang (a stuck mount,
/// a silent endpoint): far above a loaded machine's latency, far below forever.
pub const PROMPT: Duration = Duration::from_secs(15);

pub const MANAGER_SECRET: &str = "manager-secret-for-tests-0123";
pub const JWT_SECRET: &str = "jwt-secret-for-tests-0123456789";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_storage-agent")
}

/// A config as a TOML table, so tests can change any key before starting.
pub struct Builder {
    pub config: toml::Table,
    pub dir: tempfile::TempDir,
    /// Extra environment of the daemon process.
    pub env: Vec<(String, String)>,
}

fn set_path(t: &mut toml::Table, dotted: &str, v: toml::Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut cur = t;
    for p in parts {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("table");
    }
    cur.insert(last.to_string(), v);
}

impl Builder {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sa-test-")
            .tempdir()
            .expect("tempdir");
        let vol = dir.path().join("vol1");
        std::fs::create_dir_all(&vol).unwrap();
        let state = dir.path().join("state");
        let node = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let text = format!(
            r#"
[storage-proxy]
node-id = "{node}"
secret = "{JWT_SECRET}"
session-expire = "1h"
scandir-limit = 1000

[storage-agent]
state-dir = "{state}"
log-level = "info,storage_agent=debug"
shutdown-grace = "5s"

[api.client]
service-addr = "127.0.0.1:0"

[api.manager]
service-addr = "127.0.0.1:0"
internal-addr = "127.0.0.1:0"
secret = "{MANAGER_SECRET}"

[volume.vol1]
backend = "vfs"
path = "{vol}"

[agent]
enabled = false
"#,
            state = state.display(),
            vol = vol.display(),
        );
        Builder {
            config: toml::from_str(&text).expect("template"),
            dir,
            env: Vec::new(),
        }
    }

    pub fn set(mut self, key: &str, v: impl Into<toml::Value>) -> Self {
        set_path(&mut self.config, key, v.into());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn remove(mut self, section: &str, key: &str) -> Self {
        if let Some(t) = self.config.get_mut(section).and_then(|s| s.as_table_mut()) {
            t.remove(key);
        }
        self
    }

    pub async fn start(self) -> Daemon {
        let path = self.dir.path().join("storage-agent.toml");
        std::fs::write(&path, toml::to_string(&self.config).unwrap()).unwrap();
        let vol_dir = self
            .config
            .get("volume")
            .and_then(|v| v.get("vol1"))
            .and_then(|v| v.get("path"))
            .and_then(|p| p.as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.dir.path().join("vol1"));
        let mut d = Daemon {
            vol_dir,
            state_dir: self.dir.path().join("state"),
            config_path: path,
            dir: self.dir,
            child: None,
            addrs: Default::default(),
            http: http_client(),
            starts: 0,
            env: self.env,
        };
        d.spawn().await;
        d
    }
}

pub struct Daemon {
    env: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub vol_dir: PathBuf,
    pub state_dir: PathBuf,
    child: Option<Child>,
    pub addrs: std::collections::BTreeMap<String, String>,
    pub http: reqwest::Client,
    starts: u32,
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "expected JSON, got {:?} ({})",
                String::from_utf8_lossy(&self.body),
                self.status
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn content_type(&self) -> String {
        self.header("content-type").unwrap_or_default()
    }
    /// A problem+json body; returns it for further checks.
    #[track_caller]
    pub fn problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert!(
            self.content_type().starts_with("application/problem+json"),
            "content-type {:?} body {}",
            self.content_type(),
            self.text()
        );
        let v = self.json();
        assert!(
            v["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("https://api.backend.ai/probs/")),
            "{v}"
        );
        assert!(v["title"].is_string(), "{v}");
        v
    }
}

impl Daemon {
    pub fn builder() -> Builder {
        Builder::new()
    }

    pub async fn start() -> Daemon {
        Builder::new().start().await
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.path().join(format!("stdout.{}.log", self.starts))
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    async fn spawn(&mut self) {
        self.starts += 1;
        let out = std::fs::File::create(self.stdout_path()).unwrap();
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn storage-agent");
        self.child = Some(child);
        self.addrs = self.wait_ready(Duration::from_secs(60));
    }

    fn wait_ready(&mut self, timeout: Duration) -> std::collections::BTreeMap<String, String> {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(self.stdout_path()).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("ready")) {
                return text
                    .lines()
                    .filter_map(|l| {
                        let l = l.strip_prefix("listening ")?;
                        let mut api = None;
                        let mut addr = None;
                        for kv in l.split_whitespace() {
                            match kv.split_once('=') {
                                Some(("api", v)) => api = Some(v.to_string()),
                                Some(("addr", v)) => addr = Some(v.to_string()),
                                _ => {}
                            }
                        }
                        Some((api?, addr?))
                    })
                    .collect();
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "storage-agent exited during start ({status}):\n{}",
                    self.log_tail(60)
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "storage-agent not ready after {timeout:?}:\n{}",
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .ok()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("storage-agent did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        // Pooled connections went with the old process; a client reusing one would fail
        // its first request.
        self.http = http_client();
        self.spawn().await;
    }

    pub fn url(&self, api: &str, path: &str) -> String {
        format!("http://{}{}", self.addrs[api], path)
    }

    /// A manager-API call with a JSON body (GET and DELETE carry bodies too) and the secret.
    pub async fn mgr(&self, method: &str, path: &str, body: Value) -> Resp {
        self.mgr_raw(
            method,
            path,
            Some(body.to_string().into_bytes()),
            Some(MANAGER_SECRET),
        )
        .await
    }

    pub async fn mgr_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        secret: Option<&str>,
    ) -> Resp {
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            self.url("manager", path),
        );
        if let Some(s) = secret {
            req = req.header("X-BackendAI-Storage-Auth-Token", s);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        send(req).await
    }

    pub async fn get(&self, api: &str, path: &str) -> Resp {
        send(self.http.get(self.url(api, path))).await
    }

    /// Creates a quota scope and vfolder; returns the vfid and its directory on disk.
    pub async fn create_vfolder(&self) -> (String, PathBuf) {
        let vfid = self.new_vfolder().await;
        let path = self.vfolder_path(&vfid);
        assert!(path.is_dir());
        (vfid, path)
    }

    /// Creates a quota scope and vfolder on vol1, whatever its backend; returns the vfid.
    pub async fn new_vfolder(&self) -> String {
        let qs = format!("user:{}", uuid::Uuid::new_v4());
        let vfid = format!("{qs}/{}", uuid::Uuid::new_v4().simple());
        let r = self
            .mgr(
                "POST",
                "/folder/create",
                json!({"volume": "vol1", "vfid": vfid}),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.text());
        vfid
    }

    pub fn vfolder_path(&self, vfid: &str) -> PathBuf {
        let (qs, folder) = vfid.split_once('/').unwrap();
        let qs = uuid::Uuid::parse_str(qs.split_once(':').unwrap().1).unwrap();
        let f = uuid::Uuid::parse_str(folder).unwrap().simple().to_string();
        self.vol_dir
            .join(qs.simple().to_string())
            .join(&f[0..2])
            .join(&f[2..4])
            .join(&f[4..])
    }

    pub async fn token(&self, path: &str, body: Value) -> String {
        let r = self.mgr("POST", path, body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["token"].as_str().unwrap().to_string()
    }

    /// A tus upload of `data` into vol1 in PATCHes of `chunk` bytes (a token minted first);
    /// returns the last answer.
    pub async fn tus_put(&self, vfid: &str, relpath: &str, data: &[u8], chunk: usize) -> Resp {
        let t = self
            .token(
                "/folder/file/upload",
                json!({"volume": "vol1", "vfid": vfid, "relpath": relpath, "size": data.len()}),
            )
            .await;
        let mut off = 0;
        loop {
            let end = (off + chunk.max(1)).min(data.len());
            let r = send(
                self.http
                    .patch(self.url("client", &format!("/upload?token={t}")))
                    .header("Tus-Resumable", "1.0.0")
                    .header("Content-Type", "application/offset+octet-stream")
                    .header("Upload-Offset", off.to_string())
                    .body(data[off..end].to_vec()),
            )
            .await;
            if r.status != 204 || end == data.len() {
                return r;
            }
            off = end;
        }
    }

    /// Polls `GET /bgtask/{id}` until the task is no longer running.
    /// `POST /folder/delete` on vol1; returns the background task's id (202 asserted).
    pub async fn start_delete(&self, vfid: &str) -> String {
        let r = self
            .mgr(
                "POST",
                "/folder/delete",
                json!({"volume": "vol1", "vfid": vfid}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["bgtask_id"].as_str().unwrap().to_string()
    }

    /// `POST /folder/clone` within vol1; returns the background task's id (200 asserted).
    pub async fn start_clone(&self, src: &str, dst: &str) -> String {
        let r = self
            .mgr(
                "POST",
                "/folder/clone",
                json!({"src_volume": "vol1", "src_vfid": src, "dst_volume": "vol1", "dst_vfid": dst}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["bgtask_id"].as_str().unwrap().to_string()
    }

    pub async fn wait_task(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let r = self.mgr("GET", &format!("/bgtask/{id}"), json!({})).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            if v["status"] != "running" {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "task {id} still running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        // Below the daemon's idle-timeout (75 s): a connection the daemon may have closed is
        // never reused (tests that block their runtime cannot notice a close).
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub async fn send(req: reqwest::RequestBuilder) -> Resp {
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.expect("body");
    Resp {
        status,
        headers,
        body,
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- storage-agent log ({}) ----\n{}",
                self.log_path().display(),
                self.log_tail(80)
            );
        }
        self.kill9();
        // Mounts the daemon made (rclone buckets, remote volumes) outlive it by design; a test's
        // go with the test (rclone ends once its mount is gone).
        let mine = self.dir.path().to_string_lossy().to_string();
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for point in info.lines().filter_map(|l| l.split(' ').nth(4)) {
                if point.starts_with(&mine) {
                    let _ = Command::new("umount").arg("-l").arg(point).status();
                }
            }
        }
        // Tests build trees deeper than std's recursive remove_dir_all (TempDir's clean-up) can
        // take without overflowing the test thread's stack: remove with the iterative walk.
        if let (Some(parent), Some(name)) = (self.dir.path().parent(), self.dir.path().file_name())
            && let Ok(fd) = storage_agent::volume::fsops::open_dir_path(parent)
        {
            use std::os::fd::AsFd;
            let _ = storage_agent::volume::tree::remove_tree_at(fd.as_fd(), name, &mut || true);
        }
    }
}

/// A vfid in a fresh user quota scope (nothing exists for it yet).
pub fn random_vfid() -> String {
    format!(
        "user:{}/{}",
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4().simple()
    )
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex(&h.finalize())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `len` bytes of deterministic pseudo-random data.
pub fn random_file(p: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut left = len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// Runs a command, failing the test with its output unless it succeeds.
#[track_caller]
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads lines of a child's stdout (for clients that print progress).
pub fn lines(child: &mut Child) -> impl Iterator<Item = String> + '_ {
    BufReader::new(child.stdout.as_mut().unwrap())
        .lines()
        .map_while(Result::ok)
}
