//! Coordination across storage nodes through Redis (`[redis]`): the Backend.AI event stream,
//! heartbeats with capacity, node discovery, and the cluster-wide "at most N sessions per user
//! per resource group".
//!
//! The limit never drifts because nothing is counted: each (resource group, user) has a sorted
//! set of live session ids scored by lease expiry. Admission is one Lua script (drop expired
//! members, compare the live count with the limit, add), using Redis' clock so node clocks do
//! not matter. The owning node refreshes its sessions' leases three times per heartbeat (a
//! lease lasts three heartbeats) and removes them on destroy; a crashed node's sessions stop
//! counting when their leases run out. A session whose
//! lease was lost (Redis restarted, node partitioned) is re-registered through the same check,
//! and ended if that would exceed the limit.
//!
//! When Redis is down, the vfolder APIs keep working, sessions that need the cross-node limit
//! are refused (UNAVAILABLE), events wait in a bounded queue, and everything resumes when Redis
//! returns; no restart needed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::RedisConfig;
use crate::events::{Delivery, Event, EventSink};
use crate::session::limiter::{UserLimiter, limit_message};
use crate::session::{Session, SessionError, SessionManager, State};
use crate::volume::Volumes;

/// The Backend.AI event stream and broadcast channel.
pub const EVENT_STREAM: &str = "events";
pub const BROADCAST_CHANNEL: &str = "events_all";
/// Bounded so a manager that never reads cannot grow Redis without end.
const STREAM_MAXLEN: usize = 100_000;
const EVENT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("Redis at {addr} is unavailable: {message}")]
    Unavailable { addr: String, message: String },
    #[error("invalid [redis] configuration: {0}")]
    Config(String),
    /// Something on this node (the session table) failed while building a heartbeat.
    #[error("{0}")]
    Local(String),
}

#[derive(Clone, Copy)]
pub enum Db {
    /// Leases and discovery.
    Own,
    /// The event stream.
    Stream,
    /// container_count.<node>.
    Stat,
}

/// Lazily connected managers, one per database; a manager reconnects by itself after a loss,
/// so only the first connection is made here (and retried until it succeeds).
pub struct Redis {
    addr: String,
    clients: [redis::Client; 3],
    conns: [Mutex<Option<ConnectionManager>>; 3],
}

fn idx(db: Db) -> usize {
    match db {
        Db::Own => 0,
        Db::Stream => 1,
        Db::Stat => 2,
    }
}

impl Redis {
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Self>, CoordError> {
        let scheme = if cfg.tls { "rediss" } else { "redis" };
        let auth = match (&cfg.username, &cfg.password) {
            (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
            (None, Some(p)) => format!(":{}@", enc(p)),
            (Some(u), None) => format!("{}@", enc(u)),
            (None, None) => String::new(),
        };
        let root_cert = match &cfg.tls_ca {
            Some(p) => Some(
                std::fs::read(p)
                    .map_err(|e| CoordError::Config(format!("tls-ca {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let client_for = |db: i64| -> Result<redis::Client, CoordError> {
            let url = format!("{scheme}://{auth}{}/{db}", cfg.addr);
            let r = if cfg.tls && root_cert.is_some() {
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: root_cert.clone(),
                    },
                )
            } else {
                redis::Client::open(url)
            };
            r.map_err(|e| CoordError::Config(e.to_string()))
        };
        Ok(Arc::new(Redis {
            addr: cfg.addr.clone(),
            clients: [
                client_for(cfg.db)?,
                client_for(cfg.stream_db)?,
                client_for(cfg.stat_db)?,
            ],
            conns: Default::default(),
        }))
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> CoordError {
        CoordError::Unavailable {
            addr: self.addr.clone(),
            message: e.to_string(),
        }
    }

    pub async fn conn(&self, db: Db) -> Result<ConnectionManager, CoordError> {
        let mut slot = self.conns[idx(db)].lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let c = tokio::time::timeout(
            Duration::from_secs(3),
            self.clients[idx(db)].get_connection_manager_with_config(cfg),
        )
        .await
        .map_err(|_| self.unavailable("no connection within 3 s"))?
        .map_err(|e| self.unavailable(e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        db: Db,
        cmd: &redis::Cmd,
    ) -> Result<T, CoordError> {
        let mut c = self.conn(db).await?;
        cmd.query_async(&mut c)
            .await
            .map_err(|e| self.unavailable(e))
    }

    pub async fn ping(&self) -> Result<(), CoordError> {
        self.query::<String>(Db::Own, &redis::cmd("PING"))
            .await
            .map(|_| ())
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

// ---- events ---------------------------------------------------------------------------------

fn stream_entry(event: &Event, source: &str) -> redis::Cmd {
    let mut c = redis::cmd("XADD");
    c.arg(EVENT_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(STREAM_MAXLEN)
        .arg("*")
        .arg("name")
        .arg(event.name())
        .arg("source")
        .arg(source)
        .arg("payload")
        .arg(event.payload().to_string())
        .arg("_retry_count")
        .arg(0);
    c
}

async fn deliver(redis: &Redis, source: &str, event: &Event) -> Result<(), CoordError> {
    redis
        .query::<String>(Db::Stream, &stream_entry(event, source))
        .await?;
    if event.delivery() == Delivery::Broadcast {
        let msg = json!({"name": event.name(), "source": source, "payload": event.payload()});
        redis
            .query::<i64>(
                Db::Stream,
                redis::cmd("PUBLISH")
                    .arg(BROADCAST_CHANNEL)
                    .arg(msg.to_string()),
            )
            .await?;
    }
    Ok(())
}

/// Events go through a bounded queue to a writer that retries while Redis is away, so
/// background tasks never wait on the network and events survive short outages in order.
pub struct RedisEvents {
    tx: mpsc::Sender<Event>,
}

impl RedisEvents {
    pub fn start(redis: Arc<Redis>, source: String, shutdown: CancellationToken) -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<Event>(EVENT_QUEUE);
        tokio::spawn(async move {
            let mut down = false;
            while let Some(ev) = rx.recv().await {
                let mut delay = Duration::from_millis(200);
                loop {
                    match deliver(&redis, &source, &ev).await {
                        Ok(()) => {
                            if down {
                                tracing::info!("Redis is back: delivering queued events");
                                down = false;
                            }
                            break;
                        }
                        Err(e) => {
                            if !down {
                                tracing::warn!(error = %e, "cannot publish events; queueing them");
                                down = true;
                            }
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(delay) => {}
                            }
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        });
        Arc::new(RedisEvents { tx })
    }
}

#[async_trait]
impl EventSink for RedisEvents {
    async fn publish(&self, event: Event) {
        if let Err(e) = self.tx.try_send(event) {
            tracing::warn!(error = %e, "event queue full; dropping an event");
        }
    }
}

// ---- the per-user limit ----------------------------------------------------------------------

/// KEYS[1] = the (group, user) set; ARGV = lease ms, limit, session id.
/// Returns {1, count} when admitted (or already present: its lease is renewed), {0, count}
/// when the user is at the limit.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return {1, redis.call('ZCARD', KEYS[1])}
end
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return {1, n + 1}
"#;

pub fn user_key(resource_group: &str, user: &str) -> String {
    format!("storage_agent.user_sessions.{resource_group}.{user}")
}

pub struct RedisLimiter {
    redis: Arc<Redis>,
    lease: Duration,
    script: redis::Script,
}

impl RedisLimiter {
    pub fn new(redis: Arc<Redis>, lease: Duration) -> Arc<Self> {
        Arc::new(RedisLimiter {
            redis,
            lease,
            script: redis::Script::new(ADMIT),
        })
    }

    /// Admits, or renews the lease of a session already counted.
    async fn check_and_add(
        &self,
        rg: &str,
        user: &str,
        session: Uuid,
        limit: u32,
    ) -> Result<(bool, i64), CoordError> {
        let mut c = self.redis.conn(Db::Own).await?;
        let (ok, n): (i64, i64) = self
            .script
            .key(user_key(rg, user))
            .arg(self.lease.as_millis() as u64)
            .arg(limit)
            .arg(session.to_string())
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.redis.unavailable(e))?;
        Ok((ok == 1, n))
    }

    /// Renews the leases of this node's live sessions. Returns the sessions that could not be
    /// counted again without exceeding their limit (the caller ends them).
    pub async fn refresh(
        &self,
        live: &[Session],
        default_limit: u32,
    ) -> Result<Vec<Uuid>, CoordError> {
        let mut over = Vec::new();
        for s in live.iter().filter(|s| s.state != State::Terminating) {
            let limit = if s.spec.user_limit > 0 {
                s.spec.user_limit
            } else {
                default_limit
            };
            let (ok, _) = self
                .check_and_add(&s.resource_group, &s.user_id, s.id, limit)
                .await?;
            if !ok {
                over.push(s.id);
            }
        }
        Ok(over)
    }
}

#[async_trait]
impl UserLimiter for RedisLimiter {
    async fn admit(
        &self,
        rg: &str,
        user: &str,
        session: Uuid,
        limit: u32,
        _local_live: &[Session],
    ) -> Result<(), SessionError> {
        match self.check_and_add(rg, user, session, limit).await {
            Ok((true, _)) => Ok(()),
            Ok((false, n)) => Err(limit_message(user, n as usize, limit, rg)),
            Err(e) => Err(SessionError::Unavailable(format!(
                "cannot check the per-user session limit across nodes: {e}"
            ))),
        }
    }

    async fn release(&self, rg: &str, user: &str, session: Uuid) {
        let r = self
            .redis
            .query::<i64>(
                Db::Own,
                redis::cmd("ZREM")
                    .arg(user_key(rg, user))
                    .arg(session.to_string()),
            )
            .await;
        if let Err(e) = r {
            // The lease runs out by itself.
            tracing::debug!(error = %e, session = %session, "cannot release a lease now");
        }
    }
}

// ---- heartbeats ------------------------------------------------------------------------------

/// Addresses the manager needs to reach this node, as bound.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub manager_api: String,
    pub client_api: String,
    pub rpc: String,
    pub public_host: String,
}

pub struct Heartbeat {
    pub redis: Arc<Redis>,
    pub limiter: Arc<RedisLimiter>,
    pub sessions: Arc<SessionManager>,
    pub volumes: Volumes,
    pub addresses: Addresses,
    pub interval: Duration,
}

pub fn node_key(node: &str) -> String {
    format!("storage_agent.node.{node}")
}

impl Heartbeat {
    async fn payload(&self) -> Result<Value, SessionError> {
        let cap = self.sessions.capacity().await?;
        let cfg = self.sessions.config();
        let mut kinds = serde_json::Map::new();
        for k in &cap.kinds {
            kinds.insert(
                k.kind.as_str().to_string(),
                json!({
                    "max_containers": cap.max_containers,
                    "running": k.running,
                    "starting": k.starting,
                    "available": cap.available,
                }),
            );
        }
        let mut volumes = Vec::new();
        for v in self.volumes.iter() {
            let hw = self.volumes.hwinfo(v.name()).await.ok();
            volumes.push(json!({
                "name": v.name(),
                "backend": v.backend(),
                "status": hw.as_ref().map(|h| h.status.as_str()).unwrap_or("unknown"),
                "status_info": hw.and_then(|h| h.status_info),
            }));
        }
        Ok(json!({
            "node_id": self.sessions.node_id(),
            "resource_group": cfg.resource_group,
            "region": cfg.region,
            "version": crate::api::VERSION,
            "addresses": {
                "manager_api": self.addresses.manager_api,
                "client_api": self.addresses.client_api,
                "rpc": self.addresses.rpc,
                "public_host": self.addresses.public_host,
            },
            "capacity": {
                "max_containers": cap.max_containers,
                "running": cap.running,
                "starting": cap.starting,
                "available": cap.available,
                "bounded_by": cap.bounded_by,
                "kinds": kinds,
            },
            "host": {
                "memory_total": cap.host.memory_total,
                "memory_available": cap.host.memory_available,
                "memory_reserved": cap.host.memory_reserved,
                "cpus": cap.host.cpus,
                "cpus_reserved": cap.host.cpus_reserved,
            },
            "volumes": volumes,
            "heartbeat_interval": self.interval.as_secs_f64(),
            "timestamp": chrono::Utc::now().to_rfc3339(),
        }))
    }

    /// Renews the leases of this node's live sessions, ending those that can no longer be
    /// counted without exceeding their limit.
    async fn refresh_leases(&self) -> Result<(), CoordError> {
        let live = self
            .sessions
            .live_sessions()
            .await
            .map_err(|e| CoordError::Local(e.to_string()))?;
        let over = self
            .limiter
            .refresh(&live, self.sessions.config().max_sessions_per_user)
            .await?;
        for id in over {
            tracing::warn!(session = %id, "per-user limit reached while this session's lease was lost; ending it");
            if let Err(e) = self
                .sessions
                .destroy(
                    id,
                    "the user's session limit was reached on other nodes while this session was not counted",
                )
                .await
            {
                tracing::warn!(session = %id, error = %e, "cannot end an over-limit session");
            }
        }
        Ok(())
    }

    /// Keeps leases alive on a schedule of its own, three times per heartbeat: a lease (3
    /// heartbeats long) then survives eight missed refreshes, so a busy node never loses the
    /// count of its live sessions, and other nodes cannot over-admit because of it.
    fn spawn_lease_keeper(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.interval / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = this.refresh_leases().await {
                            tracing::debug!(error = %e, "lease refresh failed");
                        }
                    }
                }
            }
        });
    }

    /// One heartbeat: the event, container_count, and the discovery hash (TTL 3 heartbeats).
    async fn beat(&self) -> Result<(), CoordError> {
        let node = self.sessions.node_id().to_string();
        let payload = self
            .payload()
            .await
            .map_err(|e| CoordError::Local(e.to_string()))?;
        let count = payload["capacity"]["running"].as_u64().unwrap_or(0)
            + payload["capacity"]["starting"].as_u64().unwrap_or(0);
        deliver(&self.redis, &node, &Event::Heartbeat(payload.clone())).await?;
        self.redis
            .query::<()>(
                Db::Stat,
                redis::cmd("SET")
                    .arg(format!("container_count.{node}"))
                    .arg(count)
                    .arg("EX")
                    .arg(86400),
            )
            .await?;
        let key = node_key(&node);
        let ttl_ms = (self.interval * 3).as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("node_id")
            .arg(&node)
            .arg("resource_group")
            .arg(payload["resource_group"].as_str().unwrap_or_default())
            .arg("region")
            .arg(payload["region"].as_str().unwrap_or_default())
            .arg("version")
            .arg(crate::api::VERSION)
            .arg("manager_api")
            .arg(&self.addresses.manager_api)
            .arg("client_api")
            .arg(&self.addresses.client_api)
            .arg("rpc")
            .arg(&self.addresses.rpc)
            .arg("public_host")
            .arg(&self.addresses.public_host)
            .arg("capacity")
            .arg(payload["capacity"].to_string())
            .arg("last_heartbeat")
            .arg(chrono::Utc::now().timestamp())
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl_ms)
            .ignore();
        let mut c = self.redis.conn(Db::Own).await?;
        pipe.query_async::<()>(&mut c)
            .await
            .map_err(|e| self.redis.unavailable(e))?;
        Ok(())
    }

    /// Beats every interval (±10% jitter) and right away when capacity changes (at most once a
    /// second). A failing Redis pauses heartbeats; they resume by themselves.
    pub fn spawn(self: Arc<Self>, shutdown: CancellationToken) {
        self.spawn_lease_keeper(shutdown.clone());
        tokio::spawn(async move {
            let mut cap = self.sessions.watch_capacity();
            let mut down = false;
            loop {
                let r = self.beat().await;
                match (&r, down) {
                    (Err(e), false) => {
                        tracing::warn!(error = %e, "heartbeat failed; retrying every interval");
                        down = true;
                    }
                    (Ok(()), true) => {
                        tracing::info!("heartbeats resumed");
                        down = false;
                    }
                    _ => {}
                }
                let jitter = rand::random_range(0.9..1.1);
                let wait = self.interval.mul_f64(jitter);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    r = cap.changed() => {
                        if r.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        cap.borrow_and_update();
                    }
                }
            }
        });
    }
}
