//! The session manager: validate, admit (capacity + per-user limit, under one lock, with the
//! session row as the reservation), start the container, report capacity changes; destroy.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use super::capacity::{self, Capacity, HostHeadroom};
use super::creds::{self, HostKey};
use super::filebrowser::{self, Engine};
use super::image::{self, Images};
use super::limiter::{LocalLimiter, UserLimiter};
use super::{
    CreateRequest, Created, Endpoint, Filter, Kind, Result, Session, SessionError, State, mounts,
    sftp, store,
};
use crate::config::Config;
use crate::config::agent::AgentConfig;
use crate::docker::Docker;
use crate::state::{State as Db, now_unix};
use crate::tls::{Leaf, SessionCerts};
use crate::volume::Volumes;

/// How many ports a launch tries when each one is taken before Docker can publish it.
const PORT_TRIES: u32 = 3;

pub struct SessionManager {
    pub(super) cfg: AgentConfig,
    pub(super) node_id: String,
    pub(super) agent_dir: PathBuf,
    pub(super) volumes: Volumes,
    pub(super) db: Db,
    pub docker: Arc<Docker>,
    images: Images,
    host_key: HostKey,
    pub(super) certs: SessionCerts,
    pub(super) engine: Engine,
    admission: tokio::sync::Mutex<()>,
    pub(super) limiter: RwLock<Arc<dyn UserLimiter>>,
    capacity_tx: watch::Sender<Capacity>,
    /// Network byte counters and the last time they moved, per running session (idle reaping).
    pub(super) activity: std::sync::Mutex<HashMap<Uuid, (u64, i64)>>,
    /// Sessions an operation of this process is starting or ending right now (with a count, as
    /// a failing start ends its session inside the start). `reconcile` leaves them alone: a
    /// `starting` or `terminating` row is only a leftover when no one here is working on it.
    in_flight: std::sync::Mutex<HashMap<Uuid, usize>>,
    /// What each session was told at the last quota check (`quota_guard.rs`).
    pub(super) quota_notices: std::sync::Mutex<HashMap<Uuid, Vec<String>>>,
}

/// Marks a session as in flight until dropped.
pub(super) struct InFlight<'a> {
    manager: &'a SessionManager,
    id: Uuid,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut m = self
            .manager
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

/// Ports our own sessions hold (not foreign listeners, which capacity counts separately).
fn held_ports(live: &[Session]) -> HashSet<u16> {
    live.iter().filter_map(|s| s.port).collect()
}

impl SessionManager {
    pub fn new(config: &Config, db: Db, volumes: Volumes) -> std::io::Result<Arc<Self>> {
        let cfg = config.agent.clone();
        let agent_dir = crate::config::agent::agent_dir(&config.daemon.state_dir);
        std::fs::create_dir_all(agent_dir.join("sessions"))?;
        mounts::clean_leftovers(&agent_dir.join("mounts"));
        let host_key = HostKey::load_or_create(&agent_dir.join("ssh"))?;
        let docker = Arc::new(Docker::new(&cfg.docker_socket, &cfg.network));
        let certs = session_certs(&cfg, &config.daemon.state_dir, &config.proxy.node_id)
            .map_err(std::io::Error::other)?;
        let initial = capacity::compute(
            &cfg,
            &config.proxy.node_id,
            &[],
            HostHeadroom::read(&cfg),
            0,
        );
        Ok(Arc::new(SessionManager {
            images: Images::new(docker.clone(), &cfg.base_image),
            cfg,
            node_id: config.proxy.node_id.clone(),
            agent_dir,
            volumes,
            db,
            docker,
            host_key,
            certs,
            engine: Engine::parse(&config.agent.filebrowser.engine),
            admission: tokio::sync::Mutex::new(()),
            limiter: RwLock::new(Arc::new(LocalLimiter)),
            capacity_tx: watch::channel(initial).0,
            activity: std::sync::Mutex::default(),
            in_flight: std::sync::Mutex::default(),
            quota_notices: std::sync::Mutex::default(),
        }))
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn set_limiter(&self, l: Arc<dyn UserLimiter>) {
        *self.limiter.write().unwrap_or_else(|p| p.into_inner()) = l;
    }

    pub(super) fn limiter(&self) -> Arc<dyn UserLimiter> {
        self.limiter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn in_flight(&self, id: Uuid) -> InFlight<'_> {
        *self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default() += 1;
        InFlight { manager: self, id }
    }

    pub(super) fn in_flight_ids(&self) -> Vec<Uuid> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    pub(super) fn is_in_flight(&self, id: Uuid) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    pub fn host_key_fingerprints(&self) -> Vec<String> {
        vec![self.host_key.fingerprint.clone()]
    }

    pub(super) fn files_dir(&self, id: Uuid) -> PathBuf {
        self.agent_dir.join("sessions").join(id.to_string())
    }

    /// The session's staging mount points (only while its container starts).
    fn mounts_dir(&self, id: Uuid) -> PathBuf {
        self.agent_dir.join("mounts").join(id.to_string())
    }

    pub fn endpoints(&self, s: &Session) -> Vec<Endpoint> {
        let Some(port) = s.port else { return vec![] };
        let host = self.cfg.public_host.clone();
        let host_in_url = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        match s.kind {
            Kind::Sftp => vec![Endpoint {
                protocol: "sftp",
                url: format!("sftp://{}@{host_in_url}:{port}", s.username),
                host,
                port,
            }],
            Kind::Filebrowser => vec![Endpoint {
                protocol: "https",
                url: format!("https://{host_in_url}:{port}/"),
                host,
                port,
            }],
        }
    }

    // ---- capacity --------------------------------------------------------------------------

    pub async fn capacity(&self) -> Result<Capacity> {
        let live = store::live(&self.db).await?;
        Ok(self.capacity_with(&live, &held_ports(&live)))
    }

    fn capacity_with(&self, live: &[Session], held: &HashSet<u16>) -> Capacity {
        capacity::compute(
            &self.cfg,
            &self.node_id,
            live,
            HostHeadroom::read(&self.cfg),
            capacity::foreign_listeners(self.cfg.port_range, held),
        )
    }

    pub fn watch_capacity(&self) -> watch::Receiver<Capacity> {
        self.capacity_tx.subscribe()
    }

    /// Recomputes capacity and tells watchers when it changed.
    pub async fn publish_capacity(&self) {
        match self.capacity().await {
            Ok(c) => {
                self.capacity_tx.send_if_modified(|old| {
                    // Host memory moves constantly; a change worth a message is in the counts.
                    let changed = (old.max_containers, old.running, old.starting, old.available)
                        != (c.max_containers, c.running, c.starting, c.available);
                    *old = c;
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot compute capacity"),
        }
    }

    // ---- create ----------------------------------------------------------------------------

    /// Checks every mount and opens its directory: the fds are what gets mounted (`mounts.rs`).
    /// Capacity and per-user limit, checked and reserved under one lock: the `starting` row is
    /// the reservation, so concurrent calls can never over-admit.
    async fn admit(&self, mut s: Session, limit: u32) -> Result<Session> {
        let _guard = self.admission.lock().await;
        let live = store::live(&self.db).await?;
        let held = held_ports(&live);
        let cap = self.capacity_with(&live, &held);
        if cap.available == 0 {
            return Err(SessionError::Exhausted(format!(
                "node full: {}/{} containers (bounded by {})",
                cap.running + cap.starting,
                cap.max_containers,
                cap.bounded_by
            )));
        }
        let users: Vec<Session> = live
            .iter()
            .filter(|l| l.user_id == s.user_id && l.resource_group == s.resource_group)
            .cloned()
            .collect();
        let limiter = self.limiter();
        limiter
            .admit(&s.resource_group, &s.user_id, s.id, limit, &users)
            .await?;
        let bind_ip: IpAddr = self.cfg.public_addr;
        let Some(port) = capacity::pick_port(self.cfg.port_range, bind_ip, &held) else {
            limiter.release(&s.resource_group, &s.user_id, s.id).await;
            return Err(SessionError::Exhausted(format!(
                "no free port in {}-{}",
                self.cfg.port_range.0, self.cfg.port_range.1
            )));
        };
        s.port = Some(port);
        if let Err(e) = store::insert(&self.db, &s).await {
            limiter.release(&s.resource_group, &s.user_id, s.id).await;
            return Err(e);
        }
        Ok(s)
    }

    /// Gives an admitted session another port, picked under the admission lock like the first:
    /// the one it had was free when picked but taken by someone else before Docker could bind
    /// it. The failed container is gone first, so the next try can use its name.
    async fn move_port(&self, s: &mut Session) -> Result<()> {
        // The failed container keeps the session's name until Docker has removed it.
        let name = self.container_of(s);
        self.docker.remove(&name).await?;
        let end = Instant::now() + Duration::from_secs(30);
        while self.docker.inspect(&name).await?.is_some() {
            if Instant::now() > end {
                return Err(SessionError::Internal(format!(
                    "container {name} still there 30 s after its removal"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _guard = self.admission.lock().await;
        let held = held_ports(&store::live(&self.db).await?);
        let port = capacity::pick_port(self.cfg.port_range, self.cfg.public_addr, &held)
            .ok_or_else(|| {
                SessionError::Exhausted(format!(
                    "no free port in {}-{}",
                    self.cfg.port_range.0, self.cfg.port_range.1
                ))
            })?;
        if !store::set_port(&self.db, s.id, port).await? {
            return Err(SessionError::Internal(
                "the session was destroyed while it started".into(),
            ));
        }
        s.port = Some(port);
        Ok(())
    }

    pub async fn create(&self, req: CreateRequest) -> Result<Created> {
        // In flight from the start: mounts made for it count it as their user, and a
        // reconcile meanwhile must not take them away.
        let id = Uuid::new_v4();
        let _in_flight = self.in_flight(id);
        let p = self.validate(&req, id).await?;
        let volumes: Vec<String> = p
            .session
            .spec
            .mounts
            .iter()
            .map(|m| m.volume.clone())
            .collect();
        // Refuse early, before a reservation, when Docker cannot be reached.
        let admitted = match self.docker.ping().await {
            Ok(()) => self.admit(p.session, p.limit).await,
            Err(e) => Err(e.into()),
        };
        let session = match admitted {
            Ok(s) => s,
            Err(e) => {
                self.release_mounts(id, volumes.iter().map(String::as_str))
                    .await;
                return Err(e);
            }
        };
        let span = tracing::info_span!(
            "session",
            id = %session.id,
            kind = session.kind.as_str(),
            user = %session.user_id
        );
        self.launch(session, p.password, p.leaf, p.sources)
            .instrument(span)
            .await
    }

    async fn launch(
        &self,
        session: Session,
        password: Option<String>,
        leaf: Option<Leaf>,
        sources: Vec<OwnedFd>,
    ) -> Result<Created> {
        tracing::info!(port = session.port, "session admitted");
        self.publish_capacity().await;
        let hash = match self.hash_password(session.kind, password.clone()).await {
            Ok(h) => h,
            Err(e) => {
                self.fail(&session, &format!("cannot hash the password: {e}"))
                    .await;
                return Err(SessionError::Internal(e));
            }
        };
        let started = Instant::now();
        let mut session = session;
        let mut tries = 1;
        let outcome = loop {
            let outcome = self
                .start(&session, hash.as_deref(), leaf.as_ref(), &sources)
                .await;
            match outcome {
                Err(SessionError::PortTaken(why)) if tries < PORT_TRIES => {
                    tracing::info!(
                        port = session.port,
                        why,
                        "port taken before Docker could publish it: picking another"
                    );
                    if let Err(e) = self.move_port(&mut session).await {
                        break Err(e);
                    }
                    tries += 1;
                }
                other => break other,
            }
        };
        match outcome {
            Ok(s) => {
                tracing::info!(ms = started.elapsed().as_millis() as u64, "session running");
                self.publish_capacity().await;
                Ok(Created {
                    ca_cert_pem: leaf.map(|l| l.ca_pem),
                    session: s,
                    password,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "session failed to start");
                self.fail(&session, &e.to_string()).await;
                Err(e)
            }
        }
    }

    /// The stored form of a generated password: a shadow hash for sshd and dufs, bcrypt for
    /// Filebrowser. Both are slow on purpose, so they run off the runtime threads.
    async fn hash_password(
        &self,
        kind: Kind,
        password: Option<String>,
    ) -> std::result::Result<Option<String>, String> {
        let Some(pw) = password else { return Ok(None) };
        let bcrypt = kind == Kind::Filebrowser && self.engine == Engine::Filebrowser;
        tokio::task::spawn_blocking(move || {
            if bcrypt {
                bcrypt::hash(&pw, 10).map_err(|e| e.to_string())
            } else {
                creds::shadow_hash(&pw)
            }
        })
        .await
        .map_err(|e| e.to_string())?
        .map(Some)
    }

    async fn start(
        &self,
        s: &Session,
        password_hash: Option<&str>,
        leaf: Option<&Leaf>,
        sources: &[OwnedFd],
    ) -> Result<Session> {
        let dir = self.files_dir(s.id);
        let mounts_dir = self.mounts_dir(s.id);
        let port = s
            .port
            .ok_or_else(|| SessionError::Internal("no port".into()))?;
        let addr = self.cfg.public_addr.to_string();
        let files_err =
            |e: std::io::Error| SessionError::Internal(format!("cannot write session files: {e}"));
        let spec = match s.kind {
            Kind::Sftp => {
                let image = self
                    .images
                    .ensure("sftp", self.cfg.sftp.image.as_deref(), image::sftp_context)
                    .await?;
                sftp::render_accounts(
                    &dir,
                    s,
                    password_hash,
                    self.cfg.kernel_uid,
                    self.cfg.kernel_gid,
                )
                .map_err(files_err)?;
                sftp::container_spec(
                    s,
                    &sftp::SftpParams {
                        node: &self.node_id,
                        image: &image,
                        files_dir: &dir,
                        mounts_dir: &mounts_dir,
                        host_key: &self.host_key.private_path,
                        public_addr: &addr,
                        port,
                    },
                )
            }
            Kind::Filebrowser => {
                let fb = &self.cfg.filebrowser;
                let image = match self.engine {
                    Engine::Dufs => {
                        let binary = fb.dufs_binary.clone();
                        self.images
                            .ensure("filebrowser", fb.image.as_deref(), move || {
                                filebrowser::dufs_context(&binary)
                            })
                            .await?
                    }
                    Engine::Filebrowser => {
                        self.images
                            .pulled(fb.image.as_deref().unwrap_or(&fb.filebrowser_image))
                            .await?
                    }
                };
                let leaf = leaf.ok_or_else(|| SessionError::Internal("no certificate".into()))?;
                filebrowser::render_files(&dir, leaf, self.cfg.kernel_uid, self.cfg.kernel_gid)
                    .map_err(files_err)?;
                let hash =
                    password_hash.ok_or_else(|| SessionError::Internal("no password".into()))?;
                filebrowser::container_spec(
                    s,
                    &filebrowser::FbParams {
                        node: &self.node_id,
                        engine: self.engine,
                        image: &image,
                        files_dir: &dir,
                        mounts_dir: &mounts_dir,
                        public_addr: &addr,
                        port,
                        uid: self.cfg.kernel_uid,
                        gid: self.cfg.kernel_gid,
                        password_hash: hash,
                    },
                )
            }
        };
        let id = self.run_with_mounts(s, &spec, &mounts_dir, sources).await?;
        self.wait_ready(s.kind, &id, port).await?;
        if !store::transition(&self.db, s.id, &[State::Starting], State::Running, None).await? {
            return Err(SessionError::Internal(
                "the session was destroyed while it started".into(),
            ));
        }
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.id, (0, now_unix()));
        store::get(&self.db, s.id)
            .await?
            .ok_or(SessionError::NotFound(s.id))
    }

    /// Starts the container with the session's mounts made from their checked fds, and checks
    /// that the container sees exactly those directories. The staging mounts are detached
    /// whatever happens: a started container keeps its own.
    async fn run_with_mounts(
        &self,
        s: &Session,
        spec: &crate::docker::ContainerSpec,
        mounts_dir: &std::path::Path,
        sources: &[OwnedFd],
    ) -> Result<String> {
        let with_ro: Vec<(&OwnedFd, bool)> = sources
            .iter()
            .zip(&s.spec.mounts)
            .map(|(fd, m)| (fd, m.read_only))
            .collect();
        let staged = mounts::stage(mounts_dir, &with_ro).map_err(|e| {
            SessionError::Internal(format!("cannot prepare the session's mounts: {e}"))
        })?;
        let started = async {
            let id = self.docker.run(spec).await?;
            store::set_container(&self.db, s.id, &id).await?;
            let pid = self.docker.inspect(&id).await?.map(|c| c.pid).unwrap_or(0);
            let targets: Vec<(String, &OwnedFd)> = s
                .spec
                .mounts
                .iter()
                .zip(sources)
                .map(|(m, fd)| (s.kind.mount_target(&s.username, &m.name), fd))
                .collect();
            mounts::verify(pid, &targets).map_err(|why| {
                tracing::error!(session = %s.id, why, "session mount check failed");
                SessionError::Internal(format!("session mount check failed: {why}"))
            })?;
            Ok(id)
        }
        .await;
        staged.release();
        started
    }

    /// Ready when the service answers on the published port: the SSH banner for SFTP, an HTTP
    /// answer over TLS for the file browser.
    async fn wait_ready(&self, kind: Kind, container: &str, port: u16) -> Result<()> {
        let addr = if self.cfg.public_addr.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.cfg.public_addr
        };
        let deadline = Instant::now() + self.cfg.start_timeout;
        loop {
            let answered = match kind {
                Kind::Sftp => probe_ssh(addr, port).await,
                Kind::Filebrowser => probe_https(addr, port).await,
            };
            if answered {
                return Ok(());
            }
            match self.docker.inspect(container).await? {
                Some(st) if st.running => {}
                Some(st) => {
                    let logs = self.docker.logs_tail(container, 10).await;
                    return Err(SessionError::Internal(format!(
                        "the container exited during start (code {}): {logs}",
                        st.exit_code.unwrap_or(-1)
                    )));
                }
                None => {
                    return Err(SessionError::Internal(
                        "the container vanished during start".into(),
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(SessionError::Internal(format!(
                    "not ready within {:?}",
                    self.cfg.start_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Cleans up a session that could not start and records why. Never leaves a container.
    pub(super) async fn fail(&self, s: &Session, reason: &str) {
        // The row may know the container id by now; the caller's copy predates the start.
        let current = store::get(&self.db, s.id).await.ok().flatten();
        let container = self.container_of(current.as_ref().unwrap_or(s));
        if let Err(e) = self.docker.remove(&container).await {
            tracing::error!(session = %s.id, error = %e, "cannot remove the container of a failed session");
        }
        let _ = store::transition(
            &self.db,
            s.id,
            &[State::Starting, State::Running, State::Terminating],
            State::Failed,
            Some(reason),
        )
        .await;
        self.forget(s).await;
        self.publish_capacity().await;
    }

    /// What goes with every session however it ends: its files, its lease, its idle counter.
    pub(super) async fn forget(&self, s: &Session) {
        let _ = std::fs::remove_dir_all(self.files_dir(s.id));
        self.release_mounts(s.id, s.spec.mounts.iter().map(|m| m.volume.as_str()))
            .await;
        self.limiter()
            .release(&s.resource_group, &s.user_id, s.id)
            .await;
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&s.id);
    }

    /// The container id once Docker gave one, its deterministic name before.
    fn container_of(&self, s: &Session) -> String {
        s.container_id
            .clone()
            .unwrap_or_else(|| sftp::container_name(&self.node_id, s.kind, s.id))
    }

    // ---- read ------------------------------------------------------------------------------

    pub async fn get(&self, id: Uuid) -> Result<Session> {
        store::get(&self.db, id)
            .await?
            .ok_or(SessionError::NotFound(id))
    }

    pub async fn list(&self, f: &Filter) -> Result<Vec<Session>> {
        store::list(&self.db, f).await
    }

    /// Sessions holding (or about to hold) a container.
    pub async fn live_sessions(&self) -> Result<Vec<Session>> {
        store::live(&self.db).await
    }

    // ---- destroy ---------------------------------------------------------------------------

    /// Stops and removes the container; idempotent on ended sessions.
    pub async fn destroy(&self, id: Uuid, reason: &str) -> Result<Session> {
        let _in_flight = self.in_flight(id);
        let s = self.get(id).await?;
        if !s.state.is_live() {
            return Ok(s);
        }
        store::transition(
            &self.db,
            id,
            &[State::Starting, State::Running],
            State::Terminating,
            Some(reason),
        )
        .await?;
        self.docker.remove(&self.container_of(&s)).await?;
        store::transition(
            &self.db,
            id,
            &[State::Terminating, State::Starting, State::Running],
            State::Terminated,
            Some(reason),
        )
        .await?;
        self.forget(&s).await;
        tracing::info!(session = %id, reason, "session destroyed");
        self.publish_capacity().await;
        self.get(id).await
    }
}

async fn probe_ssh(addr: IpAddr, port: u16) -> bool {
    let Ok(Ok(mut c)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((addr, port)),
    )
    .await
    else {
        return false;
    };
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"SSH-")
    )
}

async fn probe_https(addr: IpAddr, port: u16) -> bool {
    use tokio::io::AsyncWriteExt;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect((addr, port)).await.ok()?;
        let connector = tokio_rustls::TlsConnector::from(crate::tls::probe_client_config());
        let name = rustls_pki_types::ServerName::IpAddress(addr.into());
        let mut tls = connector.connect(name, tcp).await.ok()?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 12];
        let n = tls.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), probe).await,
        Ok(Some(true))
    )
}

/// Session certificates from `[agent.tls]`: the operator's certificate as is, the operator's CA,
/// or the node CA (made on first start under `<state-dir>/tls`).
fn session_certs(
    cfg: &AgentConfig,
    state_dir: &std::path::Path,
    node_id: &str,
) -> std::result::Result<SessionCerts, crate::tls::TlsError> {
    let t = &cfg.tls;
    if let (Some(c), Some(k)) = (&t.cert, &t.key) {
        return SessionCerts::fixed(c, k);
    }
    let ca = match (&t.ca_cert, &t.ca_key) {
        (Some(c), Some(k)) => crate::tls::Ca::from_files(c, k)?,
        _ => crate::tls::Ca::node(
            &state_dir.join("tls"),
            node_id,
            crate::tls::CaPurpose::Sessions,
            std::slice::from_ref(&cfg.public_host),
        )?,
    };
    Ok(SessionCerts::Issued {
        ca,
        names: vec![cfg.public_host.clone()],
        max_validity: t.leaf_validity,
    })
}
