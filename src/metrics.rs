//! Prometheus metrics on the internal listener (`GET /metrics`), in the text format.
//!
//! Requests are counted as the Python storage proxy counts them (`backendai_api_request_count`
//! and `backendai_api_request_duration_sec`, with its labels), background tasks likewise
//! (`backendai_bgtask_*`); everything else is ours (`storage_agent_*`). State that lives
//! elsewhere (uploads, sessions, capacity, volumes, mounts, health checks, the event queue) is
//! read when Prometheus scrapes, so it can never drift from what the daemon reports elsewhere.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sqlx::Row;

use crate::api::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub method: String,
    /// The route pattern (`/folder/file/upload`), never the raw path.
    pub endpoint: String,
    pub domain: String,
    /// Which API: manager or client.
    pub operation: String,
    pub error_detail: String,
    pub status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels1 {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task_name: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiName {
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub kind: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeStatus {
    pub volume: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MountKey {
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub service_group: String,
    pub component_id: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<ApiLabels, Counter>,
    duration: Family<ApiLabels, Histogram>,
    bytes_in: Family<ApiName, Counter>,
    bytes_out: Family<ApiName, Counter>,
    pub bgtask_started: Family<Labels1, Counter>,
    pub bgtask_done: Family<TaskLabels, Counter>,
    pub bgtask_seconds: Family<Labels1, Histogram>,
    pub upload_bytes: Counter,
    pub patches_in_flight: Gauge,
    // Read at scrape time.
    uploads: Family<StateLabel, Gauge>,
    bgtasks: Family<StateLabel, Gauge>,
    sessions: Family<SessionLabels, Gauge>,
    capacity: Family<StateLabel, Gauge>,
    volume_status: Family<VolumeStatus, Gauge>,
    volume_bytes: Family<VolumeLabels, Gauge>,
    mount_holders: Family<MountKey, Gauge>,
    checks: Family<CheckLabels, Gauge>,
    events_queued: Gauge,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            bgtask_started: Family::default(),
            bgtask_done: Family::default(),
            bgtask_seconds: Family::new_with_constructor(duration_histogram),
            upload_bytes: Counter::default(),
            patches_in_flight: Gauge::default(),
            uploads: Family::default(),
            bgtasks: Family::default(),
            sessions: Family::default(),
            capacity: Family::default(),
            volume_status: Family::default(),
            volume_bytes: Family::default(),
            mount_holders: Family::default(),
            checks: Family::default(),
            events_queued: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "backendai_api_request_count",
            "API requests by route and status (as the Python storage proxy counts them)",
            m.requests.clone(),
        );
        r.register(
            "backendai_api_request_duration_sec",
            "API request latency in seconds, to the response head",
            m.duration.clone(),
        );
        r.register(
            "backendai_bgtask_count",
            "Background tasks started",
            m.bgtask_started.clone(),
        );
        r.register(
            "backendai_bgtask_done_count",
            "Background tasks ended, by status",
            m.bgtask_done.clone(),
        );
        r.register(
            "backendai_bgtask_processing_time_sec",
            "How long background tasks ran",
            m.bgtask_seconds.clone(),
        );
        r.register(
            "storage_agent_http_request_bytes",
            "Request body bytes received (as announced by Content-Length)",
            m.bytes_in.clone(),
        );
        r.register(
            "storage_agent_http_response_bytes",
            "Response body bytes sent (when their length is known up front)",
            m.bytes_out.clone(),
        );
        r.register(
            "storage_agent_upload_bytes",
            "Upload bytes made durable in staging",
            m.upload_bytes.clone(),
        );
        r.register(
            "storage_agent_upload_patches_in_flight",
            "Upload PATCH bodies being written right now",
            m.patches_in_flight.clone(),
        );
        r.register(
            "storage_agent_upload_sessions",
            "Upload sessions recorded, by state",
            m.uploads.clone(),
        );
        r.register(
            "storage_agent_bgtasks",
            "Background tasks recorded, by status",
            m.bgtasks.clone(),
        );
        r.register(
            "storage_agent_sessions",
            "SFTP and file browser sessions, by kind and state",
            m.sessions.clone(),
        );
        r.register(
            "storage_agent_capacity_containers",
            "Session capacity: max, running, starting, available",
            m.capacity.clone(),
        );
        r.register(
            "storage_agent_volume_status",
            "1 for the volume's current health verdict",
            m.volume_status.clone(),
        );
        r.register(
            "storage_agent_volume_bytes",
            "Volume capacity, used and available bytes",
            m.volume_bytes.clone(),
        );
        r.register(
            "storage_agent_mount_holders",
            "Users (sessions, requests) of each shared mount",
            m.mount_holders.clone(),
        );
        r.register(
            "storage_agent_check_up",
            "1 when a connectivity check (state database, Redis, volume I/O) passes",
            m.checks.clone(),
        );
        r.register(
            "storage_agent_events_queued",
            "Events waiting to reach the event bus (Redis)",
            m.events_queued.clone(),
        );
        Arc::new(Metrics { registry: r, ..m })
    }

    fn observe(&self, labels: ApiLabels, seconds: f64, api: &str, bytes: (u64, u64)) {
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(seconds);
        let api = ApiName {
            api: api.to_string(),
        };
        self.bytes_in.get_or_create(&api).inc_by(bytes.0);
        self.bytes_out.get_or_create(&api).inc_by(bytes.1);
    }

    /// Refreshes what is read at scrape time, then renders everything.
    async fn render(&self, st: &AppState) -> String {
        let pool = st.state.pool();
        let grouped = |sql: &'static str| async move {
            sqlx::query(sql)
                .fetch_all(pool)
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        self.uploads.clear();
        for (state, n) in grouped("SELECT state, COUNT(*) FROM uploads GROUP BY state").await {
            self.uploads.get_or_create(&StateLabel { state }).set(n);
        }
        self.bgtasks.clear();
        for (state, n) in grouped("SELECT status, COUNT(*) FROM bgtasks GROUP BY status").await {
            self.bgtasks.get_or_create(&StateLabel { state }).set(n);
        }
        self.mount_holders.clear();
        for (key, n) in grouped(
            "SELECT m.key, COUNT(h.holder) FROM fuse_mounts m
             LEFT JOIN fuse_mount_holders h ON h.key = m.key GROUP BY m.key",
        )
        .await
        {
            self.mount_holders.get_or_create(&MountKey { key }).set(n);
        }
        self.sessions.clear();
        self.capacity.clear();
        if let Some(sessions) = &st.sessions {
            if let Ok(list) = sessions.list(&Default::default()).await {
                for s in list {
                    self.sessions
                        .get_or_create(&SessionLabels {
                            kind: s.kind.as_str().to_string(),
                            state: s.state.as_str().to_string(),
                        })
                        .inc();
                }
            }
            if let Ok(c) = sessions.capacity().await {
                for (state, n) in [
                    ("max", c.max_containers),
                    ("running", c.running),
                    ("starting", c.starting),
                    ("available", c.available),
                ] {
                    self.capacity
                        .get_or_create(&StateLabel {
                            state: state.into(),
                        })
                        .set(n as i64);
                }
            }
        }
        self.volume_status.clear();
        self.volume_bytes.clear();
        for v in st.volumes.iter() {
            let hw = st.volumes.hwinfo(v.name()).await.ok();
            if let Some(hw) = &hw {
                self.volume_status
                    .get_or_create(&VolumeStatus {
                        volume: v.name().into(),
                        status: hw.status.as_str().into(),
                    })
                    .set(1);
            }
            // A remote volume resting unmounted is not mounted just to be measured.
            let resting = hw
                .as_ref()
                .and_then(|h| h.metadata.get("mounted"))
                .is_some_and(|m| m == "false");
            if resting || st.volumes.get(v.name()).is_err() {
                continue;
            }
            if let Ok(Ok(u)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), v.fs_usage()).await
            {
                for (kind, n) in [
                    ("capacity", u.capacity_bytes),
                    ("used", u.used_bytes),
                    ("available", u.available_bytes),
                ] {
                    self.volume_bytes
                        .get_or_create(&VolumeLabels {
                            volume: v.name().into(),
                            kind: kind.into(),
                        })
                        .set(n.min(i64::MAX as u64) as i64);
                }
            }
        }
        self.checks.clear();
        for c in st.health.report().await.connectivity.connectivity_checks {
            self.checks
                .get_or_create(&CheckLabels {
                    service_group: c.service_group,
                    component_id: c.component_id,
                })
                .set(c.is_healthy as i64);
        }
        self.events_queued.set(st.events.queued() as i64);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// `GET /metrics`.
pub async fn handler(State(st): State<AppState>) -> Response {
    let body = st.metrics.render(&st).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The route a request matched, passed out to `observe` (which runs outside routing).
#[derive(Clone)]
struct Route(String);

/// Innermost: tags the response with the matched route pattern.
pub async fn tag_route(path: MatchedPath, req: Request, next: Next) -> Response {
    let route = Route(path.as_str().to_string());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(route);
    resp
}

fn content_length(h: &HeaderMap) -> u64 {
    h.get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A method's label: hyper takes any token as a method, and each new label would be a series
/// kept for ever (security review 2, G4), so methods no route of ours knows are "other".
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: &[(Method, &str)] = &[
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::PATCH, "PATCH"),
        (Method::DELETE, "DELETE"),
        (Method::OPTIONS, "OPTIONS"),
    ];
    KNOWN
        .iter()
        .find(|(k, _)| k == m)
        .map_or("other", |(_, name)| name)
}

/// Outermost: counts and times every request of one API, answered by a route or not (an
/// unknown route or a refused token counts as `endpoint="unmatched"`).
pub async fn observe(
    State((metrics, api)): State<(Arc<Metrics>, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(req.method()).to_string();
    let bytes_in = content_length(req.headers());
    let resp = next.run(req).await;
    let status = resp.status();
    let endpoint = resp
        .extensions()
        .get::<Route>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| "unmatched".into());
    let error_detail = if status.is_client_error() || status.is_server_error() {
        status.canonical_reason().unwrap_or("").to_string()
    } else {
        String::new()
    };
    metrics.observe(
        ApiLabels {
            method,
            endpoint,
            domain: "storage".into(),
            operation: api.into(),
            error_detail,
            status_code: status.as_u16().to_string(),
        },
        started.elapsed().as_secs_f64(),
        api,
        (bytes_in, content_length(resp.headers())),
    );
    resp
}
