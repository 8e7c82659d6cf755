//! Connections to the cluster's Redis, one per Backend.AI role (`stream` for events and the
//! background-task cache, `live` for service discovery, `statistics`, and ours for leases and
//! node discovery), each to its role's server and database.
//!
//! A server is one address or a Sentinel group. For a Sentinel group the master is found
//! through the sentinels, and found again when it stops being the master: every
//! `role-check-interval` each connection asks `ROLE`, and any connection error or READONLY reply
//! drops the connection, so the next call rediscovers. Nothing waits for a restart.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::sentinel;
use crate::config::{RedisServer, RedisTarget};

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("Redis at {addr} is unavailable: {message}")]
    Unavailable { addr: String, message: String },
    #[error("invalid Redis configuration: {0}")]
    Config(String),
    /// Something on this node (the session table) failed while building a heartbeat.
    #[error("{0}")]
    Local(String),
}

/// What a connection is for; each role has its server and database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Backend.AI `stream`: the `events` stream, `events_all`, `bgtask.<id>` (DB 4).
    Stream,
    /// Backend.AI `live`: service discovery (DB 0).
    Live,
    /// Backend.AI `statistics`: `container_count.<node>` (DB 0).
    Statistics,
    /// Ours, on the `live` server: leases, node discovery, heartbeats (`[redis] db`).
    Own,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Stream, Role::Live, Role::Statistics, Role::Own];

    /// The Backend.AI role whose server this one uses (`override_configs.<name>`).
    pub fn server_role(self) -> &'static str {
        match self {
            Role::Stream => "stream",
            Role::Live | Role::Own => "live",
            Role::Statistics => "statistics",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where each role goes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub servers: [RedisServer; 4],
    pub dbs: [i64; 4],
    pub role_check_interval: Duration,
}

struct Conn {
    addr: String,
    mgr: ConnectionManager,
}

struct RoleConn {
    role: Role,
    server: RedisServer,
    db: i64,
    root_cert: Option<Vec<u8>>,
    cached: Mutex<Option<Conn>>,
}

pub struct Redis {
    conns: Vec<RoleConn>,
    describe: String,
    role_check_interval: Duration,
}

fn describe(s: &RedisServer) -> String {
    match &s.target {
        RedisTarget::Addr(a) => a.clone(),
        RedisTarget::Sentinel {
            sentinels,
            service_name,
        } => format!("sentinel {service_name} via {}", sentinels.join(",")),
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A connection error that may mean the master moved (or is gone): drop the connection.
fn is_failover_sign(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

impl RoleConn {
    fn unavailable(&self, e: impl std::fmt::Display) -> CoordError {
        CoordError::Unavailable {
            addr: describe(&self.server),
            message: e.to_string(),
        }
    }

    async fn address(&self) -> Result<String, CoordError> {
        match &self.server.target {
            RedisTarget::Addr(a) => Ok(a.clone()),
            RedisTarget::Sentinel {
                sentinels,
                service_name,
            } => sentinel::discover_master(&self.server, sentinels, service_name)
                .await
                .map_err(|e| self.unavailable(e)),
        }
    }

    async fn get(&self) -> Result<ConnectionManager, CoordError> {
        let mut slot = self.cached.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.mgr.clone());
        }
        let addr = self.address().await?;
        let s = &self.server;
        let scheme = if s.tls { "rediss" } else { "redis" };
        let auth = match (&s.username, &s.password) {
            (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
            (None, Some(p)) => format!(":{}@", enc(p)),
            (Some(u), None) => format!("{}@", enc(u)),
            (None, None) => String::new(),
        };
        let url = format!("{scheme}://{auth}{addr}/{}", self.db);
        let client = match &self.root_cert {
            Some(root) if s.tls => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root.clone()),
                },
            ),
            _ => redis::Client::open(url),
        }
        .map_err(|e| CoordError::Config(e.to_string()))?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let mgr = tokio::time::timeout(
            Duration::from_secs(3),
            client.get_connection_manager_with_config(cfg),
        )
        .await
        .map_err(|_| self.unavailable(format!("no connection to {addr} within 3 s")))?
        .map_err(|e| self.unavailable(e))?;
        if matches!(s.target, RedisTarget::Sentinel { .. }) {
            tracing::info!(role = ?self.role, master = %addr, "connected to the Sentinel group's master");
        }
        *slot = Some(Conn {
            addr,
            mgr: mgr.clone(),
        });
        Ok(mgr)
    }

    async fn forget(&self, why: &str) {
        if let Some(c) = self.cached.lock().await.take() {
            tracing::warn!(role = ?self.role, addr = %c.addr, why, "dropping the Redis connection; the master will be looked up again");
        }
    }

    fn is_sentinel(&self) -> bool {
        matches!(self.server.target, RedisTarget::Sentinel { .. })
    }
}

impl Redis {
    pub fn new(plan: &Plan) -> Result<Arc<Self>, CoordError> {
        let mut conns = Vec::new();
        for role in Role::ALL {
            let server = plan.servers[role.index()].clone();
            let root_cert = match &server.tls_ca {
                Some(p) => Some(
                    std::fs::read(p)
                        .map_err(|e| CoordError::Config(format!("tls-ca {}: {e}", p.display())))?,
                ),
                None => None,
            };
            conns.push(RoleConn {
                role,
                db: plan.dbs[role.index()],
                server,
                root_cert,
                cached: Mutex::new(None),
            });
        }
        let mut described: Vec<String> = conns.iter().map(|c| describe(&c.server)).collect();
        described.dedup();
        Ok(Arc::new(Redis {
            describe: described.join(" / "),
            conns,
            role_check_interval: plan.role_check_interval,
        }))
    }

    /// Where Redis is, for logs and health reports.
    pub fn addr(&self) -> &str {
        &self.describe
    }

    fn role(&self, role: Role) -> &RoleConn {
        &self.conns[role.index()]
    }

    pub fn is_sentinel(&self, role: Role) -> bool {
        self.role(role).is_sentinel()
    }

    pub async fn conn(&self, role: Role) -> Result<ConnectionManager, CoordError> {
        self.role(role).get().await
    }

    /// Maps a command's result; an error that may mean a failover drops the connection.
    pub async fn check<T>(&self, role: Role, r: redis::RedisResult<T>) -> Result<T, CoordError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let rc = self.role(role);
                if rc.is_sentinel() && is_failover_sign(&e) {
                    rc.forget(&e.to_string()).await;
                }
                Err(rc.unavailable(e))
            }
        }
    }

    pub async fn query<T: redis::FromRedisValue>(
        &self,
        role: Role,
        cmd: &redis::Cmd,
    ) -> Result<T, CoordError> {
        let mut c = self.conn(role).await?;
        let r = cmd.query_async(&mut c).await;
        self.check(role, r).await
    }

    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        role: Role,
        pipe: &redis::Pipeline,
    ) -> Result<T, CoordError> {
        let mut c = self.conn(role).await?;
        let r = pipe.query_async(&mut c).await;
        self.check(role, r).await
    }

    pub async fn ping(&self) -> Result<(), CoordError> {
        self.query::<String>(Role::Own, &redis::cmd("PING"))
            .await
            .map(|_| ())
    }

    /// For Sentinel groups: checks every `role-check-interval` that each connection still
    /// talks to a master, and drops it when not (after a failover the old master comes back
    /// as a replica).
    pub fn spawn_role_checks(self: &Arc<Self>, shutdown: CancellationToken) {
        if !self.conns.iter().any(RoleConn::is_sentinel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.role_check_interval);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for rc in this.conns.iter().filter(|c| c.is_sentinel()) {
                    let Some(mut mgr) = rc.cached.lock().await.as_ref().map(|c| c.mgr.clone())
                    else {
                        continue;
                    };
                    let role: Result<redis::RedisResult<Vec<redis::Value>>, _> =
                        tokio::time::timeout(
                            Duration::from_secs(3),
                            redis::cmd("ROLE").query_async(&mut mgr),
                        )
                        .await;
                    match role {
                        Ok(Ok(v)) => {
                            let is_master = matches!(v.first(), Some(redis::Value::BulkString(b)) if b == b"master");
                            if !is_master {
                                rc.forget("ROLE says it is no longer the master").await;
                            }
                        }
                        Ok(Err(e)) => rc.forget(&e.to_string()).await,
                        Err(_) => rc.forget("ROLE did not answer within 3 s").await,
                    }
                }
            }
        });
    }
}
