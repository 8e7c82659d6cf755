//! The one place where errors become HTTP responses.
//!
//! Bodies follow the Backend.AI storage proxy: RFC 7807 `application/problem+json` with `type`,
//! `title`, `error_code`, `msg` (and `data` for validation errors), except the two plain JSON
//! shapes its manager parses (`{"msg","errno","paths"}` for OS errors and the quota-scope conflict).
//! Lower-layer errors are 500 unless a mapping here says otherwise.
//!
//! `error_code` matters to the manager: it sorts a storage proxy's error by the code's domain.
//! `vfolder`, or no code at all, becomes the matching 4xx for its user; `quota-scope` becomes a
//! quota error; any other domain becomes a 500 with an ERROR in its log. So each error carries
//! the code the Python proxy sends for it, or none where it sends none (validation failures,
//! unsupported operations); our extra detail goes into `msg` and `data`.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::state::StateError;
use crate::upload::UploadError;
use crate::volume::VolumeError;

const PROBLEM_BASE: &str = "https://api.backend.ai/probs/";

#[derive(Debug, Serialize)]
struct Problem {
    #[serde(rename = "type")]
    type_: String,
    title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

#[derive(Debug)]
enum Body {
    Problem(Problem),
    Json(Value),
    Text(String),
    Empty,
}

#[derive(Debug)]
struct Inner {
    status: StatusCode,
    body: Body,
    headers: HeaderMap,
}

/// Boxed: errors travel through every handler's `Result`, and the happy path should stay small.
#[derive(Debug)]
pub struct ApiError(Box<Inner>);

impl ApiError {
    fn new(status: StatusCode, body: Body) -> Self {
        ApiError(Box::new(Inner {
            status,
            body,
            headers: HeaderMap::new(),
        }))
    }

    /// A problem+json error. `kind` is the part after `https://api.backend.ai/probs/`.
    pub fn problem(status: StatusCode, kind: &str, title: &str) -> Self {
        Self::new(
            status,
            Body::Problem(Problem {
                type_: format!("{PROBLEM_BASE}{kind}"),
                title: title.to_string(),
                error_code: None,
                msg: None,
                data: None,
            }),
        )
    }

    pub fn code(mut self, code: &str) -> Self {
        if let Body::Problem(p) = &mut self.0.body {
            p.error_code = Some(code.to_string());
        }
        self
    }

    pub fn msg(mut self, msg: impl Into<String>) -> Self {
        if let Body::Problem(p) = &mut self.0.body {
            p.msg = Some(msg.into());
        }
        self
    }

    pub fn data(mut self, data: Value) -> Self {
        if let Body::Problem(p) = &mut self.0.body {
            p.data = Some(data);
        }
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.0.headers.insert(name, v);
        }
        self
    }

    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// Plain JSON, for the few error shapes Backend.AI's manager reads as such.
    pub fn plain_json(status: StatusCode, body: Value) -> Self {
        Self::new(status, Body::Json(body))
    }

    pub fn text(status: StatusCode, text: impl Into<String>) -> Self {
        Self::new(status, Body::Text(text.into()))
    }

    pub fn empty(status: StatusCode) -> Self {
        Self::new(status, Body::Empty)
    }

    pub fn forbidden(missing: bool) -> Self {
        let title = if missing {
            "Forbidden (missing auth token)"
        } else {
            "Forbidden (invalid auth token)"
        };
        Self::problem(StatusCode::FORBIDDEN, "storage/forbidden", title)
    }

    pub fn malformed(detail: &str) -> Self {
        Self::problem(
            StatusCode::BAD_REQUEST,
            "storage/malformed-request",
            &format!("Malformed request ({detail})"),
        )
    }

    pub fn invalid_params(data: BTreeMap<String, String>) -> Self {
        let msg = data
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        // No error_code: the Python proxy's trafaret failures carry none.
        Self::problem(
            StatusCode::BAD_REQUEST,
            "storage/invalid-api-params",
            "Invalid API parameters",
        )
        .msg(msg)
        .data(json!(data))
    }

    pub fn invalid_param(field: &str, msg: impl Into<String>) -> Self {
        Self::invalid_params(BTreeMap::from([(field.to_string(), msg.into())]))
    }

    /// A path in `field` that [`RelPath`](crate::volume::RelPath) refused: climbing out of the
    /// vfolder is an invalid subpath (as in Backend.AI), anything else a bad parameter.
    pub fn bad_path(field: &str, value: &str, e: crate::volume::path::PathError) -> Self {
        match e {
            crate::volume::path::PathError::Escapes => Self::subpath_invalid(value),
            e => Self::invalid_param(field, format!("{e}: {value:?}")),
        }
    }

    pub fn payload_too_large() -> Self {
        Self::problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "storage/payload-too-large",
            "Request body too large",
        )
        .msg("the request body exceeds [storage-agent] max-json-body")
    }

    pub fn unsupported(msg: impl Into<String>) -> Self {
        // No error_code: the Python proxy answers NotImplementedError without one.
        Self::problem(
            StatusCode::BAD_REQUEST,
            "storage/unsupported-operation",
            "Unsupported operation by the storage backend",
        )
        .msg(msg)
    }

    pub fn not_found_route() -> Self {
        Self::problem(StatusCode::NOT_FOUND, "storage/not-found", "Not Found")
            .msg("no such API route")
    }

    pub fn method_not_allowed() -> Self {
        Self::problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "storage/method-not-allowed",
            "Method Not Allowed",
        )
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        // The Python proxy's StorageProxyError.
        Self::problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage/generic",
            "Storage Proxy Error",
        )
        .code("storage-proxy_generic_internal-error")
        .msg(msg)
    }

    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage/unavailable",
            "Service Unavailable",
        )
        .msg(msg)
    }

    pub fn subpath_invalid(path: &str) -> Self {
        Self::problem(
            StatusCode::BAD_REQUEST,
            "storage/subpath/invalid",
            "Invalid Subpath",
        )
        .code("vfolder_access_invalid-parameters")
        .msg(format!("Path escapes vfolder boundary: {path}"))
    }
}

/// Python's exception class for an errno, so `repr(exc)`-style messages look like Backend.AI's.
pub fn python_exc_name(errno: i32) -> &'static str {
    match errno {
        libc::EEXIST => "FileExistsError",
        libc::ENOENT => "FileNotFoundError",
        libc::ENOTDIR => "NotADirectoryError",
        libc::EISDIR => "IsADirectoryError",
        libc::EACCES | libc::EPERM => "PermissionError",
        _ => "OSError",
    }
}

pub fn strerror(errno: i32) -> &'static str {
    nix::errno::Errno::from_raw(errno).desc()
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        use VolumeError as V;
        match e {
            V::UnknownVolume(name) => Self::problem(
                StatusCode::BAD_REQUEST,
                "storage/volume/invalid",
                "Invalid Volume",
            )
            .code("storage_access_invalid-parameters")
            .msg(name),
            V::Offline { name, reason } => Self::problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage/volume/offline",
                "Volume Offline",
            )
            .code("storage_access_unavailable")
            .msg(format!("volume {name} is offline: {reason}")),
            V::VFolderNotFound(vf) => Self::problem(
                StatusCode::NOT_FOUND,
                "storage/vfolder/not-found",
                "VFolder Not Found",
            )
            .code("vfolder_read_not-found")
            .msg(format!("VFolder not found or not a directory: {vf}")),
            V::VFolderExists(vf) => Self::problem(
                StatusCode::CONFLICT,
                "storage/vfolder/already-exists",
                "VFolder Already Exists",
            )
            .code("vfolder_create_already-exists")
            .msg(format!("VFolder already exists: {vf}")),
            V::QuotaScopeNotFound(qs) => Self::problem(
                StatusCode::NOT_FOUND,
                "storage/quota/scope/not-found",
                "Quota Scope Not Found",
            )
            .code("quota-scope_read_not-found")
            .msg(format!("Quota scope not found: {qs}")),
            V::QuotaScopeExists(_) => Self::plain_json(
                StatusCode::CONFLICT,
                json!({"msg": "Volume already exists with given quota scope."}),
            ),
            V::QuotaScopeNotEmpty(qs) => Self::problem(
                StatusCode::CONFLICT,
                "storage/quota-directory-not-empty",
                "Quota Directory Not Empty",
            )
            .code("quota-scope_purge_conflict")
            .msg(format!(
                "quota scope {qs} still holds vfolders; delete them first"
            )),
            V::InvalidQuota(m) => Self::plain_json(
                StatusCode::BAD_REQUEST,
                json!({"msg": "Invalid quota config option", "detail": m}),
            ),
            V::AtomicTooLarge { limit, .. } => Self::problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "storage/tus-checksummed-body-too-large",
                "Checksummed body too large",
            )
            .msg(e.to_string())
            .data(json!({ "max_checksummed_body": limit })),
            V::SpaceExceeded {
                needed,
                available,
                used,
                limit,
            } => {
                let by_quota = limit.is_some();
                Self::problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    if by_quota {
                        "storage/quota-exceeded"
                    } else {
                        "storage/insufficient-storage"
                    },
                    if by_quota {
                        "Quota Exceeded"
                    } else {
                        "Not Enough Free Space"
                    },
                )
                .msg(e.to_string())
                .data(json!({
                    "needed": needed,
                    "available": available,
                    "used": used,
                    "limit": limit,
                    "reason": if by_quota { "quota" } else { "disk" },
                }))
            }
            // The one validation error the Python proxy sends with a code.
            V::QuotaScopeRequired(vf) => {
                Self::invalid_param("vfid", format!("quota_scope_id is required for vfid {vf}"))
                    .code("storage-proxy_request_invalid-parameters")
            }
            V::InvalidPath { path, source } => {
                Self::invalid_param("relpath", format!("{source}: {path:?}"))
            }
            V::Escapes(p) => Self::subpath_invalid(&p),
            V::Io { path, source } => match source.raw_os_error() {
                Some(errno) => Self::plain_json(
                    StatusCode::BAD_REQUEST,
                    json!({"msg": strerror(errno), "errno": errno, "paths": [path]}),
                ),
                None => Self::internal(format!("{source}: {path}")),
            },
            V::Unsupported { backend, op } => {
                Self::unsupported(format!("{op} is not supported by the {backend} backend"))
            }
            V::NoSpace { .. } => Self::problem(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage/insufficient-storage",
                "Insufficient Storage",
            )
            .msg(e.to_string()),
            V::Cancelled => Self::unavailable("the operation was cancelled (server shutting down)"),
            V::ReadOnly(vf) => Self::problem(
                StatusCode::FORBIDDEN,
                "storage/vfolder-read-only",
                "Read-only VFolder",
            )
            .msg(format!(
                "vfolder {vf} is registered read-only: its bucket is not ours to change"
            )),
            V::Remote {
                service,
                message,
                unreachable,
            } => Self::problem(
                if unreachable {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                },
                "storage/backend-unavailable",
                if unreachable {
                    "Storage Service Unreachable"
                } else {
                    "Storage Service Error"
                },
            )
            .msg(format!("{service}: {message}")),
            V::BadRequest(m) => Self::problem(
                StatusCode::BAD_REQUEST,
                "storage/bad-request",
                "Bad Request",
            )
            .msg(m),
            V::Internal(m) => Self::internal(m),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        Self::internal(format!("state database: {e}"))
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Volume(v) => v.into(),
            UploadError::State(s) => s.into(),
            UploadError::Corrupt(m) => Self::internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = *self.0;
        if this.status.is_server_error() {
            tracing::error!(status = %this.status, body = ?this.body, "request failed");
        } else {
            tracing::debug!(status = %this.status, body = ?this.body, "request refused");
        }
        let mut resp = match this.body {
            Body::Problem(p) => {
                let body = serde_json::to_vec(&p).unwrap_or_default();
                (
                    this.status,
                    [(header::CONTENT_TYPE, "application/problem+json")],
                    body,
                )
                    .into_response()
            }
            Body::Json(v) => (
                this.status,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                serde_json::to_vec(&v).unwrap_or_default(),
            )
                .into_response(),
            Body::Text(t) => (
                this.status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                t,
            )
                .into_response(),
            Body::Empty => this.status.into_response(),
        };
        resp.headers_mut().extend(this.headers);
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The shape of error answers (RFC 9457 problem details with Backend.AI's extensions), for the
/// OpenAPI documents.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ProblemDoc {
    #[serde(rename = "type")]
    #[schema(example = "https://api.backend.ai/probs/storage/vfolder/not-found")]
    kind: String,
    #[schema(example = "VFolder Not Found")]
    title: String,
    msg: Option<String>,
    error_code: Option<String>,
    /// Details that depend on the error (for example `needed`, `used` and `limit`).
    data: Option<serde_json::Value>,
}
