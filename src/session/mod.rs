//! Per-user session containers (SFTP, web file browser): admission against the node's capacity
//! and the per-user limit, the container lifecycle through Docker, reaping on TTL and idleness,
//! and adoption of labelled containers after a restart so counts stay exact.
//!
//! Nothing here names gRPC or HTTP types; `rpc.rs` converts.

mod capacity;
pub mod creds;
mod filebrowser;
mod image;
mod lifecycle;
pub mod limiter;
mod manager;
mod mounts;
mod quota_guard;
pub mod remount;
mod sftp;
mod store;
mod validate;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use capacity::{Capacity, HostHeadroom, KindCounts};
pub use filebrowser::Engine;
pub use manager::SessionManager;

use crate::config::agent::Limits;
use crate::ids::VFolderId;
use crate::volume::RelPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Sftp,
    Filebrowser,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sftp => "sftp",
            Kind::Filebrowser => "filebrowser",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sftp" => Some(Kind::Sftp),
            "filebrowser" => Some(Kind::Filebrowser),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Starting,
    Running,
    Terminating,
    Terminated,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Terminating => "terminating",
            State::Terminated => "terminated",
            State::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Self {
        match s {
            "starting" => State::Starting,
            "running" => State::Running,
            "terminating" => State::Terminating,
            "terminated" => State::Terminated,
            _ => State::Failed,
        }
    }
    /// Holds a container (or is about to) and counts against capacity and limits.
    pub fn is_live(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Terminating)
    }
}

/// One vfolder (or a directory in it) shown in the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    pub volume: String,
    pub vfid: VFolderId,
    pub name: String,
    pub read_only: bool,
    pub subpath: RelPath,
    /// Where the checked directory was on the host when the session started (shown only; the
    /// mount is made from an fd, see `mounts.rs`).
    pub host_path: std::path::PathBuf,
}

impl Kind {
    /// Where a mount named `name` appears inside a session container of this kind.
    pub fn mount_target(self, username: &str, name: &str) -> String {
        match self {
            Kind::Sftp => format!("/srv/sftp/{username}/{name}"),
            Kind::Filebrowser => format!("/srv/{name}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MountRequest {
    pub volume: String,
    pub vfid: String,
    pub name: String,
    pub read_only: bool,
    pub subpath: String,
}

/// Limits asked for; `None` means the node default.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitsRequest {
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub kind: Kind,
    pub user_id: String,
    pub access_key: String,
    pub resource_group: String,
    pub mounts: Vec<MountRequest>,
    pub public_keys: Vec<String>,
    pub generate_password: bool,
    pub limits: LimitsRequest,
    pub ttl: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_sessions_per_user: Option<u32>,
    pub username: Option<String>,
}

/// What is stored per session besides the indexed columns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSpec {
    pub mounts: Vec<Mount>,
    pub public_keys: Vec<String>,
    pub password_auth: bool,
    pub cpus: f64,
    pub memory: u64,
    pub pids: i64,
    pub idle_timeout_secs: u64,
    #[serde(default)]
    pub tls_cert_fingerprint: Option<String>,
    #[serde(default)]
    pub engine: Option<String>,
    /// The per-user limit this session was admitted under (re-checked when its lease is
    /// re-registered after an outage); 0 in records from before it was kept.
    #[serde(default)]
    pub user_limit: u32,
}

impl SessionSpec {
    pub fn limits(&self) -> Limits {
        Limits {
            cpus: self.cpus,
            memory: self.memory,
            pids: self.pids,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: Uuid,
    pub kind: Kind,
    pub user_id: String,
    pub access_key: String,
    pub resource_group: String,
    pub username: String,
    pub spec: SessionSpec,
    pub state: State,
    pub reason: Option<String>,
    pub container_id: Option<String>,
    pub port: Option<u16>,
    pub created_at: i64,
    pub expires_at: i64,
}

/// An endpoint users connect to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub protocol: &'static str,
    pub host: String,
    pub port: u16,
    pub url: String,
}

/// The result of CreateSession: secrets that are shown only once.
#[derive(Debug, Clone)]
pub struct Created {
    pub session: Session,
    pub password: Option<String>,
    pub ca_cert_pem: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub user_id: Option<String>,
    pub kind: Option<Kind>,
    pub state: Option<State>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("no session {0}")]
    NotFound(Uuid),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// Docker could not publish the session's port: something took it after it was picked.
    /// The launch picks another; this reaches a caller only when every try met one.
    #[error("{0}")]
    PortTaken(String),
}

impl From<crate::docker::DockerError> for SessionError {
    fn from(e: crate::docker::DockerError) -> Self {
        match e {
            crate::docker::DockerError::Unavailable { .. } => {
                SessionError::Unavailable(e.to_string())
            }
            crate::docker::DockerError::PortTaken(_) => SessionError::PortTaken(e.to_string()),
            other => SessionError::Internal(other.to_string()),
        }
    }
}

impl From<crate::state::StateError> for SessionError {
    fn from(e: crate::state::StateError) -> Self {
        SessionError::Internal(format!("state database: {e}"))
    }
}

impl From<sqlx::Error> for SessionError {
    fn from(e: sqlx::Error) -> Self {
        SessionError::Internal(format!("state database: {e}"))
    }
}

pub type Result<T, E = SessionError> = std::result::Result<T, E>;
