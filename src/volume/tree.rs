//! Iterative tree walks over directory file descriptors, for delete, clone and archives.
//!
//! Users control the shape of their trees: a directory can be tens of thousands of levels deep
//! (`mkdir d; cd d` in a loop; depth is not bounded by PATH_MAX). A recursive walk overflows the
//! stack of its thread and aborts the daemon, and a walk that opens paths from the vfolder root
//! fails past PATH_MAX. So walks here keep an explicit stack of levels and open every directory
//! relative to its parent's fd, by a single name, never following a symlink.
//!
//! Open file descriptors stay bounded: only the deepest [`FD_BUDGET`] levels (and the root) keep
//! their fd. A level whose fd was closed is reopened on the way back up through `..` of the
//! level below, and used only if it is the very inode recorded on the way down; a directory moved
//! meanwhile is reopened by name from the root, again inode-checked.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::fsops::{self, DType};

/// Directory fds a walk keeps open besides its root.
pub const FD_BUDGET: usize = 32;

/// Entries read per batch in re-read mode (deletes), so a huge directory is never held whole.
const REREAD_BATCH: usize = 1024;

struct Level {
    /// Name in the parent level (empty for the root).
    name: OsString,
    /// lstat at the time the level was entered: identity (dev, ino) and metadata.
    st: libc::stat,
    /// None while closed to stay within the budget.
    fd: Option<OwnedFd>,
}

/// A stack of open directories, root first, with at most [`FD_BUDGET`] fds open below the root.
/// Open levels are always the root plus a contiguous run at the top (`open_from..len`).
pub struct FdStack {
    levels: Vec<Level>,
    open_from: usize,
}

fn stale() -> io::Error {
    io::Error::other("a directory was moved or replaced during the walk")
}

impl FdStack {
    pub fn new(root: OwnedFd) -> io::Result<Self> {
        let st = fsops::fstat(root.as_fd())?;
        Ok(FdStack {
            levels: vec![Level {
                name: OsString::new(),
                st,
                fd: Some(root),
            }],
            open_from: 1,
        })
    }

    /// Levels below the root.
    pub fn depth(&self) -> usize {
        self.levels.len() - 1
    }

    pub fn push(&mut self, name: OsString, fd: OwnedFd, st: libc::stat) {
        self.levels.push(Level {
            name,
            st,
            fd: Some(fd),
        });
        if self.levels.len() - self.open_from > FD_BUDGET {
            self.levels[self.open_from].fd = None;
            self.open_from += 1;
        }
    }

    /// The top level's fd (the root when nothing was pushed).
    pub fn top(&self) -> BorrowedFd<'_> {
        self.fd_at(self.levels.len() - 1)
    }

    /// The fd of the level below the top (the top's parent); None at the root.
    pub fn parent_of_top(&self) -> Option<BorrowedFd<'_>> {
        (self.levels.len() >= 2).then(|| self.fd_at(self.levels.len() - 2))
    }

    fn fd_at(&self, i: usize) -> BorrowedFd<'_> {
        match &self.levels[i].fd {
            Some(fd) => fd.as_fd(),
            // Invariant: the top two levels are always open (FD_BUDGET >= 2).
            None => unreachable!("level {i} of {} is closed", self.levels.len()),
        }
    }

    /// Pops the top level and returns its name, stat and fd; the new top is reopened if needed.
    pub fn pop(&mut self) -> io::Result<(OsString, libc::stat, Option<OwnedFd>)> {
        if self.levels.len() <= 1 {
            return Err(io::Error::other("popping the root of a walk"));
        }
        let left = self.levels.pop().unwrap_or_else(|| unreachable!());
        let top = self.levels.len() - 1;
        if top > 0 && self.levels[top].fd.is_none() {
            let fd = self.reopen(top, left.fd.as_ref())?;
            self.levels[top].fd = Some(fd);
            self.open_from = top;
        }
        if self.open_from > self.levels.len() {
            self.open_from = self.levels.len();
        }
        Ok((left.name, left.st, left.fd))
    }

    /// Reopens level `i`: through `..` of the level above it when that is still the recorded
    /// inode (the usual case, O(1)), else by names from the root.
    fn reopen(&self, i: usize, child: Option<&OwnedFd>) -> io::Result<OwnedFd> {
        let want = &self.levels[i].st;
        if let Some(c) = child
            && let Ok(fd) = fsops::open_subdir_nofollow(c.as_fd(), "..")
            && fsops::same_inode(&fsops::fstat(fd.as_fd())?, want)
        {
            return Ok(fd);
        }
        let mut cur: Option<OwnedFd> = None;
        for lvl in &self.levels[1..=i] {
            let dir = cur.as_ref().map_or(self.fd_at(0), |f| f.as_fd());
            let fd = fsops::open_subdir_nofollow(dir, &lvl.name).map_err(|_| stale())?;
            if !fsops::same_inode(&fsops::fstat(fd.as_fd())?, &lvl.st) {
                return Err(stale());
            }
            cur = Some(fd);
        }
        cur.ok_or_else(stale)
    }

    /// Names of the levels below the root, root first.
    pub fn names(&self) -> impl Iterator<Item = &OsStr> {
        self.levels[1..].iter().map(|l| l.name.as_os_str())
    }
}

/// What a walk found, in order: `Enter` before a directory's contents, `Leave` after them.
#[derive(Debug)]
pub enum Visit {
    /// A non-directory entry (or a directory past `max_depth`, which is an error instead).
    Entry {
        name: OsString,
        st: libc::stat,
    },
    Enter {
        name: OsString,
        st: libc::stat,
    },
    Leave {
        name: OsString,
        st: libc::stat,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct WalkOptions {
    /// Visit names in byte order (archives); else in directory order.
    pub sorted: bool,
    /// Read directories in batches and read again when a batch is done, for walks that remove
    /// what they visit (deletes). The visitor must remove every entry or stop the walk.
    pub reread: bool,
    /// Directories deeper than this below the root are an error (ELOOP).
    pub max_depth: usize,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions {
            sorted: false,
            reread: false,
            max_depth: usize::MAX,
        }
    }
}

/// A depth-first walk that can be stopped and resumed between visits (it holds no borrowed
/// state), so an archive can advance it a batch at a time on short-lived blocking calls.
pub struct Walker {
    stack: FdStack,
    /// Unvisited names per level, parallel to the stack's levels.
    pending: Vec<std::vec::IntoIter<(OsString, DType)>>,
    opts: WalkOptions,
    /// The fd of the directory the last `Leave` left (valid until the next call).
    left: Option<OwnedFd>,
    last_was_enter: bool,
}

fn read_names(fd: BorrowedFd, opts: &WalkOptions) -> io::Result<Vec<(OsString, DType)>> {
    let entries = fsops::DirEntries::new(fd)?;
    let mut names: Vec<(OsString, DType)> = if opts.reread {
        entries.take(REREAD_BATCH).collect::<io::Result<_>>()?
    } else {
        entries.collect::<io::Result<_>>()?
    };
    if opts.sorted {
        names.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(names)
}

impl Walker {
    /// Walks the contents of the directory `root` (the root itself is not visited).
    pub fn new(root: OwnedFd, opts: WalkOptions) -> io::Result<Self> {
        let names = read_names(root.as_fd(), &opts)?;
        Ok(Walker {
            stack: FdStack::new(root)?,
            pending: vec![names.into_iter()],
            opts,
            left: None,
            last_was_enter: false,
        })
    }

    /// The directory that holds the entry of the last visit.
    pub fn parent(&self) -> BorrowedFd<'_> {
        if self.last_was_enter {
            self.stack
                .parent_of_top()
                .unwrap_or_else(|| self.stack.top())
        } else {
            self.stack.top()
        }
    }

    /// After `Enter`: the directory entered. After `Leave`: the directory left.
    pub fn current(&self) -> Option<BorrowedFd<'_>> {
        if self.last_was_enter {
            Some(self.stack.top())
        } else {
            self.left.as_ref().map(|f| f.as_fd())
        }
    }

    /// Names from the root down to the directory holding the last visited entry.
    pub fn dir_names(&self) -> impl Iterator<Item = &OsStr> {
        let n = self.stack.depth() - usize::from(self.last_was_enter);
        self.stack.names().take(n)
    }

    /// After `Enter`: do not descend into that directory after all (no `Leave` follows).
    pub fn skip_entered(&mut self) -> io::Result<()> {
        if self.last_was_enter {
            self.pending.pop();
            self.stack.pop()?;
            self.last_was_enter = false;
        }
        Ok(())
    }

    fn step(&mut self) -> io::Result<Option<Visit>> {
        self.left = None;
        self.last_was_enter = false;
        loop {
            let Some(pending) = self.pending.last_mut() else {
                return Ok(None);
            };
            if let Some((name, _)) = pending.next() {
                let top = self.stack.top();
                let st = match fsops::lstat_at(top, &name) {
                    Ok(st) => st,
                    // Removed since it was listed.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                };
                if !fsops::is_dir(&st) {
                    return Ok(Some(Visit::Entry { name, st }));
                }
                if self.stack.depth() >= self.opts.max_depth {
                    return Err(io::Error::other(format!(
                        "directory tree deeper than {} levels",
                        self.opts.max_depth
                    )));
                }
                let fd = match fsops::open_subdir_nofollow(top, &name) {
                    Ok(fd) => fd,
                    // Replaced by something else since the lstat: not a directory to enter.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let now = fsops::fstat(fd.as_fd())?;
                if !fsops::same_inode(&now, &st) {
                    continue; // swapped for another directory: it is no longer this entry
                }
                let names = read_names(fd.as_fd(), &self.opts)?;
                self.stack.push(name.clone(), fd, st);
                self.pending.push(names.into_iter());
                self.last_was_enter = true;
                return Ok(Some(Visit::Enter { name, st }));
            }
            if self.opts.reread {
                let more = read_names(self.stack.top(), &self.opts)?;
                if !more.is_empty() {
                    *pending = more.into_iter();
                    continue;
                }
            }
            self.pending.pop();
            if self.pending.is_empty() {
                return Ok(None);
            }
            let (name, st, fd) = self.stack.pop()?;
            self.left = fd;
            return Ok(Some(Visit::Leave { name, st }));
        }
    }
}

impl Iterator for Walker {
    type Item = io::Result<Visit>;
    fn next(&mut self) -> Option<Self::Item> {
        self.step().transpose()
    }
}

/// Removes `name` in `dir` and, if it is a directory, everything under it, never following
/// symlinks, at any depth. `on_removed` is called per removed entry (progress reporting,
/// cancellation: return false to stop). Missing entries are not an error.
pub fn remove_tree_at(
    dir: BorrowedFd,
    name: &OsStr,
    on_removed: &mut dyn FnMut() -> bool,
) -> io::Result<()> {
    let ok_if_gone = |r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    };
    let cancelled = || io::Error::from_raw_os_error(libc::ECANCELED);
    let st = match fsops::lstat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if fsops::is_dir(&st) {
        let sub = fsops::open_subdir_nofollow(dir, name)?;
        let mut walk = Walker::new(
            sub,
            WalkOptions {
                reread: true,
                ..WalkOptions::default()
            },
        )?;
        while let Some(visit) = walk.next() {
            match visit? {
                Visit::Enter { .. } => continue,
                Visit::Entry { name, .. } => {
                    ok_if_gone(fsops::unlink_at(walk.parent(), &name, false))?
                }
                Visit::Leave { name, .. } => {
                    ok_if_gone(fsops::unlink_at(walk.parent(), &name, true))?
                }
            }
            if !on_removed() {
                return Err(cancelled());
            }
        }
        ok_if_gone(fsops::unlink_at(dir, name, true))?;
    } else {
        ok_if_gone(fsops::unlink_at(dir, name, false))?;
    }
    if on_removed() {
        Ok(())
    } else {
        Err(cancelled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A chain of `depth` directories named `d`, with a file `f` every 1000 levels (the first
    /// one beside the chain's top). Built with *at calls, since the path soon passes PATH_MAX.
    fn deep_tree(base: &std::path::Path, depth: usize) {
        let mut fd = fsops::open_dir_path(base).unwrap();
        for i in 0..depth {
            fsops::mkdir_at(fd.as_fd(), "d", 0o755).unwrap();
            if i % 1000 == 0 {
                fsops::create_at(fd.as_fd(), "f", 0o644).unwrap();
            }
            fd = fsops::open_subdir_nofollow(fd.as_fd(), "d").unwrap();
        }
    }

    #[test]
    fn removes_a_tree_deeper_than_any_stack_and_path_max() {
        let base = tempfile::tempdir().unwrap();
        deep_tree(base.path(), 20_000);
        let fd = fsops::open_dir_path(base.path()).unwrap();
        let mut n = 0u64;
        // On a 256 KiB stack: a recursive walk would overflow long before 20 000 levels.
        let removed = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                remove_tree_at(fd.as_fd(), OsStr::new("d"), &mut || {
                    n += 1;
                    true
                })
                .map(|()| n)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        // 20 000 directories and the 19 files inside the chain.
        assert_eq!(removed, 20_000 + 19);
        assert!(!base.path().join("d").exists());
    }

    #[test]
    fn walk_visits_in_order_and_reopens_closed_levels() {
        let base = tempfile::tempdir().unwrap();
        deep_tree(base.path(), FD_BUDGET * 3);
        std::fs::write(base.path().join("a"), b"1").unwrap();
        symlink("/etc", base.path().join("z")).unwrap();
        let root = fsops::open_dir_path(base.path()).unwrap();
        let walk = Walker::new(
            root,
            WalkOptions {
                sorted: true,
                ..WalkOptions::default()
            },
        )
        .unwrap();
        let mut enters = 0;
        let mut leaves = 0;
        let mut files = 0;
        let mut order = Vec::new();
        for v in walk {
            match v.unwrap() {
                Visit::Enter { .. } => enters += 1,
                Visit::Leave { .. } => leaves += 1,
                Visit::Entry { name, .. } => {
                    files += 1;
                    order.push(name)
                }
            }
        }
        assert_eq!((enters, leaves), (FD_BUDGET * 3, FD_BUDGET * 3));
        assert_eq!(files, 3, "a, f and z beside the chain");
        assert_eq!(order.first().unwrap(), "a");
    }

    #[test]
    fn max_depth_is_an_error_not_a_crash() {
        let base = tempfile::tempdir().unwrap();
        deep_tree(base.path(), 10);
        let root = fsops::open_dir_path(base.path()).unwrap();
        let walk = Walker::new(
            root,
            WalkOptions {
                max_depth: 5,
                ..WalkOptions::default()
            },
        )
        .unwrap();
        assert!(walk.into_iter().any(|v| v.is_err()));
    }
    #[test]
    fn remove_tree_does_not_follow_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("t/a/b")).unwrap();
        std::fs::write(base.path().join("t/a/b/f"), b"x").unwrap();
        symlink(outside.path(), base.path().join("t/link")).unwrap();
        let fd = fsops::open_dir_path(base.path()).unwrap();
        let mut n = 0;
        remove_tree_at(fd.as_fd(), OsStr::new("t"), &mut || {
            n += 1;
            true
        })
        .unwrap();
        assert!(!base.path().join("t").exists());
        assert!(outside.path().join("keep").exists());
        assert_eq!(n, 5);
    }
}
