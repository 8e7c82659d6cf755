//! Client-facing API (default 127.0.0.1:6021): users' bytes. No auth header; a JWT minted by the
//! manager API travels in `?token=`.

pub mod archive;
mod checksum;
mod download;
mod ranges;
pub mod tus;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, options};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;

pub fn router(state: AppState) -> Router {
    let upload = Router::new()
        .route(
            "/upload",
            options(tus::options)
                .head(tus::head)
                .patch(tus::patch)
                .post(tus::post)
                .delete(tus::delete),
        )
        .layer(middleware::from_fn(tus::cors));
    let download = Router::new()
        .route("/download", get(download::download).options(|| async {}))
        .route(
            "/download-archive",
            get(download::download_archive).options(|| async {}),
        )
        .layer(middleware::from_fn(download::cors));
    Router::new()
        .route("/", get(status))
        .merge(upload)
        .merge(download)
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

async fn status() -> Json<Value> {
    Json(json!({
        "status": "ok",
        "type": "client-facing",
        "storage-proxy": super::COMPAT_VERSION,
        "storage-agent": super::VERSION,
    }))
}
