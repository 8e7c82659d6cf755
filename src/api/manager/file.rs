//! File operations inside a vfolder: `/folder/file/mkdir|list|rename|move|delete|delete-async|
//! fetch`.

use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::AppState;
use crate::api::error::{ApiError, ApiResult, python_exc_name};
use crate::api::extract::ApiJson;
use crate::bgtask::TaskSpec;
use crate::ids::VFolderId;
use crate::volume::{Progress, RelPath, VolumeError};

use super::py_isoformat;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(mkdir))
        .routes(routes!(list))
        .routes(routes!(rename))
        .routes(routes!(move_path))
        .routes(routes!(move_async))
        .routes(routes!(delete))
        .routes(routes!(delete_async))
        .routes(routes!(fetch))
}

/// At most this many paths per mkdir call, as in Backend.AI.
const MKDIR_MAX: usize = 50;

fn default_true() -> bool {
    true
}

#[derive(Deserialize, utoipa::ToSchema)]
struct MkdirReq {
    volume: String,
    vfid: VFolderId,
    relpath: Value,
    #[serde(
        default = "default_true",
        deserialize_with = "crate::api::params::to_bool"
    )]
    parents: bool,
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    exist_ok: bool,
}

/// `relpath` is a string or a list of up to 50 strings; all are validated before anything is
/// created.
fn mkdir_paths(v: &Value) -> ApiResult<Vec<RelPath>> {
    let raw: Vec<&str> = match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) if items.len() <= MKDIR_MAX => items
            .iter()
            .map(|i| i.as_str())
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::invalid_param("relpath", "every item must be a string"))?,
        Value::Array(items) => {
            return Err(ApiError::invalid_param(
                "relpath",
                format!("at most {MKDIR_MAX} paths per call, got {}", items.len()),
            ));
        }
        _ => {
            return Err(ApiError::invalid_param(
                "relpath",
                "expected a string or a list of strings",
            ));
        }
    };
    raw.iter()
        .map(|s| RelPath::parse(s).map_err(|e| ApiError::bad_path("relpath", s, e)))
        .collect()
}

/// Python-style `repr(exc)` for the per-item `msg`, as the manager shows it.
fn item_error(e: &VolumeError) -> String {
    match e {
        VolumeError::Io { source, .. } => match source.raw_os_error() {
            Some(n) => format!(
                "{}({n}, '{}')",
                python_exc_name(n),
                crate::api::error::strerror(n)
            ),
            None => format!("OSError('{source}')"),
        },
        VolumeError::Escapes(p) => format!("InvalidSubpathError('{p}')"),
        VolumeError::VFolderNotFound(v) => format!("VFolderNotFoundError('{v}')"),
        other => format!("StorageProxyError('{other}')"),
    }
}

#[utoipa::path(post, path = "/folder/file/mkdir", tag = "files", request_body = MkdirReq,
    summary = "Make directories",
    responses((status = 200, description = "Per path: results.success and results.failed (422 when any failed)", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn mkdir(State(st): State<AppState>, ApiJson(r): ApiJson<MkdirReq>) -> ApiResult<Response> {
    let paths = mkdir_paths(&r.relpath)?;
    let v = st.volumes.get(&r.volume)?;
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for p in &paths {
        match v.mkdir(&r.vfid, p, r.parents, r.exist_ok).await {
            Ok(()) => ok.push(json!({"msg": null, "item": p.as_str()})),
            Err(e) => failed.push(json!({"msg": item_error(&e), "item": p.as_str()})),
        }
    }
    let status = match (ok.is_empty(), failed.is_empty()) {
        (_, true) => StatusCode::OK,
        (false, false) => StatusCode::MULTI_STATUS,
        (true, false) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    Ok((
        status,
        Json(json!({"results": {"success": ok, "failed": failed}})),
    )
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct PathReq {
    volume: String,
    vfid: VFolderId,
    relpath: RelPath,
}

/// Non-recursive listing. Unlike Backend.AI, a listing cut by `scandir-limit` says so in
/// `truncated`.
#[utoipa::path(post, path = "/folder/file/list", tag = "files", request_body = PathReq,
    summary = "List a directory",
    responses((status = 200, description = "items (name, type, stat, symlink_target), truncated, limit", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn list(State(st): State<AppState>, ApiJson(r): ApiJson<PathReq>) -> ApiResult<Json<Value>> {
    let limit = st.config.proxy.scandir_limit;
    let listing = st
        .volumes
        .get(&r.volume)?
        .list(&r.vfid, &r.relpath, limit)
        .await?;
    let items: Vec<Value> = listing
        .items
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "type": e.stat.kind.as_api_str(),
                "stat": {
                    "mode": e.stat.mode,
                    "size": e.stat.size,
                    "created": py_isoformat(e.stat.created),
                    "modified": py_isoformat(e.stat.modified),
                },
                "symlink_target": e.symlink_target,
            })
        })
        .collect();
    Ok(Json(json!({
        "items": items,
        "truncated": listing.truncated,
        "limit": limit,
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct RenameReq {
    volume: String,
    vfid: VFolderId,
    relpath: RelPath,
    new_name: String,
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    #[allow(dead_code)]
    is_dir: bool,
}

#[utoipa::path(post, path = "/folder/file/rename", tag = "files", request_body = RenameReq,
    summary = "Rename a file or directory (never onto an existing name)",
    responses((status = 204, description = "Renamed"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn rename(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<RenameReq>,
) -> ApiResult<StatusCode> {
    let name = RelPath::parse_name(&r.new_name)
        .map_err(|e| ApiError::bad_path("new_name", &r.new_name, e))?;
    if r.relpath.is_root() {
        return Err(ApiError::invalid_param(
            "relpath",
            "the vfolder root cannot be renamed",
        ));
    }
    st.volumes
        .get(&r.volume)?
        .rename(&r.vfid, &r.relpath, &name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
struct MoveReq {
    volume: String,
    vfid: VFolderId,
    src_relpath: RelPath,
    dst_relpath: RelPath,
}

#[utoipa::path(post, path = "/folder/file/move", tag = "files", request_body = MoveReq,
    summary = "Move a file or directory (into an existing directory, or to that name)",
    responses((status = 204, description = "Moved"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn move_path(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<MoveReq>,
) -> ApiResult<StatusCode> {
    if r.src_relpath.is_root() {
        return Err(ApiError::invalid_param(
            "src_relpath",
            "the vfolder root cannot be moved",
        ));
    }
    st.volumes
        .get(&r.volume)?
        .move_path(&r.vfid, &r.src_relpath, &r.dst_relpath, Default::default())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ours: the move as a background task with progress (on object stores a folder moves object
/// by object, copy then delete), answered at once with its `bgtask_id`.
#[utoipa::path(post, path = "/folder/file/move-async", tag = "files", request_body = MoveReq,
    summary = "Move as a background task (ours)",
    responses((status = 202, description = "bgtask_id", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn move_async(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<MoveReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if r.src_relpath.is_root() {
        return Err(ApiError::invalid_param(
            "src_relpath",
            "the vfolder root cannot be moved",
        ));
    }
    let v = st.volumes.get(&r.volume)?;
    // Checked now so the caller hears of these at once, not from a failed task.
    v.stat(&r.vfid, &r.src_relpath).await?;
    let id = st
        .bgtasks
        .spawn(TaskSpec::MovePath {
            volume: r.volume,
            vfid: r.vfid,
            src: r.src_relpath,
            dst: r.dst_relpath,
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"bgtask_id": id}))))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct DeleteReq {
    volume: String,
    vfid: VFolderId,
    relpaths: Vec<RelPath>,
    #[serde(default, deserialize_with = "crate::api::params::to_bool")]
    recursive: bool,
}

fn check_delete_paths(paths: &[RelPath]) -> ApiResult<()> {
    if paths.iter().any(RelPath::is_root) {
        return Err(ApiError::invalid_param(
            "relpaths",
            "the vfolder root cannot be deleted this way (use /folder/delete)",
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/folder/file/delete", tag = "files", request_body = DeleteReq,
    summary = "Delete files or directories",
    responses((status = 200, description = "status ok", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn delete(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<DeleteReq>,
) -> ApiResult<Json<Value>> {
    check_delete_paths(&r.relpaths)?;
    st.volumes
        .get(&r.volume)?
        .delete_files(
            &r.vfid,
            &r.relpaths,
            r.recursive,
            Arc::new(Progress::default()),
        )
        .await?;
    Ok(Json(json!({"status": "ok"})))
}

#[utoipa::path(post, path = "/folder/file/delete-async", tag = "files", request_body = DeleteReq,
    summary = "Delete as a background task",
    responses((status = 202, description = "bgtask_id", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn delete_async(
    State(st): State<AppState>,
    ApiJson(r): ApiJson<DeleteReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_delete_paths(&r.relpaths)?;
    let v = st.volumes.get(&r.volume)?;
    if !v.vfolder_exists(&r.vfid).await? {
        return Err(VolumeError::VFolderNotFound(r.vfid).into());
    }
    let id = st
        .bgtasks
        .spawn(TaskSpec::DeleteFiles {
            volume: r.volume,
            vfid: r.vfid,
            relpaths: r.relpaths,
            recursive: r.recursive,
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"bgtask_id": id}))))
}

/// Streams a file to the manager (task logs). Missing → 404, escaping → 400; Backend.AI answered
/// 200 with an empty body for both.
#[utoipa::path(post, path = "/folder/file/fetch", tag = "files", request_body = PathReq,
    summary = "Fetch a file",
    responses((status = 200, description = "The file", content_type = "application/octet-stream"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
async fn fetch(State(st): State<AppState>, ApiJson(r): ApiJson<PathReq>) -> ApiResult<Response> {
    let v = st.volumes.get(&r.volume)?;
    let h = match v.open_read(&r.vfid, &r.relpath).await {
        Ok(h) => h,
        Err(VolumeError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            return Err(ApiError::problem(
                StatusCode::NOT_FOUND,
                "storage/file-not-found",
                "File not found",
            )
            .msg(format!("no such file: {}", r.relpath)));
        }
        Err(e) => return Err(e.into()),
    };
    let size = h.stat().size;
    let body = Body::from_stream(h.read_range(0, size));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}
