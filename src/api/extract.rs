//! Request extractors that reject in our problem+json format. The manager sends JSON bodies on
//! GET and DELETE too, so every manager route reads its parameters from the body.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;

/// Turns a serde error with its path into `{"field": "message"}`.
fn field_error(path: String, err: impl std::fmt::Display) -> ApiError {
    let mut msg = err.to_string();
    // serde_json appends " at line 1 column 42"; the field name says more.
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    let mut field = if path == "." { String::new() } else { path };
    if let Some(rest) = msg.strip_prefix("missing field `")
        && let Some(name) = rest.strip_suffix('`')
    {
        field = if field.is_empty() {
            name.to_string()
        } else {
            format!("{field}.{name}")
        };
        msg = "is required".to_string();
    }
    if field.is_empty() {
        field = "body".to_string();
    }
    // A path climbing out of the vfolder is Backend.AI's InvalidSubpathError (a vfolder error
    // the manager answers 400 for), not a schema failure.
    if let Some(path) = msg
        .strip_prefix(crate::volume::path::ESCAPES)
        .and_then(|rest| rest.strip_prefix(": "))
    {
        return ApiError::subpath_invalid(path);
    }
    ApiError::invalid_params(BTreeMap::from([(field, msg)]))
}

/// Parses a JSON body. An empty body counts as `{}`, so missing parameters are reported one by
/// one ("vfid": "is required") instead of as unreadable JSON.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => v,
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::malformed("invalid JSON").msg(inner.to_string()));
            }
            return Err(field_error(path, inner));
        }
    };
    de.end()
        .map_err(|e| ApiError::malformed("invalid JSON").msg(e.to_string()))?;
    Ok(value)
}

/// Reads a body of at most `limit` bytes. Past the limit, a bounded amount more is read and
/// dropped before answering 413, so the client finishes sending and sees the answer instead of
/// a reset connection.
pub async fn body_bytes(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    const DRAIN_LIMIT: usize = 8 << 20;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::malformed("cannot read body").msg(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            let mut dropped = 0;
            while dropped < DRAIN_LIMIT {
                match tokio::time::timeout(std::time::Duration::from_secs(2), stream.next()).await {
                    Ok(Some(Ok(c))) => dropped += c.len(),
                    _ => break,
                }
            }
            return Err(ApiError::payload_too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// A JSON request body, at most `[storage-agent] max-json-body` bytes.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req.into_body(), state.config.daemon.max_json_body).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// For routes without parameters: any body is refused, as Backend.AI does.
pub struct EmptyBody;

impl FromRequest<AppState> for EmptyBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req.into_body(), state.config.daemon.max_json_body).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            Ok(EmptyBody)
        } else {
            Err(ApiError::malformed("request body should be empty"))
        }
    }
}

/// Query-string parameters (client API).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(q));
        serde_path_to_error::deserialize::<_, T>(de)
            .map(ApiQuery)
            .map_err(|err| {
                let path = err.path().to_string();
                field_error(path, err.into_inner())
            })
    }
}

fn form_urlencoded_parse(q: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(q.as_bytes())
}

/// Lenient booleans for query strings: Backend.AI clients send "true"/"false", "1"/"0".
pub mod query_bool {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" | "" => Ok(false),
            _ => Err(serde::de::Error::custom(format!(
                "expected true or false, got {s:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Req {
        volume: String,
        vfid: crate::ids::VFolderId,
        #[serde(default)]
        n: u32,
    }

    fn err_text(e: ApiError) -> String {
        format!("{e:?}")
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<Req>(b"").unwrap_err();
        assert!(err_text(e).contains("\"volume\": String(\"is required\")"));
        let e = parse_json::<Req>(br#"{"volume": 3}"#).unwrap_err();
        assert!(err_text(e).contains("volume"));
        let e = parse_json::<Req>(br#"{"volume": "v", "vfid": "nope"}"#).unwrap_err();
        assert!(err_text(e).contains("vfid"));
        let e = parse_json::<Req>(br#"{"volume": "v", "vfid"#).unwrap_err();
        assert!(err_text(e).contains("malformed-request"));
        let e = parse_json::<Req>(br#"[1, 2]"#).unwrap_err();
        assert!(err_text(e).contains("body"));
    }
}
