//! The local buffer files of object uploads, `<state-dir>/objects/<volume>/<session>.<base>`:
//! where they are, how much they hold, and their removal (an upload's own when it is forgotten,
//! and at start those no upload owns any more).

use std::path::PathBuf;

use super::staging::{ObjectStaging, Upload, db};
use crate::volume::{Result, VolumeError};

impl ObjectStaging {
    pub(super) fn buffer(&self, session: &str, base: u64) -> PathBuf {
        self.shared.local_dir.join(format!("{session}.{base}"))
    }

    pub(super) async fn buffer_len(&self, session: &str, base: u64) -> u64 {
        tokio::fs::metadata(self.buffer(session, base))
            .await
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Bytes held locally after `up.base`: the buffer there and, after a PATCH cut off while
    /// its parts were on their way up, the full buffers that follow it (one part each).
    pub(super) async fn held(&self, session: &str, up: &Upload) -> u64 {
        let mut total = 0;
        loop {
            let len = self.buffer_len(session, up.base + total).await;
            total += len;
            if len == 0 || len != up.part_size {
                return total;
            }
        }
    }

    /// The local buffers after `up.base`, in order: (where each starts, its length).
    pub(super) async fn buffers(&self, session: &str, up: &Upload) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = up.base;
        loop {
            let len = self.buffer_len(session, at).await;
            out.push((at, len));
            if len == 0 || len != up.part_size {
                return out;
            }
            at += len;
        }
    }

    /// Removes the buffers of uploads we keep no row for: a buffer is only ever made after its
    /// upload's row, so one without a row is what a crash inside `forget` left behind, and
    /// nothing will read it again. Run at start, before any request: an upload made again
    /// under the same session meanwhile would otherwise find its buffer unlinked.
    pub(super) async fn remove_orphan_buffers(&self) -> Result<usize> {
        let mut listed = Vec::new();
        if let Ok(mut dir) = tokio::fs::read_dir(&self.shared.local_dir).await {
            while let Ok(Some(e)) = dir.next_entry().await {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some((session, base)) = name.rsplit_once('.')
                    && !base.is_empty()
                    && base.bytes().all(|b| b.is_ascii_digit())
                {
                    listed.push((session.to_string(), e.path()));
                }
            }
        }
        if listed.is_empty() {
            return Ok(0);
        }
        let known: std::collections::HashSet<String> =
            sqlx::query_scalar("SELECT session FROM object_uploads WHERE volume = ?")
                .bind(self.volume())
                .fetch_all(self.shared.state.pool())
                .await
                .map_err(db)?
                .into_iter()
                .collect();
        let mut removed = 0;
        for (session, path) in listed {
            if !known.contains(&session) {
                tracing::info!(session, path = %path.display(), "removing the buffer of an upload we keep no row for");
                if tokio::fs::remove_file(&path).await.is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Before an upload is put in place: its stored parts and local buffers hold exactly its
    /// `size` bytes (a buffer lost under it would otherwise complete a short object).
    pub(super) async fn check_whole(&self, session: &str, up: &Upload, size: u64) -> Result<()> {
        let held = up.base + self.held(session, up).await;
        if held != size {
            return Err(VolumeError::Internal(format!(
                "upload {session} holds {held} bytes, not the {size} it is complete at"
            )));
        }
        Ok(())
    }

    pub(super) async fn remove_buffers(&self, session: &str) {
        let Ok(mut dir) = tokio::fs::read_dir(&self.shared.local_dir).await else {
            return;
        };
        let prefix = format!("{session}.");
        while let Ok(Some(e)) = dir.next_entry().await {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
    }
}
