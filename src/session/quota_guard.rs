//! Quotas for what sessions write where no kernel enforces them (security review 2, G7).
//!
//! On object-store volumes a session writes through rclone straight to the service, so the
//! scope's limit, which only our API's writes count, would never meet those writes. Every
//! `quota-check-interval`, each writable session mount on such a volume has its vfolder
//! recounted; when its scope is full the mount is made read-only inside the container (writes
//! fail with EROFS), and writable again once the scope has room (files deleted through the
//! API, or the limit raised). What a session is told is in its `notices` (GetSession).
//!
//! Enforcement is at the next check, not per write: a scope can end up over its limit by what
//! sessions wrote in one interval (and a file still open for writing delays the switch).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::manager::SessionManager;
use super::{Session, State, remount, store};
use crate::ids::VFolderId;

/// A vfolder's verdict in one pass: why it is full (None: room left), or why it could not be
/// told (then its mounts are left as they are).
type Verdict = Result<Option<String>, String>;

impl SessionManager {
    /// One pass over the running sessions' writable mounts.
    pub async fn guard_quotas_once(&self) {
        let Ok(live) = store::live(&self.db).await else {
            return;
        };
        let mut verdicts: HashMap<(String, VFolderId), Verdict> = HashMap::new();
        let mut notices: HashMap<Uuid, Vec<String>> = HashMap::new();
        for s in live.iter().filter(|s| s.state == State::Running) {
            let mut pid = None;
            for m in s.spec.mounts.iter().filter(|m| !m.read_only) {
                let Ok(v) = self.volumes.get(&m.volume) else {
                    continue;
                };
                if v.quota_binds_session_writes() {
                    continue;
                }
                let key = (m.volume.clone(), m.vfid);
                if !verdicts.contains_key(&key) {
                    let verdict = match v.quota_full(&m.vfid).await {
                        Ok(full) => Ok(full.map(|(used, limit)| {
                            format!(
                                "its quota scope holds {used} bytes, its limit is {limit}: \
                                 delete files through Backend.AI or ask for a larger quota"
                            )
                        })),
                        Err(e) => Err(e.to_string()),
                    };
                    verdicts.insert(key.clone(), verdict);
                }
                let Some(Ok(full)) = verdicts.get(&key) else {
                    continue;
                };
                if pid.is_none() {
                    pid = self.container_pid(s).await;
                }
                let Some(pid) = pid else {
                    continue;
                };
                let target = s.kind.mount_target(&s.username, &m.name);
                let read_only = self.apply(s, pid, &target, full.is_some()).await;
                if let Some(why) = full {
                    let state = if read_only {
                        "is read-only"
                    } else {
                        "is to be made read-only (not done yet: a file may be open for writing; the node's log says why)"
                    };
                    notices
                        .entry(s.id)
                        .or_default()
                        .push(format!("{} {state}: {why}", m.name));
                }
            }
        }
        *self.quota_notices.lock().unwrap_or_else(|p| p.into_inner()) = notices;
    }

    async fn container_pid(&self, s: &Session) -> Option<i64> {
        let id = s.container_id.as_deref()?;
        match self.docker.inspect(id).await {
            Ok(Some(c)) if c.running && c.pid > 0 => Some(c.pid),
            _ => None,
        }
    }

    /// Makes the mount at `target` read-only (or writable) when it is not yet; whether it is
    /// read-only now.
    async fn apply(&self, s: &Session, pid: i64, target: &str, read_only: bool) -> bool {
        let now = remount::is_read_only(pid, target);
        if now != Some(!read_only) {
            return now == Some(true);
        }
        let result = remount::set_read_only(pid, target, read_only).await;
        match &result {
            Ok(()) if read_only => tracing::warn!(
                session = %s.id, user = %s.user_id, target,
                "quota scope full: the session's mount is read-only now"
            ),
            Ok(()) => tracing::info!(
                session = %s.id, user = %s.user_id, target,
                "quota scope has room again: the session's mount is writable"
            ),
            Err(why) => tracing::warn!(
                session = %s.id, target, why,
                "cannot change the session's mount for its quota"
            ),
        }
        remount::is_read_only(pid, target) == Some(true)
    }

    /// What the session is told about its mounts (a full quota scope), as of the last check.
    pub fn notices(&self, id: Uuid) -> Vec<String> {
        self.quota_notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    pub fn spawn_quota_guard(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.cfg.quota_check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => this.guard_quotas_once().await,
                }
            }
        });
    }
}
