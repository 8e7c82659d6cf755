//! Exact tree usage with a small pool of threads walking directory fds.
//!
//! Backend.AI gives up after 30 s and answers -1; `du -s` walks with one thread. Here several
//! threads share a stack of directories, which keeps more stat calls in flight on cold caches
//! and network mounts.
//!
//! Every directory is opened relative to its parent's fd by one name with `O_NOFOLLOW`, never by
//! a path from the root, so depth is unbounded (past PATH_MAX too: a user cannot hide a tree's
//! usage by nesting it deeply) and no symlink is ever followed. A queued directory holds its
//! parent node, and a parent keeps its fd only while children wait to be opened and the open-fd
//! budget allows; otherwise it is reopened by name from the nearest ancestor that still has one,
//! checked against the inode recorded when it was found. So wide and deep trees alike keep the
//! number of open fds bounded.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::fsops;

/// Directory fds kept open across the whole scan (besides the ones being read).
const FD_BUDGET: usize = 256;

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

/// A directory found by the scan.
struct Node {
    parent: Option<Arc<Node>>,
    name: OsString,
    dev: u64,
    ino: u64,
    /// Kept while children still need it to be opened (and the budget allows).
    fd: Mutex<Option<Arc<OwnedFd>>>,
    children_left: AtomicUsize,
}

struct Queue {
    dirs: Vec<Arc<Node>>,
    busy: usize,
    error: Option<io::Error>,
}

struct Scan {
    cached: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scan {
    /// The node's directory, opened from the nearest ancestor holding an fd. None when it was
    /// removed or replaced since it was found (it no longer counts).
    fn open(&self, node: &Arc<Node>) -> io::Result<Option<Arc<OwnedFd>>> {
        if let Some(fd) = lock(&node.fd).clone() {
            return Ok(Some(fd));
        }
        let mut chain = vec![node.clone()];
        let mut base = loop {
            let Some(parent) = chain.last().and_then(|n| n.parent.clone()) else {
                return Err(io::Error::other("scan root has no fd"));
            };
            if let Some(fd) = lock(&parent.fd).clone() {
                break fd;
            }
            chain.push(parent);
        };
        while let Some(n) = chain.pop() {
            let fd = match fsops::open_subdir_nofollow(base.as_fd(), &n.name) {
                Ok(fd) => fd,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let st = fsops::fstat(fd.as_fd())?;
            if (st.st_dev, st.st_ino) != (n.dev, n.ino) {
                return Ok(None);
            }
            base = Arc::new(fd);
        }
        Ok(Some(base))
    }

    /// A child of `parent` was opened: the parent's fd may go.
    fn child_opened(&self, parent: &Node) {
        if parent.parent.is_none() {
            return; // the root keeps its fd
        }
        if parent.children_left.fetch_sub(1, Ordering::AcqRel) == 1
            && lock(&parent.fd).take().is_some()
        {
            self.cached.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn keep_fd(&self, node: &Node, fd: Arc<OwnedFd>) {
        if self.cached.fetch_add(1, Ordering::Relaxed) < FD_BUDGET {
            *lock(&node.fd) = Some(fd);
        } else {
            self.cached.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Walks the directory `root` (an fd) without following symlinks.
pub fn scan_tree(root: BorrowedFd, threads: usize) -> io::Result<ScanTotals> {
    let root_st = fsops::fstat(root)?;
    let root_node = Arc::new(Node {
        parent: None,
        name: OsString::new(),
        dev: root_st.st_dev,
        ino: root_st.st_ino,
        fd: Mutex::new(Some(Arc::new(root.try_clone_to_owned()?))),
        children_left: AtomicUsize::new(0),
    });
    let scan = Scan {
        cached: AtomicUsize::new(0),
    };
    let queue = Mutex::new(Queue {
        dirs: vec![root_node.clone()],
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
                        let mut q = lock(&queue);
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
                    let Some(node) = next else {
                        ready.notify_all();
                        break;
                    };
                    let mut found = Vec::new();
                    let res = scan_one(&scan, &node, &mut local, &mut local_linked, &mut found);
                    let mut q = lock(&queue);
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
                let mut t = lock(&totals);
                t.entries += local.entries;
                t.apparent_bytes += local.apparent_bytes;
                t.disk_bytes += local.disk_bytes;
                drop(t);
                let mut seen = lock(&linked);
                let mut t = lock(&totals);
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
    scan: &Scan,
    node: &Arc<Node>,
    t: &mut ScanTotals,
    linked: &mut Vec<((u64, u64), u64)>,
    subdirs: &mut Vec<Arc<Node>>,
) -> io::Result<()> {
    let fd = scan.open(node);
    if let Some(p) = &node.parent {
        scan.child_opened(p);
    }
    // Removed or replaced while we walked: it no longer counts.
    let Some(fd) = fd? else { return Ok(()) };
    for ent in fsops::DirEntries::new(fd.as_fd())? {
        let (name, _dtype) = ent?;
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
            subdirs.push(Arc::new(Node {
                parent: Some(node.clone()),
                name,
                dev: st.st_dev,
                ino: st.st_ino,
                fd: Mutex::new(None),
                children_left: AtomicUsize::new(0),
            }));
        } else if st.st_nlink > 1 {
            linked.push(((st.st_dev, st.st_ino), blocks));
        } else {
            t.disk_bytes += blocks;
        }
    }
    if !subdirs.is_empty() && node.parent.is_some() {
        node.children_left.store(subdirs.len(), Ordering::Release);
        scan.keep_fd(node, fd);
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

    #[test]
    fn counts_past_path_max() {
        let d = tempfile::tempdir().unwrap();
        let mut fd = fsops::open_dir_path(d.path()).unwrap();
        for _ in 0..3000 {
            fsops::mkdir_at(fd.as_fd(), "dd", 0o755).unwrap();
            fd = fsops::open_subdir_nofollow(fd.as_fd(), "dd").unwrap();
        }
        // 3000 levels of "dd/" is 9000 bytes of path: opening by path from the root would fail.
        fsops::create_at(fd.as_fd(), "f", 0o644).unwrap();
        let root = fsops::open_dir_path(d.path()).unwrap();
        for threads in [1, 4] {
            let t = scan_tree(root.as_fd(), threads).unwrap();
            assert_eq!(t.entries, 3001, "threads={threads}");
        }
    }
}
