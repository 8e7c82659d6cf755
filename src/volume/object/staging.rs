//! tus uploads into an object service as multipart uploads. Nothing is staged whole: the next
//! part is buffered in a local file (synced, so acknowledged offsets survive a crash) and goes
//! up as soon as it is full; the multipart upload's id and its stored parts are kept in SQLite,
//! so after a restart the same multipart upload continues. Completion is the service's atomic
//! CompleteMultipartUpload (or one PUT for an upload smaller than a part); termination and
//! expiry abort it.
//!
//! A body that must be kept whole or not at all (it carries a checksum, verified after the
//! write) sends no part up while it lasts: its bytes wait in the buffer until the next write or
//! the completion, so a mismatch can still be cut away. Such a body may be at most one part
//! long (413 past that), so the buffer never holds more than two parts: one tenant's upload
//! token cannot fill the state disk (security review 2, G2).

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::multipart::PartId;
use sqlx::Row;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::Shared;
use super::files::payload;
use super::join::parse_key;
use crate::ids::VFolderId;
use crate::volume::{
    ByteStream, RelPath, Result, StagedWrite, UploadStaging, VolumeError, WritePlan,
};

/// S3 allows 10 000 parts per upload: larger uploads get larger parts.
pub(super) const MAX_PARTS: u64 = 10_000;

pub struct ObjectStaging {
    pub(super) shared: Arc<Shared>,
    /// The bucket of S3 partial uploads, once made (bucket-per-vfolder volumes).
    pub(super) scratch_bucket: tokio::sync::OnceCell<()>,
    /// Held while a final upload's shared multipart upload is looked up or made, so partials
    /// starting at once make one.
    pub(super) shared_lock: tokio::sync::Mutex<()>,
}

/// A full buffer on its way up as part `idx`.
struct Flight {
    at: u64,
    idx: usize,
    task: tokio::task::JoinHandle<Result<String>>,
}

/// The parts of one PATCH on their way up, oldest first. Those still flying when the PATCH
/// fails are stopped: their buffers stay, and the next PATCH sends them again.
#[derive(Default)]
struct Flights(VecDeque<Flight>);

impl Drop for Flights {
    fn drop(&mut self) {
        for f in &self.0 {
            f.task.abort();
        }
    }
}

/// A multipart upload in progress, as SQLite has it.
pub(super) struct Upload {
    pub(super) bucket: String,
    pub(super) key: String,
    pub(super) upload_id: Option<String>,
    /// Bytes already stored as parts; the local buffer holds what follows.
    pub(super) base: u64,
    pub(super) part_size: u64,
    pub(super) parts: Vec<(u32, String)>,
    /// The index of its first part: a partial upload's parts in the destination's multipart
    /// upload start after those of the bytes before it.
    pub(super) part_base: u32,
    /// Its multipart upload is the final upload's, shared with other partials: never aborted
    /// for this one alone.
    pub(super) shared: bool,
}

pub(super) fn db(e: sqlx::Error) -> VolumeError {
    VolumeError::Internal(format!("state database: {e}"))
}

pub(super) fn local(path: &std::path::Path, e: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

fn lost(session: &str, what: String) -> VolumeError {
    VolumeError::Io {
        path: format!("upload {session}: {what}"),
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    }
}

pub(super) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl ObjectStaging {
    pub fn new(shared: Arc<Shared>) -> Self {
        ObjectStaging {
            shared,
            scratch_bucket: tokio::sync::OnceCell::new(),
            shared_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn volume(&self) -> &str {
        &self.shared.name
    }

    /// Sends everything held locally after `up.base` as parts: whole parts, then the rest.
    pub(super) async fn send_rest(&self, session: &str, up: &mut Upload) -> Result<()> {
        loop {
            let held = self.held(session, up).await;
            if held == 0 {
                return Ok(());
            }
            self.send_part(session, up, held.min(up.part_size)).await?;
        }
    }

    pub(super) async fn load(&self, session: &str) -> Result<Option<Upload>> {
        let pool = self.shared.state.pool();
        let Some(r) = sqlx::query(
            "SELECT bucket, key, upload_id, base, part_size, part_base, shared FROM object_uploads
             WHERE volume = ? AND session = ?",
        )
        .bind(self.volume())
        .bind(session)
        .fetch_optional(pool)
        .await
        .map_err(db)?
        else {
            return Ok(None);
        };
        let parts = sqlx::query(
            "SELECT part, content_id FROM object_upload_parts WHERE volume = ? AND session = ?
             ORDER BY part",
        )
        .bind(self.volume())
        .bind(session)
        .fetch_all(pool)
        .await
        .map_err(db)?
        .iter()
        .map(|p| (p.get::<i64, _>(0) as u32, p.get::<String, _>(1)))
        .collect();
        Ok(Some(Upload {
            bucket: r.get(0),
            key: r.get(1),
            upload_id: r.get(2),
            base: r.get::<i64, _>(3) as u64,
            part_size: r.get::<i64, _>(4) as u64,
            parts,
            part_base: r.get::<i64, _>(5) as u32,
            shared: r.get::<i64, _>(6) != 0,
        }))
    }

    pub(super) async fn create(
        &self,
        session: &str,
        bucket: &str,
        key: &str,
        size: u64,
    ) -> Result<Upload> {
        // Parts of whole MiB, at least the configured size, few enough for S3's 10 000.
        let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
        let part_size = self.shared.cfg.part_size.max(needed);
        tokio::fs::create_dir_all(&self.shared.local_dir)
            .await
            .map_err(|e| local(&self.shared.local_dir, e))?;
        sqlx::query(
            "INSERT OR REPLACE INTO object_uploads
             (volume, session, bucket, key, upload_id, base, part_size, updated_at)
             VALUES (?, ?, ?, ?, NULL, 0, ?, ?)",
        )
        .bind(self.volume())
        .bind(session)
        .bind(bucket)
        .bind(key)
        .bind(part_size as i64)
        .bind(now())
        .execute(self.shared.state.pool())
        .await
        .map_err(db)?;
        Ok(Upload {
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id: None,
            base: 0,
            part_size,
            parts: Vec::new(),
            part_base: 0,
            shared: false,
        })
    }

    fn svc(&self, up: &Upload) -> String {
        format!("{} bucket {}", self.shared.service.kind(), up.bucket)
    }

    /// The multipart upload's id, made (and recorded) on its first part.
    async fn upload_id(&self, session: &str, up: &mut Upload) -> Result<String> {
        if let Some(id) = &up.upload_id {
            return Ok(id.clone());
        }
        let client = self.shared.service.bucket(&up.bucket)?;
        let path = parse_key(&up.key)?;
        let id = client
            .multipart
            .create_multipart(&path)
            .await
            .map_err(|e| super::service::store_err(&self.svc(up), &up.key, e))?;
        sqlx::query("UPDATE object_uploads SET upload_id = ? WHERE volume = ? AND session = ?")
            .bind(&id)
            .bind(self.volume())
            .bind(session)
            .execute(self.shared.state.pool())
            .await
            .map_err(db)?;
        up.upload_id = Some(id.clone());
        Ok(id)
    }

    /// Sends `data` as part `idx` of the upload; returns the part's content id.
    fn put_part(
        &self,
        up: &Upload,
        id: String,
        idx: usize,
        data: Bytes,
    ) -> impl Future<Output = Result<String>> + Send + 'static {
        let (client, svc, key) = (
            self.shared.service.bucket(&up.bucket),
            self.svc(up),
            up.key.clone(),
        );
        async move {
            let path = parse_key(&key)?;
            let part = client?
                .multipart
                .put_part(&path, &id, idx, payload(data))
                .await
                .map_err(|e| super::service::store_err(&svc, &key, e))?;
            Ok(part.content_id)
        }
    }

    /// Records part `idx` (the `len` bytes at `up.base`) as stored: the upload's base moves
    /// past it and its buffer goes.
    async fn record_part(
        &self,
        session: &str,
        up: &mut Upload,
        idx: usize,
        content_id: String,
        len: u64,
    ) -> Result<()> {
        let from = self.buffer(session, up.base);
        let next_base = up.base + len;
        let mut tx = self.shared.state.pool().begin().await.map_err(db)?;
        sqlx::query(
            "INSERT OR REPLACE INTO object_upload_parts (volume, session, part, content_id, size)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(self.volume())
        .bind(session)
        .bind(idx as i64)
        .bind(&content_id)
        .bind(len as i64)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "UPDATE object_uploads SET base = ?, updated_at = ? WHERE volume = ? AND session = ?",
        )
        .bind(next_base as i64)
        .bind(now())
        .bind(self.volume())
        .bind(session)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let _ = tokio::fs::remove_file(&from).await;
        up.parts.push((idx as u32, content_id));
        up.base = next_base;
        Ok(())
    }

    /// Sends the first `len` bytes of the buffer up as the next part, records it, and moves
    /// what follows them (after a whole-body write) into the next buffer.
    pub(super) async fn send_part(&self, session: &str, up: &mut Upload, len: u64) -> Result<()> {
        let from = self.buffer(session, up.base);
        let mut f = tokio::fs::File::open(&from)
            .await
            .map_err(|e| local(&from, e))?;
        let mut data = vec![0u8; len as usize];
        f.read_exact(&mut data).await.map_err(|e| local(&from, e))?;
        let id = self.upload_id(session, up).await?;
        let idx = up.part_base as usize + up.parts.len();
        let content_id = self.put_part(up, id, idx, Bytes::from(data)).await?;
        // The rest of the buffer (only after a whole-body write) starts the next one. A buffer
        // holding exactly the part leaves the next one alone: it may be the next part's.
        let whole = self.buffer_len(session, up.base).await;
        if whole > len {
            let to = self.buffer(session, up.base + len);
            f.seek(std::io::SeekFrom::Start(len))
                .await
                .map_err(|e| local(&from, e))?;
            let mut nf = tokio::fs::File::create(&to)
                .await
                .map_err(|e| local(&to, e))?;
            // Streamed (never read whole): at most a part follows, but memory stays flat anyway.
            tokio::io::copy(&mut f, &mut nf)
                .await
                .map_err(|e| local(&to, e))?;
            nf.sync_all().await.map_err(|e| local(&to, e))?;
        }
        self.record_part(session, up, idx, content_id, len).await
    }

    /// Starts sending the full buffer at `at` (after `ahead` others already on their way) as
    /// the next part but `ahead`, on a task of its own.
    async fn launch(
        &self,
        session: &str,
        up: &mut Upload,
        at: u64,
        ahead: usize,
    ) -> Result<Flight> {
        let id = self.upload_id(session, up).await?;
        let idx = up.part_base as usize + up.parts.len() + ahead;
        let path = self.buffer(session, at);
        let data = tokio::fs::read(&path).await.map_err(|e| local(&path, e))?;
        if data.len() as u64 != up.part_size {
            let why = format!(
                "a part is {} bytes, the buffer {}",
                up.part_size,
                data.len()
            );
            return Err(local(&path, std::io::Error::other(why)));
        }
        let task = tokio::spawn(self.put_part(up, id, idx, Bytes::from(data)));
        Ok(Flight { at, idx, task })
    }

    /// Waits for the oldest part on its way up and records it.
    async fn land(&self, session: &str, up: &mut Upload, flying: &mut Flights) -> Result<()> {
        let Some(f) = flying.0.pop_front() else {
            return Ok(());
        };
        if f.at != up.base {
            return Err(VolumeError::Internal(format!(
                "upload {session}: part at {} landed with the base at {}",
                f.at, up.base
            )));
        }
        let content_id = f
            .task
            .await
            .map_err(|e| VolumeError::Internal(format!("part upload task: {e}")))??;
        let len = up.part_size;
        self.record_part(session, up, f.idx, content_id, len).await
    }

    /// Puts the whole upload in place at its key (`put_in_place`), counts it in the vfolder's
    /// usage and forgets it.
    async fn complete(&self, vf: &VFolderId, session: &str, up: &mut Upload) -> Result<()> {
        let (size, replaced) = self.put_in_place(session, up).await?;
        self.count(vf, size, replaced).await;
        self.forget(session).await
    }

    /// A new object of `size` bytes in vfolder `vf`, in place of one of `replaced` bytes.
    pub(super) async fn count(&self, vf: &VFolderId, size: u64, replaced: Option<u64>) {
        let objects = if replaced.is_some() { 0 } else { 1 };
        let bytes = size as i64 - replaced.unwrap_or(0) as i64;
        if let Err(e) = self.shared.registry.add(vf, objects, bytes).await {
            tracing::warn!(error = %e, "cannot update usage counters after an upload");
        }
    }

    /// The whole upload at its key: the rest of the buffer as the last part and the multipart
    /// upload completed, or one PUT when it never needed a part. Returns its size and the size
    /// of the object it replaced.
    pub(super) async fn put_in_place(
        &self,
        session: &str,
        up: &mut Upload,
    ) -> Result<(u64, Option<u64>)> {
        while self.held(session, up).await > up.part_size {
            let part = up.part_size;
            self.send_part(session, up, part).await?;
        }
        let client = self.shared.service.bucket(&up.bucket)?;
        let path = object_store::path::Path::parse(&up.key)
            .map_err(|e| VolumeError::BadRequest(format!("{:?}: {e}", up.key)))?;
        let (svc, key) = (self.svc(up), up.key.clone());
        let err = |e: object_store::Error| super::service::store_err(&svc, &key, e);
        let replaced = match client.store.head(&path).await {
            Ok(m) => Some(m.size),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(err(e)),
        };
        let rest = self.held(session, up).await;
        let size = up.base + rest;
        match up.upload_id.clone() {
            None => {
                let from = self.buffer(session, up.base);
                let data = match tokio::fs::read(&from).await {
                    Ok(d) => d,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && rest == 0 => Vec::new(),
                    Err(e) => return Err(local(&from, e)),
                };
                client
                    .store
                    .put(&path, payload(Bytes::from(data)))
                    .await
                    .map_err(err)?;
            }
            Some(id) => {
                if rest > 0 {
                    self.send_part(session, up, rest).await?;
                }
                let parts = up
                    .parts
                    .iter()
                    .map(|(_, c)| PartId {
                        content_id: c.clone(),
                    })
                    .collect();
                if let Err(e) = client.multipart.complete_multipart(&path, &id, parts).await {
                    // Completed before a crash took its answer: S3 has forgotten the upload,
                    // Azure may refuse its blocks again; the object says whether it happened.
                    let ids: Vec<String> = up.parts.iter().map(|(_, c)| c.clone()).collect();
                    let done = replaced == Some(size)
                        && self
                            .shared
                            .service
                            .completed_from(&up.bucket, &up.key, &ids)
                            .await
                            .unwrap_or(false);
                    if !done {
                        return Err(err(e));
                    }
                    tracing::info!(session, key = %up.key, "the multipart upload was completed before a restart");
                }
            }
        }
        Ok((size, replaced))
    }

    /// Remembers the multipart upload a final upload's join copies into, so a join cut off is
    /// aborted by the next attempt, or by `sweep` when nobody comes back.
    pub(super) async fn record_join(
        &self,
        session: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO object_uploads
             (volume, session, bucket, key, upload_id, base, part_size, updated_at)
             VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
        )
        .bind(self.volume())
        .bind(session)
        .bind(bucket)
        .bind(key)
        .bind(upload_id)
        .bind(now())
        .execute(self.shared.state.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Drops what we keep about an upload (rows and buffers), not the service's side. The rows
    /// go together: an upload row left without its parts (a full disk failing the second
    /// statement) could never complete again. Buffers go after them; any a crash leaves
    /// behind belong to no row, and the next start removes those.
    pub(super) async fn forget(&self, session: &str) -> Result<()> {
        let mut tx = self.shared.state.pool().begin().await.map_err(db)?;
        for sql in [
            "DELETE FROM object_upload_parts WHERE volume = ? AND session = ?",
            "DELETE FROM object_uploads WHERE volume = ? AND session = ?",
        ] {
            sqlx::query(sql)
                .bind(self.volume())
                .bind(session)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        self.remove_buffers(session).await;
        Ok(())
    }
}

#[async_trait]
impl UploadStaging for ObjectStaging {
    fn can_concat(&self) -> bool {
        true
    }

    async fn concat(
        &self,
        vf: &VFolderId,
        session: &str,
        parts: &[(String, u64)],
        dst: &RelPath,
    ) -> Result<()> {
        self.join(vf, session, parts, dst).await
    }

    async fn seal(&self, _vf: &VFolderId, session: &str) -> Result<()> {
        self.seal_partial(session).await
    }

    fn max_atomic_write(&self) -> Option<u64> {
        // The configured part size: an upload's own parts are never smaller.
        Some(self.shared.cfg.part_size)
    }

    async fn truncate(&self, _vf: &VFolderId, session: &str, offset: u64) -> Result<u64> {
        let Some(up) = self.load(session).await? else {
            return if offset == 0 {
                Ok(0)
            } else {
                Err(lost(session, "no multipart upload recorded".into()))
            };
        };
        // Stored parts cannot be taken back: the upload resumes after them.
        let offset = if offset < up.base {
            tracing::info!(
                session,
                offset,
                kept = up.base,
                "parts already stored past the acknowledged offset are kept"
            );
            up.base
        } else {
            offset
        };
        let buffers = self.buffers(session, &up).await;
        let held: u64 = buffers.iter().map(|(_, len)| len).sum();
        if offset > up.base + held {
            return Err(lost(
                session,
                format!(
                    "the local buffers hold {held} bytes past {}, {offset} were acknowledged",
                    up.base
                ),
            ));
        }
        // The buffer the offset falls in is cut there; those after it go. A missing buffer
        // (an upload whose every byte is stored as parts) is left to the next write to make.
        for (at, len) in buffers {
            let path = self.buffer(session, at);
            if at > up.base && at >= offset {
                let _ = tokio::fs::remove_file(&path).await;
            } else if offset < at + len {
                let f = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .await
                    .map_err(|e| local(&path, e))?;
                f.set_len(offset - at).await.map_err(|e| local(&path, e))?;
                f.sync_all().await.map_err(|e| local(&path, e))?;
            }
        }
        Ok(offset)
    }

    async fn write(
        &self,
        vf: &VFolderId,
        session: &str,
        mut body: ByteStream,
        plan: WritePlan,
    ) -> Result<StagedWrite> {
        let (loc, entry) = self.shared.loc(vf).await?;
        if entry.read_only {
            return Err(VolumeError::ReadOnly(*vf));
        }
        let mut up = match self.load(session).await? {
            Some(u) => u,
            None if plan.offset == 0 => match &plan.partial {
                Some(p) => {
                    self.create_partial(session, &loc, &plan.dst, p, plan.size)
                        .await?
                }
                None => {
                    self.create(session, &loc.client.name, &loc.key(&plan.dst), plan.size)
                        .await?
                }
            },
            None => return Err(lost(session, "no multipart upload recorded".into())),
        };
        let held = up.base + self.held(session, &up).await;
        if plan.offset != held {
            let now_held = self.truncate(vf, session, plan.offset).await?;
            if now_held != plan.offset {
                return Err(lost(
                    session,
                    format!(
                        "the upload holds {held} bytes, the write starts at {}",
                        plan.offset
                    ),
                ));
            }
        }
        let open = |p: PathBuf| async move {
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .await
                .map_err(|e| local(&p, e))
        };
        // Whole parts left in the buffer by an earlier checksummed body go up first (they were
        // acknowledged), so a part's room below is never negative.
        while plan.offset - up.base >= up.part_size && plan.offset < plan.size {
            let part = up.part_size;
            self.send_part(session, &mut up, part).await?;
        }
        let mut file = open(self.buffer(session, up.base)).await?;
        // Where the buffer being filled starts: full ones before it are synced and on their
        // way up (`flying`, at most `parts-in-flight`) or stored.
        let mut at = up.base;
        let mut flying = Flights::default();
        let mut buffered = plan.offset - up.base;
        let atomic_cap = self.max_atomic_write().unwrap_or(u64::MAX);
        let mut written = 0u64;
        let mut body_error = None;
        let (mut ckpt_at, mut ckpt_bytes) = (Instant::now(), 0u64);
        let tick = plan
            .checkpoints
            .as_ref()
            .map(|c| c.every)
            .unwrap_or(std::time::Duration::from_secs(3600));
        loop {
            let next = match tokio::time::timeout(tick, body.next()).await {
                Ok(n) => n,
                Err(_) => Some(Ok(Bytes::new())), // a tick: a checkpoint may be due
            };
            let mut chunk = match next {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    body_error = Some(e);
                    break;
                }
                None => break,
            };
            if plan.atomic && written + chunk.len() as u64 > atomic_cap {
                // Cut away by the caller (truncate), like a checksum mismatch.
                return Err(VolumeError::AtomicTooLarge {
                    limit: atomic_cap,
                    why: "an object volume holds a checksummed body back in a local buffer \
                          until it is verified; send checksummed PATCHes of at most a part",
                });
            }
            while !chunk.is_empty() {
                let room = if plan.atomic {
                    chunk.len() as u64
                } else {
                    up.part_size - buffered
                };
                let n = room.min(chunk.len() as u64) as usize;
                let piece = chunk.split_to(n);
                let p = self.buffer(session, at);
                file.write_all(&piece).await.map_err(|e| local(&p, e))?;
                buffered += n as u64;
                written += n as u64;
                ckpt_bytes += n as u64;
                let more = plan.offset + written < plan.size;
                if !plan.atomic && buffered == up.part_size && more {
                    // Synced first: its bytes are acknowledged before the part is stored.
                    file.sync_all().await.map_err(|e| local(&p, e))?;
                    if flying.0.len() >= self.shared.cfg.parts_in_flight {
                        self.land(session, &mut up, &mut flying).await?;
                    }
                    let ahead = flying.0.len();
                    let flight = self.launch(session, &mut up, at, ahead).await?;
                    flying.0.push_back(flight);
                    at += up.part_size;
                    buffered = 0;
                    file = open(self.buffer(session, at)).await?;
                    if let Some(c) = &plan.checkpoints {
                        let _ = c.durable.send(at);
                    }
                    (ckpt_at, ckpt_bytes) = (Instant::now(), 0);
                }
            }
            if let Some(c) = &plan.checkpoints
                && ckpt_bytes > 0
                && (ckpt_at.elapsed() >= c.every || ckpt_bytes >= c.every_bytes)
            {
                let p = self.buffer(session, at);
                file.sync_data().await.map_err(|e| local(&p, e))?;
                let _ = c.durable.send(at + buffered);
                (ckpt_at, ckpt_bytes) = (Instant::now(), 0);
            }
        }
        let p = self.buffer(session, at);
        file.sync_all().await.map_err(|e| local(&p, e))?;
        drop(file);
        // Every part of this PATCH stored and recorded before it answers: at rest, an upload
        // holds one buffer.
        while !flying.0.is_empty() {
            self.land(session, &mut up, &mut flying).await?;
        }
        let finished =
            body_error.is_none() && plan.offset + written == plan.size && plan.finish_to.is_some();
        if finished {
            self.check_whole(session, &up, plan.size).await?;
            self.complete(vf, session, &mut up).await?;
        }
        Ok(StagedWrite {
            written,
            body_error,
            finished,
        })
    }

    async fn finish(&self, vf: &VFolderId, session: &str, dst: &RelPath, size: u64) -> Result<()> {
        let (loc, _) = self.shared.loc(vf).await?;
        let Some(mut up) = self.load(session).await? else {
            // Every write records its upload first, so no row means it was put in place and
            // forgotten before its done mark was recorded (a crash, a full state disk): the
            // object of its size says so. Never an empty object in its place.
            let (svc, key) = (
                format!("{} bucket {}", self.shared.service.kind(), loc.client.name),
                loc.key(dst),
            );
            let path = parse_key(&key)?;
            return match loc.client.store.head(&path).await {
                Ok(m) if m.size == size => Ok(()),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Err(lost(
                    session,
                    format!("no multipart upload recorded and no object of {size} bytes in place"),
                )),
                Err(e) => Err(super::service::store_err(&svc, &key, e)),
            };
        };
        if up.key != loc.key(dst) {
            return Err(VolumeError::Internal(format!(
                "upload {session} goes to {:?}, not {:?}",
                up.key,
                loc.key(dst)
            )));
        }
        self.check_whole(session, &up, size).await?;
        self.complete(vf, session, &mut up).await
    }

    async fn discard(&self, _vf: &VFolderId, session: &str) -> Result<()> {
        self.abort(session).await?;
        self.remove_scratch(session).await;
        // An upload made of partials: the multipart upload they shared goes with it.
        self.abort_shared(session).await
    }

    async fn sweep(&self, older_than: SystemTime) -> Result<usize> {
        let cutoff = older_than
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT session FROM object_uploads WHERE volume = ? AND updated_at < ?",
        )
        .bind(self.volume())
        .bind(cutoff)
        .fetch_all(self.shared.state.pool())
        .await
        .map_err(db)?;
        for s in &stale {
            self.abort(s).await?;
        }
        Ok(stale.len() + self.sweep_shared(cutoff).await?)
    }

    async fn remove_orphans(&self) -> Result<usize> {
        self.remove_orphan_buffers().await
    }
}

impl ObjectStaging {
    /// Aborts the service's multipart upload (its stored parts go) and forgets ours.
    pub(super) async fn abort(&self, session: &str) -> Result<()> {
        if let Some(up) = self.load(session).await?
            && !up.shared
            && let Some(id) = &up.upload_id
            && let Ok(client) = self.shared.service.bucket(&up.bucket)
            && let Ok(path) = object_store::path::Path::parse(&up.key)
            && let Err(e) = client.multipart.abort_multipart(&path, id).await
        {
            tracing::warn!(session, error = %e, "cannot abort a multipart upload (the service's lifecycle rules will)");
        }
        self.forget(session).await
    }
}
