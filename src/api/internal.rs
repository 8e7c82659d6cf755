//! Internal listener (default 127.0.0.1:16023): health and readiness for load balancers and
//! orchestration, no auth. The manager API serves the same health routes.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;

use super::AppState;
use super::probes::{health, livez, readyz};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/capacity", get(capacity))
        .route("/metrics", get(super::scrape::handler))
        .route("/openapi.json", get(|| async { openapi("manager") }))
        .route(
            "/openapi/manager.json",
            get(|| async { openapi("manager") }),
        )
        .route("/openapi/client.json", get(|| async { openapi("client") }))
        .layer(super::trace_layer())
        .with_state(state)
}

/// The OpenAPI document of an API (`manager` or `client`), as generated from its routes.
pub fn openapi_json(api: &str) -> String {
    let mut doc = match api {
        "client" => super::client::routes().1,
        _ => super::manager::routes().1,
    };
    unique_operation_ids(&mut doc);
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Handlers of different route groups share names (`create`, `delete`): every operation is
/// named after its method and path instead, which is unique by construction.
fn unique_operation_ids(doc: &mut utoipa::openapi::OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let name: String = path
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let ops = [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("options", &mut item.options),
            ("head", &mut item.head),
            ("patch", &mut item.patch),
        ];
        for (method, op) in ops {
            if let Some(op) = op {
                op.operation_id = Some(format!("{method}{}", name.trim_end_matches('_')));
            }
        }
    }
}

fn openapi(api: &str) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(api),
    )
        .into_response()
}

/// How many more session containers this node can host (the same numbers as gRPC
/// `GetCapacity` and heartbeats), for probes and schedulers without gRPC.
pub async fn capacity(State(st): State<AppState>) -> Response {
    let Some(sessions) = &st.sessions else {
        return super::error::ApiError::problem(
            StatusCode::NOT_FOUND,
            "storage/agent-disabled",
            "Sessions are disabled on this node",
        )
        .msg("[agent] enabled = false")
        .into_response();
    };
    match sessions.capacity().await {
        Ok(c) => Json(serde_json::json!({
            "node_id": c.node_id,
            "max_containers": c.max_containers,
            "configured_max_containers": c.configured_max,
            "bounded_by": c.bounded_by,
            "running": c.running,
            "starting": c.starting,
            "available": c.available,
            "kinds": c.kinds.iter().map(|k| (k.kind.as_str().to_string(), serde_json::json!({
                "running": k.running,
                "starting": k.starting,
            }))).collect::<serde_json::Map<_, _>>(),
            "host": {
                "memory_total": c.host.memory_total,
                "memory_available": c.host.memory_available,
                "memory_reserved": c.host.memory_reserved,
                "cpus": c.host.cpus,
                "cpus_reserved": c.host.cpus_reserved,
            },
        }))
        .into_response(),
        Err(e) => super::error::ApiError::internal(e.to_string()).into_response(),
    }
}
