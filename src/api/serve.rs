//! One accept loop for every listener (manager, client, internal, gRPC): plain or TLS, HTTP/1.1
//! and HTTP/2 (gRPC needs h2), graceful drain on shutdown. TLS handshakes run in the connection
//! task, so a slow client never stalls accepting. Connection caps and the per-connection
//! watchdog (silent, idle and stalled connections) are in `conn.rs`; zero-copy file bodies
//! over plain HTTP/1 in `zerocopy.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::conn::{self, Admission, ConnState, Watched};
use super::zerocopy::SpliceSocket;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent HTTP/2 streams per connection (gRPC calls, pipelined requests).
const H2_MAX_STREAMS: u32 = 256;

/// Binds and prints the machine-readable line tests and scripts wait for:
/// `listening api=<name> addr=<ip:port> tls=<bool>`.
pub async fn bind(name: &str, addr: SocketAddr, tls: bool) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr).await?;
    let local = l.local_addr()?;
    println!("listening api={name} addr={local} tls={tls}");
    tracing::info!(api = name, addr = %local, tls, "listening");
    Ok(l)
}

pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Body chunks reach the socket as they are, never copied into one buffer: zero-copy
        // bodies depend on it (zerocopy.rs).
        .writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .max_concurrent_streams(H2_MAX_STREAMS);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(api = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Over a cap: closed at once, before any handshake or parsing costs anything.
        let Some(admitted) = admission.admit(peer.ip()) else {
            tracing::debug!(api = name, %peer, "connection refused: at the connection cap");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = ConnState::new();
        let router = router.clone();
        let counter = state.clone();
        let socket = SpliceSocket::new(stream);
        // Zero-copy file bodies only where hyper passes body chunks to the socket untouched:
        // plain HTTP/1 (TLS encrypts them, HTTP/2 frames them).
        let zero_copy = acceptor.is_none().then(|| socket.zero_copy());
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            if let Some(z) = &zero_copy
                && req.version() <= hyper::Version::HTTP_11
            {
                req.extensions_mut().insert(z.clone());
            }
            let router = router.clone();
            let in_flight = counter.request_started();
            async move {
                let resp = router
                    .oneshot(req.map(Body::new))
                    .await
                    .unwrap_or_else(|e| match e {});
                Ok::<_, Infallible>(resp.map(|b| conn::counted(b, in_flight)))
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let limits = *admission.limits();
        tokio::spawn(async move {
            let _admitted = admitted;
            let io = Watched::new(socket, state.clone());
            let served = conn::supervise(
                async {
                    match acceptor {
                        None => {
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let tls = match tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept(io),
                            )
                            .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(api = name, %peer, error = %e, "TLS handshake failed");
                                    return Ok(());
                                }
                                Err(_) => {
                                    tracing::debug!(api = name, %peer, "TLS handshake timed out");
                                    return Ok(());
                                }
                            };
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                    }
                },
                &state,
                limits,
            )
            .await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(api = name, %peer, error = ?e, "connection ended with an error")
                }
                Err(why) => tracing::debug!(api = name, %peer, reason = why, "connection closed"),
            }
        });
    }
    drop(listener);
    tracing::info!(api = name, "stopped accepting; draining connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            api = name,
            "connections still open after the shutdown grace period"
        );
    }
}
