//! `/volumes`, `/volume/hwinfo`, `/volume/performance-metric`, and the deprecated `/volume/quota`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::AppState;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{ApiJson, EmptyBody};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/volumes", get(volumes))
        .route("/volume/hwinfo", get(hwinfo))
        .route("/volume/performance-metric", get(performance_metric))
        .route(
            "/volume/quota",
            get(deprecated_quota).patch(deprecated_quota),
        )
}

#[derive(Deserialize)]
pub struct VolumeReq {
    pub volume: String,
}

async fn volumes(State(st): State<AppState>, _: EmptyBody) -> Json<Value> {
    let list: Vec<Value> = st
        .volumes
        .iter()
        .map(|v| {
            json!({
                "name": v.name(),
                "backend": v.backend(),
                "path": v.location(),
                "fsprefix": v.fsprefix(),
                "capabilities": v.capabilities(),
            })
        })
        .collect();
    Json(json!({ "volumes": list }))
}

async fn hwinfo(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<VolumeReq>,
) -> ApiResult<Json<Value>> {
    let hw = st.volumes.hwinfo(&req.volume).await?;
    Ok(Json(json!({
        "status": hw.status.as_str(),
        "status_info": hw.status_info,
        "metadata": hw.metadata,
    })))
}

async fn performance_metric(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<VolumeReq>,
) -> ApiResult<Json<Value>> {
    let m = st.volumes.get(&req.volume)?.performance_metric().await?;
    Ok(Json(json!({
        "metric": {
            "iops_read": m.iops_read,
            "iops_write": m.iops_write,
            "io_bytes_read": m.io_bytes_read,
            "io_bytes_write": m.io_bytes_write,
            "io_usec_read": m.io_usec_read,
            "io_usec_write": m.io_usec_write,
        },
        "observed_at": chrono::Utc::now().to_rfc3339(),
    })))
}

/// Per-vfolder quota was replaced by quota scopes in 23.09; Backend.AI answers 400.
async fn deprecated_quota() -> ApiError {
    ApiError::problem(
        StatusCode::BAD_REQUEST,
        "storage/deprecated-api",
        "Deprecated API",
    )
    .msg("/volume/quota is a deprecated API; use /quota-scope")
}
