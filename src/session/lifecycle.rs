//! What happens to sessions while nobody calls: adoption after a restart, TTL and idle reaping,
//! and containers that die on their own (Docker events).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Session, SessionManager, State, store};
use crate::docker::LABEL_SESSION;
use crate::state::now_unix;

impl SessionManager {
    /// Makes the session table and Docker agree: labelled containers of known, live, unexpired
    /// sessions are adopted; every other labelled container is removed; live sessions whose
    /// container is gone are marked terminated. Run at start and whenever Docker comes back.
    /// Sessions a running operation here is starting or ending are left to it.
    pub async fn reconcile(&self) -> super::Result<()> {
        // Sessions first, containers second: a session seen running here had its container
        // before, so the listing has it too.
        let live = store::live(&self.db).await?;
        let containers = self.docker.list_node(&self.node_id).await?;
        let by_id: HashMap<Uuid, &Session> = live.iter().map(|s| (s.id, s)).collect();
        let now = now_unix();
        let mut kept = std::collections::HashSet::new();
        for c in &containers {
            let id = c
                .labels
                .get(LABEL_SESSION)
                .and_then(|v| Uuid::parse_str(v).ok());
            if let Some(id) = id
                && self.is_in_flight(id)
            {
                kept.insert(id);
                continue;
            }
            let session = id.and_then(|id| by_id.get(&id).copied());
            match session {
                Some(s) if s.state == State::Running && c.running && s.expires_at > now => {
                    if s.container_id.as_deref() != Some(c.id.as_str()) {
                        store::set_container(&self.db, s.id, &c.id).await?;
                    }
                    self.activity
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(s.id)
                        .or_insert((0, now));
                    kept.insert(s.id);
                    tracing::info!(session = %s.id, container = %c.id, "adopted running session");
                }
                Some(s) => {
                    // An operation may have moved it on since the snapshot (a start that just
                    // finished); then it is not a leftover.
                    let current = store::get(&self.db, s.id).await?.map(|c| c.state);
                    if current != Some(s.state) || self.is_in_flight(s.id) {
                        kept.insert(s.id);
                        continue;
                    }
                    let reason = if s.expires_at <= now {
                        "ttl expired while the daemon was down"
                    } else if !c.running {
                        "the container stopped while the daemon was down"
                    } else {
                        "the daemon restarted while the session was starting or stopping"
                    };
                    self.docker.remove(&c.id).await?;
                    self.end(s, State::Terminated, reason).await;
                    kept.insert(s.id);
                }
                None => {
                    tracing::warn!(container = %c.id, "removing a labelled container of no live session");
                    self.docker.remove(&c.id).await?;
                }
            }
        }
        for s in &live {
            if !kept.contains(&s.id) && !self.is_in_flight(s.id) {
                self.end(s, State::Terminated, "the container vanished")
                    .await;
            }
        }
        // Mounts shared by sessions (FUSE) count only the sessions that are still alive.
        let mut holders: std::collections::HashSet<String> = store::live(&self.db)
            .await?
            .iter()
            .map(|s| s.id.to_string())
            .collect();
        holders.extend(self.in_flight_ids().iter().map(Uuid::to_string));
        for v in self.volumes.iter() {
            v.retain_mount_holders(&holders).await;
        }
        self.publish_capacity().await;
        Ok(())
    }

    /// Records the end of a session whose container is already gone, if it is still in the
    /// state the caller saw (otherwise something else moved it on, and owns its end).
    async fn end(&self, s: &Session, to: State, reason: &str) {
        match store::transition(&self.db, s.id, &[s.state], to, Some(reason)).await {
            Ok(true) => {
                self.forget(s).await;
                tracing::info!(session = %s.id, reason, state = to.as_str(), "session ended");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(session = %s.id, error = %e, "cannot record a session's end"),
        }
    }

    /// Ends sessions past their TTL or idle (no network traffic) for their idle timeout, and
    /// those whose shared mount died under them (running, but their vfolder is gone for good:
    /// found by the soak when rclone was killed); forgets sessions ended longer ago than
    /// `ended-retention`.
    pub async fn reap_once(&self) -> super::Result<()> {
        // First, so that a destroy failing below (Docker down) does not keep old rows.
        let retention = i64::try_from(self.cfg.ended_retention.as_secs()).unwrap_or(i64::MAX);
        let before = now_unix().saturating_sub(retention);
        match store::forget_ended(&self.db, before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                sessions = n,
                "ended sessions past their retention forgotten"
            ),
            // Not a reason to skip the reaping below.
            Err(e) => tracing::warn!(error = %e, "cannot forget ended sessions"),
        }
        for v in self.volumes.iter() {
            for holder in v.dead_mount_holders().await {
                let Ok(id) = Uuid::parse_str(&holder) else {
                    continue;
                };
                let reason = format!(
                    "its mount of volume {} stopped working (the FUSE process ended); start a new session",
                    v.name()
                );
                tracing::warn!(session = %id, reason, "ending a session");
                if let Err(e) = self.destroy(id, &reason).await {
                    tracing::warn!(session = %id, error = %e, "cannot end a session with a dead mount");
                }
            }
        }
        let now = now_unix();
        for s in store::live(&self.db).await? {
            if s.state != State::Running {
                continue;
            }
            if s.expires_at <= now {
                self.destroy(s.id, "ttl expired").await?;
                continue;
            }
            let Some(container) = &s.container_id else {
                continue;
            };
            let bytes = match self.docker.net_bytes(container).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(session = %s.id, error = %e, "no network counters");
                    continue;
                }
            };
            let last_active = {
                let mut act = self.activity.lock().unwrap_or_else(|p| p.into_inner());
                let entry = act.entry(s.id).or_insert((bytes, now));
                if entry.0 != bytes {
                    *entry = (bytes, now);
                }
                entry.1
            };
            if s.spec.idle_timeout_secs > 0 && now - last_active >= s.spec.idle_timeout_secs as i64
            {
                self.destroy(s.id, &format!("idle for {}s", s.spec.idle_timeout_secs))
                    .await?;
            }
        }
        Ok(())
    }

    pub fn spawn_reaper(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.cfg.reap_interval);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = this.reap_once().await {
                            tracing::warn!(error = %e, "session reaper");
                        }
                    }
                }
            }
        });
    }

    /// Follows Docker events for this node's containers. A container that dies while its
    /// session is running marks the session failed with the exit code (and OOM kill, and the
    /// last log lines) and is removed. When the event stream breaks (Docker restarted), it
    /// reconciles before following again, so nothing that happened meanwhile is missed.
    /// `reconciled`: the caller has just reconciled, so the first pass need not.
    pub fn spawn_event_watcher(self: &Arc<Self>, reconciled: bool, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut reconciled = reconciled;
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                if !std::mem::take(&mut reconciled)
                    && let Err(e) = this.reconcile().await
                {
                    tracing::debug!(error = %e, "reconcile: Docker not reachable yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    }
                }
                let events = match this.docker.events(&this.node_id).await {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::debug!(error = %e, "docker events unavailable");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                };
                tokio::pin!(events);
                loop {
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = events.next() => ev,
                    };
                    match ev {
                        Some(Ok(ev)) if ev.action == "die" || ev.action == "oom" => {
                            this.on_container_died(&ev.id, &ev.labels).await;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "docker event stream broke");
                            break;
                        }
                        None => break,
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn on_container_died(&self, container: &str, labels: &HashMap<String, String>) {
        let Some(id) = labels
            .get(LABEL_SESSION)
            .and_then(|v| Uuid::parse_str(v).ok())
        else {
            return;
        };
        let Ok(Some(s)) = store::get(&self.db, id).await else {
            return;
        };
        // Deaths we caused (destroy, failed start) are not failures.
        if s.state != State::Running {
            return;
        }
        let st = self.docker.inspect(container).await.ok().flatten();
        let logs = self.docker.logs_tail(container, 5).await;
        let mut reason = format!(
            "the container exited with code {}",
            st.as_ref().and_then(|s| s.exit_code).unwrap_or(-1)
        );
        if st.as_ref().is_some_and(|s| s.oom_killed) {
            reason.push_str(" (killed: out of memory)");
        }
        if !logs.is_empty() {
            reason.push_str(": ");
            let tail: String = logs.chars().rev().take(400).collect();
            reason.extend(tail.chars().rev());
        }
        tracing::warn!(session = %id, %reason, "session container died");
        let _ = self.docker.remove(container).await;
        self.end(&s, State::Failed, &reason).await;
        self.publish_capacity().await;
    }
}
