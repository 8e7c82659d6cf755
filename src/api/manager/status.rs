use axum::Json;
use serde_json::{Value, json};

use crate::api::extract::EmptyBody;
use crate::api::{COMPAT_VERSION, VERSION};

#[utoipa::path(get, path = "/status", tag = "status",
    summary = "Status",
    responses((status = 200, description = "status, type, versions", content_type = "application/json"), (status = "4XX", description = "Refused: problem+json (Backend.AI {msg} bodies where the Python proxy used them)", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "5XX", description = "Failed", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
pub async fn status(_: EmptyBody) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "type": "manager-facing",
        "storage-proxy": COMPAT_VERSION,
        "storage-agent": VERSION,
    }))
}

/// `/` answers as `/status` does.
#[utoipa::path(get, path = "/", tag = "status", summary = "Status (as /status)",
    responses((status = 200, description = "status, type, versions", content_type = "application/json")))]
pub async fn root(body: EmptyBody) -> Json<Value> {
    status(body).await
}
