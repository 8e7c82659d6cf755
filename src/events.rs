//! Events the daemon emits for the Backend.AI manager: names, bodies and delivery exactly as the
//! 26.9 storage proxy emits them (`backendai-dropin.md` §1.3). Where they go is a sink: nowhere
//! on a single node without Redis, the cluster's Redis otherwise (`cluster/`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub enum Event {
    VFolderDeletionSuccess {
        vfid: String,
    },
    VFolderDeletionFailure {
        vfid: String,
        message: String,
    },
    VFolderCloneSuccess {
        vfid: String,
        dst_vfid: String,
    },
    VFolderCloneFailure {
        vfid: String,
        dst_vfid: String,
        message: String,
    },
    BgTaskUpdated {
        task_id: Uuid,
        current: f64,
        total: f64,
        message: Option<String>,
    },
    BgTaskDone {
        task_id: Uuid,
        message: String,
    },
    BgTaskFailed {
        task_id: Uuid,
        message: String,
    },
    BgTaskCancelled {
        task_id: Uuid,
        message: String,
    },
}

/// What the manager expects for a background task's events.
pub const TASK_STARTED: &str = "Task started";
pub const TASK_DONE: &str = "Task completed successfully";
pub const TASK_CANCELLED: &str = "Task cancelled";

/// Anycast events go to one member of a consumer group (the manager's); broadcast events to
/// every subscriber of `events_all`, cached under a key for late subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Anycast,
    Broadcast { cache_key: String },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::VFolderDeletionSuccess { .. } => "vfolder_deletion_success",
            Event::VFolderDeletionFailure { .. } => "vfolder_deletion_failure",
            Event::VFolderCloneSuccess { .. } => "vfolder_clone_success",
            Event::VFolderCloneFailure { .. } => "vfolder_clone_failure",
            Event::BgTaskUpdated { .. } => "bgtask_updated",
            Event::BgTaskDone { .. } => "bgtask_done",
            Event::BgTaskFailed { .. } => "bgtask_failed",
            Event::BgTaskCancelled { .. } => "bgtask_cancelled",
        }
    }

    pub fn delivery(&self) -> Delivery {
        match self {
            Event::BgTaskUpdated { task_id, .. }
            | Event::BgTaskDone { task_id, .. }
            | Event::BgTaskFailed { task_id, .. }
            | Event::BgTaskCancelled { task_id, .. } => Delivery::Broadcast {
                // `EventCacheDomain.BGTASK.cache_id`: the dashed, lowercase task id.
                cache_key: format!("bgtask.{}", task_id.hyphenated()),
            },
            _ => Delivery::Anycast,
        }
    }

    /// Whether this ends a background task's event sequence.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::BgTaskDone { .. } | Event::BgTaskFailed { .. } | Event::BgTaskCancelled { .. }
        )
    }

    /// The event body as pydantic's `model_dump_json()` renders it: compact, keys in
    /// declaration order, progress as floats, task ids dashed.
    pub fn body(&self) -> String {
        let v = match self {
            Event::VFolderDeletionSuccess { vfid } => json!({ "vfid": vfid }),
            Event::VFolderDeletionFailure { vfid, message } => {
                json!({ "vfid": vfid, "message": message })
            }
            Event::VFolderCloneSuccess { vfid, dst_vfid } => {
                json!({ "vfid": vfid, "dst_vfid": dst_vfid })
            }
            Event::VFolderCloneFailure {
                vfid,
                dst_vfid,
                message,
            } => json!({ "vfid": vfid, "dst_vfid": dst_vfid, "message": message }),
            Event::BgTaskUpdated {
                task_id,
                current,
                total,
                message,
            } => json!({
                "task_id": task_id.hyphenated().to_string(),
                "current_progress": current,
                "total_progress": total,
                "message": message,
            }),
            Event::BgTaskDone { task_id, message }
            | Event::BgTaskFailed { task_id, message }
            | Event::BgTaskCancelled { task_id, message } => {
                json!({ "task_id": task_id.hyphenated().to_string(), "message": message })
            }
        };
        v.to_string()
    }
}

#[async_trait]
pub trait EventSink: Send + Sync {
    /// Best effort and never waits on the network: a sink that cannot deliver queues (bounded),
    /// logs and drops.
    async fn publish(&self, event: Event);
    /// Waits (at most `within`) until everything published so far is delivered.
    async fn flush(&self, within: Duration);
    /// Events waiting for delivery.
    fn queued(&self) -> usize {
        0
    }
}

struct NullSink;

#[async_trait]
impl EventSink for NullSink {
    async fn publish(&self, event: Event) {
        tracing::debug!(event = event.name(), body = %event.body(), "event (no event bus configured)");
    }
    async fn flush(&self, _within: Duration) {}
}

#[derive(Clone)]
pub struct Events(Arc<dyn EventSink>);

impl Events {
    pub fn none() -> Self {
        Events(Arc::new(NullSink))
    }

    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        Events(sink)
    }

    pub async fn publish(&self, event: Event) {
        self.0.publish(event).await;
    }

    pub async fn flush(&self, within: Duration) {
        self.0.flush(within).await;
    }

    pub fn queued(&self) -> usize {
        self.0.queued()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_match_the_python_serializers() {
        let id = Uuid::parse_str("11111111-2222-3333-4444-555555555555").unwrap();
        assert_eq!(
            Event::BgTaskUpdated {
                task_id: id,
                current: 0.0,
                total: 0.0,
                message: Some(TASK_STARTED.into())
            }
            .body(),
            r#"{"task_id":"11111111-2222-3333-4444-555555555555","current_progress":0.0,"total_progress":0.0,"message":"Task started"}"#
        );
        assert_eq!(
            Event::VFolderCloneFailure {
                vfid: "user:a/b".into(),
                dst_vfid: "user:a/c".into(),
                message: "m".into()
            }
            .body(),
            r#"{"vfid":"user:a/b","dst_vfid":"user:a/c","message":"m"}"#
        );
        assert_eq!(
            Event::BgTaskDone {
                task_id: id,
                message: TASK_DONE.into()
            }
            .delivery(),
            Delivery::Broadcast {
                cache_key: "bgtask.11111111-2222-3333-4444-555555555555".into()
            }
        );
    }
}
