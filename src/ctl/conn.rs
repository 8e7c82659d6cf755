//! Where the daemon is and how to talk to it, from the same config file (and so the same
//! generated secrets): the endpoints it wrote at start (`<state-dir>/endpoints.json`, which
//! knows ports chosen by the kernel), else the configured addresses; its node CA is trusted
//! for TLS listeners.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::out::{CtlError, Result};
use crate::config::{self, Config};
use crate::pb::storage_agent_client::StorageAgentClient;

pub struct Conn {
    pub manager: String,
    pub client: String,
    pub rpc: Option<String>,
    manager_secret: String,
    pub rpc_secret: Option<String>,
    pub http: reqwest::Client,
    ca: Option<Vec<u8>>,
}

/// Overrides given on the command line (or in the environment).
#[derive(Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub manager: Option<String>,
    pub client: Option<String>,
    pub rpc: Option<String>,
    pub manager_secret: Option<String>,
    pub rpc_secret: Option<String>,
}

fn host_url(addr: std::net::SocketAddr, tls: bool) -> String {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("{}://{a}", if tls { "https" } else { "http" })
}

fn endpoints(state_dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(state_dir.join("endpoints.json")).ok()?;
    serde_json::from_str(&text).ok()
}

impl Conn {
    pub fn open(o: Overrides) -> Result<Self> {
        let source =
            config::locate(o.config.as_deref()).map_err(|e| CtlError::usage(e.to_string()))?;
        let cfg: Config = config::load(&source).map_err(|e| CtlError::usage(e.to_string()))?;
        let state = &cfg.daemon.state_dir;
        let written = endpoints(state);
        let from_file = |k: &str| {
            written
                .as_ref()
                .and_then(|w| w[k].as_str().map(str::to_string))
        };
        let secrets = config::secrets::SecretStore::open(state).ok();
        let stored = |k: &str| secrets.as_ref().and_then(|s| s.get(k).map(str::to_string));
        let manager_secret = o
            .manager_secret
            .or_else(|| cfg.manager_api.secret.clone())
            .or_else(|| stored("api.manager.secret"))
            .ok_or_else(|| {
                CtlError::usage(format!(
                    "no manager secret: none configured and none generated in {} (has the daemon run?)",
                    state.join("secrets.toml").display()
                ))
            })?;
        let ca = std::fs::read(state.join("tls/ca.crt")).ok();
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(300));
        if let Some(pem) = &ca
            && let Ok(cert) = reqwest::Certificate::from_pem(pem)
        {
            http = http.add_root_certificate(cert);
        }
        let http = http
            .build()
            .map_err(|e| CtlError::usage(format!("HTTP client: {e}")))?;
        Ok(Conn {
            manager: o
                .manager
                .or_else(|| from_file("manager"))
                .unwrap_or_else(|| {
                    host_url(
                        cfg.manager_api.listener.addr,
                        cfg.manager_api.listener.ssl_enabled,
                    )
                }),
            client: o
                .client
                .or_else(|| from_file("client"))
                .unwrap_or_else(|| host_url(cfg.client_api.addr, cfg.client_api.ssl_enabled)),
            rpc: o.rpc.or_else(|| from_file("rpc")).or_else(|| {
                cfg.agent.enabled.then(|| {
                    host_url(
                        cfg.agent.rpc.listener.addr,
                        cfg.agent.rpc.listener.ssl_enabled,
                    )
                })
            }),
            rpc_secret: o
                .rpc_secret
                .or_else(|| cfg.agent.rpc.secret.clone())
                .or_else(|| stored("agent.rpc.secret")),
            manager_secret,
            http,
            ca,
        })
    }

    fn unreachable(&self, what: &str, e: reqwest::Error) -> CtlError {
        let mut msg = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            msg = format!("{msg}: {c}");
            cur = c.source();
        }
        CtlError::unavailable(format!("{what}: {msg} (is the daemon running?)"))
    }

    /// A manager-API call with a JSON body; the JSON answer (Null for an empty one).
    pub async fn mgr(&self, method: Method, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.manager);
        let mut req = self
            .http
            .request(method, &url)
            .header("X-BackendAI-Storage-Auth-Token", &self.manager_secret);
        // GET /volumes and friends take no body at all.
        if !body.is_null() {
            req = req.json(&body);
        }
        let r = req.send().await.map_err(|e| self.unreachable(&url, e))?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| self.unreachable(&url, e))?;
        if !status.is_success() {
            return Err(CtlError::from_answer(status.as_u16(), &bytes));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| CtlError::unavailable(format!("{url}: not JSON: {e}")))
    }

    /// Waits for a background task, reporting its progress on `bar`.
    pub async fn wait_task(&self, id: &str, bar: &indicatif::ProgressBar) -> Result<Value> {
        loop {
            let v = self
                .mgr(Method::GET, &format!("/bgtask/{id}"), Value::Null)
                .await?;
            let (cur, total) = (
                v["progress"]["current"].as_u64().unwrap_or(0),
                v["progress"]["total"].as_u64().unwrap_or(0),
            );
            bar.set_length(total.max(cur));
            bar.set_position(cur);
            if v["status"] != "running" {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn rpc(
        &self,
    ) -> Result<
        StorageAgentClient<
            tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
        >,
    > {
        let url = self.rpc.clone().ok_or_else(|| {
            CtlError::usage("sessions are disabled on this node ([agent] enabled = false)")
        })?;
        let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| CtlError::usage(format!("{url}: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300));
        if url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| CtlError::usage(format!("TLS to {url}: {e}")))?;
        }
        let ch = ep
            .connect()
            .await
            .map_err(|e| CtlError::unavailable(format!("{url}: {e} (is the daemon running?)")))?;
        Ok(StorageAgentClient::with_interceptor(
            ch,
            Bearer(self.rpc_secret.clone()),
        ))
    }
}

/// `authorization: Bearer <[agent.rpc] secret>` on every call.
#[derive(Clone)]
pub struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut r: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(s) = &self.0
            && let Ok(v) = format!("Bearer {s}").parse()
        {
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }
}

/// A gRPC status as a ctl error.
pub fn status(s: tonic::Status) -> CtlError {
    use tonic::Code;
    let code = match s.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::ResourceExhausted => super::out::exit::REFUSED,
        _ => super::out::exit::UNAVAILABLE,
    };
    CtlError {
        code,
        message: format!("{:?}: {}", s.code(), s.message()),
        problem: None,
    }
}
