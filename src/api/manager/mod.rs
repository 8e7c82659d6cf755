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
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, ApiResult};

pub const AUTH_HEADER: &str = "X-BackendAI-Storage-Auth-Token";

/// Routes anyone may call (GET only), as in Backend.AI.
const OPEN_PATHS: &[&str] = &["/", "/status", "/health", "/livez", "/readyz"];

/// The manager API's routes and, generated from the same registrations, its OpenAPI document.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ManagerDoc::openapi())
        .routes(routes!(status::root))
        .routes(routes!(status::status))
        .routes(routes!(health))
        .routes(routes!(livez))
        .routes(routes!(readyz))
        .merge(volume::routes())
        .merge(quota::routes())
        .merge(folder::routes())
        .merge(file::routes())
        .merge(token::routes())
        .routes(routes!(bgtask))
        .split_for_parts()
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "storage-agent manager API",
        description = "The vfolder control plane the Backend.AI manager calls (wire-compatible with the Backend.AI storage proxy 26.9), plus routes of ours. Every call but the open GET routes carries X-BackendAI-Storage-Auth-Token.",
    ),
    components(schemas(crate::api::error::ProblemDoc)),
    modifiers(&AuthHeader)
)]
struct ManagerDoc;

/// The manager secret, as OpenAPI describes it.
struct AuthHeader;

impl utoipa::Modify for AuthHeader {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "storage-auth-token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(AUTH_HEADER))),
        );
        api.security = Some(vec![SecurityRequirement::new(
            "storage-auth-token",
            Vec::<String>::new(),
        )]);
    }
}

pub fn router(state: AppState) -> Router {
    let (routes, _) = routes();
    // Auth runs after routing, so a refused request is counted under its route (as aiohttp's
    // routing labels it); the fallbacks check the token too, so an unknown route without one
    // is 403 like everything else.
    routes
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(middleware::from_fn(crate::metrics::tag_route))
        .fallback(|State(st): State<AppState>, req: Request| async move {
            refusal(&st, &req).unwrap_or_else(|| ApiError::not_found_route().into_response())
        })
        .method_not_allowed_fallback(|State(st): State<AppState>, req: Request| async move {
            refusal(&st, &req).unwrap_or_else(|| ApiError::method_not_allowed().into_response())
        })
        .layer(super::trace_layer())
        .layer(middleware::from_fn_with_state(
            (state.metrics.clone(), "manager"),
            crate::metrics::observe,
        ))
        .with_state(state)
}

#[utoipa::path(get, path = "/health", tag = "status", summary = "Health: always 200; status says ok or degraded",
    responses((status = 200, description = "The health report", content_type = "application/json")))]
async fn health(st: axum::extract::State<AppState>) -> Response {
    super::probes::health(st).await
}

#[utoipa::path(get, path = "/livez", tag = "status", summary = "Liveness",
    responses((status = 200, description = "The process answers", content_type = "application/json")))]
async fn livez(st: axum::extract::State<AppState>) -> Response {
    super::probes::livez(st).await
}

#[utoipa::path(get, path = "/readyz", tag = "status", summary = "Readiness: 503 while a gating check fails",
    responses((status = 200, description = "Ready", content_type = "application/json"), (status = 503, description = "Not ready", content_type = "application/json")))]
async fn readyz(st: axum::extract::State<AppState>) -> Response {
    super::probes::readyz(st).await
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match refusal(&st, &req) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

/// The 403 for a request without the manager secret (None: it may go on).
fn refusal(st: &AppState, req: &Request) -> Option<Response> {
    if req.method() == axum::http::Method::GET && OPEN_PATHS.contains(&req.uri().path()) {
        return None;
    }
    let Some(given) = req.headers().get(AUTH_HEADER) else {
        return Some(ApiError::forbidden(true).into_response());
    };
    // Comparing digests keeps the comparison constant-time in the secret's length too.
    let ok: bool = digest(given.as_bytes())
        .ct_eq(&digest(st.manager_secret.as_bytes()))
        .into();
    (!ok).then(|| ApiError::forbidden(false).into_response())
}

/// Our addition: the state of a background task (`bgtask_id` from delete, clone, delete-async).
#[utoipa::path(get, path = "/bgtask/{id}", tag = "folders", summary = "A background task's status and progress (ours)",
    params(("id" = String, Path, description = "The bgtask_id")),
    responses((status = 200, description = "task_id, kind, status, progress, message, error", content_type = "application/json"),
        (status = 404, description = "No such task", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
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
