//! Everything that crosses nodes, through the cluster's Redis: Backend.AI events and the
//! background-task cache (what the manager reads), Backend.AI service discovery, and our own
//! per-user session limit, heartbeats and node discovery.
//!
//! Where Redis is comes from Backend.AI's etcd (`[etcd]`: `config/redis`, global merged under
//! the node's scope) or from `[redis]`; either may name one server or a Sentinel group, and
//! Backend.AI's per-role overrides are honoured. Nothing outside this module knows about Redis
//! databases, roles or wire envelopes.
//!
//! When Redis is down, the vfolder APIs keep working, sessions that need the cross-node limit
//! are refused (UNAVAILABLE), events wait in a bounded queue, and everything resumes when Redis
//! returns; no restart needed.

mod discovery;
mod etcd;
mod events;
mod heartbeat;
mod limiter;
mod redis;
mod sentinel;
mod wire;

use crate::config::Config;

pub use self::redis::{CoordError, Plan, Redis, Role};
pub use discovery::{Announce, service_id, spawn as spawn_service_discovery};
pub use etcd::EtcdError;
pub use events::RedisEvents;
pub use heartbeat::{Addresses, HEARTBEAT_STREAM, Heartbeat, node_key};
pub use limiter::{EPOCH_KEY, RedisLimiter, user_key};

/// Where each role's Redis is, from etcd or `[redis]`; None on a single node without either.
pub async fn plan(config: &Config) -> Result<Option<Plan>, EtcdError> {
    let ours = config.redis.clone().unwrap_or_default();
    let (default, overrides) = if let Some(e) = &config.etcd {
        let r = etcd::Etcd::new(e)?
            .redis_config(&config.proxy.node_id)
            .await?;
        if ours.server.is_some() {
            tracing::warn!(
                "both [etcd] and [redis] say where Redis is: etcd config/redis wins, as it is what the manager and every other Backend.AI component read; [redis] addr/sentinel/password are ignored, its databases and role-check-interval still apply"
            );
        }
        tracing::info!(namespace = %e.namespace, "Redis found through etcd config/redis");
        (r.default, r.overrides)
    } else if let Some(s) = ours.server.clone() {
        (s, Default::default())
    } else {
        return Ok(None);
    };
    let server = |role: Role| {
        overrides
            .get(role.server_role())
            .cloned()
            .unwrap_or_else(|| default.clone())
    };
    Ok(Some(Plan {
        servers: Role::ALL.map(server),
        dbs: Role::ALL.map(|r| match r {
            Role::Stream => ours.stream_db,
            Role::Live => ours.live_db,
            Role::Statistics => ours.stat_db,
            Role::Own => ours.db,
        }),
        role_check_interval: ours.role_check_interval,
    }))
}
