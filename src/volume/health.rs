//! Whether a volume is usable (Backend.AI issue #14220: the Python proxy reports vfs/xfs healthy
//! unconditionally, and a dead NFS mount hangs `statvfs` and every request behind it).
//!
//! Each local volume is checked periodically on a thread of its own: `statvfs` (under a
//! timeout), the device id of the mount path against the one seen at start (an unmounted volume
//! shows the mount point's filesystem instead), and a marker file written and read back. An
//! object-store volume is checked with one signed request to its service (under the same
//! timeout): unreachable or refusing our credentials is offline. The verdict is cached:
//! `/volume/hwinfo`, `/readyz` and heartbeats read the cache, so they never touch a hung mount
//! or a dead endpoint, and requests for an offline volume fail at once instead of hanging.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::VolumeStatus;

const MARKER: &str = ".storage-agent-health";

#[derive(Debug, Clone)]
pub struct Verdict {
    pub status: VolumeStatus,
    pub reason: Option<String>,
    pub checked_at: chrono::DateTime<chrono::Utc>,
}

/// One request that shows a remote service answers and accepts us.
#[async_trait]
pub trait RemoteProbe: Send + Sync {
    async fn probe(&self) -> Result<(), String>;
}

/// What is checked for a volume.
pub enum Target {
    /// A directory on this host.
    Path(PathBuf),
    /// A remote service.
    Remote(Arc<dyn RemoteProbe>),
}

struct Watched {
    path: PathBuf,
    remote: Option<Arc<dyn RemoteProbe>>,
    initial_dev: Option<u64>,
    /// Set while a check runs; a check that never returns keeps it set (the thread is stuck in
    /// the kernel) and no second thread is started behind it.
    running_since: Arc<Mutex<Option<Instant>>>,
}

pub struct VolumeHealth {
    watched: HashMap<String, Watched>,
    verdicts: RwLock<HashMap<String, Verdict>>,
    timeout: Duration,
    node_id: String,
}

fn verdict(status: VolumeStatus, reason: Option<String>) -> Verdict {
    Verdict {
        status,
        reason,
        checked_at: chrono::Utc::now(),
    }
}

/// The blocking part of one check.
fn probe(path: &Path, initial_dev: Option<u64>, node_id: &str) -> Verdict {
    if let Err(e) = nix::sys::statvfs::statvfs(path) {
        return verdict(VolumeStatus::Offline, Some(format!("statvfs failed: {e}")));
    }
    match (std::fs::metadata(path), initial_dev) {
        (Err(e), _) => {
            return verdict(
                VolumeStatus::Offline,
                Some(format!("cannot stat the mount path: {e}")),
            );
        }
        (Ok(m), Some(dev)) if m.dev() != dev => {
            return verdict(
                VolumeStatus::Offline,
                Some(format!(
                    "the mount path is on another device than at start ({} instead of {dev}): unmounted?",
                    m.dev()
                )),
            );
        }
        _ => {}
    }
    let marker = path.join(MARKER);
    let nonce = format!("{node_id} {}\n", chrono::Utc::now().to_rfc3339());
    if let Err(e) = std::fs::write(&marker, &nonce) {
        return verdict(
            VolumeStatus::Degraded,
            Some(format!(
                "cannot write the marker file {}: {e}",
                marker.display()
            )),
        );
    }
    match std::fs::read_to_string(&marker) {
        Ok(back) if back == nonce => verdict(VolumeStatus::Healthy, None),
        Ok(_) => verdict(
            VolumeStatus::Degraded,
            Some("the marker file read back different content".into()),
        ),
        Err(e) => verdict(
            VolumeStatus::Degraded,
            Some(format!("cannot read the marker file back: {e}")),
        ),
    }
}

impl VolumeHealth {
    /// `targets`: volume name → what to check. The device ids seen now are the reference.
    pub fn new(targets: Vec<(String, Target)>, timeout: Duration, node_id: &str) -> Arc<Self> {
        let mut watched = HashMap::new();
        let mut verdicts = HashMap::new();
        for (name, target) in targets {
            let (path, remote) = match target {
                Target::Path(p) => (p, None),
                Target::Remote(r) => (PathBuf::new(), Some(r)),
            };
            watched.insert(
                name.clone(),
                Watched {
                    initial_dev: remote
                        .is_none()
                        .then(|| std::fs::metadata(&path).ok().map(|m| m.dev()))
                        .flatten(),
                    path,
                    remote,
                    running_since: Arc::default(),
                },
            );
            verdicts.insert(
                name.clone(),
                verdict(VolumeStatus::Healthy, Some("not checked yet".into())),
            );
        }
        Arc::new(VolumeHealth {
            watched,
            verdicts: RwLock::new(verdicts),
            timeout,
            node_id: node_id.to_string(),
        })
    }

    pub fn verdict(&self, name: &str) -> Option<Verdict> {
        self.verdicts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Offline volumes refuse work at once; degraded ones still serve (reads may work).
    pub fn gate(&self, name: &str) -> Result<(), String> {
        match self.verdict(name) {
            Some(v) if v.status == VolumeStatus::Offline => {
                Err(v.reason.unwrap_or_else(|| "offline".into()))
            }
            _ => Ok(()),
        }
    }

    async fn check(&self, name: &str, w: &Watched) -> Verdict {
        if let Some(r) = &w.remote {
            return match tokio::time::timeout(self.timeout, r.probe()).await {
                Ok(Ok(())) => verdict(VolumeStatus::Healthy, None),
                Ok(Err(e)) => verdict(VolumeStatus::Offline, Some(format!("the service: {e}"))),
                Err(_) => verdict(
                    VolumeStatus::Offline,
                    Some(format!(
                        "the service did not answer within {:?}",
                        self.timeout
                    )),
                ),
            };
        }
        {
            let running = w.running_since.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(since) = *running {
                return verdict(
                    VolumeStatus::Offline,
                    Some(format!(
                        "a health check has been blocked for {}s (hung mount?)",
                        since.elapsed().as_secs()
                    )),
                );
            }
        }
        *w.running_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (path, dev, node, flag) = (
            w.path.clone(),
            w.initial_dev,
            self.node_id.clone(),
            w.running_since.clone(),
        );
        // A thread of its own: a hung mount may keep it in the kernel forever, and it must not
        // take a runtime or blocking-pool thread with it.
        let spawned = std::thread::Builder::new()
            .name(format!("volume-check-{name}"))
            .spawn(move || {
                let v = probe(&path, dev, &node);
                *flag.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let _ = tx.send(v);
            });
        if let Err(e) = spawned {
            *w.running_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return verdict(
                VolumeStatus::Degraded,
                Some(format!("cannot start a check: {e}")),
            );
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => verdict(VolumeStatus::Degraded, Some("the check thread died".into())),
            Err(_) => verdict(
                VolumeStatus::Offline,
                Some(format!(
                    "statvfs/marker check did not finish within {:?} (hung mount?)",
                    self.timeout
                )),
            ),
        }
    }

    pub async fn check_all(&self) {
        for (name, w) in &self.watched {
            let v = self.check(name, w).await;
            let previous = self.verdict(name);
            if previous.as_ref().map(|p| (p.status, &p.reason)) != Some((v.status, &v.reason)) {
                match v.status {
                    VolumeStatus::Healthy => tracing::info!(volume = %name, "volume healthy"),
                    s => {
                        tracing::warn!(volume = %name, status = s.as_str(), reason = ?v.reason, "volume unhealthy")
                    }
                }
            }
            self.verdicts
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), v);
        }
    }

    pub fn spawn(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => this.check_all().await,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthy_then_degraded_when_read_only() {
        let d = tempfile::tempdir().unwrap();
        let h = VolumeHealth::new(
            vec![("v".into(), Target::Path(d.path().to_path_buf()))],
            Duration::from_secs(2),
            "n",
        );
        h.check_all().await;
        assert_eq!(h.verdict("v").unwrap().status, VolumeStatus::Healthy);
        assert!(h.gate("v").is_ok());
        // A directory that is gone: offline, and requests are refused at once.
        drop(d);
        h.check_all().await;
        let v = h.verdict("v").unwrap();
        assert_eq!(v.status, VolumeStatus::Offline, "{v:?}");
        assert!(h.gate("v").is_err());
    }
}
