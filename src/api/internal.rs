//! Internal listener (default 127.0.0.1:16023): health and readiness for load balancers and
//! orchestration, no auth. The manager API serves the same health routes.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;

use super::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .layer(super::trace_layer())
        .with_state(state)
}

/// Always 200; `status` says "ok" or "degraded".
pub async fn health(State(st): State<AppState>) -> Response {
    Json(st.health.report().await).into_response()
}

/// The process is up and answering.
pub async fn livez(State(st): State<AppState>) -> Response {
    Json(st.health.report().await).into_response()
}

/// 503 while a gating check (state database, a volume) fails.
pub async fn readyz(State(st): State<AppState>) -> Response {
    let report = st.health.report().await;
    let code = if report.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report)).into_response()
}
