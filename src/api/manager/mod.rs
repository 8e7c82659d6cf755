//! Manager-facing API (default 127.0.0.1:6022): the vfolder control plane the Backend.AI manager
//! calls with `X-BackendAI-Storage-Auth-Token`. One file per route group.

mod file;
mod folder;
mod quota;
mod status;
mod token;
mod volume;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use token::{check_archive_filename, check_upload_destination};

use super::AppState;
use super::error::{ApiError, ApiResult};

pub const AUTH_HEADER: &str = "X-BackendAI-Storage-Auth-Token";

/// Routes anyone may call (GET only), as in Backend.AI.
const OPEN_PATHS: &[&str] = &["/", "/status", "/health", "/livez", "/readyz"];

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status::status))
        .route("/status", get(status::status))
        .route("/health", get(super::internal::health))
        .route("/livez", get(super::internal::livez))
        .route("/readyz", get(super::internal::readyz))
        .merge(volume::routes())
        .merge(quota::routes())
        .merge(folder::routes())
        .merge(file::routes())
        .merge(token::routes())
        .route("/bgtask/{id}", get(bgtask))
        .route_layer(middleware::from_fn(crate::metrics::tag_route))
        .fallback(|| async { ApiError::not_found_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        // Auth wraps routing, so an unknown route without a token is 403 like everything else.
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(super::trace_layer())
        .layer(middleware::from_fn_with_state(
            (state.metrics.clone(), "manager"),
            crate::metrics::observe,
        ))
        .with_state(state)
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::GET && OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let Some(given) = req.headers().get(AUTH_HEADER) else {
        return ApiError::forbidden(true).into_response();
    };
    // Comparing digests keeps the comparison constant-time in the secret's length too.
    let ok: bool = digest(given.as_bytes())
        .ct_eq(&digest(st.manager_secret.as_bytes()))
        .into();
    if !ok {
        return ApiError::forbidden(false).into_response();
    }
    next.run(req).await
}

/// Our addition: the state of a background task (`bgtask_id` from delete, clone, delete-async).
async fn bgtask(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = uuid::Uuid::parse_str(&id)
        .map_err(|_| ApiError::invalid_param("id", "expected a background task id (UUID)"))?;
    match st.bgtasks.get(id).await? {
        Some(info) => Ok(axum::Json(info).into_response()),
        None => Err(ApiError::problem(
            axum::http::StatusCode::NOT_FOUND,
            "storage/bgtask/not-found",
            "Background Task Not Found",
        )
        .code("bgtask_read_not-found")
        .msg(format!("no background task {id}"))),
    }
}

/// Backend.AI's `datetime.isoformat()` of a UTC timestamp: microseconds only when non-zero.
pub fn py_isoformat(t: std::time::SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    if dt.timestamp_subsec_micros() == 0 {
        dt.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        dt.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }
}
