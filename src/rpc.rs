//! The storage-agent gRPC service (`proto/storage_agent/v1/agent.proto`): a thin layer turning
//! protobuf messages into `session` calls and `SessionError` into status codes. It is served,
//! with `grpc.health.v1.Health` and server reflection, through the same accept loop as the HTTP
//! APIs (`api::serve`), so TLS works the same everywhere.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::pb;
use crate::pb::storage_agent_server::{StorageAgent, StorageAgentServer};
use crate::session::{
    Capacity, CreateRequest, Filter, Kind, LimitsRequest, MountRequest, Session, SessionError,
    SessionManager, State,
};

impl From<SessionError> for Status {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Invalid(m) => Status::invalid_argument(m),
            SessionError::Exhausted(m) | SessionError::PortTaken(m) => {
                Status::resource_exhausted(m)
            }
            SessionError::NotFound(id) => Status::not_found(format!("no session {id}")),
            SessionError::Unavailable(m) => Status::unavailable(m),
            SessionError::Internal(m) => Status::internal(m),
        }
    }
}

fn kind_from_pb(k: i32) -> Result<Kind, Status> {
    match pb::SessionKind::try_from(k) {
        Ok(pb::SessionKind::Sftp) => Ok(Kind::Sftp),
        Ok(pb::SessionKind::Filebrowser) => Ok(Kind::Filebrowser),
        _ => Err(Status::invalid_argument(
            "kind must be SESSION_KIND_SFTP or SESSION_KIND_FILEBROWSER",
        )),
    }
}

fn kind_to_pb(k: Kind) -> pb::SessionKind {
    match k {
        Kind::Sftp => pb::SessionKind::Sftp,
        Kind::Filebrowser => pb::SessionKind::Filebrowser,
    }
}

fn state_to_pb(s: State) -> pb::SessionState {
    match s {
        State::Starting => pb::SessionState::Starting,
        State::Running => pb::SessionState::Running,
        State::Terminating => pb::SessionState::Terminating,
        State::Terminated => pb::SessionState::Terminated,
        State::Failed => pb::SessionState::Failed,
    }
}

fn state_from_pb(s: i32) -> Result<Option<State>, Status> {
    Ok(match pb::SessionState::try_from(s) {
        Ok(pb::SessionState::Unspecified) => None,
        Ok(pb::SessionState::Starting) => Some(State::Starting),
        Ok(pb::SessionState::Running) => Some(State::Running),
        Ok(pb::SessionState::Terminating) => Some(State::Terminating),
        Ok(pb::SessionState::Terminated) => Some(State::Terminated),
        Ok(pb::SessionState::Failed) => Some(State::Failed),
        Err(_) => return Err(Status::invalid_argument("unknown session state")),
    })
}

fn ts(unix: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix,
        nanos: 0,
    }
}

fn session_to_pb(m: &SessionManager, s: &Session) -> pb::Session {
    pb::Session {
        id: s.id.to_string(),
        kind: kind_to_pb(s.kind) as i32,
        user_id: s.user_id.clone(),
        access_key: s.access_key.clone(),
        resource_group: s.resource_group.clone(),
        mounts: s
            .spec
            .mounts
            .iter()
            .map(|mt| pb::Mount {
                volume: mt.volume.clone(),
                vfid: mt.vfid.to_string(),
                name: mt.name.clone(),
                read_only: mt.read_only,
                subpath: if mt.subpath.is_root() {
                    String::new()
                } else {
                    mt.subpath.as_str().to_string()
                },
            })
            .collect(),
        public_keys: s.spec.public_keys.clone(),
        password_auth: s.spec.password_auth,
        state: state_to_pb(s.state) as i32,
        reason: s.reason.clone().unwrap_or_default(),
        notices: m.notices(s.id),
        endpoints: if s.state.is_live() {
            m.endpoints(s)
                .into_iter()
                .map(|e| pb::Endpoint {
                    protocol: e.protocol.to_string(),
                    host: e.host,
                    port: u32::from(e.port),
                    url: e.url,
                })
                .collect()
        } else {
            vec![]
        },
        host_key_fingerprints: if s.kind == Kind::Sftp {
            m.host_key_fingerprints()
        } else {
            vec![]
        },
        created_at: Some(ts(s.created_at)),
        expires_at: Some(ts(s.expires_at)),
        idle_timeout_seconds: s.spec.idle_timeout_secs,
        limits: Some(pb::Limits {
            cpus: s.spec.cpus,
            memory_bytes: s.spec.memory,
            pids: s.spec.pids,
        }),
        username: s.username.clone(),
        node_id: m.node_id().to_string(),
        container_id: s.container_id.clone().unwrap_or_default(),
        tls_cert_fingerprint: s.spec.tls_cert_fingerprint.clone().unwrap_or_default(),
    }
}

pub fn capacity_to_pb(c: &Capacity) -> pb::Capacity {
    pb::Capacity {
        node_id: c.node_id.clone(),
        max_containers: c.max_containers,
        running: c.running,
        starting: c.starting,
        available: c.available,
        kinds: c
            .kinds
            .iter()
            .map(|k| pb::KindCapacity {
                kind: kind_to_pb(k.kind) as i32,
                running: k.running,
                starting: k.starting,
            })
            .collect(),
        host: Some(pb::HostHeadroom {
            memory_total_bytes: c.host.memory_total,
            memory_available_bytes: c.host.memory_available,
            cpus_total: c.host.cpus,
            memory_reserved_bytes: c.host.memory_reserved,
            cpus_reserved: c.host.cpus_reserved,
        }),
        bounded_by: c.bounded_by.to_string(),
        configured_max_containers: c.configured_max,
    }
}

fn parse_id(id: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(id)
        .map_err(|_| Status::invalid_argument(format!("session id {id:?} is not a UUID")))
}

pub struct AgentService {
    sessions: Arc<SessionManager>,
}

type CapacityStream = Pin<Box<dyn Stream<Item = Result<pb::Capacity, Status>> + Send>>;

#[tonic::async_trait]
impl StorageAgent for AgentService {
    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let r = req.into_inner();
        let creds = r.credentials.unwrap_or_default();
        let limits = r.limits.unwrap_or_default();
        let nonzero = |v: f64| (v != 0.0).then_some(v);
        let create = CreateRequest {
            kind: kind_from_pb(r.kind)?,
            user_id: r.user_id,
            access_key: r.access_key,
            resource_group: r.resource_group,
            mounts: r
                .mounts
                .into_iter()
                .map(|m| MountRequest {
                    volume: m.volume,
                    vfid: m.vfid,
                    name: m.name,
                    read_only: m.read_only,
                    subpath: m.subpath,
                })
                .collect(),
            public_keys: creds.public_keys,
            generate_password: creds.generate_password,
            limits: LimitsRequest {
                cpus: nonzero(limits.cpus),
                memory: (limits.memory_bytes != 0).then_some(limits.memory_bytes),
                pids: (limits.pids != 0).then_some(limits.pids),
            },
            ttl: (r.ttl_seconds != 0).then(|| Duration::from_secs(r.ttl_seconds)),
            idle_timeout: (r.idle_timeout_seconds != 0)
                .then(|| Duration::from_secs(r.idle_timeout_seconds)),
            max_sessions_per_user: r.max_sessions_per_user,
            username: (!r.username.is_empty()).then_some(r.username),
        };
        let created = self.sessions.create(create).await?;
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(session_to_pb(&self.sessions, &created.session)),
            password: created.password.unwrap_or_default(),
            ca_cert_pem: created.ca_cert_pem.unwrap_or_default(),
        }))
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = parse_id(&req.into_inner().id)?;
        let s = self.sessions.get(id).await?;
        Ok(Response::new(session_to_pb(&self.sessions, &s)))
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let r = req.into_inner();
        let filter = Filter {
            user_id: (!r.user_id.is_empty()).then_some(r.user_id),
            kind: match r.kind {
                0 => None,
                k => Some(kind_from_pb(k)?),
            },
            state: state_from_pb(r.state)?,
        };
        let list = self.sessions.list(&filter).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: list
                .iter()
                .map(|s| session_to_pb(&self.sessions, s))
                .collect(),
        }))
    }

    async fn destroy_session(
        &self,
        req: Request<pb::DestroySessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let id = parse_id(&req.into_inner().id)?;
        let s = self.sessions.destroy(id, "destroyed on request").await?;
        Ok(Response::new(session_to_pb(&self.sessions, &s)))
    }

    async fn get_capacity(
        &self,
        _req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::Capacity>, Status> {
        let c = self.sessions.capacity().await?;
        Ok(Response::new(capacity_to_pb(&c)))
    }

    type WatchCapacityStream = CapacityStream;

    async fn watch_capacity(
        &self,
        _req: Request<pb::WatchCapacityRequest>,
    ) -> Result<Response<Self::WatchCapacityStream>, Status> {
        self.sessions.publish_capacity().await;
        let rx = self.sessions.watch_capacity();
        let stream = tokio_stream::wrappers::WatchStream::new(rx).map(|c| Ok(capacity_to_pb(&c)));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `authorization: Bearer <secret>`, compared in constant time (digests, so the length does not
/// leak either).
#[derive(Clone)]
pub struct Auth {
    digest: [u8; 32],
}

impl Auth {
    pub fn new(secret: &str) -> Self {
        Auth {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <secret>"))?;
        let d: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        if bool::from(d.ct_eq(&self.digest)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid secret"))
        }
    }
}

/// The gRPC router: StorageAgent and reflection behind the bearer secret; the standard health
/// service open, as load balancers probe it without application credentials.
pub async fn router(sessions: Arc<SessionManager>, secret: &str) -> axum::Router {
    let auth = Auth::new(secret);
    let a1 = auth.clone();
    let agent =
        StorageAgentServer::with_interceptor(AgentService { sessions }, move |r| a1.check(r));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<StorageAgentServer<AgentService>>()
        .await;
    // Both reflection versions: grpcurl and Postman speak v1, grpcio-reflection and older
    // tools v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor set is valid");
    let (a2, a3) = (auth.clone(), auth.clone());
    let v1 = tonic::service::interceptor::InterceptedService::new(v1, move |r| a2.check(r));
    let v1alpha =
        tonic::service::interceptor::InterceptedService::new(v1alpha, move |r| a3.check(r));
    tonic::service::Routes::new(agent)
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .into_axum_router()
}
