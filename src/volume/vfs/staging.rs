//! Upload staging on a local filesystem: `<volume>/<qs-hex>/.upload/<session>`.
//!
//! Outside the vfolder (so listings and session containers never see it) but inside the quota
//! scope directory (so an XFS project quota counts it) and on the same filesystem (so completion
//! is one atomic rename).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::blocking;
use crate::ids::VFolderId;
use crate::volume::fsops::{self, Owner};
use crate::volume::{
    ByteStream, Checkpointing, RelPath, Result, StagedWrite, UploadStaging, VolumeError,
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

pub struct VfsStaging {
    pub(super) root_fd: Arc<OwnedFd>,
    pub(super) owner: Option<Owner>,
}

fn staging_dir(vf: &VFolderId) -> RelPath {
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
    async fn truncate(&self, vf: &VFolderId, session: &str, offset: u64) -> Result<()> {
        let fd = self
            .open_staged(vf, session, libc::O_WRONLY)
            .map_err(|e| io_err(".upload", e))?;
        blocking(move || {
            let f = File::from(fd);
            f.set_len(offset).map_err(|e| io_err(".upload", e))?;
            f.sync_all().map_err(|e| io_err(".upload", e))
        })
        .await
    }

    async fn write(
        &self,
        vf: &VFolderId,
        session: &str,
        offset: u64,
        mut body: ByteStream,
        checkpoints: Option<Checkpointing>,
    ) -> Result<StagedWrite> {
        let root = self.root_fd.clone();
        let owner = self.owner;
        let (vfc, sessionc) = (*vf, session.to_string());
        // Opened (made at offset 0) on the blocking pool. Bytes past the durable offset (from a
        // crashed or cut-off earlier PATCH) are dropped.
        let (file, created_dir) = blocking(move || {
            let (fd, dir) = if offset == 0 {
                let dir = fsops::mkdir_all_beneath(root.as_fd(), &staging_dir(&vfc), 0o700, None)
                    .map_err(|e| io_err(".upload", e))?;
                let fd = fsops::open_beneath_path(
                    dir.as_fd(),
                    std::path::Path::new(&sessionc),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW,
                    0o644,
                )
                .map_err(|e| io_err(".upload", e))?;
                fsops::fchown(fd.as_fd(), owner).map_err(|e| io_err(".upload", e))?;
                (fd, Some(dir))
            } else {
                let p = staging_dir(&vfc).join_name(&sessionc);
                let fd = fsops::open_beneath(root.as_fd(), &p, libc::O_WRONLY, 0)
                    .map_err(|e| io_err(".upload", e))?;
                (fd, None)
            };
            let file = File::from(fd);
            file.set_len(offset).map_err(|e| io_err(".upload", e))?;
            Ok((file, dir))
        })
        .await?;

        // One blocking writer per PATCH, fed through a short channel: the network and the disk
        // overlap, and at most a few batches (~1 MiB each) are in memory. The body's own chunks
        // are handed over as they are and written with one pwritev per batch: no copy of ours.
        // An empty batch is a tick: a checkpoint may be due although no byte came.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(3);
        let tick = checkpoints.as_ref().map(|c| c.every);
        let writer = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut pos = offset;
            let mut flushed = offset;
            let mut synced = offset;
            let mut last_sync = std::time::Instant::now();
            let mut dir_synced = created_dir.is_none();
            while let Some(batch) = rx.blocking_recv() {
                pos += write_batch_at(&file, &batch, pos)?;
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
                    file.sync_data()?;
                    // The staging file's own name must survive too before an offset in it is.
                    if !dir_synced {
                        if let Some(d) = &created_dir {
                            fsops::fsync_dir(d.as_fd())?;
                        }
                        dir_synced = true;
                    }
                    synced = pos;
                    last_sync = std::time::Instant::now();
                    let _ = c.durable.send(pos);
                }
            }
            file.sync_data()?;
            if !dir_synced && let Some(d) = &created_dir {
                fsops::fsync_dir(d.as_fd())?;
            }
            Ok(pos - offset)
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
                    if tx.send(std::mem::take(&mut batch)).await.is_err() {
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
                        if tx.send(std::mem::take(&mut batch)).await.is_err() {
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
            let _ = tx.send(batch).await;
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| VolumeError::Internal(format!("staging writer failed: {e}")))?
            .map_err(|e| io_err(".upload", e))?;
        Ok(StagedWrite {
            written,
            body_error,
        })
    }

    async fn finish(&self, vf: &VFolderId, session: &str, dst: &RelPath) -> Result<()> {
        let root = self.root_fd.clone();
        let owner = self.owner;
        let (vf, session, dst) = (*vf, session.to_string(), dst.clone());
        blocking(move || {
            let vf_fd = super::open_vfolder(root.as_fd(), &vf)?;
            let (parent, name) = dst
                .split_last()
                .ok_or_else(|| VolumeError::io(&dst, io::Error::from_raw_os_error(libc::EISDIR)))?;
            let pfd = fsops::mkdir_all_beneath(vf_fd.as_fd(), &parent, 0o755, owner)
                .map_err(|e| VolumeError::io(&parent, e))?;
            let sdir = fsops::open_dir_beneath(root.as_fd(), &staging_dir(&vf))
                .map_err(|e| io_err(".upload", e))?;
            fsops::rename_at(
                sdir.as_fd(),
                OsStr::new(&session),
                pfd.as_fd(),
                OsStr::new(name),
                false,
            )
            .map_err(|e| VolumeError::io(&dst, e))?;
            fsops::fsync_dir(pfd.as_fd()).map_err(|e| VolumeError::io(&dst, e))
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
            match fsops::unlink_at(sdir.as_fd(), OsStr::new(&session), false) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                Err(e) => Err(io_err(".upload", e)),
            }
        })
        .await
    }
}
