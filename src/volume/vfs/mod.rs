//! A volume on a local (or NFS-mounted) directory: `vfs`, and `xfs` and `btrfs`, which keep the same
//! layout and differ only in their quota scopes (`scopes/`: plain directories, XFS projects,
//! btrfs subvolumes with qgroups).

mod copy;
mod join;
mod read;
mod staging;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use super::fsops::{self, Owner};
use super::scan;
use super::scopes::{self, QuotaLimit, QuotaOps, Scopes};
use super::tree;
use super::{
    DirEntry, EntryKind, EntryStat, FsUsage, HwInfo, Listing, MountInfo, MountSource, Progress,
    QuotaUsage, ReadHandle, RelPath, Result, TreeUsage, UploadStaging, Volume, VolumeError,
    VolumeStatus, WalkEntry,
};
use crate::config::VolumeConfig;
use crate::ids::{QuotaScopeId, VFolderId};
use crate::state::State;
pub use read::entry_stat;

/// Permission bits the daemon ever sets on what it creates: never set-user-id, set-group-id or
/// sticky (a vfolder or a clone is data, not a program to run as its owner).
const MODE_MASK: u32 = 0o777;

pub struct VfsVolume {
    name: String,
    root: PathBuf,
    fsprefix: String,
    root_fd: Arc<OwnedFd>,
    owner: Option<Owner>,
    staging: staging::VfsStaging,
    scopes: Arc<dyn Scopes>,
    /// Reads may be opened on the event loop when the dentry cache has the path (a local disk).
    opens_from_memory: bool,
}

pub(crate) use super::blocking;

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// Opens a vfolder's root directory; missing (or not a directory) is VFolderNotFound.
pub(crate) fn open_vfolder(root: BorrowedFd, vf: &VFolderId) -> Result<OwnedFd> {
    let rel = RelPath::parse(&vf.rel_path().to_string_lossy())
        .map_err(|e| VolumeError::Internal(e.to_string()))?;
    fsops::open_dir_beneath(root, &rel).map_err(|e| match errno(&e) {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => VolumeError::VFolderNotFound(*vf),
        _ => VolumeError::Io {
            path: vf.to_string(),
            source: e,
        },
    })
}

fn scan_threads() -> usize {
    // More walkers than cores help on cold caches and network mounts, where stat waits on I/O.
    std::thread::available_parallelism()
        .map(|n| (n.get() * 2).min(8))
        .unwrap_or(2)
}

impl VfsVolume {
    pub fn open(c: &VolumeConfig, owner: Option<Owner>, state: &State) -> Result<Self> {
        let root_fd = Arc::new(fsops::open_dir_path(&c.path).map_err(|e| VolumeError::Io {
            path: c.path.display().to_string(),
            source: e,
        })?);
        // Backend.AI's layout version marker; its absence makes the Python proxy log a warning.
        let version = c.path.join("version.txt");
        if !version.exists() {
            let _ = std::fs::write(&version, "3\n");
        }
        let scopes = scopes::open(c, root_fd.clone(), state)?;
        Ok(VfsVolume {
            scopes,
            name: c.name.clone(),
            root: c.path.clone(),
            fsprefix: c.fsprefix.clone(),
            staging: staging::VfsStaging {
                root_fd: root_fd.clone(),
                owner,
            },
            opens_from_memory: fsops::opens_from_memory(root_fd.as_fd()),
            root_fd,
            owner,
        })
    }

    fn root(&self) -> Arc<OwnedFd> {
        self.root_fd.clone()
    }

    fn qs_exists(root: BorrowedFd, qs: &QuotaScopeId) -> Result<bool> {
        match fsops::lstat_at(root, qs.dir_name()) {
            Ok(st) => Ok(fsops::is_dir(&st)),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(VolumeError::Io {
                path: qs.to_string(),
                source: e,
            }),
        }
    }
}

impl VfsVolume {
    /// The host path of `subpath` of the vfolder, resolved by the kernel beneath the vfolder.
    async fn host_path(&self, vf: &VFolderId, subpath: &RelPath) -> Result<PathBuf> {
        let root = self.root();
        let (vf, sub) = (*vf, subpath.clone());
        let base = self.root.join(vf.rel_path());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            if sub.is_root() {
                return Ok(base);
            }
            // The path the kernel resolved (symlinks inside the vfolder followed), so whoever
            // mounts it gets exactly the directory that was checked.
            let fd = fsops::open_beneath(vfd.as_fd(), &sub, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(|e| VolumeError::io(&sub, e))?;
            fsops::fd_path(fd.as_fd()).map_err(|e| VolumeError::io(&sub, e))
        })
        .await
    }
}

impl fmt::Display for VfsVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.scopes.backend() {
            "xfs" => "Xfs",
            "btrfs" => "Btrfs",
            "cephfs" => "CephFS",
            _ => "Vfs",
        };
        write!(f, "{kind}({})", self.root.display())
    }
}

#[async_trait]
impl Volume for VfsVolume {
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> &'static str {
        self.scopes.backend()
    }
    fn location(&self) -> String {
        self.root.display().to_string()
    }
    fn fsprefix(&self) -> &str {
        &self.fsprefix
    }
    fn health_target(&self) -> super::health::Target {
        super::health::Target::Path(self.root.clone())
    }
    fn capabilities(&self) -> Vec<&'static str> {
        let mut caps = vec!["vfolder"];
        if self.scopes.quota().is_some() {
            caps.push("quota");
        }
        if self.scopes.counts_trees() {
            caps.push("fast-size");
        }
        caps
    }

    async fn hwinfo(&self) -> HwInfo {
        let mut metadata = BTreeMap::new();
        metadata.insert("backend".to_string(), self.backend().to_string());
        metadata.insert("path".to_string(), self.root.display().to_string());
        HwInfo {
            status: VolumeStatus::Healthy,
            status_info: None,
            metadata,
        }
    }

    async fn fs_usage(&self) -> Result<FsUsage> {
        let root = self.root();
        let path = self.root.display().to_string();
        blocking(move || {
            let st = nix::sys::statvfs::fstatvfs(root.as_fd()).map_err(|e| VolumeError::Io {
                path,
                source: io::Error::from(e),
            })?;
            let frsize = st.fragment_size();
            Ok(FsUsage {
                capacity_bytes: frsize * st.blocks(),
                used_bytes: frsize * (st.blocks() - st.blocks_available()),
                available_bytes: frsize * st.blocks_available(),
            })
        })
        .await
    }

    async fn create_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        self.scopes.create(qs, limit).await
    }

    async fn describe_quota_scope(&self, qs: &QuotaScopeId) -> Result<Option<QuotaUsage>> {
        let root = self.root();
        let q = *qs;
        if !blocking(move || Self::qs_exists(root.as_fd(), &q)).await? {
            return Ok(None);
        }
        match self.scopes.quota() {
            Some(quota) => quota.usage(qs).await.map(Some),
            // vfs enforces no limit; Backend.AI reports both as unknown (null).
            None => Ok(Some(QuotaUsage::default())),
        }
    }

    async fn update_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        match self.scopes.create(qs, limit).await {
            Ok(()) => Ok(()),
            Err(VolumeError::QuotaScopeExists(_)) => match self.scopes.quota() {
                Some(quota) => quota.set_limit(qs, limit).await,
                None => Ok(()),
            },
            Err(e) => Err(e),
        }
    }

    async fn unset_quota(&self, qs: &QuotaScopeId) -> Result<()> {
        let root = self.root();
        let q = *qs;
        if !blocking(move || Self::qs_exists(root.as_fd(), &q)).await? {
            return Err(VolumeError::QuotaScopeNotFound(*qs));
        }
        match self.scopes.quota() {
            Some(quota) => quota.set_limit(qs, &QuotaLimit::default()).await,
            None => Ok(()),
        }
    }

    async fn delete_quota_scope(&self, qs: &QuotaScopeId) -> Result<()> {
        let root = self.root();
        let q = *qs;
        blocking(move || {
            let dir = match fsops::open_subdir_nofollow(root.as_fd(), q.dir_name()) {
                Ok(d) => d,
                Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                    return Err(VolumeError::QuotaScopeNotFound(q));
                }
                Err(e) => {
                    return Err(VolumeError::Io {
                        path: q.to_string(),
                        source: e,
                    });
                }
            };
            // Vfolders live two shard levels down; empty shard directories are left-overs.
            let io = |e| VolumeError::Io {
                path: q.to_string(),
                source: e,
            };
            for ent in fsops::DirEntries::new(dir.as_fd()).map_err(io)? {
                let (name, _) = ent.map_err(io)?;
                if name == ".upload" {
                    continue;
                }
                let holds = |d: &OwnedFd| -> std::io::Result<bool> {
                    Ok(fsops::DirEntries::new(d.as_fd())?.next().is_some())
                };
                let shard = match fsops::open_subdir_nofollow(dir.as_fd(), &name) {
                    Ok(d) => d,
                    Err(_) => return Err(VolumeError::QuotaScopeNotEmpty(q)),
                };
                for sub in fsops::DirEntries::new(shard.as_fd()).map_err(io)? {
                    let (sname, _) = sub.map_err(io)?;
                    match fsops::open_subdir_nofollow(shard.as_fd(), &sname) {
                        Ok(d) if !holds(&d).map_err(io)? => {}
                        _ => return Err(VolumeError::QuotaScopeNotEmpty(q)),
                    }
                }
            }
            // Nothing of value left: staging of unfinished uploads and empty shards go.
            for ent in fsops::DirEntries::new(dir.as_fd())
                .map_err(io)?
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(io)?
            {
                tree::remove_tree_at(dir.as_fd(), &ent.0, &mut || true).map_err(io)?;
            }
            Ok(())
        })
        .await?;
        self.scopes.remove(qs).await
    }

    fn quota(&self) -> Option<&dyn QuotaOps> {
        self.scopes.quota()
    }

    async fn list_quota_scopes(&self) -> Result<Vec<uuid::Uuid>> {
        let root = self.root();
        blocking(move || {
            let io = |e| VolumeError::Io {
                path: ".".into(),
                source: e,
            };
            let mut out = Vec::new();
            for e in fsops::DirEntries::new(root.as_fd()).map_err(io)? {
                let (name, _) = e.map_err(io)?;
                if let Some(id) = hex_uuid(&name) {
                    out.push(id);
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn list_vfolders(
        &self,
        scope: Option<uuid::Uuid>,
    ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>> {
        let scopes = match scope {
            Some(s) => vec![s],
            None => self.list_quota_scopes().await?,
        };
        let root = self.root();
        blocking(move || {
            let mut out = Vec::new();
            for qs in scopes {
                let Ok(qfd) = fsops::open_subdir_nofollow(root.as_fd(), qs.simple().to_string())
                else {
                    continue;
                };
                // <qs>/<aa>/<bb>/<28 hex>: names that do not fit are not vfolders (.upload).
                for (aa, _) in list_names(qfd.as_fd()) {
                    let Ok(afd) = fsops::open_subdir_nofollow(qfd.as_fd(), &aa) else {
                        continue;
                    };
                    for (bb, _) in list_names(afd.as_fd()) {
                        let Ok(bfd) = fsops::open_subdir_nofollow(afd.as_fd(), &bb) else {
                            continue;
                        };
                        for (rest, _) in list_names(bfd.as_fd()) {
                            let hex = format!(
                                "{}{}{}",
                                aa.to_string_lossy(),
                                bb.to_string_lossy(),
                                rest.to_string_lossy()
                            );
                            if let Some(id) = hex_uuid(std::ffi::OsStr::new(&hex)) {
                                out.push((qs, id));
                            }
                        }
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn create_vfolder(&self, vf: &VFolderId, mode: u32) -> Result<()> {
        let qs = vf.quota_scope.ok_or(VolumeError::QuotaScopeRequired(*vf))?;
        let root = self.root();
        let owner = self.owner;
        let vf = *vf;
        blocking(move || {
            if !Self::qs_exists(root.as_fd(), &qs)? {
                return Err(VolumeError::QuotaScopeNotFound(qs));
            }
            let rel = RelPath::parse(&vf.rel_path().to_string_lossy())
                .map_err(|e| VolumeError::Internal(e.to_string()))?;
            let (shard, leaf) = rel
                .split_last()
                .ok_or_else(|| VolumeError::Internal("empty vfolder path".into()))?;
            let io = |e| VolumeError::Io {
                path: vf.to_string(),
                source: e,
            };
            let pfd = fsops::mkdir_all_beneath(root.as_fd(), &shard, 0o755, None).map_err(io)?;
            match fsops::mkdir_at(pfd.as_fd(), leaf, 0o700) {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    return Err(VolumeError::VFolderExists(vf));
                }
                Err(e) => return Err(io(e)),
            }
            // mkdir is subject to the umask; the requested mode is applied exactly.
            let fd = fsops::open_subdir_nofollow(pfd.as_fd(), leaf).map_err(io)?;
            fsops::fchown(fd.as_fd(), owner).map_err(io)?;
            fsops::fchmod(fd.as_fd(), mode & MODE_MASK).map_err(io)?;
            fsops::fsync_dir(pfd.as_fd()).map_err(io)
        })
        .await
    }

    async fn vfolder_exists(&self, vf: &VFolderId) -> Result<bool> {
        match open_vfolder(self.root_fd.as_fd(), vf) {
            Ok(_) => Ok(true),
            Err(VolumeError::VFolderNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn delete_vfolder(&self, vf: &VFolderId, progress: Arc<Progress>) -> Result<()> {
        let root = self.root();
        let vf = *vf;
        blocking(move || {
            let rel = RelPath::parse(&vf.rel_path().to_string_lossy())
                .map_err(|e| VolumeError::Internal(e.to_string()))?;
            let io = |e: io::Error| {
                if errno(&e) == Some(libc::ECANCELED) {
                    VolumeError::Cancelled
                } else {
                    VolumeError::Io {
                        path: vf.to_string(),
                        source: e,
                    }
                }
            };
            let (parent, leaf) = fsops::open_parent(root.as_fd(), &rel).map_err(io)?;
            tree::remove_tree_at(parent.as_fd(), OsStr::new(&leaf), &mut || {
                progress.advance(1)
            })
            .map_err(io)?;
            // Tidy the two shard levels when they became empty (ENOTEMPTY is the normal case).
            let (shard, _) = rel.split_last().unwrap_or((RelPath::root(), ""));
            let mut dir = shard;
            for _ in 0..2 {
                let Some((up, name)) = dir.split_last() else {
                    break;
                };
                if let Ok(ufd) = fsops::open_dir_beneath(root.as_fd(), &up) {
                    let _ = fsops::unlink_at(ufd.as_fd(), name, true);
                }
                dir = up;
            }
            Ok(())
        })
        .await
        .or_else(|e| match e {
            // The shard directories are already gone: nothing left to delete.
            VolumeError::Io { ref source, .. } if errno(source) == Some(libc::ENOENT) => Ok(()),
            e => Err(e),
        })
    }

    async fn clone_vfolder(
        &self,
        src: &VFolderId,
        dst: &VFolderId,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let needed = self.used_bytes(src).await?;
        let usage = self.usage(src).await?;
        let free = self.fs_usage().await?.available_bytes;
        if needed > free {
            return Err(VolumeError::NoSpace {
                needed,
                available: free,
            });
        }
        progress.set_total(usage.file_count);
        self.create_vfolder(dst, crate::volume::DEFAULT_VFOLDER_MODE)
            .await?;
        let root = self.root();
        let owner = self.owner;
        let (src, dst) = (*src, *dst);
        let p = progress.clone();
        let result = blocking(move || {
            let s = open_vfolder(root.as_fd(), &src)?;
            let d = open_vfolder(root.as_fd(), &dst)?;
            let io = |e| VolumeError::Io {
                path: dst.to_string(),
                source: e,
            };
            let st = fsops::fstat(s.as_fd()).map_err(io)?;
            let d_root = d.try_clone().map_err(io)?;
            copy::copy_dir_contents(s, d, owner, &p)
                .and_then(|()| fsops::fchmod(d_root.as_fd(), st.st_mode & MODE_MASK))
                .map_err(|e| {
                    if errno(&e) == Some(libc::ECANCELED) {
                        VolumeError::Cancelled
                    } else {
                        VolumeError::Io {
                            path: dst.to_string(),
                            source: e,
                        }
                    }
                })
        })
        .await;
        if let Err(e) = result {
            // Never leave a half-copied destination behind.
            let _ = self
                .delete_vfolder(&dst, Arc::new(Progress::default()))
                .await;
            return Err(e);
        }
        Ok(())
    }

    async fn mount_info(&self, vf: &VFolderId, subpath: &RelPath) -> Result<MountInfo> {
        self.host_path(vf, subpath).await?;
        // Backend.AI reports the vfolder root; the subpath was only checked.
        Ok(MountInfo::HostPath(self.root.join(vf.rel_path())))
    }

    async fn mount_source(
        &self,
        vf: &VFolderId,
        subpath: &RelPath,
        _read_only: bool,
        _holder: &str,
    ) -> Result<MountSource> {
        let root = self.root();
        let (vf, sub) = (*vf, subpath.clone());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let dir = if sub.is_root() {
                vfd
            } else {
                fsops::open_beneath(vfd.as_fd(), &sub, libc::O_PATH | libc::O_DIRECTORY, 0)
                    .map_err(|e| VolumeError::io(&sub, e))?
            };
            let shown = fsops::fd_path(dir.as_fd()).map_err(|e| VolumeError::io(&sub, e))?;
            Ok(MountSource { dir, shown })
        })
        .await
    }

    async fn usage(&self, vf: &VFolderId) -> Result<TreeUsage> {
        let root = self.root();
        let vf = *vf;
        let scopes = self.scopes.clone();
        blocking(move || {
            let fd = open_vfolder(root.as_fd(), &vf)?;
            if let Some(counted) = scopes.tree_usage(fd.as_fd()) {
                return counted.map_err(|e| VolumeError::Io {
                    path: vf.to_string(),
                    source: e,
                });
            }
            let t = scan::scan_tree(fd.as_fd(), scan_threads()).map_err(|e| VolumeError::Io {
                path: vf.to_string(),
                source: e,
            })?;
            Ok(TreeUsage {
                file_count: t.entries,
                used_bytes: t.apparent_bytes,
            })
        })
        .await
    }

    async fn used_bytes(&self, vf: &VFolderId) -> Result<u64> {
        let root = self.root();
        let vf = *vf;
        let scopes = self.scopes.clone();
        blocking(move || {
            let fd = open_vfolder(root.as_fd(), &vf)?;
            if let Some(counted) = scopes.tree_usage(fd.as_fd()) {
                return counted.map(|t| t.used_bytes).map_err(|e| VolumeError::Io {
                    path: vf.to_string(),
                    source: e,
                });
            }
            scan::scan_tree(fd.as_fd(), scan_threads())
                .map(|t| t.disk_bytes)
                .map_err(|e| VolumeError::Io {
                    path: vf.to_string(),
                    source: e,
                })
        })
        .await
    }

    async fn list(&self, vf: &VFolderId, dir: &RelPath, limit: usize) -> Result<Listing> {
        let root = self.root();
        let (vf, dir) = (*vf, dir.clone());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let dfd =
                fsops::open_dir_beneath(vfd.as_fd(), &dir).map_err(|e| VolumeError::io(&dir, e))?;
            let dir_real = fsops::fd_path(dfd.as_fd()).ok();
            let mut items = Vec::new();
            let mut truncated = false;
            for ent in fsops::DirEntries::new(dfd.as_fd()).map_err(|e| VolumeError::io(&dir, e))? {
                let (name, _) = ent.map_err(|e| VolumeError::io(&dir, e))?;
                if limit > 0 && items.len() >= limit {
                    truncated = true;
                    break;
                }
                // Entries vanishing between readdir and stat are skipped, as Backend.AI does.
                let Ok(st) = fsops::lstat_at(dfd.as_fd(), &name) else {
                    continue;
                };
                let stat = read::entry_stat(&st);
                let symlink_target = if stat.kind == EntryKind::Symlink {
                    symlink_target_in(dfd.as_fd(), &name, dir_real.as_deref())
                } else {
                    String::new()
                };
                items.push(DirEntry {
                    name: name.to_string_lossy().into_owned(),
                    stat,
                    symlink_target,
                });
            }
            Ok(Listing { items, truncated })
        })
        .await
    }

    async fn mkdir(
        &self,
        vf: &VFolderId,
        p: &RelPath,
        parents: bool,
        exist_ok: bool,
    ) -> Result<()> {
        let root = self.root();
        let owner = self.owner;
        let (vf, p) = (*vf, p.clone());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let io = |e| VolumeError::io(&p, e);
            let (parent, name) = p
                .split_last()
                .ok_or_else(|| io(io::Error::from_raw_os_error(libc::EEXIST)))?;
            let pfd = if parents {
                fsops::mkdir_all_beneath(vfd.as_fd(), &parent, 0o755, owner).map_err(io)?
            } else {
                fsops::open_dir_beneath(vfd.as_fd(), &parent).map_err(io)?
            };
            match fsops::mkdir_at(pfd.as_fd(), name, 0o755) {
                Ok(()) => fsops::chown_at(pfd.as_fd(), name, owner).map_err(io),
                Err(e) if errno(&e) == Some(libc::EEXIST) && exist_ok => {
                    match fsops::lstat_at(pfd.as_fd(), name) {
                        Ok(st) if fsops::is_dir(&st) => Ok(()),
                        _ => Err(io(e)),
                    }
                }
                Err(e) => Err(io(e)),
            }
        })
        .await
    }

    async fn rename(&self, vf: &VFolderId, p: &RelPath, new_name: &str) -> Result<()> {
        let root = self.root();
        let (vf, p, new_name) = (*vf, p.clone(), new_name.to_string());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let io = |e| VolumeError::io(&p, e);
            let (pfd, name) = fsops::open_parent(vfd.as_fd(), &p).map_err(io)?;
            // Renaming onto an existing name would silently destroy it: refuse (EEXIST).
            fsops::rename_at(pfd.as_fd(), &name, pfd.as_fd(), &new_name, true).map_err(io)
        })
        .await
    }

    async fn move_path(
        &self,
        vf: &VFolderId,
        src: &RelPath,
        dst: &RelPath,
        _progress: Arc<Progress>,
    ) -> Result<()> {
        let root = self.root();
        let (vf, src, dst) = (*vf, src.clone(), dst.clone());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let (spfd, sname) =
                fsops::open_parent(vfd.as_fd(), &src).map_err(|e| VolumeError::io(&src, e))?;
            fsops::lstat_at(spfd.as_fd(), &sname).map_err(|e| VolumeError::io(&src, e))?;
            // shutil.move semantics: into an existing directory, otherwise to that name.
            let (dpfd, dname) = match fsops::open_dir_beneath(vfd.as_fd(), &dst) {
                Ok(dfd) => (dfd, sname.clone()),
                Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                    fsops::open_parent(vfd.as_fd(), &dst).map_err(|e| VolumeError::io(&dst, e))?
                }
                Err(e) => return Err(VolumeError::io(&dst, e)),
            };
            fsops::rename_at(spfd.as_fd(), &sname, dpfd.as_fd(), &dname, false)
                .map_err(|e| VolumeError::io(&dst, e))
        })
        .await
    }

    async fn delete_files(
        &self,
        vf: &VFolderId,
        paths: &[RelPath],
        recursive: bool,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let root = self.root();
        let (vf, paths) = (*vf, paths.to_vec());
        progress.set_total(paths.len() as u64);
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            for p in &paths {
                let io = |e| VolumeError::io(p, e);
                if p.is_root() {
                    return Err(io(io::Error::from_raw_os_error(libc::EBUSY)));
                }
                let (pfd, name) = match fsops::open_parent(vfd.as_fd(), p) {
                    Ok(x) => x,
                    Err(e) if errno(&e) == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(io(e)),
                };
                let st = match fsops::lstat_at(pfd.as_fd(), &name) {
                    Ok(st) => st,
                    Err(e) if errno(&e) == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(io(e)),
                };
                if fsops::is_dir(&st) {
                    if recursive {
                        tree::remove_tree_at(pfd.as_fd(), OsStr::new(&name), &mut || {
                            !progress.is_cancelled()
                        })
                        .map_err(io)?;
                    } else {
                        // An empty directory goes; a non-empty one is reported (ENOTEMPTY)
                        // instead of being skipped silently as Backend.AI does.
                        fsops::unlink_at(pfd.as_fd(), &name, true).map_err(io)?;
                    }
                } else {
                    // A symlink is removed itself, never its target.
                    match fsops::unlink_at(pfd.as_fd(), &name, false) {
                        Ok(()) => {}
                        Err(e) if errno(&e) == Some(libc::ENOENT) => {}
                        Err(e) => return Err(io(e)),
                    }
                }
                if !progress.advance(1) {
                    return Err(VolumeError::Cancelled);
                }
            }
            Ok(())
        })
        .await
    }

    async fn stat(&self, vf: &VFolderId, p: &RelPath) -> Result<EntryStat> {
        let root = self.root();
        let (vf, p) = (*vf, p.clone());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let fd = fsops::open_beneath(vfd.as_fd(), &p, libc::O_PATH, 0)
                .map_err(|e| VolumeError::io(&p, e))?;
            let st = fsops::fstat(fd.as_fd()).map_err(|e| VolumeError::io(&p, e))?;
            Ok(read::entry_stat(&st))
        })
        .await
    }

    async fn check_file_destination(&self, vf: &VFolderId, dst: &RelPath) -> Result<()> {
        let root = self.root();
        let (vf, dst) = (*vf, dst.clone());
        // One blocking call for the whole path instead of one per component.
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let comps: Vec<&str> = dst.components().collect();
            let mut cur = RelPath::root();
            for (i, comp) in comps.iter().enumerate() {
                cur = cur.join_name(comp);
                let last = i + 1 == comps.len();
                let st = match fsops::open_beneath(vfd.as_fd(), &cur, libc::O_PATH, 0)
                    .and_then(|fd| fsops::fstat(fd.as_fd()))
                {
                    Ok(st) => st,
                    Err(e) if errno(&e) == Some(libc::ENOENT) => return Ok(()),
                    Err(e) => return Err(VolumeError::io(&cur, e)),
                };
                let code = match (last, fsops::is_dir(&st)) {
                    (true, true) => libc::EISDIR,
                    (false, false) => libc::ENOTDIR,
                    _ => continue,
                };
                return Err(VolumeError::io(&cur, io::Error::from_raw_os_error(code)));
            }
            Ok(())
        })
        .await
    }

    async fn open_read(&self, vf: &VFolderId, p: &RelPath) -> Result<Box<dyn ReadHandle>> {
        let root = self.root();
        if self.opens_from_memory
            && let Some(h) = read::open_from_memory(root.as_fd(), vf, p)
        {
            return Ok(h);
        }
        let (vf, p) = (*vf, p.clone());
        blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            // Only a regular file is ever opened for reading: a FIFO would block a thread for
            // ever, a device node would be read raw (EISDIR/EINVAL instead).
            let (fd, st) =
                fsops::open_regular_beneath(vfd.as_fd(), &p).map_err(|e| VolumeError::io(&p, e))?;
            let h: Box<dyn ReadHandle> =
                Box::new(read::VfsReadHandle::new(fd, read::entry_stat(&st)));
            Ok(h)
        })
        .await
    }

    async fn walk(
        &self,
        vf: &VFolderId,
        dir: &RelPath,
    ) -> Result<BoxStream<'static, io::Result<WalkEntry>>> {
        let root = self.root();
        let (vf, checked) = (*vf, dir.clone());
        // Resolve the start directory now, so a missing or escaping one fails before any byte.
        let (vfd, start) = blocking(move || {
            let vfd = open_vfolder(root.as_fd(), &vf)?;
            let start = fsops::open_dir_beneath(vfd.as_fd(), &checked)
                .map_err(|e| VolumeError::io(&checked, e))?;
            Ok((vfd, start))
        })
        .await?;
        Ok(read::walk_stream(Arc::new(vfd), dir.clone(), start))
    }

    fn staging(&self) -> &dyn UploadStaging {
        &self.staging
    }
}

/// A 32-hex-digit name as a UUID.
fn hex_uuid(name: &OsStr) -> Option<uuid::Uuid> {
    let s = name.to_str()?;
    (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| uuid::Uuid::parse_str(s).ok())
        .flatten()
}

/// A directory's entries, what can be read of them.
fn list_names(dir: BorrowedFd) -> Vec<(std::ffi::OsString, fsops::DType)> {
    fsops::DirEntries::new(dir)
        .map(|it| it.flatten().collect())
        .unwrap_or_default()
}

/// Backend.AI's `symlink_target`: the resolved target relative to the listed directory when it
/// resolves inside that directory, otherwise "".
fn symlink_target_in(dir: BorrowedFd, name: &OsStr, dir_real: Option<&Path>) -> String {
    let (Some(dir_real), Some(name_str)) = (dir_real, name.to_str()) else {
        return String::new();
    };
    let Ok(rel) = RelPath::parse(name_str) else {
        return String::new();
    };
    let Ok(fd) = fsops::open_beneath(dir, &rel, libc::O_PATH, 0) else {
        return String::new();
    };
    fsops::fd_path(fd.as_fd())
        .ok()
        .and_then(|p| {
            p.strip_prefix(dir_real)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        .unwrap_or_default()
}
