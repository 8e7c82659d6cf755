//! The storage-agent side of a test daemon: Docker sessions on a private port range, a gRPC
//! client with the bearer secret, and SSH/SFTP client helpers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use storage_agent::pb;
use storage_agent::pb::storage_agent_client::StorageAgentClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::tools::require;
use super::{Builder, Daemon};

pub const RPC_SECRET: &str = "rpc-secret-for-tests-0123456789";
/// The session uid/gid in tests (an unused uid on this machine).
pub const KERNEL_UID: u32 = 2301;
pub const KERNEL_GID: u32 = 2301;
pub const BASE_IMAGE: &str = "localbase:bookworm-slim";

/// Each test daemon gets its own block of published ports.
static NEXT_PORTS: AtomicU16 = AtomicU16::new(0);

pub fn port_block(size: u16) -> (u16, u16) {
    let base = 32000 + (std::process::id() % 50) as u16 * 400;
    let start = base + NEXT_PORTS.fetch_add(size, Ordering::SeqCst) % 400;
    (start, start + size - 1)
}

/// Docker must be running with the base image imported (scripts/testenv.sh does both).
#[track_caller]
pub fn require_docker() {
    require("docker", "apt-get install docker.io");
    let ok = Command::new("docker")
        .args(["image", "inspect", BASE_IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "Docker with the image {BASE_IMAGE} is required: run scripts/testenv.sh docker base-image"
    );
}

impl Builder {
    /// Enables sessions: local Docker, the test base image, a private port range.
    pub fn agent(self) -> Self {
        require_docker();
        let (lo, hi) = port_block(20);
        self.set("agent.enabled", true)
            .set("agent.base-image", BASE_IMAGE)
            .set("agent.public-addr", "127.0.0.1")
            .set("agent.public-host", "127.0.0.1")
            .set("agent.port-range", format!("{lo}-{hi}"))
            .set("agent.kernel-uid", KERNEL_UID as i64)
            .set("agent.kernel-gid", KERNEL_GID as i64)
            .set("agent.rpc.service-addr", "127.0.0.1:0")
            .set("agent.rpc.secret", RPC_SECRET)
            .set("agent.reap-interval", "1s")
    }
}

/// Adds `authorization: Bearer <secret>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(s) = &self.0 {
            r.metadata_mut().insert("authorization", s.parse().unwrap());
        }
        Ok(r)
    }
}

pub type Rpc = StorageAgentClient<InterceptedService<Channel, Bearer>>;

impl Daemon {
    pub async fn rpc_with(&self, secret: Option<&str>) -> Rpc {
        let ch = Channel::from_shared(format!("http://{}", self.addrs["rpc"]))
            .unwrap()
            .connect()
            .await
            .expect("connect to the RPC listener");
        StorageAgentClient::with_interceptor(ch, Bearer(secret.map(|s| format!("Bearer {s}"))))
    }

    pub async fn rpc(&self) -> Rpc {
        self.rpc_with(Some(RPC_SECRET)).await
    }

    pub async fn capacity(&self) -> pb::Capacity {
        self.rpc()
            .await
            .get_capacity(pb::GetCapacityRequest {})
            .await
            .expect("GetCapacity")
            .into_inner()
    }

    pub async fn session(&self, id: &str) -> pb::Session {
        self.rpc()
            .await
            .get_session(pb::GetSessionRequest { id: id.to_string() })
            .await
            .expect("GetSession")
            .into_inner()
    }

    /// Polls a session until it reaches `state`; panics with `why` after [`super::OUTCOME`].
    pub async fn wait_session(&self, id: &str, state: pb::SessionState, why: &str) -> pb::Session {
        let deadline = Instant::now() + super::OUTCOME;
        loop {
            let s = self.session(id).await;
            if s.state == state as i32 {
                return s;
            }
            assert!(Instant::now() < deadline, "{why}: {s:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// After a failed CreateSession: no container left and the admission reservation released.
    pub async fn assert_nothing_left(&self) {
        assert!(self.containers().is_empty(), "never a leaked container");
        let cap = self.capacity().await;
        assert_eq!(
            cap.starting + cap.running,
            0,
            "the reservation was released"
        );
    }

    /// A vfolder in the given user's quota scope; returns the vfid and its host path.
    pub async fn user_vfolder(&self, user: &uuid::Uuid) -> (String, PathBuf) {
        let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
        let r = self
            .mgr(
                "POST",
                "/folder/create",
                serde_json::json!({"volume": "vol1", "vfid": vfid}),
            )
            .await;
        assert_eq!(r.status, 204, "{}", r.text());
        let p = self.vfolder_path(&vfid);
        (vfid, p)
    }

    pub fn node_id(&self) -> String {
        self.config_node_id()
    }

    fn config_node_id(&self) -> String {
        let t: toml::Table =
            toml::from_str(&std::fs::read_to_string(&self.config_path).unwrap()).unwrap();
        t["storage-proxy"]["node-id"].as_str().unwrap().to_string()
    }

    /// Containers Docker has with this daemon's node label.
    pub fn containers(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!(
                "label=ai.backend.storage-agent.node={}",
                self.node_id()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Removes the test daemon's leftover containers when the test ends, pass or fail.
pub struct ContainerGuard(pub String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=ai.backend.storage-agent.node={}", self.0))
            .output();
        if let Ok(out) = out {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

pub fn mount(volume: &str, vfid: &str, name: &str, read_only: bool) -> pb::Mount {
    pb::Mount {
        volume: volume.into(),
        vfid: vfid.into(),
        name: name.into(),
        read_only,
        subpath: String::new(),
    }
}

/// An SFTP CreateSession for `user` with `mounts`, logging in with `public_keys` only, in the
/// resource group the test daemons serve.
pub fn sftp_req(
    user: &uuid::Uuid,
    mounts: Vec<pb::Mount>,
    public_keys: Vec<String>,
) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        kind: pb::SessionKind::Sftp as i32,
        user_id: user.to_string(),
        access_key: "AKIATEST".into(),
        resource_group: "storage".into(),
        mounts,
        credentials: Some(pb::Credentials {
            public_keys,
            generate_password: false,
        }),
        ..Default::default()
    }
}

/// An ed25519 key pair made with ssh-keygen; returns (private key path, public key line).
pub fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    require("ssh-keygen", "apt-get install openssh-client");
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = std::fs::read_to_string(p.with_extension("pub")).unwrap();
    (p, public.trim().to_string())
}

pub const SSH_OPTS: &[&str] = &[
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=10",
];

/// Runs an sftp batch with a key; returns the output (success or not).
pub fn sftp_key(key: &Path, user: &str, port: u16, batch: &str) -> Output {
    require("sftp", "apt-get install openssh-client");
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("batch");
    std::fs::write(&b, batch).unwrap();
    Command::new("timeout")
        .arg("120")
        .arg("sftp")
        .args(SSH_OPTS)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "PasswordAuthentication=no",
            "-i",
        ])
        .arg(key)
        .arg("-P")
        .arg(port.to_string())
        .arg("-b")
        .arg(&b)
        .arg(format!("{user}@127.0.0.1"))
        .output()
        .unwrap()
}

/// Runs an sftp batch with a password (sshpass).
pub fn sftp_password(password: &str, user: &str, port: u16, batch: &str) -> Output {
    require("sshpass", "apt-get install sshpass");
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("batch");
    std::fs::write(&b, batch).unwrap();
    Command::new("timeout")
        .arg("120")
        .arg("sshpass")
        .arg("-p")
        .arg(password)
        .arg("sftp")
        .args(SSH_OPTS)
        .args([
            "-o",
            "BatchMode=no",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password",
        ])
        .arg("-P")
        .arg(port.to_string())
        .arg("-b")
        .arg(&b)
        .arg(format!("{user}@127.0.0.1"))
        .output()
        .unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `docker inspect` of a container as JSON.
pub fn inspect(container: &str) -> serde_json::Value {
    let out = Command::new("docker")
        .args(["inspect", container])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker inspect {container}: {}",
        text(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].clone()
}
