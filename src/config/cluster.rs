//! `[redis]` and `[etcd]`: where the cluster's Redis is, either given directly (a server or a
//! Sentinel group) or read from etcd `config/redis` as Backend.AI configures it.

use std::path::PathBuf;
use std::time::Duration;

use toml::Value;

use super::reader::{Section, show};

/// A Redis server, or a Sentinel group that names the master.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisTarget {
    Addr(String),
    Sentinel {
        sentinels: Vec<String>,
        service_name: String,
    },
}

/// How to reach one Redis (per Backend.AI role, when etcd overrides a role).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisServer {
    pub target: RedisTarget,
    pub username: Option<String>,
    pub password: Option<String>,
    /// For the sentinels themselves; falls back to `password`, as Backend.AI does.
    pub sentinel_password: Option<String>,
    pub tls: bool,
    /// A CA (PEM) to verify the Redis server with, instead of the system roots.
    pub tls_ca: Option<PathBuf>,
}

/// `[redis]`
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// None when `[redis]` only sets databases and etcd says where the server is.
    pub server: Option<RedisServer>,
    /// The storage agent's own keys: per-user session leases, node discovery, heartbeats.
    pub db: i64,
    /// Backend.AI's `stream` role: the `events` stream and the `bgtask.<id>` cache.
    pub stream_db: i64,
    /// Backend.AI's `statistics` role: `container_count.<node-id>`.
    pub stat_db: i64,
    /// Backend.AI's `live` role: service discovery for Prometheus.
    pub live_db: i64,
    /// How often a connection to a Sentinel-found master checks (ROLE) that it still is one.
    pub role_check_interval: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            server: None,
            db: 2,
            stream_db: 4,
            stat_db: 0,
            live_db: 0,
            role_check_interval: Duration::from_secs(5),
        }
    }
}

/// `[etcd]`, with Backend.AI's keys.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    pub namespace: String,
    /// `host:port` of each member, tried in order.
    pub addrs: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// One `host:port` in any of Backend.AI's forms, written back as `host:port` (IPv6 in
/// brackets, so it can go into a URL).
fn one_host_port(v: &Value) -> Option<String> {
    let (host, port) = super::reader::host_port(v)?;
    (!host.is_empty()).then(|| super::reader::join_host_port(&host, port))
}

/// `"h1:p1,h2:p2"`, a list of addresses, or one address, each in any of Backend.AI's forms
/// (`"h:p"`, `{host, port}`, `["h", p]`).
pub fn host_ports(v: &Value) -> Option<Vec<String>> {
    let list: Vec<String> = match v {
        Value::String(s) => s
            .split(',')
            .map(|x| x.trim())
            .filter(|x| !x.is_empty())
            .map(|x| one_host_port(&Value::String(x.to_string())))
            .collect::<Option<_>>()?,
        Value::Array(a) => match a.iter().map(one_host_port).collect::<Option<Vec<_>>>() {
            Some(list) => list,
            // `["host", port]` is one address.
            None => vec![one_host_port(v)?],
        },
        other => vec![one_host_port(other)?],
    };
    (!list.is_empty()).then_some(list)
}

fn read_host_ports(sec: &Section, key: &str) -> Option<Vec<String>> {
    let v = sec.get(key)?;
    let list = host_ports(v);
    if list.is_none() {
        sec.problems().push(
            sec.key_path(key),
            show(v),
            "\"host:port\", a list of them, or \"h1:p1,h2:p2\"",
        );
    }
    list
}

pub fn read_redis(root: &Section) -> Option<RedisConfig> {
    root.get("redis")?;
    let sec = root.section("redis");
    let mut cfg = RedisConfig {
        db: sec.int_in("db", 0, 15, 2),
        stream_db: sec.int_in("stream-db", 0, 15, 4),
        stat_db: sec.int_in("stat-db", 0, 15, 0),
        live_db: sec.int_in("live-db", 0, 15, 0),
        role_check_interval: sec.duration("role-check-interval", Duration::from_secs(5)),
        server: None,
    };
    if cfg.role_check_interval.is_zero() {
        sec.problems()
            .push(sec.key_path("role-check-interval"), "0", "above zero");
    }
    let addr = read_host_ports(&sec, "addr");
    let sentinels = read_host_ports(&sec, "sentinel");
    let service_name = sec.opt_string("service-name");
    let target = match (addr, sentinels) {
        (Some(_), Some(_)) => {
            sec.problems().push(
                sec.key_path("sentinel"),
                "both addr and sentinel",
                "one of them: addr for one server, sentinel + service-name for a Sentinel group",
            );
            None
        }
        (Some(a), None) if a.len() == 1 => a.into_iter().next().map(RedisTarget::Addr),
        (Some(a), None) => {
            sec.problems().push(
                sec.key_path("addr"),
                a.join(","),
                "one \"host:port\" (several servers are a Sentinel group: use sentinel)",
            );
            None
        }
        (None, Some(sentinels)) => match service_name {
            Some(service_name) => Some(RedisTarget::Sentinel {
                sentinels,
                service_name,
            }),
            None => {
                sec.problems().push(
                    sec.key_path("service-name"),
                    "missing",
                    "the master name the sentinels monitor (required with sentinel)",
                );
                None
            }
        },
        (None, None) => None,
    };
    cfg.server = target.map(|target| RedisServer {
        target,
        username: sec.opt_string("username").filter(|s| !s.is_empty()),
        password: sec.opt_string("password").filter(|s| !s.is_empty()),
        sentinel_password: sec
            .opt_string("sentinel-password")
            .filter(|s| !s.is_empty()),
        tls: sec.bool("tls", false),
        tls_ca: sec.opt_path("tls-ca"),
    });
    if let Some(ca) = cfg.server.as_ref().and_then(|s| s.tls_ca.as_ref())
        && !ca.is_file()
    {
        sec.problems().push(
            sec.key_path("tls-ca"),
            format!("{} (no such file)", ca.display()),
            "a PEM file",
        );
    }
    sec.finish(&[]);
    Some(cfg)
}

/// Backend.AI's environment overrides of `[etcd]`; any of them makes `[etcd]` present.
const ETCD_ENV: [&str; 4] = [
    "BACKEND_NAMESPACE",
    "BACKEND_ETCD_ADDR",
    "BACKEND_ETCD_USER",
    "BACKEND_ETCD_PASSWORD",
];

pub fn read_etcd(root: &Section) -> Option<EtcdConfig> {
    let env = |k: &str| std::env::var(k).ok();
    if root.get("etcd").is_none() && ETCD_ENV.iter().all(|k| env(k).is_none()) {
        return None;
    }
    let sec = root.section("etcd");
    let env_addr = env("BACKEND_ETCD_ADDR").map(|a| {
        let list = host_ports(&Value::String(a.clone()));
        if list.is_none() {
            sec.problems().push(
                "BACKEND_ETCD_ADDR (environment)",
                format!("{a:?}"),
                "\"host:port\"",
            );
        }
        list.unwrap_or_default()
    });
    let addrs = read_host_ports(&sec, "addr");
    let cfg = EtcdConfig {
        namespace: env("BACKEND_NAMESPACE").unwrap_or_else(|| sec.string("namespace", "local")),
        addrs: env_addr
            .or(addrs)
            .unwrap_or_else(|| vec!["127.0.0.1:2379".into()]),
        user: env("BACKEND_ETCD_USER")
            .or_else(|| sec.opt_string("user"))
            .filter(|s| !s.is_empty()),
        password: env("BACKEND_ETCD_PASSWORD")
            .or_else(|| sec.opt_string("password"))
            .filter(|s| !s.is_empty()),
    };
    if cfg.namespace.is_empty() || cfg.namespace.contains('/') {
        sec.problems().push(
            sec.key_path("namespace"),
            format!("{:?}", cfg.namespace),
            "a name without '/'",
        );
    }
    sec.finish(&[]);
    Some(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_lists() {
        let v = |s: &str| -> Value { toml::from_str::<toml::Table>(s).unwrap()["x"].clone() };
        assert_eq!(
            host_ports(&v(r#"x = "a:1, b:2""#)),
            Some(vec!["a:1".to_string(), "b:2".to_string()])
        );
        assert_eq!(
            host_ports(&v(r#"x = ["a:1", {host = "b", port = 2}]"#)),
            Some(vec!["a:1".to_string(), "b:2".to_string()])
        );
        assert_eq!(host_ports(&v(r#"x = "nohost""#)), None);
        assert_eq!(
            host_ports(&v(r#"x = {host = "::1", port = "2379"}"#)),
            Some(vec!["[::1]:2379".to_string()])
        );
        assert_eq!(
            host_ports(&v(r#"x = ["h", 2379]"#)),
            Some(vec!["h:2379".to_string()])
        );
    }
}
