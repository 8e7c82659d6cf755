//! The SFTP session container: OpenSSH's internal-sftp chrooted to `/srv/sftp/<user>`, where each
//! mount appears as a directory. Accounts, keys and the host key are rendered on the host and
//! mounted read-only, which is what lets the container run with only SYS_CHROOT, SETUID and
//! SETGID (creating users inside it would need CHOWN and more).

use std::collections::HashMap;
use std::path::Path;

use super::{Kind, Session};
use crate::docker::{BindMount, ContainerSpec, LABEL_KIND, LABEL_NODE, LABEL_SESSION, LABEL_USER};

/// The smallest capability set sshd's privilege separation and chroot need (TESTENV §3:
/// dropping any one of them breaks login).
pub const SFTP_CAPS: &[&str] = &["SYS_CHROOT", "SETUID", "SETGID"];

/// A Docker container name: node and session, restricted to Docker's allowed characters.
pub fn container_name(node: &str, kind: Kind, id: uuid::Uuid) -> String {
    let node: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "sa-{node}-{}-{}",
        kind.as_str(),
        &id.simple().to_string()[..12]
    )
}

pub fn labels(node: &str, s: &Session) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_NODE.to_string(), node.to_string()),
        (LABEL_SESSION.to_string(), s.id.to_string()),
        (LABEL_KIND.to_string(), s.kind.as_str().to_string()),
        (LABEL_USER.to_string(), s.user_id.clone()),
        (
            "ai.backend.storage-agent.resource-group".to_string(),
            s.resource_group.clone(),
        ),
    ])
}

fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    crate::private_file::write_with_mode(path, contents.as_bytes(), mode)
}

/// passwd, group, shadow and authorized_keys for one session, in `dir`.
pub fn render_accounts(
    dir: &Path,
    s: &Session,
    password_hash: Option<&str>,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let user = &s.username;
    // sshd's privilege-separation user; any uid not the session user's will do.
    let sshd_uid = if uid == 74 { 75 } else { 74 };
    write_file(
        &dir.join("passwd"),
        &format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\n\
             sshd:x:{sshd_uid}:65534:sshd privsep:/run/sshd:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
             {user}:x:{uid}:{gid}:storage-agent session:/:/usr/sbin/nologin\n"
        ),
        0o644,
    )?;
    let group = if gid == 0 || gid == 65534 {
        String::new()
    } else {
        format!("sftpusers:x:{gid}:{user}\n")
    };
    write_file(
        &dir.join("group"),
        &format!("root:x:0:\nnogroup:x:65534:\n{group}"),
        0o644,
    )?;
    // "*" lets public keys in but no password; a generated password puts its hash here.
    let hash = password_hash.unwrap_or("*");
    write_file(
        &dir.join("shadow"),
        &format!(
            "root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n{user}:{hash}:19000:0:99999:7:::\n"
        ),
        0o600,
    )?;
    let mut keys = s.spec.public_keys.join("\n");
    keys.push('\n');
    write_file(&dir.join("authorized_keys"), &keys, 0o644)
}

pub struct SftpParams<'a> {
    pub node: &'a str,
    pub image: &'a str,
    pub files_dir: &'a Path,
    /// The session's staging mount points (`mounts.rs`), one per mount, in order.
    pub mounts_dir: &'a Path,
    pub host_key: &'a Path,
    pub public_addr: &'a str,
    pub port: u16,
}

pub fn container_spec(s: &Session, p: &SftpParams) -> ContainerSpec {
    let user = &s.username;
    let f = |name: &str| p.files_dir.join(name).display().to_string();
    let mut mounts = vec![
        BindMount::new(f("passwd"), "/etc/passwd", true),
        BindMount::new(f("group"), "/etc/group", true),
        BindMount::new(f("shadow"), "/etc/shadow", true),
        BindMount::new(
            f("authorized_keys"),
            format!("/etc/ssh/authorized_keys/{user}"),
            true,
        ),
        BindMount::new(
            p.host_key.display().to_string(),
            "/etc/ssh/hostkeys/ssh_host_ed25519_key",
            true,
        ),
    ];
    for (i, m) in s.spec.mounts.iter().enumerate() {
        mounts.push(BindMount::new(
            super::mounts::staged_path(p.mounts_dir, i)
                .display()
                .to_string(),
            s.kind.mount_target(user, &m.name),
            m.read_only,
        ));
    }
    ContainerSpec {
        name: container_name(p.node, s.kind, s.id),
        image: p.image.to_string(),
        cmd: vec![],
        entrypoint: None,
        env: vec![],
        user: None,
        labels: labels(p.node, s),
        mounts,
        tmpfs: HashMap::from([
            (
                "/run".to_string(),
                "rw,nosuid,nodev,noexec,size=16m,mode=0755".to_string(),
            ),
            (
                "/tmp".to_string(),
                "rw,nosuid,nodev,noexec,size=16m".to_string(),
            ),
        ]),
        ports: vec![(22, p.public_addr.to_string(), p.port)],
        nano_cpus: (s.spec.cpus * 1e9) as i64,
        memory: s.spec.memory as i64,
        pids: s.spec.pids,
        cap_add: SFTP_CAPS.iter().map(|c| c.to_string()).collect(),
        readonly_rootfs: true,
        healthcheck: None,
    }
}
