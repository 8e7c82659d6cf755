//! Events the daemon emits for the manager (Backend.AI event names and payload fields). Where
//! they go is a sink: nowhere on a single node without Redis, the Backend.AI event stream when
//! `[redis]` is configured.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};
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
        current: u64,
        total: u64,
        message: Option<String>,
    },
    BgTaskDone {
        task_id: Uuid,
        message: Option<String>,
    },
    BgTaskFailed {
        task_id: Uuid,
        message: String,
    },
    Heartbeat(Value),
}

/// Anycast events go to one consumer group member (the manager); broadcast to every subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Anycast,
    Broadcast,
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
            Event::Heartbeat(_) => "storage_agent_heartbeat",
        }
    }

    pub fn delivery(&self) -> Delivery {
        match self {
            Event::BgTaskUpdated { .. } | Event::BgTaskDone { .. } | Event::BgTaskFailed { .. } => {
                Delivery::Broadcast
            }
            _ => Delivery::Anycast,
        }
    }

    pub fn payload(&self) -> Value {
        match self {
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
                "task_id": task_id.to_string(),
                "current_progress": current,
                "total_progress": total,
                "message": message,
            }),
            Event::BgTaskDone { task_id, message } => {
                json!({ "task_id": task_id.to_string(), "message": message })
            }
            Event::BgTaskFailed { task_id, message } => {
                json!({ "task_id": task_id.to_string(), "message": message })
            }
            Event::Heartbeat(v) => v.clone(),
        }
    }
}

#[async_trait]
pub trait EventSink: Send + Sync {
    /// Best effort: a sink that cannot deliver logs and drops; callers never wait on the network
    /// for long.
    async fn publish(&self, event: Event);
}

struct NullSink;

#[async_trait]
impl EventSink for NullSink {
    async fn publish(&self, event: Event) {
        tracing::debug!(event = event.name(), payload = %event.payload(), "event (no event bus configured)");
    }
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
}
