//! `cephfs`: a quota scope is a directory with CephFS quota xattrs: `ceph.quota.max_bytes`, and
//! `ceph.quota.max_files` for an inode limit (our addition; the Python proxy sets bytes only).
//! A limit of 0 is no limit, which is how one is removed (CephFS cannot remove the xattr).
//!
//! Usage comes from the MDS's recursive statistics (`ceph.dir.rbytes`, `ceph.dir.rentries`): a
//! constant cost, no walk, for scopes and vfolders alike. They lag writes: a closed file's size
//! reaches the MDS when its client releases its caps (`client_caps_release_delay`, 5 s; an
//! fsync sends it at once, and our uploads fsync), and moves up the tree on the MDS tick once its
//! lock is older than `mds_scatter_nudge_interval` (5 s; `mds_tick_interval` 5 s). So a scope's
//! usage can be up to about 10 s behind with stock settings.
//!
//! Quota is enforced by the CephFS *client* that writes (ceph-fuse or the kernel), against the
//! realm's recursive statistics: writes in nested directories (every vfolder is three levels below
//! its scope) count only once those propagate, so one fast write can go far past the limit, and
//! the writes after it are refused. Our own checks, at the token and before each PATCH, are what
//! make a limit exact for uploads through the API (once earlier writes have propagated).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use super::{QuotaLimit, QuotaOps, Scopes, io_err, make_dir, sys};
use crate::config::VolumeConfig;
use crate::ids::QuotaScopeId;
use crate::volume::blocking;
use crate::volume::fsops;
use crate::volume::{QuotaUsage, Result, TreeUsage, VolumeError};

const MAX_BYTES: &str = "ceph.quota.max_bytes";
const MAX_FILES: &str = "ceph.quota.max_files";
const RBYTES: &str = "ceph.dir.rbytes";
const RENTRIES: &str = "ceph.dir.rentries";

pub struct CephfsDirs {
    root: Arc<OwnedFd>,
}

/// Whether `path` is on CephFS, and this client may set quotas there.
pub fn check(path: &Path) -> std::result::Result<(), String> {
    let fd = fsops::open_dir_path(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Err(e) = sys::xattr_u64(fd.as_fd(), RBYTES) {
        return Err(format!(
            "{} is not on CephFS ({RBYTES}: {e}): mount CephFS there (ceph-fuse, or mount -t ceph)",
            path.display()
        ));
    }
    // Setting a quota needs the 'p' flag in the client's MDS caps: try it on a directory of
    // our own, then take it away again.
    let probe = format!(".storage-agent-quota-probe-{}", std::process::id());
    fsops::mkdir_at(fd.as_fd(), &probe, 0o700)
        .or_else(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| format!("{}: cannot make a probe directory: {e}", path.display()))?;
    let set = fsops::open_subdir_nofollow(fd.as_fd(), &probe).and_then(|d| {
        sys::set_xattr_u64(d.as_fd(), MAX_BYTES, 1 << 40)?;
        sys::set_xattr_u64(d.as_fd(), MAX_BYTES, 0)
    });
    let _ = fsops::unlink_at(fd.as_fd(), &probe, true);
    set.map_err(|e| {
        format!(
            "cannot set {MAX_BYTES} under {} ({e}): the CephFS client needs the 'p' flag in its \
             MDS caps (ceph auth caps client.<id> mds 'allow rwp' ...)",
            path.display()
        )
    })
}

/// The recursive usage of a directory: (bytes, entries below it).
fn tree_usage(dir: BorrowedFd) -> std::io::Result<TreeUsage> {
    let bytes = sys::xattr_u64(dir, RBYTES)?.unwrap_or(0);
    // rentries counts the directory itself, as the Python proxy reports it.
    let entries = sys::xattr_u64(dir, RENTRIES)?.unwrap_or(0);
    Ok(TreeUsage {
        file_count: entries,
        used_bytes: bytes,
    })
}

impl CephfsDirs {
    pub fn open(c: &VolumeConfig, root: Arc<OwnedFd>) -> Result<Self> {
        check(&c.path).map_err(VolumeError::Internal)?;
        Ok(CephfsDirs { root })
    }

    fn scope_dir(root: &OwnedFd, qs: &QuotaScopeId) -> Result<OwnedFd> {
        fsops::open_subdir_nofollow(root.as_fd(), qs.dir_name()).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                VolumeError::QuotaScopeNotFound(*qs)
            } else {
                io_err(qs, e)
            }
        })
    }

    fn apply(dir: BorrowedFd, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        sys::set_xattr_u64(dir, MAX_BYTES, limit.bytes.unwrap_or(0)).map_err(|e| io_err(qs, e))?;
        // max_files counts the scope directory itself (rentries): N files need N + 1.
        let files = limit.inodes.map_or(0, |n| n.saturating_add(1));
        sys::set_xattr_u64(dir, MAX_FILES, files).map_err(|e| io_err(qs, e))
    }
}

#[async_trait]
impl Scopes for CephfsDirs {
    fn backend(&self) -> &'static str {
        "cephfs"
    }

    fn quota(&self) -> Option<&dyn QuotaOps> {
        Some(self)
    }

    fn counts_trees(&self) -> bool {
        true
    }

    fn tree_usage(&self, dir: BorrowedFd) -> Option<std::io::Result<TreeUsage>> {
        Some(tree_usage(dir))
    }

    async fn create(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        let (root, q, limit) = (self.root.clone(), *qs, *limit);
        blocking(move || {
            make_dir(root.as_fd(), &q)?;
            let dir = Self::scope_dir(&root, &q)?;
            if let Err(e) = Self::apply(dir.as_fd(), &q, &limit) {
                let _ = fsops::unlink_at(root.as_fd(), q.dir_name(), true);
                return Err(e);
            }
            Ok(())
        })
        .await
    }

    async fn remove(&self, qs: &QuotaScopeId) -> Result<()> {
        let (root, q) = (self.root.clone(), *qs);
        blocking(move || {
            fsops::unlink_at(root.as_fd(), q.dir_name(), true).map_err(|e| io_err(&q, e))
        })
        .await
    }
}

#[async_trait]
impl QuotaOps for CephfsDirs {
    async fn usage(&self, qs: &QuotaScopeId) -> Result<QuotaUsage> {
        let (root, q) = (self.root.clone(), *qs);
        blocking(move || {
            let dir = Self::scope_dir(&root, &q)?;
            let read = |name| sys::xattr_u64(dir.as_fd(), name).map_err(|e| io_err(&q, e));
            let positive = |v: Option<u64>| v.filter(|n| *n > 0);
            Ok(QuotaUsage {
                used_bytes: Some(read(RBYTES)?.unwrap_or(0)),
                limit_bytes: positive(read(MAX_BYTES)?),
                used_inodes: Some(read(RENTRIES)?.unwrap_or(1).saturating_sub(1)),
                limit_inodes: positive(read(MAX_FILES)?).map(|n| n - 1),
            })
        })
        .await
    }

    async fn set_limit(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        let (root, q, limit) = (self.root.clone(), *qs, *limit);
        blocking(move || {
            let dir = Self::scope_dir(&root, &q)?;
            Self::apply(dir.as_fd(), &q, &limit)
        })
        .await
    }
}
