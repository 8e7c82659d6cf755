//! Downloads without copies through user space, over plain HTTP/1.1.
//!
//! hyper cannot hand a file to the socket (hyperium/hyper#3026): a body is made of bytes in
//! memory. So a file's body here is made of *placeholders*: slices of one reserved, never
//! touched address region, one slot per chunk. hyper frames, counts and queues them like any
//! bytes (with vectored writes it never copies a body chunk), and the socket below it,
//! [`SpliceSocket`], recognizes a placeholder by its address and sends the chunk's real bytes
//! instead: `splice` from the file into a pipe on a blocking thread (a disk read may wait
//! there, never on the runtime's threads), then `splice` from the pipe to the socket. The page
//! cache's pages move by reference; nothing is copied into or out of this process.
//!
//! Safety of the bytes sent rests on these rules:
//! * a placeholder body is only made for a plain HTTP/1 connection whose socket is a
//!   `SpliceSocket` (the [`ZeroCopy`] request extension exists only there); TLS and HTTP/2
//!   copy bodies, and get ordinary ones;
//! * hyper is told to write vectored (`writev(true)` in `serve.rs`): its queueing write
//!   strategy hands each body chunk to the socket as it is; the flattening one would copy
//!   the placeholders' zeros (tests/e2e/zero_copy.rs compares every byte, so it would fail);
//! * the socket matches each placeholder to its chunk by address (chunk `n` of a connection
//!   lives in slot `n % SLOTS`) and in order; a placeholder it cannot match closes the
//!   connection rather than send anything else;
//! * a file that ends early (truncated while being sent) ends the connection the same way,
//!   as a short read does on the copying path.
//!
//! As with sendfile (nginx's too), pages are sent by reference: a file rewritten in place,
//! hole-punched or truncated to a size inside a page *while* it is being sent may send the
//! changed bytes (or zeros) for pages already in the pipe or the socket's buffer. The ETag a
//! resumed download checks with If-Range changes with such a write.
//!
//! A connection that downloads holds one pipe (two fds) until it closes, however many ranges
//! its responses have.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::StreamExt;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::volume::ByteStream;

/// Bytes per placeholder chunk, and per pipe when the kernel allows a pipe that large.
const CHUNK: usize = 1 << 20;
/// Slots in the placeholder region. A connection has at most one body chunk queued in hyper
/// at a time plus the one being sent, so a few would do; the region costs address space only.
const SLOTS: usize = 32;
/// The unit pipes count their room in.
const PAGE: u64 = 4096;

/// The placeholder region: allocated zeroed (fresh pages from the kernel) and never read or
/// written by anyone, so it takes no memory, only addresses.
fn region() -> &'static [u8] {
    static REGION: OnceLock<&'static [u8]> = OnceLock::new();
    REGION.get_or_init(|| Box::leak(vec![0u8; CHUNK * SLOTS].into_boxed_slice()))
}

fn slot_of(p: *const u8) -> Option<usize> {
    let base = region().as_ptr() as usize;
    let p = p as usize;
    (p >= base && p < base + CHUNK * SLOTS).then(|| p - base)
}

/// A pipe of one body: the file's pages pass through it by reference.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A larger pipe means fewer hand-overs per MiB; unprivileged limits may refuse it
        // (pipe-max-size, pipe-user-pages-soft), and the default 64 KiB still works.
        let capacity = nix::fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(CHUNK as i32))
            .or_else(|_| nix::fcntl::fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map(|n| n as usize)
            .unwrap_or(1 << 16);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// One placeholder chunk waiting to be sent: `len` bytes of `file` from `off`, of which
/// `sent` went out and `in_pipe` wait in the connection's pipe.
struct Span {
    slot: usize,
    len: usize,
    sent: usize,
    in_pipe: usize,
    file: Arc<File>,
    off: u64,
    counted: Counter,
}

impl Span {
    /// Where the placeholder of this chunk's unsent rest starts in the region.
    fn at(&self) -> usize {
        self.slot + self.sent
    }
}

/// The chunks of a connection, in the order hyper writes them, and its pipe.
#[derive(Default)]
struct Spans {
    queue: Mutex<VecDeque<Span>>,
    next: AtomicU64,
    /// Made at the first zero-copy body and kept for the connection: two fds per connection
    /// that downloads, however many ranges a response has.
    pipe: Mutex<Option<Arc<Pipe>>>,
}

impl Spans {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Span>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection's pipe, made if there is none (or `fresh`: the old one may hold bytes
    /// of a chunk that will never be sent).
    fn pipe(&self, fresh: bool) -> io::Result<Arc<Pipe>> {
        let mut p = self.pipe.lock().unwrap_or_else(|p| p.into_inner());
        match &*p {
            Some(pipe) if !fresh => Ok(pipe.clone()),
            _ => {
                let pipe = Arc::new(Pipe::new()?);
                *p = Some(pipe.clone());
                Ok(pipe)
            }
        }
    }
}

/// Request extension of a plain HTTP/1 connection: makes zero-copy file bodies for it.
#[derive(Clone)]
pub struct ZeroCopy(Arc<Spans>);

impl ZeroCopy {
    /// Bytes `start..end` of `file` as placeholder chunks for this connection's socket; what
    /// goes out is counted in `counted`. None when no pipe can be made (out of fds): the
    /// caller copies instead, before any header has gone out.
    pub fn file_range(
        &self,
        file: Arc<File>,
        start: u64,
        end: u64,
        counted: Counter,
    ) -> Option<ByteStream> {
        if let Err(e) = self.0.pipe(false) {
            tracing::warn!(error = %e, "no pipe for a zero-copy download; copying it");
            return None;
        }
        let spans = self.0.clone();
        let offsets = (start..end).step_by(CHUNK);
        let chunks = futures::stream::iter(offsets).map(move |off| {
            let len = (CHUNK as u64).min(end - off) as usize;
            let slot = (spans.next.fetch_add(1, Ordering::Relaxed) as usize % SLOTS) * CHUNK;
            let span = Span {
                slot,
                len,
                sent: 0,
                in_pipe: 0,
                file: file.clone(),
                off,
                counted: counted.clone(),
            };
            let mut q = spans.queue();
            // Chunks made but never written (a body hyper dropped) are passed over when a
            // later one is written; never let them pile up.
            if q.len() >= SLOTS / 2 {
                q.pop_front();
            }
            q.push_back(span);
            Ok(Bytes::from_static(&region()[slot..slot + len]))
        });
        Some(chunks.boxed())
    }
}

/// A pipe being filled on a blocking thread, for the chunk whose unsent rest starts at `at`.
struct Filling {
    at: usize,
    task: JoinHandle<io::Result<usize>>,
}

/// A plain TCP socket that sends placeholder chunks from their files.
pub struct SpliceSocket {
    tcp: TcpStream,
    spans: Arc<Spans>,
    filling: Option<Filling>,
}

impl SpliceSocket {
    pub fn new(tcp: TcpStream) -> Self {
        SpliceSocket {
            tcp,
            spans: Arc::default(),
            filling: None,
        }
    }

    /// The extension for requests on this connection.
    pub fn zero_copy(&self) -> ZeroCopy {
        ZeroCopy(self.spans.clone())
    }

    /// Whether a write is waiting for the disk (the pipe being filled), not for the client.
    pub fn waiting_on_disk(&self) -> bool {
        self.filling.is_some()
    }

    /// Sends (part of) the chunk whose placeholder rest starts at `at` (an offset in the
    /// region) and is `want` bytes long; returns how many bytes went out.
    fn poll_send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        at: usize,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            let (in_pipe, fill, stale_bytes) = {
                let mut q = self.spans.queue();
                // Chunks before this one that were never written are stale.
                let mut stale_bytes = false;
                while q.front().is_some_and(|s| s.at() != at) {
                    stale_bytes |= q.pop_front().is_some_and(|s| s.in_pipe > 0);
                }
                let Some(s) = q.front() else {
                    return Poll::Ready(Err(out_of_step()));
                };
                if want > s.len - s.sent {
                    return Poll::Ready(Err(out_of_step()));
                }
                let fill = (s.in_pipe == 0)
                    .then(|| (s.file.clone(), s.off + s.sent as u64, s.len - s.sent));
                (s.in_pipe, fill, stale_bytes)
            };
            // A fill started for another chunk, or bytes left of one, make the pipe unusable:
            // a fresh one is taken (the old one dies with its last holder).
            let foreign_fill = self.filling.as_ref().is_some_and(|f| f.at != at);
            if stale_bytes || foreign_fill {
                self.filling = None;
                self.spans.pipe(true)?;
            }
            let pipe = self.spans.pipe(false)?;
            if let Some((file, off, rest)) = fill {
                // The file into the pipe, on a blocking thread: this is where a cold read
                // waits for the disk. A pipe holds whole pages: from an unaligned offset, one
                // page less.
                let n = rest.min(pipe.capacity - (off % PAGE) as usize);
                let f = self.filling.get_or_insert_with(|| {
                    let pipe = pipe.clone();
                    Filling {
                        at,
                        task: tokio::task::spawn_blocking(move || fill_pipe(&file, off, &pipe, n)),
                    }
                });
                let r = ready!(Pin::new(&mut f.task).poll(cx));
                self.filling = None;
                let got = r.map_err(io::Error::other)??;
                if let Some(s) = self.spans.queue().front_mut().filter(|s| s.at() == at) {
                    s.in_pipe = got;
                }
                continue;
            }
            ready!(self.tcp.poll_write_ready(cx))?;
            let n = want.min(in_pipe);
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                nix::fcntl::splice(
                    pipe.read.as_fd(),
                    None,
                    self.tcp.as_fd(),
                    None,
                    n,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(k) => {
                    let mut q = self.spans.queue();
                    if let Some(s) = q.front_mut().filter(|s| s.at() == at) {
                        s.counted.inc_by(k as u64);
                        s.sent += k;
                        s.in_pipe -= k;
                        if s.sent == s.len {
                            q.pop_front();
                        }
                    }
                    return Poll::Ready(Ok(k));
                }
                // Readiness was cleared; the next poll_write_ready waits for the socket.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

fn out_of_step() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "zero-copy body out of step with its chunks; connection closed",
    )
}

/// Moves `n` bytes of `file` at `off` into the (empty) pipe, or as many as fit. The file
/// ending before means it was truncated under us: an error, so the connection ends instead of
/// sending less than it announced.
fn fill_pipe(file: &File, off: u64, pipe: &Pipe, n: usize) -> io::Result<usize> {
    let mut got = 0;
    while got < n {
        let mut at = (off + got as u64) as libc::loff_t;
        match nix::fcntl::splice(
            file.as_fd(),
            Some(&mut at),
            pipe.write.as_fd(),
            None,
            n - got,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file was truncated while being sent",
                ));
            }
            Ok(k) => got += k,
            Err(nix::errno::Errno::EINTR) => {}
            // The pipe filled up (pages are its unit, bytes only approximate it): send what
            // is in it first.
            Err(nix::errno::Errno::EAGAIN) if got > 0 => return Ok(got),
            // A filesystem that cannot splice (some FUSE servers): its bytes are read and
            // written into the pipe instead, which is still correct, only not free.
            Err(nix::errno::Errno::EINVAL) if got == 0 => {
                return copy_into_pipe(file, off, pipe, n);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

fn copy_into_pipe(file: &File, off: u64, pipe: &Pipe, n: usize) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                io::Error::new(e.kind(), "file was truncated while being sent")
            }
            _ => e,
        })?;
    // The pipe is empty and holds at least `n` bytes, so these writes never wait.
    let mut done = 0;
    while done < n {
        match nix::unistd::write(&pipe.write, &buf[done..]) {
            Ok(k) => done += k,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

impl AsyncRead for SpliceSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpliceSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match slot_of(data.as_ptr()) {
            Some(at) if !data.is_empty() => self.poll_send_chunk(cx, at, data.len()),
            _ => Pin::new(&mut self.tcp).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(start) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let bufs = &bufs[start..];
        if let Some(at) = slot_of(bufs[0].as_ptr()) {
            return self.poll_send_chunk(cx, at, bufs[0].len());
        }
        // Ordinary bytes up to the next placeholder go out in one writev.
        let end = bufs
            .iter()
            .position(|b| !b.is_empty() && slot_of(b.as_ptr()).is_some())
            .unwrap_or(bufs.len());
        Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
