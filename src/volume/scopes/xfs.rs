//! `xfs`: a quota scope is a directory tagged with an XFS project id (with the inherit flag, so
//! everything made inside belongs to the project), and its limit is the project quota. Ids are
//! allocated in the state database, the smallest free one first, skipping every id already on a
//! directory of the volume or named in `/etc/projid` (scopes the Python proxy made, or anyone's
//! `xfs_quota` projects); an id is freed only with its scope, after its limits are cleared.
//! `/etc/projects` and `/etc/projid` are not needed: the kernel keeps the id on the directory,
//! the database keeps which scope has which. They are kept too when `project-files` asks.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;

use super::projfiles::ProjectFiles;
use super::{QuotaLimit, QuotaOps, Scopes, io_err, make_dir, sys};
use crate::config::VolumeConfig;
use crate::ids::QuotaScopeId;
use crate::state::State;
use crate::volume::blocking;
use crate::volume::fsops;
use crate::volume::{QuotaUsage, Result, VolumeError};

pub struct XfsProjects {
    volume: String,
    path: PathBuf,
    files: Option<ProjectFiles>,
    root: Arc<OwnedFd>,
    device: PathBuf,
    state: State,
}

pub fn check(path: &Path) -> std::result::Result<(), String> {
    let fd = fsops::open_dir_path(path).map_err(|e| e.to_string())?;
    let magic = sys::fs_magic(fd.as_fd()).map_err(|e| e.to_string())?;
    if magic != sys::XFS_SUPER_MAGIC {
        return Err(format!("{} is not on an XFS filesystem", path.display()));
    }
    let dev = sys::device_of(path).map_err(|e| e.to_string())?;
    match sys::xfs_project_quota_state(&dev) {
        Ok((true, true)) => Ok(()),
        Ok((acct, _)) => Err(format!(
            "project quota {} on {} (XFS turns it on only at mount time: add prjquota to its mount options, e.g. in /etc/fstab, and mount it again)",
            if acct {
                "is accounted but not enforced"
            } else {
                "is off"
            },
            dev.display()
        )),
        // A kernel with XFS quota answers ENOSYS too for a filesystem mounted without any quota
        // option; it is the one with /proc/fs/xfs/xqmstat.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTSUP)
            ) =>
        {
            if Path::new("/proc/fs/xfs/xqmstat").exists() {
                Err(format!(
                    "project quota is off on {} (XFS turns it on only at mount time: add prjquota to its mount options, e.g. in /etc/fstab, and mount it again)",
                    dev.display()
                ))
            } else {
                Err(format!(
                    "{}: this kernel has no XFS quota support (CONFIG_XFS_QUOTA): {e}",
                    dev.display()
                ))
            }
        }
        Err(e) => Err(format!(
            "cannot read the quota state of {}: {e}",
            dev.display()
        )),
    }
}

/// The smallest project id (from 1; 0 is "no project") not in `taken`.
fn smallest_free(taken: &BTreeSet<u32>) -> u32 {
    let mut id = 1;
    for &t in taken.range(1..) {
        if t != id {
            break;
        }
        id += 1;
    }
    id
}

/// Project ids someone already uses: on the volume's top-level directories, and in
/// `/etc/projid` (`name:id` lines) and the one we keep. Unreadable entries are skipped: this only
/// avoids clashes.
fn ids_in_use(root: BorrowedFd, projid: Option<PathBuf>) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    if let Ok(entries) = fsops::DirEntries::new(root) {
        for (name, _) in entries.flatten() {
            if let Ok(d) = fsops::open_subdir_nofollow(root, &name)
                && let Ok(id) = sys::project_of(d.as_fd())
                && id != 0
            {
                ids.insert(id);
            }
        }
    }
    for file in std::iter::once(PathBuf::from("/etc/projid")).chain(projid) {
        if let Ok(text) = std::fs::read_to_string(file) {
            ids.extend(
                text.lines()
                    .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u32>().ok()),
            );
        }
    }
    ids
}

impl XfsProjects {
    pub fn open(c: &VolumeConfig, root: Arc<OwnedFd>, state: State) -> Result<Self> {
        check(&c.path).map_err(VolumeError::Internal)?;
        let device = sys::device_of(&c.path).map_err(|e| VolumeError::Io {
            path: c.path.display().to_string(),
            source: e,
        })?;
        Ok(XfsProjects {
            volume: c.name.clone(),
            path: c.path.clone(),
            files: c.project_files.clone().map(ProjectFiles::new),
            root,
            device,
            state,
        })
    }

    async fn project(&self, qs: &QuotaScopeId) -> Result<Option<u32>> {
        let row =
            sqlx::query("SELECT project_id FROM quota_projects WHERE volume = ? AND qsid = ?")
                .bind(&self.volume)
                .bind(qs.to_string())
                .fetch_optional(self.state.pool())
                .await
                .map_err(|e| VolumeError::Internal(format!("state database: {e}")))?;
        Ok(row.map(|r| r.get::<i64, _>(0) as u32))
    }

    /// The project id of a scope: recorded, or allocated now (the smallest free one).
    async fn allocate(&self, qs: &QuotaScopeId) -> Result<u32> {
        let db = |e: sqlx::Error| VolumeError::Internal(format!("state database: {e}"));
        for _ in 0..8 {
            if let Some(id) = self.project(qs).await? {
                return Ok(id);
            }
            let root = self.root.clone();
            let projid = self.files.as_ref().map(ProjectFiles::projid);
            let mut taken = blocking(move || Ok(ids_in_use(root.as_fd(), projid))).await?;
            let recorded: Vec<i64> = sqlx::query(
                "SELECT project_id FROM quota_projects WHERE volume = ? ORDER BY project_id",
            )
            .bind(&self.volume)
            .fetch_all(self.state.pool())
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
            taken.extend(recorded.into_iter().map(|i| i as u32));
            let id = smallest_free(&taken) as i64;
            let inserted = sqlx::query(
                "INSERT OR IGNORE INTO quota_projects (volume, qsid, project_id) VALUES (?, ?, ?)",
            )
            .bind(&self.volume)
            .bind(qs.to_string())
            .bind(id)
            .execute(self.state.pool())
            .await
            .map_err(db)?;
            if inserted.rows_affected() == 1 {
                return Ok(id as u32);
            }
        }
        Err(VolumeError::Internal(
            "cannot allocate an XFS project id".into(),
        ))
    }

    async fn release(&self, qs: &QuotaScopeId) -> Result<()> {
        sqlx::query("DELETE FROM quota_projects WHERE volume = ? AND qsid = ?")
            .bind(&self.volume)
            .bind(qs.to_string())
            .execute(self.state.pool())
            .await
            .map_err(|e| VolumeError::Internal(format!("state database: {e}")))?;
        Ok(())
    }

    /// The scope's project id; a scope made before us (or by the Python proxy) is adopted with
    /// the id its directory already carries.
    async fn project_of(&self, qs: &QuotaScopeId) -> Result<u32> {
        if let Some(id) = self.project(qs).await? {
            return Ok(id);
        }
        let root = self.root.clone();
        let q = *qs;
        let on_disk = blocking(move || {
            let d = fsops::open_subdir_nofollow(root.as_fd(), q.dir_name())
                .map_err(|e| io_err(&q, e))?;
            sys::project_of(d.as_fd()).map_err(|e| io_err(&q, e))
        })
        .await?;
        if on_disk == 0 {
            return Err(VolumeError::Internal(format!(
                "quota scope {qs} has no XFS project id"
            )));
        }
        sqlx::query(
            "INSERT OR IGNORE INTO quota_projects (volume, qsid, project_id) VALUES (?, ?, ?)",
        )
        .bind(&self.volume)
        .bind(qs.to_string())
        .bind(on_disk as i64)
        .execute(self.state.pool())
        .await
        .map_err(|e| VolumeError::Internal(format!("state database: {e}")))?;
        Ok(on_disk)
    }
}

#[async_trait]
impl Scopes for XfsProjects {
    fn backend(&self) -> &'static str {
        "xfs"
    }

    fn quota(&self) -> Option<&dyn QuotaOps> {
        Some(self)
    }

    async fn create(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        let root = self.root.clone();
        let q = *qs;
        blocking(move || make_dir(root.as_fd(), &q)).await?;
        let id = self.allocate(qs).await?;
        let (root, dev, q, limit) = (self.root.clone(), self.device.clone(), *qs, *limit);
        let (files, path) = (self.files.clone(), self.path.join(qs.dir_name()));
        let tagged = blocking(move || {
            let d = fsops::open_subdir_nofollow(root.as_fd(), q.dir_name())
                .map_err(|e| io_err(&q, e))?;
            sys::set_project(d.as_fd(), id).map_err(|e| io_err(&q, e))?;
            sys::xfs_set_project_limits(
                &dev,
                id,
                limit.bytes.unwrap_or(0),
                limit.inodes.unwrap_or(0),
            )
            .map_err(|e| io_err(&q, e))?;
            if let Some(f) = files {
                f.add(id, &q.dir_name(), &path)
                    .map_err(|e| VolumeError::Io {
                        path: "project files".into(),
                        source: e,
                    })?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = tagged {
            // Never leave a scope half made: the directory goes, and its id with it.
            let root = self.root.clone();
            let _ = blocking(move || {
                let _ = fsops::unlink_at(root.as_fd(), q.dir_name(), true);
                Ok(())
            })
            .await;
            let _ = self.release(qs).await;
            return Err(e);
        }
        Ok(())
    }

    async fn remove(&self, qs: &QuotaScopeId) -> Result<()> {
        let id = self.project(qs).await?;
        let (root, dev, q, files) = (
            self.root.clone(),
            self.device.clone(),
            *qs,
            self.files.clone(),
        );
        blocking(move || {
            fsops::unlink_at(root.as_fd(), q.dir_name(), true).map_err(|e| io_err(&q, e))?;
            // The id is reused later: it must start again without limits.
            if let Some(id) = id {
                sys::xfs_set_project_limits(&dev, id, 0, 0).map_err(|e| io_err(&q, e))?;
                if let Some(f) = files
                    && let Err(e) = f.remove(id)
                {
                    tracing::warn!(project = id, error = %e, "cannot remove the project's lines from the project files");
                }
            }
            Ok(())
        })
        .await?;
        self.release(qs).await
    }
}

#[async_trait]
impl QuotaOps for XfsProjects {
    async fn usage(&self, qs: &QuotaScopeId) -> Result<QuotaUsage> {
        let id = self.project_of(qs).await?;
        let (dev, q) = (self.device.clone(), *qs);
        let p = blocking(move || sys::xfs_get_project(&dev, id).map_err(|e| io_err(&q, e))).await?;
        Ok(QuotaUsage {
            used_bytes: Some(p.bytes_used),
            limit_bytes: (p.bytes_limit > 0).then_some(p.bytes_limit),
            used_inodes: Some(p.inodes_used),
            limit_inodes: (p.inodes_limit > 0).then_some(p.inodes_limit),
        })
    }

    async fn set_limit(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        let id = self.project_of(qs).await?;
        let (dev, q, limit) = (self.device.clone(), *qs, *limit);
        blocking(move || {
            sys::xfs_set_project_limits(
                &dev,
                id,
                limit.bytes.unwrap_or(0),
                limit.inodes.unwrap_or(0),
            )
            .map_err(|e| io_err(&q, e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_free_id_fills_gaps_and_skips_zero() {
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(smallest_free(&set(&[])), 1);
        assert_eq!(smallest_free(&set(&[0, 1, 2, 4])), 3);
        assert_eq!(smallest_free(&set(&[2, 3])), 1);
        assert_eq!(smallest_free(&set(&[1, 2, 3])), 4);
    }
}
