//! Health, liveness and readiness: served on the internal listener and on the manager API
//! (as Backend.AI's proxy serves them there).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};

use super::AppState;

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
