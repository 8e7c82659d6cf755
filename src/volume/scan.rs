//! Exact tree usage with a small pool of threads walking directory fds.
//!
//! Backend.AI gives up after 30 s and answers -1; `du -s` walks with one thread. Here several
//! threads share a queue of directories (paths relative to the walked root, opened with
//! `RESOLVE_BENEATH`), which keeps more stat calls in flight on cold caches and network mounts.
//! Directory fds are not kept in the queue, so wide trees cannot exhaust the fd limit.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

use super::fsops::{self, DType};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanTotals {
    /// Entries below the root (files, directories, symlinks, others), like Backend.AI's count.
    pub entries: u64,
    /// Sum of `st_size` of those entries (apparent size).
    pub apparent_bytes: u64,
    /// Allocated bytes (`st_blocks * 512`) of the root and everything below, hard links counted
    /// once: what `du -s` reports, in bytes.
    pub disk_bytes: u64,
}

struct Queue {
    dirs: Vec<PathBuf>,
    busy: usize,
    error: Option<io::Error>,
}

/// Walks the directory `root` (an fd) without following symlinks.
pub fn scan_tree(root: BorrowedFd, threads: usize) -> io::Result<ScanTotals> {
    let root_st = fsops::fstat(root)?;
    let queue = Mutex::new(Queue {
        dirs: vec![PathBuf::new()],
        busy: 0,
        error: None,
    });
    let ready = Condvar::new();
    let totals = Mutex::new(ScanTotals {
        disk_bytes: root_st.st_blocks as u64 * 512,
        ..ScanTotals::default()
    });
    let linked = Mutex::new(HashSet::<(u64, u64)>::new());

    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut local = ScanTotals::default();
                let mut local_linked = Vec::new();
                loop {
                    let next = {
                        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            if q.error.is_some() {
                                break None;
                            }
                            if let Some(d) = q.dirs.pop() {
                                q.busy += 1;
                                break Some(d);
                            }
                            if q.busy == 0 {
                                break None;
                            }
                            q = ready.wait(q).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    let Some(dir) = next else {
                        ready.notify_all();
                        break;
                    };
                    let mut found = Vec::new();
                    let res = scan_one(root, &dir, &mut local, &mut local_linked, &mut found);
                    let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                    q.busy -= 1;
                    match res {
                        Ok(()) => q.dirs.extend(found),
                        Err(e) => {
                            q.error.get_or_insert(e);
                        }
                    }
                    drop(q);
                    ready.notify_all();
                }
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                t.entries += local.entries;
                t.apparent_bytes += local.apparent_bytes;
                t.disk_bytes += local.disk_bytes;
                drop(t);
                let mut seen = linked.lock().unwrap_or_else(|p| p.into_inner());
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                for (key, blocks) in local_linked {
                    if seen.insert(key) {
                        t.disk_bytes += blocks;
                    }
                }
            });
        }
    });

    let q = queue.into_inner().unwrap_or_else(|p| p.into_inner());
    match q.error {
        Some(e) => Err(e),
        None => Ok(totals.into_inner().unwrap_or_else(|p| p.into_inner())),
    }
}

fn scan_one(
    root: BorrowedFd,
    dir: &std::path::Path,
    t: &mut ScanTotals,
    linked: &mut Vec<((u64, u64), u64)>,
    subdirs: &mut Vec<PathBuf>,
) -> io::Result<()> {
    // Queued paths were real directories when found; RESOLVE_BENEATH keeps a symlink swapped in
    // since then from leading the walk outside.
    let fd = match fsops::open_beneath_path(root, dir, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
        Ok(fd) => fd,
        // Removed or replaced while we walked: it no longer counts.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for ent in fsops::DirEntries::new(fd.as_fd())? {
        let (name, _dtype): (OsString, DType) = ent?;
        let st = match fsops::lstat_at(fd.as_fd(), &name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        t.entries += 1;
        t.apparent_bytes += st.st_size as u64;
        let blocks = st.st_blocks as u64 * 512;
        if fsops::is_dir(&st) {
            t.disk_bytes += blocks;
            subdirs.push(dir.join(&name));
        } else if st.st_nlink > 1 {
            linked.push(((st.st_dev, st.st_ino), blocks));
        } else {
            t.disk_bytes += blocks;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_entries_sizes_and_hard_links_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/f1"), vec![1u8; 10_000]).unwrap();
        std::fs::write(d.path().join("a/b/f2"), vec![1u8; 5]).unwrap();
        std::fs::hard_link(d.path().join("a/f1"), d.path().join("a/b/f1-link")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("link")).unwrap();
        let fd = fsops::open_dir_path(d.path()).unwrap();
        for threads in [1, 4] {
            let t = scan_tree(fd.as_fd(), threads).unwrap();
            assert_eq!(t.entries, 6, "threads={threads}");
            let dirsz = std::fs::metadata(d.path().join("a")).unwrap().len() * 2;
            assert_eq!(t.apparent_bytes, 10_000 * 2 + 5 + 4 + dirsz);
            let du = std::process::Command::new("du")
                .args(["-s", "-B1"])
                .arg(d.path())
                .output()
                .unwrap();
            let du: u64 = String::from_utf8_lossy(&du.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(t.disk_bytes, du, "threads={threads}");
        }
    }
}
