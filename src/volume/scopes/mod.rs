//! Quota scopes: the directories vfolders live in (`<volume>/<qs hex>/`), and on the backends that
//! have them, their limits, enforced and counted by the kernel:
//!
//! * `vfs`: a plain directory; no limit (Backend.AI reports used and limit as null).
//! * `xfs`: a directory with an XFS project id that everything inside inherits; the limit is the
//!   project quota. Ids are allocated in the state database and reused once freed.
//! * `btrfs`: a subvolume; the limit is its qgroup's.
//! * `cephfs`: a directory with CephFS quota xattrs; scopes' and vfolders' usage are the MDS's
//!   recursive statistics (no walk for vfolders either).
//!
//! Either way a scope's usage comes from the filesystem in O(1), never from a walk. The layout below the scope
//! (shards, vfolders, `.upload/`) is the same for all three, so `vfs/` serves all of them.

mod btrfs;
mod cephfs;
mod projfiles;
pub mod sys;
mod xfs;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use super::blocking;
use super::fsops;
use super::{QuotaUsage, Result, VolumeError};
use crate::config::VolumeConfig;
use crate::ids::QuotaScopeId;
use crate::state::State;

/// A scope's limits; None is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimit {
    pub bytes: Option<u64>,
    pub inodes: Option<u64>,
}

/// Limits the kernel enforces per scope, and the usage it counts.
#[async_trait]
pub trait QuotaOps: Send + Sync {
    async fn usage(&self, qs: &QuotaScopeId) -> Result<QuotaUsage>;
    async fn set_limit(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()>;
}

/// How a backend makes and removes the scope directory itself.
#[async_trait]
pub trait Scopes: Send + Sync {
    fn backend(&self) -> &'static str;
    /// The limits, when this backend enforces any.
    fn quota(&self) -> Option<&dyn QuotaOps> {
        None
    }
    /// Whether the filesystem counts every directory's tree itself (`tree_usage`), so usage
    /// needs no walk (Backend.AI's `fast-size` capability).
    fn counts_trees(&self) -> bool {
        false
    }
    /// A directory's recursive usage as the filesystem counts it, when it does.
    fn tree_usage(&self, _dir: BorrowedFd) -> Option<std::io::Result<super::TreeUsage>> {
        None
    }
    /// Makes the scope, which must not exist yet, with `limit`.
    async fn create(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()>;
    /// Removes a scope that holds nothing any more (the caller checked and cleared it).
    async fn remove(&self, qs: &QuotaScopeId) -> Result<()>;
}

fn io_err(qs: &QuotaScopeId, e: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: qs.to_string(),
        source: e,
    }
}

/// `vfs`: scopes are plain directories.
pub struct Plain {
    pub root: Arc<OwnedFd>,
}

#[async_trait]
impl Scopes for Plain {
    fn backend(&self) -> &'static str {
        "vfs"
    }

    async fn create(&self, qs: &QuotaScopeId, _limit: &QuotaLimit) -> Result<()> {
        let root = self.root.clone();
        let qs = *qs;
        blocking(move || make_dir(root.as_fd(), &qs)).await
    }

    async fn remove(&self, qs: &QuotaScopeId) -> Result<()> {
        let root = self.root.clone();
        let qs = *qs;
        blocking(move || {
            fsops::unlink_at(root.as_fd(), qs.dir_name(), true).map_err(|e| io_err(&qs, e))
        })
        .await
    }
}

/// `mkdir <qs hex>` under the volume root; an existing one is QuotaScopeExists.
fn make_dir(root: std::os::fd::BorrowedFd, qs: &QuotaScopeId) -> Result<()> {
    match fsops::mkdir_at(root, qs.dir_name(), 0o755) {
        Ok(()) => fsops::fsync_dir(root).map_err(|e| io_err(qs, e)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(VolumeError::QuotaScopeExists(*qs)),
        Err(e) => Err(io_err(qs, e)),
    }
}

/// The scope backend for a volume, checked against the filesystem it is on.
pub fn open(c: &VolumeConfig, root: Arc<OwnedFd>, state: &State) -> Result<Arc<dyn Scopes>> {
    match c.backend.as_str() {
        "xfs" => Ok(Arc::new(xfs::XfsProjects::open(c, root, state.clone())?)),
        "btrfs" => Ok(Arc::new(btrfs::BtrfsSubvolumes::open(c, root)?)),
        "cephfs" => Ok(Arc::new(cephfs::CephfsDirs::open(c, root)?)),
        _ => Ok(Arc::new(Plain { root })),
    }
}

/// Whether `path` can hold a volume of `backend`: the right filesystem, with quota accounting
/// and enforcement on. The error says how to get there (for `config check` and `serve`).
pub fn check(backend: &str, path: &Path) -> std::result::Result<(), String> {
    match backend {
        "xfs" => xfs::check(path),
        "btrfs" => btrfs::check(path),
        "cephfs" => cephfs::check(path),
        _ => Ok(()),
    }
}
