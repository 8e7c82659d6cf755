//! Reading from a vfs volume: ranged file streams and recursive walks, both flat in memory.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::volume::fsops;
use crate::volume::tree::{Visit, WalkOptions, Walker};
use crate::volume::{ByteStream, EntryKind, EntryStat, ReadHandle, RelPath, WalkEntry};

/// Read size per blocking call; reads are kept in flight so disk and network overlap.
const CHUNK: u64 = 1 << 20;
const READ_AHEAD: usize = 2;

/// The bytes at `off` if the page cache holds all of them, read without waiting for the disk
/// (`RWF_NOWAIT`): a warm read then needs no hand-over to a blocking thread. What the cache
/// held of a partly cached range is returned to be completed by a blocking read.
fn pread_cached(file: &File, off: u64, len: usize) -> BytesMut {
    use std::os::fd::AsRawFd;
    let mut buf = BytesMut::with_capacity(len);
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: len,
    };
    // EAGAIN (not cached), EOPNOTSUPP (a filesystem without it) or any other error: nothing
    // read here; the blocking read decides.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            off as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n > 0 {
        // The kernel wrote `n` bytes into the spare capacity.
        unsafe { buf.set_len(n as usize) };
    }
    buf
}

/// Reads bytes `buf.len()..len` of the range at `off` into `buf` (blocking), without
/// zero-filling the buffer first (for downloads that would be one more pass over every byte).
fn pread_rest(file: &File, off: u64, mut buf: BytesMut, len: usize) -> std::io::Result<Bytes> {
    use std::os::fd::AsRawFd;
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
    // Users can set any time on their files (`touch -d @300000000000`), and tmpfs, btrfs and
    // NFS store it. HTTP dates and Backend.AI's ISO dates stop at year 9999 (the formatters
    // panic past it), so times are clamped to 1970..=9999 here, once, for every consumer.
    let ts = |secs: i64, nsecs: i64| {
        const MAX_SECS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
        let secs = secs.clamp(0, MAX_SECS) as u64;
        SystemTime::UNIX_EPOCH + Duration::new(secs, (nsecs.clamp(0, 999_999_999)) as u32)
    };
    EntryStat {
        kind,
        mode: st.st_mode,
        size: st.st_size as u64,
        created: ts(st.st_ctime, st.st_ctime_nsec),
        modified: ts(st.st_mtime, st.st_mtime_nsec),
        mtime_nanos: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
        etag: None,
    }
}

/// Opens a vfolder's regular file for reading on the calling thread, without a hand-over to a
/// blocking one, when the kernel can do the whole open from memory (`fsops::open_beneath_cached`:
/// the vfolder, then the file beneath it, each path in the dentry cache). `None`: open it the
/// ordinary way. For volumes whose filesystem passes `fsops::opens_from_memory` only.
pub(super) fn open_from_memory(
    root: std::os::fd::BorrowedFd,
    vf: &crate::ids::VFolderId,
    p: &RelPath,
) -> Option<Box<dyn ReadHandle>> {
    let vfd = fsops::open_beneath_cached(root, &vf.rel_path(), libc::O_PATH | libc::O_DIRECTORY)?;
    let (fd, st) = fsops::open_regular_cached(vfd.as_fd(), std::path::Path::new(p.as_str()))?;
    Some(Box::new(VfsReadHandle::new(fd, entry_stat(&st))))
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

    fn local_file(&self) -> Option<Arc<File>> {
        Some(self.file.clone())
    }

    fn read_range(&self, start: u64, end: u64) -> ByteStream {
        let file = self.file.clone();
        let offsets = (start..end).step_by(CHUNK as usize);
        futures::stream::iter(offsets)
            .map(move |off| {
                let file = file.clone();
                let len = CHUNK.min(end - off) as usize;
                async move {
                    let cached = pread_cached(&file, off, len);
                    if cached.len() == len {
                        return Ok(cached.freeze());
                    }
                    tokio::task::spawn_blocking(move || pread_rest(&file, off, cached, len))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                }
            })
            .buffered(READ_AHEAD)
            .boxed()
    }
}

/// Entries one blocking call of a walk produces.
const WALK_BATCH: usize = 256;

/// A walk under way: advanced a batch at a time on short blocking calls, so a client that stops
/// reading an archive parks no thread (the walk simply waits, holding its fds, until asked).
struct ArchiveWalk {
    walker: Walker,
    vf_fd: Arc<OwnedFd>,
    base: RelPath,
}

/// The walked directory's path below `base` for `name` in the walker's current directory, or
/// None for names that are not UTF-8 (they cannot be carried in a RelPath).
fn rel_of(walker: &Walker, name: &OsStr) -> Option<String> {
    let mut rel = String::new();
    for part in walker.dir_names().chain(std::iter::once(name)) {
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(part.to_str()?);
    }
    Some(rel)
}

/// A symlink is kept in an archive only if it cannot lead out of the archive when extracted:
/// a relative target without `\` (a separator on Windows) that, joined to the link's directory
/// and normalized, stays inside the archive root; and that, resolved now, stays inside the
/// vfolder. The target checked is the one read, which is the one stored.
fn archive_link_target(
    walk: &ArchiveWalk,
    dir_rel: &str,
    name: &OsStr,
    rel: &str,
) -> Option<PathBuf> {
    let target = fsops::readlink_at(walk.walker.parent(), name).ok()?;
    let t = target.to_str()?;
    if t.is_empty() || t.starts_with('/') || t.contains('\\') {
        return None;
    }
    let mut depth: Vec<&str> = dir_rel.split('/').filter(|c| !c.is_empty()).collect();
    for c in t.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth.pop()?;
            }
            c => depth.push(c),
        }
    }
    let full = RelPath::parse(rel).ok()?;
    fsops::open_beneath(walk.vf_fd.as_fd(), &walk.base.join(&full), libc::O_PATH, 0).ok()?;
    Some(target)
}

impl ArchiveWalk {
    fn next_batch(&mut self) -> std::io::Result<Vec<WalkEntry>> {
        let mut out = Vec::new();
        while out.len() < WALK_BATCH {
            let Some(visit) = self.walker.next() else {
                break;
            };
            let (name, st, entered) = match visit? {
                Visit::Leave { .. } => continue,
                Visit::Enter { name, st } => (name, st, true),
                Visit::Entry { name, st } => (name, st, false),
            };
            let Some(rel) = rel_of(&self.walker, &name) else {
                if entered {
                    self.walker.skip_entered()?;
                }
                continue;
            };
            if rel.len() + self.base.as_str().len() > crate::volume::path::PATH_MAX {
                return Err(std::io::Error::other(format!(
                    "{rel:.64}...: path longer than {} bytes, cannot be archived",
                    crate::volume::path::PATH_MAX
                )));
            }
            let stat = entry_stat(&st);
            let link_target = if stat.kind == EntryKind::Symlink {
                let dir_rel = rel.rsplit_once('/').map_or("", |(d, _)| d);
                match archive_link_target(self, dir_rel, &name, &rel) {
                    Some(t) => Some(t),
                    None => continue,
                }
            } else {
                None
            };
            let Ok(rel) = RelPath::parse(&rel) else {
                continue;
            };
            out.push(WalkEntry {
                rel,
                stat,
                link_target,
            });
        }
        Ok(out)
    }
}

/// Walks `start` (the directory `base` of the vfolder `vf_fd`, already resolved beneath it)
/// depth first in name order, directories before their contents, as a stream. Memory stays
/// flat in the size of the tree; no thread waits on a slow reader.
pub fn walk_stream(
    vf_fd: Arc<OwnedFd>,
    base: RelPath,
    start: OwnedFd,
) -> BoxStream<'static, std::io::Result<WalkEntry>> {
    let walker = match Walker::new(
        start,
        WalkOptions {
            sorted: true,
            ..WalkOptions::default()
        },
    ) {
        Ok(w) => w,
        Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
    };
    let walk = ArchiveWalk {
        walker,
        vf_fd,
        base,
    };
    futures::stream::unfold(Some(walk), |walk| async move {
        let mut walk = walk?;
        let batch = tokio::task::spawn_blocking(move || {
            let batch = walk.next_batch();
            (walk, batch)
        })
        .await;
        let items: Vec<std::io::Result<WalkEntry>> = match batch {
            Ok((walk, Ok(batch))) if !batch.is_empty() => {
                return Some((batch.into_iter().map(Ok).collect::<Vec<_>>(), Some(walk)));
            }
            Ok((_, Ok(_))) => return None,
            Ok((_, Err(e))) => vec![Err(e)],
            Err(e) => vec![Err(std::io::Error::other(e))],
        };
        Some((items, None))
    })
    .flat_map(futures::stream::iter)
    .boxed()
}
