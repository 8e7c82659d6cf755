//! The cluster-wide "at most N sessions per user per resource group".
//!
//! The limit never drifts because nothing is counted: each (resource group, user) has a sorted
//! set of live session ids scored by lease expiry. Admission is one Lua script (drop expired
//! members, compare the live count with the limit, add), using Redis' clock so node clocks do
//! not matter. The owning node refreshes its sessions' leases three times per heartbeat (a
//! lease lasts three heartbeats) and removes them on destroy; a crashed node's sessions stop
//! counting when their leases run out. A session whose lease was lost (Redis restarted, node
//! partitioned) is re-registered through the same check, and ended if that would exceed the
//! limit.
//!
//! With a Sentinel group, an admission counts only once a replica has it (`WAIT 1`): the
//! replica that a failover promotes then knows every admitted session, so a failover cannot
//! make room for sessions beyond the limit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::redis::{CoordError, Redis, Role};
use crate::session::limiter::{UserLimiter, limit_message};
use crate::session::{Session, SessionError, State};

/// How long an admission waits for a replica to acknowledge it (Sentinel groups).
const REPLICA_WAIT_MS: u64 = 1000;

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
        let mut c = self.redis.conn(Role::Own).await?;
        let r = self
            .script
            .key(user_key(rg, user))
            .arg(self.lease.as_millis() as u64)
            .arg(limit)
            .arg(session.to_string())
            .invoke_async(&mut c)
            .await;
        let (ok, n): (i64, i64) = self.redis.check(Role::Own, r).await?;
        Ok((ok == 1, n))
    }

    /// In a Sentinel group: whether a replica has everything written so far.
    async fn replicated(&self) -> Result<bool, CoordError> {
        if !self.redis.is_sentinel(Role::Own) {
            return Ok(true);
        }
        let acked: i64 = self
            .redis
            .query(Role::Own, redis::cmd("WAIT").arg(1).arg(REPLICA_WAIT_MS))
            .await?;
        Ok(acked >= 1)
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
            Ok((true, _)) => match self.replicated().await {
                Ok(true) => Ok(()),
                other => {
                    // Not on a replica: a failover now could forget it. Undo, and refuse.
                    self.release(rg, user, session).await;
                    let why = match other {
                        Err(e) => e.to_string(),
                        _ => "no replica acknowledged it".to_string(),
                    };
                    Err(SessionError::Unavailable(format!(
                        "cannot make the per-user session count durable across a failover: {why}"
                    )))
                }
            },
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
                Role::Own,
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
