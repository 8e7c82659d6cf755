//! Upload staging on a local filesystem: `<volume>/<qs-hex>/.upload/<session>`.
//!
//! Outside the vfolder (so listings and session containers never see it) but inside the quota
//! scope directory (so an XFS project quota counts it) and on the same filesystem (so completion
//! is one atomic rename).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::blocking;
use crate::ids::VFolderId;
use crate::volume::fsops::{self, Owner};
use crate::volume::{
    ByteStream, RelPath, Result, StagedWrite, UploadStaging, VolumeError, WritePlan,
};

/// Body chunks are gathered to this size before one write call.
const WRITE_BLOCK: usize = 1 << 20;
/// Writeback of written data is started every this many bytes.
const WRITEBACK_STEP: u64 = 2 << 20;

/// Writes all of `batch` at `pos` (pwritev, retried on short writes); returns the bytes written.
fn write_batch_at(file: &File, batch: &[Bytes], pos: u64) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let total: usize = batch.iter().map(Bytes::len).sum();
    let mut done = 0usize;
    while done < total {
        // Skip what is written, then hand the rest over in one call.
        let mut skip = done;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(batch.len());
        for b in batch {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            iov.push(libc::iovec {
                iov_base: b[skip..].as_ptr() as *mut libc::c_void,
                iov_len: b.len() - skip,
            });
            skip = 0;
        }
        let iovcnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iovcnt,
                (pos + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n as usize;
    }
    Ok(total as u64)
}

/// Asks the kernel to start writing a range back now (no waiting); a hint, so errors are moot:
/// the fsync that follows reports any real failure.
fn start_writeback(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// The staging file of `session`, opened for writing; at offset 0 it (and `.upload/`) is made,
/// and the directory is returned for the caller to sync.
fn open_for_write(
    root: BorrowedFd,
    vf: &VFolderId,
    session: &str,
    offset: u64,
    owner: Option<Owner>,
) -> io::Result<(OwnedFd, Option<OwnedFd>)> {
    let dir_path = staging_dir(vf);
    if offset > 0 {
        let fd = fsops::open_beneath(root, &dir_path.join_name(session), libc::O_WRONLY, 0)?;
        return Ok((fd, None));
    }
    let dir = match fsops::open_dir_beneath(root, &dir_path) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            fsops::mkdir_all_beneath(root, &dir_path, 0o700, None)?
        }
        Err(e) => return Err(e),
    };
    let fd = fsops::open_beneath_path(
        dir.as_fd(),
        std::path::Path::new(session),
        libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW,
        0o644,
    )?;
    fsops::fchown(fd.as_fd(), owner)?;
    Ok((fd, Some(dir)))
}

/// Moves the staged upload to `dst` in the vfolder (parents made, an existing file replaced
/// atomically) and syncs the directory that now holds it.
pub(super) fn finish_at(
    root: BorrowedFd,
    owner: Option<Owner>,
    vf: &VFolderId,
    session: &str,
    dst: &RelPath,
) -> Result<()> {
    let vf_fd = super::open_vfolder(root, vf)?;
    let (parent, name) = dst
        .split_last()
        .ok_or_else(|| VolumeError::io(dst, io::Error::from_raw_os_error(libc::EISDIR)))?;
    let pfd = fsops::mkdir_all_beneath(vf_fd.as_fd(), &parent, 0o755, owner)
        .map_err(|e| VolumeError::io(&parent, e))?;
    let sdir = fsops::open_dir_beneath(root, &staging_dir(vf)).map_err(|e| io_err(".upload", e))?;
    fsops::rename_at(
        sdir.as_fd(),
        OsStr::new(session),
        pfd.as_fd(),
        OsStr::new(name),
        false,
    )
    .map_err(|e| VolumeError::io(dst, e))?;
    fsops::fsync_dir(pfd.as_fd()).map_err(|e| VolumeError::io(dst, e))
}

/// What the receiving side hands the writer thread.
enum ToWriter {
    /// Body chunks to write; empty is a tick (a checkpoint may be due).
    Batch(Vec<Bytes>),
    /// The body ended cleanly: the writer may move a complete upload into place.
    End,
}

pub struct VfsStaging {
    pub(super) root_fd: Arc<OwnedFd>,
    pub(super) owner: Option<Owner>,
}

pub(super) fn staging_dir(vf: &VFolderId) -> RelPath {
    let base = match &vf.quota_scope {
        Some(qs) => RelPath::root().join_name(&qs.dir_name()),
        None => RelPath::root(),
    };
    base.join_name(".upload")
}

fn io_err(what: &str, e: io::Error) -> VolumeError {
    VolumeError::Io {
        path: what.to_string(),
        source: e,
    }
}

impl VfsStaging {
    fn open_staged(&self, vf: &VFolderId, session: &str, flags: i32) -> io::Result<OwnedFd> {
        let p = staging_dir(vf).join_name(session);
        fsops::open_beneath(self.root_fd.as_fd(), &p, flags, 0o644)
    }
}

#[async_trait]
impl UploadStaging for VfsStaging {
    fn can_concat(&self) -> bool {
        true
    }

    async fn seal(&self, _vf: &VFolderId, _session: &str) -> Result<()> {
        Ok(()) // every write is synced already; the join renames and appends
    }

    async fn truncate(&self, vf: &VFolderId, session: &str, offset: u64) -> Result<u64> {
        let fd = self
            .open_staged(vf, session, libc::O_WRONLY)
            .map_err(|e| io_err(".upload", e))?;
        blocking(move || {
            let f = File::from(fd);
            f.set_len(offset).map_err(|e| io_err(".upload", e))?;
            f.sync_all().map_err(|e| io_err(".upload", e))?;
            Ok(offset)
        })
        .await
    }

    async fn write(
        &self,
        vf: &VFolderId,
        session: &str,
        mut body: ByteStream,
        plan: WritePlan,
    ) -> Result<StagedWrite> {
        let WritePlan {
            offset,
            size,
            checkpoints,
            finish_to,
            dst: _,
            atomic: _,
            partial: _,
        } = plan;
        let root = self.root_fd.clone();
        let owner = self.owner;
        let (vfc, sessionc) = (*vf, session.to_string());

        // One blocking writer per PATCH, fed through a short channel: the network and the disk
        // overlap, and at most a few batches (~1 MiB each) are in memory. The body's own chunks
        // are handed over as they are and written with one pwritev per batch: no copy of ours.
        // An empty batch is a tick: a checkpoint may be due although no byte came. The writer
        // opens the staging file itself (made at offset 0; bytes past `offset`, from a crashed
        // or cut-off earlier PATCH, dropped), so a small upload costs one blocking call.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ToWriter>(3);
        let tick = checkpoints.as_ref().map(|c| c.every);
        let writer = tokio::task::spawn_blocking(move || -> Result<(u64, bool)> {
            let io = |e| io_err(".upload", e);
            let (fd, created_dir) =
                open_for_write(root.as_fd(), &vfc, &sessionc, offset, owner).map_err(io)?;
            let file = File::from(fd);
            file.set_len(offset).map_err(io)?;
            let mut ended = false;
            let mut pos = offset;
            let mut flushed = offset;
            let mut synced = offset;
            let mut last_sync = std::time::Instant::now();
            let mut dir_synced = created_dir.is_none();
            while let Some(msg) = rx.blocking_recv() {
                let batch = match msg {
                    ToWriter::Batch(b) => b,
                    ToWriter::End => {
                        ended = true;
                        continue;
                    }
                };
                pos += write_batch_at(&file, &batch, pos).map_err(io)?;
                // Start writeback now rather than at the fsync below, so disk writes overlap
                // with receiving and the fsync before the 204 finds little left to do.
                if pos - flushed >= WRITEBACK_STEP {
                    start_writeback(&file, flushed, pos - flushed);
                    flushed = pos;
                }
                if let Some(c) = &checkpoints
                    && pos > synced
                    && (pos - synced >= c.every_bytes || last_sync.elapsed() >= c.every)
                {
                    file.sync_data().map_err(io)?;
                    // The staging file's own name must survive too before an offset in it is.
                    if !dir_synced {
                        if let Some(d) = &created_dir {
                            fsops::fsync_dir(d.as_fd()).map_err(io)?;
                        }
                        dir_synced = true;
                    }
                    synced = pos;
                    last_sync = std::time::Instant::now();
                    let _ = c.durable.send(pos);
                }
            }
            file.sync_data().map_err(io)?;
            // An upload that is not complete will have an offset committed in this file: its
            // name must be durable too. A complete one is renamed (and that synced) next.
            if !dir_synced
                && pos < size
                && let Some(d) = &created_dir
            {
                fsops::fsync_dir(d.as_fd()).map_err(io)?;
            }
            drop(file);
            // A move that fails here is left to `finish`, which reports why (the staged data
            // stays, synced).
            let finished = match &finish_to {
                Some(dst) if ended && pos == size => {
                    finish_at(root.as_fd(), owner, &vfc, &sessionc, dst).is_ok()
                }
                _ => false,
            };
            Ok((pos - offset, finished))
        });

        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0usize;
        let mut body_error = None;
        let mut writer_gone = false;
        let mut unsent_since = tokio::time::Instant::now();
        loop {
            // With checkpoints, hand over what came (or a tick) at least every interval.
            let deadline = tick.map(|t| unsent_since + t);
            let item = tokio::select! {
                item = body.next() => item,
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    unsent_since = tokio::time::Instant::now();
                    batched = 0;
                    if tx.send(ToWriter::Batch(std::mem::take(&mut batch))).await.is_err() {
                        writer_gone = true;
                        break;
                    }
                    continue;
                }
            };
            match item {
                None => break,
                Some(Ok(chunk)) => {
                    batched += chunk.len();
                    batch.push(chunk);
                    if batched >= WRITE_BLOCK {
                        batched = 0;
                        unsent_since = tokio::time::Instant::now();
                        if tx
                            .send(ToWriter::Batch(std::mem::take(&mut batch)))
                            .await
                            .is_err()
                        {
                            writer_gone = true;
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    body_error = Some(e);
                    break;
                }
            }
        }
        if !writer_gone && !batch.is_empty() {
            let _ = tx.send(ToWriter::Batch(batch)).await;
        }
        if !writer_gone && body_error.is_none() {
            let _ = tx.send(ToWriter::End).await;
        }
        drop(tx);
        let (written, finished) = writer
            .await
            .map_err(|e| VolumeError::Internal(format!("staging writer failed: {e}")))??;
        Ok(StagedWrite {
            written,
            body_error,
            finished,
        })
    }

    async fn concat(
        &self,
        vf: &VFolderId,
        session: &str,
        parts: &[(String, u64)],
        dst: &RelPath,
    ) -> Result<()> {
        let (root, owner, vf) = (self.root_fd.clone(), self.owner, *vf);
        let (session, parts, dst) = (session.to_string(), parts.to_vec(), dst.clone());
        blocking(move || super::join::concat_at(root.as_fd(), owner, &vf, &session, &parts, &dst))
            .await
    }

    async fn finish(&self, vf: &VFolderId, session: &str, dst: &RelPath, size: u64) -> Result<()> {
        let root = self.root_fd.clone();
        let owner = self.owner;
        let (vf, session, dst) = (*vf, session.to_string(), dst.clone());
        blocking(move || {
            let sdir = fsops::open_dir_beneath(root.as_fd(), &staging_dir(&vf))
                .map_err(|e| io_err(".upload", e))?;
            let held = fsops::lstat_at(sdir.as_fd(), &session)
                .map_err(|e| io_err(&session, e))?
                .st_size as u64;
            if held != size {
                return Err(VolumeError::Internal(format!(
                    "upload {session} holds {held} bytes, not the {size} it is complete at"
                )));
            }
            finish_at(root.as_fd(), owner, &vf, &session, &dst)
        })
        .await
    }

    async fn sweep(&self, older_than: SystemTime) -> Result<usize> {
        let root = self.root_fd.clone();
        blocking(move || {
            let mut removed = 0;
            let scopes = fsops::DirEntries::new(root.as_fd()).map_err(|e| io_err(".", e))?;
            for ent in scopes.flatten() {
                let (name, _) = ent;
                // Quota scope directories: 32 hex characters.
                let is_scope = name.len() == 32
                    && name
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_hexdigit()));
                if !is_scope {
                    continue;
                }
                let Ok(qs) = fsops::open_subdir_nofollow(root.as_fd(), &name) else {
                    continue;
                };
                let Ok(up) = fsops::open_subdir_nofollow(qs.as_fd(), ".upload") else {
                    continue;
                };
                let Ok(files) = fsops::DirEntries::new(up.as_fd()) else {
                    continue;
                };
                for (f, _) in files.flatten() {
                    let Ok(st) = fsops::lstat_at(up.as_fd(), &f) else {
                        continue;
                    };
                    let mtime = crate::volume::vfs::entry_stat(&st).modified;
                    if fsops::is_file(&st)
                        && mtime < older_than
                        && fsops::unlink_at(up.as_fd(), &f, false).is_ok()
                    {
                        removed += 1;
                    }
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn discard(&self, vf: &VFolderId, session: &str) -> Result<()> {
        let root = self.root_fd.clone();
        let (vf, session) = (*vf, session.to_string());
        blocking(move || {
            let sdir = match fsops::open_dir_beneath(root.as_fd(), &staging_dir(&vf)) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(io_err(".upload", e)),
            };
            // The upload's own staging, and a join's (a final upload's) if one was cut off.
            for name in [session.clone(), super::join::joining(&session)] {
                match fsops::unlink_at(sdir.as_fd(), OsStr::new(&name), false) {
                    Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                        return Err(io_err(".upload", e));
                    }
                    _ => {}
                }
            }
            Ok(())
        })
        .await
    }
}
