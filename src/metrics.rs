//! Prometheus metrics: the families and the middleware that counts requests (`api::scrape`
//! serves them on the internal listener's `GET /metrics`).
//!
//! Requests are counted as the Python storage proxy counts them (`backendai_api_request_count`
//! and `backendai_api_request_duration_sec`, with its labels), background tasks likewise
//! (`backendai_bgtask_*`); everything else is ours (`storage_agent_*`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
pub struct PidLabel {
    pub pid: String,
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
    pub spliced_bytes: Counter,
    pub patches_in_flight: Gauge,
    // Read at scrape time.
    pub(crate) uploads: Family<StateLabel, Gauge>,
    pub(crate) bgtasks: Family<StateLabel, Gauge>,
    pub(crate) sessions: Family<SessionLabels, Gauge>,
    pub(crate) capacity: Family<StateLabel, Gauge>,
    pub(crate) volume_status: Family<VolumeStatus, Gauge>,
    pub(crate) volume_bytes: Family<VolumeLabels, Gauge>,
    pub(crate) mount_holders: Family<MountKey, Gauge>,
    pub(crate) checks: Family<CheckLabels, Gauge>,
    pub(crate) events_queued: Gauge,
    // The process, as Backend.AI's SystemMetricObserver reports it (label `pid`, as its
    // multiprocess "liveall" gauges carry).
    pub(crate) async_tasks: Family<PidLabel, Gauge>,
    pub(crate) heap: Family<StateLabel, Gauge>,
    pub(crate) cpu_percent: Family<PidLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) memory_rss: Family<PidLabel, Gauge>,
    pub(crate) memory_vms: Family<PidLabel, Gauge>,
    /// CPU time (ticks) and wall time at the last scrape, for the CPU percentage in between.
    pub(crate) cpu_last: std::sync::Mutex<Option<(Instant, u64)>>,
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
            spliced_bytes: Counter::default(),
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
            async_tasks: Family::default(),
            heap: Family::default(),
            cpu_percent: Family::default(),
            memory_rss: Family::default(),
            memory_vms: Family::default(),
            cpu_last: std::sync::Mutex::new(None),
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
            "storage_agent_download_spliced_bytes",
            "Download bytes sent from the page cache to the socket by splice, never copied through the process",
            m.spliced_bytes.clone(),
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
        r.register(
            "backendai_async_task_count",
            "Number of active async tasks",
            m.async_tasks.clone(),
        );
        r.register(
            "storage_agent_heap_bytes",
            "The allocator's heap: bytes in use, and bytes freed but kept by it (glibc)",
            m.heap.clone(),
        );
        r.register(
            "backendai_cpu_usage_percent",
            "CPU usage of the process",
            m.cpu_percent.clone(),
        );
        r.register(
            "backendai_memory_used_rss",
            "Memory used by the process in RSS",
            m.memory_rss.clone(),
        );
        r.register(
            "backendai_memory_used_vms",
            "Memory used by the process in VMS",
            m.memory_vms.clone(),
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

    /// Everything in the registry, as OpenMetrics text (`api::scrape` refreshes what is read
    /// at scrape time first).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
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

#[cfg(test)]
mod dashboard {
    use std::collections::HashSet;

    /// The families registered in `Metrics::new` (read from this file: a family without
    /// samples is not in a scrape, so a scrape cannot list them all).
    fn families() -> HashSet<String> {
        let src = include_str!("metrics.rs");
        let mut out = HashSet::new();
        let mut rest = src;
        while let Some(i) = rest.find("r.register(") {
            rest = &rest[i + "r.register(".len()..];
            if let Some(q) = rest.find('"') {
                let name = &rest[q + 1..];
                if let Some(end) = name.find('"') {
                    out.insert(name[..end].to_string());
                }
            }
        }
        out
    }

    /// docs/grafana-dashboard.json: a Grafana dashboard model whose every query names only
    /// families we export (a counter as `<family>_total`, a histogram as `_bucket`, `_sum`,
    /// `_count`), and which covers requests, uploads, bgtasks, sessions and capacity, volumes,
    /// mounts and events.
    #[test]
    fn the_dashboard_queries_only_exported_families() {
        let fams = families();
        assert!(fams.len() > 20, "{fams:?}");
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../docs/grafana-dashboard.json")).unwrap();
        for key in [
            "title",
            "uid",
            "schemaVersion",
            "panels",
            "templating",
            "time",
        ] {
            assert!(dash.get(key).is_some(), "a dashboard model has {key}");
        }
        let mut used = HashSet::new();
        for p in dash["panels"].as_array().unwrap() {
            assert!(p["gridPos"]["w"].is_u64() && p["type"].is_string(), "{p}");
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                let mut ident = String::new();
                for c in expr.chars().chain([' ']) {
                    if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                        ident.push(c);
                        continue;
                    }
                    if ident.starts_with("backendai_") || ident.starts_with("storage_agent_") {
                        let family = ["_total", "_bucket", "_sum", "_count"]
                            .iter()
                            .find_map(|s| ident.strip_suffix(s).filter(|f| fams.contains(*f)))
                            .unwrap_or(&ident)
                            .to_string();
                        assert!(
                            fams.contains(&family),
                            "{ident} in {expr:?} is not exported"
                        );
                        used.insert(family);
                    }
                    ident.clear();
                }
            }
        }
        for covered in [
            "backendai_api_request_count",
            "storage_agent_upload_bytes",
            "backendai_bgtask_count",
            "storage_agent_sessions",
            "storage_agent_capacity_containers",
            "storage_agent_volume_bytes",
            "storage_agent_mount_holders",
            "storage_agent_events_queued",
        ] {
            assert!(used.contains(covered), "the dashboard shows {covered}");
        }
    }
}
