//! Session images. By default the daemon builds its own from the files in `docker/` (compiled
//! into the binary, sent to Docker as an in-memory tar) on `[agent] base-image`, once, when the
//! image is missing. The tag carries a digest of the build context, so a changed Dockerfile
//! means a new image. An operator may name any other image per kind instead.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OnceCell};

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
    /// One build per tag, even when several sessions start at once.
    builds: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
}

impl Images {
    pub fn new(docker: Arc<Docker>, base_image: &str) -> Self {
        Images {
            docker,
            base_image: base_image.to_string(),
            builds: Mutex::default(),
        }
    }

    /// A registry image, pulled when it is not present (once at a time per image).
    pub async fn pulled(&self, image: &str) -> Result<String> {
        let cell = self
            .builds
            .lock()
            .await
            .entry(image.to_string())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            if !self.docker.image_exists(image).await? {
                tracing::info!(image, "pulling session image");
                self.docker.pull(image).await.map_err(|e| {
                    SessionError::Unavailable(format!(
                        "image {image} is not present and cannot be pulled: {e}"
                    ))
                })?;
            }
            Ok::<(), SessionError>(())
        })
        .await?;
        Ok(image.to_string())
    }

    /// The image to run for a kind: the operator's (must be present) or ours (built if missing).
    pub async fn ensure(
        &self,
        name: &str,
        operator_image: Option<&str>,
        context: impl FnOnce() -> std::io::Result<Vec<ContextFile>>,
    ) -> Result<String> {
        if let Some(img) = operator_image {
            if self.docker.image_exists(img).await? {
                return Ok(img.to_string());
            }
            return Err(SessionError::Unavailable(format!(
                "image {img} (configured for {name} sessions) is not present on this node"
            )));
        }
        let files = context().map_err(|e| SessionError::Unavailable(e.to_string()))?;
        let tag = tag_for(name, &files, &self.base_image);
        let cell = self
            .builds
            .lock()
            .await
            .entry(tag.clone())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            if self.docker.image_exists(&tag).await? {
                return Ok(());
            }
            tracing::info!(image = %tag, base = %self.base_image, "building session image");
            let started = std::time::Instant::now();
            let tar = tar_of(&files).map_err(|e| SessionError::Internal(e.to_string()))?;
            self.docker
                .build_image(
                    &tag,
                    Bytes::from(tar),
                    HashMap::from([("BASE_IMAGE".to_string(), self.base_image.clone())]),
                    HashMap::from([(
                        "ai.backend.storage-agent.image".to_string(),
                        name.to_string(),
                    )]),
                )
                .await?;
            tracing::info!(image = %tag, secs = started.elapsed().as_secs_f32(), "session image built");
            Ok::<(), SessionError>(())
        })
        .await?;
        Ok(tag)
    }
}
