//! Reading from a vfs volume: ranged file streams and recursive walks, both flat in memory.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::volume::fsops::{self, DType};
use crate::volume::{ByteStream, EntryKind, EntryStat, ReadHandle, RelPath, WalkEntry};

/// Read size per blocking call; reads are kept in flight so disk and network overlap.
const CHUNK: u64 = 1 << 20;
const READ_AHEAD: usize = 2;

/// `pread` of exactly `len` bytes at `off` into a fresh buffer, without zero-filling it first
/// (for downloads that would be one more pass over every byte served).
fn pread_exact(file: &File, off: u64, len: usize) -> std::io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let (filled, want) = (buf.len(), len - buf.len());
        let spare = buf.spare_capacity_mut();
        // The kernel writes into the spare capacity through a raw pointer; only the bytes it
        // reports as read are then counted as initialized.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                (off + filled as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // The file shrank under us: end the stream rather than invent bytes.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file was truncated while being read",
            ));
        }
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(buf.freeze())
}

pub fn entry_stat(st: &libc::stat) -> EntryStat {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Directory,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    };
    let ts = |secs: i64, nsecs: i64| {
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    EntryStat {
        kind,
        mode: st.st_mode,
        size: st.st_size as u64,
        created: ts(st.st_ctime, st.st_ctime_nsec),
        modified: ts(st.st_mtime, st.st_mtime_nsec),
        mtime_nanos: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
    }
}

pub struct VfsReadHandle {
    file: Arc<File>,
    stat: EntryStat,
}

impl VfsReadHandle {
    pub fn new(fd: OwnedFd, stat: EntryStat) -> Self {
        VfsReadHandle {
            file: Arc::new(File::from(fd)),
            stat,
        }
    }
}

impl ReadHandle for VfsReadHandle {
    fn stat(&self) -> &EntryStat {
        &self.stat
    }

    fn read_range(&self, start: u64, end: u64) -> ByteStream {
        let file = self.file.clone();
        let offsets = (start..end).step_by(CHUNK as usize);
        futures::stream::iter(offsets)
            .map(move |off| {
                let file = file.clone();
                let len = CHUNK.min(end - off) as usize;
                async move {
                    tokio::task::spawn_blocking(move || pread_exact(&file, off, len))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                }
            })
            .buffered(READ_AHEAD)
            .boxed()
    }
}

/// Walks `dir` (already resolved beneath the vfolder) depth first on a blocking thread, sending
/// entries through a small channel so a huge tree never sits in memory at once. Symlinks are
/// reported only when they resolve inside the vfolder; the others are left out.
pub fn walk_stream(
    vf_fd: Arc<OwnedFd>,
    base: RelPath,
) -> BoxStream<'static, std::io::Result<WalkEntry>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<WalkEntry>>(64);
    tokio::task::spawn_blocking(move || {
        let mut stack: Vec<RelPath> = vec![base.clone()];
        while let Some(dir) = stack.pop() {
            let fd = match fsops::open_dir_beneath(vf_fd.as_fd(), &dir) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            let entries = match fsops::DirEntries::new(fd.as_fd()) {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            let mut names: Vec<(String, DType)> = Vec::new();
            for ent in entries {
                match ent {
                    // Names that are not UTF-8 cannot be carried in a RelPath; skip them.
                    Ok((name, dt)) => {
                        if let Some(n) = name.to_str() {
                            names.push((n.to_string(), dt));
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            names.sort_by(|a, b| a.0.cmp(&b.0));
            let mut subdirs = Vec::new();
            for (name, _) in names {
                let Ok(st) = fsops::lstat_at(fd.as_fd(), OsStr::new(&name)) else {
                    continue;
                };
                let abs = dir.join_name(&name);
                let rel = relative_to(&abs, &base);
                let stat = entry_stat(&st);
                let link_target = if stat.kind == EntryKind::Symlink {
                    if fsops::open_beneath(vf_fd.as_fd(), &abs, libc::O_PATH, 0).is_err() {
                        continue;
                    }
                    fsops::readlink_at(fd.as_fd(), OsStr::new(&name)).ok()
                } else {
                    None
                };
                if stat.kind == EntryKind::Directory {
                    subdirs.push(abs);
                }
                let entry = WalkEntry {
                    rel,
                    stat,
                    link_target,
                };
                if tx.blocking_send(Ok(entry)).is_err() {
                    return; // the reader went away (client disconnected)
                }
            }
            // Reverse so the stack pops them in name order.
            stack.extend(subdirs.into_iter().rev());
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

fn relative_to(path: &RelPath, base: &RelPath) -> RelPath {
    if base.is_root() {
        return path.clone();
    }
    let rest = path.as_str()[base.as_str().len()..].trim_start_matches('/');
    RelPath::parse(rest).unwrap_or_default()
}
