//! Long operations (vfolder delete and clone, delete-async) as background tasks with an id,
//! progress and a final state, persisted in SQLite so they survive a restart: an interrupted
//! delete is resumed (deletion is idempotent), an interrupted clone is rolled back (its partial
//! destination removed) and reported failed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::events::{Event, Events, TASK_CANCELLED, TASK_DONE, TASK_STARTED};
use crate::ids::VFolderId;
use crate::state::{State, StateError, now_unix};
use crate::volume::{Progress, RelPath, VolumeError, Volumes};

/// Finished tasks are kept this long for `GET /bgtask/{id}`.
const RETENTION_SECS: i64 = 7 * 86400;

/// Runs a task may start in all when the process dies under it: the first run and one resume.
const MAX_CRASHED_RUNS: i64 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskSpec {
    DeleteVfolder {
        volume: String,
        vfid: VFolderId,
    },
    CloneVfolder {
        volume: String,
        src_vfid: VFolderId,
        dst_vfid: VFolderId,
    },
    DeleteFiles {
        volume: String,
        vfid: VFolderId,
        relpaths: Vec<RelPath>,
        recursive: bool,
    },
    /// `/folder/file/move-async`: a move that copies object by object on object stores.
    MovePath {
        volume: String,
        vfid: VFolderId,
        src: RelPath,
        dst: RelPath,
    },
}

impl TaskSpec {
    fn kind(&self) -> &'static str {
        match self {
            TaskSpec::DeleteVfolder { .. } => "delete_vfolder",
            TaskSpec::CloneVfolder { .. } => "clone_vfolder",
            TaskSpec::DeleteFiles { .. } => "delete_files",
            TaskSpec::MovePath { .. } => "move_path",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskProgress {
    pub current: u64,
    pub total: u64,
}

/// What `GET /bgtask/{id}` returns.
#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub task_id: Uuid,
    pub kind: String,
    pub status: String,
    pub progress: TaskProgress,
    pub message: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

pub struct BgTasks {
    metrics: Arc<crate::metrics::Metrics>,
    state: State,
    volumes: Volumes,
    events: Events,
    running: Mutex<HashMap<Uuid, Arc<Progress>>>,
    tracker: TaskTracker,
    shutting_down: AtomicBool,
}

fn iso(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl BgTasks {
    pub fn new(
        state: State,
        volumes: Volumes,
        events: Events,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(BgTasks {
            metrics,
            state,
            volumes,
            events,
            running: Mutex::default(),
            tracker: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Records the task, then runs it in the background. The row exists before the id is
    /// returned, so a crash right after still leaves a task to resume.
    pub async fn spawn(self: &Arc<Self>, spec: TaskSpec) -> Result<Uuid, StateError> {
        let id = Uuid::new_v4();
        let now = now_unix();
        let params = serde_json::to_string(&spec)
            .map_err(|e| StateError::Query(sqlx::Error::Protocol(format!("task params: {e}"))))?;
        sqlx::query(
            "INSERT INTO bgtasks (id, kind, params, status, created_at, updated_at) VALUES (?, ?, ?, 'running', ?, ?)",
        )
        .bind(id.to_string())
        .bind(spec.kind())
        .bind(params)
        .bind(now)
        .bind(now)
        .execute(self.state.pool())
        .await?;
        self.start(id, spec);
        Ok(id)
    }

    fn start(self: &Arc<Self>, id: Uuid, spec: TaskSpec) {
        let progress = Arc::new(Progress::default());
        self.lock_running().insert(id, progress.clone());
        let this = self.clone();
        let span = tracing::info_span!("bgtask", task_id = %id, kind = spec.kind());
        self.tracker.spawn(
            async move {
                this.run(id, spec, progress).await;
                this.lock_running().remove(&id);
            }
            .instrument(span),
        );
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Progress>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(self: &Arc<Self>, id: Uuid, spec: TaskSpec, progress: Arc<Progress>) {
        tracing::info!(?spec, "background task started");
        let name = crate::metrics::Labels1 {
            name: spec.kind().to_string(),
        };
        self.metrics.bgtask_started.get_or_create(&name).inc();
        let started = std::time::Instant::now();
        self.events
            .publish(Event::BgTaskUpdated {
                task_id: id,
                current: 0.0,
                total: 0.0,
                message: Some(TASK_STARTED.into()),
            })
            .await;
        // A task of its own: a bug that panics in it fails the task instead of leaving it
        // "running" for ever.
        let (this, task, p) = (self.clone(), spec.clone(), progress.clone());
        let mut work = tokio::spawn(async move { this.execute(&task, p).await }.in_current_span());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut work => break r.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "background task panicked");
                    Err(VolumeError::Internal(format!("the task stopped unexpectedly: {e}")))
                }),
                _ = tick.tick() => self.report_progress(id, &progress).await,
            }
        };
        let (current, total) = (
            progress.current.load(Ordering::Relaxed),
            progress.total.load(Ordering::Relaxed),
        );
        let status = match &result {
            Ok(()) => "done",
            Err(VolumeError::Cancelled) if self.shutting_down.load(Ordering::Relaxed) => {
                "cancelled"
            }
            Err(_) => "failed",
        };
        self.metrics
            .bgtask_done
            .get_or_create(&crate::metrics::TaskLabels {
                task_name: name.name.clone(),
                status: status.into(),
            })
            .inc();
        self.metrics
            .bgtask_seconds
            .get_or_create(&name)
            .observe(started.elapsed().as_secs_f64());
        match result {
            Err(VolumeError::Cancelled) if self.shutting_down.load(Ordering::Relaxed) => {
                // Left "running": resumed (delete) or rolled back (clone) at the next start.
                tracing::info!("background task interrupted by shutdown");
                self.save(id, "running", current, total, None).await;
                let _ = sqlx::query("UPDATE bgtasks SET interrupted = 1 WHERE id = ?")
                    .bind(id.to_string())
                    .execute(self.state.pool())
                    .await;
                // As the Python proxy does on shutdown; the vfolder event comes when the
                // task, resumed at the next start, ends.
                self.events
                    .publish(Event::BgTaskCancelled {
                        task_id: id,
                        message: TASK_CANCELLED.into(),
                    })
                    .await;
            }
            Ok(()) => {
                tracing::info!("background task done");
                self.save(id, "done", current, total.max(current), None)
                    .await;
                self.emit_outcome(id, &spec, None).await;
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(error = %msg, "background task failed");
                self.save(id, "failed", current, total, Some(&msg)).await;
                self.emit_outcome(id, &spec, Some(msg)).await;
            }
        }
    }

    async fn execute(&self, spec: &TaskSpec, progress: Arc<Progress>) -> Result<(), VolumeError> {
        match spec {
            TaskSpec::DeleteVfolder { volume, vfid } => {
                let v = self.volumes.get(volume)?;
                v.delete_vfolder(vfid, progress).await?;
                crate::upload::forget_vfolder(&self.state, v.as_ref(), vfid).await;
                Ok(())
            }
            TaskSpec::CloneVfolder {
                volume,
                src_vfid,
                dst_vfid,
            } => {
                let v = self.volumes.get(volume)?;
                if let Some(qs) = &dst_vfid.quota_scope {
                    // The clone creates its destination quota scope, as Backend.AI does.
                    match v
                        .create_quota_scope(qs, &crate::volume::QuotaLimit::default())
                        .await
                    {
                        Ok(()) | Err(VolumeError::QuotaScopeExists(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                v.clone_vfolder(src_vfid, dst_vfid, progress).await
            }
            TaskSpec::DeleteFiles {
                volume,
                vfid,
                relpaths,
                recursive,
            } => {
                self.volumes
                    .get(volume)?
                    .delete_files(vfid, relpaths, *recursive, progress)
                    .await
            }
            TaskSpec::MovePath {
                volume,
                vfid,
                src,
                dst,
            } => {
                self.volumes
                    .get(volume)?
                    .move_path(vfid, src, dst, progress)
                    .await
            }
        }
    }

    async fn emit_outcome(&self, id: Uuid, spec: &TaskSpec, error: Option<String>) {
        let specific = match (spec, &error) {
            (TaskSpec::DeleteVfolder { vfid, .. }, None) => Some(Event::VFolderDeletionSuccess {
                vfid: vfid.to_string(),
            }),
            (TaskSpec::DeleteVfolder { vfid, .. }, Some(m)) => {
                Some(Event::VFolderDeletionFailure {
                    vfid: vfid.to_string(),
                    message: m.clone(),
                })
            }
            (
                TaskSpec::CloneVfolder {
                    src_vfid, dst_vfid, ..
                },
                None,
            ) => Some(Event::VFolderCloneSuccess {
                vfid: src_vfid.to_string(),
                dst_vfid: dst_vfid.to_string(),
            }),
            (
                TaskSpec::CloneVfolder {
                    src_vfid, dst_vfid, ..
                },
                Some(m),
            ) => Some(Event::VFolderCloneFailure {
                vfid: src_vfid.to_string(),
                dst_vfid: dst_vfid.to_string(),
                message: m.clone(),
            }),
            (TaskSpec::DeleteFiles { .. } | TaskSpec::MovePath { .. }, _) => None,
        };
        if let Some(ev) = specific {
            self.events.publish(ev).await;
        }
        // The vfolder event went first: the manager's status update never races the end of
        // the task's event stream.
        let generic = match error {
            None => Event::BgTaskDone {
                task_id: id,
                message: TASK_DONE.into(),
            },
            Some(message) => Event::BgTaskFailed {
                task_id: id,
                message,
            },
        };
        self.events.publish(generic).await;
    }

    async fn report_progress(&self, id: Uuid, p: &Progress) {
        let (current, total) = (
            p.current.load(Ordering::Relaxed),
            p.total.load(Ordering::Relaxed),
        );
        let _ =
            sqlx::query("UPDATE bgtasks SET current = ?, total = ?, updated_at = ? WHERE id = ?")
                .bind(current as i64)
                .bind(total as i64)
                .bind(now_unix())
                .bind(id.to_string())
                .execute(self.state.pool())
                .await;
        self.events
            .publish(Event::BgTaskUpdated {
                task_id: id,
                current: current as f64,
                total: total as f64,
                message: None,
            })
            .await;
    }

    async fn save(&self, id: Uuid, status: &str, current: u64, total: u64, error: Option<&str>) {
        let r = sqlx::query(
            "UPDATE bgtasks SET status = ?, current = ?, total = ?, error = ?, updated_at = ? WHERE id = ?",
        )
        .bind(status)
        .bind(current as i64)
        .bind(total as i64)
        .bind(error)
        .bind(now_unix())
        .bind(id.to_string())
        .execute(self.state.pool())
        .await;
        if let Err(e) = r {
            tracing::error!(task_id = %id, error = %e, "cannot record background task state");
        }
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<TaskInfo>, StateError> {
        let row = sqlx::query(
            "SELECT kind, status, current, total, message, error, created_at, updated_at FROM bgtasks WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(self.state.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let live = self.lock_running().get(&id).cloned();
        let (current, total) = match live {
            Some(p) => (
                p.current.load(Ordering::Relaxed),
                p.total.load(Ordering::Relaxed),
            ),
            None => (row.get::<i64, _>(2) as u64, row.get::<i64, _>(3) as u64),
        };
        Ok(Some(TaskInfo {
            task_id: id,
            kind: row.get(0),
            status: row.get(1),
            progress: TaskProgress { current, total },
            message: row.get(4),
            error: row.get(5),
            created_at: iso(row.get(6)),
            updated_at: iso(row.get(7)),
        }))
    }

    /// Drops records of tasks that finished more than [`RETENTION_SECS`] ago.
    async fn forget_old(&self) -> Result<u64, StateError> {
        let done = sqlx::query("DELETE FROM bgtasks WHERE status != 'running' AND updated_at < ?")
            .bind(now_unix() - RETENTION_SECS)
            .execute(self.state.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// Old records hourly, not only at start: a daemon that runs for months would otherwise
    /// keep every clone and delete it ever ran.
    pub fn spawn_forgetter(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            tick.tick().await; // recover() has just done the first
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = this.forget_old().await {
                            tracing::warn!(error = %e, "cannot drop old background task records");
                        }
                    }
                }
            }
        });
    }

    /// At start: resume interrupted deletes, roll back interrupted clones, drop old records.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StateError> {
        self.forget_old().await?;
        let rows = sqlx::query(
            "SELECT id, params, attempts, interrupted FROM bgtasks WHERE status = 'running'",
        )
        .fetch_all(self.state.pool())
        .await?;
        for row in rows {
            let id: String = row.get(0);
            let params: String = row.get(1);
            let attempts: i64 = row.get(2);
            let graceful = row.get::<i64, _>(3) != 0;
            let (Ok(id), Ok(spec)) = (
                Uuid::parse_str(&id),
                serde_json::from_str::<TaskSpec>(&params),
            ) else {
                tracing::error!(task_id = %id, "unreadable background task record; marking failed");
                sqlx::query("UPDATE bgtasks SET status = 'failed', error = 'unreadable task record', updated_at = ? WHERE id = ?")
                    .bind(now_unix())
                    .bind(&id)
                    .execute(self.state.pool())
                    .await?;
                continue;
            };
            match &spec {
                TaskSpec::CloneVfolder {
                    volume, dst_vfid, ..
                } => {
                    tracing::warn!(task_id = %id, dst = %dst_vfid, "rolling back a clone interrupted by a restart");
                    let rollback = match self.volumes.get(volume) {
                        Ok(v) => v
                            .delete_vfolder(dst_vfid, Arc::new(Progress::default()))
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let msg = match rollback {
                        Ok(()) => {
                            "interrupted by a restart; the partial copy was removed".to_string()
                        }
                        Err(e) => format!(
                            "interrupted by a restart; removing the partial copy failed: {e}"
                        ),
                    };
                    self.save(id, "failed", 0, 0, Some(&msg)).await;
                    self.emit_outcome(id, &spec, Some(msg)).await;
                }
                _ if !graceful && attempts >= MAX_CRASHED_RUNS => {
                    // The process died under this task after it had already been resumed once:
                    // it may be what kills the process. Resuming it again could crash-loop the
                    // node, so it ends here, reported as failed.
                    let msg = format!(
                        "the daemon stopped abnormally {attempts} times while this task ran; it is not resumed again"
                    );
                    tracing::error!(task_id = %id, kind = spec.kind(), "{msg}");
                    self.save(id, "failed", 0, 0, Some(&msg)).await;
                    self.emit_outcome(id, &spec, Some(msg)).await;
                }
                _ => {
                    tracing::info!(task_id = %id, kind = spec.kind(), attempts, graceful, "resuming background task interrupted by a restart");
                    // A run after a graceful stop is not a crash retry; after a crash it is.
                    sqlx::query(
                        "UPDATE bgtasks SET attempts = attempts + ?, interrupted = 0 WHERE id = ?",
                    )
                    .bind(i64::from(!graceful))
                    .bind(id.to_string())
                    .execute(self.state.pool())
                    .await?;
                    self.start(id, spec);
                }
            }
        }
        Ok(())
    }

    /// Stops running tasks at their next unit of work and waits for them (bounded).
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::Relaxed);
        for p in self.lock_running().values() {
            p.cancel();
        }
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the shutdown grace period");
        }
    }
}
