//! A vfolder's files as objects: keys are `<prefix><relative path>`, directories are common
//! prefixes or zero-byte `dir/` markers. Listings, stat, mkdir, moves (copy, then delete),
//! deletes, walks for archives, ranged reads and recounts.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use object_store::list::PaginatedListOptions;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStoreExt, PutPayload};
use tokio_util::task::AbortOnDropHandle;

use super::service::{BucketClient, Service, store_err};
use crate::volume::{
    ByteStream, DirEntry, EntryKind, EntryStat, Listing, Progress, ReadHandle, RelPath, Result,
    TreeUsage, VolumeError, WalkEntry,
};

/// Bytes per GET when reading: each request finishes quickly whatever the client's pace, and
/// at most this much (times the read-ahead) is in memory per stream.
const READ_CHUNK: u64 = 8 << 20;
/// Keys per delete request (S3's DeleteObjects takes 1000).
const DELETE_BATCH: usize = 1000;

/// Where one vfolder's objects are.
#[derive(Clone)]
pub struct Loc {
    pub client: BucketClient,
    /// "" or ending with "/".
    pub prefix: String,
    pub service: Arc<dyn Service>,
}

fn enoent(p: &RelPath) -> VolumeError {
    VolumeError::io(p, io::Error::from_raw_os_error(libc::ENOENT))
}

fn errno(p: &RelPath, code: i32) -> VolumeError {
    VolumeError::io(p, io::Error::from_raw_os_error(code))
}

/// Nanoseconds since the epoch, for times and ETag-style comparisons.
fn nanos(t: SystemTime) -> i128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

pub fn file_stat(meta: &ObjectMeta) -> EntryStat {
    let t: SystemTime = meta.last_modified.into();
    EntryStat {
        kind: EntryKind::File,
        mode: libc::S_IFREG | 0o644,
        size: meta.size,
        created: t,
        modified: t,
        mtime_nanos: nanos(t),
        etag: meta.e_tag.clone(),
    }
}

pub fn dir_stat(modified: Option<SystemTime>) -> EntryStat {
    let t = modified.unwrap_or(SystemTime::UNIX_EPOCH);
    EntryStat {
        kind: EntryKind::Directory,
        mode: libc::S_IFDIR | 0o755,
        size: 0,
        created: t,
        modified: t,
        mtime_nanos: nanos(t),
        etag: None,
    }
}

impl Loc {
    fn svc(&self) -> String {
        format!("{} bucket {}", self.service.kind(), self.client.name)
    }

    /// The object key of a path ("" for the root with no prefix).
    pub fn key(&self, p: &RelPath) -> String {
        if p.is_root() {
            self.prefix.trim_end_matches('/').to_string()
        } else {
            format!("{}{p}", self.prefix)
        }
    }

    /// The key prefix of everything under directory `p` ("" or ending with "/").
    pub fn dir_prefix(&self, p: &RelPath) -> String {
        if p.is_root() {
            self.prefix.clone()
        } else {
            format!("{}{p}/", self.prefix)
        }
    }

    fn path(&self, key: &str) -> Result<ObjPath> {
        ObjPath::parse(key)
            .map_err(|e| VolumeError::BadRequest(format!("{key:?} cannot be an object key: {e}")))
    }

    fn err(&self, key: &str, e: object_store::Error) -> VolumeError {
        store_err(&self.svc(), key, e)
    }

    /// The part of a key below `base` (a directory prefix).
    fn rel_of(base: &str, key: &str) -> Option<RelPath> {
        key.strip_prefix(base)
            .filter(|r| !r.is_empty())
            .and_then(|r| RelPath::parse(r).ok())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        if key.is_empty() {
            return Ok(None);
        }
        match self.client.store.head(&self.path(key)?).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    /// Whether anything lives below the directory prefix. Pages are followed while they come
    /// back empty: a service may drop the prefix's own marker from a page (Azure does).
    async fn has_children(&self, dir_prefix: &str) -> Result<bool> {
        let mut token = None;
        loop {
            let page = self
                .client
                .pages
                .list_paginated(
                    Some(dir_prefix),
                    PaginatedListOptions {
                        max_keys: Some(2),
                        page_token: token.take(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.err(dir_prefix, e))?;
            if !page.result.objects.is_empty() || !page.result.common_prefixes.is_empty() {
                return Ok(true);
            }
            match page.page_token {
                Some(t) => token = Some(t),
                None => return Ok(false),
            }
        }
    }

    pub async fn stat(&self, p: &RelPath) -> Result<EntryStat> {
        if p.is_root() {
            return Ok(dir_stat(None));
        }
        let key = self.key(p);
        if let Some(m) = self.head(&key).await? {
            // A zero-byte object with children is a directory's marker seen without its '/'.
            if m.size > 0 || !self.has_children(&format!("{key}/")).await? {
                return Ok(file_stat(&m));
            }
            return Ok(dir_stat(Some(m.last_modified.into())));
        }
        let below = format!("{key}/");
        if self.has_children(&below).await?
            || self
                .service
                .dir_marker_exists(&self.client.name, &below)
                .await?
        {
            return Ok(dir_stat(None));
        }
        Err(enoent(p))
    }

    pub async fn list(&self, dir: &RelPath, limit: usize) -> Result<Listing> {
        let base = self.dir_prefix(dir);
        let mut items = Vec::new();
        let mut names = HashSet::new();
        let mut token = None;
        let mut truncated = false;
        let mut saw_anything = false;
        'pages: loop {
            let page = self
                .client
                .pages
                .list_paginated(
                    (!base.is_empty()).then_some(base.as_str()),
                    PaginatedListOptions {
                        delimiter: Some("/".into()),
                        max_keys: Some(1000),
                        page_token: token.take(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.err(&base, e))?;
            let mut found = Vec::new();
            for d in &page.result.common_prefixes {
                saw_anything = true;
                if let Some(name) = d.as_ref().strip_prefix(base.as_str()) {
                    found.push((name.to_string(), dir_stat(None)));
                }
            }
            for o in &page.result.objects {
                saw_anything = true;
                let key = o.location.as_ref();
                // The directory's own marker ("dir/" shows as "dir").
                if format!("{key}/") == base {
                    continue;
                }
                if let Some(name) = key.strip_prefix(base.as_str()) {
                    found.push((name.to_string(), file_stat(o)));
                }
            }
            for (name, stat) in found {
                if name.is_empty() || name.contains('/') || !names.insert(name.clone()) {
                    continue;
                }
                if limit > 0 && items.len() >= limit {
                    truncated = true;
                    break 'pages;
                }
                items.push(DirEntry {
                    name,
                    stat,
                    symlink_target: String::new(),
                });
            }
            match page.page_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        if !saw_anything && !dir.is_root() {
            // Nothing below it: a file (ENOTDIR), an empty directory's marker, or nothing.
            return match self.stat(dir).await {
                Ok(st) if st.kind == EntryKind::Directory => Ok(Listing { items, truncated }),
                Ok(_) => Err(errno(dir, libc::ENOTDIR)),
                Err(e) => Err(e),
            };
        }
        Ok(Listing { items, truncated })
    }

    pub async fn mkdir(&self, p: &RelPath, parents: bool, exist_ok: bool) -> Result<bool> {
        match self.stat(p).await {
            Ok(st) if st.kind == EntryKind::Directory && exist_ok => return Ok(false),
            Ok(_) => return Err(errno(p, libc::EEXIST)),
            Err(VolumeError::Io { ref source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        if let Some((parent, _)) = p.split_last() {
            match self.stat(&parent).await {
                Ok(st) if st.kind == EntryKind::Directory => {}
                Ok(_) => return Err(errno(&parent, libc::ENOTDIR)),
                Err(_) if parents => {}
                Err(e) => return Err(e),
            }
        }
        let marker = format!("{}/", self.key(p));
        self.service
            .put_dir_marker(&self.client.name, &marker)
            .await?;
        Ok(true)
    }

    /// Every object below a directory prefix (recursive), in key order.
    pub fn list_all(&self, dir_prefix: &str) -> BoxStream<'static, Result<ObjectMeta>> {
        let svc = self.svc();
        let base = dir_prefix.to_string();
        let prefix = ObjPath::parse(dir_prefix.trim_end_matches('/')).ok();
        let raw = match (&prefix, dir_prefix.is_empty()) {
            (_, true) => self.client.store.list(None),
            (Some(p), false) => self.client.store.list(Some(p)),
            (None, false) => {
                return stream::once(async move {
                    Err(VolumeError::BadRequest(format!(
                        "{base:?} is not a valid prefix"
                    )))
                })
                .boxed();
            }
        };
        raw.map_err(move |e| store_err(&svc, &base, e)).boxed()
    }

    /// Objects and bytes below the vfolder root, counted from a full listing.
    pub async fn recount(&self) -> Result<TreeUsage> {
        let mut u = TreeUsage::default();
        let mut all = self.list_all(&self.prefix);
        while let Some(m) = all.try_next().await? {
            u.file_count += 1;
            u.used_bytes += m.size;
        }
        Ok(u)
    }

    /// Deletes listed objects in one batch; returns how many went. A zero-byte one may be a
    /// directory marker (`key/`, listed without its '/'), which goes too.
    pub async fn delete_objects(&self, metas: Vec<ObjectMeta>) -> Result<u64> {
        let n = metas.len() as u64;
        let svc = self.svc();
        let markers: Vec<String> = metas
            .iter()
            .filter(|m| m.size == 0)
            .map(|m| format!("{}/", m.location))
            .collect();
        let mut results = self
            .client
            .store
            .delete_stream(stream::iter(metas.into_iter().map(|m| Ok(m.location))).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(&svc, "", e)),
            }
        }
        for m in markers {
            self.service
                .delete_dir_marker(&self.client.name, &m)
                .await?;
        }
        Ok(n)
    }

    /// Deletes everything below a directory prefix (its own marker too); returns (objects,
    /// bytes) removed.
    pub async fn delete_prefix(&self, dir_prefix: &str, progress: &Progress) -> Result<(u64, u64)> {
        let (mut objects, mut bytes) = (0u64, 0u64);
        let mut all = self.list_all(dir_prefix);
        let mut batch = Vec::with_capacity(DELETE_BATCH);
        loop {
            let next = all.try_next().await?;
            if let Some(m) = next.clone() {
                bytes += m.size;
                batch.push(m);
            }
            if batch.len() >= DELETE_BATCH || (next.is_none() && !batch.is_empty()) {
                let n = self.delete_objects(std::mem::take(&mut batch)).await?;
                objects += n;
                if !progress.advance(n) {
                    return Err(VolumeError::Cancelled);
                }
            }
            if next.is_none() {
                break;
            }
        }
        if !dir_prefix.is_empty() {
            self.service
                .delete_dir_marker(&self.client.name, dir_prefix)
                .await?;
        }
        Ok((objects, bytes))
    }

    /// One object (file) or a whole directory; returns (objects, bytes) removed. A directory
    /// with anything in it needs `recursive` (ENOTEMPTY otherwise).
    pub async fn delete(
        &self,
        p: &RelPath,
        recursive: bool,
        progress: &Progress,
    ) -> Result<(u64, u64)> {
        if p.is_root() {
            return Err(errno(p, libc::EBUSY));
        }
        let st = match self.stat(p).await {
            Ok(st) => st,
            Err(VolumeError::Io { ref source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                return Ok((0, 0));
            }
            Err(e) => return Err(e),
        };
        let key = self.key(p);
        if st.kind == EntryKind::File {
            let meta = self.head(&key).await?.ok_or_else(|| enoent(p))?;
            self.delete_objects(vec![meta]).await?;
            return Ok((1, st.size));
        }
        let prefix = format!("{key}/");
        if !recursive && self.has_children(&prefix).await? {
            // Only its own marker inside is still empty.
            let listing = self.list(p, 1).await?;
            if !listing.items.is_empty() {
                return Err(errno(p, libc::ENOTEMPTY));
            }
        }
        self.delete_prefix(&prefix, progress).await
    }

    /// Copies one object to `dst_key`, within the bucket or across buckets of the service.
    pub async fn copy_object(&self, meta: &ObjectMeta, to: &Loc, dst_key: &str) -> Result<()> {
        let src_key = meta.location.as_ref();
        let copied = if to.client.name == self.client.name {
            self.client
                .store
                .copy(&meta.location, &to.path(dst_key)?)
                .await
                .map(|_| true)
                .map_err(|e| self.err(src_key, e))
        } else {
            self.service
                .copy_across(
                    (&self.client.name, src_key),
                    (&to.client.name, dst_key),
                    meta.size,
                )
                .await
        };
        match copied {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // Listed without its '/', a directory marker is not there under its name.
            Err(VolumeError::Io { ref source, .. })
                if meta.size == 0 && source.raw_os_error() == Some(libc::ENOENT) =>
            {
                return self
                    .service
                    .put_dir_marker(&to.client.name, &format!("{dst_key}/"))
                    .await;
            }
            Err(e) => return Err(e),
        }
        // Too large for one copy request: through us, part by part.
        let upload = to
            .client
            .store
            .put_multipart(&to.path(dst_key)?)
            .await
            .map_err(|e| to.err(dst_key, e))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, READ_CHUNK as usize);
        let mut body = self
            .client
            .store
            .get(&meta.location)
            .await
            .map_err(|e| self.err(src_key, e))?
            .into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.err(src_key, e))?;
            w.wait_for_capacity(2)
                .await
                .map_err(|e| to.err(dst_key, e))?;
            w.put(chunk);
        }
        w.finish().await.map_err(|e| to.err(dst_key, e))?;
        Ok(())
    }

    /// Moves `src` to `dst` (copy, then delete), a file or a whole directory.
    pub async fn move_to(&self, src: &RelPath, dst: &RelPath, progress: &Progress) -> Result<()> {
        let st = self.stat(src).await?;
        let (skey, dkey) = (self.key(src), self.key(dst));
        if st.kind == EntryKind::File {
            let meta = self.head(&skey).await?.ok_or_else(|| enoent(src))?;
            self.copy_object(&meta, self, &dkey).await?;
            self.delete_objects(vec![meta]).await?;
            progress.advance(1);
            return Ok(());
        }
        let (sp, dp) = (format!("{skey}/"), format!("{dkey}/"));
        if dp.starts_with(&sp) {
            return Err(errno(dst, libc::EINVAL));
        }
        // The destination directory exists even when the source is empty.
        self.service.put_dir_marker(&self.client.name, &dp).await?;
        let mut all = self.list_all(&sp);
        let mut moved = Vec::new();
        while let Some(m) = all.try_next().await? {
            // The source's own marker ("dir/" listed as "dir") goes with the rest.
            if let Some(rest) = m.location.as_ref().strip_prefix(sp.as_str()) {
                self.copy_object(&m, self, &format!("{dp}{rest}")).await?;
            }
            moved.push(m);
            if moved.len() >= DELETE_BATCH {
                self.delete_objects(std::mem::take(&mut moved)).await?;
            }
            if !progress.advance(1) {
                return Err(VolumeError::Cancelled);
            }
        }
        self.delete_objects(moved).await?;
        self.service.delete_dir_marker(&self.client.name, &sp).await
    }

    pub async fn open_read(&self, p: &RelPath) -> Result<Box<dyn ReadHandle>> {
        let key = self.key(p);
        let st = self.stat(p).await?;
        if st.kind != EntryKind::File {
            return Err(errno(p, libc::EISDIR));
        }
        Ok(Box::new(ObjectRead {
            loc: self.clone(),
            path: self.path(&key)?,
            stat: st,
        }))
    }

    /// Every entry under `dir`, directories before their contents (a directory appears the
    /// first time a key below it does, or from its marker), in key order.
    pub async fn walk(&self, dir: &RelPath) -> Result<BoxStream<'static, io::Result<WalkEntry>>> {
        let st = self.stat(dir).await?;
        if st.kind != EntryKind::Directory {
            return Err(errno(dir, libc::ENOTDIR));
        }
        let base = self.dir_prefix(dir);
        let objects = self.list_all(&base);
        let state = WalkState {
            base,
            emitted: HashSet::new(),
            held: None,
            pending: Vec::new(),
        };
        let loc = self.clone();
        Ok(stream::unfold(
            (objects, state, false),
            move |(mut objects, mut st, mut done)| {
                let loc = loc.clone();
                async move {
                    loop {
                        if let Some(e) = st.pending.pop() {
                            return Some((Ok(e), (objects, st, done)));
                        }
                        if done {
                            return None;
                        }
                        let next = match objects.next().await {
                            Some(Ok(m)) => Some(m),
                            Some(Err(e)) => {
                                let e = io::Error::other(e.to_string());
                                return Some((Err(e), (objects, st, true)));
                            }
                            None => {
                                done = true;
                                None
                            }
                        };
                        let held_is_dir = match st.held_is_dir(next.as_ref()) {
                            Some(known) => known,
                            // Nothing below it follows: a marker ("dir/") or an empty file.
                            None => match &st.held {
                                Some(h) => match loc.head(h.location.as_ref()).await {
                                    Ok(found) => found.is_none(),
                                    Err(e) => {
                                        let e = io::Error::other(e.to_string());
                                        return Some((Err(e), (objects, st, true)));
                                    }
                                },
                                None => false,
                            },
                        };
                        st.take(next, held_is_dir);
                    }
                }
            },
        )
        .boxed())
    }
}

/// Turns a key-ordered listing into walk entries. A zero-byte object is held back until the
/// next key shows whether it is a directory's marker (keys below it follow) or an empty file.
struct WalkState {
    base: String,
    emitted: HashSet<String>,
    held: Option<ObjectMeta>,
    /// Entries ready to go, last first.
    pending: Vec<WalkEntry>,
}

impl WalkState {
    /// Whether the held zero-byte object is a directory, when `next` tells (keys below it).
    fn held_is_dir(&self, next: Option<&ObjectMeta>) -> Option<bool> {
        let h = self.held.as_ref()?;
        let below = format!("{}/", h.location);
        next.filter(|n| n.location.as_ref().starts_with(&below))
            .map(|_| true)
    }

    fn take(&mut self, next: Option<ObjectMeta>, held_is_dir: bool) {
        let mut out = Vec::new();
        if let Some(h) = self.held.take() {
            let key = h.location.as_ref().to_string();
            if held_is_dir {
                self.dirs_for(&format!("{key}/"), Some(h.last_modified.into()), &mut out);
            } else {
                self.file(&h, &mut out);
            }
        }
        if let Some(m) = next {
            if m.size == 0 {
                self.held = Some(m);
            } else {
                self.file(&m, &mut out);
            }
        }
        out.reverse();
        self.pending = out;
    }

    /// The directories on the way to `key` not emitted yet, outermost first.
    fn dirs_for(&mut self, key: &str, modified: Option<SystemTime>, out: &mut Vec<WalkEntry>) {
        let Some(rest) = key.strip_prefix(&self.base) else {
            return;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut acc = String::new();
        for (i, part) in parts.iter().enumerate().take(parts.len().saturating_sub(1)) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.emitted.insert(acc.clone())
                && let Ok(rel) = RelPath::parse(&acc)
            {
                let last = i + 2 == parts.len();
                out.push(WalkEntry {
                    rel,
                    stat: dir_stat(if last { modified } else { None }),
                    link_target: None,
                });
            }
        }
    }

    fn file(&mut self, m: &ObjectMeta, out: &mut Vec<WalkEntry>) {
        let key = m.location.as_ref();
        self.dirs_for(key, None, out);
        if let Some(rel) = Loc::rel_of(&self.base, key) {
            out.push(WalkEntry {
                rel,
                stat: file_stat(m),
                link_target: None,
            });
        }
    }
}

/// Ranged reads of one object, pinned to the ETag seen when it was opened: an object replaced
/// meanwhile fails the read instead of mixing two versions.
struct ObjectRead {
    loc: Loc,
    path: ObjPath,
    stat: EntryStat,
}

impl ReadHandle for ObjectRead {
    fn stat(&self) -> &EntryStat {
        &self.stat
    }

    fn read_range(&self, start: u64, end: u64) -> ByteStream {
        let (loc, path, etag) = (self.loc.clone(), self.path.clone(), self.stat.etag.clone());
        let chunks: Vec<(u64, u64)> = (start..end)
            .step_by(READ_CHUNK as usize)
            .map(|s| (s, (s + READ_CHUNK).min(end)))
            .collect();
        stream::iter(chunks)
            .map(move |(s, e)| {
                let (loc, path, etag) = (loc.clone(), path.clone(), etag.clone());
                async move {
                    let opts = GetOptions {
                        range: Some(GetRange::Bounded(s..e)),
                        if_match: etag,
                        ..Default::default()
                    };
                    let read = async {
                        let r = tokio::time::timeout(
                            Duration::from_secs(300),
                            loc.client.store.get_opts(&path, opts),
                        )
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "object read timed out")
                        })?
                        .map_err(|e| io::Error::other(e.to_string()))?;
                        r.bytes().await.map_err(|e| io::Error::other(e.to_string()))
                    };
                    // Past the headers the client only sees its connection cut: say why here.
                    read.await.inspect_err(|e| {
                        tracing::warn!(object = %path, offset = s, error = %e, "an object read failed mid-response; the client's connection is cut");
                    })
                }
            })
            // Each read runs on a task of its own: the one read ahead must not wait for a slow
            // client to take the one before, or its request timeout runs out while nothing
            // reads its body (the soak saw downloads cut at read boundaries). Dropped with the
            // stream when the client goes.
            .map(|read| AbortOnDropHandle::new(tokio::spawn(read)))
            .buffered(2)
            .map(|joined| joined.unwrap_or_else(|e| Err(io::Error::other(e))))
            .boxed()
    }
}

/// A payload from bytes already in memory.
pub fn payload(b: bytes::Bytes) -> PutPayload {
    PutPayload::from(b)
}
