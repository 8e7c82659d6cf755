//! Race-free filesystem primitives on directory file descriptors.
//!
//! Users can create symlinks inside their vfolders (over SFTP, for example) pointing anywhere on
//! the host. Every path from a request is therefore opened relative to the vfolder root's fd with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel refuses (EXDEV) any resolution
//! that leaves the root, including through a symlink swapped in between our checks. Mutations work
//! on a parent fd plus a final name (`mkdirat`, `renameat`, `unlinkat`), so a symlink as the final
//! component is acted on itself, never followed.
//!
//! On kernels without openat2 (before 5.6) a component walk with `O_NOFOLLOW` is used instead;
//! it is stricter: it refuses every symlink on the way.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::path::RelPath;

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

fn cstr(name: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(name.as_ref().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => {}
            other => return other,
        }
    }
}

/// True when the kernel refused a resolution because it left the base directory.
pub fn is_escape(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EXDEV)
}

/// Opens an absolute host path (a volume root) as a directory fd.
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = retry(|| {
        cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat_raw(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let fd = retry(|| {
        cvt(unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat2_raw(dir: RawFd, path: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    retry(|| openat2_once(dir, path, flags, mode, resolve))
}

fn openat2_once(
    dir: RawFd,
    path: &CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    // open_how is non_exhaustive in libc; zeroed is its documented initial state.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = resolve;
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    }
}

const RESOLVE_FROM_MEMORY: u64 = libc::RESOLVE_BENEATH
    | libc::RESOLVE_NO_MAGICLINKS
    | libc::RESOLVE_NO_XDEV
    | libc::RESOLVE_CACHED;

/// Opens `rel` beneath `base` as `open_beneath` does, but only if the kernel can do it from
/// memory: every component already in its dentry cache (`RESOLVE_CACHED`) and no mount point
/// crossed (`RESOLVE_NO_XDEV`, so the open stays on the filesystem the caller checked). Then it
/// never waits for a disk and may run on the event loop. `None` means the kernel could not
/// promise that (not cached, a mount on the way) or the open failed: the caller opens the
/// ordinary way, which also gives any error its proper meaning. Only for filesystems that pass
/// `opens_from_memory`, which also checks the kernel knows `RESOLVE_CACHED` (5.12). An absolute
/// or empty path fails here (EXDEV, ENOENT) and gets its answer from the ordinary open.
pub fn open_beneath_cached(base: BorrowedFd, rel: &Path, flags: i32) -> Option<OwnedFd> {
    // No retry: EAGAIN here means "not in the cache", and the caller goes the blocking way.
    openat2_once(
        base.as_raw_fd(),
        &cstr(rel).ok()?,
        flags,
        0,
        RESOLVE_FROM_MEMORY,
    )
    .ok()
}

/// As `open_regular_beneath`, from memory only (see `open_beneath_cached`). The reopen through
/// `/proc/self/fd` looks up procfs, which lives in memory, and opens an inode the kernel already
/// holds; on a local disk filesystem neither waits for a disk. (Two rare exceptions wait: a
/// host whose antivirus answers fanotify permission events, and the first open of an
/// fs-verity file, which reads its descriptor.)
pub fn open_regular_cached(base: BorrowedFd, rel: &Path) -> Option<(OwnedFd, libc::stat)> {
    let p = open_beneath_cached(base, rel, libc::O_PATH)?;
    reopen_regular(&p, None).ok()
}

/// Whether opens beneath `fd` may be tried from memory (`open_beneath_cached`): its filesystem
/// keeps what an open needs in the kernel's memory once looked up (ext2/3/4, XFS, btrfs, tmpfs;
/// not FUSE or CephFS, whose opens ask a daemon or an MDS), and the kernel knows
/// `RESOLVE_CACHED`. Asked once per volume, so no request's error can switch it off.
pub fn opens_from_memory(fd: BorrowedFd) -> bool {
    let probe = openat2_once(
        fd.as_raw_fd(),
        c".",
        libc::O_PATH | libc::O_DIRECTORY,
        0,
        RESOLVE_FROM_MEMORY,
    );
    probe.is_ok() && on_local_disk(fd)
}

fn on_local_disk(fd: BorrowedFd) -> bool {
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut sfs) } != 0 {
        return false;
    }
    // f_type and the magic numbers have target-dependent integer types.
    #[allow(clippy::unnecessary_cast)]
    let known = [
        libc::EXT4_SUPER_MAGIC as i64,
        libc::XFS_SUPER_MAGIC as i64,
        libc::BTRFS_SUPER_MAGIC as i64,
        libc::TMPFS_MAGIC as i64,
    ];
    #[allow(clippy::unnecessary_cast)]
    known.contains(&(sfs.f_type as i64))
}

/// Opens `rel` beneath `base`. Symlinks are followed only while they stay beneath `base`.
pub fn open_beneath(base: BorrowedFd, rel: &RelPath, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    open_beneath_path(base, Path::new(rel.as_str()), flags, mode)
}

/// As `open_beneath`, for relative paths found on disk (which need not be UTF-8).
pub fn open_beneath_path(
    base: BorrowedFd,
    rel: &Path,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    if rel.is_absolute() {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match openat2_raw(base.as_raw_fd(), &cstr(rel)?, flags, mode) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                tracing::warn!("openat2 unavailable; refusing all symlinks in request paths");
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    walk_nofollow(base, rel, flags, mode)
}

fn walk_nofollow(base: BorrowedFd, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    use std::path::Component;
    let mut comps: Vec<&OsStr> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => comps.push(n),
            Component::CurDir => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
        }
    }
    let Some((name, parents)) = comps.split_last() else {
        return openat_raw(base.as_raw_fd(), c".", flags, mode);
    };
    let mut cur: Option<OwnedFd> = None;
    for comp in parents {
        let dir = cur.as_ref().map_or(base.as_raw_fd(), |f| f.as_raw_fd());
        let next = openat_raw(
            dir,
            &cstr(comp)?,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::from_raw_os_error(libc::EXDEV)
            } else {
                e
            }
        })?;
        cur = Some(next);
    }
    let dir = cur.as_ref().map_or(base.as_raw_fd(), |f| f.as_raw_fd());
    openat_raw(dir, &cstr(name)?, flags | libc::O_NOFOLLOW, mode)
}

/// Opens the directory entry `name` of `dir` without following a symlink (ELOOP/ENOTDIR if it
/// is not a real directory).
pub fn open_subdir_nofollow(dir: BorrowedFd, name: impl AsRef<OsStr>) -> io::Result<OwnedFd> {
    openat_raw(
        dir.as_raw_fd(),
        &cstr(name)?,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Creates the new file `name` in `dir` (O_EXCL, never through a symlink) and opens it for
/// writing. A single name in a directory fd needs no openat2: plain openat is O(1) at any depth,
/// where RESOLVE_BENEATH costs time in proportion to the directory's depth.
pub fn create_at(dir: BorrowedFd, name: impl AsRef<OsStr>, mode: u32) -> io::Result<OwnedFd> {
    openat_raw(
        dir.as_raw_fd(),
        &cstr(name)?,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        mode,
    )
}

/// Opens a directory beneath `base` for use as a parent fd.
pub fn open_dir_beneath(base: BorrowedFd, rel: &RelPath) -> io::Result<OwnedFd> {
    open_beneath(base, rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Opens the parent of `rel` beneath `base` and returns it with the final name.
/// The root itself has no parent: EINVAL.
pub fn open_parent(base: BorrowedFd, rel: &RelPath) -> io::Result<(OwnedFd, String)> {
    let (parent, name) = rel
        .split_last()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((open_dir_beneath(base, &parent)?, name.to_string()))
}

/// Whether two stats describe the same inode.
pub fn same_inode(a: &libc::stat, b: &libc::stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

/// The error for "this is not a regular file": EISDIR for directories, EINVAL for the rest
/// (FIFOs, sockets, devices), which are never opened for I/O.
fn not_regular(st: &libc::stat) -> io::Error {
    io::Error::from_raw_os_error(if is_dir(st) {
        libc::EISDIR
    } else {
        libc::EINVAL
    })
}

/// Turns an `O_PATH` fd into a readable one, but only if it is a regular file (and, when
/// `expect` is given, the very inode that was checked before). An `O_PATH` open never blocks and
/// has no side effect, so a FIFO or a device node swapped in by a user is refused before anything
/// could wait on it or talk to a driver.
pub fn reopen_regular(
    path_fd: &OwnedFd,
    expect: Option<&libc::stat>,
) -> io::Result<(OwnedFd, libc::stat)> {
    let st = fstat(path_fd.as_fd())?;
    if !is_file(&st) {
        return Err(not_regular(&st));
    }
    if let Some(e) = expect
        && !same_inode(&st, e)
    {
        // Replaced between the caller's check and the open.
        return Err(io::Error::from_raw_os_error(libc::ESTALE));
    }
    let proc_path = CString::new(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = retry(|| {
        cvt(unsafe {
            libc::open(
                proc_path.as_ptr(),
                libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        })
    })?;
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, st))
}

/// Opens `rel` beneath `base` for reading, refusing anything but a regular file.
pub fn open_regular_beneath(base: BorrowedFd, rel: &RelPath) -> io::Result<(OwnedFd, libc::stat)> {
    let p = open_beneath(base, rel, libc::O_PATH, 0)?;
    reopen_regular(&p, None)
}

/// Opens the regular file `name` of `dir` for reading without following a symlink, and only if
/// it is still the inode `expect` (an lstat the caller made).
pub fn open_regular_at(
    dir: BorrowedFd,
    name: impl AsRef<OsStr>,
    expect: &libc::stat,
) -> io::Result<(OwnedFd, libc::stat)> {
    let p = openat_raw(
        dir.as_raw_fd(),
        &cstr(name)?,
        libc::O_PATH | libc::O_NOFOLLOW,
        0,
    )?;
    reopen_regular(&p, Some(expect))
}

pub fn fstat(fd: BorrowedFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `lstat` of `name` inside `dir` (does not follow a final symlink).
pub fn lstat_at(dir: BorrowedFd, name: impl AsRef<OsStr>) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn mkdir_at(dir: BorrowedFd, name: impl AsRef<OsStr>, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

pub use crate::config::Owner;

pub fn chown_at(dir: BorrowedFd, name: impl AsRef<OsStr>, owner: Option<Owner>) -> io::Result<()> {
    let Some(o) = owner else { return Ok(()) };
    let c = cstr(name)?;
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            o.uid,
            o.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

pub fn fchown(fd: BorrowedFd, owner: Option<Owner>) -> io::Result<()> {
    let Some(o) = owner else { return Ok(()) };
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), o.uid, o.gid) })?;
    Ok(())
}

/// `mkdir -p` beneath `base`; returns the final directory's fd. Existing directories are fine;
/// an existing non-directory is ENOTDIR. Directories it creates get `owner`.
pub fn mkdir_all_beneath(
    base: BorrowedFd,
    rel: &RelPath,
    mode: u32,
    owner: Option<Owner>,
) -> io::Result<OwnedFd> {
    let mut cur = RelPath::root();
    let mut fd = open_dir_beneath(base, &cur)?;
    for comp in rel.components() {
        cur = cur.join_name(comp);
        match mkdir_at(fd.as_fd(), comp, mode) {
            Ok(()) => chown_at(fd.as_fd(), comp, owner)?,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        // Re-open through openat2 from the base so a symlinked component is still checked.
        fd = open_dir_beneath(base, &cur)?;
    }
    Ok(fd)
}

/// The absolute path an fd refers to now (symlinks resolved), from /proc/self/fd.
pub fn fd_path(fd: BorrowedFd) -> io::Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

pub fn fchmod(fd: BorrowedFd, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    Ok(())
}

pub fn rename_at(
    src_dir: BorrowedFd,
    src: impl AsRef<OsStr>,
    dst_dir: BorrowedFd,
    dst: impl AsRef<OsStr>,
    noreplace: bool,
) -> io::Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
    let renamed = cvt(unsafe {
        libc::renameat2(
            src_dir.as_raw_fd(),
            s.as_ptr(),
            dst_dir.as_raw_fd(),
            d.as_ptr(),
            flags,
        )
    });
    match renamed {
        // FUSE filesystems (ceph-fuse among them) refuse rename flags with EINVAL.
        Err(e) if noreplace && e.raw_os_error() == Some(libc::EINVAL) => {
            rename_noreplace_without_flags(src_dir, &s, dst_dir, &d)
        }
        r => r.map(|_| ()),
    }
}

/// RENAME_NOREPLACE where the filesystem has no rename flags: a file is hard-linked to its new
/// name (which fails with EEXIST if taken, atomically) and then unlinked from the old one; a
/// directory (no hard links) is renamed after checking the name is free, which leaves a short
/// window in which a name made meanwhile would be replaced.
fn rename_noreplace_without_flags(
    src_dir: BorrowedFd,
    s: &CString,
    dst_dir: BorrowedFd,
    d: &CString,
) -> io::Result<()> {
    let st = fstatat_c(src_dir, s)?;
    if (st.st_mode & libc::S_IFMT) != libc::S_IFDIR {
        cvt(unsafe {
            libc::linkat(
                src_dir.as_raw_fd(),
                s.as_ptr(),
                dst_dir.as_raw_fd(),
                d.as_ptr(),
                0,
            )
        })?;
        cvt(unsafe { libc::unlinkat(src_dir.as_raw_fd(), s.as_ptr(), 0) })?;
        return Ok(());
    }
    match fstatat_c(dst_dir, d) {
        Ok(_) => return Err(io::Error::from_raw_os_error(libc::EEXIST)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    cvt(unsafe {
        libc::renameat(
            src_dir.as_raw_fd(),
            s.as_ptr(),
            dst_dir.as_raw_fd(),
            d.as_ptr(),
        )
    })?;
    Ok(())
}

fn fstatat_c(dir: BorrowedFd, name: &CString) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

pub fn unlink_at(dir: BorrowedFd, name: impl AsRef<OsStr>, is_dir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })?;
    Ok(())
}

pub fn readlink_at(dir: BorrowedFd, name: impl AsRef<OsStr>) -> io::Result<std::path::PathBuf> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(std::path::PathBuf::from(OsStr::from_bytes(&buf)))
}

pub fn symlink_at(target: &Path, dir: BorrowedFd, name: impl AsRef<OsStr>) -> io::Result<()> {
    let t = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let c = cstr(name)?;
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })?;
    Ok(())
}

pub fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}
pub fn is_file(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}
pub fn is_symlink(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Dir,
    File,
    Symlink,
    Other,
    Unknown,
}

/// The entries of an open directory (without "." and ".."), read through a dup of its fd.
pub struct DirEntries {
    dir: *mut libc::DIR,
}

// The DIR stream is owned exclusively by this value.
unsafe impl Send for DirEntries {}

impl DirEntries {
    pub fn new(fd: BorrowedFd) -> io::Result<Self> {
        let dup = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
        // The dup shares the file offset with `fd`; rewind so a reused fd lists from the start.
        unsafe { libc::lseek(dup, 0, libc::SEEK_SET) };
        let dir = unsafe { libc::fdopendir(dup) };
        if dir.is_null() {
            let e = io::Error::last_os_error();
            unsafe { libc::close(dup) };
            return Err(e);
        }
        Ok(DirEntries { dir })
    }
}

impl Iterator for DirEntries {
    type Item = io::Result<(OsString, DType)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            unsafe { *libc::__errno_location() = 0 };
            let ent = unsafe { libc::readdir64(self.dir) };
            if ent.is_null() {
                let errno = unsafe { *libc::__errno_location() };
                return (errno != 0).then(|| Err(io::Error::from_raw_os_error(errno)));
            }
            let ent = unsafe { &*ent };
            let name = unsafe { CStr::from_ptr(ent.d_name.as_ptr()) };
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let dtype = match ent.d_type {
                libc::DT_DIR => DType::Dir,
                libc::DT_REG => DType::File,
                libc::DT_LNK => DType::Symlink,
                libc::DT_UNKNOWN => DType::Unknown,
                _ => DType::Other,
            };
            return Some(Ok((OsStr::from_bytes(bytes).to_os_string(), dtype)));
        }
    }
}

impl Drop for DirEntries {
    fn drop(&mut self) {
        unsafe { libc::closedir(self.dir) };
    }
}

/// Makes a directory's entries (a rename into it) durable.
pub fn fsync_dir(fd: BorrowedFd) -> io::Result<()> {
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rp(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    /// A directory outside holding `secret`, and a base holding `d/f` ("ok") and the symlink
    /// `inside` -> `d/f`.
    fn outside_and_base() -> (tempfile::TempDir, tempfile::TempDir) {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir(base.path().join("d")).unwrap();
        std::fs::write(base.path().join("d/f"), b"ok").unwrap();
        symlink("d/f", base.path().join("inside")).unwrap();
        (outside, base)
    }

    #[test]
    fn an_open_from_memory_gives_a_regular_file_beneath_the_base_or_nothing() {
        let (outside, base) = outside_and_base();
        symlink(outside.path().join("secret"), base.path().join("out")).unwrap();
        let fifo = CString::new(base.path().join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let fd = open_dir_path(base.path()).unwrap();
        assert!(
            opens_from_memory(fd.as_fd()),
            "needs a temporary directory on ext4, XFS, btrfs or tmpfs and Linux 5.12 or later"
        );
        // What the ordinary open just looked up is in the dentry cache.
        for p in ["d/f", "inside", "out", "fifo", "d"] {
            let _ = open_beneath(fd.as_fd(), &rp(p), libc::O_PATH, 0);
        }
        for ok in ["d/f", "inside"] {
            let (f, st) = open_regular_cached(fd.as_fd(), Path::new(ok)).expect(ok);
            assert!(is_file(&st));
            let mut buf = [0u8; 4];
            let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), 4) };
            assert_eq!(&buf[..n as usize], b"ok");
        }
        for refused in ["out", "fifo", "d", "../x", "missing", "/etc/passwd", ""] {
            assert!(
                open_regular_cached(fd.as_fd(), Path::new(refused)).is_none(),
                "{refused}"
            );
        }
    }

    #[test]
    fn symlinks_leaving_the_base_are_refused() {
        let (outside, base) = outside_and_base();
        symlink(outside.path(), base.path().join("out")).unwrap();
        symlink("/etc/passwd", base.path().join("abs")).unwrap();
        let fd = open_dir_path(base.path()).unwrap();

        let ok = open_beneath(fd.as_fd(), &rp("inside"), libc::O_RDONLY, 0);
        assert!(ok.is_ok());
        for bad in ["out/secret", "abs", "out"] {
            let e = open_beneath(fd.as_fd(), &rp(bad), libc::O_RDONLY, 0).unwrap_err();
            assert!(is_escape(&e), "{bad}: {e}");
        }
        // mkdir -p through a symlink that leaves the base must fail, not create outside.
        let e = mkdir_all_beneath(fd.as_fd(), &rp("out/newdir"), 0o755, None).unwrap_err();
        assert!(is_escape(&e), "{e}");
        assert!(!outside.path().join("newdir").exists());
    }
}
