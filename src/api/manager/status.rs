use axum::Json;
use serde_json::{Value, json};

use crate::api::extract::EmptyBody;
use crate::api::{COMPAT_VERSION, VERSION};

pub async fn status(_: EmptyBody) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "type": "manager-facing",
        "storage-proxy": COMPAT_VERSION,
        "storage-agent": VERSION,
    }))
}
