//! Quota scopes: `POST/GET/PATCH /quota-scope`, `DELETE /quota-scope/quota`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::AppState;
use crate::api::error::ApiResult;
use crate::api::extract::ApiJson;
use crate::ids::QuotaScopeId;
use crate::volume::VolumeError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/quota-scope", post(create).get(describe).patch(update))
        .route("/quota-scope/quota", delete(unset))
}

#[derive(Deserialize)]
struct QuotaOptions {
    limit_bytes: u64,
}

#[derive(Deserialize)]
struct CreateReq {
    volume: String,
    qsid: QuotaScopeId,
    #[serde(default)]
    options: Option<QuotaOptions>,
    /// Backend.AI passes vendor-specific arguments here; no backend of ours takes any.
    #[serde(default)]
    #[allow(dead_code)]
    extra_args: Option<Value>,
}

#[derive(Deserialize)]
struct ScopeReq {
    volume: String,
    qsid: QuotaScopeId,
}

#[derive(Deserialize)]
struct UpdateReq {
    volume: String,
    qsid: QuotaScopeId,
    options: QuotaOptions,
}

async fn create(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<CreateReq>,
) -> ApiResult<StatusCode> {
    st.volumes
        .get(&r.volume)?
        .create_quota_scope(&r.qsid, r.options.map(|o| o.limit_bytes))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn describe(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<ScopeReq>,
) -> ApiResult<Json<Value>> {
    let usage = st
        .volumes
        .get(&r.volume)?
        .describe_quota_scope(&r.qsid)
        .await?
        .ok_or(VolumeError::QuotaScopeNotFound(r.qsid))?;
    Ok(Json(json!({
        "used_bytes": usage.used_bytes,
        "limit_bytes": usage.limit_bytes,
    })))
}

async fn update(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<UpdateReq>,
) -> ApiResult<StatusCode> {
    st.volumes
        .get(&r.volume)?
        .update_quota_scope(&r.qsid, r.options.limit_bytes)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn unset(State(st): State<AppState>, ApiJson(r): ApiJson<ScopeReq>) -> ApiResult<StatusCode> {
    st.volumes.get(&r.volume)?.unset_quota(&r.qsid).await?;
    Ok(StatusCode::NO_CONTENT)
}
