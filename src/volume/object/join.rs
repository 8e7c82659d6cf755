//! tus concatenation on object volumes: where partial uploads wait, and how the final upload
//! joins them at its key in one atomic step (a reader sees the old object or the whole new one).
//!
//! - **Azure** (`Partials::BlocksOfTheBlob`): a partial upload's parts are uncommitted blocks
//!   of the destination blob itself; the join sends each partial's buffered rest as one more
//!   block and commits all blocks, in the final upload's order, with one Put Block List. No
//!   byte is copied.
//! - **S3** (`Partials::CopiedParts`): a part number fixes a part's place, and partials are
//!   numbered before the final upload names their order (tus-js-client creates them all at
//!   once, so they arrive in any order). So each partial is a multipart upload of its own that
//!   the join completes into an object outside every vfolder; the final is one multipart upload
//!   whose parts are server-side copies of them (UploadPartCopy, up to 5 GiB each). S3 wants
//!   every part but the last at 5 MiB or more: a partial shorter than that is read and sent
//!   with the start of the next one (at most 5 MiB held in memory). The partials' objects go
//!   once the final upload is complete.
//!
//! A join cut off (kill -9, a service error) is repeated whole: partial objects already
//! completed stay, a half-copied final multipart upload is aborted and started again. If the
//! partials are all gone, the join did complete: the destination must then hold the total.

use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::multipart::PartId;

use super::files::{Loc, payload};
use super::service::Partials;
use super::staging::ObjectStaging;
use crate::config::object::Layout;
use crate::ids::VFolderId;
use crate::volume::{RelPath, Result, VolumeError};

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

fn parse_key(key: &str) -> Result<object_store::path::Path> {
    object_store::path::Path::parse(key)
        .map_err(|e| VolumeError::BadRequest(format!("{key:?}: {e}")))
}

impl ObjectStaging {
    /// Where a partial upload's bytes go (bucket, key): the destination blob (Azure), or its own
    /// object outside every vfolder (S3).
    pub(super) async fn partial_target(
        &self,
        loc: &Loc,
        session: &str,
        dst: &RelPath,
    ) -> Result<(String, String)> {
        match self.shared.service.partials() {
            Partials::BlocksOfTheBlob => Ok((loc.client.name.clone(), loc.key(dst))),
            Partials::CopiedParts => {
                let (bucket, key) = self.scratch(session);
                if let Layout::BucketPerVFolder { .. } = self.shared.cfg.layout {
                    self.scratch_bucket
                        .get_or_try_init(|| async {
                            self.shared.service.create_bucket(&bucket).await.map(|_| ())
                        })
                        .await?;
                }
                Ok((bucket, key))
            }
        }
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
        if !joined {
            // Nothing left to join: a join before completed (the crash came before it was
            // recorded), or the partials are lost.
            return if replaced == Some(total) {
                Ok(())
            } else {
                Err(lost(format!("the partial uploads of {dst}")))
            };
        }
        self.count(vf, total, replaced).await;
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
            let rest = self.buffer_len(p, up.base).await;
            if rest > 0 {
                self.send_part(p, &mut up, rest).await?;
            }
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
        let mut any = false;
        for (p, _) in parts {
            if let Some(mut up) = self.load(p).await? {
                self.put_in_place(p, &mut up).await?;
                self.forget(p).await?;
            }
        }
        // Are the partials' objects there (a join before may have used them up)?
        let mut sources = Vec::new();
        for (p, size) in parts.iter().filter(|p| p.1 > 0) {
            let (b, k) = self.scratch(p);
            let client = self.shared.service.bucket(&b)?;
            match client.store.head(&parse_key(&k)?).await {
                Ok(m) if m.size == *size => any = true,
                Ok(m) => {
                    return Err(VolumeError::Internal(format!(
                        "partial upload {p} holds {} bytes, not its {size}",
                        m.size
                    )));
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(super::service::store_err(&b, &k, e)),
            }
            sources.push((b, k, *size));
        }
        let all_empty = sources.is_empty();
        if !any && !all_empty {
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
}
