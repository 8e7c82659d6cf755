//! A thin wrapper over bollard: the few Docker calls sessions need, with our own container spec
//! type (so `session/` never names bollard types) and errors that say whether Docker is down
//! (UNAVAILABLE) or refused something.
//!
//! Debian's dockerd 20.10 speaks API 1.41 while bollard 0.21 defaults to 1.53, so the client
//! version is negotiated once at connect.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, HostConfig, MountBindOptions, MountBindOptionsPropagationEnum, MountType,
    NetworkCreateRequest, PortBinding,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, EventsOptions, InspectContainerOptions,
    ListContainersOptions, ListNetworksOptions, LogsOptions, RemoveContainerOptions, StatsOptions,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::OnceCell;

/// Labels on every container the daemon makes.
pub const LABEL_NODE: &str = "ai.backend.storage-agent.node";
pub const LABEL_SESSION: &str = "ai.backend.storage-agent.session";
pub const LABEL_KIND: &str = "ai.backend.storage-agent.kind";
pub const LABEL_USER: &str = "ai.backend.storage-agent.user";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker is unavailable at {socket}: {message}")]
    Unavailable { socket: String, message: String },
    #[error("no such container or image: {0}")]
    NotFound(String),
    #[error("Docker refused the request: {0}")]
    Api(String),
    /// The published port was free when picked but something bound it before Docker did.
    #[error("the port was taken before Docker could publish it: {0}")]
    PortTaken(String),
    #[error("building image {tag} failed: {message}")]
    Build { tag: String, message: String },
}

/// What a session container looks like, independent of the Docker client library.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub cmd: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub labels: HashMap<String, String>,
    /// Bind mounts: typed, never `host:container[:ro]` strings (a `:` in a path cannot
    /// change their meaning). Every source is a path only the daemon controls.
    pub mounts: Vec<BindMount>,
    /// Container path → tmpfs options.
    pub tmpfs: HashMap<String, String>,
    /// (container port, host IP, host port).
    pub ports: Vec<(u16, String, u16)>,
    pub nano_cpus: i64,
    pub memory: i64,
    pub pids: i64,
    pub cap_add: Vec<String>,
    pub readonly_rootfs: bool,
    pub healthcheck: Option<Vec<String>>,
}

impl ContainerSpec {
    fn to_bollard(&self) -> ContainerCreateBody {
        let mut port_bindings = HashMap::new();
        let mut exposed = Vec::new();
        for (cport, ip, hport) in &self.ports {
            let key = format!("{cport}/tcp");
            exposed.push(key.clone());
            port_bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(ip.clone()),
                    host_port: Some(hport.to_string()),
                }]),
            );
        }
        ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: (!self.cmd.is_empty()).then(|| self.cmd.clone()),
            entrypoint: self.entrypoint.clone(),
            env: Some(self.env.clone()),
            user: self.user.clone(),
            labels: Some(self.labels.clone()),
            exposed_ports: Some(exposed),
            healthcheck: self
                .healthcheck
                .as_ref()
                .map(|test| bollard::models::HealthConfig {
                    test: Some(test.clone()),
                    interval: Some(5_000_000_000),
                    timeout: Some(3_000_000_000),
                    retries: Some(3),
                    start_period: Some(2_000_000_000),
                    ..Default::default()
                }),
            host_config: Some(HostConfig {
                mounts: Some(
                    self.mounts
                        .iter()
                        .map(|m| bollard::models::Mount {
                            typ: Some(MountType::BIND),
                            source: Some(m.source.clone()),
                            target: Some(m.target.clone()),
                            read_only: Some(m.read_only),
                            bind_options: Some(MountBindOptions {
                                propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                tmpfs: Some(self.tmpfs.clone()),
                port_bindings: Some(port_bindings),
                nano_cpus: Some(self.nano_cpus),
                memory: Some(self.memory),
                // No swap beyond the memory limit.
                memory_swap: Some(self.memory),
                pids_limit: Some(self.pids),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(self.cap_add.clone()),
                security_opt: Some(vec!["no-new-privileges".into()]),
                readonly_rootfs: Some(self.readonly_rootfs),
                privileged: Some(false),
                init: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A bind mount of a host path the daemon controls.
#[derive(Debug, Clone, PartialEq)]
pub struct BindMount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl BindMount {
    pub fn new(source: impl Into<String>, target: impl Into<String>, read_only: bool) -> Self {
        BindMount {
            source: source.into(),
            target: target.into(),
            read_only,
        }
    }
}

/// What we need to know of a container.
#[derive(Debug, Clone)]
pub struct ContainerState {
    pub id: String,
    pub running: bool,
    /// The container's init process on the host (inspect only; 0 when not running).
    pub pid: i64,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    pub error: Option<String>,
    pub labels: HashMap<String, String>,
}

/// A container lifecycle event for one of our containers.
#[derive(Debug, Clone)]
pub struct ContainerEvent {
    pub id: String,
    pub action: String,
    pub labels: HashMap<String, String>,
}

pub struct Docker {
    socket: String,
    /// The network session containers join; `bridge` is Docker's default one.
    network: String,
    client: OnceCell<bollard::Docker>,
}

/// Docker's own bridge option: with it off, containers on the network cannot reach each other
/// (only the published ports, from outside), so a compromised sshd or dufs cannot probe the
/// node's other sessions.
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

impl Docker {
    pub fn new(socket: &str, network: &str) -> Self {
        Docker {
            socket: socket.to_string(),
            network: network.to_string(),
            client: OnceCell::new(),
        }
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> DockerError {
        DockerError::Unavailable {
            socket: self.socket.clone(),
            message: e.to_string(),
        }
    }

    fn map(&self, e: bollard::errors::Error) -> DockerError {
        use bollard::errors::Error as E;
        match e {
            E::DockerResponseServerError {
                status_code: 404,
                message,
            } => DockerError::NotFound(message),
            E::DockerResponseServerError { message, .. } => DockerError::Api(message),
            E::JsonDataError { message, .. } => DockerError::Api(message),
            other => self.unavailable(other),
        }
    }

    async fn client(&self) -> Result<&bollard::Docker, DockerError> {
        self.client
            .get_or_try_init(|| async {
                let d = bollard::Docker::connect_with_unix(
                    &self.socket,
                    300,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| self.unavailable(e))?;
                d.negotiate_version().await.map_err(|e| self.unavailable(e))
            })
            .await
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        self.client()
            .await?
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| self.map(e))
    }

    pub async fn image_exists(&self, name: &str) -> Result<bool, DockerError> {
        match self.client().await?.inspect_image(name).await {
            Ok(_) => Ok(true),
            Err(e) => match self.map(e) {
                DockerError::NotFound(_) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// `docker pull`.
    pub async fn pull(&self, image: &str) -> Result<(), DockerError> {
        let client = self.client().await?;
        let (name, tag) = match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (image, "latest"),
        };
        let mut s = client.create_image(
            Some(bollard::query_parameters::CreateImageOptions {
                from_image: Some(name.to_string()),
                tag: Some(tag.to_string()),
                ..Default::default()
            }),
            None,
            None,
        );
        while let Some(item) = s.next().await {
            let info = item.map_err(|e| self.map(e))?;
            if let Some(e) = info.error_detail.and_then(|d| d.message) {
                return Err(DockerError::Api(e));
            }
        }
        Ok(())
    }

    /// `docker build` from an in-memory tar context (legacy builder, as Debian's dockerd has).
    pub async fn build_image(
        &self,
        tag: &str,
        context_tar: Bytes,
        buildargs: HashMap<String, String>,
        labels: HashMap<String, String>,
    ) -> Result<(), DockerError> {
        let client = self.client().await?;
        let opts = BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(tag.to_string()),
            buildargs: Some(buildargs),
            labels: Some(labels),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        let mut stream = client.build_image(opts, None, Some(bollard::body_full(context_tar)));
        let mut tail: Vec<String> = Vec::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| match self.map(e) {
                DockerError::Api(m) => DockerError::Build {
                    tag: tag.to_string(),
                    message: m,
                },
                other => other,
            })?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(DockerError::Build {
                    tag: tag.to_string(),
                    message: format!("{err}\n{}", tail.join("")),
                });
            }
            if let Some(line) = info.stream {
                tracing::debug!(image = tag, "{}", line.trim_end());
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
        }
        if !self.image_exists(tag).await? {
            return Err(DockerError::Build {
                tag: tag.to_string(),
                message: format!("the build ended without the image\n{}", tail.join("")),
            });
        }
        Ok(())
    }

    /// The sessions' network, made when missing as a bridge with inter-container traffic off
    /// (one an operator made is used as it is). Asked every time (about a millisecond), like
    /// images, so a removed network comes back. Returns the network's id.
    ///
    /// Docker before API 1.44 lets two concurrent creates make two networks of one name (and
    /// then refuses the name as ambiguous), and every daemon on the host may be creating it.
    /// So the name is only looked up by listing, and everyone settles on the oldest network of
    /// that name, which every creator sees once its own create is done; the younger ones are
    /// removed when empty.
    async fn ensure_network(&self) -> Result<String, DockerError> {
        if let Some(id) = self.oldest_network().await? {
            return Ok(id);
        }
        let request = NetworkCreateRequest {
            name: self.network.clone(),
            driver: Some("bridge".into()),
            options: Some(HashMap::from([(ICC_OPTION.into(), "false".into())])),
            labels: Some(HashMap::from([(LABEL_KIND.into(), "sessions".into())])),
            ..Default::default()
        };
        let client = self.client().await?;
        let mine = match client.create_network(request).await {
            Ok(created) => Some(created.id),
            Err(e) => match self.map(e) {
                DockerError::Api(m) if m.contains("already exists") => None,
                e => return Err(e),
            },
        };
        let chosen = self.oldest_network().await?.ok_or_else(|| {
            DockerError::Api(format!(
                "network {} vanished after its creation",
                self.network
            ))
        })?;
        if let Some(mine) = mine.filter(|m| *m != chosen) {
            // Lost the race: ours is empty (nothing joins it), so it goes.
            if let Err(e) = client.remove_network(&mine).await {
                tracing::warn!(network = %mine, "cannot remove a duplicate network: {e}");
            }
        }
        Ok(chosen)
    }

    /// The id of the oldest network named exactly like the sessions' network.
    async fn oldest_network(&self) -> Result<Option<String>, DockerError> {
        let client = self.client().await?;
        // The name filter matches substrings: compare exactly.
        let filters = HashMap::from([("name".to_string(), vec![self.network.clone()])]);
        let list = client
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.map(e))?;
        Ok(list
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(self.network.as_str()))
            .min_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)))
            .and_then(|n| n.id))
    }

    /// Creates and starts a container on the sessions' network; on a failed start the
    /// container is removed again.
    pub async fn run(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let network = if self.network == "bridge" {
            self.network.clone()
        } else {
            self.ensure_network().await?
        };
        let client = self.client().await?;
        let mut body = spec.to_bollard();
        if let Some(hc) = body.host_config.as_mut() {
            hc.network_mode = Some(network);
        }
        let created = client
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(spec.name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| self.map(e))?;
        if let Err(e) = client.start_container(&created.id, None).await {
            let e = match self.map(e) {
                DockerError::Api(m) if port_taken(&m) => DockerError::PortTaken(m),
                other => other,
            };
            let _ = self.remove(&created.id).await;
            return Err(e);
        }
        Ok(created.id)
    }

    pub async fn inspect(&self, id: &str) -> Result<Option<ContainerState>, DockerError> {
        let client = self.client().await?;
        match client
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => {
                let st = c.state.unwrap_or_default();
                Ok(Some(ContainerState {
                    id: c.id.unwrap_or_default(),
                    running: st.running.unwrap_or(false),
                    pid: st.pid.unwrap_or(0),
                    exit_code: st.exit_code,
                    oom_killed: st.oom_killed.unwrap_or(false),
                    error: st.error.filter(|e| !e.is_empty()),
                    labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
                }))
            }
            Err(e) => match self.map(e) {
                DockerError::NotFound(_) => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Force-removes a container and its anonymous volumes; a missing one is fine.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let client = self.client().await?;
        match client
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => match self.map(e) {
                DockerError::NotFound(_) => Ok(()),
                // "removal already in progress" is as good as removed.
                DockerError::Api(m) if m.contains("already in progress") => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Every container labelled as this node's, running or not.
    pub async fn list_node(&self, node: &str) -> Result<Vec<ContainerState>, DockerError> {
        let client = self.client().await?;
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_NODE}={node}")])]);
        let list = client
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| self.map(e))?;
        Ok(list
            .into_iter()
            .map(|c| ContainerState {
                id: c.id.unwrap_or_default(),
                running: c.state.map(|s| s.to_string() == "running").unwrap_or(false),
                pid: 0,
                exit_code: None,
                oom_killed: false,
                error: None,
                labels: c.labels.unwrap_or_default(),
            })
            .collect())
    }

    /// Lifecycle events of this node's containers (die, oom, destroy...), as they happen.
    pub async fn events(
        &self,
        node: &str,
    ) -> Result<impl Stream<Item = Result<ContainerEvent, DockerError>> + '_, DockerError> {
        let client = self.client().await?;
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![format!("{LABEL_NODE}={node}")]),
        ]);
        Ok(client
            .events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .map(move |item| {
                let m = item.map_err(|e| self.map(e))?;
                let actor = m.actor.unwrap_or_default();
                Ok(ContainerEvent {
                    id: actor.id.unwrap_or_default(),
                    action: m.action.unwrap_or_default(),
                    labels: actor.attributes.unwrap_or_default(),
                })
            }))
    }

    /// Bytes received plus sent over the container's network interfaces (idle detection).
    pub async fn net_bytes(&self, id: &str) -> Result<u64, DockerError> {
        let client = self.client().await?;
        let mut s = client.stats(
            id,
            Some(StatsOptions {
                stream: false,
                one_shot: true,
            }),
        );
        let stats = match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(r)) => r.map_err(|e| self.map(e))?,
            Ok(None) => return Err(DockerError::Api("no stats returned".into())),
            Err(_) => return Err(self.unavailable("stats did not answer within 10 s")),
        };
        Ok(stats
            .networks
            .unwrap_or_default()
            .values()
            .map(|n| n.rx_bytes.unwrap_or(0) + n.tx_bytes.unwrap_or(0))
            .sum())
    }

    /// The last lines a container printed (for failure reasons).
    pub async fn logs_tail(&self, id: &str, lines: usize) -> String {
        let Ok(client) = self.client().await else {
            return String::new();
        };
        let mut s = client.logs(
            id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: lines.to_string(),
                ..Default::default()
            }),
        );
        let mut out = String::new();
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(5), s.next()).await
        {
            out.push_str(&chunk.to_string());
        }
        out.trim().to_string()
    }
}

/// Whether Docker failed to publish a port because something else holds it: docker-proxy's
/// bind failing ("address already in use") or another container's binding ("port is already
/// allocated"). A port is only free when picked; a client's outgoing connection or another
/// program can take it before the container starts.
fn port_taken(message: &str) -> bool {
    message.contains("address already in use") || message.contains("port is already allocated")
}

#[cfg(test)]
mod tests {
    use super::port_taken;

    #[test]
    fn both_ways_docker_says_a_port_is_taken_are_recognised() {
        assert!(port_taken(
            "driver failed programming external connectivity on endpoint sa-x (0a28): Error \
             starting userland proxy: listen tcp4 127.0.0.1:37720: bind: address already in use"
        ));
        assert!(port_taken(
            "driver failed programming external connectivity on endpoint sa-y (1b39): Bind for \
             0.0.0.0:30001 failed: port is already allocated"
        ));
        assert!(!port_taken("No such image: localbase:bookworm-slim"));
    }
}
