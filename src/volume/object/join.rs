//! tus concatenation on object volumes: where partial uploads wait, and how the final upload
//! joins them at its key in one atomic step (a reader sees the old object or the whole new one).
//!
//! - **Azure** (`Partials::BlocksOfTheBlob`): a partial upload's parts are uncommitted blocks
//!   of the destination blob itself; the join sends each partial's buffered rest as one more
//!   block and commits all blocks, in the final upload's order, with one Put Block List. No
//!   byte is copied.
//! - **S3** (`Partials::CopiedParts`): a part number fixes a part's place, so a partial's parts
//!   can go straight into the destination's multipart upload only where the partial's place is
//!   known before the final upload names the order: its client declared it
//!   (`Storage-Agent-Partial-Offset`, which `ctl upload --streams` sends) at a whole number of
//!   parts, and it is whole parts long or ends the upload. Those partials share one multipart
//!   upload at the destination, numbered from their offset, and the join only sends their last
//!   parts and completes it: no byte is copied. Any other partial (tus-js-client's, whose
//!   partials are made all at once and so arrive in any order) is a multipart upload of its own
//!   that the join completes into an object outside every vfolder; the final is then a
//!   multipart upload whose parts are server-side copies of them (UploadPartCopy, up to 5 GiB
//!   each). S3 wants every part but the last at 5 MiB or more: a partial shorter than that is
//!   read and sent with the start of the next one (at most 5 MiB held in memory). The
//!   partials' objects go once the final upload is complete.
//!
//! A join cut off (kill -9, a service error) is repeated whole: partial objects already
//! completed stay, a half-copied final multipart upload is aborted and started again. If the
//! partials are all gone, the join did complete: the destination must then hold the total.

use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::multipart::PartId;

use sqlx::Row;

use super::files::{Loc, payload};
use super::service::Partials;
use super::staging::{MAX_PARTS, ObjectStaging, Upload, db, now};
use crate::config::object::Layout;
use crate::ids::VFolderId;
use crate::volume::{PartialOf, RelPath, Result, VolumeError};

fn unquote(etag: &str) -> &str {
    etag.trim_matches('"')
}

/// The ETag S3 gives an object made of these parts: the MD5 of their MD5s, then "-<count>".
/// None where a part's ETag is not an MD5 (a service that does otherwise).
fn multipart_etag(parts: &[PartId]) -> Option<String> {
    use md5::Digest;
    let mut all = Vec::with_capacity(parts.len() * 16);
    for p in parts {
        let hex = unquote(&p.content_id);
        if hex.len() != 32 {
            return None;
        }
        for i in (0..32).step_by(2) {
            all.push(u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()?);
        }
    }
    let sum = md5::Md5::digest(&all);
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{hex}-{}", parts.len()))
}

/// S3's smallest part but the last.
const MIN_PART: u64 = 5 << 20;
/// S3's largest part (and largest UploadPartCopy).
const MAX_PART: u64 = 5 << 30;

fn lost(what: String) -> VolumeError {
    VolumeError::Io {
        path: what,
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    }
}

pub(super) fn parse_key(key: &str) -> Result<object_store::path::Path> {
    object_store::path::Path::parse(key)
        .map_err(|e| VolumeError::BadRequest(format!("{key:?}: {e}")))
}

/// The multipart upload at a final upload's destination that its placed partials share.
struct SharedUpload {
    upload_id: String,
    part_size: u64,
}

impl ObjectStaging {
    /// The part size of an upload of `total` bytes made of partials: a power of two (so the
    /// offsets `ctl` cuts at are whole parts), at least the configured size (8 MiB for 5 MiB),
    /// few enough parts, at most 4 GiB (S3 takes 5).
    fn shared_part_size(&self, total: u64) -> u64 {
        let needed = total.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
        self.shared
            .cfg
            .part_size
            .max(needed)
            .next_power_of_two()
            .min(4 << 30)
    }

    /// The staging of a new partial upload (see the module's comment for where its bytes go).
    pub(super) async fn create_partial(
        &self,
        session: &str,
        loc: &Loc,
        dst: &RelPath,
        p: &PartialOf,
        size: u64,
    ) -> Result<Upload> {
        if self.shared.service.partials() == Partials::BlocksOfTheBlob {
            return self
                .create(session, &loc.client.name, &loc.key(dst), size)
                .await;
        }
        let ps = self.shared_part_size(p.total);
        if let Some(at) = p.at
            && size > 0
            && at.is_multiple_of(ps)
            && (size.is_multiple_of(ps) || at + size == p.total)
        {
            let key = loc.key(dst);
            let sh = self
                .shared_upload(&p.parent, &loc.client.name, &key, ps)
                .await?;
            let part_base = u32::try_from(at / ps)
                .map_err(|_| VolumeError::Internal("part index out of range".into()))?;
            // One statement: a row is a placed partial's from the start, or not there at all
            // (never one that would complete itself over the destination).
            sqlx::query(
                "INSERT OR REPLACE INTO object_uploads
                 (volume, session, bucket, key, upload_id, base, part_size, updated_at,
                  part_base, shared)
                 VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, 1)",
            )
            .bind(&self.shared.name)
            .bind(session)
            .bind(&loc.client.name)
            .bind(&key)
            .bind(&sh.upload_id)
            .bind(sh.part_size as i64)
            .bind(now())
            .bind(part_base as i64)
            .execute(self.shared.state.pool())
            .await
            .map_err(db)?;
            tokio::fs::create_dir_all(&self.shared.local_dir)
                .await
                .map_err(|e| super::staging::local(&self.shared.local_dir, e))?;
            return Ok(Upload {
                bucket: loc.client.name.clone(),
                key,
                upload_id: Some(sh.upload_id),
                base: 0,
                part_size: sh.part_size,
                parts: Vec::new(),
                part_base,
                shared: true,
            });
        }
        let (bucket, key) = self.scratch(session);
        if let Layout::BucketPerVFolder { .. } = self.shared.cfg.layout {
            self.scratch_bucket
                .get_or_try_init(|| async {
                    self.shared.service.create_bucket(&bucket).await.map(|_| ())
                })
                .await?;
        }
        self.create(session, &bucket, &key, size).await
    }

    /// The multipart upload `parent`'s placed partials share, made by the first of them.
    async fn shared_upload(
        &self,
        parent: &str,
        bucket: &str,
        key: &str,
        part_size: u64,
    ) -> Result<SharedUpload> {
        let _one_at_a_time = self.shared_lock.lock().await;
        if let Some(sh) = self.load_shared(parent).await? {
            return Ok(sh);
        }
        let client = self.shared.service.bucket(bucket)?;
        let upload_id = client
            .multipart
            .create_multipart(&parse_key(key)?)
            .await
            .map_err(|e| super::service::store_err(bucket, key, e))?;
        sqlx::query(
            "INSERT INTO object_shared_uploads
             (volume, parent, bucket, key, upload_id, part_size, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&self.shared.name)
        .bind(parent)
        .bind(bucket)
        .bind(key)
        .bind(&upload_id)
        .bind(part_size as i64)
        .bind(now())
        .execute(self.shared.state.pool())
        .await
        .map_err(db)?;
        Ok(SharedUpload {
            upload_id,
            part_size,
        })
    }

    async fn load_shared(&self, parent: &str) -> Result<Option<SharedUpload>> {
        let row = sqlx::query(
            "SELECT upload_id, part_size FROM object_shared_uploads WHERE volume = ? AND parent = ?",
        )
        .bind(&self.shared.name)
        .bind(parent)
        .fetch_optional(self.shared.state.pool())
        .await
        .map_err(db)?;
        Ok(row.map(|r| SharedUpload {
            upload_id: r.get(0),
            part_size: r.get::<i64, _>(1) as u64,
        }))
    }

    async fn forget_shared(&self, parent: &str) -> Result<()> {
        sqlx::query("DELETE FROM object_shared_uploads WHERE volume = ? AND parent = ?")
            .bind(&self.shared.name)
            .bind(parent)
            .execute(self.shared.state.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Aborts the multipart upload `parent`'s partials shared (the upload was terminated or
    /// expired), if there is one.
    pub(super) async fn abort_shared(&self, parent: &str) -> Result<()> {
        let row = sqlx::query(
            "SELECT bucket, key, upload_id FROM object_shared_uploads WHERE volume = ? AND parent = ?",
        )
        .bind(&self.shared.name)
        .bind(parent)
        .fetch_optional(self.shared.state.pool())
        .await
        .map_err(db)?;
        let Some(r) = row else { return Ok(()) };
        let (bucket, key, id): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if let (Ok(client), Ok(path)) = (self.shared.service.bucket(&bucket), parse_key(&key))
            && let Err(e) = client.multipart.abort_multipart(&path, &id).await
        {
            tracing::warn!(parent, error = %e, "cannot abort a shared multipart upload (the service's lifecycle rules will)");
        }
        self.forget_shared(parent).await
    }

    /// Shared multipart uploads no partial wrote to since `cutoff` (unix seconds): aborted.
    pub(super) async fn sweep_shared(&self, cutoff: i64) -> Result<usize> {
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT parent FROM object_shared_uploads s WHERE volume = ? AND updated_at < ?
             AND NOT EXISTS (SELECT 1 FROM object_uploads u WHERE u.volume = s.volume
                             AND u.shared = 1 AND u.updated_at >= ? AND u.session LIKE s.parent || '-%')",
        )
        .bind(&self.shared.name)
        .bind(cutoff)
        .bind(cutoff)
        .fetch_all(self.shared.state.pool())
        .await
        .map_err(db)?;
        for p in &stale {
            self.abort_shared(p).await?;
        }
        Ok(stale.len())
    }

    /// A complete partial upload's last bytes go up now: as its last part (a block on Azure, a
    /// part of the shared upload on S3), or, for an S3 partial of its own, by completing it into
    /// its object (the join then only copies).
    pub(super) async fn seal_partial(&self, session: &str) -> Result<()> {
        let Some(mut up) = self.load(session).await? else {
            return Ok(()); // sealed before (or empty, never written)
        };
        let own_object = self.shared.service.partials() == Partials::CopiedParts && !up.shared;
        if own_object {
            self.put_in_place(session, &mut up).await?;
            return self.forget(session).await;
        }
        self.send_rest(session, &mut up).await
    }

    /// An S3 partial upload's object: under `.storage-agent/partials/` of the shared bucket
    /// (vfolders are `<scope>/<vfolder>/` prefixes there), or in the volume's own
    /// `<bucket-prefix>partials` bucket (no vfolder's bucket, and refused for registration).
    fn scratch(&self, session: &str) -> (String, String) {
        match &self.shared.cfg.layout {
            Layout::PrefixPerVFolder { bucket } => {
                (bucket.clone(), format!(".storage-agent/partials/{session}"))
            }
            Layout::BucketPerVFolder { bucket_prefix } => {
                (format!("{bucket_prefix}partials"), session.to_string())
            }
        }
    }

    /// Removes an S3 partial upload's object, if the partial got that far (best effort: an
    /// object left behind is outside every vfolder).
    pub(super) async fn remove_scratch(&self, session: &str) {
        if self.shared.service.partials() != Partials::CopiedParts
            || !crate::upload::is_partial_session(session)
        {
            return;
        }
        let (bucket, key) = self.scratch(session);
        if let (Ok(client), Ok(path)) = (self.shared.service.bucket(&bucket), parse_key(&key)) {
            match client.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(session, error = %e, "cannot delete a partial upload's object")
                }
            }
        }
    }

    /// `UploadStaging::concat` for object volumes (see the module's comment).
    pub(super) async fn join(
        &self,
        vf: &VFolderId,
        session: &str,
        parts: &[(String, u64)],
        dst: &RelPath,
    ) -> Result<()> {
        let (loc, entry) = self.shared.loc(vf).await?;
        if entry.read_only {
            return Err(VolumeError::ReadOnly(*vf));
        }
        let total: u64 = parts.iter().map(|p| p.1).sum();
        let key = loc.key(dst);
        let client = self.shared.service.bucket(&loc.client.name)?;
        let path = parse_key(&key)?;
        let replaced = match client.store.head(&path).await {
            Ok(m) => Some(m.size),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(super::service::store_err(&loc.client.name, &key, e)),
        };
        let joined = match self.shared.service.partials() {
            Partials::BlocksOfTheBlob => self.join_blocks(&loc, parts, &key, &path).await?,
            Partials::CopiedParts => self.join_copies(&loc, session, parts, &key, &path).await?,
        };
        if joined {
            self.count(vf, total, replaced).await;
        } else if replaced != Some(total) {
            // Nothing left to join and nothing in place: the partials are lost.
            return Err(lost(format!("the partial uploads of {dst}")));
        }
        // (Not joined now but in place: a join before completed, and the crash came before its
        // cleanup. What it did not clean up goes now.)
        for (p, _) in parts {
            self.forget(p).await?;
            self.remove_scratch(p).await;
        }
        Ok(())
    }

    /// Azure: the partials' blocks committed in order. False when no partial is known any more.
    async fn join_blocks(
        &self,
        loc: &Loc,
        parts: &[(String, u64)],
        key: &str,
        path: &object_store::path::Path,
    ) -> Result<bool> {
        let mut blocks = Vec::new();
        let (mut written, mut gone) = (0, 0);
        for (p, size) in parts {
            written += usize::from(*size > 0);
            let Some(mut up) = self.load(p).await? else {
                gone += usize::from(*size > 0);
                continue;
            };
            if up.key != key {
                return Err(VolumeError::Internal(format!(
                    "partial upload {p} is for {:?}, not {key:?}",
                    up.key
                )));
            }
            self.send_rest(p, &mut up).await?;
            blocks.extend(up.parts.iter().map(|(_, c)| PartId {
                content_id: c.clone(),
            }));
        }
        if gone > 0 {
            return if gone == written {
                Ok(false)
            } else {
                Err(lost(format!("some partial uploads of {key}")))
            };
        }
        let client = self.shared.service.bucket(&loc.client.name)?;
        let err = |e| super::service::store_err(&loc.client.name, key, e);
        if blocks.is_empty() {
            client
                .store
                .put(path, payload(Bytes::new()))
                .await
                .map_err(err)?;
        } else {
            client
                .multipart
                .complete_multipart(path, &String::new(), blocks)
                .await
                .map_err(err)?;
        }
        Ok(true)
    }

    /// S3: each partial completed as an object of its own, then copied part by part into one
    /// multipart upload at `key`. False when no partial is known any more.
    async fn join_copies(
        &self,
        loc: &Loc,
        session: &str,
        parts: &[(String, u64)],
        key: &str,
        path: &object_store::path::Path,
    ) -> Result<bool> {
        let mut missing = 0;
        let mut placed = Vec::new();
        for (p, _) in parts {
            match self.load(p).await? {
                Some(up) if up.shared => placed.push((p.clone(), up)),
                Some(mut up) => {
                    if let Err(e) = self.put_in_place(p, &mut up).await {
                        // Completed already (by a seal or a join cut off before forgetting
                        // it)? Then its object is there, whole.
                        let (b, k) = self.scratch(p);
                        let whole = match self.shared.service.bucket(&b) {
                            Ok(c) => matches!(
                                c.store.head(&parse_key(&k)?).await,
                                Ok(m) if m.size == up.base + self.held(p, &up).await
                            ),
                            Err(_) => false,
                        };
                        if !whole {
                            return Err(e);
                        }
                    }
                    self.forget(p).await?;
                }
                None => {}
            }
        }
        if !placed.is_empty() {
            return self
                .join_placed(loc, session, parts, placed, key, path)
                .await;
        }
        // Are the partials' objects there (a join before may have used them up)?
        let mut sources = Vec::new();
        for (p, size) in parts.iter().filter(|p| p.1 > 0) {
            let (b, k) = self.scratch(p);
            let client = self.shared.service.bucket(&b)?;
            match client.store.head(&parse_key(&k)?).await {
                Ok(m) if m.size == *size => {}
                Ok(m) => {
                    return Err(VolumeError::Internal(format!(
                        "partial upload {p} holds {} bytes, not its {size}",
                        m.size
                    )));
                }
                Err(object_store::Error::NotFound { .. }) => missing += 1,
                Err(e) => return Err(super::service::store_err(&b, &k, e)),
            }
            sources.push((b, k, *size));
        }
        let all_empty = sources.is_empty();
        if missing > 0 {
            // Partials' objects go only after the final is complete: one gone means a join
            // before completed (and its cleanup was cut off).
            return Ok(false);
        }
        let client = self.shared.service.bucket(&loc.client.name)?;
        let err = |e| super::service::store_err(&loc.client.name, key, e);
        if all_empty {
            client
                .store
                .put(path, payload(Bytes::new()))
                .await
                .map_err(err)?;
            return Ok(true);
        }
        // A join cut off before left its multipart upload: it goes, this one starts clean.
        self.abort(session).await?;
        let id = client.multipart.create_multipart(path).await.map_err(err)?;
        self.record_join(session, &loc.client.name, key, &id)
            .await?;
        let mut done: Vec<PartId> = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let n = sources.len();
        for (i, (b, k, size)) in sources.iter().enumerate() {
            let last = i + 1 == n;
            let src = self.shared.service.bucket(b)?;
            let src_path = parse_key(k)?;
            let read = |from: u64, to: u64| {
                let (src, src_path) = (&src, &src_path);
                async move {
                    src.store
                        .get_range(src_path, from..to)
                        .await
                        .map_err(|e| super::service::store_err(b, k, e))
                }
            };
            let mut pos = 0;
            if !pending.is_empty() {
                let take = (MIN_PART - pending.len() as u64).min(*size);
                pending.extend_from_slice(&read(0, take).await?);
                pos = take;
                if pending.len() as u64 >= MIN_PART {
                    let data = Bytes::from(std::mem::take(&mut pending));
                    let part = client
                        .multipart
                        .put_part(path, &id, done.len(), payload(data))
                        .await
                        .map_err(err)?;
                    done.push(part);
                }
            }
            let rest = size - pos;
            if rest == 0 {
                continue;
            }
            if rest < MIN_PART && !last {
                pending.extend_from_slice(&read(pos, *size).await?);
                continue;
            }
            // Server-side copies of at most 5 GiB, evenly cut (so none is below 5 MiB).
            let pieces = rest.div_ceil(MAX_PART);
            let each = rest.div_ceil(pieces);
            let mut a = pos;
            while a < *size {
                let z = (a + each).min(*size);
                let number = u16::try_from(done.len() + 1)
                    .map_err(|_| VolumeError::Internal("more than 65535 parts".into()))?;
                let etag = self
                    .shared
                    .service
                    .copy_part((&loc.client.name, key), &id, number, (b, k), (a, z))
                    .await?;
                done.push(PartId { content_id: etag });
                a = z;
            }
        }
        if !pending.is_empty() {
            let data = Bytes::from(pending);
            let part = client
                .multipart
                .put_part(path, &id, done.len(), payload(data))
                .await
                .map_err(err)?;
            done.push(part);
        }
        client
            .multipart
            .complete_multipart(path, &id, done)
            .await
            .map_err(err)?;
        self.forget(session).await?;
        Ok(true)
    }

    /// S3, with partials placed in the destination's shared multipart upload: the partials in
    /// the final's order must follow their declared offsets; each placed one sends its last
    /// part, each other one is copied in as whole parts (server-side), and the shared upload
    /// is completed. A client that declared offsets and then named the partials otherwise is
    /// refused (nothing is lost: it may name them as declared).
    async fn join_placed(
        &self,
        loc: &Loc,
        session: &str,
        parts: &[(String, u64)],
        mut placed: Vec<(String, Upload)>,
        key: &str,
        path: &object_store::path::Path,
    ) -> Result<bool> {
        // Its record goes right after the completion, first of all: gone means completed.
        let Some(sh) = self.load_shared(session).await? else {
            return Ok(false);
        };
        let ps = sh.part_size;
        let disorder = |what: String| {
            VolumeError::BadRequest(format!(
                "the final upload must name the partial uploads in the order their declared \
                 offsets give ({what})"
            ))
        };
        let mut done: Vec<PartId> = Vec::new();
        let mut pos = 0u64;
        for (i, (p, size)) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if !size.is_multiple_of(ps) && !last {
                return Err(disorder(format!(
                    "partial {p} is not whole parts long and does not end the upload"
                )));
            }
            if let Some(at) = placed.iter().position(|(s, _)| s == p) {
                let (_, mut up) = placed.swap_remove(at);
                if u64::from(up.part_base) * ps != pos {
                    return Err(disorder(format!(
                        "partial {p} was declared at byte {}, it comes at {pos}",
                        u64::from(up.part_base) * ps
                    )));
                }
                self.send_rest(p, &mut up).await?;
                for (k, (idx, content_id)) in up.parts.iter().enumerate() {
                    if *idx as usize != done.len() || *idx != up.part_base + k as u32 {
                        return Err(VolumeError::Internal(format!(
                            "partial {p}: part {idx} is not where its offset puts it"
                        )));
                    }
                    done.push(PartId {
                        content_id: content_id.clone(),
                    });
                }
            } else if *size > 0 {
                // Its own object, copied in as whole parts where the parts before end.
                let (b, k) = self.scratch(p);
                let mut a = 0;
                while a < *size {
                    let z = (a + ps).min(*size);
                    let number = u16::try_from(done.len() + 1)
                        .map_err(|_| VolumeError::Internal("more than 65535 parts".into()))?;
                    let etag = self
                        .shared
                        .service
                        .copy_part(
                            (&loc.client.name, key),
                            &sh.upload_id,
                            number,
                            (&b, &k),
                            (a, z),
                        )
                        .await?;
                    done.push(PartId { content_id: etag });
                    a = z;
                }
            }
            pos += size;
        }
        let client = self.shared.service.bucket(&loc.client.name)?;
        let err = |e| super::service::store_err(&loc.client.name, key, e);
        let expected = multipart_etag(&done);
        if let Err(e) = client
            .multipart
            .complete_multipart(path, &sh.upload_id, done)
            .await
        {
            // Completed by a join before, whose end was not recorded (the upload id is gone
            // then): the destination is exactly that object, as its ETag (made from its parts'
            // ETags) proves.
            match (client.store.head(path).await, expected) {
                (Ok(m), Some(want)) if m.e_tag.as_deref().map(unquote) == Some(want.as_str()) => {}
                _ => return Err(err(e)),
            }
        }
        self.forget_shared(session).await?;
        Ok(true)
    }
}
