//! `ctl upload`: files and whole directories over tus, resumable, every PATCH checksummed.
//!
//! A file is uploaded with a token minted by the manager API, in PATCHes of `chunk` bytes, each
//! with `Upload-Checksum: sha256`. A big file goes as `streams` partial uploads sent at once
//! (tus concatenation), joined by one final upload when all are in: one TCP stream leaves most
//! of a long or lossy path unused. The partials are cut at whole MiB, so a filesystem that
//! reflinks joins them without copying, and made one after the other, so the server sees them
//! in file order.
//!
//! What it is doing is remembered (under the cache directory, keyed by the destination and the
//! local file's size and time) until the file is complete: the same command run again after an
//! interruption asks the server where each stream stands (HEAD) and goes on from there. A server
//! or volume without concatenation gets one stream.

use std::path::{Path, PathBuf};

use base64::Engine;
use futures::StreamExt;
use indicatif::ProgressBar;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::conn::Conn;
use super::out::{CtlError, Result};
use super::transfer::{bar, io, join, local_tree};

/// Files smaller than this go in one stream whatever `streams` says: below it a stream's setup
/// costs more than its share of the bandwidth gains.
const PARALLEL_MIN: u64 = 64 << 20;
/// Partial uploads start at multiples of this, at least: reflinks need block-aligned offsets,
/// and an S3 volume puts a partial straight into the destination's multipart upload when it
/// starts at a whole number of parts (power-of-two part sizes up to this, or, for uploads so
/// big that parts must be larger, at least the size 10 000 parts need).
const ALIGN: u64 = 64 << 20;

/// Where streams of a `len`-byte file may start: a multiple of `ALIGN` and of the part size S3
/// needs for `len` bytes in 10 000 parts (rounded up to a power of two, as the server does).
fn align_for(len: u64) -> u64 {
    let needed = (len.div_ceil(10_000).div_ceil(1 << 20) << 20).next_power_of_two();
    ALIGN.max(needed)
}
/// How long an upload waits for the server to settle a PATCH it was still finishing.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Where an unfinished upload is remembered.
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

/// An unfinished upload as remembered: the token's upload URL and, when it goes in streams,
/// each partial upload's URL and the range of the file it carries.
#[derive(Serialize, Deserialize, Default)]
struct Saved {
    url: String,
    #[serde(default)]
    partials: Vec<Stream>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Stream {
    url: String,
    /// Where its bytes start in the file, and how many.
    start: u64,
    len: u64,
}

impl Saved {
    fn read(path: &Path) -> Option<Saved> {
        let text = std::fs::read_to_string(path).ok()?;
        // A plain URL: what versions before streams remembered.
        serde_json::from_str(&text).ok().or_else(|| {
            Some(Saved {
                url: text.trim().to_string(),
                partials: Vec::new(),
            })
        })
    }

    fn write(&self, path: &Path) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(text) = serde_json::to_vec(self) {
            let _ = crate::private_file::write(path, &text);
        }
    }
}

/// `len` bytes cut into at most `n` ranges starting at multiples of `align_for(len)` (the last
/// takes the rest).
fn cut(len: u64, n: u64) -> Vec<(u64, u64)> {
    let align = align_for(len);
    let each = len.div_ceil(n.max(1)).div_ceil(align) * align;
    let mut v = Vec::new();
    let mut start = 0;
    while start < len {
        let l = each.min(len - start);
        v.push((start, l));
        start += l;
    }
    v
}

enum Split {
    Done(Saved),
    /// The server holds partial uploads of this token that were not remembered.
    Orphaned(Saved),
}

pub struct Upload<'a> {
    pub conn: &'a Conn,
    pub volume: &'a str,
    pub vfid: &'a str,
    pub to: &'a str,
    pub chunk: u64,
    /// Partial uploads sent at once for a big file.
    pub streams: u64,
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
            let (resumed_from, streams) = self.file(path, &dst, *len, &pb).await?;
            done.push(
                json!({"path": dst, "size": len, "resumed_from": resumed_from,
                             "streams": streams}),
            );
        }
        pb.finish_and_clear();
        Ok(json!({"uploaded": done, "bytes": total}))
    }

    /// Uploads one file; returns the bytes it resumed from (0 for a fresh upload) and the
    /// streams it went in.
    async fn file(
        &self,
        local: &Path,
        dst: &str,
        len: u64,
        pb: &ProgressBar,
    ) -> Result<(u64, usize)> {
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
        // Resume where the server stands, if this upload was started before and the server
        // still knows it.
        let (saved, at) = match Saved::read(&remembered) {
            Some(s) => match self.server_offset(&s.url).await {
                Some(o) => (s, o),
                None => (self.mint(dst, len).await?, 0),
            },
            None => (self.mint(dst, len).await?, 0),
        };
        saved.write(&remembered);
        let covered: u64 = saved.partials.iter().map(|p| p.len).sum();
        let saved = if at == 0 && covered < len && self.streams > 1 && len >= PARALLEL_MIN {
            match self.split(saved, len, &remembered).await? {
                Split::Done(s) => s,
                // A partial upload was made but its answer lost (an interruption while they
                // were being made): it holds a share nobody can name. Start over with a new
                // token; terminating the old one takes its partials along.
                Split::Orphaned(old) => {
                    let _ = self
                        .conn
                        .http
                        .delete(&old.url)
                        .header("Tus-Resumable", "1.0.0")
                        .send()
                        .await;
                    let fresh = self.mint(dst, len).await?;
                    fresh.write(&remembered);
                    match self.split(fresh, len, &remembered).await? {
                        Split::Done(s) => s,
                        Split::Orphaned(_) => {
                            return Err(CtlError::usage(format!(
                                "{dst}: the server refused the partial uploads of a fresh token"
                            )));
                        }
                    }
                }
            }
        } else {
            saved
        };
        let resumed_from = if saved.partials.is_empty() {
            let s = Stream {
                url: saved.url.clone(),
                start: 0,
                len,
            };
            self.send(local, dst, &s, at, pb).await?;
            at
        } else if at == len {
            // Joined already: the final upload was made, its answer lost.
            pb.inc(len);
            len
        } else {
            self.streams_and_join(local, dst, &saved, pb).await?
        };
        let _ = std::fs::remove_file(&remembered);
        Ok((resumed_from, saved.partials.len().max(1)))
    }

    async fn mint(&self, dst: &str, len: u64) -> Result<Saved> {
        let t = self
            .conn
            .mgr(
                Method::POST,
                "/folder/file/upload",
                json!({"volume": self.volume, "vfid": self.vfid, "relpath": dst, "size": len}),
            )
            .await?;
        let token = t["token"].as_str().unwrap_or_default();
        Ok(Saved {
            url: format!("{}/upload?token={token}", self.conn.client),
            partials: Vec::new(),
        })
    }

    /// Creates the partial uploads the file still lacks, in file order, remembering each at
    /// once; a server or volume without concatenation (501, or an old server's 400 for the
    /// header) leaves the upload in one stream.
    async fn split(&self, mut saved: Saved, len: u64, remembered: &Path) -> Result<Split> {
        // Ranges as the first run cut them (the same size each), from where they stop.
        let each = match saved.partials.first() {
            Some(p) => p.len,
            None => cut(len, self.streams).first().map(|c| c.1).unwrap_or(len),
        };
        let mut start: u64 = saved.partials.iter().map(|p| p.len).sum();
        while start < len {
            let l = each.min(len - start);
            let r = self
                .conn
                .http
                .post(&saved.url)
                .header("Tus-Resumable", "1.0.0")
                .header("Upload-Concat", "partial")
                .header("Upload-Length", l)
                // Where it goes in the file: an S3 volume can then put its bytes straight into
                // place (no copy when joining).
                .header("Storage-Agent-Partial-Offset", start)
                .send()
                .await
                .map_err(|e| {
                    CtlError::interrupted(format!(
                        "creating a partial upload: {e}; run the same command again to resume"
                    ))
                })?;
            let status = r.status().as_u16();
            let location = r
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match (status, location) {
                (201, Some(loc)) => {
                    saved.partials.push(Stream {
                        url: format!("{}/{}", self.conn.client, loc.trim_start_matches('/')),
                        start,
                        len: l,
                    });
                    saved.write(remembered);
                }
                (400 | 501, _) if saved.partials.is_empty() => return Ok(Split::Done(saved)),
                (413, _) => return Ok(Split::Orphaned(saved)),
                _ => {
                    let body = r.bytes().await.unwrap_or_default();
                    return Err(CtlError::from_answer(status, &body));
                }
            }
            start += l;
        }
        Ok(Split::Done(saved))
    }

    /// Sends what each partial upload lacks, all at once, then the final upload; returns the
    /// bytes the server held already.
    async fn streams_and_join(
        &self,
        local: &Path,
        dst: &str,
        saved: &Saved,
        pb: &ProgressBar,
    ) -> Result<u64> {
        let mut held = Vec::with_capacity(saved.partials.len());
        for p in &saved.partials {
            match self.server_offset(&p.url).await {
                Some(o) => held.push(o),
                None => {
                    return Err(CtlError::interrupted(format!(
                        "{dst}: a partial upload is gone from the server (expired?); run the same \
                         command again to start over"
                    )));
                }
            }
        }
        let resumed_from: u64 = held.iter().sum();
        let sends = saved
            .partials
            .iter()
            .zip(&held)
            .map(|(p, at)| self.send(local, dst, p, *at, pb));
        futures::future::try_join_all(sends).await?;
        let urls: Vec<&str> = saved.partials.iter().map(|p| p.url.as_str()).collect();
        let r = self
            .conn
            .http
            .post(&saved.url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", format!("final;{}", urls.join(" ")))
            .send()
            .await
            .map_err(|e| {
                CtlError::interrupted(format!(
                    "{dst}: joining the streams stopped ({e}); run the same command again to \
                     finish"
                ))
            })?;
        if r.status().as_u16() != 201 {
            let status = r.status().as_u16();
            let body = r.bytes().await.unwrap_or_default();
            let mut e = CtlError::from_answer(status, &body);
            e.message = format!("{dst}: {}", e.message);
            return Err(e);
        }
        Ok(resumed_from)
    }

    /// Sends the bytes of `s` from `offset` (what the server holds) to its end, in checksummed
    /// PATCHes of `chunk` bytes, moving the bar with the bytes.
    async fn send(
        &self,
        local: &Path,
        dst: &str,
        s: &Stream,
        mut offset: u64,
        pb: &ProgressBar,
    ) -> Result<()> {
        let len = s.len;
        // An object volume holds a checksummed body back until it is verified, so it takes
        // them no longer than a part: its HEAD says how long.
        let mut chunk = match self.head(&s.url).await {
            Some(h) => header_u64(&h, "storage-agent-max-checksummed-body")
                .filter(|m| *m > 0)
                .map_or(self.chunk, |m| m.min(self.chunk)),
            None => self.chunk,
        };
        let mut shown = offset;
        pb.inc(offset);
        let mut f = tokio::fs::File::open(local)
            .await
            .map_err(|e| io(local, e))?;
        // Right after an interruption the server may still be finishing the last PATCH: it
        // answers 423 (locked) or 409 (its offset moved since our HEAD). Both end by
        // themselves: ask again where it stands, with backoff, for a bounded time.
        let retry_until = std::time::Instant::now() + SETTLE;
        let mut backoff = std::time::Duration::from_millis(100);
        let resync = |shown: &mut u64, to: u64| {
            if to >= *shown {
                pb.inc(to - *shown);
            } else {
                pb.dec(*shown - to);
            }
            *shown = to;
        };
        if offset >= len && len > 0 {
            return Ok(());
        }
        loop {
            f.seek(std::io::SeekFrom::Start(s.start + offset))
                .await
                .map_err(|e| io(local, e))?;
            let n = chunk.min(len - offset) as usize;
            let mut buf = vec![0u8; n];
            f.read_exact(&mut buf).await.map_err(|e| io(local, e))?;
            // Hashed off the runtime's threads: the other streams keep sending meanwhile, and
            // with several streams both cores hash.
            let (buf, sum) = tokio::task::spawn_blocking(move || {
                let sum =
                    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&buf));
                (buf, sum)
            })
            .await
            .map_err(|e| CtlError::usage(format!("hashing a chunk failed: {e}")))?;
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
                .patch(&s.url)
                .header("Tus-Resumable", "1.0.0")
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", offset.to_string())
                .header("Upload-Checksum", format!("sha256 {sum}"))
                .header("Content-Length", n)
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await;
            // The slices sent moved the bar past `shown`; what counts is what the server says.
            shown += n as u64;
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    resync(&mut shown, offset);
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
                if let Some(o) = self.server_offset(&s.url).await {
                    offset = o;
                }
                resync(&mut shown, offset);
                if offset >= len {
                    return Ok(());
                }
                continue;
            }
            if status.as_u16() != 204 {
                resync(&mut shown, offset);
                let body = r.bytes().await.unwrap_or_default();
                // The same limit, learnt from a refusal (a server that does not say it in HEAD).
                if status.as_u16() == 413
                    && let Some(max) = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|p| p["data"]["max_checksummed_body"].as_u64())
                    && max > 0
                    && max < chunk
                {
                    chunk = max;
                    continue;
                }
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
            resync(&mut shown, offset);
            if offset >= len {
                return Ok(());
            }
        }
    }

    /// Where the server stands on an upload (HEAD), or None when it does not know it.
    async fn server_offset(&self, url: &str) -> Option<u64> {
        header_u64(&self.head(url).await?, "upload-offset")
    }

    /// The upload's HEAD answer, when the server knows the upload.
    async fn head(&self, url: &str) -> Option<reqwest::header::HeaderMap> {
        let r = self
            .conn
            .http
            .head(url)
            .header("Tus-Resumable", "1.0.0")
            .send()
            .await
            .ok()?;
        r.status().is_success().then(|| r.headers().clone())
    }
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_start_at_whole_parts_and_cover_the_file() {
        let len = 100 * ALIGN + 12_345;
        let parts = cut(len, 4);
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|(s, _)| s % ALIGN == 0), "{parts:?}");
        assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), len);
        assert!(parts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        // Fewer streams than asked when the file is small for them.
        assert_eq!(cut(3 * ALIGN, 8).len(), 3);
        // A file needing parts above 64 MiB (over 640 GB) is cut at those.
        let huge = 1u64 << 40;
        assert_eq!(align_for(huge), 128 << 20);
        assert!(cut(huge, 4).iter().all(|(s, _)| s % (128 << 20) == 0));
    }
}
