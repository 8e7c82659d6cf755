//! `[agent]`, `[agent.rpc]`, `[agent.sftp]`: the storage-agent half (per-user session
//! containers).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::ListenerConfig;
use super::reader::Section;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Serve the RPC listener and host sessions. With `false` the daemon is a storage proxy only.
    pub enabled: bool,
    /// Address session ports are published on.
    pub public_addr: IpAddr,
    /// The name (or IP) users connect to: in endpoint URLs and certificate SANs.
    pub public_host: String,
    pub port_range: (u16, u16),
    pub max_containers: u32,
    pub max_sessions_per_user: u32,
    pub resource_group: String,
    pub region: String,
    /// Owner of files written inside sessions, like compute sessions' kernel uid/gid.
    pub kernel_uid: u32,
    pub kernel_gid: u32,
    pub default_limits: Limits,
    pub max_limits: Limits,
    /// Host memory and CPU kept for the node itself, not offered to sessions.
    pub reserve_memory: u64,
    pub reserve_cpus: f64,
    /// Limits are caps, not reservations (BEP-1007): mostly idle sessions may share CPUs.
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub session_ttl: Duration,
    pub max_session_ttl: Duration,
    pub idle_timeout: Duration,
    pub reap_interval: Duration,
    /// How long an ended session stays visible to GetSession and ListSessions.
    pub ended_retention: Duration,
    /// How often sessions' writable vfolders on object-store volumes are recounted against
    /// their quota (and made read-only when full).
    pub quota_check_interval: Duration,
    pub start_timeout: Duration,
    pub docker_socket: String,
    /// The Docker network sessions join (made with inter-container traffic off when missing);
    /// `bridge` is Docker's default network.
    pub network: String,
    pub base_image: String,
    pub heartbeat_interval: Duration,
    pub rpc: RpcConfig,
    pub sftp: SftpConfig,
    pub filebrowser: FilebrowserConfig,
    pub tls: AgentTlsConfig,
}

#[derive(Debug, Clone)]
pub struct FilebrowserConfig {
    /// "dufs" (built here) or "filebrowser" (the official, archived image).
    pub engine: String,
    /// An operator's own image for the engine instead of the default.
    pub image: Option<String>,
    /// The dufs binary copied into the built image (`cargo install dufs`).
    pub dufs_binary: PathBuf,
    /// The official image, pulled when missing on nodes that reach a registry.
    pub filebrowser_image: String,
}

/// Certificates of file browser sessions (and, with `[api.*] ssl-enabled`, the listeners).
#[derive(Debug, Clone)]
pub struct AgentTlsConfig {
    /// An operator certificate and key used as they are.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// An operator CA that signs the per-session certificates.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Upper bound of a session certificate's validity (it also ends with the session).
    pub leaf_validity: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub cpus: f64,
    pub memory: u64,
    pub pids: i64,
}

#[derive(Debug, Clone)]
pub struct RpcConfig {
    pub listener: ListenerConfig,
    /// Bearer secret of every RPC call; generated and persisted when absent.
    pub secret: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SftpConfig {
    /// An operator's own image instead of the one built from docker/sftp.
    pub image: Option<String>,
}

/// `enabled_by_default`: false for a Backend.AI storage-proxy.toml taken as it is.
pub(super) fn read(root: &Section, enabled_by_default: bool) -> AgentConfig {
    let a = root.section("agent");
    let default_limits = Limits {
        cpus: a.float_in("default-cpus", 0.01, 1024.0, 1.0),
        memory: a.size("default-memory", 1 << 30),
        pids: a.int_in("default-pids", 16, 1 << 22, 256),
    };
    let max_limits = Limits {
        cpus: a.float_in("max-cpus", 0.01, 1024.0, 4.0),
        memory: a.size("max-memory", 8 << 30),
        pids: a.int_in("max-pids", 16, 1 << 22, 4096),
    };
    let public_addr: IpAddr = match a.opt_string("public-addr") {
        None => IpAddr::from([127, 0, 0, 1]),
        Some(s) => s.parse().unwrap_or_else(|_| {
            a.problems().push(
                a.key_path("public-addr"),
                format!("{s:?}"),
                "an IP address of this host (0.0.0.0 for all)",
            );
            IpAddr::from([127, 0, 0, 1])
        }),
    };
    let port_range = read_port_range(&a);
    let rpc_sec = a.section("rpc");
    let rpc = RpcConfig {
        listener: super::read_listener_at(&rpc_sec, "127.0.0.1:6023"),
        secret: rpc_sec.opt_string("secret"),
    };
    if let Some(s) = &rpc.secret {
        super::check_secret(&rpc_sec, "secret", s);
    }
    rpc_sec.finish(&[]);
    let sftp_sec = a.section("sftp");
    let sftp = SftpConfig {
        image: sftp_sec.opt_string("image").filter(|s| !s.is_empty()),
    };
    sftp_sec.finish(&[]);
    let fb = a.section("filebrowser");
    let filebrowser = FilebrowserConfig {
        engine: fb.choice("engine", &["dufs", "filebrowser"], "dufs"),
        image: fb.opt_string("image").filter(|s| !s.is_empty()),
        dufs_binary: fb.path("dufs-binary", "/usr/local/bin/dufs"),
        filebrowser_image: fb.string("filebrowser-image", "filebrowser/filebrowser:v2.63.23"),
    };
    fb.finish(&[]);
    let tls_sec = a.section("tls");
    let tls = AgentTlsConfig {
        cert: tls_sec.opt_path("cert"),
        key: tls_sec.opt_path("key"),
        ca_cert: tls_sec.opt_path("ca-cert"),
        ca_key: tls_sec.opt_path("ca-key"),
        leaf_validity: tls_sec.duration("leaf-validity", Duration::from_secs(7 * 86400)),
    };
    check_tls_files(&tls_sec, &tls);
    tls_sec.finish(&[]);
    let cfg = AgentConfig {
        enabled: a.bool("enabled", enabled_by_default),
        public_addr,
        public_host: a.string("public-host", &public_addr.to_string()),
        port_range,
        max_containers: a.int_in("max-containers", 0, 100_000, 32) as u32,
        max_sessions_per_user: a.int_in("max-sessions-per-user", 1, 100_000, 1) as u32,
        resource_group: a.string("resource-group", "storage"),
        region: a.string("region", "local"),
        kernel_uid: a.int_in("kernel-uid", 1, i64::from(u32::MAX - 1), 1000) as u32,
        kernel_gid: a.int_in("kernel-gid", 1, i64::from(u32::MAX - 1), 1000) as u32,
        default_limits,
        max_limits,
        reserve_memory: a.size("reserve-memory", 1 << 30),
        reserve_cpus: a.float_in("reserve-cpus", 0.0, 1024.0, 0.5),
        cpu_overcommit: a.float_in("cpu-overcommit", 1.0, 1000.0, 8.0),
        memory_overcommit: a.float_in("memory-overcommit", 1.0, 100.0, 1.0),
        session_ttl: a.duration("session-ttl", Duration::from_secs(8 * 3600)),
        max_session_ttl: a.duration("max-session-ttl", Duration::from_secs(7 * 86400)),
        idle_timeout: a.duration("idle-timeout", Duration::from_secs(3600)),
        reap_interval: a.duration("reap-interval", Duration::from_secs(30)),
        ended_retention: a.duration("ended-retention", Duration::from_secs(7 * 86400)),
        quota_check_interval: a.duration("quota-check-interval", Duration::from_secs(30)),
        start_timeout: a.duration("start-timeout", Duration::from_secs(120)),
        docker_socket: a.string("docker-socket", "/var/run/docker.sock"),
        network: a.string("network", "storage-agent"),
        base_image: a.string("base-image", "debian:bookworm-slim"),
        heartbeat_interval: a.duration("heartbeat-interval", Duration::from_secs(20)),
        rpc,
        sftp,
        filebrowser,
        tls,
    };
    for (what, d, m) in [
        ("cpus", cfg.default_limits.cpus, cfg.max_limits.cpus),
        (
            "memory",
            cfg.default_limits.memory as f64,
            cfg.max_limits.memory as f64,
        ),
        (
            "pids",
            cfg.default_limits.pids as f64,
            cfg.max_limits.pids as f64,
        ),
    ] {
        if d > m {
            a.problems().push(
                a.key_path(&format!("default-{what}")),
                format!("{d}"),
                format!("at most max-{what} ({m})"),
            );
        }
    }
    if cfg.default_limits.memory < 16 << 20 {
        a.problems().push(
            a.key_path("default-memory"),
            cfg.default_limits.memory.to_string(),
            "at least 16 MiB",
        );
    }
    if cfg.session_ttl > cfg.max_session_ttl {
        a.problems().push(
            a.key_path("session-ttl"),
            format!("{:?}", cfg.session_ttl),
            "at most max-session-ttl",
        );
    }
    if cfg.reap_interval.is_zero() || cfg.heartbeat_interval.is_zero() {
        a.problems().push(
            a.key_path("reap-interval"),
            "0",
            "reap-interval and heartbeat-interval above zero",
        );
    }
    if cfg.ended_retention.is_zero() {
        // Zero would forget a failed session, and why it failed, before anyone could ask.
        a.problems()
            .push(a.key_path("ended-retention"), "0", "above zero");
    }
    if cfg.quota_check_interval.is_zero() {
        a.problems()
            .push(a.key_path("quota-check-interval"), "0", "above zero");
    }
    // Docker's rule for network names.
    let valid_network = cfg.network.starts_with(|c: char| c.is_ascii_alphanumeric())
        && cfg
            .network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid_network {
        a.problems().push(
            a.key_path("network"),
            format!("{:?}", cfg.network),
            "a Docker network name ([a-zA-Z0-9][a-zA-Z0-9_.-]*), or bridge for Docker's default",
        );
    }
    if cfg.public_host.is_empty() || cfg.public_host.contains(char::is_whitespace) {
        a.problems().push(
            a.key_path("public-host"),
            format!("{:?}", cfg.public_host),
            "a DNS name or an IP address",
        );
    }
    a.finish(&["rpc", "sftp", "filebrowser", "tls"]);
    cfg
}

/// Operator certificates must be usable: both halves given, readable, matching, not expired.
/// These are start-up errors with the path and the reason, never a failure at first use.
fn check_tls_files(sec: &Section, t: &AgentTlsConfig) {
    let pairs = [
        ("cert", "key", &t.cert, &t.key, false),
        ("ca-cert", "ca-key", &t.ca_cert, &t.ca_key, true),
    ];
    for (ck, kk, c, k, is_ca) in pairs {
        match (c, k) {
            (None, None) => {}
            (Some(c), Some(k)) => {
                let r = if is_ca {
                    crate::tls::check_ca(c, k)
                } else {
                    crate::tls::check_cert_key(c, k)
                };
                if let Err(e) = r {
                    sec.problems().push(
                        sec.key_path(ck),
                        e.to_string(),
                        if is_ca {
                            "a valid CA certificate (PEM) and its PKCS#8 key"
                        } else {
                            "a valid certificate chain (PEM) and its private key"
                        },
                    );
                }
            }
            (Some(_), None) | (None, Some(_)) => sec.problems().push(
                sec.key_path(if c.is_some() { kk } else { ck }),
                "missing",
                format!("{ck} and {kk} together"),
            ),
        }
    }
    if t.cert.is_some() && t.ca_cert.is_some() {
        sec.problems().push(
            sec.key_path("ca-cert"),
            "given together with cert",
            "either cert/key (used as is) or ca-cert/ca-key (signs per-session certificates)",
        );
    }
}

fn read_port_range(a: &Section) -> (u16, u16) {
    let default = (30000, 30999);
    let Some(v) = a.get("port-range") else {
        return default;
    };
    let parsed = match v {
        toml::Value::Array(items) if items.len() == 2 => {
            match (items[0].as_integer(), items[1].as_integer()) {
                (Some(lo), Some(hi)) => Some((lo, hi)),
                _ => None,
            }
        }
        toml::Value::String(s) => s
            .split_once('-')
            .and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))),
        _ => None,
    };
    match parsed {
        Some((lo, hi)) if 1 <= lo && lo <= hi && hi <= 65535 => (lo as u16, hi as u16),
        _ => {
            a.problems().push(
                a.key_path("port-range"),
                super::reader::show(v),
                "[low, high] or \"low-high\" with 1 <= low <= high <= 65535",
            );
            default
        }
    }
}

impl AgentConfig {
    /// The RPC listener's address, for heartbeats and logs.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc.listener.addr
    }

    pub fn port_count(&self) -> u32 {
        u32::from(self.port_range.1 - self.port_range.0) + 1
    }
}

/// Where the daemon keeps per-node agent material (host keys, CA) and per-session files.
pub fn agent_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("agent")
}
