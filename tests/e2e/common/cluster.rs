//! The rest of a Backend.AI cluster's plumbing, real: etcd (Debian's etcd-server), a Redis
//! Sentinel group (a master, a replica, three sentinels), and Backend.AI's own Python classes
//! (PyPI backend.ai-common 26.9.6, in the venv scripts/testenv.sh makes) to decode what the
//! daemon writes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::redis::{RedisServer, free_port};
use super::tools::require;

pub struct EtcdServer {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl EtcdServer {
    pub fn start() -> Self {
        require("etcd", "apt-get install etcd-server");
        require("etcdctl", "apt-get install etcd-client");
        let dir = tempfile::tempdir().unwrap();
        let (port, peer) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "default"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd");
        let e = EtcdServer {
            port,
            _dir: dir,
            child,
        };
        let start = Instant::now();
        while !e.ctl(&["endpoint", "health"]).contains("is healthy") {
            assert!(start.elapsed() < super::OUTCOME, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.addr()])
            .args(args)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `etcdctl put /sorna/<namespace>/<key> <value>`.
    pub fn put(&self, namespace: &str, key: &str, value: &str) {
        let out = self.ctl(&["put", &format!("/sorna/{namespace}/{key}"), value]);
        assert!(out.contains("OK"), "etcdctl put: {out}");
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A master, a replica and three sentinels watching them as `mymaster`.
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel_ports: Vec<u16>,
    _dir: tempfile::TempDir,
    sentinels: Vec<Child>,
}

pub const SERVICE: &str = "mymaster";

impl SentinelGroup {
    pub fn start() -> Self {
        require("redis-sentinel", "apt-get install redis-sentinel");
        let master = RedisServer::start();
        // Replicas sync at once instead of after the default 5 s diskless delay.
        master.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"]);
        let replica = RedisServer::start_replica(master.port);
        let start = Instant::now();
        while !replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(start.elapsed() < super::OUTCOME, "the replica did not sync");
            std::thread::sleep(Duration::from_millis(100));
        }
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {SERVICE} 1000\n\
                     sentinel failover-timeout {SERVICE} 3000\n\
                     sentinel parallel-syncs {SERVICE} 1\n",
                    dir.path().display(),
                    master.port
                ),
            )
            .unwrap();
            sentinels.push(
                Command::new("redis-sentinel")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-sentinel"),
            );
            ports.push(port);
        }
        let g = SentinelGroup {
            master,
            replica,
            sentinel_ports: ports,
            _dir: dir,
            sentinels,
        };
        // Ready when every sentinel knows the replica and the two other sentinels.
        let start = Instant::now();
        loop {
            let ready = g.sentinel_ports.iter().all(|p| {
                let info = sentinel_cli(*p, &["SENTINEL", "MASTER", SERVICE]);
                info.contains("num-slaves\n1") && info.contains("num-other-sentinels\n2")
            });
            if ready {
                break;
            }
            assert!(
                start.elapsed() < super::OUTCOME,
                "the sentinel group did not form"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        g
    }

    pub fn sentinel_list(&self) -> Vec<String> {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The master the sentinels name now (`host:port`).
    pub fn current_master(&self) -> String {
        let out = sentinel_cli(
            self.sentinel_ports[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE],
        );
        out.lines().collect::<Vec<_>>().join(":")
    }
}

fn sentinel_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// The Python of the venv with backend.ai-common 26.9.6.
pub fn bai_python() -> PathBuf {
    let p = std::env::var_os("BAI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("SA_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/storage-agent")
                });
            cache.join("bai-venv/bin/python")
        });
    assert!(
        p.exists(),
        "Backend.AI's Python classes are required ({}): run scripts/testenv.sh bai-venv \
         (a Python 3.13 venv with backend.ai-common==26.9.6)",
        p.display()
    );
    p
}

/// Runs `bai_decode.py` and parses its JSON lines; fails the test when Backend.AI's classes
/// reject anything.
pub fn bai_decode(args: &[&str], stdin: Option<&str>) -> Vec<Value> {
    use std::io::Write;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/bai_decode.py");
    let mut child = Command::new(bai_python())
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Backend.AI's classes rejected what we wrote ({args:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
