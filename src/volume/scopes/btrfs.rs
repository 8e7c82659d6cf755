//! `btrfs`: a quota scope is a subvolume, and its limit is the limit of the subvolume's qgroup
//! (what it references). Usage is the qgroup's counter in sysfs plus the space reserved by
//! writes not yet committed, so a check right after a write sees it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use super::{QuotaLimit, QuotaOps, Scopes, io_err, sys};
use crate::config::VolumeConfig;
use crate::ids::QuotaScopeId;
use crate::volume::blocking;
use crate::volume::fsops;
use crate::volume::{QuotaUsage, Result, VolumeError};

pub struct BtrfsSubvolumes {
    root: Arc<OwnedFd>,
    fsid: String,
}

pub fn check(path: &Path) -> std::result::Result<(), String> {
    let fd = fsops::open_dir_path(path).map_err(|e| e.to_string())?;
    let magic = sys::fs_magic(fd.as_fd()).map_err(|e| e.to_string())?;
    if magic != sys::BTRFS_SUPER_MAGIC {
        return Err(format!("{} is not on a btrfs filesystem", path.display()));
    }
    let fsid = sys::btrfs_fsid(fd.as_fd()).map_err(|e| e.to_string())?;
    if !sys::btrfs_quota_enabled(&fsid) {
        return Err(format!(
            "quotas are off on the btrfs filesystem of {} (turn them on with: btrfs quota enable {})",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

impl BtrfsSubvolumes {
    pub fn open(c: &VolumeConfig, root: Arc<OwnedFd>) -> Result<Self> {
        check(&c.path).map_err(VolumeError::Internal)?;
        let fsid = sys::btrfs_fsid(root.as_fd()).map_err(|e| VolumeError::Io {
            path: c.path.display().to_string(),
            source: e,
        })?;
        Ok(BtrfsSubvolumes { root, fsid })
    }

    /// The qgroup of a scope's subvolume.
    fn qgroup(root: &OwnedFd, qs: &QuotaScopeId) -> Result<u64> {
        let d =
            fsops::open_subdir_nofollow(root.as_fd(), qs.dir_name()).map_err(|e| io_err(qs, e))?;
        let id = sys::btrfs_subvol_id(d.as_fd()).map_err(|e| io_err(qs, e))?;
        if id == sys::btrfs_subvol_id(root.as_fd()).map_err(|e| io_err(qs, e))? {
            // A plain directory (made before the volume was btrfs-managed): no qgroup of its own.
            return Err(VolumeError::Internal(format!(
                "quota scope {qs} is a directory, not a subvolume"
            )));
        }
        Ok(sys::qgroup_of(id))
    }
}

fn bytes_only(qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
    if limit.inodes.is_some() {
        return Err(VolumeError::InvalidQuota(format!(
            "{qs}: btrfs qgroups limit bytes, not inodes"
        )));
    }
    Ok(())
}

#[async_trait]
impl Scopes for BtrfsSubvolumes {
    fn backend(&self) -> &'static str {
        "btrfs"
    }

    fn quota(&self) -> Option<&dyn QuotaOps> {
        Some(self)
    }

    async fn create(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        bytes_only(qs, limit)?;
        let (root, q, bytes) = (self.root.clone(), *qs, limit.bytes);
        blocking(move || {
            match sys::btrfs_subvol_create(root.as_fd(), &q.dir_name()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    return Err(VolumeError::QuotaScopeExists(q));
                }
                Err(e) => return Err(io_err(&q, e)),
            }
            let limited = Self::qgroup(&root, &q).and_then(|g| {
                sys::btrfs_qgroup_limit(root.as_fd(), g, bytes).map_err(|e| io_err(&q, e))
            });
            if let Err(e) = limited {
                let _ = sys::btrfs_subvol_destroy(root.as_fd(), &q.dir_name());
                return Err(e);
            }
            fsops::fsync_dir(root.as_fd()).map_err(|e| io_err(&q, e))
        })
        .await
    }

    async fn remove(&self, qs: &QuotaScopeId) -> Result<()> {
        let (root, q) = (self.root.clone(), *qs);
        blocking(move || {
            let group = Self::qgroup(&root, &q).ok();
            sys::btrfs_subvol_destroy(root.as_fd(), &q.dir_name()).map_err(|e| io_err(&q, e))?;
            // Newer kernels drop the qgroup with its subvolume; older ones keep it around.
            if let Some(g) = group {
                let _ = sys::btrfs_qgroup_destroy(root.as_fd(), g);
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl QuotaOps for BtrfsSubvolumes {
    async fn usage(&self, qs: &QuotaScopeId) -> Result<QuotaUsage> {
        let (root, fsid, q) = (self.root.clone(), self.fsid.clone(), *qs);
        blocking(move || {
            let g = Self::qgroup(&root, &q)?;
            let (used, limit) = sys::btrfs_qgroup_usage(&fsid, g).map_err(|e| io_err(&q, e))?;
            Ok(QuotaUsage {
                used_bytes: Some(used),
                limit_bytes: limit,
                used_inodes: None,
                limit_inodes: None,
            })
        })
        .await
    }

    async fn set_limit(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        bytes_only(qs, limit)?;
        let (root, q, bytes) = (self.root.clone(), *qs, limit.bytes);
        blocking(move || {
            let g = Self::qgroup(&root, &q)?;
            sys::btrfs_qgroup_limit(root.as_fd(), g, bytes).map_err(|e| io_err(&q, e))
        })
        .await
    }
}
