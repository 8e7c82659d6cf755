//! `/volumes`, `/volume/hwinfo`, `/volume/performance-metric`, and the deprecated `/volume/quota`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::AppState;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{ApiJson, EmptyBody};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(volumes))
        .routes(routes!(hwinfo))
        .routes(routes!(performance_metric))
        .routes(routes!(deprecated_quota))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct VolumeReq {
    pub volume: String,
}

#[utoipa::path(get, path = "/volumes", tag = "volumes",
    summary = "List volumes",
    responses((status = 200, description = "volumes: name, backend, path, fsprefix, capabilities", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
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

#[utoipa::path(get, path = "/volume/hwinfo", tag = "volumes", request_body = VolumeReq,
    summary = "Health of a volume",
    responses((status = 200, description = "status, status_info, metadata", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
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

#[utoipa::path(get, path = "/volume/performance-metric", tag = "volumes", request_body = VolumeReq,
    summary = "Performance counters of a volume",
    responses((status = 200, description = "I/O counters", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
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
#[utoipa::path(method(get, patch), path = "/volume/quota", tag = "volumes", summary = "Deprecated since 23.09 (quota scopes replace it)",
    responses((status = 400, description = "Always", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn deprecated_quota() -> ApiError {
    ApiError::problem(
        StatusCode::BAD_REQUEST,
        "storage/deprecated-api",
        "Deprecated API",
    )
    .msg("/volume/quota is a deprecated API; use /quota-scope")
}
