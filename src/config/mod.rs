//! Typed configuration, compatible with Backend.AI's `storage-proxy.toml` plus our own sections.
//!
//! Loading never stops at the first mistake: every problem is collected with its key path, the
//! bad value and what is allowed, so `storage-agent config check` and `serve` report the same
//! complete list.

pub mod agent;
pub mod cluster;
mod locate;
pub mod object;
mod reader;
pub mod remote;
pub mod secrets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cluster::{EtcdConfig, RedisConfig, RedisServer, RedisTarget};
pub use locate::{BACKEND_ENV_CONFIG, ConfigSource, ENV_CONFIG, LOOKUP_PATHS, locate};
pub use reader::{Problem, parse_duration, parse_size};
use reader::{Problems, Section, absolutize};

/// Volume backends this build can serve.
pub const BACKENDS: &[&str] = &["vfs", "xfs", "btrfs", "cephfs", "s3", "azure-blob"];

/// Backends of Backend.AI's Python proxy that this build does not implement: refused by name.
const PYTHON_ONLY_BACKENDS: &[&str] = &[
    "purestorage",
    "netapp",
    "weka",
    "gpfs",
    "spectrumscale",
    "dellemc-onefs",
    "vast",
    "exascaler",
    "hammerspace",
    "hammerspace-base",
    "noop",
];

/// Backends whose vfolders are objects in a remote service, not directories on this host.
pub const OBJECT_BACKENDS: &[&str] = &["s3", "azure-blob"];

/// Sections and keys of Backend.AI's storage-proxy.toml that we accept so an existing file can be
/// reused, but that mean nothing here (no worker processes, no aiomonitor).
const IGNORED_PROXY_KEYS: &[&str] = &[
    "num-proc",
    "event-loop",
    "ipc-base-path",
    "aiomonitor-termui-port",
    "aiomonitor-port",
    "aiomonitor-webui-port",
    "use-watcher",
    "watcher-insock-path-prefix",
    "watcher-outsock-path-prefix",
    "volume-stats",
];
const IGNORED_TABLES: &[&str] = &[
    "logging",
    "debug",
    "service-discovery",
    "otel",
    "pyroscope",
    "artifact-storages",
    "artifact-registries",
    "reservoir-client",
    "storages",
    "registries",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("config {path} has {} problem(s):\n{}", problems.len(), format_problems(problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Owner given to files and directories the daemon creates (Backend.AI's `[storage-proxy]
/// user/group`), so sessions running as that uid can change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Connection limits of every listener, from `[storage-agent]` (`api::conn` applies them).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: ConfigSource,
    pub proxy: ProxyConfig,
    pub daemon: DaemonConfig,
    pub client_api: ListenerConfig,
    pub manager_api: ManagerApiConfig,
    pub volumes: Vec<VolumeConfig>,
    pub agent: agent::AgentConfig,
    /// Cross-node coordination and the Backend.AI event bus; absent on a single node.
    pub redis: Option<RedisConfig>,
    /// Backend.AI's etcd: where `config/redis` says the cluster's Redis is.
    pub etcd: Option<EtcdConfig>,
    /// Keys and tables accepted for compatibility and ignored; logged at start.
    pub ignored: Vec<String>,
    /// Accepted, but worth the operator's attention: printed by `config check`, logged at start.
    pub warnings: Vec<String>,
}

/// `[storage-proxy]`
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node_id: String,
    /// HS256 key of client-API tokens; generated and persisted when absent.
    pub secret: Option<String>,
    pub session_expire: Duration,
    /// Max entries per listing; 0 = unlimited.
    pub scandir_limit: usize,
    pub max_upload_size: u64,
    pub allow_auto_quota_scope_creation: bool,
    /// Owner of files and directories the daemon creates (Backend.AI's `user`/`group`, names or
    /// numbers). Sessions run as the same uid, so they can change what the APIs create.
    pub owner: Option<Owner>,
    /// Backend.AI's `pid-file`: where the daemon writes its pid (none for `/dev/null`).
    pub pid_file: Option<PathBuf>,
}

/// `[storage-agent]`: what is ours.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: String,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// An upload PATCH whose body sends nothing for this long is cut off (its bytes kept).
    pub upload_idle_timeout: Duration,
    /// A long PATCH is made durable (synced, offset committed) at least this often...
    pub upload_checkpoint_interval: Duration,
    /// ...and every this many bytes.
    pub upload_checkpoint_bytes: u64,
    /// A PATCH holding an upload's lock without progress for this long may be taken over.
    pub upload_lock_stale_after: Duration,
    /// Largest JSON body the manager API reads.
    pub max_json_body: usize,
    pub upload_reap_interval: Duration,
    /// How often each volume is checked (statvfs, device id, marker file).
    pub volume_check_interval: Duration,
    /// A check not finished by then marks the volume offline (a hung mount).
    pub volume_check_timeout: Duration,
    /// Caps and timeouts for every listener's connections.
    pub conn: ConnLimits,
    /// Threads for blocking file I/O (tokio's blocking pool).
    pub blocking_threads: usize,
    /// Zip archives being produced at once on this node, and per download token.
    pub max_archives: usize,
    pub max_archives_per_owner: usize,
    /// Files downloaded over plain HTTP/1 go from the page cache to the socket by `splice`,
    /// never copied through the process (off: read and written, as over TLS).
    pub zero_copy_downloads: bool,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub ssl_enabled: bool,
    pub ssl_cert: Option<PathBuf>,
    pub ssl_privkey: Option<PathBuf>,
}

/// `[api.manager]`
#[derive(Debug, Clone)]
pub struct ManagerApiConfig {
    pub listener: ListenerConfig,
    /// Value expected in `X-BackendAI-Storage-Auth-Token`; generated and persisted when absent.
    pub secret: Option<String>,
    pub internal_addr: SocketAddr,
    /// `host:port` the manager API is announced at (service discovery); default: as bound.
    pub announce_addr: Option<String>,
    /// `host:port` Prometheus scrapes `/metrics` at (service discovery); default: as bound.
    pub announce_internal_addr: Option<String>,
}

/// `[volume.<name>]`
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub backend: String,
    pub path: PathBuf,
    pub fsprefix: String,
    pub options: toml::Table,
    /// The service of an object-store backend (`s3`, `azure-blob`).
    pub object: Option<object::ObjectConfig>,
    /// A remote filesystem mounted at `path`, at startup or on request.
    pub mount: Option<remote::RemoteMount>,
    /// `xfs` only: the directory of the `projects` and `projid` files to keep (normally `/etc`);
    /// none kept when unset.
    pub project_files: Option<PathBuf>,
}

const EMBEDDED: &str = r#"
[storage-proxy]
session-expire = "1d"

[volume.local]
backend = "vfs"
path = "./data/local"
"#;

/// Whether a volume's directory can hold its backend (`volume::scopes::check`: xfs and btrfs
/// need their filesystem with quotas on). Passed in by the caller, so `config` reads files
/// and imports nothing of `volume`.
pub type DirCheck = fn(backend: &str, path: &Path) -> Result<(), String>;

/// `load`, and every directory volume's path checked with `check`.
pub fn load_checked(source: &ConfigSource, check: DirCheck) -> Result<Config, ConfigError> {
    let config = load(source)?;
    let problems = Problems::default();
    for v in &config.volumes {
        if v.object.is_none()
            && v.path.is_dir()
            && let Err(why) = check(&v.backend, &v.path)
        {
            problems.push(
                format!("volume.{}.path", v.name),
                format!("{} ({why})", v.path.display()),
                format!("a directory on {} with quotas on", v.backend),
            );
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: source.to_string(),
            problems: problems.into_vec(),
        })
    }
}

/// Reads and validates the configuration. The embedded default creates its volume directory.
pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
    let (text, label) = match source {
        ConfigSource::File(p) => (
            std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                path: p.clone(),
                source: e,
            })?,
            p.display().to_string(),
        ),
        ConfigSource::Embedded => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
            let dir = absolutize(Path::new("./data/local"), &cwd);
            std::fs::create_dir_all(&dir).map_err(|e| ConfigError::Read {
                path: dir.clone(),
                source: e,
            })?;
            (EMBEDDED.to_string(), source.to_string())
        }
    };
    parse(&text, &label, source.clone())
}

pub fn parse(text: &str, label: &str, source: ConfigSource) -> Result<Config, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: label.to_string(),
        message: e.to_string(),
    })?;
    let problems = Problems::default();
    // Relative paths are relative to the file's directory, as in Backend.AI (its loader
    // changes into that directory before validating).
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let base = match &source {
        ConfigSource::File(p) => match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => absolutize(d, &cwd),
            _ => cwd,
        },
        ConfigSource::Embedded => cwd,
    };
    let config = read(&table, &problems, source, &base);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: label.to_string(),
            problems: problems.into_vec(),
        })
    }
}

fn default_state_dir() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'; the first is ours.
        Some(dirs) => {
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            absolutize(Path::new(&first), &cwd)
        }
        None => absolutize(Path::new("./state"), &cwd),
    }
}

fn default_node_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "storage-agent".to_string())
}

fn read(table: &toml::Table, problems: &Problems, source: ConfigSource, base: &Path) -> Config {
    let root = Section::root(table, problems, base);
    let mut ignored = Vec::new();
    // A Backend.AI storage-proxy.toml knows nothing of our sections: taken as it is, it runs
    // the storage proxy only (no session agent, no gRPC listener it never asked for).
    let python_file = matches!(source, ConfigSource::File(_))
        && root.get("storage-agent").is_none()
        && root.get("agent").is_none();

    let sp = root.section("storage-proxy");
    let proxy = ProxyConfig {
        node_id: sp.string("node-id", &default_node_id()),
        secret: sp.opt_string("secret"),
        session_expire: sp.duration("session-expire", Duration::from_secs(86400)),
        scandir_limit: sp.int_in("scandir-limit", 0, i64::from(u32::MAX), 1000) as usize,
        max_upload_size: sp.size("max-upload-size", 100 << 30),
        // Backend.AI's alias `auto_quota_scope_creation` (read as kebab-case like every key).
        allow_auto_quota_scope_creation: sp.bool(
            sp.first_of(&[
                "allow-auto-quota-scope-creation",
                "auto-quota-scope-creation",
            ]),
            true,
        ),
        owner: read_owner(&sp),
        pid_file: sp
            .opt_path("pid-file")
            .filter(|p| p != Path::new("/dev/null")),
    };
    if proxy.node_id.is_empty() || proxy.node_id.contains(char::is_whitespace) {
        problems.push(
            sp.key_path("node-id"),
            format!("{:?}", proxy.node_id),
            "a non-empty name without spaces",
        );
    }
    if proxy.session_expire.as_secs() < 1 {
        problems.push(
            sp.key_path("session-expire"),
            format!("{:?}", proxy.session_expire),
            "at least 1 second",
        );
    }
    if let Some(s) = &proxy.secret {
        check_secret(&sp, "secret", s);
    }
    for k in IGNORED_PROXY_KEYS {
        if sp.get(k).is_some() {
            ignored.push(sp.key_path(k));
        }
    }
    sp.finish_lenient();

    // Backend.AI's `[logging] level`, when ours is not set.
    let python_level = root
        .section("logging")
        .opt_string("level")
        .and_then(|l| python_log_level(&l));
    let ours = root.section("storage-agent");
    let daemon = DaemonConfig {
        // A path written in the file is relative to the file; the default is not: systemd's
        // StateDirectory= when the unit has one, else ./state in the working directory.
        state_dir: ours.opt_path("state-dir").unwrap_or_else(default_state_dir),
        log_format: match ours
            .choice("log-format", &["text", "json"], "text")
            .as_str()
        {
            "json" => LogFormat::Json,
            _ => LogFormat::Text,
        },
        log_level: ours
            .opt_string("log-level")
            .or(python_level)
            .unwrap_or_else(|| "info".to_string()),
        shutdown_grace: ours.duration("shutdown-grace", Duration::from_secs(30)),
        upload_idle_timeout: ours.duration("upload-idle-timeout", Duration::from_secs(60)),
        upload_lock_stale_after: ours.duration("upload-lock-stale-after", Duration::from_secs(10)),
        upload_checkpoint_interval: ours
            .duration("upload-checkpoint-interval", Duration::from_secs(1)),
        upload_checkpoint_bytes: ours.size("upload-checkpoint-bytes", 64 << 20),
        max_json_body: ours.size("max-json-body", 1 << 20) as usize,
        upload_reap_interval: ours.duration("upload-reap-interval", Duration::from_secs(60)),
        volume_check_interval: ours.duration("volume-check-interval", Duration::from_secs(10)),
        volume_check_timeout: ours.duration("volume-check-timeout", Duration::from_secs(5)),
        conn: ConnLimits {
            first_byte_timeout: ours.duration("first-byte-timeout", Duration::from_secs(10)),
            idle_timeout: ours.duration("idle-timeout", Duration::from_secs(75)),
            write_idle_timeout: ours.duration("write-idle-timeout", Duration::from_secs(60)),
            max_connections: ours.int_in("max-connections", 1, 1 << 20, 8192) as usize,
            max_connections_per_ip: ours.int_in("max-connections-per-ip", 1, 1 << 20, 512) as usize,
        },
        blocking_threads: ours.int_in("blocking-threads", 8, 4096, 512) as usize,
        max_archives: ours.int_in("max-archives", 1, 4096, 16) as usize,
        max_archives_per_owner: {
            // per token until review 2 (G10): the old name is still read
            let key = ours.first_of(&["max-archives-per-owner", "max-archives-per-token"]);
            ours.int_in(key, 1, 4096, 2) as usize
        },
        zero_copy_downloads: ours.bool("zero-copy-downloads", true),
    };
    let c = &daemon.conn;
    if daemon.upload_checkpoint_bytes == 0 {
        problems.push(ours.key_path("upload-checkpoint-bytes"), "0", "above zero");
    }
    for (key, d) in [
        (
            "upload-checkpoint-interval",
            daemon.upload_checkpoint_interval,
        ),
        ("first-byte-timeout", c.first_byte_timeout),
        ("idle-timeout", c.idle_timeout),
        ("write-idle-timeout", c.write_idle_timeout),
    ] {
        if d.is_zero() {
            problems.push(ours.key_path(key), "0", "a duration above zero");
        }
    }
    if daemon.volume_check_interval.is_zero() || daemon.volume_check_timeout.is_zero() {
        problems.push(
            ours.key_path("volume-check-interval"),
            "0",
            "volume-check-interval and volume-check-timeout above zero",
        );
    }
    if tracing_subscriber::EnvFilter::try_new(&daemon.log_level).is_err() {
        problems.push(
            ours.key_path("log-level"),
            format!("{:?}", daemon.log_level),
            "trace, debug, info, warn, error, or a tracing filter like \"info,storage_agent=debug\"",
        );
    }
    ours.finish(&[]);

    let api = root.section("api");
    let client = api.section("client");
    let client_api = read_listener(&client, "127.0.0.1:6021");
    client.finish_lenient();
    let manager = api.section("manager");
    let manager_api = ManagerApiConfig {
        listener: read_listener(&manager, "127.0.0.1:6022"),
        secret: manager.opt_string("secret"),
        internal_addr: manager.addr("internal-addr", "127.0.0.1:16023"),
        announce_addr: manager.announce_addr("announce-addr"),
        announce_internal_addr: manager.announce_addr("announce-internal-addr"),
    };
    if let Some(s) = &manager_api.secret {
        check_secret(&manager, "secret", s);
    }
    manager.finish_lenient();
    api.finish_lenient();

    let agent = agent::read(&root, !python_file);
    if python_file {
        problems.warn(
            "a Backend.AI storage-proxy.toml (no [storage-agent] or [agent] table): the storage agent (SFTP and file browser sessions) is off; add [agent] enabled = true for it",
        );
    }
    // What the daemon writes into volumes (uploads, mkdirs, clones, vfolder roots) belongs to
    // Backend.AI's `[storage-proxy] user/group` when set, else to the kernel uid/gid that
    // sessions and compute containers run as: never to root, whether or not the agent part is
    // enabled. (The Python proxy gets the same effect by dropping to `user/group` after binding.)
    let mut proxy = proxy;
    if proxy.owner.is_none() && nix::unistd::geteuid().is_root() {
        proxy.owner = Some(Owner {
            uid: agent.kernel_uid,
            gid: agent.kernel_gid,
        });
    }

    let mut volumes = Vec::new();
    for (name, sec) in root.named_sections("volume") {
        volumes.push(read_volume(name, &sec));
        sec.finish(&[]);
    }
    if volumes.is_empty() {
        problems.push("volume", "no [volume.<name>] table", "at least one volume");
    }

    check_distinct_addrs(
        problems,
        &[
            ("api.client.service-addr", client_api.addr),
            ("api.manager.service-addr", manager_api.listener.addr),
            ("api.manager.internal-addr", manager_api.internal_addr),
            ("agent.rpc.service-addr", agent.rpc.listener.addr),
        ],
    );

    let redis = cluster::read_redis(&root);
    let etcd = cluster::read_etcd(&root);
    if etcd.is_none() && redis.as_ref().is_some_and(|r| r.server.is_none()) {
        problems.push(
            "redis",
            "no addr and no sentinel",
            "addr = \"host:port\", or sentinel = [...] with service-name, or an [etcd] table whose config/redis says where Redis is",
        );
    }

    for t in IGNORED_TABLES {
        if root.get(t).is_some() {
            ignored.push(format!("[{t}]"));
        }
    }
    root.finish_lenient();
    let warnings = problems.take_warnings();

    Config {
        source,
        proxy,
        daemon,
        client_api,
        manager_api,
        volumes,
        agent,
        redis,
        etcd,
        ignored,
        warnings,
    }
}

/// Backend.AI's log level names as a tracing filter.
fn python_log_level(level: &str) -> Option<String> {
    Some(
        match level.to_ascii_uppercase().as_str() {
            "TRACE" => "trace",
            "DEBUG" => "debug",
            "INFO" | "NOTSET" => "info",
            "WARNING" | "WARN" => "warn",
            "ERROR" | "CRITICAL" => "error",
            _ => return None,
        }
        .to_string(),
    )
}

/// `user`/`group`: numeric ids or names resolved on this host. Either alone takes the other
/// from the user's primary group or stays as the daemon's.
fn read_owner(sec: &Section) -> Option<Owner> {
    let id = |key: &str, by_name: &dyn Fn(&str) -> Option<u32>| -> Option<u32> {
        match sec.get(key)? {
            toml::Value::Integer(i) if (0..=i64::from(u32::MAX)).contains(i) => Some(*i as u32),
            // Backend.AI's "the default" (-1: the process's own id, "": the installer's); here
            // both leave the owner to the default below.
            toml::Value::Integer(-1) => None,
            toml::Value::String(s) if s.is_empty() || s == "-1" => None,
            toml::Value::String(s) => {
                if let Ok(n) = s.parse::<u32>() {
                    return Some(n);
                }
                let found = by_name(s);
                if found.is_none() {
                    sec.problems().push(
                        sec.key_path(key),
                        format!("{s:?} (no such {key} on this host)"),
                        format!("an existing {key} name or a numeric id"),
                    );
                }
                found
            }
            other => {
                sec.problems().push(
                    sec.key_path(key),
                    reader::show(other),
                    "a name or a numeric id",
                );
                None
            }
        }
    };
    let user_by_name = |n: &str| {
        nix::unistd::User::from_name(n)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    let group_by_name = |n: &str| {
        nix::unistd::Group::from_name(n)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    };
    let uid = id("user", &user_by_name);
    let gid = id("group", &group_by_name);
    match (uid, gid) {
        (None, None) => None,
        (Some(uid), Some(gid)) => Some(Owner { uid, gid }),
        (Some(uid), None) => {
            let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.gid.as_raw())
                .unwrap_or_else(|| nix::unistd::getgid().as_raw());
            Some(Owner { uid, gid })
        }
        (None, Some(gid)) => Some(Owner {
            uid: nix::unistd::getuid().as_raw(),
            gid,
        }),
    }
}

/// An empty secret is refused. A short one is accepted with a warning: the manager's copy of
/// `[api.manager] secret` must match, so an operator taking over a Python proxy's file cannot
/// change it on this side alone.
pub(crate) fn check_secret(sec: &Section, key: &str, value: &str) {
    if value.is_empty() {
        sec.problems().push(
            sec.key_path(key),
            "an empty secret",
            "a secret (at least 16 characters), or leave the key out to have one generated",
        );
    } else if value.len() < 16 {
        sec.problems().warn(format!(
            "{}: a {}-character secret is easy to guess; use at least 16 characters",
            sec.key_path(key),
            value.len()
        ));
    }
}

fn read_listener(sec: &Section, default_addr: &str) -> ListenerConfig {
    read_listener_at(sec, default_addr)
}

pub(crate) fn read_listener_at(sec: &Section, default_addr: &str) -> ListenerConfig {
    let l = ListenerConfig {
        addr: sec.addr("service-addr", default_addr),
        ssl_enabled: sec.bool("ssl-enabled", false),
        ssl_cert: sec.opt_path("ssl-cert"),
        ssl_privkey: sec.opt_path("ssl-privkey"),
    };
    if l.ssl_enabled && l.ssl_cert.is_some() != l.ssl_privkey.is_some() {
        sec.problems().push(
            sec.key_path(if l.ssl_cert.is_some() {
                "ssl-privkey"
            } else {
                "ssl-cert"
            }),
            "missing",
            "ssl-cert and ssl-privkey together, or neither (a self-signed certificate is made)",
        );
    }
    if let (true, Some(c), Some(k)) = (l.ssl_enabled, &l.ssl_cert, &l.ssl_privkey)
        && let Err(e) = crate::tls::check_cert_key(c, k)
    {
        sec.problems().push(
            sec.key_path("ssl-cert"),
            e.to_string(),
            "a valid certificate chain (PEM) and its private key",
        );
    }
    l
}

fn read_volume(name: String, sec: &Section) -> VolumeConfig {
    let backend = match sec.opt_string("backend") {
        Some(b) if PYTHON_ONLY_BACKENDS.contains(&b.as_str()) => {
            sec.problems().push(
                sec.key_path("backend"),
                format!("{b:?}: a backend of Backend.AI's Python proxy that storage-agent does not implement"),
                format!("one of {}", BACKENDS.join(", ")),
            );
            "vfs".to_string()
        }
        _ => sec.choice("backend", BACKENDS, "vfs"),
    };
    let is_object = OBJECT_BACKENDS.contains(&backend.as_str());
    let v = VolumeConfig {
        path: sec.path("path", ""),
        fsprefix: sec.string("fsprefix", "."),
        options: sec.raw_table("options"),
        object: if is_object {
            object::read(sec, &backend)
        } else {
            None
        },
        mount: remote::read(sec, &backend),
        project_files: sec.opt_string("project-files").map(PathBuf::from),
        backend,
        name,
    };
    if let Some(dir) = &v.project_files {
        if v.backend != "xfs" {
            sec.problems().push(
                sec.key_path("project-files"),
                format!("set on a {} volume", v.backend),
                "only on xfs volumes (the XFS project files)",
            );
        } else if !dir.is_dir() {
            sec.problems().push(
                sec.key_path("project-files"),
                format!("{} (not an existing directory)", dir.display()),
                "the directory of projects and projid, e.g. /etc",
            );
        }
    }
    if sec.get("backend").is_none() {
        sec.problems()
            .push(sec.key_path("backend"), "missing", BACKENDS.join(", "));
    }
    if !valid_volume_name(&v.name) {
        sec.problems().push(
            sec.name(),
            format!("volume name {:?}", v.name),
            "letters, digits, '-', '_' and '.', 1-64 characters",
        );
    }
    if is_object {
        // Objects live in the service; there is no directory to check.
        return v;
    }
    match sec.opt_string("path") {
        None => sec
            .problems()
            .push(sec.key_path("path"), "missing", "an existing directory"),
        Some(_) if !v.path.is_dir() => sec.problems().push(
            sec.key_path("path"),
            format!("{} (not an existing directory)", v.path.display()),
            "an existing directory",
        ),
        // (xfs and btrfs also need their filesystem with quotas on: `DirCheck`, by the caller)
        Some(_) => {}
    }
    v
}

fn valid_volume_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_distinct_addrs(problems: &Problems, addrs: &[(&str, SocketAddr)]) {
    for (i, (ka, a)) in addrs.iter().enumerate() {
        for (kb, b) in &addrs[i + 1..] {
            if a.port() != 0 && a == b {
                problems.push(
                    *kb,
                    a.to_string(),
                    format!("an address different from {ka}"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
