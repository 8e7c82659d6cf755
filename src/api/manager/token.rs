//! Token minting for the client API: `/folder/file/upload`, `/folder/file/download`,
//! `/folder/file/archive-download-token`. An upload token describes its upload session, which is
//! recorded when the token is first used.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::AppState;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::ApiJson;
use crate::api::token::{
    ArchiveClaims, DownloadClaims, DownloadOp, UploadClaims, UploadOp, check_archive_filename,
    check_upload_destination,
};
use crate::ids::VFolderId;
use crate::volume::RelPath;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload))
        .routes(routes!(download))
        .routes(routes!(archive))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct UploadReq {
    volume: String,
    vfid: VFolderId,
    relpath: RelPath,
    /// Backend.AI's `ToInt`: the 26.9 manager sends it as a string (`"size": "12"`).
    #[serde(deserialize_with = "crate::api::params::to_u64")]
    size: u64,
    /// Ours: also answer a URL straight to the object service (volumes with presign = true).
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    presign: bool,
}

/// How long a presigned URL lives: the token's lifetime (the volume caps it further).
fn presign_expiry(st: &AppState) -> std::time::Duration {
    st.config.proxy.session_expire
}

#[utoipa::path(post, path = "/folder/file/upload", tag = "tokens", request_body = UploadReq,
    summary = "Mint an upload token (tus)",
    responses((status = 200, description = "token (and presigned_url on request)", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn upload(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<UploadReq>,
) -> ApiResult<Json<Value>> {
    let max = st.config.proxy.max_upload_size;
    if r.size > max {
        return Err(ApiError::invalid_param(
            "size",
            format!("{} bytes exceeds max-upload-size ({max} bytes)", r.size),
        ));
    }
    if r.relpath.is_root() {
        return Err(ApiError::invalid_param(
            "relpath",
            "must name a file, not the vfolder root",
        ));
    }
    let v = st.volumes.get(&r.volume)?;
    check_upload_destination(v.as_ref(), &r.vfid, &r.relpath).await?;
    // Refused now (413) rather than half way through the transfer.
    v.check_space(r.vfid.quota_scope.as_ref(), r.size).await?;
    // The token says everything about the upload: nothing is written until it is used.
    let session = uuid::Uuid::new_v4().simple().to_string();
    let r_relpath = r.relpath.clone();
    let exp = st.tokens.expiry();
    let token = st
        .tokens
        .mint(&UploadClaims {
            op: UploadOp::Upload,
            volume: r.volume,
            vfid: r.vfid,
            relpath: r.relpath,
            size: r.size,
            session,
            exp,
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut body = json!({ "token": token });
    if r.presign {
        let url = v
            .presign(
                &r.vfid,
                &r_relpath,
                crate::volume::Presign::Upload { size: r.size },
                presign_expiry(&st),
            )
            .await?;
        body["presigned_url"] = json!(url);
    }
    Ok(Json(body))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct DownloadReq {
    volume: String,
    vfid: VFolderId,
    relpath: RelPath,
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    #[allow(dead_code)]
    archive: bool,
    #[serde(default)]
    #[allow(dead_code)]
    unmanaged_path: Option<String>,
    /// Ours: also answer a URL straight to the object service (volumes with presign = true).
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    presign: bool,
}

/// As in Backend.AI, `archive` and `unmanaged_path` are accepted but not put into the token
/// (the client passes `archive` in the query), and existence is checked at download time.
#[utoipa::path(post, path = "/folder/file/download", tag = "tokens", request_body = DownloadReq,
    summary = "Mint a download token",
    responses((status = 200, description = "token (and presigned_url on request)", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn download(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<DownloadReq>,
) -> ApiResult<Json<Value>> {
    let v = st.volumes.get(&r.volume)?;
    let presigned = if r.presign {
        // A URL for a file that is there: the service would answer 404 later, with no hint.
        if v.stat(&r.vfid, &r.relpath).await?.kind != crate::volume::EntryKind::File {
            return Err(ApiError::invalid_param(
                "relpath",
                "presigned URLs are for files",
            ));
        }
        Some(
            v.presign(
                &r.vfid,
                &r.relpath,
                crate::volume::Presign::Read,
                presign_expiry(&st),
            )
            .await?,
        )
    } else {
        None
    };
    let token = st
        .tokens
        .mint(&DownloadClaims {
            op: DownloadOp::Download,
            volume: r.volume,
            vfid: r.vfid,
            relpath: r.relpath,
            exp: st.tokens.expiry(),
            archive: false,
            unmanaged_path: None,
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut body = json!({ "token": token });
    if let Some(url) = presigned {
        body["presigned_url"] = json!(url);
    }
    Ok(Json(body))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct ArchiveReq {
    volume: String,
    virtual_folder_id: VFolderId,
    files: Vec<String>,
    #[serde(default)]
    filename: Option<String>,
}

#[utoipa::path(post, path = "/folder/file/archive-download-token", tag = "tokens", request_body = ArchiveReq,
    summary = "Mint a zip archive token",
    responses((status = 200, description = "token", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn archive(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<ArchiveReq>,
) -> ApiResult<Json<Value>> {
    st.volumes.get(&r.volume)?;
    if r.files.is_empty() {
        return Err(ApiError::invalid_param(
            "files",
            "at least one file is required",
        ));
    }
    for f in &r.files {
        RelPath::parse(f).map_err(|e| ApiError::bad_path("files", f, e))?;
    }
    if let Some(name) = &r.filename {
        check_archive_filename(name).map_err(|e| ApiError::invalid_param("filename", e))?;
    }
    let token = st
        .tokens
        .mint(&ArchiveClaims {
            operation: DownloadOp::Download,
            volume: r.volume,
            virtual_folder_id: r.virtual_folder_id,
            files: r.files,
            filename: r.filename,
            exp: st.tokens.expiry(),
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({ "token": token })))
}
