//! Tree copy for vfolder clones: directories, regular files (copy_file_range through std, which
//! reflinks on btrfs/xfs where possible), symlinks as symlinks. Modes and mtimes are kept, as
//! `shutil.copytree` does; nothing is ever followed out of the source tree.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use crate::volume::Progress;
use crate::volume::fsops::{self, Owner};

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

/// Copies the contents of directory `src` into the existing empty directory `dst`.
pub fn copy_dir_contents(
    src: BorrowedFd,
    dst: BorrowedFd,
    owner: Option<Owner>,
    progress: &Progress,
) -> io::Result<()> {
    let entries: Vec<_> = fsops::DirEntries::new(src)?.collect::<io::Result<_>>()?;
    for (name, _dtype) in entries {
        let name: &OsStr = &name;
        let st = match fsops::lstat_at(src, name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        if fsops::is_dir(&st) {
            fsops::mkdir_at(dst, name, 0o700)?;
            let s = fsops::open_subdir_nofollow(src, name)?;
            let d = fsops::open_subdir_nofollow(dst, name)?;
            copy_dir_contents(s.as_fd(), d.as_fd(), owner, progress)?;
            fsops::fchmod(d.as_fd(), st.st_mode & 0o7777)?;
            fsops::fchown(d.as_fd(), owner)?;
            set_times(d.as_fd(), &st)?;
        } else if fsops::is_file(&st) {
            copy_file(src, dst, name, &st, owner)?;
        } else if fsops::is_symlink(&st) {
            let target = fsops::readlink_at(src, name)?;
            fsops::symlink_at(&target, dst, name)?;
            fsops::chown_at(dst, name, owner)?;
        }
        // Sockets, fifos and devices are not user data; they are not copied.
        if !progress.advance(1) {
            return Err(io::Error::from_raw_os_error(libc::ECANCELED));
        }
    }
    Ok(())
}

fn copy_file(
    src_dir: BorrowedFd,
    dst_dir: BorrowedFd,
    name: &OsStr,
    st: &libc::stat,
    owner: Option<Owner>,
) -> io::Result<()> {
    let src = fsops::open_beneath_path(
        src_dir,
        std::path::Path::new(name),
        libc::O_RDONLY | libc::O_NOFOLLOW,
        0,
    )?;
    let dst = fsops::open_beneath_path(
        dst_dir,
        std::path::Path::new(name),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o600,
    )?;
    let mut s = File::from(src);
    let mut d = File::from(dst);
    io::copy(&mut s, &mut d)?;
    fsops::fchmod(d.as_fd(), st.st_mode & 0o7777)?;
    fsops::fchown(d.as_fd(), owner)?;
    set_times(d.as_fd(), st)?;
    Ok(())
}
