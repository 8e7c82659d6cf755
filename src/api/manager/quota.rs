//! Quota scopes: `POST/GET/PATCH /quota-scope`, `DELETE /quota-scope/quota`, and our
//! `DELETE /quota-scope` (a scope that holds no vfolder). On xfs and btrfs the limits are the
//! kernel's and so is the usage (O(1)); `options.limit_inodes` is our addition (xfs).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::AppState;
use crate::api::error::ApiResult;
use crate::api::extract::ApiJson;
use crate::ids::QuotaScopeId;
use crate::volume::{QuotaLimit, VolumeError};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, describe, update, remove))
        .routes(routes!(unset))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct QuotaOptions {
    /// Backend.AI's `ToInt`: a number or a numeric string; zero or below means no limit.
    #[serde(deserialize_with = "crate::api::params::to_i64")]
    limit_bytes: i64,
    /// Ours: a limit on files and directories, where the backend enforces one.
    #[serde(default, deserialize_with = "crate::api::params::opt_u64")]
    limit_inodes: Option<u64>,
}

impl QuotaOptions {
    fn limit(&self) -> QuotaLimit {
        QuotaLimit {
            bytes: u64::try_from(self.limit_bytes).ok().filter(|b| *b > 0),
            inodes: self.limit_inodes.filter(|n| *n > 0),
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
struct CreateQuotaScopeReq {
    volume: String,
    qsid: QuotaScopeId,
    #[serde(default)]
    options: Option<QuotaOptions>,
    /// Backend.AI passes vendor-specific arguments here; no backend of ours takes any.
    #[serde(default)]
    #[allow(dead_code)]
    extra_args: Option<Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct ScopeReq {
    volume: String,
    qsid: QuotaScopeId,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct UpdateReq {
    volume: String,
    qsid: QuotaScopeId,
    options: QuotaOptions,
}

#[utoipa::path(post, path = "/quota-scope", tag = "quota", request_body = CreateQuotaScopeReq,
    summary = "Create a quota scope",
    responses((status = 204, description = "Created"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn create(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<CreateQuotaScopeReq>,
) -> ApiResult<StatusCode> {
    st.volumes
        .get(&r.volume)?
        .create_quota_scope(&r.qsid, &r.options.map(|o| o.limit()).unwrap_or_default())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/quota-scope", tag = "quota", request_body = ScopeReq,
    summary = "Usage and limit of a quota scope",
    responses((status = 200, description = "used_bytes, limit_bytes (null where unknown)", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
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
    let mut body = json!({
        "used_bytes": usage.used_bytes,
        "limit_bytes": usage.limit_bytes,
    });
    // Inode counts where the kernel keeps them (xfs): our addition.
    if usage.used_inodes.is_some() {
        body["used_inodes"] = json!(usage.used_inodes);
        body["limit_inodes"] = json!(usage.limit_inodes);
    }
    Ok(Json(body))
}

#[utoipa::path(patch, path = "/quota-scope", tag = "quota", request_body = UpdateReq,
    summary = "Set a quota scope limit",
    responses((status = 204, description = "Updated (created when missing)"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn update(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<UpdateReq>,
) -> ApiResult<StatusCode> {
    st.volumes
        .get(&r.volume)?
        .update_quota_scope(&r.qsid, &r.options.limit())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/quota-scope", tag = "quota", request_body = ScopeReq,
    summary = "Delete an empty quota scope (ours)",
    responses((status = 204, description = "Deleted"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn remove(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<ScopeReq>,
) -> ApiResult<StatusCode> {
    st.volumes
        .get(&r.volume)?
        .delete_quota_scope(&r.qsid)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/quota-scope/quota", tag = "quota", request_body = ScopeReq,
    summary = "Remove a quota scope limit",
    responses((status = 204, description = "Limit removed"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn unset(State(st): State<AppState>, ApiJson(r): ApiJson<ScopeReq>) -> ApiResult<StatusCode> {
    st.volumes.get(&r.volume)?.unset_quota(&r.qsid).await?;
    Ok(StatusCode::NO_CONTENT)
}
