//! "At most N sessions per user per resource group". On one node the live session rows in SQLite
//! are the count; across nodes (`[redis]`) a lease-scored sorted set in Redis is (see
//! `cluster/`). Either way admission is check-and-add in one atomic step, never a bare counter.

use async_trait::async_trait;
use uuid::Uuid;

use super::{Result, Session, SessionError};

/// Admits or refuses one more session for a user in a resource group.
#[async_trait]
pub trait UserLimiter: Send + Sync {
    /// Called under the node's admission lock with this node's live sessions of the user.
    async fn admit(
        &self,
        resource_group: &str,
        user_id: &str,
        session: Uuid,
        limit: u32,
        local_live: &[Session],
    ) -> Result<()>;
    /// The session ended (or was never started).
    async fn release(&self, resource_group: &str, user_id: &str, session: Uuid);
}

pub fn limit_message(user_id: &str, live: usize, limit: u32, rg: &str) -> SessionError {
    SessionError::Exhausted(format!(
        "user {user_id} has {live}/{limit} sessions in resource group {rg}"
    ))
}

/// Counts this node's live sessions only (no Redis configured).
pub struct LocalLimiter;

#[async_trait]
impl UserLimiter for LocalLimiter {
    async fn admit(
        &self,
        rg: &str,
        user_id: &str,
        _session: Uuid,
        limit: u32,
        local_live: &[Session],
    ) -> Result<()> {
        // Terminating sessions still hold a container: they count until they are gone.
        let n = local_live.len();
        if n >= limit as usize {
            return Err(limit_message(user_id, n, limit, rg));
        }
        Ok(())
    }

    async fn release(&self, _rg: &str, _user_id: &str, _session: Uuid) {}
}
