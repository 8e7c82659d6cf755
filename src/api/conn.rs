//! Connection hygiene for every listener: caps on connections (global and per client address),
//! and a watchdog per connection that closes it when it
//!
//! * sent no byte within `first-byte-timeout` of being accepted (silent sockets that would
//!   otherwise hold an fd for ever),
//! * has no request in flight and none started for `idle-timeout` (HTTP/1 keep-alive and HTTP/2
//!   alike; h2 PINGs do not count as activity),
//! * has had a write blocked for `write-idle-timeout` (a client that stopped reading a download
//!   or an archive; a slow reader that keeps reading is never cut off).
//!
//! Over a cap, a new connection is closed at once, before any TLS handshake or parsing.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::ConnLimits;

/// Admission of new connections to one listener (each listener has its own, so one cannot
/// starve another).
pub struct Admission {
    limits: ConnLimits,
    global: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// The key a client address is counted under: IPv4 addresses one by one, IPv6 by /64 (one
/// host usually holds a whole /64, so counting single addresses would cap nothing).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
        v4 => v4,
    }
}

/// Held by a connection for its lifetime.
pub struct Admitted {
    _global: OwnedSemaphorePermit,
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut m = self
            .admission
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            global: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &ConnLimits {
        &self.limits
    }

    /// None when the node or this client address is at its cap.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let ip = client_key(ip);
        let permit = self.global.clone().try_acquire_owned().ok()?;
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= self.limits.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Admitted {
            _global: permit,
            ip,
            admission: self.clone(),
        })
    }
}

/// What the watchdog watches, updated by the IO wrapper and the request counter.
pub struct ConnState {
    start: Instant,
    got_byte: AtomicBool,
    /// Milliseconds since `start` of the last request start or end.
    last_request: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds since `start` + 1 when a write started to block; 0 while writes flow.
    write_blocked_since: AtomicU64,
}

impl ConnState {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnState {
            start: Instant::now(),
            got_byte: AtomicBool::new(false),
            last_request: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            write_blocked_since: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Counts a request as in flight until the returned guard (kept by the response body) drops.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.last_request.store(self.now_ms(), Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Why the connection must be closed now, if it must.
    fn verdict(&self, l: &ConnLimits) -> Option<&'static str> {
        let now = self.now_ms();
        let ms = |d: Duration| d.as_millis() as u64;
        if !self.got_byte.load(Ordering::Relaxed) && now >= ms(l.first_byte_timeout) {
            return Some("no byte received");
        }
        let blocked = self.write_blocked_since.load(Ordering::Relaxed);
        if blocked > 0 && now.saturating_sub(blocked - 1) >= ms(l.write_idle_timeout) {
            return Some("the client stopped reading");
        }
        if self.in_flight.load(Ordering::Acquire) == 0
            && now.saturating_sub(self.last_request.load(Ordering::Relaxed)) >= ms(l.idle_timeout)
        {
            return Some("idle");
        }
        None
    }

    /// Resolves when the connection should be closed, with the reason.
    pub async fn watchdog(&self, l: ConnLimits) -> &'static str {
        let tick = [l.first_byte_timeout, l.idle_timeout, l.write_idle_timeout]
            .into_iter()
            .min()
            .unwrap_or(Duration::from_secs(1))
            .div_f32(4.0)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            if let Some(why) = self.verdict(&l) {
                return why;
            }
        }
    }
}

pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .last_request
            .store(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is fully sent (or
/// dropped because the connection went away).
pub fn counted(body: Body, guard: InFlight) -> Body {
    Body::new(CountedBody {
        inner: body,
        _guard: guard,
    })
}

struct CountedBody {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, observed: the first byte read, and writes that block.
pub struct Watched<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, state: Arc<ConnState>) -> Self {
        Watched { inner, state }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.got_byte.store(true, Ordering::Relaxed);
        }
        r
    }
}

/// A socket whose writes may wait for the disk instead of the client (a zero-copy body's
/// next bytes being read): such a wait is no stall of the client's.
pub trait DiskWait {
    fn waiting_on_disk(&self) -> bool;
}

impl DiskWait for super::zerocopy::SpliceSocket {
    fn waiting_on_disk(&self) -> bool {
        super::zerocopy::SpliceSocket::waiting_on_disk(self)
    }
}

impl<S: AsyncWrite + DiskWait + Unpin> Watched<S> {
    fn track<T>(&self, r: &Poll<T>) {
        let s = &self.state;
        match r {
            Poll::Pending if self.inner.waiting_on_disk() => {}
            Poll::Pending => {
                if s.write_blocked_since.load(Ordering::Relaxed) == 0 {
                    s.write_blocked_since
                        .store(s.now_ms() + 1, Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => s.write_blocked_since.store(0, Ordering::Relaxed),
        }
    }
}

impl<S: AsyncWrite + DiskWait + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.track(&r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.track(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.track(&r);
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs `conn` until it ends or the watchdog says to close it.
pub async fn supervise<F: Future>(
    conn: F,
    state: &ConnState,
    limits: ConnLimits,
) -> Result<F::Output, &'static str> {
    tokio::select! {
        r = conn => Ok(r),
        why = state.watchdog(limits) => Err(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            first_byte_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            write_idle_timeout: Duration::from_millis(200),
            max_connections: 3,
            max_connections_per_ip: 2,
        }
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let a = Admission::new(limits());
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _c1 = a.admit(one).unwrap();
        let _c2 = a.admit(same_64).unwrap();
        assert!(a.admit(same_64).is_none(), "one /64 is one client");
        assert!(a.admit(other_64).is_some());
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn caps_hold_globally_and_per_address() {
        let a = Admission::new(limits());
        let ip1: IpAddr = [127, 0, 0, 1].into();
        let ip2: IpAddr = [127, 0, 0, 2].into();
        let c1 = a.admit(ip1).unwrap();
        let _c2 = a.admit(ip1).unwrap();
        assert!(a.admit(ip1).is_none(), "per-address cap");
        let _c3 = a.admit(ip2).unwrap();
        assert!(a.admit(ip2).is_none(), "global cap");
        drop(c1);
        assert!(a.admit(ip2).is_some(), "a closed connection frees its slot");
    }

    #[tokio::test]
    async fn silent_and_idle_connections_are_judged() {
        let l = limits();
        let s = ConnState::new();
        assert_eq!(s.watchdog(l).await, "no byte received");
        s.got_byte.store(true, Ordering::Relaxed);
        let g = s.request_started();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(s.verdict(&l), None, "a request in flight is never idle");
        drop(g);
        assert_eq!(s.watchdog(l).await, "idle");
    }
}
