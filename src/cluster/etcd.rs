//! Backend.AI's etcd: `config/redis` as the Python storage proxy reads it, the global scope
//! merged under this node's scope `nodes/storage/<node-id>` (per top-level key, node first),
//! keys stored as `/sorna/<namespace>/<key>`.
//!
//! etcd is read through its v3 JSON gateway (`POST /v3/kv/range`, base64 keys and values), a
//! plain HTTP call: Backend.AI's etcd is plaintext, and a gRPC client would add a generated API
//! and its build for one range read at start.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

use crate::config::{EtcdConfig, RedisServer, RedisTarget};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {addrs} is unreachable: {message}")]
    Unreachable { addrs: String, message: String },
    #[error("etcd refused the credentials of [etcd] user: {0}")]
    Auth(String),
    #[error("etcd {key}: {message}")]
    Config { key: String, message: String },
}

pub struct Etcd {
    http: reqwest::Client,
    cfg: EtcdConfig,
}

#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Deserialize)]
struct Kv {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct AuthResponse {
    token: String,
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    pub fn new(cfg: &EtcdConfig) -> Result<Self, EtcdError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| EtcdError::Unreachable {
                addrs: cfg.addrs.join(","),
                message: e.to_string(),
            })?;
        Ok(Etcd {
            http,
            cfg: cfg.clone(),
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("/sorna/{}/{key}", self.cfg.namespace)
    }

    async fn range_at(&self, base: &str, prefix: &str) -> Result<Vec<Kv>, reqwest::Error> {
        let mut auth = None;
        if let (Some(user), Some(password)) = (&self.cfg.user, &self.cfg.password) {
            let r: AuthResponse = self
                .http
                .post(format!("{base}/v3/auth/authenticate"))
                .json(&serde_json::json!({"name": user, "password": password}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            auth = Some(r.token);
        }
        let mut req = self
            .http
            .post(format!("{base}/v3/kv/range"))
            .json(&serde_json::json!({
                "key": B64.encode(prefix),
                "range_end": B64.encode(prefix_end(prefix.as_bytes())),
            }));
        if let Some(t) = auth {
            req = req.header("Authorization", t);
        }
        let r: RangeResponse = req.send().await?.error_for_status()?.json().await?;
        Ok(r.kvs)
    }

    /// Every key under `<key>/`, relative to it, with its value. The members are tried in
    /// order, three rounds, before etcd counts as unreachable.
    pub async fn get_prefix(&self, key: &str) -> Result<BTreeMap<String, String>, EtcdError> {
        let prefix = format!("{}/", self.full_key(key));
        let mut last = String::new();
        for round in 0..3 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(500 * round)).await;
            }
            for addr in &self.cfg.addrs {
                let base = format!("http://{addr}");
                match self.range_at(&base, &prefix).await {
                    Ok(kvs) => {
                        let mut out = BTreeMap::new();
                        for kv in kvs {
                            let k = B64.decode(&kv.key).unwrap_or_default();
                            let v = B64.decode(&kv.value).unwrap_or_default();
                            let k = String::from_utf8_lossy(&k);
                            if let Some(rel) = k.strip_prefix(&prefix) {
                                out.insert(
                                    rel.to_string(),
                                    String::from_utf8_lossy(&v).into_owned(),
                                );
                            }
                        }
                        return Ok(out);
                    }
                    Err(e) if e.status().is_some_and(|s| s.as_u16() == 401) => {
                        return Err(EtcdError::Auth(e.to_string()));
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
        }
        Err(EtcdError::Unreachable {
            addrs: self.cfg.addrs.join(","),
            message: last,
        })
    }

    /// `config/redis`, global merged under this node's scope: the default server and the
    /// per-role overrides (`override_configs.<role>`).
    pub async fn redis_config(&self, node_id: &str) -> Result<EtcdRedis, EtcdError> {
        let global = nest(self.get_prefix("config/redis").await?);
        let node = nest(
            self.get_prefix(&format!("nodes/storage/{node_id}/config/redis"))
                .await?,
        );
        let mut merged = global;
        merged.extend(node);
        let key = self.full_key("config/redis");
        let bad = |message: String| EtcdError::Config {
            key: key.clone(),
            message,
        };
        let default = server_from(&merged).map_err(bad)?;
        let mut overrides = BTreeMap::new();
        if let Some(toml::Value::Table(roles)) = merged.get("override_configs") {
            for (role, v) in roles {
                let toml::Value::Table(t) = v else { continue };
                let s = server_from(t).map_err(|m| EtcdError::Config {
                    key: format!("{key}/override_configs/{role}"),
                    message: m,
                })?;
                overrides.insert(role.replace('-', "_"), s);
            }
        }
        Ok(EtcdRedis { default, overrides })
    }
}

/// The Redis servers etcd names: one for every role, unless a role has its own.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdRedis {
    pub default: RedisServer,
    pub overrides: BTreeMap<String, RedisServer>,
}

/// Flat `a/b/c = v` keys as nested tables, names in snake_case.
fn nest(flat: BTreeMap<String, String>) -> toml::Table {
    fn insert(t: &mut toml::Table, parts: &[String], v: String) {
        match parts {
            [] => {}
            [last] => {
                t.insert(last.clone(), toml::Value::String(v));
            }
            [first, rest @ ..] => {
                let entry = t
                    .entry(first.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if !entry.is_table() {
                    *entry = toml::Value::Table(toml::Table::new());
                }
                if let Some(sub) = entry.as_table_mut() {
                    insert(sub, rest, v);
                }
            }
        }
    }
    let mut root = toml::Table::new();
    for (k, v) in flat {
        let parts: Vec<String> = k
            .split('/')
            .filter(|p| !p.is_empty())
            .map(|p| p.replace('-', "_"))
            .collect();
        insert(&mut root, &parts, v);
    }
    root
}

/// One `SingleRedisConfig`: `addr` or `sentinel` + `service_name`, `password`,
/// `sentinel_password`, `use_tls` (`rediss://`, verified against the system's roots: the
/// password then never goes in clear; security review 2, G12). `tls_skip_verify` is not
/// honoured (we always verify) and `request_timeout` is ours (`[redis]`).
fn server_from(t: &toml::Table) -> Result<RedisServer, String> {
    let text = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let hp = |k: &str| -> Result<Option<Vec<String>>, String> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::Table(h)) => {
                let host = h.get("host").and_then(|v| v.as_str());
                let port = h.get("port").and_then(|v| v.as_str());
                match (host, port) {
                    (Some(h), Some(p)) if p.parse::<u16>().is_ok() => {
                        Ok(Some(vec![format!("{h}:{p}")]))
                    }
                    _ => Err(format!("{k}: expected host and port")),
                }
            }
            Some(v) => crate::config::cluster::host_ports(v)
                .map(Some)
                .ok_or_else(|| format!("{k}: expected \"host:port\" or \"h1:p1,h2:p2\"")),
        }
    };
    let target = match (hp("addr")?, hp("sentinel")?) {
        (_, Some(sentinels)) => RedisTarget::Sentinel {
            sentinels,
            service_name: text("service_name")
                .ok_or("sentinel is set but service_name is missing")?,
        },
        (Some(mut addr), None) => RedisTarget::Addr(addr.remove(0)),
        (None, None) => {
            return Err("neither addr nor sentinel: Redis must have an address".into());
        }
    };
    Ok(RedisServer {
        target,
        username: None,
        password: text("password").filter(|p| !p.is_empty()),
        sentinel_password: text("sentinel_password").filter(|p| !p.is_empty()),
        tls: match t.get("use_tls") {
            Some(toml::Value::Boolean(b)) => *b,
            Some(toml::Value::String(s)) => {
                matches!(s.to_ascii_lowercase().as_str(), "true" | "yes" | "1")
            }
            _ => false,
        },
        tls_ca: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn config_trees_become_servers() {
        let flat: BTreeMap<String, String> = [
            ("sentinel", "s1:26379, s2:26379"),
            ("service_name", "mymaster"),
            ("password", "pw"),
            ("override_configs/stream/addr", "10.0.0.9:6380"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let t = nest(flat);
        let s = server_from(&t).unwrap();
        assert_eq!(
            s.target,
            RedisTarget::Sentinel {
                sentinels: vec!["s1:26379".into(), "s2:26379".into()],
                service_name: "mymaster".into()
            }
        );
        assert_eq!(s.password.as_deref(), Some("pw"));
        let o = t["override_configs"]["stream"].as_table().unwrap();
        assert_eq!(
            server_from(o).unwrap().target,
            RedisTarget::Addr("10.0.0.9:6380".into())
        );
        assert!(server_from(&toml::Table::new()).is_err());
        assert!(!s.tls, "plain unless use_tls");
    }

    #[test]
    fn use_tls_from_etcd_is_honoured() {
        let flat: BTreeMap<String, String> = [("addr", "10.0.0.1:6379"), ("use_tls", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(server_from(&nest(flat)).unwrap().tls);
    }
}
