//! Benchmark driver (bench/*.sh call it): the gRPC side here, the HTTP side in `http.rs`.
//!
//!   bench session-latency --rpc ADDR --secret S --volume V --vfid VF --user U \
//!         --pubkey FILE --key FILE --n N
//!       CreateSession → first successful `sftp` login, N times (image cached); p50/p90/max.
//!   bench admission --redis HOST:PORT --nodes 3 --users 200 --ops N --concurrency C
//!       The cross-node admission check itself: N admit+release pairs spread over 3 simulated
//!       nodes (own connections each) on the real Lua script; admissions/s, p50/p99.
//!   bench create --rpc ADDR --secret S --volume V --vfid VF --user U --pubkey FILE
//!       One SFTP session, left running; prints its id and port.
//!   bench upload --url CLIENT_UPLOAD_URL --file F --chunk BYTES [--create] [--checksum]
//!       A tus upload of F in PATCHes of BYTES (0 = one PATCH), read from the page cache; MB/s.
//!       With --create the URL is a tus endpoint: the upload is created by POST first (a plain
//!       tus server such as @tus/server).
//!   bench smallfiles --manager ADDR --client ADDR --secret S --volume V --vfid VF --n N
//!         --concurrency C --size BYTES
//!       N uploads of SIZE bytes, each a token mint plus one PATCH (the Backend.AI flow), from C
//!       concurrent clients: files/s, mint and PATCH p50/p99. Same calls for any peer that
//!       speaks the storage-proxy API.
//!   bench mgrlat --manager ADDR --secret S --volume V --n N
//!       Manager API latency: N vfolder creates, N mkdirs and N listings: p50/p99 each.
//!   bench ranges --url DOWNLOAD_URL --size BYTES --n N --len BYTES
//!       N GETs of random LEN-byte ranges over one connection: requests/s, p50/p99.
//!   bench concurrent-uploads --file F --n N (--manager A --client A --secret S --volume V
//!         --vfid VF | --tus-endpoint URL)
//!       N uploads of F at once, one PATCH each: aggregate MB/s.
//!   bench refusals --rpc A,B,C --secret S --volume V --vfids X,Y,Z --user U --pubkey FILE --n N
//!       End-to-end CreateSession calls refused at the per-user limit on 3 real daemons (the
//!       whole admission path without a container start); calls/s, p50/p99.

mod http;

use std::sync::Arc;
use std::time::{Duration, Instant};

use storage_agent::cluster::{Plan, Redis, RedisLimiter};
use storage_agent::pb;
use storage_agent::pb::storage_agent_client::StorageAgentClient;
use storage_agent::session::limiter::UserLimiter;

pub(crate) fn arg(args: &[String], name: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| panic!("missing {name}"))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{name}: n={} wall={:.2}s rate={:.1}/s p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.9).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[derive(Clone)]
struct Bearer(String);
impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.0)
                .parse()
                .map_err(|_| tonic::Status::internal("secret"))?,
        );
        Ok(r)
    }
}

type Client = StorageAgentClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

async fn client(addr: &str, secret: &str) -> Client {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    StorageAgentClient::with_interceptor(ch, Bearer(secret.to_string()))
}

fn sftp_login(port: u32, key: &str) -> bool {
    std::process::Command::new("sftp")
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
            "-i",
            key,
            "-P",
            &port.to_string(),
            "-b",
            "-",
            "work@127.0.0.1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().map(|mut s| s.write_all(b"ls\n"));
            c.wait()
        })
        .map(|s| s.success())
        .unwrap_or(false)
}

fn request(user: &str, volume: &str, vfid: &str, pubkey: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        kind: pb::SessionKind::Sftp as i32,
        user_id: user.into(),
        resource_group: "storage".into(),
        mounts: vec![pb::Mount {
            volume: volume.into(),
            vfid: vfid.into(),
            name: "data".into(),
            read_only: false,
            subpath: String::new(),
        }],
        credentials: Some(pb::Credentials {
            public_keys: vec![pubkey.into()],
            generate_password: false,
        }),
        max_sessions_per_user: Some(1),
        ..Default::default()
    }
}

async fn session_latency(args: &[String]) {
    let mut c = client(&arg(args, "--rpc"), &arg(args, "--secret")).await;
    let pubkey = std::fs::read_to_string(arg(args, "--pubkey")).expect("pubkey");
    let key = arg(args, "--key");
    let n: usize = arg(args, "--n").parse().expect("n");
    let req = request(
        &arg(args, "--user"),
        &arg(args, "--volume"),
        &arg(args, "--vfid"),
        pubkey.trim(),
    );
    // Once to build/cache the image; not measured.
    let s = c
        .create_session(req.clone())
        .await
        .expect("warm-up")
        .into_inner()
        .session
        .expect("session");
    c.destroy_session(pb::DestroySessionRequest { id: s.id })
        .await
        .expect("destroy");
    let mut lat = Vec::new();
    let wall = Instant::now();
    for _ in 0..n {
        let t0 = Instant::now();
        let s = c
            .create_session(req.clone())
            .await
            .expect("create")
            .into_inner()
            .session
            .expect("session");
        let port = s.endpoints[0].port;
        let k = key.clone();
        loop {
            let ok = tokio::task::spawn_blocking({
                let k = k.clone();
                move || sftp_login(port, &k)
            })
            .await
            .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no login within 60 s"
            );
        }
        lat.push(t0.elapsed());
        c.destroy_session(pb::DestroySessionRequest { id: s.id })
            .await
            .expect("destroy");
    }
    report("create_session_to_first_sftp_login", lat, wall.elapsed());
}

async fn create(args: &[String]) {
    let mut c = client(&arg(args, "--rpc"), &arg(args, "--secret")).await;
    let pubkey = std::fs::read_to_string(arg(args, "--pubkey")).expect("pubkey");
    let req = request(
        &arg(args, "--user"),
        &arg(args, "--volume"),
        &arg(args, "--vfid"),
        pubkey.trim(),
    );
    let s = c
        .create_session(req)
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session");
    println!("session={} port={}", s.id, s.endpoints[0].port);
}

async fn admission(args: &[String]) {
    let server = storage_agent::config::RedisServer {
        target: storage_agent::config::RedisTarget::Addr(arg(args, "--redis")),
        username: None,
        password: None,
        sentinel_password: None,
        tls: false,
        tls_ca: None,
    };
    let cfg = Plan {
        servers: std::array::from_fn(|_| server.clone()),
        dbs: [4, 0, 0, 2],
        role_check_interval: Duration::from_secs(5),
    };
    let nodes: usize = arg(args, "--nodes").parse().expect("nodes");
    let users: usize = arg(args, "--users").parse().expect("users");
    let ops: usize = arg(args, "--ops").parse().expect("ops");
    let conc: usize = arg(args, "--concurrency").parse().expect("concurrency");
    // Each simulated node has its own connections, as separate daemons would.
    let limiters: Vec<Arc<RedisLimiter>> = (0..nodes)
        .map(|_| {
            // No settle wait: the registry is new, and no real node has sessions to count again.
            RedisLimiter::with_settle(
                Redis::new(&cfg).expect("redis"),
                Duration::from_secs(60),
                Duration::ZERO,
            )
        })
        .collect();
    let per_task = ops / conc;
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..conc {
        let l = limiters[t % nodes].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            let mut refused = 0;
            for i in 0..per_task {
                let user = format!("user-{}", (t * 7919 + i) % users);
                let id = uuid::Uuid::new_v4();
                let t0 = Instant::now();
                let r = l.admit("bench-rg", &user, id, 5, &[]).await;
                lat.push(t0.elapsed());
                match r {
                    Ok(()) => l.release("bench-rg", &user, id).await,
                    Err(storage_agent::session::SessionError::Exhausted(_)) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            (lat, refused)
        }));
    }
    let mut all = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (l, r) = t.await.expect("task");
        all.extend(l);
        refused += r;
    }
    println!("admission: nodes={nodes} concurrency={conc} users={users} refused={refused}");
    report("cross_node_admission_check", all, wall.elapsed());
}

async fn refusals(args: &[String]) {
    let secret = arg(args, "--secret");
    let rpcs: Vec<String> = arg(args, "--rpc").split(',').map(str::to_string).collect();
    let vfids: Vec<String> = arg(args, "--vfids")
        .split(',')
        .map(str::to_string)
        .collect();
    let pubkey = std::fs::read_to_string(arg(args, "--pubkey")).expect("pubkey");
    let n: usize = arg(args, "--n").parse().expect("n");
    let user = arg(args, "--user");
    let volume = arg(args, "--volume");
    let mut clients = Vec::new();
    for r in &rpcs {
        clients.push(client(r, &secret).await);
    }
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let req = request(&user, &volume, &vfids[i], pubkey.trim());
        let per = n / rpcs.len();
        tasks.push(tokio::spawn(async move {
            let mut c = c;
            let mut lat = Vec::new();
            for _ in 0..per {
                let t0 = Instant::now();
                let r = c.create_session(req.clone()).await;
                lat.push(t0.elapsed());
                match r {
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {}
                    other => panic!("expected a refusal at the limit: {other:?}"),
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    report(
        "create_session_refused_at_the_limit_3_nodes",
        all,
        wall.elapsed(),
    );
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("session-latency") => session_latency(&args).await,
        Some("admission") => admission(&args).await,
        Some("refusals") => refusals(&args).await,
        Some("upload") => http::upload(&args).await,
        Some("smallfiles") => http::smallfiles(&args).await,
        Some("mgrlat") => http::mgrlat(&args).await,
        Some("ranges") => http::ranges(&args).await,
        Some("concurrent-uploads") => http::concurrent_uploads(&args).await,
        Some("create") => create(&args).await,
        _ => eprintln!("usage: bench session-latency|admission|refusals ... (see the file header)"),
    }
}
