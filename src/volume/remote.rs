//! Remote volumes: a vfs volume whose path is a remote filesystem (cifs, nfs, fuse.rclone) the
//! node mounts itself, at startup or on request, through the shared, counted mounts of
//! `mounts.rs`. Every operation holds the mount while it runs (a request's holder, or a
//! session's until it ends) and works on a vfs volume opened on the mounted filesystem; when
//! the mount was made again (after a linger or a dead server), that volume is opened again.
//!
//! Vfolders are the usual UUID directories (`<qs>/<ab>/<cd>/<rest>`), so `/folder/usage`
//! counts their files and bytes as on any vfs volume.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use super::mounts::{MountSpec, Mounter, SharedMounts};
use super::vfs::VfsVolume;
use super::{
    EntryStat, FsUsage, HwInfo, Listing, MountInfo, MountSource, Progress, QuotaLimit, QuotaUsage,
    ReadHandle, RelPath, Result, StagedWrite, TreeUsage, UploadStaging, Volume, VolumeError,
    VolumeStatus, WalkEntry, WritePlan, fsops,
};
use crate::config::VolumeConfig;
use crate::config::remote::{CIFS_CREDENTIALS, MountAt, RemoteMount};
use crate::ids::{QuotaScopeId, VFolderId};
use crate::state::State;

/// How `m` is mounted at `path`: rclone with its options as environment, or mount(8) with
/// cifs's secrets moved to a credentials file under `state_dir`.
pub fn mount_spec(volume: &str, path: &Path, m: &RemoteMount, state_dir: &Path) -> MountSpec {
    let how = if m.is_rclone() {
        let env = m
            .options
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "ro" | "read-only"))
            .map(|(k, v)| {
                (
                    format!("RCLONE_{}", k.to_ascii_uppercase().replace('-', "_")),
                    v.clone().unwrap_or_else(|| "true".into()),
                )
            })
            .collect();
        Mounter::Rclone {
            remote: m.source.clone(),
            env,
            read_only: m
                .options
                .iter()
                .any(|(k, _)| matches!(k.as_str(), "ro" | "read-only")),
        }
    } else {
        let cifs = matches!(m.fstype.as_str(), "cifs" | "smb3");
        let mut options = Vec::new();
        let mut secrets = String::new();
        for (k, v) in &m.options {
            if cifs && CIFS_CREDENTIALS.contains(&k.as_str()) {
                let name = match k.as_str() {
                    "user" => "username",
                    "pass" => "password",
                    "dom" => "domain",
                    other => other,
                };
                secrets.push_str(&format!("{name}={}\n", v.clone().unwrap_or_default()));
                continue;
            }
            options.push(match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            });
        }
        let credentials = (!secrets.is_empty()).then(|| {
            let file = credentials_path(state_dir, volume);
            options.push(format!("credentials={}", file.display()));
            (file, secrets)
        });
        Mounter::Kernel {
            fstype: m.fstype.clone(),
            source: m.source.clone(),
            options,
            credentials,
        }
    };
    MountSpec {
        key: format!("{volume}/remote"),
        how,
        mountpoint: Some(path.to_path_buf()),
        linger: m.linger,
        pending_grace: crate::config::object::PENDING_GRACE,
    }
}

/// What operations share: the mount, and the vfs volume opened on it.
pub struct Shared {
    config: VolumeConfig,
    at: MountAt,
    spec: MountSpec,
    mounts: Arc<SharedMounts>,
    owner: Option<fsops::Owner>,
    state: State,
    /// The vfs volume on the mounted filesystem, with the device it was opened on.
    opened: tokio::sync::Mutex<Option<(Arc<VfsVolume>, u64)>>,
}

/// The mount held for one operation (a request), let go when dropped.
struct Lease {
    vol: Arc<VfsVolume>,
    holder: Option<String>,
    shared: Arc<Shared>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(h) = self.holder.take() {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                shared.mounts.release(&shared.config.name, &h).await;
            });
        }
    }
}

impl Shared {
    /// Mounts (if needed) with `holder` counted, and the vfs volume on the mount.
    async fn enter(&self, holder: &str) -> Result<Arc<VfsVolume>> {
        let path = self.config.path.clone();
        self.mounts.acquire(&self.spec, holder).await?;
        let dev = tokio::task::spawn_blocking(move || std::fs::metadata(&path).map(|m| m.dev()))
            .await
            .map_err(|e| VolumeError::Internal(e.to_string()))?
            .map_err(|e| VolumeError::Io {
                path: self.config.path.display().to_string(),
                source: e,
            })?;
        let mut opened = self.opened.lock().await;
        if let Some((v, d)) = opened.as_ref()
            && *d == dev
        {
            return Ok(v.clone());
        }
        let v = Arc::new(VfsVolume::open(&self.config, self.owner, &self.state)?);
        *opened = Some((v.clone(), dev));
        Ok(v)
    }

    /// The mount for the length of one request.
    async fn lease(self: &Arc<Self>) -> Result<Lease> {
        let holder = match self.at {
            // Kept from start to end: nothing to count per request.
            MountAt::Startup => None,
            MountAt::Requested => Some(format!("request:{}", uuid::Uuid::new_v4().simple())),
        };
        let vol = self
            .enter(holder.as_deref().unwrap_or(STARTUP_HOLDER))
            .await?;
        Ok(Lease {
            vol,
            holder,
            shared: self.clone(),
        })
    }
}

const STARTUP_HOLDER: &str = "startup";

pub struct RemoteVolume {
    shared: Arc<Shared>,
    staging: RemoteStaging,
}

impl RemoteVolume {
    /// A startup volume is mounted now (an error is the volume's health verdict, not a failed
    /// start: the health check mounts it again).
    pub async fn open(
        c: &VolumeConfig,
        m: &RemoteMount,
        owner: Option<fsops::Owner>,
        state: &State,
        state_dir: &Path,
        mounts: Arc<SharedMounts>,
    ) -> Self {
        let shared = Arc::new(Shared {
            spec: mount_spec(&c.name, &c.path, m, state_dir),
            config: c.clone(),
            at: m.at,
            mounts,
            owner,
            state: state.clone(),
            opened: tokio::sync::Mutex::new(None),
        });
        if m.at == MountAt::Startup
            && let Err(e) = shared.enter(STARTUP_HOLDER).await
        {
            tracing::error!(volume = %c.name, error = %e, "cannot mount a startup volume; it stays offline until it can be mounted");
        }
        RemoteVolume {
            staging: RemoteStaging {
                shared: shared.clone(),
            },
            shared,
        }
    }
}

/// Health of a remote volume: a startup volume must be mounted (and is mounted again if it is
/// not); a requested one is fine unmounted. Mounted, it must answer statvfs.
struct MountProbe(Arc<Shared>);

#[async_trait]
impl super::health::RemoteProbe for MountProbe {
    async fn probe(&self) -> std::result::Result<(), String> {
        let s = &self.0;
        if !s.mounts.is_live(&s.spec).await {
            return match s.at {
                MountAt::Requested => Ok(()),
                MountAt::Startup => s
                    .enter(STARTUP_HOLDER)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("not mounted: {e}")),
            };
        }
        let path = s.config.path.clone();
        tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&path).map(|_| ()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("statvfs failed: {e}"))
    }
}

impl std::fmt::Display for RemoteVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Remote({} at {})",
            self.shared.spec.shown(),
            self.shared.config.path.display()
        )
    }
}

#[async_trait]
impl Volume for RemoteVolume {
    fn name(&self) -> &str {
        &self.shared.config.name
    }
    fn backend(&self) -> &'static str {
        "vfs"
    }
    fn location(&self) -> String {
        self.shared.config.path.display().to_string()
    }
    fn fsprefix(&self) -> &str {
        &self.shared.config.fsprefix
    }
    fn capabilities(&self) -> Vec<&'static str> {
        vec!["vfolder"]
    }
    fn health_target(&self) -> super::health::Target {
        super::health::Target::Remote(Arc::new(MountProbe(self.shared.clone())))
    }

    /// Never mounts: heartbeats ask often, and a requested volume rests unmounted.
    async fn hwinfo(&self) -> HwInfo {
        let mounted = self.shared.mounts.is_live(&self.shared.spec).await;
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("backend".into(), "vfs".into());
        metadata.insert("path".into(), self.location());
        metadata.insert("remote".into(), self.shared.spec.shown());
        metadata.insert("mounted".into(), mounted.to_string());
        HwInfo {
            status: VolumeStatus::Healthy,
            status_info: None,
            metadata,
        }
    }

    async fn fs_usage(&self) -> Result<FsUsage> {
        self.shared.lease().await?.vol.fs_usage().await
    }
    async fn create_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        self.shared
            .lease()
            .await?
            .vol
            .create_quota_scope(qs, limit)
            .await
    }
    async fn describe_quota_scope(&self, qs: &QuotaScopeId) -> Result<Option<QuotaUsage>> {
        self.shared
            .lease()
            .await?
            .vol
            .describe_quota_scope(qs)
            .await
    }
    async fn update_quota_scope(&self, qs: &QuotaScopeId, limit: &QuotaLimit) -> Result<()> {
        self.shared
            .lease()
            .await?
            .vol
            .update_quota_scope(qs, limit)
            .await
    }
    async fn unset_quota(&self, qs: &QuotaScopeId) -> Result<()> {
        self.shared.lease().await?.vol.unset_quota(qs).await
    }
    async fn delete_quota_scope(&self, qs: &QuotaScopeId) -> Result<()> {
        self.shared.lease().await?.vol.delete_quota_scope(qs).await
    }
    async fn list_quota_scopes(&self) -> Result<Vec<uuid::Uuid>> {
        self.shared.lease().await?.vol.list_quota_scopes().await
    }
    async fn list_vfolders(
        &self,
        scope: Option<uuid::Uuid>,
    ) -> Result<Vec<(uuid::Uuid, uuid::Uuid)>> {
        self.shared.lease().await?.vol.list_vfolders(scope).await
    }
    async fn create_vfolder(&self, vf: &VFolderId, mode: u32) -> Result<()> {
        self.shared
            .lease()
            .await?
            .vol
            .create_vfolder(vf, mode)
            .await
    }
    async fn vfolder_exists(&self, vf: &VFolderId) -> Result<bool> {
        self.shared.lease().await?.vol.vfolder_exists(vf).await
    }
    async fn delete_vfolder(&self, vf: &VFolderId, progress: Arc<Progress>) -> Result<()> {
        self.shared
            .lease()
            .await?
            .vol
            .delete_vfolder(vf, progress)
            .await
    }
    async fn clone_vfolder(
        &self,
        src: &VFolderId,
        dst: &VFolderId,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.clone_vfolder(src, dst, progress).await
    }
    async fn mount_info(&self, vf: &VFolderId, subpath: &RelPath) -> Result<MountInfo> {
        self.shared.lease().await?.vol.mount_info(vf, subpath).await
    }
    async fn mount_source(
        &self,
        vf: &VFolderId,
        subpath: &RelPath,
        read_only: bool,
        holder: &str,
    ) -> Result<MountSource> {
        // The session holds the mount until it ends (`release_mounts`).
        let vol = self.shared.enter(holder).await?;
        let source = vol.mount_source(vf, subpath, read_only, holder).await;
        if source.is_err() {
            self.release_mounts(holder).await;
        }
        source
    }
    async fn release_mounts(&self, holder: &str) {
        self.shared
            .mounts
            .release(&self.shared.config.name, holder)
            .await;
    }
    async fn retain_mount_holders(&self, live: &HashSet<String>) {
        let mut keep = live.clone();
        keep.insert(STARTUP_HOLDER.to_string());
        self.shared
            .mounts
            .retain(&self.shared.config.name, &keep)
            .await;
    }
    async fn dead_mount_holders(&self) -> Vec<String> {
        self.shared
            .mounts
            .dead_holders(&self.shared.config.name)
            .await
    }
    async fn usage(&self, vf: &VFolderId) -> Result<TreeUsage> {
        self.shared.lease().await?.vol.usage(vf).await
    }
    async fn used_bytes(&self, vf: &VFolderId) -> Result<u64> {
        self.shared.lease().await?.vol.used_bytes(vf).await
    }
    async fn list(&self, vf: &VFolderId, dir: &RelPath, limit: usize) -> Result<Listing> {
        self.shared.lease().await?.vol.list(vf, dir, limit).await
    }
    async fn mkdir(
        &self,
        vf: &VFolderId,
        p: &RelPath,
        parents: bool,
        exist_ok: bool,
    ) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.mkdir(vf, p, parents, exist_ok).await
    }
    async fn rename(&self, vf: &VFolderId, p: &RelPath, new_name: &str) -> Result<()> {
        self.shared.lease().await?.vol.rename(vf, p, new_name).await
    }
    async fn move_path(
        &self,
        vf: &VFolderId,
        src: &RelPath,
        dst: &RelPath,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.move_path(vf, src, dst, progress).await
    }
    async fn delete_files(
        &self,
        vf: &VFolderId,
        paths: &[RelPath],
        recursive: bool,
        progress: Arc<Progress>,
    ) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.delete_files(vf, paths, recursive, progress).await
    }
    async fn stat(&self, vf: &VFolderId, p: &RelPath) -> Result<EntryStat> {
        self.shared.lease().await?.vol.stat(vf, p).await
    }
    async fn check_file_destination(&self, vf: &VFolderId, dst: &RelPath) -> Result<()> {
        self.shared
            .lease()
            .await?
            .vol
            .check_file_destination(vf, dst)
            .await
    }
    async fn open_read(&self, vf: &VFolderId, p: &RelPath) -> Result<Box<dyn ReadHandle>> {
        // The open file keeps the filesystem readable even if the mount is let go meanwhile.
        self.shared.lease().await?.vol.open_read(vf, p).await
    }
    async fn walk(
        &self,
        vf: &VFolderId,
        dir: &RelPath,
    ) -> Result<BoxStream<'static, std::io::Result<WalkEntry>>> {
        self.shared.lease().await?.vol.walk(vf, dir).await
    }
    fn staging(&self) -> &dyn UploadStaging {
        &self.staging
    }
}

/// Upload staging on the mounted filesystem, holding the mount for each step.
struct RemoteStaging {
    shared: Arc<Shared>,
}

#[async_trait]
impl UploadStaging for RemoteStaging {
    fn can_concat(&self) -> bool {
        true // the mounted filesystem's own staging joins
    }
    async fn seal(&self, vf: &VFolderId, session: &str) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.staging().seal(vf, session).await
    }
    async fn concat(
        &self,
        vf: &VFolderId,
        session: &str,
        parts: &[(String, u64)],
        dst: &RelPath,
    ) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.staging().concat(vf, session, parts, dst).await
    }
    async fn truncate(&self, vf: &VFolderId, session: &str, offset: u64) -> Result<u64> {
        let l = self.shared.lease().await?;
        l.vol.staging().truncate(vf, session, offset).await
    }
    async fn write(
        &self,
        vf: &VFolderId,
        session: &str,
        body: super::ByteStream,
        plan: WritePlan,
    ) -> Result<StagedWrite> {
        let l = self.shared.lease().await?;
        l.vol.staging().write(vf, session, body, plan).await
    }
    async fn finish(&self, vf: &VFolderId, session: &str, dst: &RelPath, size: u64) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.staging().finish(vf, session, dst, size).await
    }
    async fn discard(&self, vf: &VFolderId, session: &str) -> Result<()> {
        let l = self.shared.lease().await?;
        l.vol.staging().discard(vf, session).await
    }
    async fn sweep(&self, older_than: std::time::SystemTime) -> Result<usize> {
        // Only when mounted: sweeping must not mount a resting volume every hour.
        if !self.shared.mounts.is_live(&self.shared.spec).await {
            return Ok(0);
        }
        let l = self.shared.lease().await?;
        l.vol.staging().sweep(older_than).await
    }
}

/// Where a remote volume's credentials file is (cifs reads it through `credentials=`).
pub fn credentials_path(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir
        .join("mounts")
        .join(format!("{volume}.credentials"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::remote::MountAt;

    fn cifs() -> RemoteMount {
        RemoteMount {
            at: MountAt::Requested,
            fstype: "cifs".into(),
            source: "//files.example.com/vfolders".into(),
            options: vec![
                ("vers".into(), Some("3.0".into())),
                ("username".into(), Some("alice".into())),
                ("password".into(), Some("S3cret!".into())),
                ("dir_mode".into(), Some("0777".into())),
                ("sec".into(), Some("ntlmssp".into())),
            ],
            linger: Duration::from_secs(60),
        }
    }

    #[test]
    fn cifs_secrets_go_to_a_credentials_file_not_the_command_line() {
        let spec = mount_spec(
            "az",
            Path::new("/vfroot/az"),
            &cifs(),
            Path::new("/var/lib/sa"),
        );
        let Mounter::Kernel {
            fstype,
            source,
            options,
            credentials,
        } = &spec.how
        else {
            panic!("a kernel mount");
        };
        let args = super::super::mounts::kernel_mount_args(
            fstype,
            source,
            options,
            Path::new("/vfroot/az"),
        );
        assert_eq!(
            args,
            [
                "-t",
                "cifs",
                "-o",
                "vers=3.0,dir_mode=0777,sec=ntlmssp,credentials=/var/lib/sa/mounts/az.credentials",
                "//files.example.com/vfolders",
                "/vfroot/az",
            ]
        );
        assert!(!args.join(" ").contains("S3cret"));
        let (path, content) = credentials.as_ref().unwrap();
        assert_eq!(path, &credentials_path(Path::new("/var/lib/sa"), "az"));
        assert_eq!(content, "username=alice\npassword=S3cret!\n");
        assert!(!spec.shown().contains("S3cret"));
    }

    #[test]
    fn rclone_options_become_its_environment() {
        let m = RemoteMount {
            at: MountAt::Startup,
            fstype: "fuse.rclone".into(),
            source: ":azureblob:team".into(),
            options: vec![
                (
                    "azureblob-sas-url".into(),
                    Some("https://x/team?sig=abc".into()),
                ),
                ("ro".into(), None),
            ],
            linger: Duration::ZERO,
        };
        let spec = mount_spec("team", Path::new("/vfroot/team"), &m, Path::new("/s"));
        let Mounter::Rclone {
            remote,
            env,
            read_only,
        } = &spec.how
        else {
            panic!("an rclone mount");
        };
        assert_eq!(remote, ":azureblob:team");
        assert!(*read_only);
        assert_eq!(
            env,
            &[(
                "RCLONE_AZUREBLOB_SAS_URL".to_string(),
                "https://x/team?sig=abc".to_string()
            )]
        );
    }
}
