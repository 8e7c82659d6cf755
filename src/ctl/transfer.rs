//! `ctl upload` and `ctl download`: files and whole directories, with a progress bar (bytes,
//! rate, ETA; drawn only on a terminal), resumable, and uploads checksummed.
//!
//! An upload is tus: a token minted by the manager API, PATCHes of `chunk` bytes, each with
//! `Upload-Checksum: sha256`. Its upload URL is remembered (under the cache directory, keyed by
//! the destination and the local file's size and time) until it completes, so the same command
//! run again after an interruption asks the server where it stands (HEAD) and goes on from
//! there. A download writes `<file>.part` and resumes it with a Range request.

use std::path::{Path, PathBuf};

use base64::Engine;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

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

fn io(what: &Path, e: std::io::Error) -> CtlError {
    CtlError::usage(format!("{}: {e}", what.display()))
}

/// A local file to upload: where it is, its path in the upload, its size.
type LocalFile = (PathBuf, String, u64);

/// Files (with their path relative to `base`) and directories below `base`, or `base` itself.
fn local_tree(base: &Path) -> Result<(Vec<LocalFile>, Vec<String>)> {
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

fn join(dir: &str, rel: &str) -> String {
    match dir.trim_matches('/') {
        "" | "." => rel.to_string(),
        d => format!("{d}/{rel}"),
    }
}

/// Where an unfinished upload's URL is remembered.
fn resume_file(key: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let digest = sha2::Sha256::digest(key.as_bytes());
    base.join("storage-agent/ctl-uploads")
        .join(format!("{}.url", hex(&digest[..16])))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct Upload<'a> {
    pub conn: &'a Conn,
    pub volume: &'a str,
    pub vfid: &'a str,
    pub to: &'a str,
    pub chunk: u64,
    pub quiet: bool,
}

impl Upload<'_> {
    /// Uploads `local` (a file or a directory) into `to`; returns what was uploaded.
    pub async fn run(&self, local: &Path) -> Result<Value> {
        let (files, dirs) = local_tree(local)?;
        for d in &dirs {
            let r = self
                .conn
                .mgr(
                    Method::POST,
                    "/folder/file/mkdir",
                    json!({"volume": self.volume, "vfid": self.vfid, "relpath": [join(self.to, d)],
                           "parents": true, "exist_ok": true}),
                )
                .await?;
            if let Some(failed) = r["results"]["failed"].as_array().filter(|f| !f.is_empty()) {
                return Err(CtlError::from_answer(
                    422,
                    json!({"msg": failed}).to_string().as_bytes(),
                ));
            }
        }
        let total: u64 = files.iter().map(|f| f.2).sum();
        let pb = bar(total, self.quiet);
        let mut done = Vec::new();
        for (path, rel, len) in &files {
            pb.set_message(rel.clone());
            let dst = join(self.to, rel);
            let resumed_from = self.file(path, &dst, *len, &pb).await?;
            done.push(json!({"path": dst, "size": len, "resumed_from": resumed_from}));
        }
        pb.finish_and_clear();
        Ok(json!({"uploaded": done, "bytes": total}))
    }

    /// Uploads one file; returns the offset it resumed from (0 for a fresh upload).
    async fn file(&self, local: &Path, dst: &str, len: u64, pb: &ProgressBar) -> Result<u64> {
        let meta = std::fs::metadata(local).map_err(|e| io(local, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!(
            "{}|{}|{}|{dst}|{}|{len}|{mtime}",
            self.conn.manager,
            self.volume,
            self.vfid,
            local.display()
        );
        let remembered = resume_file(&key);
        let start_pos = pb.position();
        // Resume where the server stands, if this upload was started before.
        let mut offset = 0;
        let mut url = None;
        if let Ok(u) = std::fs::read_to_string(&remembered)
            && let Some(o) = self.server_offset(u.trim()).await
        {
            offset = o;
            url = Some(u.trim().to_string());
        }
        let url = match url {
            Some(u) => u,
            None => {
                let t = self
                    .conn
                    .mgr(
                        Method::POST,
                        "/folder/file/upload",
                        json!({"volume": self.volume, "vfid": self.vfid, "relpath": dst, "size": len}),
                    )
                    .await?;
                let token = t["token"].as_str().unwrap_or_default();
                let u = format!("{}/upload?token={token}", self.conn.client);
                if let Some(dir) = remembered.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let _ = crate::private_file::write(&remembered, u.as_bytes());
                u
            }
        };
        pb.set_position(start_pos + offset);
        let resumed_from = offset;
        let mut f = tokio::fs::File::open(local)
            .await
            .map_err(|e| io(local, e))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| io(local, e))?;
        // Right after an interruption the server may still be finishing the last PATCH: it
        // answers 423 (locked) or 409 (its offset moved since our HEAD). Both end by
        // themselves: ask again where it stands, with backoff, for a bounded time.
        let retry_until = std::time::Instant::now() + SETTLE;
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let n = self.chunk.min(len - offset) as usize;
            let mut buf = vec![0u8; n];
            f.read_exact(&mut buf).await.map_err(|e| io(local, e))?;
            let sum = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&buf));
            // Sent in slices, so the bar moves with the bytes, not per chunk.
            let data = bytes::Bytes::from(buf);
            let pbc = pb.clone();
            let slices: Vec<bytes::Bytes> = (0..n)
                .step_by(256 << 10)
                .map(|s| data.slice(s..(s + (256 << 10)).min(n)))
                .collect();
            let body = futures::stream::iter(slices).map(move |s| {
                pbc.inc(s.len() as u64);
                Ok::<_, std::io::Error>(s)
            });
            let r = self
                .conn
                .http
                .patch(&url)
                .header("Tus-Resumable", "1.0.0")
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", offset.to_string())
                .header("Upload-Checksum", format!("sha256 {sum}"))
                .header("Content-Length", n)
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    return Err(CtlError::interrupted(format!(
                        "{dst}: the upload stopped at {offset} of {len} bytes ({e}); run the same command again to resume"
                    )));
                }
            };
            let status = r.status();
            if matches!(status.as_u16(), 409 | 423) && std::time::Instant::now() < retry_until {
                drop(r);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                if let Some(o) = self.server_offset(&url).await {
                    offset = o;
                    f.seek(std::io::SeekFrom::Start(offset))
                        .await
                        .map_err(|e| io(local, e))?;
                }
                pb.set_position(start_pos + offset);
                if offset >= len {
                    break;
                }
                continue;
            }
            if status.as_u16() != 204 {
                pb.set_position(start_pos + offset);
                let body = r.bytes().await.unwrap_or_default();
                let mut e = CtlError::from_answer(status.as_u16(), &body);
                e.message = format!("{dst}: {}", e.message);
                return Err(e);
            }
            offset = r
                .headers()
                .get("upload-offset")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(offset + n as u64);
            pb.set_position(start_pos + offset);
            if offset >= len {
                break;
            }
        }
        let _ = std::fs::remove_file(&remembered);
        Ok(resumed_from)
    }
}

impl Upload<'_> {
    /// Where the server stands on an upload (HEAD), or None when it does not know it.
    async fn server_offset(&self, url: &str) -> Option<u64> {
        let r = self
            .conn
            .http
            .head(url)
            .header("Tus-Resumable", "1.0.0")
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

/// How long an upload waits for the server to settle a PATCH it was still finishing.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(30);

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
