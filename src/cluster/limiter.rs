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
//!
//! A Redis that restarted empty, or from an older snapshot (RDB, a replica's dump), knows
//! none of the sessions admitted since, until their nodes renew the leases: admitting meanwhile
//! would exceed the limit until one of them is ended (found by the soak, both ways). So the
//! registry carries the Redis process (`run_id`) and the time it was (re)made in it. For one
//! settle time after that (a heartbeat: three renewals) new sessions wait, renewals re-register
//! without counting members that were not renewed in this epoch, and after it those members
//! (stale, from the snapshot) are dropped. A failover starts an epoch too: one heartbeat of
//! waiting for new sessions.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::redis::{CoordError, Redis, Role};
use crate::session::limiter::{UserLimiter, limit_message};
use crate::session::{Session, SessionError, State};

/// How long an admission waits for a replica to acknowledge it (Sentinel groups).
const REPLICA_WAIT_MS: u64 = 1000;

/// KEYS[1] = the (group, user) set, KEYS[2] = the registry's epoch ("<run_id> <ms>");
/// ARGV = lease ms, limit, session id, settle ms, 1 for a renewal. Returns {1, count} when
/// admitted (or already present: its lease is renewed), {0, count} when the user is at the
/// limit, {-1, ms} while the registry settles (a new session must wait that long). Members
/// scored below `since + lease` were last counted before this epoch began: unconfirmed, not
/// counted while it settles, dropped after.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local settle = tonumber(ARGV[4])
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
local since = nil
local epoch = redis.call('GET', KEYS[2])
if epoch then
  local r, ms = string.match(epoch, '^(%x*) (%d+)$')
  if r == run then since = tonumber(ms) end
end
if not since then
  redis.call('SET', KEYS[2], run .. ' ' .. now)
  since = now
end
local floor = since + lease
local settling = now < since + settle
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not settling then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. floor)
end
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return {1, redis.call('ZCARD', KEYS[1])}
end
if ARGV[5] ~= '1' and settling then
  return {-1, since + settle - now}
end
local n
if settling then
  n = redis.call('ZCOUNT', KEYS[1], floor, '+inf')
else
  n = redis.call('ZCARD', KEYS[1])
end
if n >= tonumber(ARGV[2]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return {1, n + 1}
"#;

/// Which Redis process made the registry, and when (its clock, ms): another process (a restart,
/// a failover) starts a new epoch.
pub const EPOCH_KEY: &str = "storage_agent.user_sessions.epoch";

/// What the admission script answered.
enum Answer {
    Admitted,
    AtLimit(i64),
    Settling(Duration),
}

pub fn user_key(resource_group: &str, user: &str) -> String {
    format!("storage_agent.user_sessions.{resource_group}.{user}")
}

pub struct RedisLimiter {
    redis: Arc<Redis>,
    lease: Duration,
    /// How long new sessions wait after the registry was (re)made: every node renews its
    /// sessions' leases within it.
    settle: Duration,
    script: redis::Script,
}

impl RedisLimiter {
    /// `lease` is three heartbeats; the settle time one heartbeat (three renewals).
    pub fn new(redis: Arc<Redis>, lease: Duration) -> Arc<Self> {
        Self::with_settle(redis, lease, lease / 3)
    }

    pub fn with_settle(redis: Arc<Redis>, lease: Duration, settle: Duration) -> Arc<Self> {
        Arc::new(RedisLimiter {
            redis,
            lease,
            settle,
            script: redis::Script::new(ADMIT),
        })
    }

    /// Admits, or renews the lease of a session already counted (`renew`: a live session
    /// counted again, which never waits for the registry to settle).
    async fn check_and_add(
        &self,
        rg: &str,
        user: &str,
        session: Uuid,
        limit: u32,
        renew: bool,
    ) -> Result<Answer, CoordError> {
        let mut c = self.redis.conn(Role::Own).await?;
        let r = self
            .script
            .key(user_key(rg, user))
            .key(EPOCH_KEY)
            .arg(self.lease.as_millis() as u64)
            .arg(limit)
            .arg(session.to_string())
            .arg(self.settle.as_millis() as u64)
            .arg(if renew { 1 } else { 0 })
            .invoke_async(&mut c)
            .await;
        let (ok, n): (i64, i64) = self.redis.check(Role::Own, r).await?;
        Ok(match ok {
            1 => Answer::Admitted,
            -1 => Answer::Settling(Duration::from_millis(n.max(0) as u64)),
            _ => Answer::AtLimit(n),
        })
    }

    /// A new session's check: while the registry settles, waits (at most the settle time,
    /// once) and asks again.
    async fn admit_new(
        &self,
        rg: &str,
        user: &str,
        session: Uuid,
        limit: u32,
    ) -> Result<Answer, CoordError> {
        let answer = self.check_and_add(rg, user, session, limit, false).await?;
        let Answer::Settling(wait) = answer else {
            return Ok(answer);
        };
        tracing::info!(
            wait_ms = wait.as_millis() as u64,
            "the cluster's session registry is new or was lost (Redis restarted empty): \
             a new session waits until every node has counted its sessions again"
        );
        tokio::time::sleep(wait.min(self.settle) + Duration::from_millis(50)).await;
        self.check_and_add(rg, user, session, limit, false).await
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
            let answer = self
                .check_and_add(&s.resource_group, &s.user_id, s.id, limit, true)
                .await?;
            if let Answer::AtLimit(live) = answer {
                // Which sessions hold the places: for the operator reading why one ended.
                let counted: Vec<String> = self
                    .redis
                    .query(
                        Role::Own,
                        redis::cmd("ZRANGE")
                            .arg(user_key(&s.resource_group, &s.user_id))
                            .arg(0)
                            .arg(-1),
                    )
                    .await
                    .unwrap_or_default();
                tracing::warn!(session = %s.id, user = %s.user_id, live, limit, ?counted, "this session's place was taken while its lease was lost");
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
        match self.admit_new(rg, user, session, limit).await {
            Ok(Answer::Admitted) => match self.replicated().await {
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
            Ok(Answer::AtLimit(n)) => Err(limit_message(user, n as usize, limit, rg)),
            Ok(Answer::Settling(wait)) => Err(SessionError::Unavailable(format!(
                "the cluster's session registry is being rebuilt after Redis lost its data; \
                 retry in {} s",
                wait.as_secs().max(1)
            ))),
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
