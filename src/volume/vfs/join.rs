//! tus concatenation on a local filesystem: the partial uploads' staging files become the final
//! upload's, then it moves into place like any completed upload.
//!
//! The first partial is renamed to be the join's file, `<session>.join` (no copy; a name no
//! plain upload's staging has, so a leftover of one is never taken for a join); each next one
//! is appended with `copy_file_range` (std's `io::copy` between files: reflinks where the
//! filesystem can, btrfs and XFS with block-aligned offsets; an in-kernel copy elsewhere; a
//! read/write loop where neither works), synced, and only then deleted. So a join never needs
//! more room than one partial, and the joined file's length alone says how far a join got: a
//! join cut off at any point (kill -9, full disk) picks up where it stopped when repeated.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};

use super::staging::{finish_at, staging_dir};
use crate::ids::VFolderId;
use crate::volume::fsops::{self, Owner};
use crate::volume::{RelPath, Result, VolumeError};

fn lost(what: &str, e: io::Error) -> VolumeError {
    VolumeError::Io {
        path: format!(".upload/{what}"),
        source: e,
    }
}

fn open_rw(dir: BorrowedFd, name: &str) -> io::Result<File> {
    fsops::open_beneath_path(
        dir,
        std::path::Path::new(name),
        libc::O_RDWR | libc::O_NOFOLLOW,
        0,
    )
    .map(File::from)
}

fn is_enoent(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// The file a final upload's join builds (`session`'s own staging name is a plain upload's).
pub(super) fn joining(session: &str) -> String {
    format!("{session}.join")
}

/// Joins the staged partials `parts` (sessions and lengths, in order) into `dst`, as the staging
/// of `session` (see the module's comment).
pub(super) fn concat_at(
    root: BorrowedFd,
    owner: Option<Owner>,
    vf: &VFolderId,
    session: &str,
    parts: &[(String, u64)],
    dst: &RelPath,
) -> Result<()> {
    let total: u64 = parts.iter().map(|p| p.1).sum();
    let sdir = match fsops::open_dir_beneath(root, &staging_dir(vf)) {
        Ok(d) => d,
        Err(e) if is_enoent(&e) && total == 0 => {
            fsops::mkdir_all_beneath(root, &staging_dir(vf), 0o700, None)
                .map_err(|e| lost("", e))?
        }
        Err(e) => return Err(lost("", e)),
    };
    let Some(mut joined) = start(root, sdir.as_fd(), owner, vf, session, parts, dst, total)? else {
        return Ok(()); // joined and moved into place before: nothing left to do
    };
    let mut at = parts.first().map(|p| p.1).unwrap_or(0);
    for (part, size) in parts.iter().skip(1) {
        let end = at + size;
        let len = joined
            .metadata()
            .map_err(|e| lost(&joining(session), e))?
            .len();
        if len < end {
            append(sdir.as_fd(), &mut joined, part, at, *size)
                .map_err(|e| VolumeError::io(dst, e))?;
        }
        // In the joined file, durably: its own copy can go.
        match fsops::unlink_at(sdir.as_fd(), part, false) {
            Err(e) if !is_enoent(&e) => return Err(lost(part, e)),
            _ => {}
        }
        at = end;
    }
    let len = joined
        .metadata()
        .map_err(|e| lost(&joining(session), e))?
        .len();
    if len != total {
        return Err(VolumeError::Internal(format!(
            "the join of upload {session} holds {len} bytes, its partials {total}"
        )));
    }
    drop(joined);
    finish_at(root, owner, vf, &joining(session), dst)?;
    // A plain upload's staging the token left before its partials (nothing acknowledged).
    match fsops::unlink_at(sdir.as_fd(), session, false) {
        Err(e) if !is_enoent(&e) => tracing::warn!(session, error = %e, "cannot remove staging"),
        _ => {}
    }
    Ok(())
}

/// The final upload's staging file: as a join before left it, or else the first partial's,
/// renamed. None when an earlier join already moved it into place.
#[allow(clippy::too_many_arguments)]
fn start(
    root: BorrowedFd,
    sdir: BorrowedFd,
    owner: Option<Owner>,
    vf: &VFolderId,
    session: &str,
    parts: &[(String, u64)],
    dst: &RelPath,
    total: u64,
) -> Result<Option<File>> {
    let join = joining(session);
    match open_rw(sdir, &join) {
        Ok(f) => return Ok(Some(f)),
        Err(e) if !is_enoent(&e) => return Err(lost(&join, e)),
        Err(_) => {}
    }
    let first = parts.first().map(|(p, n)| (p.as_str(), *n));
    // A plain rename: the join's file was just found missing, under the upload's lock (and
    // rclone's FUSE answers RENAME_NOREPLACE with EIO).
    match first {
        Some((p, _)) => match fsops::rename_at(sdir, p, sdir, OsStr::new(&join), false) {
            Ok(()) => fsops::fsync_dir(sdir).map_err(|e| lost(&join, e))?,
            Err(e) if is_enoent(&e) => {
                if already_placed(root, sdir, vf, dst, total, first)? {
                    return Ok(None);
                }
                return Err(lost(p, e));
            }
            Err(e) => return Err(lost(p, e)),
        },
        None => {
            let f = fsops::create_at(sdir, &join, 0o644).map_err(|e| lost(&join, e))?;
            fsops::fchown(f.as_fd(), owner).map_err(|e| lost(&join, e))?;
        }
    }
    open_rw(sdir, &join).map(Some).map_err(|e| lost(&join, e))
}

/// Neither the final's staging file nor its first partial's exists: either a join finished and
/// moved it into place (the crash came before that was recorded), or the bytes are lost. An
/// empty first partial never had a staging file at all.
fn already_placed(
    root: BorrowedFd,
    sdir: BorrowedFd,
    vf: &VFolderId,
    dst: &RelPath,
    total: u64,
    first: Option<(&str, u64)>,
) -> Result<bool> {
    if let Some((p, 0)) = first {
        let f = fsops::create_at(sdir, p, 0o644).map_err(|e| lost(p, e))?;
        drop(f);
        return Ok(false);
    }
    let vf_fd = super::open_vfolder(root, vf)?;
    match fsops::open_regular_beneath(vf_fd.as_fd(), dst) {
        Ok((_, st)) => Ok(st.st_size as u64 == total),
        Err(e) if is_enoent(&e) => Ok(false),
        Err(e) => Err(VolumeError::io(dst, e)),
    }
}

/// Appends the staged partial `part` (`size` bytes) to `joined` at `at`, replacing whatever an
/// interrupted append left past `at`, and syncs it.
fn append(sdir: BorrowedFd, joined: &mut File, part: &str, at: u64, size: u64) -> io::Result<()> {
    joined.set_len(at)?;
    if size > 0 {
        let mut src = File::from(fsops::open_beneath_path(
            sdir,
            std::path::Path::new(part),
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )?);
        let have = src.metadata()?.len();
        if have != size {
            return Err(io::Error::other(format!(
                "partial upload {part} holds {have} bytes, not its {size}"
            )));
        }
        src.seek(SeekFrom::Start(0))?;
        joined.seek(SeekFrom::Start(at))?;
        let copied = io::copy(&mut src.take(size), joined)?;
        if copied != size {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
    }
    joined.sync_all()
}
