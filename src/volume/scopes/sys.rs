//! The kernel interfaces quota scopes use, in one place: filesystem magic numbers, XFS project
//! ids (`FS_IOC_FS{GET,SET}XATTR`) and project quota (`quotactl` `Q_X*`), btrfs subvolumes and
//! qgroups (`BTRFS_IOC_*`), the qgroup counters in sysfs, and CephFS's quota and recursive
//! statistics xattrs. The structs are the kernel's uapi
//! layouts (`linux/fs.h`, `linux/dqblk_xfs.h`, `linux/btrfs.h`); no command-line tool is run, so
//! nothing here can hang on a child process or misreport its exit code (`xfs_quota` exits 0 on
//! failure).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
pub const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The `f_type` of the filesystem an fd is on.
pub fn fs_magic(fd: BorrowedFd) -> io::Result<i64> {
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st.f_type as i64)
}

// ---- ioctl request numbers (asm-generic/ioctl.h) ---------------------------------------------

const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}
const fn iow<T>(ty: u8, nr: u8) -> libc::c_ulong {
    ioc(1, ty, nr, std::mem::size_of::<T>())
}
const fn ior<T>(ty: u8, nr: u8) -> libc::c_ulong {
    ioc(2, ty, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(ty: u8, nr: u8) -> libc::c_ulong {
    ioc(3, ty, nr, std::mem::size_of::<T>())
}

fn ioctl<T>(fd: BorrowedFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) })?;
    Ok(())
}

// ---- XFS project ids ---------------------------------------------------------------------------

#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_FSGETXATTR: libc::c_ulong = ior::<FsXattr>(b'X', 31);
const FS_IOC_FSSETXATTR: libc::c_ulong = iow::<FsXattr>(b'X', 32);
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

/// Gives a directory a project id that everything made inside it inherits.
pub fn set_project(dir: BorrowedFd, id: u32) -> io::Result<()> {
    let mut x = FsXattr::default();
    ioctl(dir, FS_IOC_FSGETXATTR, &mut x)?;
    x.projid = id;
    x.xflags |= FS_XFLAG_PROJINHERIT;
    ioctl(dir, FS_IOC_FSSETXATTR, &mut x)
}

pub fn project_of(fd: BorrowedFd) -> io::Result<u32> {
    let mut x = FsXattr::default();
    ioctl(fd, FS_IOC_FSGETXATTR, &mut x)?;
    Ok(x.projid)
}

// ---- XFS project quota (quotactl) --------------------------------------------------------------

#[repr(C)]
#[derive(Default)]
struct FsDiskQuota {
    d_version: i8,
    d_flags: i8,
    d_fieldmask: u16,
    d_id: u32,
    d_blk_hardlimit: u64,
    d_blk_softlimit: u64,
    d_ino_hardlimit: u64,
    d_ino_softlimit: u64,
    d_bcount: u64,
    d_icount: u64,
    d_itimer: i32,
    d_btimer: i32,
    d_iwarns: u16,
    d_bwarns: u16,
    d_itimer_hi: i8,
    d_btimer_hi: i8,
    d_rtbtimer_hi: i8,
    d_padding2: i8,
    d_rtb_hardlimit: u64,
    d_rtb_softlimit: u64,
    d_rtbcount: u64,
    d_rtbtimer: i32,
    d_rtbwarns: u16,
    d_padding3: i16,
    d_padding4: [u8; 8],
}

#[repr(C)]
struct FsQuotaStat {
    qs_version: i8,
    qs_flags: u16,
    qs_pad: i8,
    // fs_qfilestat_t uquota, gquota (u64 ino, u64 nblks, u32 nextents, padded) and the rest:
    // only qs_flags is read, so the tail is reserved space the kernel may fill.
    rest: [u8; 128],
}

const Q_XGETQUOTA: i32 = 0x5803;
const Q_XSETQLIM: i32 = 0x5804;
const Q_XGETQSTAT: i32 = 0x5805;
const PRJQUOTA: i32 = 2;
const FS_DQUOT_VERSION: i8 = 1;
const FS_PROJ_QUOTA: i8 = 2;
const FS_DQ_ISOFT: u16 = 1 << 0;
const FS_DQ_IHARD: u16 = 1 << 1;
const FS_DQ_BSOFT: u16 = 1 << 2;
const FS_DQ_BHARD: u16 = 1 << 3;
const FS_QUOTA_PDQ_ACCT: u16 = 1 << 4;
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
/// quotactl counts blocks of 512 bytes.
const BB: u64 = 512;

fn qcmd(cmd: i32) -> i32 {
    (cmd << 8) | (PRJQUOTA & 0xff)
}

fn quotactl<T>(cmd: i32, dev: &Path, id: u32, arg: &mut T) -> io::Result<()> {
    let dev = CString::new(dev.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    cvt(unsafe {
        libc::quotactl(
            qcmd(cmd),
            dev.as_ptr(),
            id as libc::c_int,
            (arg as *mut T).cast(),
        )
    })?;
    Ok(())
}

/// Whether project quota accounting and enforcement are on for the filesystem on `dev`.
pub fn xfs_project_quota_state(dev: &Path) -> io::Result<(bool, bool)> {
    let mut st = FsQuotaStat {
        qs_version: 1,
        qs_flags: 0,
        qs_pad: 0,
        rest: [0; 128],
    };
    quotactl(Q_XGETQSTAT, dev, 0, &mut st)?;
    Ok((
        st.qs_flags & FS_QUOTA_PDQ_ACCT != 0,
        st.qs_flags & FS_QUOTA_PDQ_ENFD != 0,
    ))
}

/// What the kernel counts for one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProjectQuota {
    pub bytes_used: u64,
    /// 0: no limit.
    pub bytes_limit: u64,
    pub inodes_used: u64,
    pub inodes_limit: u64,
}

pub fn xfs_get_project(dev: &Path, id: u32) -> io::Result<ProjectQuota> {
    let mut q = FsDiskQuota::default();
    match quotactl(Q_XGETQUOTA, dev, id, &mut q) {
        Ok(()) => Ok(ProjectQuota {
            bytes_used: q.d_bcount * BB,
            bytes_limit: q.d_blk_hardlimit * BB,
            inodes_used: q.d_icount,
            inodes_limit: q.d_ino_hardlimit,
        }),
        // No dquot yet: nothing used, no limit.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(ProjectQuota::default()),
        Err(e) => Err(e),
    }
}

/// Sets the hard (and soft) limits of a project; 0 removes a limit.
pub fn xfs_set_project_limits(dev: &Path, id: u32, bytes: u64, inodes: u64) -> io::Result<()> {
    let blocks = bytes.div_ceil(BB);
    let mut q = FsDiskQuota {
        d_version: FS_DQUOT_VERSION,
        d_flags: FS_PROJ_QUOTA,
        d_fieldmask: FS_DQ_BHARD | FS_DQ_BSOFT | FS_DQ_IHARD | FS_DQ_ISOFT,
        d_id: id,
        d_blk_hardlimit: blocks,
        d_blk_softlimit: blocks,
        d_ino_hardlimit: inodes,
        d_ino_softlimit: inodes,
        ..Default::default()
    };
    quotactl(Q_XSETQLIM, dev, id, &mut q)
}

/// The block device a directory's filesystem is mounted from (quotactl addresses filesystems
/// by device): the mountinfo entry whose device number is the directory's.
pub fn device_of(path: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let mut fields = line.split(' ');
        if fields.nth(2) != Some(want.as_str()) {
            continue;
        }
        // After the optional fields, " - " then fstype, source, super options.
        if let Some((_, tail)) = line.split_once(" - ") {
            let mut t = tail.split(' ');
            let (_fstype, source) = (t.next(), t.next());
            if let Some(src) = source.filter(|s| s.starts_with('/')) {
                return Ok(PathBuf::from(src));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no block device found for {}", path.display()),
    ))
}

// ---- btrfs subvolumes and qgroups --------------------------------------------------------------

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1 << 0;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

#[repr(C)]
#[derive(Default)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

#[repr(C)]
#[derive(Default)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

#[repr(C)]
#[derive(Default)]
struct QgroupCreateArgs {
    create: u64,
    qgroupid: u64,
}

#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}

const BTRFS_IOC_SUBVOL_CREATE: libc::c_ulong = iow::<VolArgs>(BTRFS_IOCTL_MAGIC, 14);
const BTRFS_IOC_SNAP_DESTROY: libc::c_ulong = iow::<VolArgs>(BTRFS_IOCTL_MAGIC, 15);
const BTRFS_IOC_INO_LOOKUP: libc::c_ulong = iowr::<InoLookupArgs>(BTRFS_IOCTL_MAGIC, 18);
const BTRFS_IOC_FS_INFO: libc::c_ulong = ior::<FsInfoArgs>(BTRFS_IOCTL_MAGIC, 31);
const BTRFS_IOC_QGROUP_CREATE: libc::c_ulong = iow::<QgroupCreateArgs>(BTRFS_IOCTL_MAGIC, 42);
const BTRFS_IOC_QGROUP_LIMIT: libc::c_ulong = ior::<QgroupLimitArgs>(BTRFS_IOCTL_MAGIC, 43);

fn vol_args(name: &str) -> io::Result<Box<VolArgs>> {
    if name.len() > BTRFS_PATH_NAME_MAX || name.contains('/') || name.contains('\0') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut a = Box::new(VolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    });
    a.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(a)
}

/// Makes the subvolume `name` in the directory `parent`.
pub fn btrfs_subvol_create(parent: BorrowedFd, name: &str) -> io::Result<()> {
    let mut a = vol_args(name)?;
    ioctl(parent, BTRFS_IOC_SUBVOL_CREATE, &mut *a)
}

/// Deletes the subvolume `name` in `parent` (and everything in it).
pub fn btrfs_subvol_destroy(parent: BorrowedFd, name: &str) -> io::Result<()> {
    let mut a = vol_args(name)?;
    ioctl(parent, BTRFS_IOC_SNAP_DESTROY, &mut *a)
}

/// The id of the subvolume a directory fd is the root of (or in).
pub fn btrfs_subvol_id(fd: BorrowedFd) -> io::Result<u64> {
    let mut a = Box::new(InoLookupArgs {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; 4080],
    });
    ioctl(fd, BTRFS_IOC_INO_LOOKUP, &mut *a)?;
    Ok(a.treeid)
}

/// The level-0 qgroup of a subvolume.
pub fn qgroup_of(subvol: u64) -> u64 {
    subvol
}

/// Limits what a qgroup may reference; None removes the limit.
pub fn btrfs_qgroup_limit(fs: BorrowedFd, qgroup: u64, bytes: Option<u64>) -> io::Result<()> {
    let mut a = QgroupLimitArgs {
        qgroupid: qgroup,
        lim: QgroupLimit {
            flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
            max_rfer: bytes.unwrap_or(u64::MAX),
            ..Default::default()
        },
    };
    ioctl(fs, BTRFS_IOC_QGROUP_LIMIT, &mut a)
}

/// Removes a qgroup (after its subvolume is gone).
pub fn btrfs_qgroup_destroy(fs: BorrowedFd, qgroup: u64) -> io::Result<()> {
    let mut a = QgroupCreateArgs {
        create: 0,
        qgroupid: qgroup,
    };
    ioctl(fs, BTRFS_IOC_QGROUP_CREATE, &mut a)
}

/// The filesystem's UUID (as sysfs names it).
pub fn btrfs_fsid(fs: BorrowedFd) -> io::Result<String> {
    let mut a: Box<FsInfoArgs> = Box::new(unsafe { std::mem::zeroed() });
    ioctl(fs, BTRFS_IOC_FS_INFO, &mut *a)?;
    Ok(uuid::Uuid::from_bytes(a.fsid).hyphenated().to_string())
}

fn sysfs_qgroups(fsid: &str) -> PathBuf {
    Path::new("/sys/fs/btrfs").join(fsid).join("qgroups")
}

/// Whether quotas are enabled (the kernel lists qgroups in sysfs only then).
pub fn btrfs_quota_enabled(fsid: &str) -> bool {
    sysfs_qgroups(fsid).is_dir()
}

/// What a qgroup references now, in-flight reservations included (sysfs `referenced` is only
/// updated when a transaction commits), and its limit (None when unlimited).
pub fn btrfs_qgroup_usage(fsid: &str, qgroup: u64) -> io::Result<(u64, Option<u64>)> {
    let dir = sysfs_qgroups(fsid).join(format!("0_{qgroup}"));
    let read = |name: &str| -> io::Result<u64> {
        std::fs::read_to_string(dir.join(name))?
            .trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("sysfs {name}")))
    };
    let used = read("referenced")? + read("rsv_data").unwrap_or(0);
    let limit = read("max_referenced")?;
    let flags = read("limit_flags").unwrap_or(BTRFS_QGROUP_LIMIT_MAX_RFER);
    let limited = flags & BTRFS_QGROUP_LIMIT_MAX_RFER != 0 && limit != 0 && limit != u64::MAX;
    Ok((used, limited.then_some(limit)))
}

// ---- CephFS virtual xattrs -------------------------------------------------------------------

/// A directory's extended attribute as a decimal number; None when it is not set (ENODATA:
/// CephFS answers so for a quota that is 0 or was never set). Read through the fd's
/// `/proc/self/fd` link, which also works for O_PATH fds.
pub fn xattr_u64(fd: BorrowedFd, name: &str) -> io::Result<Option<u64>> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let cname = CString::new(name)?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated; the buffer and its length match.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    let text = std::str::from_utf8(&buf[..n as usize])
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{name} is not text")))?;
    text.trim_end_matches('\0')
        .trim()
        .parse()
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{name} = {text:?}")))
}

/// Sets a directory's extended attribute to a decimal number.
pub fn set_xattr_u64(fd: BorrowedFd, name: &str, value: u64) -> io::Result<()> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let cname = CString::new(name)?;
    let v = value.to_string();
    // SAFETY: both strings are NUL-terminated; the value pointer and its length match.
    cvt(unsafe { libc::setxattr(path.as_ptr(), cname.as_ptr(), v.as_ptr().cast(), v.len(), 0) })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<FsDiskQuota>(), 112);
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<InoLookupArgs>(), 4096);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
        assert_eq!(std::mem::size_of::<FsInfoArgs>(), 1024);
        // The request numbers the kernel headers give.
        assert_eq!(FS_IOC_FSGETXATTR, 0x801c_581f);
        assert_eq!(FS_IOC_FSSETXATTR, 0x401c_5820);
        assert_eq!(BTRFS_IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(BTRFS_IOC_QGROUP_LIMIT, 0x8030_942b);
    }
}
