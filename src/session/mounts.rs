//! Session bind mounts that no user can redirect.
//!
//! A vfolder (or a subpath of it) is checked and opened as a directory fd when the session is
//! validated. Docker is never given that directory's path, which a user with another session
//! could swap for a symlink to `/` before Docker resolves it. Instead the daemon bind-mounts the
//! fd itself (through `/proc/self/fd/N`, which names the inode, not a path) onto a root-owned
//! mount point under the state directory, `<agent>/mounts/<session>/<i>`, adds `nosuid` and
//! `nodev` (and `ro` for read-only mounts), and gives Docker that mount point. Once the
//! container runs, the daemon checks that what the container sees at each target is the very
//! inode it opened, then detaches its own staging mounts: the container keeps its copies.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Where the staging mount point of a session's `i`-th mount is.
pub fn staged_path(session_dir: &Path, i: usize) -> PathBuf {
    session_dir.join(i.to_string())
}

/// A session's staging mounts, detached by `release`.
pub struct Staged {
    dir: PathBuf,
    count: usize,
}

/// Bind-mounts each `(fd, read_only)` onto `staged_path(dir, i)`.
pub fn stage(dir: &Path, sources: &[(&OwnedFd, bool)]) -> io::Result<Staged> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut staged = Staged {
        dir: dir.to_path_buf(),
        count: 0,
    };
    for (i, (fd, read_only)) in sources.iter().enumerate() {
        let target = staged_path(dir, i);
        match std::fs::DirBuilder::new().mode(0o700).create(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        staged.count = i + 1;
        if let Err(e) = bind(fd, &target, *read_only) {
            staged.release();
            return Err(e);
        }
    }
    Ok(staged)
}

fn bind(fd: &OwnedFd, target: &Path, read_only: bool) -> io::Result<()> {
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    // Per-mount flags can only be set by a remount of the bind.
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    Ok(())
}

impl Staged {
    /// Detaches the staging mounts and removes their mount points. A running container keeps
    /// its own mounts.
    pub fn release(&self) {
        for i in 0..self.count {
            let target = staged_path(&self.dir, i);
            let _ = nix::mount::umount2(&target, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&target);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Checks, from the host, that the container `pid` sees at each `target` the inode of its fd.
pub fn verify(pid: i64, targets: &[(String, &OwnedFd)]) -> Result<(), String> {
    if pid <= 0 {
        return Err("the container has no process".into());
    }
    for (target, fd) in targets {
        let want = crate::volume::fsops::fstat(fd.as_fd()).map_err(|e| e.to_string())?;
        let seen = format!("/proc/{pid}/root{target}");
        let st = nix::sys::stat::lstat(seen.as_str())
            .map_err(|e| format!("cannot inspect {target} in the container: {e}"))?;
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino) {
            return Err(format!(
                "{target} in the container is not the checked directory"
            ));
        }
    }
    Ok(())
}

/// Detaches and removes staging mounts left by a process that died mid-start.
pub fn clean_leftovers(base: &Path) {
    let Ok(sessions) = std::fs::read_dir(base) else {
        return;
    };
    for s in sessions.flatten() {
        let dir = s.path();
        if let Ok(mounts) = std::fs::read_dir(&dir) {
            for m in mounts.flatten() {
                let p = m.path();
                let _ = nix::mount::umount2(&p, MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(&p);
            }
        }
        if std::fs::remove_dir(&dir).is_ok() {
            tracing::info!(dir = %dir.display(), "removed a leftover session staging mount");
        }
    }
}
