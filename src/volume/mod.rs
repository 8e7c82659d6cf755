//! Volumes: where vfolders live. The `Volume` trait is what the APIs and the session manager use;
//! backends implement it: directories on this host (`vfs/`, with `scopes/` for xfs and btrfs)
//! and objects in a remote service (`object/`: s3). Nothing here knows about HTTP or gRPC.

pub mod fsops;
pub mod health;
pub mod mounts;
pub mod object;
pub mod path;
pub mod remote;
mod scan;
pub mod scopes;
pub mod tree;
pub mod vfs;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::config::VolumeConfig;
use crate::ids::{QuotaScopeId, VFolderId};
pub use path::{PathError, RelPath};

/// Backend.AI's `DEFAULT_VFOLDER_PERMISSION_MODE`: a vfolder's mode when the manager names
/// none (it leaves `mode` out for most vfolders), and a clone's.
pub const DEFAULT_VFOLDER_MODE: u32 = 0o775;
pub use scopes::{QuotaLimit, QuotaOps};

pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// Filesystem calls block; they run on the blocking pool (for every backend and the quota
/// scopes beneath them).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VolumeError::Internal(format!("blocking task failed: {e}")))?
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    #[error("volume {name} is offline: {reason}")]
    Offline { name: String, reason: String },
    #[error("VFolder not found or not a directory: {0}")]
    VFolderNotFound(VFolderId),
    #[error("VFolder already exists: {0}")]
    VFolderExists(VFolderId),
    #[error("quota scope not found: {0}")]
    QuotaScopeNotFound(QuotaScopeId),
    #[error("quota scope already exists: {0}")]
    QuotaScopeExists(QuotaScopeId),
    #[error("quota_scope_id is required for vfid {0}")]
    QuotaScopeRequired(VFolderId),
    #[error("quota scope {0} still holds vfolders")]
    QuotaScopeNotEmpty(QuotaScopeId),
    #[error("invalid quota: {0}")]
    InvalidQuota(String),
    /// Refused before any byte was written: what is asked does not fit.
    #[error("{needed} bytes do not fit: {}", match (.used, .limit) {
        (Some(u), Some(l)) => format!("the quota scope uses {u} of its {l}-byte limit"),
        _ => format!("{} bytes are free on the volume", .available),
    })]
    SpaceExceeded {
        needed: u64,
        available: u64,
        used: Option<u64>,
        limit: Option<u64>,
    },
    #[error("invalid path {path:?}: {source}")]
    InvalidPath { path: String, source: PathError },
    #[error("path escapes the vfolder: {0}")]
    Escapes(String),
    #[error("{}: {path}", source)]
    Io { path: String, source: io::Error },
    #[error("{op} is not supported by the {backend} backend")]
    Unsupported {
        backend: &'static str,
        op: &'static str,
    },
    #[error("not enough free space: need {needed} bytes, {available} available")]
    NoSpace { needed: u64, available: u64 },
    /// A registered read-only vfolder (its bucket belongs to someone else).
    #[error("vfolder {0} is read-only")]
    ReadOnly(VFolderId),
    /// The remote service failed or could not be reached (object stores, remote mounts).
    #[error("{service}: {message}")]
    Remote {
        service: String,
        message: String,
        /// It did not answer in time (or at all), as opposed to answering with an error.
        unreachable: bool,
    },
    /// A body that must be kept whole (it carries a checksum) is longer than the backend can
    /// hold back before any of it becomes irrevocable.
    #[error("a checksummed body may carry at most {limit} bytes here: {why}")]
    AtomicTooLarge { limit: u64, why: &'static str },
    /// A request the backend cannot serve as asked (e.g. registering on a vfs volume).
    #[error("{0}")]
    BadRequest(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

impl VolumeError {
    /// Maps an I/O error on a request path: EXDEV from openat2 means the path tried to leave the
    /// vfolder; everything else keeps its errno for the Backend.AI `{"msg","errno","paths"}` body.
    pub fn io(path: &RelPath, e: io::Error) -> Self {
        if fsops::is_escape(&e) {
            VolumeError::Escapes(path.to_string())
        } else if e.raw_os_error() == Some(libc::ECANCELED) {
            VolumeError::Cancelled
        } else {
            VolumeError::Io {
                path: path.to_string(),
                source: e,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other,
}

impl EntryKind {
    pub fn as_api_str(self) -> &'static str {
        match self {
            EntryKind::File | EntryKind::Other => "FILE",
            EntryKind::Directory => "DIRECTORY",
            EntryKind::Symlink => "SYMLINK",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EntryStat {
    pub kind: EntryKind,
    pub mode: u32,
    pub size: u64,
    /// ctime, as Backend.AI reports it under "created".
    pub created: SystemTime,
    pub modified: SystemTime,
    /// For strong ETags: changes whenever the content may have changed.
    pub mtime_nanos: i128,
    /// The object's own ETag where the backend has one (object stores); downloads serve it.
    pub etag: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: String,
    pub stat: EntryStat,
    /// For symlinks: the target relative to the listed directory, or "" when it resolves outside.
    pub symlink_target: String,
}

#[derive(Debug, Clone)]
pub struct Listing {
    pub items: Vec<DirEntry>,
    /// True when `scandir-limit` cut the listing short.
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeUsage {
    pub file_count: u64,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaUsage {
    pub used_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub used_inodes: Option<u64>,
    pub limit_inodes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStatus {
    Healthy,
    Degraded,
    Offline,
}

impl VolumeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeStatus::Healthy => "healthy",
            VolumeStatus::Degraded => "degraded",
            VolumeStatus::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HwInfo {
    pub status: VolumeStatus,
    pub status_info: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// I/O counters of the volume's device (backends that can observe them).
#[derive(Debug, Clone, Copy, Default)]
pub struct PerfMetric {
    pub iops_read: u64,
    pub iops_write: u64,
    pub io_bytes_read: u64,
    pub io_bytes_write: u64,
    pub io_usec_read: u64,
    pub io_usec_write: u64,
}

/// One entry of a recursive walk (for archives): path relative to the walked directory.
#[derive(Debug, Clone)]
pub struct WalkEntry {
    pub rel: RelPath,
    pub stat: EntryStat,
    /// Symlink target when it stays inside the vfolder; escaping links are left out of walks.
    pub link_target: Option<PathBuf>,
}

/// Progress and cancellation of a long operation (delete, clone), shared with its bgtask.
#[derive(Debug, Default)]
pub struct Progress {
    pub current: AtomicU64,
    pub total: AtomicU64,
    cancelled: AtomicBool,
}

impl Progress {
    pub fn advance(&self, n: u64) -> bool {
        self.current.fetch_add(n, Ordering::Relaxed);
        !self.cancelled.load(Ordering::Relaxed)
    }
    pub fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// An opened regular file: its stat at open time and ranged reads.
pub trait ReadHandle: Send + Sync {
    fn stat(&self) -> &EntryStat;
    /// Bytes `start..end` (end exclusive) as a stream of chunks.
    fn read_range(&self, start: u64, end: u64) -> ByteStream;
    /// The open file behind the handle, when it is one the kernel can send from (a local or
    /// mounted filesystem); None for object stores.
    fn local_file(&self) -> Option<Arc<std::fs::File>> {
        None
    }
}

/// What `/folder/mount` tells a compute agent about where a vfolder is.
#[derive(Debug, Clone)]
pub enum MountInfo {
    /// A directory on this host (vfs, xfs, btrfs): the vfolder root.
    HostPath(PathBuf),
    /// A location in an object service, which the agent mounts itself.
    Remote(RemoteLocation),
}

#[derive(Debug, Clone)]
pub struct RemoteLocation {
    pub backend: &'static str,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Key prefix of the vfolder (and subpath) in the bucket: "" or ending with "/".
    pub prefix: String,
    pub read_only: bool,
    /// Only when the volume's config allows handing them out: named values (S3's access and
    /// secret key; Azure's account and a SAS URL for the container).
    pub credentials: Option<Vec<(&'static str, String)>>,
}

/// A URL that grants access to one vfolder's container straight at the service, until then.
#[derive(Debug, Clone)]
pub struct SharedAccess {
    pub url: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// How a registered vfolder maps onto what already exists in the service.
#[derive(Debug, Clone)]
pub struct Registration {
    pub bucket: String,
    /// A key prefix inside the bucket ("" for all of it).
    pub prefix: String,
    pub read_only: bool,
}

/// A checked directory for a session mount.
#[derive(Debug)]
pub struct MountSource {
    pub dir: std::os::fd::OwnedFd,
    /// Where it is on the host, for logs and session details only (never used to mount).
    pub shown: PathBuf,
}

/// The outcome of streaming a body into staging. `written` bytes are durable (synced) even when
/// the body broke off (`body_error`).
#[derive(Debug)]
pub struct StagedWrite {
    pub written: u64,
    pub body_error: Option<io::Error>,
    /// The write completed the upload and also moved it to the `finish_to` it was given.
    pub finished: bool,
}

/// Checkpoints of a long write: the staging layer makes what it has received durable at least
/// every `every` or `every_bytes` (whichever comes first) and reports each durable offset on
/// `durable`, for the upload layer to commit.
pub struct Checkpointing {
    pub every: std::time::Duration,
    pub every_bytes: u64,
    pub durable: tokio::sync::mpsc::UnboundedSender<u64>,
}

/// How one body is written into staging.
pub struct WritePlan {
    /// Where the body goes: the upload's durable offset (0 creates the staging data).
    pub offset: u64,
    /// The upload's destination in the vfolder (object stores start their multipart upload
    /// at it; directories only need it when finishing).
    pub dst: RelPath,
    /// The upload's length.
    pub size: u64,
    /// Made durable along the way, not only at the end.
    pub checkpoints: Option<Checkpointing>,
    /// When the body completes the upload, also move it here, as `finish` does, in the same step
    /// (an upload done in one PATCH then costs one round trip).
    pub finish_to: Option<RelPath>,
    /// The body is kept whole or not at all (a checksum is verified after the write): nothing
    /// of it may become irrevocable before the write returns.
    pub atomic: bool,
    /// A partial upload (tus concatenation): it never moves into place itself; `concat` joins
    /// it. Object stores keep it where the join can take it (`dst` is the final upload's).
    pub partial: Option<PartialOf>,
}

/// A partial upload, as its staging may arrange it for the join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialOf {
    /// The upload it is part of (its session).
    pub parent: String,
    /// Where its client declared it starts in the final upload, if it did: an object store may
    /// then put its bytes straight where they belong.
    pub at: Option<u64>,
    /// The whole upload's length.
    pub total: u64,
}

/// What a presigned URL may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presign {
    Read,
    /// One upload of exactly `size` bytes (what the token was minted for): the URL accepts no
    /// more (security review 2, G6).
    Upload {
        size: u64,
    },
}

/// Where upload bytes wait until the upload completes. For vfs/xfs this is a file in the quota
/// scope's `.upload/` directory: same filesystem as the vfolder (atomic rename), counted against
/// the scope's quota, invisible in listings and to session containers (which mount only vfolders).
#[async_trait]
pub trait UploadStaging: Send + Sync {
    /// Cuts the staged data back to `offset` (crash recovery, discarded chunks) and returns the
    /// offset now held: `offset`, or more where what lies past it cannot be taken back (parts
    /// already stored in an object service), which the upload then resumes from.
    async fn truncate(&self, vfid: &VFolderId, session: &str, offset: u64) -> Result<u64>;
    /// The longest body this staging can keep whole or not at all (`WritePlan::atomic`), or
    /// None when only the upload's length and the space checks bound it. Object stores hold
    /// such a body back in a local buffer, so they bound it.
    fn max_atomic_write(&self) -> Option<u64> {
        None
    }
    /// Writes `body` as `plan` says and syncs before returning (see `WritePlan`).
    async fn write(
        &self,
        vfid: &VFolderId,
        session: &str,
        body: ByteStream,
        plan: WritePlan,
    ) -> Result<StagedWrite>;
    /// A partial upload has all its bytes (checksums verified): whatever its join will need
    /// that can be done now is done now, while its streams still run in parallel (object
    /// stores send its last part). Repeating it does nothing; failing it leaves the work to
    /// `concat`.
    async fn seal(&self, vfid: &VFolderId, session: &str) -> Result<()>;
    /// Whether `concat` works here (tus concatenation is offered on this volume).
    fn can_concat(&self) -> bool;
    /// tus concatenation: joins the complete, staged partial uploads `parts` (sessions and
    /// lengths, in order) into `dst`, as `finish` moves one upload: atomically (a reader never
    /// sees a half-joined file) and durably. The partials' staging data is used up. Repeating a
    /// join that was cut off (crash, full disk) completes it; repeating a finished one is a
    /// no-op.
    async fn concat(
        &self,
        vfid: &VFolderId,
        session: &str,
        parts: &[(String, u64)],
        dst: &RelPath,
    ) -> Result<()>;
    /// Moves the completed upload of `size` bytes to `dst` in the vfolder (parents created, an
    /// existing file replaced atomically), durably. Refused when it holds another size. Where
    /// the backend can tell an upload already in place (a crash took its done mark after the
    /// move), finishing it again succeeds.
    async fn finish(&self, vfid: &VFolderId, session: &str, dst: &RelPath, size: u64)
    -> Result<()>;
    async fn discard(&self, vfid: &VFolderId, session: &str) -> Result<()>;
    /// Removes staging data nobody can resume any more: last written before `older_than` (every
    /// token that could write it has expired). Uploads whose process died before recording them
    /// leave such data behind.
    async fn sweep(&self, older_than: SystemTime) -> Result<usize>;
    /// At start, before any request: removes staging data no upload owns any more (a crash cut
    /// its removal short). Where nothing can be orphaned this way, nothing to do.
    async fn remove_orphans(&self) -> Result<usize> {
        Ok(0)
    }
}

#[async_trait]
pub trait Volume: Send + Sync + fmt::Display {
    fn name(&self) -> &str;
    fn backend(&self) -> &'static str;
    /// Where the volume is, as `/volumes` reports it: a host path, or the service's URL.
    fn location(&self) -> String;
    fn fsprefix(&self) -> &str;
    fn capabilities(&self) -> Vec<&'static str>;
    /// What the volume health check looks at: the directory, or a probe of the service.
    fn health_target(&self) -> health::Target;

    async fn hwinfo(&self) -> HwInfo;
    async fn fs_usage(&self) -> Result<FsUsage>;
    async fn performance_metric(&self) -> Result<PerfMetric> {
        Err(VolumeError::Unsupported {
            backend: self.backend(),
            op: "performance metrics",
        })
    }

    async fn create_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()>;
    /// None when the scope does not exist. Used and limit come from the kernel where the
    /// backend enforces quota (O(1)), else are unknown (null).
    async fn describe_quota_scope(&self, qs: &QuotaScopeId) -> Result<Option<QuotaUsage>>;
    /// Sets the limit, creating the scope first when it is missing.
    async fn update_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()>;
    /// Removes the limit (the scope stays).
    async fn unset_quota(&self, qs: &QuotaScopeId) -> Result<()>;
    /// Removes a scope that holds no vfolder (QuotaScopeNotEmpty otherwise).
    async fn delete_quota_scope(&self, qs: &QuotaScopeId) -> Result<()>;
    /// The limits this backend enforces per scope, when it has any.
    fn quota(&self) -> Option<&dyn QuotaOps> {
        None
    }
    /// Whether the quota holds for writes that do not go through this daemon (a session's
    /// mount). Filesystems enforce their own; an object store's limits are counters our API
    /// keeps, so sessions' writable vfolders on it are recounted and made read-only past the
    /// limit (security review 2, G7).
    fn quota_binds_session_writes(&self) -> bool {
        true
    }
    /// Past its limit, what the scope of `vf` holds, counted afresh: `Some((used, limit))` when
    /// nothing more fits, None otherwise (or without a limit).
    async fn quota_full(&self, vf: &VFolderId) -> Result<Option<(u64, u64)>> {
        let (Some(q), Some(qs)) = (self.quota(), vf.quota_scope.as_ref()) else {
            return Ok(None);
        };
        // A scope without a limit is never full: no recount (a listing on object stores).
        if q.usage(qs).await?.limit_bytes.is_none() {
            return Ok(None);
        }
        self.rescan_usage(vf).await?;
        let u = q.usage(qs).await?;
        Ok(match (u.used_bytes, u.limit_bytes) {
            (Some(used), Some(limit)) if used >= limit => Some((used, limit)),
            _ => None,
        })
    }

    /// Whether `needed` more bytes fit: within the scope's quota (when enforced) and the
    /// volume's free space. Refusing up front beats failing a transfer half way.
    async fn check_space(&self, qs: Option<&QuotaScopeId>, needed: u64) -> Result<()> {
        self.check_quota(qs, needed).await?;
        let fs = self.fs_usage().await?;
        if needed > fs.available_bytes {
            return Err(VolumeError::SpaceExceeded {
                needed,
                available: fs.available_bytes,
                used: None,
                limit: None,
            });
        }
        self.check_local_staging().await
    }

    /// Whether `needed` more bytes fit within the scope's quota, where one is enforced (a
    /// usage that cannot be read does not refuse).
    async fn check_quota(&self, qs: Option<&QuotaScopeId>, needed: u64) -> Result<()> {
        if let (Some(q), Some(qs)) = (self.quota(), qs)
            && let Ok(u) = q.usage(qs).await
            && let (Some(used), Some(limit)) = (u.used_bytes, u.limit_bytes)
            && used.saturating_add(needed) > limit
        {
            return Err(VolumeError::SpaceExceeded {
                needed,
                available: limit.saturating_sub(used),
                used: Some(used),
                limit: Some(limit),
            });
        }
        Ok(())
    }

    /// Whether the local disk that stages uploads for a remote service has room for one more
    /// (object stores buffer up to two parts per upload on the state disk). Directory volumes
    /// stage on the volume itself, which `check_space` counted already.
    async fn check_local_staging(&self) -> Result<()> {
        Ok(())
    }

    /// The quota scopes on this volume (their UUIDs: the layout does not keep their kind).
    async fn list_quota_scopes(&self) -> Result<Vec<uuid::Uuid>>;
    /// The vfolders on this volume, as (quota scope, folder) UUIDs, of one scope or all.
    async fn list_vfolders(
        &self,
        scope: Option<uuid::Uuid>,
    ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>>;
    async fn create_vfolder(&self, vf: &VFolderId, mode: u32) -> Result<()>;
    async fn vfolder_exists(&self, vf: &VFolderId) -> Result<bool>;
    /// Idempotent: deleting a missing vfolder succeeds (so an interrupted delete can resume).
    async fn delete_vfolder(&self, vf: &VFolderId, progress: Arc<Progress>) -> Result<()>;
    /// Copies `src` into a new vfolder `dst` on this volume; on failure `dst` is removed.
    async fn clone_vfolder(
        &self,
        src: &VFolderId,
        dst: &VFolderId,
        progress: Arc<Progress>,
    ) -> Result<()>;
    /// Where the vfolder is for a compute agent, after checking that `subpath` stays inside it
    /// (what `/folder/mount` reports).
    async fn mount_info(&self, vf: &VFolderId, subpath: &RelPath) -> Result<MountInfo>;
    /// The directory a session container gets for `subpath` of the vfolder, opened and checked
    /// now: its fd is what gets mounted, so no later change of the path can redirect the mount.
    /// Backends that mount something for it (FUSE) count `holder` as its user until
    /// `release_mounts(holder)`.
    async fn mount_source(
        &self,
        vf: &VFolderId,
        subpath: &RelPath,
        read_only: bool,
        holder: &str,
    ) -> Result<MountSource>;
    /// `holder` (a session) needs nothing mounted any more.
    async fn release_mounts(&self, _holder: &str) {}
    /// After a restart: every holder not in `live` is gone.
    async fn retain_mount_holders(&self, _live: &std::collections::HashSet<String>) {}
    /// Holders (sessions) whose mount of this volume died under them (its FUSE process
    /// ended); each is returned once. Volumes without shared mounts have none.
    async fn dead_mount_holders(&self) -> Vec<String> {
        Vec::new()
    }
    /// Makes an existing bucket (or prefix) the vfolder `vf`; its owner keeps its lifecycle.
    async fn register_vfolder(&self, vf: &VFolderId, _r: &Registration) -> Result<()> {
        Err(VolumeError::BadRequest(format!(
            "vfolder {vf}: only object-store volumes register existing buckets; this one is {}",
            self.backend()
        )))
    }
    /// Forgets a registered vfolder without touching its objects.
    async fn deregister_vfolder(&self, vf: &VFolderId) -> Result<()> {
        Err(VolumeError::BadRequest(format!(
            "vfolder {vf}: only registered vfolders of object-store volumes can be deregistered"
        )))
    }
    /// A URL straight to the service for reading `p`, or uploading it, valid for `expiry`.
    async fn presign(
        &self,
        _vf: &VFolderId,
        _p: &RelPath,
        _access: Presign,
        _expiry: std::time::Duration,
    ) -> Result<String> {
        Err(VolumeError::BadRequest(format!(
            "presigned URLs need an object-store volume with presign = true; this one is {}",
            self.backend()
        )))
    }
    /// A SAS-style URL for the whole vfolder (Azure containers): read, or read and write.
    async fn share(
        &self,
        vf: &VFolderId,
        _write: bool,
        _expiry: std::time::Duration,
    ) -> Result<SharedAccess> {
        Err(VolumeError::BadRequest(format!(
            "vfolder {vf}: shared access URLs need an azure-blob volume; this one is {}",
            self.backend()
        )))
    }
    async fn usage(&self, vf: &VFolderId) -> Result<TreeUsage>;
    /// Usage counted afresh (object stores keep counters; this recounts them from a listing).
    async fn rescan_usage(&self, vf: &VFolderId) -> Result<TreeUsage> {
        self.usage(vf).await
    }
    async fn used_bytes(&self, vf: &VFolderId) -> Result<u64>;

    async fn list(&self, vf: &VFolderId, dir: &RelPath, limit: usize) -> Result<Listing>;
    async fn mkdir(&self, vf: &VFolderId, p: &RelPath, parents: bool, exist_ok: bool)
    -> Result<()>;
    async fn rename(&self, vf: &VFolderId, p: &RelPath, new_name: &str) -> Result<()>;
    /// Moves `src` to `dst` (into it when it is a directory). Object stores copy, then delete,
    /// object by object, advancing `progress`; directories rename at once.
    async fn move_path(
        &self,
        vf: &VFolderId,
        src: &RelPath,
        dst: &RelPath,
        progress: Arc<Progress>,
    ) -> Result<()>;
    /// Missing paths are skipped; a directory without `recursive` is an error (ENOTEMPTY/EISDIR).
    async fn delete_files(
        &self,
        vf: &VFolderId,
        paths: &[RelPath],
        recursive: bool,
        progress: Arc<Progress>,
    ) -> Result<()>;
    async fn stat(&self, vf: &VFolderId, p: &RelPath) -> Result<EntryStat>;
    /// Checks that a file can be written at `dst`: the vfolder exists, no parent is a file (or
    /// a symlink leading outside), and `dst` is not a directory. Missing parents are fine: they
    /// are made with the file. EISDIR/ENOTDIR errors name the offending path.
    async fn check_file_destination(&self, vf: &VFolderId, dst: &RelPath) -> Result<()> {
        if !self.vfolder_exists(vf).await? {
            return Err(VolumeError::VFolderNotFound(*vf));
        }
        let mut cur = RelPath::root();
        for comp in dst.components() {
            cur = cur.join_name(comp);
            match self.stat(vf, &cur).await {
                Ok(st) if cur == *dst && st.kind == EntryKind::Directory => {
                    return Err(VolumeError::io(
                        dst,
                        io::Error::from_raw_os_error(libc::EISDIR),
                    ));
                }
                Ok(st) if cur != *dst && st.kind != EntryKind::Directory => {
                    return Err(VolumeError::io(
                        &cur,
                        io::Error::from_raw_os_error(libc::ENOTDIR),
                    ));
                }
                Ok(_) => {}
                Err(VolumeError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    async fn open_read(&self, vf: &VFolderId, p: &RelPath) -> Result<Box<dyn ReadHandle>>;
    /// Every entry under `dir` (which must be a directory), directories before their contents,
    /// streamed so that huge trees stay flat in memory.
    async fn walk(
        &self,
        vf: &VFolderId,
        dir: &RelPath,
    ) -> Result<BoxStream<'static, io::Result<WalkEntry>>>;

    fn staging(&self) -> &dyn UploadStaging;

    /// Starts the backend's own periodic work (object stores recount usage), until shutdown.
    fn spawn_background(&self, _shutdown: tokio_util::sync::CancellationToken) {}
}

/// All configured volumes by name, with their health.
#[derive(Clone)]
pub struct Volumes {
    by_name: Arc<BTreeMap<String, Arc<dyn Volume>>>,
    health: Option<Arc<health::VolumeHealth>>,
}

/// What opening volumes needs besides their configs.
pub struct OpenContext<'a> {
    pub owner: Option<fsops::Owner>,
    pub state: &'a crate::state::State,
    pub state_dir: &'a Path,
    /// Shared, counted mounts: buckets for sessions, remote volumes.
    pub fuse: Arc<mounts::SharedMounts>,
}

impl Volumes {
    pub async fn open(configs: &[VolumeConfig], cx: &OpenContext<'_>) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        for c in configs {
            let v: Arc<dyn Volume> = match c.backend.as_str() {
                // A remote filesystem mounted at the path, at startup or on request.
                _ if c.mount.is_some() => Arc::new(
                    remote::RemoteVolume::open(
                        c,
                        c.mount.as_ref().expect("checked"),
                        cx.owner,
                        cx.state,
                        cx.state_dir,
                        cx.fuse.clone(),
                    )
                    .await,
                ),
                // xfs and btrfs keep vfs's layout; their quota scopes differ (`scopes/`).
                "vfs" | "xfs" | "btrfs" | "cephfs" => {
                    Arc::new(vfs::VfsVolume::open(c, cx.owner, cx.state)?)
                }
                b if crate::config::OBJECT_BACKENDS.contains(&b) => {
                    Arc::new(object::open(c, cx.state, cx.state_dir, cx.fuse.clone())?)
                }
                other => {
                    return Err(VolumeError::Internal(format!(
                        "volume {}: backend {other:?} is not built in",
                        c.name
                    )));
                }
            };
            by_name.insert(c.name.clone(), v);
        }
        Ok(Volumes {
            by_name: Arc::new(by_name),
            health: None,
        })
    }

    /// Starts gating requests on the health monitor's verdicts.
    pub fn with_health(mut self, h: Arc<health::VolumeHealth>) -> Self {
        self.health = Some(h);
        self
    }

    pub fn health(&self) -> Option<&Arc<health::VolumeHealth>> {
        self.health.as_ref()
    }

    /// A volume to work on. An offline volume fails here at once, before any I/O could hang.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn Volume>> {
        let v = self.get_ungated(name)?;
        if let Some(h) = &self.health
            && let Err(reason) = h.gate(name)
        {
            return Err(VolumeError::Offline {
                name: name.to_string(),
                reason,
            });
        }
        Ok(v)
    }

    /// A volume whatever its health (to report on it).
    pub fn get_ungated(&self, name: &str) -> Result<&Arc<dyn Volume>> {
        self.by_name
            .get(name)
            .ok_or_else(|| VolumeError::UnknownVolume(name.to_string()))
    }

    /// What `/volume/hwinfo` and heartbeats report: the health verdict over the backend's own.
    pub async fn hwinfo(&self, name: &str) -> Result<HwInfo> {
        let mut hw = self.get_ungated(name)?.hwinfo().await;
        if let Some(v) = self.health.as_ref().and_then(|h| h.verdict(name)) {
            hw.status = v.status;
            hw.status_info = v.reason;
            hw.metadata
                .insert("checked_at".into(), v.checked_at.to_rfc3339());
        }
        Ok(hw)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Volume>> {
        self.by_name.values()
    }
}
