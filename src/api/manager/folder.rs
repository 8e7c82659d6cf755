//! vfolder lifecycle and usage: `/folder/create|delete|clone|mount|metadata|usage|used-bytes|
//! fs-usage`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::AppState;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::ApiJson;
use crate::bgtask::TaskSpec;
use crate::ids::VFolderId;
use crate::volume::{MountInfo, RelPath, VolumeError};

use super::volume::VolumeReq;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(delete))
        .routes(routes!(clone))
        .routes(routes!(mount))
        .routes(routes!(metadata))
        .routes(routes!(usage))
        .routes(routes!(used_bytes))
        .routes(routes!(fs_usage))
        .routes(routes!(register))
        .routes(routes!(deregister))
        .routes(routes!(sas))
        .routes(routes!(list_folders))
        .routes(routes!(list_scopes))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct ListReq {
    volume: String,
    /// A quota scope's UUID (either form); all scopes when absent.
    #[serde(default)]
    quota_scope: Option<uuid::Uuid>,
}

/// Ours (for tools): the vfolders on a volume, as (quota scope UUID, folder UUID) pairs; the
/// on-disk layout keeps no user/project kind.
#[utoipa::path(get, path = "/folders", tag = "folders", request_body = ListReq,
    summary = "List vfolders (ours)",
    responses((status = 200, description = "vfolders: quota_scope, folder", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn list_folders(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<ListReq>,
) -> ApiResult<Json<Value>> {
    let list = st
        .volumes
        .get(&r.volume)?
        .list_vfolders(r.quota_scope)
        .await?;
    Ok(Json(json!({
        "vfolders": list.iter().map(|(q, f)| json!({
            "quota_scope": q.hyphenated().to_string(),
            "folder": f.simple().to_string(),
        })).collect::<Vec<_>>(),
    })))
}

/// Ours (for tools): the quota scopes on a volume, by UUID.
#[utoipa::path(get, path = "/quota-scopes", tag = "folders", request_body = super::volume::VolumeReq,
    summary = "List quota scopes (ours)",
    responses((status = 200, description = "quota_scopes", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn list_scopes(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<super::volume::VolumeReq>,
) -> ApiResult<Json<Value>> {
    let list = st.volumes.get(&r.volume)?.list_quota_scopes().await?;
    Ok(Json(json!({
        "quota_scopes": list.iter().map(|q| q.hyphenated().to_string()).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
enum SasPermission {
    Read,
    ReadWrite,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct SasReq {
    volume: String,
    vfid: VFolderId,
    permission: SasPermission,
    /// Capped by the volume's presign-max-expiry.
    #[serde(default)]
    expiry_secs: Option<u64>,
}

/// Ours: a URL with a SAS for the vfolder's container, straight at Azure (read, or read and
/// write; never more than the vfolder itself allows).
#[utoipa::path(post, path = "/folder/sas", tag = "folders", request_body = SasReq,
    summary = "A SAS URL for a vfolder container (ours, azure-blob)",
    responses((status = 200, description = "url, expires_at", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn sas(State(st): State<AppState>, ApiJson(r): ApiJson<SasReq>) -> ApiResult<Json<Value>> {
    let expiry = std::time::Duration::from_secs(r.expiry_secs.unwrap_or(3600));
    let shared = st
        .volumes
        .get(&r.volume)?
        .share(
            &r.vfid,
            matches!(r.permission, SasPermission::ReadWrite),
            expiry,
        )
        .await?;
    Ok(Json(json!({
        "url": shared.url,
        "expires_at": shared.expires_at.to_rfc3339(),
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct FolderReq {
    pub volume: String,
    pub vfid: VFolderId,
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
struct CreateOptions {
    #[serde(default, deserialize_with = "crate::api::params::opt_u64")]
    initial_max_size_for_quota_scope: Option<u64>,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct CreateVFolderReq {
    volume: String,
    vfid: VFolderId,
    /// Backend.AI's default (`DEFAULT_VFOLDER_PERMISSION_MODE`) when absent or null.
    #[serde(default, deserialize_with = "crate::api::params::opt_u64")]
    #[schema(value_type = Option<u32>)]
    mode: Option<u64>,
    #[serde(default)]
    options: Option<CreateOptions>,
}

/// Makes the quota scope of `vfid` when it is missing and the config allows it.
async fn ensure_scope(
    st: &AppState,
    v: &dyn crate::volume::Volume,
    vfid: &VFolderId,
    limit: Option<u64>,
) -> ApiResult<()> {
    let qs = vfid
        .quota_scope
        .ok_or(VolumeError::QuotaScopeRequired(*vfid))?;
    if v.describe_quota_scope(&qs).await?.is_none() {
        if !st.config.proxy.allow_auto_quota_scope_creation {
            return Err(VolumeError::QuotaScopeNotFound(qs).into());
        }
        let limit = crate::volume::QuotaLimit {
            bytes: limit,
            inodes: None,
        };
        match v.create_quota_scope(&qs, &limit).await {
            Ok(()) | Err(VolumeError::QuotaScopeExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct RegisterReq {
    volume: String,
    vfid: VFolderId,
    bucket: String,
    #[serde(default)]
    prefix: String,
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    read_only: bool,
}

/// Ours: an existing bucket (or a prefix of it) becomes a vfolder; its owner keeps its
/// lifecycle (deregistering or deleting the vfolder never touches its objects).
#[utoipa::path(post, path = "/folder/register", tag = "folders", request_body = RegisterReq,
    summary = "Register an existing bucket as a vfolder (ours)",
    responses((status = 204, description = "Registered"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn register(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<RegisterReq>,
) -> ApiResult<StatusCode> {
    let v = st.volumes.get(&r.volume)?;
    ensure_scope(&st, v.as_ref(), &r.vfid, None).await?;
    v.register_vfolder(
        &r.vfid,
        &crate::volume::Registration {
            bucket: r.bucket,
            prefix: r.prefix,
            read_only: r.read_only,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/folder/deregister", tag = "folders", request_body = FolderReq,
    summary = "Deregister a vfolder (ours)",
    responses((status = 204, description = "Forgotten; its objects stay"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn deregister(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<FolderReq>,
) -> ApiResult<StatusCode> {
    st.volumes
        .get(&r.volume)?
        .deregister_vfolder(&r.vfid)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/folder/create", tag = "folders", request_body = CreateVFolderReq,
    summary = "Create a vfolder (and its quota scope when allowed)",
    responses((status = 204, description = "Created"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn create(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<CreateVFolderReq>,
) -> ApiResult<StatusCode> {
    // Permission bits only: a vfolder is never set-user-id, set-group-id or sticky.
    let mode = r.mode.unwrap_or(crate::volume::DEFAULT_VFOLDER_MODE.into());
    let Ok(mode @ 0..=0o777) = u32::try_from(mode) else {
        return Err(ApiError::invalid_param(
            "mode",
            format!(
                "{mode:#o} is not a vfolder mode (permission bits 0 to 0o777; no set-id or sticky bits)"
            ),
        ));
    };
    let v = st.volumes.get(&r.volume)?;
    let limit = r
        .options
        .unwrap_or_default()
        .initial_max_size_for_quota_scope;
    ensure_scope(&st, v.as_ref(), &r.vfid, limit).await?;
    v.create_vfolder(&r.vfid, mode).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/folder/delete", tag = "folders", request_body = FolderReq,
    summary = "Delete a vfolder as a background task",
    responses((status = 202, description = "bgtask_id", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn delete(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<FolderReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    st.volumes.get(&r.volume)?;
    let id = st
        .bgtasks
        .spawn(TaskSpec::DeleteVfolder {
            volume: r.volume,
            vfid: r.vfid,
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "bgtask_id": id }))))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct CloneReq {
    src_volume: String,
    src_vfid: VFolderId,
    #[serde(default)]
    dst_volume: Option<String>,
    dst_vfid: VFolderId,
}

#[utoipa::path(post, path = "/folder/clone", tag = "folders", request_body = CloneReq,
    summary = "Clone a vfolder as a background task",
    responses((status = 200, description = "bgtask_id", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn clone(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<CloneReq>,
) -> ApiResult<Json<Value>> {
    let v = st.volumes.get(&r.src_volume)?;
    if let Some(dst) = &r.dst_volume
        && dst != &r.src_volume
    {
        st.volumes.get(dst)?;
        return Err(ApiError::unsupported(
            "cloning across volumes is not supported; dst_volume must equal src_volume",
        ));
    }
    if r.dst_vfid.quota_scope.is_none() {
        return Err(VolumeError::QuotaScopeRequired(r.dst_vfid).into());
    }
    // Checked up front so the manager hears about these at once, not from a failed task.
    if !v.vfolder_exists(&r.src_vfid).await? {
        return Err(VolumeError::VFolderNotFound(r.src_vfid).into());
    }
    if v.vfolder_exists(&r.dst_vfid).await? {
        return Err(VolumeError::VFolderExists(r.dst_vfid).into());
    }
    let id = st
        .bgtasks
        .spawn(TaskSpec::CloneVfolder {
            volume: r.src_volume,
            src_vfid: r.src_vfid,
            dst_vfid: r.dst_vfid,
        })
        .await?;
    Ok(Json(json!({ "bgtask_id": id })))
}

fn default_subpath() -> String {
    ".".into()
}

#[derive(Deserialize, utoipa::ToSchema)]
struct MountReq {
    volume: String,
    vfid: VFolderId,
    #[serde(default = "default_subpath")]
    subpath: String,
}

/// The host path of the vfolder root. As in Backend.AI the subpath is validated but not
/// appended (the manager appends it), and the two errors keep their plain-JSON shape.
#[utoipa::path(get, path = "/folder/mount", tag = "folders", request_body = MountReq,
    summary = "Where a vfolder is for a compute agent",
    responses((status = 200, description = "path (a host path), or path null and remote (object stores)", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn mount(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<MountReq>,
) -> ApiResult<Json<Value>> {
    let v = st.volumes.get(&r.volume)?;
    let invalid_subpath = |detail: String| {
        ApiError::plain_json(
            StatusCode::BAD_REQUEST,
            json!({
                "msg": "Invalid vfolder subpath",
                "vfid": r.vfid.to_string(),
                "subpath": r.subpath,
                "detail": detail,
            }),
        )
    };
    let sub = RelPath::parse(&r.subpath).map_err(|e| invalid_subpath(e.to_string()))?;
    let info = match v.mount_info(&r.vfid, &sub).await {
        Ok(info) => info,
        Err(VolumeError::VFolderNotFound(_)) => {
            return Err(ApiError::plain_json(
                StatusCode::BAD_REQUEST,
                json!({"msg": "VFolder not found", "vfid": r.vfid.to_string()}),
            ));
        }
        Err(e @ (VolumeError::Escapes(_) | VolumeError::Io { .. })) => {
            return Err(invalid_subpath(e.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Json(match info {
        MountInfo::HostPath(p) => json!({ "path": p.display().to_string() }),
        // Our addition: no host path; what an agent needs to mount the bucket itself.
        MountInfo::Remote(l) => json!({
            "path": null,
            "remote": {
                "backend": l.backend,
                "endpoint": l.endpoint,
                "region": l.region,
                "bucket": l.bucket,
                "prefix": l.prefix,
                "read_only": l.read_only,
                "credentials": l.credentials.map(|c| {
                    c.into_iter()
                        .map(|(k, v)| (k.to_string(), Value::String(v)))
                        .collect::<serde_json::Map<_, _>>()
                }),
            },
        }),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct MetadataReq {
    volume: String,
    vfid: VFolderId,
    #[serde(default)]
    #[allow(dead_code)]
    payload: Option<Value>,
}

/// A stub in Backend.AI since 22.03; kept for the wire, with the vfolder checked.
#[utoipa::path(method(get, post), path = "/folder/metadata", tag = "folders", request_body = MetadataReq,
    summary = "Vfolder metadata (a stub)",
    responses((status = 204, description = "Accepted (a stub, as in Backend.AI)"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn metadata(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<MetadataReq>,
) -> ApiResult<Json<Value>> {
    let v = st.volumes.get(&r.volume)?;
    if !v.vfolder_exists(&r.vfid).await? {
        return Err(VolumeError::VFolderNotFound(r.vfid).into());
    }
    Ok(Json(json!({ "status": "ok" })))
}

/// Exact counts, however long the walk takes (Backend.AI answers -1 after 30 s).
#[derive(Deserialize, utoipa::ToSchema)]
struct UsageReq {
    volume: String,
    vfid: VFolderId,
    /// Ours: recount now (object stores answer from counters, recounted periodically).
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    rescan: bool,
}

#[utoipa::path(get, path = "/folder/usage", tag = "folders", request_body = UsageReq,
    summary = "Files and bytes of a vfolder",
    responses((status = 200, description = "file_count, used_bytes", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn usage(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<UsageReq>,
) -> ApiResult<Json<Value>> {
    let v = st.volumes.get(&r.volume)?;
    let u = if r.rescan {
        v.rescan_usage(&r.vfid).await?
    } else {
        v.usage(&r.vfid).await?
    };
    Ok(Json(json!({
        "file_count": u.file_count,
        "used_bytes": u.used_bytes,
    })))
}

#[utoipa::path(get, path = "/folder/used-bytes", tag = "folders", request_body = FolderReq,
    summary = "Allocated bytes of a vfolder",
    responses((status = 200, description = "used_bytes (allocated)", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn used_bytes(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<FolderReq>,
) -> ApiResult<Json<Value>> {
    let n = st.volumes.get(&r.volume)?.used_bytes(&r.vfid).await?;
    Ok(Json(json!({ "used_bytes": n })))
}

#[utoipa::path(get, path = "/folder/fs-usage", tag = "folders", request_body = VolumeReq,
    summary = "Usage of the volume",
    responses((status = 200, description = "capacity_bytes, used_bytes, available_bytes", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn fs_usage(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<VolumeReq>,
) -> ApiResult<Json<Value>> {
    let u = st.volumes.get(&r.volume)?.fs_usage().await?;
    Ok(Json(json!({
        "capacity_bytes": u.capacity_bytes,
        "used_bytes": u.used_bytes,
    })))
}
