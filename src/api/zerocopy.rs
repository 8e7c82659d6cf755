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
//! Safety of the bytes sent rests on three rules:
//! * a placeholder body is only made for a plain HTTP/1 connection whose socket is a
//!   `SpliceSocket` (the [`ZeroCopy`] request extension exists only there); TLS and HTTP/2
//!   copy bodies, and get ordinary ones;
//! * the socket matches each placeholder to its chunk by address (chunk `n` of a connection
//!   lives in slot `n % SLOTS`) and in order; a placeholder it cannot match closes the
//!   connection rather than send anything else;
//! * a file that ends early (truncated while being sent) ends the connection the same way,
//!   as a short read does on the copying path: a client never gets invented bytes.

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
/// `sent` went out and `in_pipe` are in the pipe.
struct Span {
    slot: usize,
    len: usize,
    sent: usize,
    in_pipe: usize,
    file: Arc<File>,
    off: u64,
    pipe: Arc<Pipe>,
    counted: Counter,
}

/// The chunks of a connection, in the order hyper writes them.
#[derive(Default)]
struct Spans {
    queue: Mutex<VecDeque<Span>>,
    next: AtomicU64,
}

/// Request extension of a plain HTTP/1 connection: makes zero-copy file bodies for it.
#[derive(Clone)]
pub struct ZeroCopy(Arc<Spans>);

impl ZeroCopy {
    /// Bytes `start..end` of `file` as placeholder chunks for this connection's socket; what
    /// goes out is counted in `counted`.
    pub fn file_range(
        &self,
        file: Arc<File>,
        start: u64,
        end: u64,
        counted: Counter,
    ) -> ByteStream {
        let pipe = match Pipe::new() {
            Ok(p) => Arc::new(p),
            Err(e) => return futures::stream::once(async { Err(e) }).boxed(),
        };
        let spans = self.0.clone();
        let offsets = (start..end).step_by(CHUNK);
        futures::stream::iter(offsets)
            .map(move |off| {
                let len = (CHUNK as u64).min(end - off) as usize;
                let slot = (spans.next.fetch_add(1, Ordering::Relaxed) as usize % SLOTS) * CHUNK;
                let span = Span {
                    slot,
                    len,
                    sent: 0,
                    in_pipe: 0,
                    file: file.clone(),
                    off,
                    pipe: pipe.clone(),
                    counted: counted.clone(),
                };
                let mut q = spans.queue.lock().unwrap_or_else(|p| p.into_inner());
                // Chunks made but never written (a body hyper dropped) are passed over when a
                // later one is written; never let them pile up.
                if q.len() >= SLOTS / 2 {
                    q.pop_front();
                }
                q.push_back(span);
                Ok(Bytes::from_static(&region()[slot..slot + len]))
            })
            .boxed()
    }
}

/// A plain TCP socket that sends placeholder chunks from their files.
pub struct SpliceSocket {
    tcp: TcpStream,
    spans: Arc<Spans>,
    filling: Option<JoinHandle<io::Result<usize>>>,
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

    /// Sends (part of) the chunk whose placeholder starts at `slot` (an offset in the region)
    /// and is `want` bytes long; returns how many bytes went out.
    fn poll_send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        slot: usize,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            let (pipe, in_pipe, fill) = {
                let mut q = self.spans.queue.lock().unwrap_or_else(|p| p.into_inner());
                // Chunks before this one that were never written are stale.
                while q.front().is_some_and(|s| s.slot + s.sent != slot) {
                    q.pop_front();
                }
                let Some(s) = q.front_mut() else {
                    return Poll::Ready(Err(out_of_step()));
                };
                if want > s.len - s.sent {
                    return Poll::Ready(Err(out_of_step()));
                }
                let fill = (s.in_pipe == 0).then(|| {
                    let at = s.off + s.sent as u64;
                    // A pipe holds whole pages: from an unaligned offset, one page less.
                    let room = s.pipe.capacity - (at % PAGE) as usize;
                    (s.file.clone(), at, (s.len - s.sent).min(room))
                });
                (s.pipe.clone(), s.in_pipe, fill)
            };
            if let Some((file, off, n)) = fill {
                // The file into the pipe, on a blocking thread: this is where a cold read
                // waits for the disk.
                let task = self.filling.get_or_insert_with(|| {
                    let pipe = pipe.clone();
                    tokio::task::spawn_blocking(move || fill_pipe(&file, off, &pipe, n))
                });
                let r = ready!(Pin::new(task).poll(cx));
                self.filling = None;
                let got = r.map_err(io::Error::other)??;
                let mut q = self.spans.queue.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = q.front_mut().filter(|s| s.slot + s.sent == slot) {
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
                    let mut q = self.spans.queue.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(s) = q.front_mut() {
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
            SpliceFFlags::SPLICE_F_MOVE,
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
            Some(slot) if !data.is_empty() => self.poll_send_chunk(cx, slot, data.len()),
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
        if let Some(slot) = slot_of(bufs[0].as_ptr()) {
            return self.poll_send_chunk(cx, slot, bufs[0].len());
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
