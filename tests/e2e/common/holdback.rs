//! A TCP forwarder in front of a real object service that holds back one request, or its
//! answer, so a test can kill the daemon at an exact step of a protocol (the service's side of
//! it then stands still, or is done with nobody told). Everything else passes through.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
pub enum Hold {
    /// The request never reaches the service.
    Request,
    /// The service gets the request and answers; the answer never reaches the daemon.
    Answer,
}

pub struct Holdback {
    port: u16,
    held: Arc<AtomicBool>,
}

impl Holdback {
    /// Forwards to `upstream` (host:port); holds the first request whose request line starts
    /// with `method` and holds `marker` (e.g. "POST", "uploadId=").
    pub fn start(upstream: &str, hold: Hold, method: &str, marker: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicBool::new(false));
        let armed = Arc::new(AtomicBool::new(true));
        let (upstream, line_start, marker) = (
            upstream.to_string(),
            format!("{method} /").into_bytes(),
            marker.as_bytes().to_vec(),
        );
        let flag = held.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(service) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (armed, held) = (armed.clone(), flag.clone());
                let (line_start, marker) = (line_start.clone(), marker.clone());
                // This connection carries the held request: from then on nothing more passes.
                let this_one = Arc::new(AtomicBool::new(false));
                let (c2, s2, mine) = (
                    client.try_clone().unwrap(),
                    service.try_clone().unwrap(),
                    this_one.clone(),
                );
                std::thread::spawn(move || {
                    pump(c2, s2, |chunk| {
                        if is_request(chunk, &line_start, &marker)
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            mine.store(true, Ordering::SeqCst);
                            if hold == Hold::Request {
                                held.store(true, Ordering::SeqCst);
                                return false;
                            }
                        }
                        true
                    })
                });
                let held = flag.clone();
                std::thread::spawn(move || {
                    pump(service, client, |_| {
                        if this_one.load(Ordering::SeqCst) {
                            held.store(true, Ordering::SeqCst);
                            return false;
                        }
                        true
                    })
                });
            }
        });
        Holdback { port, held }
    }

    pub fn endpoint(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits (bounded) until the request or its answer is held.
    pub async fn wait_held(&self, within: Duration) {
        let end = Instant::now() + within;
        while !self.held.load(Ordering::SeqCst) {
            assert!(Instant::now() < end, "nothing was held within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether a read from the daemon starts a request with this method and marker in its line
/// (the daemon writes each request's head at once, after the previous answer).
fn is_request(chunk: &[u8], line_start: &[u8], marker: &[u8]) -> bool {
    let line = chunk.split(|&b| b == b'\n').next().unwrap_or_default();
    line.starts_with(line_start) && line.windows(marker.len()).any(|w| w == marker)
}

/// Copies `from` to `to` while `pass` says so; after that, reads and drops until `from` ends
/// (a held connection stays open: the daemon waits, as for a slow service).
fn pump(mut from: TcpStream, mut to: TcpStream, mut pass: impl FnMut(&[u8]) -> bool) {
    let mut buf = vec![0u8; 64 << 10];
    let mut passing = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        passing = passing && pass(&buf[..n]);
        if passing && to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
