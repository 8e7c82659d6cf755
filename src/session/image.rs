//! Session images. By default the daemon builds its own from the files in `docker/` (compiled
//! into the binary, sent to Docker as an in-memory tar) on `[agent] base-image` whenever the
//! image is missing. The tag carries a digest of the build context, so a changed Dockerfile
//! means a new image. An operator may name any other image per kind instead.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{Result, SessionError};
use crate::docker::Docker;

/// One file of a build context.
pub struct ContextFile {
    pub name: &'static str,
    pub data: Vec<u8>,
    pub mode: u32,
}

pub fn sftp_context() -> std::io::Result<Vec<ContextFile>> {
    Ok(vec![
        ContextFile {
            name: "Dockerfile",
            data: include_bytes!("../../docker/sftp/Dockerfile").to_vec(),
            mode: 0o644,
        },
        ContextFile {
            name: "sshd_config",
            data: include_bytes!("../../docker/sftp/sshd_config").to_vec(),
            mode: 0o644,
        },
        ContextFile {
            name: "entrypoint.sh",
            data: include_bytes!("../../docker/sftp/entrypoint.sh").to_vec(),
            mode: 0o755,
        },
    ])
}

fn tar_of(files: &[ContextFile]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for f in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(f.data.len() as u64);
        h.set_mode(f.mode);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, f.name, f.data.as_slice())?;
    }
    b.into_inner()
}

/// `storage-agent/<name>:<version>-<digest of the context and base image>`.
pub fn tag_for(name: &str, files: &[ContextFile], base: &str) -> String {
    let mut h = Sha256::new();
    h.update(base.as_bytes());
    for f in files {
        h.update(f.name.as_bytes());
        h.update(&f.data);
    }
    let digest: String = h.finalize()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "storage-agent/{name}:{}-{digest}",
        env!("CARGO_PKG_VERSION")
    )
}

pub struct Images {
    docker: Arc<Docker>,
    base_image: String,
    /// One pull or build per image at a time, even when several sessions start at once.
    /// Presence is asked of Docker on every call, so an image pruned while the daemon runs is
    /// pulled or built again by the next session.
    pending: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The tag of our own image per kind, once built or found. Its context (for file browser
    /// sessions a multi-megabyte binary) is read and hashed again only when that image is
    /// missing, not on every session; a replaced binary takes effect at the next restart.
    built: std::sync::Mutex<HashMap<String, String>>,
}

impl Images {
    pub fn new(docker: Arc<Docker>, base_image: &str) -> Self {
        Images {
            docker,
            base_image: base_image.to_string(),
            pending: Mutex::default(),
            built: std::sync::Mutex::default(),
        }
    }

    /// Holds the per-image lock, under which the caller checks presence and fetches.
    async fn lock_image(&self, image: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .pending
            .lock()
            .await
            .entry(image.to_string())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// A registry image, pulled when it is not present.
    pub async fn pulled(&self, image: &str) -> Result<String> {
        let _one = self.lock_image(image).await;
        if !self.docker.image_exists(image).await? {
            tracing::info!(image, "pulling session image");
            self.docker.pull(image).await.map_err(|e| {
                SessionError::Unavailable(format!(
                    "image {image} is not present and cannot be pulled: {e}"
                ))
            })?;
        }
        Ok(image.to_string())
    }

    /// The image to run for a kind: the operator's (must be present) or ours (built if missing).
    pub async fn ensure(
        &self,
        name: &str,
        operator_image: Option<&str>,
        context: impl FnOnce() -> std::io::Result<Vec<ContextFile>> + Send + 'static,
    ) -> Result<String> {
        if let Some(img) = operator_image {
            if self.docker.image_exists(img).await? {
                return Ok(img.to_string());
            }
            return Err(SessionError::Unavailable(format!(
                "image {img} (configured for {name} sessions) is not present on this node"
            )));
        }
        if let Some(tag) = self.built_tag(name)
            && self.docker.image_exists(&tag).await?
        {
            return Ok(tag);
        }
        let files = tokio::task::spawn_blocking(context)
            .await
            .map_err(|e| SessionError::Internal(e.to_string()))?
            .map_err(|e| SessionError::Unavailable(e.to_string()))?;
        let tag = tag_for(name, &files, &self.base_image);
        let _one = self.lock_image(&tag).await;
        if !self.docker.image_exists(&tag).await? {
            self.build(name, &tag, &files).await?;
        }
        self.remember(name, &tag);
        Ok(tag)
    }

    fn built_tag(&self, name: &str) -> Option<String> {
        let built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        built.get(name).cloned()
    }

    fn remember(&self, name: &str, tag: &str) {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        built.insert(name.to_string(), tag.to_string());
    }

    async fn build(&self, name: &str, tag: &str, files: &[ContextFile]) -> Result<()> {
        tracing::info!(image = %tag, base = %self.base_image, "building session image");
        let started = std::time::Instant::now();
        let tar = tar_of(files).map_err(|e| SessionError::Internal(e.to_string()))?;
        self.docker
            .build_image(
                tag,
                Bytes::from(tar),
                HashMap::from([("BASE_IMAGE".to_string(), self.base_image.clone())]),
                HashMap::from([(
                    "ai.backend.storage-agent.image".to_string(),
                    name.to_string(),
                )]),
            )
            .await?;
        tracing::info!(image = %tag, secs = started.elapsed().as_secs_f32(), "session image built");
        Ok(())
    }
}
