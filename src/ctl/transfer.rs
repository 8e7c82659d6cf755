//! `ctl upload` and `ctl download`: files and whole directories, with a progress bar (bytes,
//! rate, ETA; drawn only on a terminal), resumable. Uploads are in `upload.rs`; this file has
//! downloads and what both share (the bar, local trees, paths).
//!
//! A download writes `<file>.part` and resumes it with a Range request.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::conn::Conn;
use super::out::{CtlError, Result};

pub fn bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    // indicatif draws to stderr only when it is a terminal.
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(
            "{msg:24!} {bar:30} {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

pub(super) fn io(what: &Path, e: std::io::Error) -> CtlError {
    CtlError::usage(format!("{}: {e}", what.display()))
}

/// A local file to upload: where it is, its path in the upload, its size.
pub(super) type LocalFile = (PathBuf, String, u64);

/// Files (with their path relative to `base`) and directories below `base`, or `base` itself.
pub(super) fn local_tree(base: &Path) -> Result<(Vec<LocalFile>, Vec<String>)> {
    let meta = std::fs::metadata(base).map_err(|e| io(base, e))?;
    if meta.is_file() {
        let name = base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok((vec![(base.to_path_buf(), name, meta.len())], Vec::new()));
    }
    let top = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (mut files, mut dirs) = (Vec::new(), vec![top.clone()]);
    let mut stack = vec![(base.to_path_buf(), top)];
    while let Some((dir, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = format!("{rel}/{name}");
            let t = e.file_type().map_err(|er| io(&e.path(), er))?;
            if t.is_dir() {
                dirs.push(r.clone());
                stack.push((e.path(), r));
            } else if t.is_file() {
                let len = e.metadata().map_err(|er| io(&e.path(), er))?.len();
                files.push((e.path(), r, len));
            }
        }
    }
    Ok((files, dirs))
}

pub(super) fn join(dir: &str, rel: &str) -> String {
    match dir.trim_matches('/') {
        "" | "." => rel.to_string(),
        d => format!("{d}/{rel}"),
    }
}

pub struct Download<'a> {
    pub conn: &'a Conn,
    pub volume: &'a str,
    pub vfid: &'a str,
    pub quiet: bool,
}

impl Download<'_> {
    /// Remote files below `remote` (itself when it is a file): (relpath, size), and the
    /// directories below it (so empty ones are made too).
    async fn remote_tree(&self, remote: &str) -> Result<(Vec<(String, u64)>, Vec<String>)> {
        let list = |dir: String| async move {
            self.conn
                .mgr(
                    Method::POST,
                    "/folder/file/list",
                    json!({"volume": self.volume, "vfid": self.vfid, "relpath": dir}),
                )
                .await
        };
        let first = list(remote.to_string()).await;
        let Ok(first) = first else {
            // Not a directory: a file (its size comes with the download).
            return Ok((vec![(remote.to_string(), 0)], Vec::new()));
        };
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        let mut stack = vec![(remote.to_string(), first)];
        while let Some((dir, listing)) = stack.pop() {
            for item in listing["items"].as_array().cloned().unwrap_or_default() {
                let name = item["name"].as_str().unwrap_or_default();
                let path = join(&dir, name);
                match item["type"].as_str() {
                    Some("DIRECTORY") => {
                        let sub = list(path.clone()).await?;
                        dirs.push(path.clone());
                        stack.push((path, sub));
                    }
                    Some("FILE") => files.push((path, item["stat"]["size"].as_u64().unwrap_or(0))),
                    _ => {}
                }
            }
        }
        Ok((files, dirs))
    }

    pub async fn run(&self, remote: &str, local: &Path) -> Result<Value> {
        let (files, dirs) = self.remote_tree(remote).await?;
        let single = dirs.is_empty() && files.len() == 1 && files[0].0 == remote;
        let total: u64 = files.iter().map(|f| f.1).sum();
        let pb = bar(total, self.quiet);
        let mut done = Vec::new();
        let base = remote.trim_matches('/');
        // Like `cp -r`: into an existing directory under the remote's own name.
        let name = Path::new(base).file_name().unwrap_or_default();
        let root = if local.is_dir() && !name.is_empty() {
            local.join(name)
        } else {
            local.to_path_buf()
        };
        let under_root = |path: &str| {
            let rel = path
                .strip_prefix(base)
                .unwrap_or(path)
                .trim_start_matches('/');
            root.join(rel)
        };
        if !single {
            // Every directory, empty ones too: a tree downloaded and uploaded again is the same.
            for d in std::iter::once(base.to_string()).chain(dirs.iter().cloned()) {
                let dir = under_root(&d);
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| io(&dir, e))?;
            }
        }
        for (path, _) in &files {
            let target = if single {
                if local.is_dir() {
                    local.join(Path::new(path).file_name().unwrap_or_default())
                } else {
                    local.to_path_buf()
                }
            } else {
                under_root(path)
            };
            pb.set_message(path.clone());
            let n = self.file(path, &target, &pb).await?;
            done.push(json!({"path": path, "to": target.display().to_string(), "size": n}));
        }
        pb.finish_and_clear();
        Ok(json!({"downloaded": done}))
    }

    async fn file(&self, remote: &str, target: &Path, pb: &ProgressBar) -> Result<u64> {
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| io(dir, e))?;
        }
        let part = PathBuf::from(format!("{}.part", target.display()));
        let have = tokio::fs::metadata(&part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let t = self
            .conn
            .mgr(
                Method::POST,
                "/folder/file/download",
                json!({"volume": self.volume, "vfid": self.vfid, "relpath": remote}),
            )
            .await?;
        let url = format!(
            "{}/download?token={}",
            self.conn.client,
            t["token"].as_str().unwrap_or_default()
        );
        let mut req = self.conn.http.get(&url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let r = req
            .send()
            .await
            .map_err(|e| CtlError::unavailable(format!("{remote}: {e}")))?;
        let status = r.status().as_u16();
        let (mut f, mut got) = match status {
            206 => (
                tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(&part)
                    .await
                    .map_err(|e| io(&part, e))?,
                have,
            ),
            200 => (
                tokio::fs::File::create(&part)
                    .await
                    .map_err(|e| io(&part, e))?,
                0,
            ),
            // The part already holds everything.
            416 if have > 0 => {
                tokio::fs::rename(&part, target)
                    .await
                    .map_err(|e| io(target, e))?;
                return Ok(have);
            }
            _ => {
                let body = r.bytes().await.unwrap_or_default();
                let mut e = CtlError::from_answer(status, &body);
                e.message = format!("{remote}: {}", e.message);
                return Err(e);
            }
        };
        pb.inc(got);
        let mut body = r.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                CtlError::interrupted(format!(
                    "{remote}: the download stopped at {got} bytes ({e}); run the same command again to resume"
                ))
            })?;
            f.write_all(&chunk).await.map_err(|e| io(&part, e))?;
            got += chunk.len() as u64;
            pb.inc(chunk.len() as u64);
        }
        f.sync_all().await.map_err(|e| io(&part, e))?;
        tokio::fs::rename(&part, target)
            .await
            .map_err(|e| io(target, e))?;
        Ok(got)
    }
}
