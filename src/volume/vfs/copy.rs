//! Tree copy for vfolder clones: directories, regular files (copy_file_range through std, which
//! reflinks on btrfs/xfs where possible), symlinks as symlinks. Permissions and mtimes are kept,
//! as `shutil.copytree` does, but never set-user-id, set-group-id or sticky bits: the copies
//! belong to the daemon's configured owner, not to whoever owned the source, and a user's setuid
//! file must not come out of a clone as someone else's setuid program.
//!
//! The walk is iterative (any depth), opens nothing by path, and copies a file only after
//! checking that the opened fd is the regular file the listing saw: a FIFO or device swapped in
//! meanwhile is refused, never read.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::volume::Progress;
use crate::volume::fsops::{self, Owner};
use crate::volume::tree::{FdStack, Visit, WalkOptions, Walker};

/// Permission bits a copy keeps.
const COPY_MODE_MASK: u32 = 0o777;

fn set_times(fd: BorrowedFd, st: &libc::stat) -> io::Result<()> {
    let times = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    if unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Owner, permissions (without set-id bits) and times of a copied file or directory.
fn finish(fd: BorrowedFd, st: &libc::stat, owner: Option<Owner>) -> io::Result<()> {
    // chown first: it clears set-id bits anyway, and chmod then sets exactly what we want.
    fsops::fchown(fd, owner)?;
    fsops::fchmod(fd, st.st_mode & COPY_MODE_MASK)?;
    set_times(fd, st)
}

/// Copies the contents of directory `src` into the existing empty directory `dst`.
pub fn copy_dir_contents(
    src: OwnedFd,
    dst: OwnedFd,
    owner: Option<Owner>,
    progress: &Progress,
) -> io::Result<()> {
    let mut walk = Walker::new(src, WalkOptions::default())?;
    let mut dst = FdStack::new(dst)?;
    while let Some(visit) = walk.next() {
        match visit? {
            Visit::Enter { name, .. } => {
                fsops::mkdir_at(dst.top(), &name, 0o700)?;
                let d = fsops::open_subdir_nofollow(dst.top(), &name)?;
                let dst_st = fsops::fstat(d.as_fd())?;
                dst.push(name, d, dst_st);
                continue; // counted when left, once its contents are copied
            }
            Visit::Leave { st, .. } => {
                let (_, _, d) = dst.pop()?;
                if let Some(d) = d {
                    finish(d.as_fd(), &st, owner)?;
                }
            }
            Visit::Entry { name, st } => {
                if fsops::is_file(&st) {
                    copy_file(walk.parent(), dst.top(), &name, &st, owner)?;
                } else if fsops::is_symlink(&st) {
                    let target = fsops::readlink_at(walk.parent(), &name)?;
                    fsops::symlink_at(&target, dst.top(), &name)?;
                    fsops::chown_at(dst.top(), &name, owner)?;
                }
                // Sockets, FIFOs and devices are not user data; they are not copied.
            }
        }
        if !progress.advance(1) {
            return Err(io::Error::from_raw_os_error(libc::ECANCELED));
        }
    }
    Ok(())
}

fn copy_file(
    src_dir: BorrowedFd,
    dst_dir: BorrowedFd,
    name: &std::ffi::OsStr,
    st: &libc::stat,
    owner: Option<Owner>,
) -> io::Result<()> {
    let (src, _) = match fsops::open_regular_at(src_dir, name, st) {
        Ok(x) => x,
        // Gone or replaced since it was listed: it is not this file any more; leave it out.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ESTALE) | Some(libc::EINVAL) | Some(libc::EISDIR)
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let dst = fsops::create_at(dst_dir, name, 0o600)?;
    let mut s = File::from(src);
    let mut d = File::from(dst);
    io::copy(&mut s, &mut d)?;
    finish(d.as_fd(), st, owner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copies_without_set_id_bits() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("sub")).unwrap();
        let f = src.path().join("sub/tool");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o6755)).unwrap();
        std::fs::set_permissions(
            src.path().join("sub"),
            std::fs::Permissions::from_mode(0o3775),
        )
        .unwrap();
        copy_dir_contents(
            fsops::open_dir_path(src.path()).unwrap(),
            fsops::open_dir_path(dst.path()).unwrap(),
            None,
            &Progress::default(),
        )
        .unwrap();
        let mode = |p: &str| {
            std::fs::symlink_metadata(dst.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("sub/tool"), 0o755);
        assert_eq!(mode("sub"), 0o775);
        assert_eq!(
            std::fs::read(dst.path().join("sub/tool")).unwrap(),
            b"#!/bin/sh\n"
        );
    }

    #[test]
    fn a_fifo_is_never_opened() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(
            &src.path().join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::fs::write(src.path().join("f"), b"data").unwrap();
        // Would block for ever on open(O_RDONLY) of the FIFO if it were opened.
        copy_dir_contents(
            fsops::open_dir_path(src.path()).unwrap(),
            fsops::open_dir_path(dst.path()).unwrap(),
            None,
            &Progress::default(),
        )
        .unwrap();
        assert!(!dst.path().join("pipe").exists());
        assert_eq!(std::fs::read(dst.path().join("f")).unwrap(), b"data");
    }
}
