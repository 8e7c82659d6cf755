//! Streaming zip archives of directories and file selections: deflate, zip64 for entries and
//! archives over 4 GiB, data descriptors (no seeking), flat memory. The zip writer is
//! synchronous, so it runs on a thread of its own that pulls from the volume and pushes 256 KiB
//! blocks through a short channel into the response body.
//!
//! A client that stops reading must not take the node's I/O with it: archive threads are not
//! taken from the blocking pool that serves every file operation; their number is capped per node
//! and per owner (`max-archives`, `max-archives-per-owner`: beyond them, 429); and a block the
//! client has not taken within `write-idle-timeout` ends the archive and frees its thread.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use zip::write::SimpleFileOptions;

use crate::ids::VFolderId;
use crate::volume::{EntryKind, EntryStat, RelPath, Volume};

const BLOCK: usize = 256 * 1024;

/// One top-level item of an archive.
pub struct Root {
    /// Where it is in the vfolder.
    pub path: RelPath,
    /// Its name in the archive; for a directory, "" puts its contents at the top level.
    pub name: String,
    pub stat: EntryStat,
}

/// Archive production slots: one per archive being built, capped per node and per owner (the
/// vfolder's quota scope: a user or project), so one tenant minting many tokens cannot hold
/// every slot (security review 2, G10).
pub struct ArchiveSlots {
    node: Arc<tokio::sync::Semaphore>,
    per_owner: Mutex<HashMap<[u8; 32], usize>>,
    per_owner_max: usize,
    /// How long a block may wait for the client to take it.
    send_timeout: Duration,
}

/// Held by an archive's thread until it ends.
pub struct Slot {
    _node: tokio::sync::OwnedSemaphorePermit,
    key: [u8; 32],
    slots: Arc<ArchiveSlots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self
            .slots
            .per_owner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl ArchiveSlots {
    pub fn new(node_max: usize, per_owner_max: usize, send_timeout: Duration) -> Arc<Self> {
        Arc::new(ArchiveSlots {
            node: Arc::new(tokio::sync::Semaphore::new(node_max)),
            per_owner: Mutex::default(),
            per_owner_max,
            send_timeout,
        })
    }

    /// A slot for an archive of `owner`'s data, or None when the node or the owner is at its
    /// cap.
    pub fn take(self: &Arc<Self>, owner: &str) -> Option<Slot> {
        use sha2::Digest;
        let key: [u8; 32] = sha2::Sha256::digest(owner.as_bytes()).into();
        let permit = self.node.clone().try_acquire_owned().ok()?;
        let mut m = self.per_owner.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_default();
        if *n >= self.per_owner_max {
            return None;
        }
        *n += 1;
        Some(Slot {
            _node: permit,
            key,
            slots: self.clone(),
        })
    }
}

struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    rt: Handle,
    send_timeout: Duration,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let block = self.buf.split().freeze();
        let sent = self.rt.block_on(async {
            tokio::time::timeout(self.send_timeout, self.tx.send(Ok(block))).await
        });
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client went away",
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BLOCK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

fn zip_time(t: std::time::SystemTime) -> zip::DateTime {
    use chrono::{Datelike, Timelike};
    let dt: chrono::DateTime<chrono::Local> = t.into();
    zip::DateTime::from_date_and_time(
        dt.year().clamp(1980, 2107) as u16,
        dt.month() as u8,
        dt.day() as u8,
        dt.hour() as u8,
        dt.minute() as u8,
        dt.second() as u8,
    )
    .unwrap_or_default()
}

fn options(stat: &EntryStat) -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        // Fast deflate: archives are built while the user waits, and much of what users
        // store is already compressed.
        .compression_level(Some(1))
        .unix_permissions(stat.mode & 0o777)
        .last_modified_time(zip_time(stat.modified))
        // zip64 only where needed; the size cannot grow, as exactly `size` bytes are read.
        .large_file(stat.size >= u32::MAX as u64)
}

/// The name of an entry in the archive. `\` is a path separator to Windows extractors, so a
/// file named `..\..\evil.bat` would land outside the extraction directory there: it is
/// stored with `_` instead.
fn entry_name(prefix: &str, rel: &RelPath) -> String {
    let name = match (prefix.is_empty(), rel.is_root()) {
        (true, _) => rel.as_str().to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}/{}", rel.as_str()),
    };
    name.replace('\\', "_")
}

/// Keeps the errno of volume I/O errors (a file deleted mid-walk is skipped, not fatal).
fn vol_io(e: crate::volume::VolumeError) -> io::Error {
    match e {
        crate::volume::VolumeError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

type Zip = zip::ZipWriter<zip::write::StreamWriter<ChannelWriter>>;

fn zip_err(e: zip::result::ZipError) -> io::Error {
    match e {
        zip::result::ZipError::Io(e) => e,
        other => io::Error::other(other),
    }
}

fn add_file(
    zw: &mut Zip,
    rt: &Handle,
    v: &dyn Volume,
    vf: &VFolderId,
    path: &RelPath,
    name: &str,
) -> io::Result<()> {
    let h = rt.block_on(v.open_read(vf, path)).map_err(vol_io)?;
    // The size at open time decides how much goes in, so headers and data always agree.
    let size = h.stat().size;
    let stat = EntryStat {
        size,
        ..h.stat().clone()
    };
    zw.start_file(name, options(&stat)).map_err(zip_err)?;
    let mut chunks = h.read_range(0, size);
    while let Some(chunk) = rt.block_on(chunks.next()) {
        zw.write_all(&chunk?)?;
    }
    Ok(())
}

fn add_root(
    zw: &mut Zip,
    rt: &Handle,
    v: &dyn Volume,
    vf: &VFolderId,
    root: &Root,
) -> io::Result<()> {
    match root.stat.kind {
        EntryKind::Directory => {
            if !root.name.is_empty() {
                zw.add_directory(
                    format!("{}/", entry_name(&root.name, &RelPath::root())),
                    options(&root.stat),
                )
                .map_err(zip_err)?;
            }
            let mut walk = rt.block_on(v.walk(vf, &root.path)).map_err(vol_io)?;
            while let Some(entry) = rt.block_on(walk.next()) {
                let entry = entry?;
                let name = entry_name(&root.name, &entry.rel);
                let path = root.path.join(&entry.rel);
                match entry.stat.kind {
                    EntryKind::Directory => {
                        zw.add_directory(format!("{name}/"), options(&entry.stat))
                            .map_err(zip_err)?;
                    }
                    EntryKind::File => {
                        match add_file(zw, rt, v, vf, &path, &name) {
                            Ok(()) => {}
                            // Deleted while we walked: leave it out, keep the archive going.
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    // Symlinks that stay inside the vfolder are kept as links; the walk leaves
                    // out those that escape it, so no content from outside ever gets in.
                    EntryKind::Symlink => {
                        if let Some(target) = &entry.link_target {
                            zw.add_symlink(name, target.to_string_lossy(), options(&entry.stat))
                                .map_err(zip_err)?;
                        }
                    }
                    EntryKind::Other => {}
                }
            }
            Ok(())
        }
        _ => add_file(
            zw,
            rt,
            v,
            vf,
            &root.path,
            &entry_name(&root.name, &RelPath::root()),
        ),
    }
}

/// The archive as a response body, produced on its own thread while `slot` is held. Errors after
/// the first byte can only end the stream early, which the client sees as a broken download;
/// everything checkable is checked before.
pub fn zip_body(v: Arc<dyn Volume>, vf: VFolderId, roots: Vec<Root>, slot: Slot) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let rt = Handle::current();
    let send_timeout = slot.slots.send_timeout;
    let spawned = std::thread::Builder::new()
        .name("archive".into())
        .spawn(move || {
            let _slot = slot;
            let err_tx = tx.clone();
            let sink = ChannelWriter {
                tx,
                buf: BytesMut::with_capacity(BLOCK),
                rt: rt.clone(),
                send_timeout,
            };
            let mut zw = zip::ZipWriter::new_stream(sink);
            let result = roots
                .iter()
                .try_for_each(|r| add_root(&mut zw, &rt, v.as_ref(), &vf, r))
                .and_then(|()| zw.finish().map_err(zip_err))
                .and_then(|mut w| w.flush());
            if let Err(e) = result {
                tracing::warn!(error = %e, "archive stream aborted");
                let _ = err_tx.try_send(Err(e));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start an archive thread");
        return Body::from_stream(futures::stream::once(async move { Err::<Bytes, _>(e) }));
    }
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}
