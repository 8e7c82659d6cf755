//! Client-facing API (default 127.0.0.1:6021): users' bytes. No auth header; a JWT minted by the
//! manager API travels in `?token=`.

pub mod archive;
mod checksum;
mod download;
mod ranges;
pub mod tus;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::options;
use axum::{Json, Router};
use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;

/// The client API's routes and, generated from the same registrations, its OpenAPI document.
pub fn routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let upload = OpenApiRouter::new()
        .routes(routes!(
            tus::options,
            tus::head,
            tus::patch,
            tus::post,
            tus::delete
        ))
        .layer(middleware::from_fn(tus::cors));
    // CORS preflights of downloads answer empty (not documented: browsers send them).
    let download = OpenApiRouter::new()
        .routes(routes!(download::download))
        .routes(routes!(download::download_archive))
        .route("/download", options(|| async {}))
        .route("/download-archive", options(|| async {}))
        .layer(middleware::from_fn(download::cors));
    OpenApiRouter::with_openapi(ClientDoc::openapi())
        .routes(routes!(status))
        .merge(upload)
        .merge(download)
        .split_for_parts()
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "storage-agent client API",
        description = "Users' bytes: tus 1.0 uploads and ranged downloads, wire-compatible with the Backend.AI storage proxy 26.9. No auth header: the manager API mints a JWT that travels in ?token=.",
    ),
    components(schemas(crate::api::error::ProblemDoc))
)]
struct ClientDoc;

pub fn router(state: AppState) -> Router {
    let (routes, _) = routes();
    routes
        .route_layer(middleware::from_fn(crate::metrics::tag_route))
        .fallback(|| async { ApiError::not_found_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        // Upload bodies are streamed to staging and bounded by the upload's length instead.
        .layer(DefaultBodyLimit::disable())
        .layer(super::trace_layer())
        .layer(middleware::from_fn_with_state(
            (state.metrics.clone(), "client"),
            crate::metrics::observe,
        ))
        .with_state(state)
}

#[utoipa::path(get, path = "/", tag = "status", summary = "Status",
    responses((status = 200, description = "status, type, versions", content_type = "application/json")))]
async fn status() -> Json<Value> {
    Json(json!({
        "status": "ok",
        "type": "client-facing",
        "storage-proxy": super::COMPAT_VERSION,
        "storage-agent": super::VERSION,
    }))
}
