//! The web file browser session container, reached over HTTPS on its published port. Two
//! engines behind one session kind:
//!
//! * `dufs` (default): a maintained Rust file server, in an image the daemon builds from
//!   `docker/filebrowser/` with the operator's dufs binary. Basic auth with the session's
//!   generated password (passed as a sha512-crypt hash, so `docker inspect` never shows it);
//!   the root is read-only and only read-write mounts accept uploads and deletes.
//! * `filebrowser`: the official Filebrowser image (archived upstream; v2.63.23), configured by
//!   flags only, its admin password given as a bcrypt hash, command runner off.
//!
//! Both run as the kernel uid/gid with no capabilities, a read-only root filesystem, and TLS
//! only: plain HTTP on the port gets no files.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::Session;
use super::image::ContextFile;
use super::sftp::{container_name, labels};
use crate::docker::{BindMount, ContainerSpec};
use crate::tls::Leaf;

/// The HTTPS port inside the container.
pub const HTTPS_PORT: u16 = 8443;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Dufs,
    Filebrowser,
}

impl Engine {
    pub fn parse(s: &str) -> Self {
        if s == "filebrowser" {
            Engine::Filebrowser
        } else {
            Engine::Dufs
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Dufs => "dufs",
            Engine::Filebrowser => "filebrowser",
        }
    }
}

/// The dufs image's build context: the Dockerfile and the operator's binary.
pub fn dufs_context(binary: &Path) -> std::io::Result<Vec<ContextFile>> {
    let dufs = std::fs::read(binary).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "the dufs binary for file browser sessions ([agent.filebrowser] dufs-binary = {}): {e}",
                binary.display()
            ),
        )
    })?;
    Ok(vec![
        ContextFile {
            name: "Dockerfile",
            data: include_bytes!("../../docker/filebrowser/Dockerfile").to_vec(),
            mode: 0o644,
        },
        ContextFile {
            name: "dufs",
            data: dufs,
            mode: 0o755,
        },
    ])
}

/// The session's certificate, key (readable only by the session uid) and, for Filebrowser, its
/// database directory.
pub fn render_files(dir: &Path, leaf: &Leaf, uid: u32, gid: u32) -> std::io::Result<()> {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    std::fs::write(tls.join("cert.pem"), &leaf.cert_pem)?;
    let key = tls.join("key.pem");
    crate::private_file::write_with_mode(&key, leaf.key_pem.as_bytes(), 0o400)?;
    std::os::unix::fs::chown(&key, Some(uid), Some(gid))?;
    let db = dir.join("db");
    std::fs::create_dir_all(&db)?;
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(&db, Some(uid), Some(gid))?;
    Ok(())
}

pub struct FbParams<'a> {
    pub node: &'a str,
    pub engine: Engine,
    pub image: &'a str,
    pub files_dir: &'a Path,
    /// The session's staging mount points (`mounts.rs`), one per mount, in order.
    pub mounts_dir: &'a Path,
    pub public_addr: &'a str,
    pub port: u16,
    pub uid: u32,
    pub gid: u32,
    /// dufs: a sha512-crypt hash; filebrowser: a bcrypt hash.
    pub password_hash: &'a str,
}

pub fn container_spec(s: &Session, p: &FbParams) -> ContainerSpec {
    let mut mounts = vec![BindMount::new(
        p.files_dir.join("tls").display().to_string(),
        "/tls",
        true,
    )];
    for (i, m) in s.spec.mounts.iter().enumerate() {
        mounts.push(BindMount::new(
            super::mounts::staged_path(p.mounts_dir, i)
                .display()
                .to_string(),
            s.kind.mount_target(&s.username, &m.name),
            m.read_only,
        ));
    }
    let mut tmpfs = HashMap::from([(
        "/tmp".to_string(),
        "rw,nosuid,nodev,noexec,size=64m".to_string(),
    )]);
    let port = HTTPS_PORT.to_string();
    let (cmd, healthcheck) = match p.engine {
        Engine::Dufs => {
            // Read-only at the root; each read-write mount writable.
            let mut rule = format!("{}:{}@/", s.username, p.password_hash);
            for m in s.spec.mounts.iter().filter(|m| !m.read_only) {
                rule.push_str(&format!(",/{}:rw", m.name));
            }
            let cmd = [
                "/srv",
                "--bind",
                "0.0.0.0",
                "--port",
                &port,
                "--tls-cert",
                "/tls/cert.pem",
                "--tls-key",
                "/tls/key.pem",
                "--auth",
                &rule,
                "--allow-upload",
                "--allow-delete",
                "--allow-search",
                "--allow-archive",
            ]
            .map(str::to_string)
            .to_vec();
            (cmd, None)
        }
        Engine::Filebrowser => {
            mounts.push(BindMount::new(
                p.files_dir.join("db").display().to_string(),
                "/database",
                false,
            ));
            // The image's init script writes /config/settings.json; the root fs is read-only.
            tmpfs.insert(
                "/config".to_string(),
                format!("rw,nosuid,nodev,noexec,size=1m,uid={},gid={}", p.uid, p.gid),
            );
            let cmd = [
                "--root",
                "/srv",
                "--address",
                "0.0.0.0",
                "--port",
                &port,
                "--cert",
                "/tls/cert.pem",
                "--key",
                "/tls/key.pem",
                "--database",
                "/database/filebrowser.db",
                "--username",
                &s.username,
                "--password",
                p.password_hash,
                "--disableExec",
            ]
            .map(str::to_string)
            .to_vec();
            // The image's own health check speaks plain HTTP; ours speaks TLS.
            let hc = vec![
                "CMD-SHELL".to_string(),
                format!(
                    "wget -q --spider --no-check-certificate https://127.0.0.1:{port}/health || exit 1"
                ),
            ];
            (cmd, Some(hc))
        }
    };
    ContainerSpec {
        name: container_name(p.node, s.kind, s.id),
        image: p.image.to_string(),
        cmd,
        entrypoint: None,
        env: vec![],
        user: Some(format!("{}:{}", p.uid, p.gid)),
        labels: labels(p.node, s),
        mounts,
        tmpfs,
        ports: vec![(HTTPS_PORT, p.public_addr.to_string(), p.port)],
        nano_cpus: (s.spec.cpus * 1e9) as i64,
        memory: s.spec.memory as i64,
        pids: s.spec.pids,
        cap_add: vec![],
        readonly_rootfs: true,
        healthcheck,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::VFolderId;
    use crate::session::{Kind, Mount, SessionSpec, State};
    use crate::volume::RelPath;

    fn session() -> Session {
        let vf = |h: &str| {
            VFolderId::parse(&format!("user:550e8400-e29b-41d4-a716-446655440000/{h}")).unwrap()
        };
        Session {
            id: uuid::Uuid::parse_str("11111111-2222-3333-4444-555555555555").unwrap(),
            kind: Kind::Filebrowser,
            user_id: "550e8400-e29b-41d4-a716-446655440000".into(),
            access_key: "AK".into(),
            resource_group: "storage".into(),
            username: "work".into(),
            spec: SessionSpec {
                mounts: vec![
                    Mount {
                        volume: "v".into(),
                        vfid: vf("0123456789abcdef0123456789abcdef"),
                        name: "data".into(),
                        read_only: false,
                        subpath: RelPath::root(),
                        host_path: "/vol/a".into(),
                    },
                    Mount {
                        volume: "v".into(),
                        vfid: vf("fedcba9876543210fedcba9876543210"),
                        name: "ref".into(),
                        read_only: true,
                        subpath: RelPath::root(),
                        host_path: "/vol/b".into(),
                    },
                ],
                public_keys: vec![],
                password_auth: true,
                cpus: 1.0,
                memory: 1 << 30,
                pids: 256,
                idle_timeout_secs: 3600,
                tls_cert_fingerprint: None,
                engine: Some("filebrowser".into()),
                user_limit: 1,
            },
            state: State::Starting,
            reason: None,
            container_id: None,
            port: Some(30005),
            created_at: 0,
            expires_at: 10,
        }
    }

    fn params(engine: Engine, hash: &str) -> FbParams<'_> {
        FbParams {
            node: "node1",
            engine,
            image: if engine == Engine::Dufs {
                "storage-agent/filebrowser:x"
            } else {
                "filebrowser/filebrowser:v2.63.23"
            },
            files_dir: Path::new("/state/agent/sessions/s1"),
            mounts_dir: Path::new("/state/agent/mounts/s1"),
            public_addr: "203.0.113.7",
            port: 30005,
            uid: 1100,
            gid: 1200,
            password_hash: hash,
        }
    }

    #[test]
    fn official_filebrowser_container_spec() {
        let hash = "$2b$10$abcdefghijklmnopqrstuuMy5eN6vEpS0MHTd/5y6mNgS2yc4Pd3a";
        let spec = container_spec(&session(), &params(Engine::Filebrowser, hash));
        assert_eq!(spec.image, "filebrowser/filebrowser:v2.63.23");
        assert_eq!(spec.name, "sa-node1-filebrowser-111111112222");
        assert_eq!(spec.user.as_deref(), Some("1100:1200"));
        assert_eq!(
            spec.cmd,
            [
                "--root",
                "/srv",
                "--address",
                "0.0.0.0",
                "--port",
                "8443",
                "--cert",
                "/tls/cert.pem",
                "--key",
                "/tls/key.pem",
                "--database",
                "/database/filebrowser.db",
                "--username",
                "work",
                "--password",
                hash,
                "--disableExec",
            ]
        );
        assert!(spec.env.is_empty());
        // Vfolders come from the staging mount points, never from their (user-changeable)
        // paths on the volume.
        assert_eq!(
            spec.mounts,
            [
                BindMount::new("/state/agent/sessions/s1/tls", "/tls", true),
                BindMount::new("/state/agent/mounts/s1/0", "/srv/data", false),
                BindMount::new("/state/agent/mounts/s1/1", "/srv/ref", true),
                BindMount::new("/state/agent/sessions/s1/db", "/database", false),
            ]
        );
        assert_eq!(spec.ports, [(8443, "203.0.113.7".to_string(), 30005)]);
        assert_eq!(
            spec.healthcheck.as_deref(),
            Some(
                &[
                    "CMD-SHELL".to_string(),
                    "wget -q --spider --no-check-certificate https://127.0.0.1:8443/health || exit 1"
                        .to_string()
                ][..]
            )
        );
        assert_eq!(
            spec.tmpfs["/config"],
            "rw,nosuid,nodev,noexec,size=1m,uid=1100,gid=1200"
        );
        assert!(spec.cap_add.is_empty());
        assert!(spec.readonly_rootfs);
        assert_eq!(
            (spec.nano_cpus, spec.memory, spec.pids),
            (1_000_000_000, 1 << 30, 256)
        );
        assert_eq!(spec.labels["ai.backend.storage-agent.kind"], "filebrowser");
        assert_eq!(spec.labels["ai.backend.storage-agent.node"], "node1");
    }

    #[test]
    fn dufs_auth_rule_opens_only_read_write_mounts() {
        let spec = container_spec(&session(), &params(Engine::Dufs, "$6$salt$hash"));
        let i = spec.cmd.iter().position(|a| a == "--auth").unwrap();
        assert_eq!(spec.cmd[i + 1], "work:$6$salt$hash@/,/data:rw");
        assert!(spec.healthcheck.is_none());
        assert_eq!(spec.user.as_deref(), Some("1100:1200"));
    }
}
