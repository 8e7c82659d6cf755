//! Volumes whose vfolders are objects in a remote service (`s3`): a bucket per vfolder (or a
//! prefix per vfolder in one bucket), registered buckets that stay their owner's, usage counters
//! kept by our writes and recounted by rescans, tus uploads as multipart uploads, and FUSE
//! mounts of buckets for session containers. The daemon talks to the service directly for the
//! APIs; nothing is mounted for them.

mod azure;
mod buffers;
mod files;
mod join;
mod registry;
mod s3;
mod sas;
pub mod service;
mod staging;

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

use crate::config::VolumeConfig;
use crate::config::object::{Layout, ObjectConfig};
use crate::ids::{QuotaScopeId, VFolderId};
use crate::state::State;
use crate::volume::mounts::SharedMounts;
use crate::volume::{
    EntryKind, EntryStat, FsUsage, HwInfo, Listing, MountInfo, MountSource, Presign, Progress,
    QuotaLimit, QuotaOps, QuotaUsage, ReadHandle, Registration, RelPath, Result, SharedAccess,
    TreeUsage, UploadStaging, Volume, VolumeError, VolumeStatus, WalkEntry, fsops,
};
use files::Loc;
use registry::{Entry, Registry};
use service::Service;

/// What the volume, its staging and its background work share.
pub struct Shared {
    name: String,
    service: Arc<dyn Service>,
    cfg: ObjectConfig,
    registry: Registry,
    state: State,
    /// Part buffers of uploads in progress.
    local_dir: PathBuf,
}

impl Shared {
    /// Where a vfolder's objects are, and what we know of it.
    async fn loc(&self, vf: &VFolderId) -> Result<(Loc, Entry)> {
        let e = self
            .registry
            .get(vf)
            .await?
            .ok_or(VolumeError::VFolderNotFound(*vf))?;
        Ok((self.loc_of(&e)?, e))
    }

    fn loc_of(&self, e: &Entry) -> Result<Loc> {
        Ok(Loc {
            client: self.service.bucket(&e.bucket)?,
            prefix: e.prefix.clone(),
            service: self.service.clone(),
        })
    }

    async fn writable(&self, vf: &VFolderId) -> Result<(Loc, Entry)> {
        let (loc, e) = self.loc(vf).await?;
        if e.read_only {
            return Err(VolumeError::ReadOnly(*vf));
        }
        Ok((loc, e))
    }

    async fn recount(&self, vf: &VFolderId) -> Result<TreeUsage> {
        let (loc, _) = self.loc(vf).await?;
        let u = loc.recount().await?;
        self.registry.set_counts(vf, u).await?;
        Ok(u)
    }
}

pub struct ObjectVolume {
    shared: Arc<Shared>,
    staging: staging::ObjectStaging,
    fuse: Arc<SharedMounts>,
    fsprefix: String,
}

/// An object-store volume for `c` (its `object` settings were checked by the config reader).
pub fn open(
    c: &VolumeConfig,
    state: &State,
    state_dir: &Path,
    fuse: Arc<SharedMounts>,
) -> Result<ObjectVolume> {
    let cfg = c
        .object
        .clone()
        .ok_or_else(|| VolumeError::Internal(format!("volume {}: no object settings", c.name)))?;
    let service = service_of(c, &cfg)?;
    let shared = Arc::new(Shared {
        name: c.name.clone(),
        registry: Registry::new(&c.name, state.clone()),
        state: state.clone(),
        local_dir: crate::config::object::local_dir(state_dir, &c.name),
        service,
        cfg,
    });
    Ok(ObjectVolume {
        staging: staging::ObjectStaging::new(shared.clone()),
        shared,
        fuse,
        fsprefix: c.fsprefix.clone(),
    })
}

fn service_of(c: &VolumeConfig, cfg: &ObjectConfig) -> Result<Arc<dyn Service>> {
    match c.backend.as_str() {
        "s3" => Ok(Arc::new(s3::S3::new(cfg)?)),
        "azure-blob" => Ok(Arc::new(azure::Azure::new(cfg)?)),
        other => Err(VolumeError::Internal(format!(
            "volume {}: {other} is not an object-store backend",
            c.name
        ))),
    }
}

/// The volume health check of an object-store volume: one signed request to the service.
struct ServiceProbe(Arc<dyn Service>);

#[async_trait]
impl crate::volume::health::RemoteProbe for ServiceProbe {
    async fn probe(&self) -> std::result::Result<(), String> {
        self.0.probe().await
    }
}

impl ObjectVolume {
    fn name_of_bucket(&self, vf: &VFolderId) -> (String, String) {
        match &self.shared.cfg.layout {
            Layout::BucketPerVFolder { bucket_prefix } => (
                format!("{bucket_prefix}{}", vf.folder.simple()),
                String::new(),
            ),
            Layout::PrefixPerVFolder { bucket } => {
                let qs = vf
                    .quota_scope
                    .map(|q| q.id.simple().to_string())
                    .unwrap_or_default();
                (bucket.clone(), format!("{qs}/{}/", vf.folder.simple()))
            }
        }
    }

    /// Registration must not make anyone else's objects yours (security review 2, G3): the
    /// daemon's keys reach every bucket, so it refuses the layout's own buckets (the shared
    /// bucket, and names it gives vfolders' buckets, in use or not) and any bucket and prefix
    /// that overlaps, either way, a vfolder of any volume here, managed or registered.
    async fn check_unowned(&self, bucket: &str, prefix: &str) -> Result<()> {
        let refuse = |why: String| Err(VolumeError::BadRequest(why));
        match &self.shared.cfg.layout {
            Layout::PrefixPerVFolder { bucket: shared } if shared == bucket => {
                return refuse(format!(
                    "bucket {bucket:?} holds this volume's vfolders: it cannot be registered"
                ));
            }
            Layout::BucketPerVFolder { bucket_prefix } => {
                let rest = bucket.strip_prefix(bucket_prefix.as_str()).unwrap_or("");
                // `<prefix>partials` holds partial uploads (tus concatenation) of every vfolder.
                if (rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
                    || (bucket.starts_with(bucket_prefix.as_str()) && rest == "partials")
                {
                    return refuse(format!(
                        "bucket {bucket:?} is named as this volume names vfolders' buckets: \
                         it cannot be registered"
                    ));
                }
            }
            Layout::PrefixPerVFolder { .. } => {}
        }
        let taken = self.shared.registry.prefixes_in(bucket).await?;
        if let Some(p) = taken
            .iter()
            .find(|p| p.starts_with(prefix) || prefix.starts_with(p.as_str()))
        {
            return refuse(format!(
                "bucket {bucket:?} at prefix {p:?} belongs to another vfolder, which would \
                 overlap this one"
            ));
        }
        Ok(())
    }

    /// A presigned upload goes around us, so its declared size counts at once (the token
    /// route checked the scope's quota for it just before); the next rescan reconciles it with
    /// what was really stored (security review 2, G6). Where the service cannot bind the
    /// length (Azure) the URL is refused on a scope with a limit.
    async fn charge_presigned_upload(&self, vf: &VFolderId, size: u64) -> Result<()> {
        if !self.shared.service.presign_binds_length()
            && let Some(qs) = vf.quota_scope.as_ref()
            && matches!(self.shared.registry.scope(qs).await?, Some(Some(_)))
        {
            return Err(VolumeError::BadRequest(format!(
                "quota scope {qs} has a limit, and a presigned {} upload URL cannot bind its \
                 length: upload through the tus endpoint instead",
                self.shared.service.kind()
            )));
        }
        self.shared.registry.add(vf, 0, size as i64).await
    }

    fn mount_key(&self, bucket: &str, read_only: bool) -> String {
        format!(
            "{}/{bucket}/{}",
            self.shared.name,
            if read_only { "ro" } else { "rw" }
        )
    }
}

impl std::fmt::Display for ObjectVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}({})",
            self.shared.service.kind(),
            self.shared.service.location()
        )
    }
}

#[async_trait]
impl QuotaOps for ObjectVolume {
    async fn usage(&self, qs: &QuotaScopeId) -> Result<QuotaUsage> {
        self.describe_quota_scope(qs)
            .await?
            .ok_or(VolumeError::QuotaScopeNotFound(*qs))
    }

    async fn set_limit(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        bytes_only(qs, limit)?;
        self.shared.registry.set_limit(qs, limit.bytes).await
    }
}

fn bytes_only(qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
    if limit.inodes.is_some() {
        return Err(VolumeError::InvalidQuota(format!(
            "{qs}: object-store volumes limit bytes, not inodes"
        )));
    }
    Ok(())
}

fn enoent_or<T>(r: Result<T>, fallback: impl FnOnce() -> Result<T>) -> Result<T> {
    match r {
        Err(VolumeError::Io { ref source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            fallback()
        }
        other => other,
    }
}

#[async_trait]
impl Volume for ObjectVolume {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn backend(&self) -> &'static str {
        self.shared.service.kind()
    }

    fn location(&self) -> String {
        self.shared.service.location()
    }

    fn fsprefix(&self) -> &str {
        &self.fsprefix
    }

    fn capabilities(&self) -> Vec<&'static str> {
        vec!["vfolder", "quota"]
    }

    fn health_target(&self) -> crate::volume::health::Target {
        crate::volume::health::Target::Remote(Arc::new(ServiceProbe(self.shared.service.clone())))
    }

    async fn hwinfo(&self) -> HwInfo {
        let mut metadata = BTreeMap::new();
        metadata.insert("backend".to_string(), self.backend().to_string());
        metadata.insert("endpoint".to_string(), self.shared.cfg.endpoint.clone());
        HwInfo {
            status: VolumeStatus::Healthy,
            status_info: None,
            metadata,
        }
    }

    async fn check_local_staging(&self) -> Result<()> {
        // What the new upload may hold (the parts in flight and the one filling, or two parts
        // of a checksummed body), and as much again kept free for SQLite beside them.
        let parts = (self.shared.cfg.parts_in_flight as u64 + 1).max(2);
        let needed = 2 * parts * self.shared.cfg.part_size;
        let dir = self.shared.local_dir.clone();
        let free = tokio::task::spawn_blocking(move || {
            let _ = std::fs::create_dir_all(&dir);
            nix::sys::statvfs::statvfs(&dir)
                .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
                .map_err(|e| VolumeError::Io {
                    path: dir.display().to_string(),
                    source: e.into(),
                })
        })
        .await
        .map_err(|e| VolumeError::Internal(format!("statvfs task: {e}")))??;
        if free < needed {
            return Err(VolumeError::SpaceExceeded {
                needed,
                available: free,
                used: None,
                limit: None,
            });
        }
        Ok(())
    }

    async fn fs_usage(&self) -> Result<FsUsage> {
        let used = self.shared.registry.total_bytes().await?;
        let capacity = self.shared.cfg.capacity;
        Ok(FsUsage {
            capacity_bytes: capacity,
            used_bytes: used,
            available_bytes: capacity.saturating_sub(used),
        })
    }

    async fn create_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        bytes_only(qs, limit)?;
        self.shared.registry.create_scope(qs, limit.bytes).await
    }

    async fn describe_quota_scope(&self, qs: &QuotaScopeId) -> Result<Option<QuotaUsage>> {
        let Some(limit) = self.shared.registry.scope(qs).await? else {
            return Ok(None);
        };
        let (used, _) = self.shared.registry.scope_usage(qs).await?;
        Ok(Some(QuotaUsage {
            used_bytes: Some(used),
            limit_bytes: limit,
            used_inodes: None,
            limit_inodes: None,
        }))
    }

    async fn update_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        match self.create_quota_scope(qs, limit).await {
            Err(VolumeError::QuotaScopeExists(_)) => QuotaOps::set_limit(self, qs, limit).await,
            other => other,
        }
    }

    async fn unset_quota(&self, qs: &QuotaScopeId) -> Result<()> {
        self.shared.registry.set_limit(qs, None).await
    }

    async fn delete_quota_scope(&self, qs: &QuotaScopeId) -> Result<()> {
        self.shared.registry.delete_scope(qs).await
    }

    fn quota(&self) -> Option<&dyn QuotaOps> {
        Some(self)
    }

    fn quota_binds_session_writes(&self) -> bool {
        false
    }

    async fn list_quota_scopes(&self) -> Result<Vec<uuid::Uuid>> {
        let mut ids: Vec<uuid::Uuid> = self
            .shared
            .registry
            .scopes()
            .await?
            .into_iter()
            .map(|q| q.id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn list_vfolders(
        &self,
        scope: Option<uuid::Uuid>,
    ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>> {
        let mut out: Vec<(uuid::Uuid, uuid::Uuid)> = self
            .shared
            .registry
            .all()
            .await?
            .into_iter()
            .filter_map(|v| Some((v.quota_scope?.id, v.folder)))
            .filter(|(q, _)| scope.is_none_or(|s| s == *q))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn create_vfolder(&self, vf: &VFolderId, _mode: u32) -> Result<()> {
        let qs = vf.quota_scope.ok_or(VolumeError::QuotaScopeRequired(*vf))?;
        if self.shared.registry.scope(&qs).await?.is_none() {
            return Err(VolumeError::QuotaScopeNotFound(qs));
        }
        if self.shared.registry.get(vf).await?.is_some() {
            return Err(VolumeError::VFolderExists(*vf));
        }
        let (bucket, prefix) = self.name_of_bucket(vf);
        let svc = &self.shared.service;
        if prefix.is_empty() {
            if !svc.create_bucket(&bucket).await? {
                // A bucket of that name exists and is not a vfolder we know: not ours to take.
                return Err(VolumeError::VFolderExists(*vf));
            }
        } else {
            svc.put_dir_marker(&bucket, &prefix).await?;
        }
        let entry = Entry {
            bucket: bucket.clone(),
            prefix: prefix.clone(),
            registered: false,
            read_only: false,
            objects: 0,
            bytes: 0,
            scanned_at: Some(chrono::Utc::now().timestamp()),
        };
        if let Err(e) = self.shared.registry.insert(vf, &entry).await {
            if prefix.is_empty() {
                let _ = svc.delete_bucket(&bucket).await;
            }
            return Err(e);
        }
        Ok(())
    }

    async fn vfolder_exists(&self, vf: &VFolderId) -> Result<bool> {
        Ok(self.shared.registry.get(vf).await?.is_some())
    }

    async fn delete_vfolder(&self, vf: &VFolderId, progress: Arc<Progress>) -> Result<()> {
        let Some(e) = self.shared.registry.get(vf).await? else {
            return Ok(());
        };
        if !e.registered {
            let loc = self.shared.loc_of(&e)?;
            progress.set_total(e.objects);
            loc.delete_prefix(&e.prefix, &progress).await?;
            if e.prefix.is_empty() {
                self.shared.service.delete_bucket(&e.bucket).await?;
            }
        }
        // A registered bucket belongs to its owner: only our record of it goes.
        self.shared.registry.remove(vf).await
    }

    async fn clone_vfolder(
        &self,
        src: &VFolderId,
        dst: &VFolderId,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let (from, e) = self.shared.loc(src).await?;
        progress.set_total(e.objects);
        self.create_vfolder(dst, super::DEFAULT_VFOLDER_MODE)
            .await?;
        let copied = async {
            let (to, _) = self.shared.loc(dst).await?;
            let mut all = from.list_all(&from.prefix);
            let mut u = TreeUsage::default();
            while let Some(m) = all.try_next().await? {
                // The source's own marker ("qs/vf/", listed as "qs/vf") has its twin already.
                let Some(rest) = m.location.as_ref().strip_prefix(from.prefix.as_str()) else {
                    continue;
                };
                from.copy_object(&m, &to, &format!("{}{rest}", to.prefix))
                    .await?;
                u.file_count += 1;
                u.used_bytes += m.size;
                if !progress.advance(1) {
                    return Err(VolumeError::Cancelled);
                }
            }
            self.shared.registry.set_counts(dst, u).await
        }
        .await;
        if let Err(e) = copied {
            // Never leave a half-copied destination behind.
            let _ = self
                .delete_vfolder(dst, Arc::new(Progress::default()))
                .await;
            return Err(e);
        }
        Ok(())
    }

    async fn mount_info(&self, vf: &VFolderId, subpath: &RelPath) -> Result<MountInfo> {
        let (loc, e) = self.shared.loc(vf).await?;
        if !subpath.is_root() && loc.stat(subpath).await?.kind != EntryKind::Directory {
            return Err(VolumeError::io(
                subpath,
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        Ok(MountInfo::Remote(self.shared.service.remote_location(
            &e.bucket,
            &loc.dir_prefix(subpath),
            e.read_only,
        )))
    }

    async fn mount_source(
        &self,
        vf: &VFolderId,
        subpath: &RelPath,
        read_only: bool,
        holder: &str,
    ) -> Result<MountSource> {
        let (loc, e) = self.shared.loc(vf).await?;
        if e.read_only && !read_only {
            return Err(VolumeError::ReadOnly(*vf));
        }
        let dir = loc.dir_prefix(subpath);
        if !subpath.is_root() && loc.stat(subpath).await?.kind != EntryKind::Directory {
            return Err(VolumeError::io(
                subpath,
                std::io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        let spec = self.shared.service.fuse_spec(
            self.mount_key(&e.bucket, read_only),
            &e.bucket,
            read_only,
        );
        let mnt = self.fuse.acquire(&spec, holder).await?;
        let rel = dir.trim_end_matches('/').to_string();
        let opened = tokio::task::spawn_blocking(move || {
            let root = fsops::open_dir_path(&mnt)?;
            if rel.is_empty() {
                return Ok((root, mnt));
            }
            let r = RelPath::parse(&rel).map_err(|e| std::io::Error::other(e.to_string()))?;
            let fd = fsops::open_beneath(root.as_fd(), &r, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            Ok::<_, std::io::Error>((fd, mnt.join(&rel)))
        })
        .await
        .map_err(|e| VolumeError::Internal(e.to_string()))?;
        match opened {
            Ok((dir, shown)) => Ok(MountSource { dir, shown }),
            Err(err) => {
                self.fuse.release(&self.shared.name, holder).await;
                Err(VolumeError::io(subpath, err))
            }
        }
    }

    async fn release_mounts(&self, holder: &str) {
        self.fuse.release(&self.shared.name, holder).await;
    }

    async fn retain_mount_holders(&self, live: &HashSet<String>) {
        self.fuse.retain(&self.shared.name, live).await;
    }

    async fn dead_mount_holders(&self) -> Vec<String> {
        self.fuse.dead_holders(&self.shared.name).await
    }

    async fn register_vfolder(&self, vf: &VFolderId, r: &Registration) -> Result<()> {
        let qs = vf.quota_scope.ok_or(VolumeError::QuotaScopeRequired(*vf))?;
        if self.shared.registry.scope(&qs).await?.is_none() {
            return Err(VolumeError::QuotaScopeNotFound(qs));
        }
        if !crate::config::object::valid_bucket(&r.bucket) {
            return Err(VolumeError::BadRequest(format!(
                "{:?} is not a bucket name",
                r.bucket
            )));
        }
        if !self.shared.service.bucket_exists(&r.bucket).await? {
            return Err(VolumeError::BadRequest(format!(
                "bucket {:?} does not exist on {}",
                r.bucket,
                self.shared.service.location()
            )));
        }
        let prefix = match r.prefix.trim_matches('/') {
            "" => String::new(),
            p => {
                RelPath::parse(p).map_err(|e| VolumeError::InvalidPath {
                    path: p.to_string(),
                    source: e,
                })?;
                format!("{p}/")
            }
        };
        self.check_unowned(&r.bucket, &prefix).await?;
        let entry = Entry {
            bucket: r.bucket.clone(),
            prefix,
            registered: true,
            read_only: r.read_only,
            objects: 0,
            bytes: 0,
            scanned_at: None,
        };
        self.shared.registry.insert(vf, &entry).await?;
        // Its usage is counted in the background: a large bucket must not hold the call up.
        let (shared, vf) = (self.shared.clone(), *vf);
        tokio::spawn(async move {
            if let Err(e) = shared.recount(&vf).await {
                tracing::warn!(vfid = %vf, error = %e, "cannot count a registered bucket");
            }
        });
        Ok(())
    }

    async fn deregister_vfolder(&self, vf: &VFolderId) -> Result<()> {
        match self.shared.registry.get(vf).await? {
            None => Err(VolumeError::VFolderNotFound(*vf)),
            Some(e) if !e.registered => Err(VolumeError::BadRequest(format!(
                "vfolder {vf} was created here, not registered: delete it instead"
            ))),
            Some(_) => self.shared.registry.remove(vf).await,
        }
    }

    async fn presign(
        &self,
        vf: &VFolderId,
        p: &RelPath,
        access: Presign,
        expiry: Duration,
    ) -> Result<String> {
        let write = access != Presign::Read;
        if !self.shared.cfg.presign {
            return Err(VolumeError::BadRequest(format!(
                "presigned URLs are off for volume {} (presign = true turns them on)",
                self.shared.name
            )));
        }
        let (loc, e) = if write {
            self.shared.writable(vf).await?
        } else {
            self.shared.loc(vf).await?
        };
        let expiry = expiry.clamp(Duration::from_secs(1), self.shared.cfg.presign_max_expiry);
        // Signed first: a URL that cannot be made charges nothing.
        let url = self
            .shared
            .service
            .presign(&e.bucket, &loc.key(p), access, expiry)?;
        if let Presign::Upload { size } = access {
            self.charge_presigned_upload(vf, size).await?;
        }
        Ok(url)
    }

    async fn share(&self, vf: &VFolderId, write: bool, expiry: Duration) -> Result<SharedAccess> {
        let (_, e) = if write {
            self.shared.writable(vf).await?
        } else {
            self.shared.loc(vf).await?
        };
        if !e.prefix.is_empty() {
            // A container SAS would reach every other vfolder in the container.
            return Err(VolumeError::BadRequest(format!(
                "vfolder {vf} is a prefix of container {}: a SAS for it would grant the whole container",
                e.bucket
            )));
        }
        let expiry = expiry.clamp(Duration::from_secs(1), self.shared.cfg.presign_max_expiry);
        let url = self
            .shared
            .service
            .container_sas(&e.bucket, write, expiry)?
            .ok_or_else(|| {
                VolumeError::BadRequest(format!(
                    "{} volumes have no shared access signatures",
                    self.backend()
                ))
            })?;
        Ok(SharedAccess {
            url,
            expires_at: chrono::Utc::now() + expiry,
        })
    }

    async fn usage(&self, vf: &VFolderId) -> Result<TreeUsage> {
        let (_, e) = self.shared.loc(vf).await?;
        Ok(TreeUsage {
            file_count: e.objects,
            used_bytes: e.bytes,
        })
    }

    async fn rescan_usage(&self, vf: &VFolderId) -> Result<TreeUsage> {
        self.shared.recount(vf).await
    }

    async fn used_bytes(&self, vf: &VFolderId) -> Result<u64> {
        Ok(Volume::usage(self, vf).await?.used_bytes)
    }

    async fn list(&self, vf: &VFolderId, dir: &RelPath, limit: usize) -> Result<Listing> {
        let (loc, _) = self.shared.loc(vf).await?;
        loc.list(dir, limit).await
    }

    async fn mkdir(
        &self,
        vf: &VFolderId,
        p: &RelPath,
        parents: bool,
        exist_ok: bool,
    ) -> Result<()> {
        let (loc, _) = self.shared.writable(vf).await?;
        if loc.mkdir(p, parents, exist_ok).await? {
            self.shared.registry.add(vf, 1, 0).await?;
        }
        Ok(())
    }

    async fn rename(&self, vf: &VFolderId, p: &RelPath, new_name: &str) -> Result<()> {
        let (loc, _) = self.shared.writable(vf).await?;
        let parent = p.split_last().map(|(d, _)| d).unwrap_or_else(RelPath::root);
        let dst = parent.join_name(new_name);
        if loc.stat(&dst).await.is_ok() {
            return Err(VolumeError::io(
                &dst,
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        loc.move_to(p, &dst, &Progress::default()).await
    }

    async fn move_path(
        &self,
        vf: &VFolderId,
        src: &RelPath,
        dst: &RelPath,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let (loc, _) = self.shared.writable(vf).await?;
        let name = src
            .split_last()
            .map(|(_, n)| n.to_string())
            .ok_or_else(|| VolumeError::io(src, std::io::Error::from_raw_os_error(libc::EBUSY)))?;
        // shutil.move semantics: into an existing directory, otherwise to that name.
        let target = match loc.stat(dst).await {
            Ok(st) if st.kind == EntryKind::Directory => dst.join_name(&name),
            _ => dst.clone(),
        };
        loc.move_to(src, &target, &progress).await
    }

    async fn delete_files(
        &self,
        vf: &VFolderId,
        paths: &[RelPath],
        recursive: bool,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let (loc, _) = self.shared.writable(vf).await?;
        progress.set_total(paths.len() as u64);
        for p in paths {
            let (objects, bytes) = loc.delete(p, recursive, &progress).await?;
            self.shared
                .registry
                .add(vf, -(objects as i64), -(bytes as i64))
                .await?;
            if !progress.advance(1) {
                return Err(VolumeError::Cancelled);
            }
        }
        Ok(())
    }

    async fn stat(&self, vf: &VFolderId, p: &RelPath) -> Result<EntryStat> {
        let (loc, _) = self.shared.loc(vf).await?;
        loc.stat(p).await
    }

    async fn check_file_destination(&self, vf: &VFolderId, dst: &RelPath) -> Result<()> {
        let (loc, _) = self.shared.writable(vf).await?;
        let comps: Vec<&str> = dst.components().collect();
        let mut cur = RelPath::root();
        for (i, comp) in comps.iter().enumerate() {
            cur = cur.join_name(comp);
            let last = i + 1 == comps.len();
            let st = match enoent_or(loc.stat(&cur).await.map(Some), || Ok(None))? {
                Some(st) => st,
                None => return Ok(()),
            };
            let code = match (last, st.kind == EntryKind::Directory) {
                (true, true) => libc::EISDIR,
                (false, false) => libc::ENOTDIR,
                _ => continue,
            };
            return Err(VolumeError::io(
                &cur,
                std::io::Error::from_raw_os_error(code),
            ));
        }
        Ok(())
    }

    async fn open_read(&self, vf: &VFolderId, p: &RelPath) -> Result<Box<dyn ReadHandle>> {
        let (loc, _) = self.shared.loc(vf).await?;
        loc.open_read(p).await
    }

    async fn walk(
        &self,
        vf: &VFolderId,
        dir: &RelPath,
    ) -> Result<BoxStream<'static, std::io::Result<WalkEntry>>> {
        let (loc, _) = self.shared.loc(vf).await?;
        loc.walk(dir).await
    }

    fn staging(&self) -> &dyn UploadStaging {
        &self.staging
    }

    fn spawn_background(&self, shutdown: CancellationToken) {
        let shared = self.shared.clone();
        let every = shared.cfg.rescan_interval;
        if every.is_zero() {
            return;
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.min(Duration::from_secs(60)));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let before = chrono::Utc::now().timestamp() - every.as_secs() as i64;
                let Ok(due) = shared.registry.stale(before).await else {
                    continue;
                };
                for vf in due {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    match shared.recount(&vf).await {
                        Ok(u) => {
                            tracing::debug!(vfid = %vf, objects = u.file_count, bytes = u.used_bytes, "usage recounted")
                        }
                        Err(e) => tracing::warn!(vfid = %vf, error = %e, "cannot recount usage"),
                    }
                }
            }
        });
    }
}
