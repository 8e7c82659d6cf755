//! Boot and shutdown, as one readable script: load state, open volumes, bind every listener
//! (any failure stops here, before anything serves), serve until SIGTERM/SIGINT, drain, exit.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::token::Tokens;
use crate::api::{AppState, client, internal, manager, serve};
use crate::bgtask::BgTasks;
use crate::config::Config;
use crate::config::secrets::SecretStore;
use crate::events::Events;
use crate::health::Health;
use crate::session::SessionManager;
use crate::state::State;
use crate::upload::Uploads;
use crate::volume::health::VolumeHealth;
use crate::volume::mounts::SharedMounts;
use crate::volume::{OpenContext, Volumes};

/// Redis reachability, for /health (not gating: one node works without it).
struct RedisCheck(Arc<crate::cluster::Redis>);

#[async_trait::async_trait]
impl crate::health::Check for RedisCheck {
    fn service_group(&self) -> &str {
        "redis"
    }
    fn component_id(&self) -> String {
        self.0.addr().to_string()
    }
    fn gating(&self) -> bool {
        false
    }
    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}

/// Docker reachability, for /health (not gating: the storage proxy works without it).
struct DockerCheck(Arc<SessionManager>);

#[async_trait::async_trait]
impl crate::health::Check for DockerCheck {
    fn service_group(&self) -> &str {
        "docker"
    }
    fn component_id(&self) -> String {
        self.0.config().docker_socket.clone()
    }
    fn gating(&self) -> bool {
        false
    }
    async fn check(&self) -> Result<(), String> {
        self.0.docker.ping().await.map_err(|e| e.to_string())
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        version = crate::api::VERSION,
        config = %config.source,
        node_id = %config.proxy.node_id,
        "storage-agent starting"
    );
    for key in &config.ignored {
        tracing::info!(
            key,
            "config key accepted for Backend.AI compatibility and ignored"
        );
    }
    for w in &config.warnings {
        tracing::warn!("config: {w}");
    }
    let _pid_file = config
        .proxy
        .pid_file
        .as_deref()
        .map(PidFile::write)
        .transpose()?;
    let state_dir = &config.daemon.state_dir;
    crate::state::secure_state_dir(state_dir)
        .with_context(|| format!("preparing state directory {}", state_dir.display()))?;

    let mut secrets = SecretStore::open(state_dir)?;
    let (jwt_secret, jwt_stored) =
        secrets.resolve("storage-proxy.secret", config.proxy.secret.as_deref())?;
    let (manager_secret, mgr_stored) =
        secrets.resolve("api.manager.secret", config.manager_api.secret.as_deref())?;
    for (stored, key) in [
        (jwt_stored, "[storage-proxy] secret"),
        (mgr_stored, "[api.manager] secret"),
    ] {
        if stored {
            tracing::warn!(
                file = %secrets.path().display(),
                "{key} is not configured; using the generated one kept in this file"
            );
        }
    }

    let state = State::open(state_dir).await?;
    tracing::info!(path = %state_dir.join("state.db").display(), "state database ready");
    let fuse = SharedMounts::new(
        state.clone(),
        state_dir,
        Some((config.agent.kernel_uid, config.agent.kernel_gid)),
    );
    fuse.forget_request_holders().await;
    let volumes = Volumes::open(
        &config.volumes,
        &OpenContext {
            owner: config.proxy.owner,
            state: &state,
            state_dir,
            fuse: fuse.clone(),
        },
    )
    .await?;
    let volume_health = VolumeHealth::new(
        volumes
            .iter()
            .map(|v| (v.name().to_string(), v.health_target()))
            .collect(),
        config.daemon.volume_check_timeout,
        &config.proxy.node_id,
    );
    volume_health.check_all().await;
    let volumes = volumes.with_health(volume_health.clone());
    for v in volumes.iter() {
        tracing::info!(
            volume = v.name(),
            backend = v.backend(),
            "volume {v} opened"
        );
    }
    let shutdown = CancellationToken::new();
    let redis = match crate::cluster::plan(&config)
        .await
        .context("finding the cluster's Redis ([etcd] config/redis)")?
    {
        Some(plan) => {
            let r = crate::cluster::Redis::new(&plan)?;
            r.spawn_role_checks(shutdown.clone());
            Some(r)
        }
        None => None,
    };
    let events = match &redis {
        Some(r) => {
            tracing::info!(redis = r.addr(), "events go to the Backend.AI event stream");
            Events::new(crate::cluster::RedisEvents::start(
                r.clone(),
                shutdown.clone(),
            ))
        }
        None => Events::none(),
    };
    let metrics = crate::metrics::Metrics::new();
    let bgtasks = BgTasks::new(
        state.clone(),
        volumes.clone(),
        events.clone(),
        metrics.clone(),
    );
    let uploads = Uploads::new(
        state.clone(),
        volumes.clone(),
        config.daemon.upload_lock_stale_after,
    );
    uploads.recover().await?;
    let health = Health::new(state.clone(), volumes.clone());
    if let Some(r) = &redis {
        health.add(Arc::new(RedisCheck(r.clone())));
    }
    let config = Arc::new(config);
    let mut app = AppState {
        config: config.clone(),
        volumes,
        state,
        bgtasks: bgtasks.clone(),
        uploads: uploads.clone(),
        tokens: Tokens::new(&jwt_secret, config.proxy.session_expire),
        manager_secret: Arc::new(manager_secret),
        health,
        shutdown: shutdown.clone(),
        archives: client::archive::ArchiveSlots::new(
            config.daemon.max_archives,
            config.daemon.max_archives_per_owner,
            config.daemon.conn.write_idle_timeout,
        ),
        sessions: None,
        metrics,
        events: events.clone(),
    };
    // One cap per listener (security review 2, G5): clients of the public client port can
    // fill only its own slots, never the manager API's, gRPC's or the internal listener's.
    let conn_limits = config.daemon.conn;
    let admission = move || crate::api::conn::Admission::new(conn_limits);

    let listener_tls = ListenerTls::new(&config)?;
    let tls_of = |l: &crate::config::ListenerConfig| l.ssl_enabled;
    let manager_l = serve::bind(
        "manager",
        config.manager_api.listener.addr,
        tls_of(&config.manager_api.listener),
    )
    .await
    .with_context(|| {
        format!(
            "binding the manager API on {}",
            config.manager_api.listener.addr
        )
    })?;
    let client_l = serve::bind("client", config.client_api.addr, tls_of(&config.client_api))
        .await
        .with_context(|| format!("binding the client API on {}", config.client_api.addr))?;
    let internal_l = serve::bind("internal", config.manager_api.internal_addr, false)
        .await
        .with_context(|| {
            format!(
                "binding the internal API on {}",
                config.manager_api.internal_addr
            )
        })?;

    let agent = if config.agent.enabled {
        let (rpc_secret, rpc_stored) =
            secrets.resolve("agent.rpc.secret", config.agent.rpc.secret.as_deref())?;
        if rpc_stored {
            tracing::warn!(
                file = %secrets.path().display(),
                "[agent.rpc] secret is not configured; using the generated one kept in this file"
            );
        }
        let sessions = SessionManager::new(&config, app.state.clone(), app.volumes.clone())
            .context("preparing the session manager")?;
        app.health.add(Arc::new(DockerCheck(sessions.clone())));
        app.sessions = Some(sessions.clone());
        let rpc_l = serve::bind(
            "rpc",
            config.agent.rpc.listener.addr,
            config.agent.rpc.listener.ssl_enabled,
        )
        .await
        .with_context(|| {
            format!(
                "binding the RPC listener on {}",
                config.agent.rpc.listener.addr
            )
        })?;
        let heartbeat = if let Some(r) = &redis {
            let limiter =
                crate::cluster::RedisLimiter::new(r.clone(), config.agent.heartbeat_interval * 3);
            sessions.set_limiter(limiter.clone());
            let addr = |l: &tokio::net::TcpListener| {
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            };
            Some(Arc::new(crate::cluster::Heartbeat {
                redis: r.clone(),
                limiter,
                sessions: sessions.clone(),
                volumes: app.volumes.clone(),
                addresses: crate::cluster::Addresses {
                    manager_api: addr(&manager_l),
                    client_api: addr(&client_l),
                    rpc: addr(&rpc_l),
                    public_host: config.agent.public_host.clone(),
                },
                interval: config.agent.heartbeat_interval,
            }))
        } else {
            None
        };
        Some((sessions, rpc_l, rpc_secret, heartbeat))
    } else {
        None
    };

    let rpc_url = agent.as_ref().and_then(|(_, l, _, _)| {
        l.local_addr().ok().map(|mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let tls = config.agent.rpc.listener.ssl_enabled;
            format!("{}://{a}", if tls { "https" } else { "http" })
        })
    });
    bgtasks.recover().await?;
    bgtasks.spawn_forgetter(shutdown.clone());
    spawn_upload_reaper(
        uploads,
        config.daemon.upload_reap_interval,
        config.proxy.session_expire,
        shutdown.clone(),
    );
    let rpc_server = match agent {
        Some((sessions, rpc_l, rpc_secret, heartbeat)) => {
            // Adopt (or remove) this node's containers before the first heartbeat re-registers
            // their leases; the event watcher does it again whenever Docker comes back.
            let reconciled = match sessions.reconcile().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reconcile sessions with Docker yet");
                    false
                }
            };
            if let Some(hb) = heartbeat {
                hb.spawn(shutdown.clone());
            }
            sessions.spawn_event_watcher(reconciled, shutdown.clone());
            sessions.spawn_reaper(shutdown.clone());
            sessions.spawn_quota_guard(shutdown.clone());
            let router = crate::rpc::router(sessions, &rpc_secret).await;
            Some(serve::serve(
                "rpc",
                rpc_l,
                router,
                listener_tls.for_listener(&config.agent.rpc.listener)?,
                admission(),
                shutdown.clone(),
                config.daemon.shutdown_grace,
            ))
        }
        None => None,
    };
    volume_health.spawn(config.daemon.volume_check_interval, shutdown.clone());
    fuse.spawn_reaper(shutdown.clone());
    for v in app.volumes.iter() {
        v.spawn_background(shutdown.clone());
    }
    spawn_signal_handler(shutdown.clone());
    crate::allocator::spawn_trimmer(shutdown.clone());
    if let Some(r) = &redis {
        crate::cluster::spawn_service_discovery(
            r.clone(),
            announce(&config, &manager_l, &internal_l),
            shutdown.clone(),
        );
    }
    // Where to reach us, for `storage-agent ctl` (ports may be 0 in the config).
    let url = |l: Option<&tokio::net::TcpListener>, tls: bool| {
        l.and_then(|l| l.local_addr().ok()).map(|mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("{}://{a}", if tls { "https" } else { "http" })
        })
    };
    let endpoints = serde_json::json!({
        "manager": url(Some(&manager_l), tls_of(&config.manager_api.listener)),
        "client": url(Some(&client_l), tls_of(&config.client_api)),
        "internal": url(Some(&internal_l), false),
        "rpc": rpc_url,
    });
    let endpoints_file = config.daemon.state_dir.join("endpoints.json");
    if let Err(e) = crate::private_file::write(&endpoints_file, endpoints.to_string().as_bytes()) {
        tracing::warn!(error = %e, "cannot write endpoints.json for storage-agent ctl");
    }
    println!("ready node={}", config.proxy.node_id);
    tracing::info!("storage-agent ready");
    crate::notify::ready(&config.proxy.node_id);
    crate::notify::spawn_watchdog(shutdown.clone());
    {
        let s = shutdown.clone();
        tokio::spawn(async move {
            s.cancelled().await;
            crate::notify::stopping();
        });
    }

    let grace = config.daemon.shutdown_grace;
    let manager_tls = listener_tls.for_listener(&config.manager_api.listener)?;
    let client_tls = listener_tls.for_listener(&config.client_api)?;
    let rpc = async {
        if let Some(f) = rpc_server {
            f.await
        }
    };
    tokio::join!(
        rpc,
        serve::serve(
            "manager",
            manager_l,
            manager::router(app.clone()),
            manager_tls,
            admission(),
            shutdown.clone(),
            grace
        ),
        serve::serve(
            "client",
            client_l,
            client::router(app.clone()),
            client_tls,
            admission(),
            shutdown.clone(),
            grace
        ),
        serve::serve(
            "internal",
            internal_l,
            internal::router(app.clone()),
            None,
            admission(),
            shutdown.clone(),
            grace
        ),
    );
    bgtasks.shutdown(grace).await;
    // Terminal events of interrupted tasks (bgtask_cancelled) reach the manager before exit.
    events.flush(std::time::Duration::from_secs(5)).await;
    tracing::info!("storage-agent stopped");
    Ok(())
}

/// What service discovery announces: `announce-addr` and `announce-internal-addr`, else the
/// addresses as bound (an unspecified IP replaced by the host name).
fn announce(
    config: &Config,
    manager: &tokio::net::TcpListener,
    internal: &tokio::net::TcpListener,
) -> crate::cluster::Announce {
    let bound = |l: &tokio::net::TcpListener| match l.local_addr() {
        Ok(a) if a.ip().is_unspecified() => {
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}:{}", a.port())
        }
        Ok(a) => a.to_string(),
        Err(_) => String::new(),
    };
    crate::cluster::Announce {
        node_id: config.proxy.node_id.clone(),
        address: config
            .manager_api
            .announce_addr
            .clone()
            .unwrap_or_else(|| bound(manager)),
        prometheus_address: config
            .manager_api
            .announce_internal_addr
            .clone()
            .unwrap_or_else(|| bound(internal)),
    }
}

/// TLS for the manager, client and RPC listeners when `ssl-enabled`: the operator's
/// `ssl-cert`/`ssl-privkey`, or a certificate from the node CA (`<state-dir>/tls/ca.crt`, which
/// clients pin) for the names this host answers to.
struct ListenerTls {
    ca: Option<crate::tls::Ca>,
    names: Vec<String>,
}

impl ListenerTls {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let any = [
            &config.manager_api.listener,
            &config.client_api,
            &config.agent.rpc.listener,
        ]
        .iter()
        .any(|l| l.ssl_enabled && l.ssl_cert.is_none());
        let mut names = vec!["localhost".to_string()];
        for l in [&config.manager_api.listener, &config.client_api] {
            let ip = l.addr.ip();
            if !ip.is_unspecified() {
                names.push(ip.to_string());
            }
        }
        names.push("127.0.0.1".to_string());
        if let Ok(h) = nix::unistd::gethostname() {
            names.push(h.to_string_lossy().into_owned());
        }
        names.push(config.agent.public_host.clone());
        if let Some(a) = &config.manager_api.announce_addr {
            names.push(
                a.rsplit_once(':')
                    .map_or(a.as_str(), |(h, _)| h)
                    .to_string(),
            );
        }
        names.sort();
        names.dedup();
        let ca = if any {
            Some(crate::tls::Ca::node(
                &config.daemon.state_dir.join("tls"),
                &config.proxy.node_id,
                crate::tls::CaPurpose::Listeners,
                &names,
            )?)
        } else {
            None
        };
        Ok(ListenerTls { ca, names })
    }

    fn for_listener(
        &self,
        l: &crate::config::ListenerConfig,
    ) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        if !l.ssl_enabled {
            return Ok(None);
        }
        Ok(Some(crate::tls::listener_config(
            l.ssl_cert.as_deref(),
            l.ssl_privkey.as_deref(),
            self.ca.as_ref(),
            &self.names,
        )?))
    }
}

/// Expired uploads every `every`; staging data no token can resume (older than the token
/// lifetime, plus an hour) at start and every hour.
fn spawn_upload_reaper(
    uploads: Arc<Uploads>,
    every: std::time::Duration,
    token_lifetime: std::time::Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
        let mut tick = tokio::time::interval(every);
        let mut last_sweep: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = uploads.reap_expired().await {
                        tracing::warn!(error = %e, "upload reaper failed");
                    }
                    if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                        last_sweep = Some(tokio::time::Instant::now());
                        let older_than = std::time::SystemTime::now()
                            - token_lifetime
                            - std::time::Duration::from_secs(3600);
                        uploads.sweep_staging(older_than).await;
                    }
                }
            }
        }
    });
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = which,
            "shutting down: no new requests, finishing in-flight work"
        );
        shutdown.cancel();
    });
}

/// Backend.AI's `pid-file`: written at start, removed when the daemon stops.
struct PidFile(std::path::PathBuf);

impl PidFile {
    fn write(path: &std::path::Path) -> anyhow::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing pid-file {}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
