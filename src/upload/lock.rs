//! One writer per upload. A second PATCH while the first is still receiving bytes gets 423. A
//! holder that has received nothing for `stale_after` (a dead or stalled connection) is asked
//! to let go, like tusd's lock-release request: it stops reading, keeps what it synced and
//! releases; the new request then proceeds. This is what keeps tus clients out of 423 loops
//! after a network drop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How long a new request waits for a stale holder to flush and release.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("the upload is locked by another request that is still sending data")]
    Held,
}

struct Entry {
    token: u64,
    last_progress_ms: Arc<AtomicU64>,
    cancel: CancellationToken,
    released: CancellationToken,
}

type Table = Arc<Mutex<HashMap<String, Entry>>>;

pub struct UploadLocks {
    table: Table,
    stale_after: Duration,
    epoch: Instant,
    next_token: AtomicU64,
}

pub struct UploadLock {
    session: String,
    token: u64,
    table: Table,
    epoch: Instant,
    last_progress_ms: Arc<AtomicU64>,
    cancel: CancellationToken,
    released: CancellationToken,
}

impl UploadLock {
    /// Marks progress: a holder that keeps touching is never considered stale.
    pub fn touch(&self) {
        self.last_progress_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Cancelled when a newer request takes the lock over.
    pub fn takeover(&self) -> &CancellationToken {
        &self.cancel
    }
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.get(&self.session).is_some_and(|e| e.token == self.token) {
            t.remove(&self.session);
        }
        drop(t);
        self.released.cancel();
    }
}

impl UploadLocks {
    pub fn new(stale_after: Duration) -> Self {
        UploadLocks {
            table: Arc::default(),
            stale_after,
            epoch: Instant::now(),
            next_token: AtomicU64::new(1),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Takes the lock if free; never waits and never takes over.
    pub fn try_lock(&self, session: &str) -> Result<UploadLock, LockError> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.contains_key(session) {
            return Err(LockError::Held);
        }
        Ok(self.insert(&mut t, session))
    }

    fn insert(&self, t: &mut HashMap<String, Entry>, session: &str) -> UploadLock {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let last = Arc::new(AtomicU64::new(self.now_ms()));
        let cancel = CancellationToken::new();
        let released = CancellationToken::new();
        t.insert(
            session.to_string(),
            Entry {
                token,
                last_progress_ms: last.clone(),
                cancel: cancel.clone(),
                released: released.clone(),
            },
        );
        UploadLock {
            session: session.to_string(),
            token,
            table: self.table.clone(),
            epoch: self.epoch,
            last_progress_ms: last,
            cancel,
            released,
        }
    }

    /// Takes the lock, taking it over from a holder that made no progress for `stale_after`.
    pub async fn lock(&self, session: &str) -> Result<UploadLock, LockError> {
        for _ in 0..3 {
            let released = {
                let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
                match t.get(session) {
                    None => return Ok(self.insert(&mut t, session)),
                    Some(e) => {
                        let idle = self
                            .now_ms()
                            .saturating_sub(e.last_progress_ms.load(Ordering::Relaxed));
                        if u128::from(idle) < self.stale_after.as_millis() {
                            return Err(LockError::Held);
                        }
                        tracing::info!(session, idle_ms = idle, "taking over a stale upload lock");
                        e.cancel.cancel();
                        e.released.clone()
                    }
                }
            };
            if tokio::time::timeout(TAKEOVER_WAIT, released.cancelled())
                .await
                .is_err()
            {
                return Err(LockError::Held);
            }
        }
        Err(LockError::Held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_writer_is_refused_then_takes_over_a_stale_one() {
        let locks = UploadLocks::new(Duration::from_millis(200));
        let first = locks.lock("s").await.unwrap();
        assert_eq!(locks.lock("s").await.err(), Some(LockError::Held));
        first.touch();
        assert!(locks.try_lock("s").is_err());

        // The holder stops making progress; a new request asks it to let go.
        let cancel = first.takeover().clone();
        let holder = tokio::spawn(async move {
            cancel.cancelled().await;
            drop(first);
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        let second = locks.lock("s").await.unwrap();
        holder.await.unwrap();
        drop(second);
        assert!(locks.try_lock("s").is_ok());
    }
}
