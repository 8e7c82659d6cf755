//! Mounts made on demand and shared: buckets FUSE-mounted for session containers (`rclone
//! mount`), and remote volumes (`mount = { at = "requested", ... }`: cifs, nfs, fuse.rclone).
//!
//! One mount per key (a volume's bucket and mode, or a remote volume) serves every user that
//! needs it; who needs it is kept in SQLite (`fuse_mounts`, `fuse_mount_holders`), so the
//! counts survive a restart and are then trimmed to the sessions still alive. A mount nobody
//! uses any more stays for its linger time (churn must not thrash mounts), then goes. A mount
//! whose FUSE process died (ENOTCONN) is found at the next use and made again.
//!
//! rclone rather than s3fs: one tool for S3 and Azure Blob (and the remote volumes built on
//! them), its configuration comes through the environment (no secret on a command line or in a
//! file), `--read-only` enforces read-only at the FUSE layer, and it runs in its own session,
//! so the daemon restarting does not take the mounts (and the sessions on them) down. Kernel
//! filesystems go through mount(8), with their secrets in a credentials file (cifs), never in
//! its arguments.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::{Result, VolumeError};
use crate::state::State;

/// How long a new mount may take to appear before it is given up.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// What to mount.
#[derive(Clone)]
pub struct MountSpec {
    /// Names the shared mount: `<volume>/<bucket>/<ro|rw>`, or `<volume>/remote`.
    pub key: String,
    pub how: Mounter,
    /// Where: a remote volume's own path; None for a directory of ours under the state dir.
    pub mountpoint: Option<PathBuf>,
    pub linger: Duration,
    /// How long past the linger rclone's failing uploads may hold the mount; then the unsaved
    /// files are set aside under `<state-dir>/fuse/unsaved` and it goes.
    pub pending_grace: Duration,
}

#[derive(Clone)]
pub enum Mounter {
    Rclone {
        /// The rclone remote, e.g. `:s3:bucket`.
        remote: String,
        /// rclone's settings (backend options, credentials): passed as its environment only.
        env: Vec<(String, String)>,
        read_only: bool,
    },
    /// mount(8) with `-t fstype -o options source`; `credentials` (path, content) is written
    /// first, mode 0600, for options that name it.
    Kernel {
        fstype: String,
        source: String,
        options: Vec<String>,
        credentials: Option<(PathBuf, String)>,
    },
}

impl MountSpec {
    /// A bucket for sessions, mounted by rclone under the state dir.
    pub fn rclone(
        key: String,
        remote: String,
        env: Vec<(String, String)>,
        read_only: bool,
        linger: Duration,
        pending_grace: Duration,
    ) -> Self {
        MountSpec {
            key,
            how: Mounter::Rclone {
                remote,
                env,
                read_only,
            },
            mountpoint: None,
            linger,
            pending_grace,
        }
    }

    /// What logs may say about it: where from and where to, no option (they carry secrets).
    pub fn shown(&self) -> String {
        match &self.how {
            Mounter::Rclone { remote, .. } => format!("rclone {remote}"),
            Mounter::Kernel { fstype, source, .. } => format!("{fstype} {source}"),
        }
    }
}

pub struct SharedMounts {
    state: State,
    /// Mount points and rclone's logs and caches live under here (`<state-dir>/fuse`).
    dir: PathBuf,
    /// Owner of everything in the mounts (the sessions' kernel uid/gid).
    owner: Option<(u32, u32)>,
    lock: tokio::sync::Mutex<()>,
    /// (key, holder) of mounts found dead and made again: those holders' containers still have
    /// the dead one. Taken by `dead_holders`.
    orphaned: std::sync::Mutex<Vec<(String, String)>>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn db(e: sqlx::Error) -> VolumeError {
    VolumeError::Internal(format!("state database: {e}"))
}

fn mount_err(key: &str, message: String) -> VolumeError {
    VolumeError::Remote {
        service: format!("mount {key}"),
        message,
        unreachable: false,
    }
}

/// Is something mounted exactly at `p` (by /proc/self/mountinfo)?
fn is_mount_point(p: &Path) -> bool {
    let want = p.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(&*want))
        })
        .unwrap_or(false)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(n)) => {
                out.push(n);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, PartialEq, Eq)]
enum MountState {
    Absent,
    Live,
    /// Mounted, but its FUSE process is gone: the kernel answers ENOTCONN.
    Dead,
    /// Mounted, but it does not answer in time (or answers with another error).
    Stale,
}

async fn mount_state(p: &Path) -> MountState {
    if !is_mount_point(p) {
        return MountState::Absent;
    }
    let path = p.to_path_buf();
    let probe = tokio::task::spawn_blocking(move || std::fs::metadata(&path).map(|_| ()));
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(Ok(()))) => MountState::Live,
        Ok(Ok(Err(e))) if e.raw_os_error() == Some(libc::ENOTCONN) => MountState::Dead,
        _ => MountState::Stale,
    }
}

fn detach(p: &Path) {
    let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
}

impl SharedMounts {
    pub fn new(state: State, state_dir: &Path, owner: Option<(u32, u32)>) -> Arc<Self> {
        Arc::new(SharedMounts {
            state,
            dir: state_dir.join("fuse"),
            owner,
            lock: tokio::sync::Mutex::new(()),
            orphaned: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn mountpoint(&self, spec: &MountSpec) -> PathBuf {
        spec.mountpoint
            .clone()
            .unwrap_or_else(|| self.dir.join("mnt").join(spec.key.replace('/', ".")))
    }

    /// Whether the mount of `spec` is there and answering.
    pub async fn is_live(&self, spec: &MountSpec) -> bool {
        mount_state(&self.mountpoint(spec)).await == MountState::Live
    }

    /// The mount for `spec`, made if missing (or stale), with `holder` counted as its user.
    pub async fn acquire(&self, spec: &MountSpec, holder: &str) -> Result<PathBuf> {
        let _g = self.lock.lock().await;
        let mnt = self.mountpoint(spec);
        match mount_state(&mnt).await {
            MountState::Live => {}
            state => {
                if state != MountState::Absent {
                    tracing::warn!(key = %spec.key, ?state, "mount is stale (its process died or its server is gone); mounting again");
                    detach(&mnt);
                }
                if state == MountState::Dead {
                    // Containers of its holders keep the dead copy; an unresponsive one may
                    // still come back for them, so only a dead one ends them.
                    let held = self.holders(&spec.key).await;
                    let mut o = self.orphaned.lock().unwrap_or_else(|p| p.into_inner());
                    o.extend(held.into_iter().map(|h| (spec.key.clone(), h)));
                }
                self.mount(spec, &mnt).await?;
            }
        }
        let pool = self.state.pool();
        sqlx::query(
            "INSERT INTO fuse_mounts (key, mountpoint, linger_secs, pending_grace_secs, released_at)
             VALUES (?, ?, ?, ?, NULL)
             ON CONFLICT(key) DO UPDATE SET released_at = NULL, linger_secs = excluded.linger_secs,
             pending_grace_secs = excluded.pending_grace_secs",
        )
        .bind(&spec.key)
        .bind(mnt.to_string_lossy())
        .bind(spec.linger.as_secs() as i64)
        .bind(spec.pending_grace.as_secs() as i64)
        .execute(pool)
        .await
        .map_err(db)?;
        sqlx::query("INSERT OR IGNORE INTO fuse_mount_holders (key, holder) VALUES (?, ?)")
            .bind(&spec.key)
            .bind(holder)
            .execute(pool)
            .await
            .map_err(db)?;
        Ok(mnt)
    }

    async fn mount(&self, spec: &MountSpec, mnt: &Path) -> Result<()> {
        match &spec.how {
            Mounter::Rclone {
                remote,
                env,
                read_only,
            } => self.mount_rclone(spec, remote, env, *read_only, mnt).await,
            Mounter::Kernel {
                fstype,
                source,
                options,
                credentials,
            } => {
                mount_kernel(
                    &spec.key,
                    fstype,
                    source,
                    options,
                    credentials.as_ref(),
                    mnt,
                )
                .await
            }
        }
    }

    async fn mount_rclone(
        &self,
        spec: &MountSpec,
        remote: &str,
        env: &[(String, String)],
        read_only: bool,
        mnt: &Path,
    ) -> Result<()> {
        let err = |m: String| mount_err(&spec.key, m);
        for d in [
            mnt.to_path_buf(),
            self.dir.join("cache"),
            self.dir.join("log"),
        ] {
            std::fs::create_dir_all(&d).map_err(|e| err(format!("{}: {e}", d.display())))?;
        }
        let name = spec.key.replace('/', ".");
        let log = self.dir.join("log").join(format!("{name}.log"));
        let mut cmd = tokio::process::Command::new("rclone");
        cmd.arg("mount")
            .arg(remote)
            .arg(mnt)
            .args([
                "--allow-other",
                "--umask",
                "002",
                // Files opened only for writing (SFTP and browser uploads) stream to the
                // service instead of being completed in the cache first, and the cache is
                // capped (security review 2, G7). (Debian's rclone 1.60 has no
                // --vfs-cache-min-free-space.)
                "--vfs-cache-mode",
                "minimal",
                "--vfs-cache-max-size",
                "1G",
            ])
            .arg("--cache-dir")
            .arg(self.dir.join("cache").join(&name))
            .args([
                "--dir-cache-time",
                "5s",
                "--log-level",
                "NOTICE",
                "--log-file",
            ])
            .arg(&log);
        if read_only {
            cmd.arg("--read-only");
        }
        if let Some((uid, gid)) = self.owner {
            cmd.args(["--uid", &uid.to_string(), "--gid", &gid.to_string()]);
        }
        // Only what rclone needs: our own environment may carry settings that change its
        // behaviour (AWS_CA_BUNDLE breaks its S3 client) or secrets it has no business with.
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.dir)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group and session: a signal to the daemon's group, or the daemon
            // restarting, leaves the mount (and the sessions on it) alone.
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err(
                    "rclone is not installed (apt-get install rclone): sessions on object-store volumes mount buckets with it".into(),
                ));
            }
            Err(e) => return Err(err(format!("cannot start rclone: {e}"))),
        };
        let started = tokio::time::Instant::now();
        loop {
            if is_mount_point(mnt) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(err(format!(
                    "rclone exited ({status}) before mounting: {}",
                    tail(&log)
                )));
            }
            if started.elapsed() > MOUNT_TIMEOUT {
                let _ = child.start_kill();
                detach(mnt);
                return Err(err(format!(
                    "not mounted within {MOUNT_TIMEOUT:?}: {}",
                    tail(&log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Reap rclone when it ends (at unmount), so it leaves no zombie.
        let key = spec.key.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                tracing::debug!(key, %status, "rclone mount process ended");
            }
        });
        tracing::info!(key = %spec.key, what = %spec.shown(), mountpoint = %mnt.display(), read_only, "mounted");
        Ok(())
    }

    /// `holder` no longer needs the mounts of `volume`.
    pub async fn release(&self, volume: &str, holder: &str) {
        let _g = self.lock.lock().await;
        let (from, to) = key_range(volume);
        let pool = self.state.pool();
        let _ =
            sqlx::query("DELETE FROM fuse_mount_holders WHERE holder = ? AND key >= ? AND key < ?")
                .bind(holder)
                .bind(from)
                .bind(to)
                .execute(pool)
                .await;
        self.mark_unused(pool).await;
    }

    /// The sessions (not requests) counted as users of the mount `key`.
    async fn holders(&self, key: &str) -> Vec<String> {
        sqlx::query(
            "SELECT holder FROM fuse_mount_holders WHERE key = ? AND holder NOT LIKE 'request:%'",
        )
        .bind(key)
        .fetch_all(self.state.pool())
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// Holders of `volume`'s mounts whose FUSE process died (ENOTCONN), or that were made again
    /// after dying: the copy of the mount their containers have is dead for good (a new process
    /// makes a new mount, which a running container never sees). Each is returned once; the
    /// caller ends those sessions. A mount that is only slow (its server hangs) is not dead.
    pub async fn dead_holders(&self, volume: &str) -> Vec<String> {
        // Not under `lock`: a probe of a hung mount must not hold up sessions being made.
        let (from, to) = key_range(volume);
        let mut out: Vec<String> = {
            let mut o = self.orphaned.lock().unwrap_or_else(|p| p.into_inner());
            let (mine, rest): (Vec<_>, Vec<_>) =
                o.drain(..).partition(|(k, _)| *k >= from && *k < to);
            *o = rest;
            mine.into_iter().map(|(_, h)| h).collect()
        };
        let rows = sqlx::query(
            "SELECT key, mountpoint FROM fuse_mounts WHERE key >= ? AND key < ?
             AND key IN (SELECT key FROM fuse_mount_holders)",
        )
        .bind(from)
        .bind(to)
        .fetch_all(self.state.pool())
        .await
        .unwrap_or_default();
        for r in rows {
            let (key, mnt): (String, String) = (r.get(0), r.get(1));
            if mount_state(Path::new(&mnt)).await != MountState::Dead {
                continue;
            }
            // Again under the lock: if a new session made it again meanwhile, its holders
            // were taken as orphans, and the new holder must not be ended.
            let _g = self.lock.lock().await;
            if mount_state(Path::new(&mnt)).await == MountState::Dead {
                tracing::warn!(key, "the FUSE process of a mount in use died");
                out.extend(self.holders(&key).await);
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Holders of `volume`'s mounts that are not in `live` are gone (after a restart).
    pub async fn retain(&self, volume: &str, live: &HashSet<String>) {
        let _g = self.lock.lock().await;
        let pool = self.state.pool();
        let (from, to) = key_range(volume);
        let rows =
            sqlx::query("SELECT key, holder FROM fuse_mount_holders WHERE key >= ? AND key < ?")
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await
                .unwrap_or_default();
        for r in rows {
            let (key, holder): (String, String) = (r.get(0), r.get(1));
            if !live.contains(&holder) {
                let _ = sqlx::query("DELETE FROM fuse_mount_holders WHERE key = ? AND holder = ?")
                    .bind(&key)
                    .bind(&holder)
                    .execute(pool)
                    .await;
            }
        }
        self.mark_unused(pool).await;
    }

    async fn mark_unused(&self, pool: &sqlx::SqlitePool) {
        let _ = sqlx::query(
            "UPDATE fuse_mounts SET released_at = ? WHERE released_at IS NULL
             AND key NOT IN (SELECT key FROM fuse_mount_holders)",
        )
        .bind(now())
        .execute(pool)
        .await;
    }

    /// Holders of the previous process's requests: a request that was running when the daemon
    /// died never let go. Sessions are trimmed separately, once they are reconciled.
    pub async fn forget_request_holders(&self) {
        let _ = sqlx::query("DELETE FROM fuse_mount_holders WHERE holder LIKE 'request:%'")
            .execute(self.state.pool())
            .await;
        self.mark_unused(self.state.pool()).await;
    }

    /// Unmounts what has had no user for its linger time.
    pub async fn reap_once(&self) {
        let _g = self.lock.lock().await;
        let pool = self.state.pool();
        let now = now();
        let due = sqlx::query(
            "SELECT key, mountpoint, released_at + linger_secs + pending_grace_secs <= ?
             FROM fuse_mounts WHERE released_at IS NOT NULL
             AND released_at + linger_secs <= ? AND key NOT IN (SELECT key FROM fuse_mount_holders)",
        )
        .bind(now)
        .bind(now)
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        for r in due {
            let (key, mnt, given_up): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
            let mnt = PathBuf::from(mnt);
            let name = key.replace('/', ".");
            let cache = self.dir.join("cache").join(&name);
            if rclone_has_pending_writes(&cache) {
                if !given_up {
                    // Unmounted now, rclone would exit with these never uploaded: wait for
                    // them, for a while.
                    tracing::debug!(key, "unmount waits for rclone's pending uploads");
                    continue;
                }
                // They keep failing (a refused key, a service gone): the mount, its cache and
                // its credentials must not stay for ever (review 2, G8).
                let aside = self.dir.join("unsaved").join(&name).join(now.to_string());
                let files = set_aside_pending(&cache, &aside);
                tracing::warn!(
                    key,
                    files = ?files,
                    kept_in = %aside.display(),
                    "uploads through the mount kept failing past its pending grace: the unsaved \
                     files are set aside and the mount goes"
                );
            }
            // Detached: a process still inside (a shell of ours, a stuck reader) must not keep
            // it; rclone ends once the kernel lets go.
            detach(&mnt);
            // Our own mount points go; a remote volume's path is the operator's.
            if mnt.starts_with(&self.dir) {
                let _ = std::fs::remove_dir(&mnt);
            }
            let _ = std::fs::remove_dir_all(&cache);
            let _ = sqlx::query("DELETE FROM fuse_mounts WHERE key = ?")
                .bind(&key)
                .execute(pool)
                .await;
            tracing::info!(key, "unmounted after its linger");
        }
    }

    pub fn spawn_reaper(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => this.reap_once().await,
                }
            }
        });
    }
}

/// Whether rclone still has files written through the mount and not yet uploaded. Its VFS
/// cache keeps a metadata file per cached file (`vfsMeta/...`) with `"Dirty": true` until the
/// upload succeeds.
fn rclone_has_pending_writes(cache: &Path) -> bool {
    let mut stack = vec![cache.join("vfsMeta")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let compact: String = text.split_whitespace().collect();
                    if compact.contains("\"Dirty\":true") {
                        return true;
                    }
                }
                Err(_) => {}
            }
        }
    }
    false
}

/// Moves the files rclone could not upload (dirty in its cache) to `aside`, keeping their paths
/// in the bucket; what was moved, by those paths.
fn set_aside_pending(cache: &Path, aside: &Path) -> Vec<String> {
    let meta = cache.join("vfsMeta");
    let mut moved = Vec::new();
    let mut stack = vec![meta.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let compact: String = text.split_whitespace().collect();
            let Ok(rel) = p.strip_prefix(&meta) else {
                continue;
            };
            if !compact.contains("\"Dirty\":true") {
                continue;
            }
            let data = cache.join("vfs").join(rel);
            let to = aside.join(rel);
            let done = to
                .parent()
                .map_or(Ok(()), |d| {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(d)
                })
                .and_then(|()| std::fs::rename(&data, &to));
            match done {
                Ok(()) => moved.push(rel.to_string_lossy().into_owned()),
                Err(e) => {
                    tracing::warn!(file = %data.display(), error = %e, "cannot set an unsaved file aside")
                }
            }
        }
    }
    moved
}

/// How long mount(8) may take (a dead server can keep it for minutes).
const KERNEL_MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// The arguments of mount(8) for a kernel filesystem: secrets are in the credentials file,
/// which the options name, never in the arguments.
pub fn kernel_mount_args(
    fstype: &str,
    source: &str,
    options: &[String],
    mnt: &Path,
) -> Vec<String> {
    let mut args = vec!["-t".to_string(), fstype.to_string()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(","));
    }
    args.push(source.to_string());
    args.push(mnt.to_string_lossy().into_owned());
    args
}

async fn mount_kernel(
    key: &str,
    fstype: &str,
    source: &str,
    options: &[String],
    credentials: Option<&(PathBuf, String)>,
    mnt: &Path,
) -> Result<()> {
    let err = |m: String| mount_err(key, m);
    std::fs::create_dir_all(mnt).map_err(|e| err(format!("{}: {e}", mnt.display())))?;
    if let Some((path, content)) = credentials {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        }
        // Replaced atomically: a mount retried while another reads the file (mount.cifs, or
        // anyone checking it) never sees it empty or half written.
        crate::private_file::write(path, content.as_bytes())
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
    }
    let mut cmd = tokio::process::Command::new("mount");
    cmd.args(kernel_mount_args(fstype, source, options, mnt))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(KERNEL_MOUNT_TIMEOUT, cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(err(format!("cannot run mount: {e}"))),
        Err(_) => {
            detach(mnt);
            return Err(err(format!(
                "mount -t {fstype} {source} did not finish within {KERNEL_MOUNT_TIMEOUT:?}"
            )));
        }
    };
    if !out.status.success() {
        return Err(err(format!(
            "mount -t {fstype} {source} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    tracing::info!(key, fstype, source, mountpoint = %mnt.display(), "mounted");
    Ok(())
}

/// The end of rclone's log, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        "(rclone logged nothing)".into()
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// The keys of `volume`'s mounts ("<volume>/…") as a half-open range: `LIKE '<volume>/%'` would
/// read `_` and `%` in a volume name as wildcards and match other volumes (review 2, G9).
/// `'0'` is the byte after `'/'`.
fn key_range(volume: &str) -> (String, String) {
    (format!("{volume}/"), format!("{volume}0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_key_range_holds_only_that_volumes_keys() {
        let inside = |volume: &str, key: &str| {
            let (from, to) = key_range(volume);
            key >= from.as_str() && key < to.as_str()
        };
        assert!(inside("s3_a", "s3_a/bucket"));
        assert!(inside("s3_a", "s3_a/"));
        assert!(!inside("s3_a", "s3-a/bucket"), "_ is no wildcard");
        assert!(!inside("s3_a", "s3xa/bucket"));
        assert!(
            !inside("s3", "s3_a/bucket"),
            "a longer name is another volume"
        );
        assert!(!inside("s3%", "s3-a/bucket"), "% is no wildcard");
    }

    #[test]
    fn rclone_pending_writes_are_seen_in_its_cache_metadata() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!rclone_has_pending_writes(dir.path()));
        let meta = dir.path().join("vfsMeta/:azureblob{x}/team/a");
        std::fs::create_dir_all(&meta).unwrap();
        std::fs::write(
            meta.join("f.bin"),
            "{\n\t\"Size\": 3,\n\t\"Dirty\": true\n}",
        )
        .unwrap();
        assert!(rclone_has_pending_writes(dir.path()));
        std::fs::write(
            meta.join("f.bin"),
            "{\n\t\"Size\": 3,\n\t\"Dirty\": false\n}",
        )
        .unwrap();
        assert!(!rclone_has_pending_writes(dir.path()));
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
    }
}
