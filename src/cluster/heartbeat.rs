//! Heartbeats: what this node can still host, every `heartbeat-interval` and whenever it
//! changes, on a stream of our own (`storage_agent.heartbeat`; the Backend.AI `events` stream is
//! the manager's and holds only events it knows), plus `container_count.<node>` and a discovery
//! hash per node (`storage_agent.node.<node>`, TTL three heartbeats).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::limiter::RedisLimiter;
use super::redis::{CoordError, Redis, Role};
use crate::session::{SessionError, SessionManager};
use crate::volume::Volumes;

/// Our heartbeat stream, in our own database, trimmed to about this many entries.
pub const HEARTBEAT_STREAM: &str = "storage_agent.heartbeat";
const HEARTBEAT_MAXLEN: usize = 1000;

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
        self.redis
            .query::<String>(
                Role::Own,
                redis::cmd("XADD")
                    .arg(HEARTBEAT_STREAM)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(HEARTBEAT_MAXLEN)
                    .arg("*")
                    .arg("name")
                    .arg("storage_agent_heartbeat")
                    .arg("source")
                    .arg(&node)
                    .arg("payload")
                    .arg(payload.to_string()),
            )
            .await?;
        self.redis
            .query::<()>(
                Role::Statistics,
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
        self.redis.pipe::<()>(Role::Own, &pipe).await
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
