//! tus 1.0 on `/upload`: core plus creation, creation-with-upload, termination, checksum and
//! expiration. Upload sessions minted by the manager API (the Backend.AI flow: the client gets
//! `…/upload?token=…` and starts with HEAD/PATCH) and sessions created by POST (plain tus
//! clients pointed at the same URL) are the same record.
//!
//! This module owns the protocol: headers, offsets, status codes (`errors.rs`: its error
//! answers; `write.rs`: the PATCH write path). Bytes go through the volume's
//! `UploadStaging`; durable offsets and locks live in `crate::upload`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::checksum::{self, Expected, Hasher};
use crate::api::AppState;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::ApiQuery;
use crate::api::token::check_upload_destination;
use crate::api::token::{TokenError, UploadClaims};
use crate::state::now_unix;
use crate::upload::{Concat, UploadError, UploadLock, UploadRecord, UploadState};
use crate::volume::{ByteStream, Checkpointing, RelPath, VolumeError, WritePlan};

mod concat;
mod errors;
mod write;

use errors::*;
use write::{drain, write_at};

pub const TUS_VERSION: &str = "1.0.0";
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

/// Static CORS headers on every `/upload` response (tus-js-client in a browser must read
/// `Upload-Offset`, `Location` and `Upload-Expires`, errors included).
pub const CORS: &[(&str, &str)] = &[
    ("access-control-allow-origin", "*"),
    (
        "access-control-allow-methods",
        "GET, HEAD, POST, PATCH, DELETE, OPTIONS",
    ),
    (
        "access-control-allow-headers",
        "Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, Content-Type, Upload-Checksum, Upload-Defer-Length, Upload-Concat, Storage-Agent-Partial-Offset, X-HTTP-Method-Override, X-Requested-With",
    ),
    (
        "access-control-expose-headers",
        "Tus-Resumable, Tus-Version, Tus-Max-Size, Tus-Extension, Tus-Checksum-Algorithm, Upload-Length, Upload-Metadata, Upload-Offset, Upload-Expires, Upload-Concat, Storage-Agent-Max-Checksummed-Body, Location, Content-Type",
    ),
];

#[derive(Deserialize)]
pub struct UploadQuery {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    dst_dir: Option<String>,
    /// One of the token's partial uploads (tus concatenation).
    #[serde(default)]
    partial: Option<String>,
}

// ---- helpers --------------------------------------------------------------------------------

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// tus says 412 for an unsupported version; a missing header is accepted because Backend.AI's
/// own clients never sent one.
fn check_resumable(h: &HeaderMap) -> ApiResult<()> {
    match header_str(h, "tus-resumable") {
        None => Ok(()),
        Some(v) if v.trim() == TUS_VERSION => Ok(()),
        Some(v) => Err(ApiError::problem(
            StatusCode::PRECONDITION_FAILED,
            "storage/tus-unsupported-version",
            "Unsupported tus version",
        )
        .msg(format!("Tus-Resumable {v:?} is not supported"))
        .header(HeaderName::from_static("tus-version"), TUS_VERSION)),
    }
}

fn parse_u64_header(h: &HeaderMap, name: &str) -> ApiResult<Option<u64>> {
    let Some(raw) = h.get(name) else {
        return Ok(None);
    };
    let s = raw
        .to_str()
        .map_err(|_| bad_header(name, "must be a non-negative integer"))?;
    // Only plain digits: "+5", " 5", "-1", "5.0" are all refused.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_header(
            name,
            format!("Invalid {name} header value: {s}"),
        ));
    }
    s.parse()
        .map(Some)
        .map_err(|_| bad_header(name, format!("Invalid {name} header value: {s}")))
}

fn upload_claims(st: &AppState, token: Option<&str>) -> ApiResult<UploadClaims> {
    let t = token.ok_or_else(|| ApiError::invalid_param("token", "is required"))?;
    match st.tokens.decode::<UploadClaims>(t) {
        Ok(c) => Ok(c),
        // A genuine upload token past its expiry: tus's expiration extension says 410.
        Err(TokenError::Expired(v)) if v.get("op").and_then(|o| o.as_str()) == Some("upload") => {
            Err(gone(v.get("exp").and_then(|e| e.as_i64()).unwrap_or(0)))
        }
        Err(e) => Err(ApiError::invalid_param("token", e.to_string())),
    }
}

/// The upload a token describes, before anything is known of it: a token is self-describing.
fn from_claims(c: &UploadClaims) -> UploadRecord {
    UploadRecord {
        session: c.session.clone(),
        volume: c.volume.clone(),
        vfid: c.vfid,
        relpath: c.relpath.clone(),
        size: c.size,
        offset: 0,
        state: UploadState::Active,
        created_at: now_unix(),
        expires_at: c.exp,
        concat: Concat::None,
    }
}

/// A recorded upload may still be used with this token? Terminated (or not this token's) →
/// 404; expired → 410.
fn usable(rec: &UploadRecord, c: &UploadRecord) -> ApiResult<()> {
    if rec.volume != c.volume || rec.vfid != c.vfid || rec.relpath != c.relpath {
        return Err(not_found());
    }
    if rec.state == UploadState::Terminated {
        return Err(not_found());
    }
    if rec.state == UploadState::Expired || rec.expires_at <= now_unix() {
        return Err(gone(rec.expires_at));
    }
    Ok(())
}

/// The upload a request addresses: one of the token's partial uploads (`partial=`), or the
/// token's own.
async fn addressed(st: &AppState, c: &UploadClaims, q: &UploadQuery) -> ApiResult<UploadRecord> {
    match q.partial.as_deref() {
        Some(id) => concat::partial(st, c, id).await,
        None => load(st, c).await,
    }
}

fn put_header(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

fn token_location(token: &str) -> String {
    format!(
        "upload?token={}",
        percent_encoding::utf8_percent_encode(token, percent_encoding::NON_ALPHANUMERIC)
    )
}

/// The upload's URL, relative to `/upload`'s, as `Location` gives it.
fn location(q: &UploadQuery) -> String {
    let mut location = token_location(q.token.as_deref().unwrap_or(""));
    if let Some(d) = q.dst_dir.as_deref().filter(|d| !d.is_empty()) {
        location.push_str("&dst_dir=");
        location.push_str(
            &percent_encoding::utf8_percent_encode(d, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
    }
    location
}

/// The upload a token describes, as recorded, or new (not written until something is written).
async fn load(st: &AppState, c: &UploadClaims) -> ApiResult<UploadRecord> {
    let fresh = from_claims(c);
    let rec = st
        .uploads
        .get(&c.session)
        .await?
        .unwrap_or_else(|| fresh.clone());
    usable(&rec, &fresh)?;
    Ok(rec)
}

fn destination(q: &UploadQuery, rec: &UploadRecord) -> ApiResult<RelPath> {
    match q.dst_dir.as_deref() {
        None | Some("") => Ok(rec.relpath.clone()),
        Some(d) => {
            let dir = RelPath::parse(d)
                .map_err(|e| ApiError::invalid_param("dst_dir", format!("{e}: {d:?}")))?;
            Ok(dir.join(&rec.relpath))
        }
    }
}

fn offset_of(rec: &UploadRecord) -> u64 {
    if rec.state == UploadState::Done {
        rec.size
    } else {
        rec.offset
    }
}

fn upload_headers(rec: &UploadRecord, offset: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(HeaderName::from_static(k), v);
        }
    };
    put("tus-resumable", TUS_VERSION.into());
    put("upload-offset", offset.to_string());
    put("upload-length", rec.size.to_string());
    put(
        "upload-expires",
        httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + Duration::from_secs(rec.expires_at.max(0) as u64),
        ),
    );
    put("cache-control", "no-store".into());
    h
}

// ---- handlers -------------------------------------------------------------------------------

#[utoipa::path(options, path = "/upload", tag = "tus", summary = "tus capabilities (and CORS preflight)",
    responses((status = 200, description = "Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm")))]
pub async fn options(State(st): State<AppState>) -> Response {
    let mut h = HeaderMap::new();
    let mut put = |k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(HeaderName::from_static(k), v);
        }
    };
    put("tus-resumable", TUS_VERSION);
    put("tus-version", TUS_VERSION);
    put("tus-max-size", &st.config.proxy.max_upload_size.to_string());
    put(
        "tus-extension",
        "creation,creation-with-upload,termination,checksum,expiration,concatenation",
    );
    put("tus-checksum-algorithm", checksum::ALGORITHMS);
    put("access-control-max-age", "86400");
    put("x-content-type-options", "nosniff");
    // 200 rather than 204: some browsers reject 204 on a CORS preflight.
    (StatusCode::OK, h).into_response()
}

#[utoipa::path(head, path = "/upload", tag = "tus", summary = "Where an upload stands (Upload-Concat for partial and final uploads)",
    params(("token" = String, Query, description = "The JWT the manager API minted"), ("partial" = Option<String>, Query, description = "One of the upload's partial uploads (tus concatenation), as its Location named it")),
    responses((status = 200, description = "Upload-Offset, Upload-Length, Upload-Expires"), (status = "4XX", description = "Refused", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
pub async fn head(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
) -> ApiResult<Response> {
    let c = upload_claims(&st, q.token.as_deref())?;
    let rec = addressed(&st, &c, &q).await?;
    let dst = destination(&q, &rec)?;
    // All its bytes are held but it is not in place: a crash (or a failed completion) came
    // between the two. A client told the full offset stops there, so it is completed now,
    // as an empty PATCH would, before the offset says so.
    if rec.state == UploadState::Active
        && rec.size > 0
        && rec.offset == rec.size
        && !matches!(rec.concat, Concat::Final { .. })
    {
        write_at(&st, &rec, dst, rec.size, Some(0), None, &mut None).await?;
    }
    let mut h = upload_headers(&rec, offset_of(&rec));
    if let Some(v) = concat::header_of(&rec, q.token.as_deref().unwrap_or("")) {
        put_header(&mut h, "upload-concat", &v);
    }
    // Where the volume holds checksummed bodies back (object stores), how long one may be:
    // a client sizes its PATCHes by it instead of learning it from a 413.
    if let Some(max) = st.uploads.volume(&rec.volume)?.staging().max_atomic_write() {
        put_header(
            &mut h,
            "storage-agent-max-checksummed-body",
            &max.to_string(),
        );
    }
    Ok((StatusCode::OK, h).into_response())
}

#[utoipa::path(delete, path = "/upload", tag = "tus", summary = "Terminate an upload (with its partial uploads), or one partial upload",
    params(("token" = String, Query, description = "The JWT the manager API minted"), ("partial" = Option<String>, Query, description = "One of the upload's partial uploads (tus concatenation), as its Location named it")),
    responses((status = 204, description = "Terminated"), (status = "4XX", description = "Refused", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
pub async fn delete(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resumable(&headers)?;
    let c = upload_claims(&st, q.token.as_deref())?;
    let rec = addressed(&st, &c, &q).await?;
    let _lock = st
        .uploads
        .locks
        .lock(&rec.session)
        .await
        .map_err(|_| locked())?;
    if q.partial.is_some() {
        concat::check_terminable(&st, &c, &rec).await?;
    }
    st.uploads.terminate(&rec).await?;
    if q.partial.is_none() {
        // The upload's partial uploads go with it.
        st.uploads.terminate_partials(&c.session).await?;
    }
    Ok((
        StatusCode::NO_CONTENT,
        [(HeaderName::from_static("tus-resumable"), TUS_VERSION)],
    )
        .into_response())
}

#[utoipa::path(patch, path = "/upload", tag = "tus", summary = "Append bytes at Upload-Offset (Upload-Checksum optional)",
    params(("token" = String, Query, description = "The JWT the manager API minted"), ("dst_dir" = Option<String>, Query, description = "Backend.AI's destination directory override"), ("partial" = Option<String>, Query, description = "One of the upload's partial uploads (tus concatenation), as its Location named it")),
    request_body(content = Vec<u8>, content_type = "application/offset+octet-stream"),
    responses((status = 204, description = "Upload-Offset: the new durable offset"), (status = 460, description = "Checksum mismatch: nothing kept"), (status = 507, description = "Quota or disk full: the offset is intact", body = crate::api::error::ProblemDoc, content_type = "application/problem+json"), (status = "4XX", description = "Refused", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
pub async fn patch(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let mut body = Some(body);
    let r = patch_with(&st, &q, &headers, &mut body).await;
    drained_on_error(r, body).await
}

/// A request refused before its body was read still has its body in flight: reading (a bounded
/// part of) it lets the client finish sending and see our answer instead of a reset connection.
async fn drained_on_error<T>(r: ApiResult<T>, body: Option<Body>) -> ApiResult<T> {
    if r.is_err()
        && let Some(b) = body
    {
        drain(&mut b.into_data_stream()).await;
    }
    r
}

async fn patch_with(
    st: &AppState,
    q: &UploadQuery,
    headers: &HeaderMap,
    body: &mut Option<Body>,
) -> ApiResult<Response> {
    check_resumable(headers)?;
    let c = upload_claims(st, q.token.as_deref())?;
    let offset = parse_u64_header(headers, "upload-offset")?.ok_or_else(|| {
        bad_header(
            "upload-offset",
            "Missing required Upload-Offset header for TUS PATCH request",
        )
    })?;
    let ctype = header_str(headers, "content-type").unwrap_or("");
    if !ctype.eq_ignore_ascii_case(OFFSET_OCTET_STREAM) {
        return Err(ApiError::problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "storage/tus-unsupported-media-type",
            "Unsupported Media Type",
        )
        .msg(format!(
            "PATCH bodies must be {OFFSET_OCTET_STREAM}, got {ctype:?}"
        )));
    }
    let expected = expected_checksum(headers)?;
    // The record is read once, under the upload's lock (`precheck`); a partial upload exists
    // only once created.
    let rec = match q.partial.as_deref() {
        Some(id) => concat::partial(st, &c, id).await?,
        None => from_claims(&c),
    };
    let dst = destination(q, &rec)?;
    let announced = parse_u64_header(headers, "content-length")?;
    let offset = write_at(st, &rec, dst, offset, announced, expected, body).await?;
    // Length and expiry never change, so the record read before the write still answers.
    Ok((StatusCode::NO_CONTENT, upload_headers(&rec, offset)).into_response())
}

fn expected_checksum(headers: &HeaderMap) -> ApiResult<Option<Expected>> {
    header_str(headers, "upload-checksum")
        .map(|v| checksum::parse(v).map_err(|e| bad_header("upload-checksum", e.to_string())))
        .transpose()
}

/// `POST /upload?token=…`: tus creation for clients that create their own uploads. The record
/// exists since the token was minted; POST confirms its length and answers with its URL.
#[utoipa::path(post, path = "/upload", tag = "tus", summary = "Create an upload (tus creation, with-upload), a partial upload (Upload-Concat: partial) or the final upload joining partials (Upload-Concat: final;<urls>)",
    params(("token" = String, Query, description = "The JWT the manager API minted"), ("Upload-Concat" = Option<String>, Header, description = "partial, or final;<partial upload URLs separated by spaces>")),
    responses((status = 201, description = "Location of the upload; Upload-Offset when data came with it"), (status = "4XX", description = "Refused", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
pub async fn post(
    state: State<AppState>,
    query: ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if let Some(m) = header_str(&headers, "x-http-method-override") {
        return match m.trim().to_ascii_uppercase().as_str() {
            "PATCH" => patch(state, query, headers, body).await,
            "DELETE" => delete(state, query, headers).await,
            "HEAD" => head(state, query).await,
            other => Err(bad_header(
                "x-http-method-override",
                format!("cannot override POST with {other:?}"),
            )),
        };
    }
    let (State(st), ApiQuery(q)) = (state, query);
    let mut body = Some(body);
    let r = create(&st, &q, &headers, &mut body).await;
    drained_on_error(r, body).await
}

async fn create(
    st: &AppState,
    q: &UploadQuery,
    headers: &HeaderMap,
    body: &mut Option<Body>,
) -> ApiResult<Response> {
    check_resumable(headers)?;
    let c = upload_claims(st, q.token.as_deref())?;
    let concat = concat::parse(headers)?;
    if let Some(concat::UploadConcat::Final(ids)) = concat {
        return concat::create_final(st, q, headers, &c, ids).await;
    }
    if headers.contains_key("upload-defer-length") {
        return Err(bad_header(
            "upload-defer-length",
            "the upload length is fixed by the token; send Upload-Length",
        ));
    }
    let length = parse_u64_header(headers, "upload-length")?
        .ok_or_else(|| bad_header("upload-length", "is required"))?;
    if length > st.config.proxy.max_upload_size {
        return Err(too_large(st.config.proxy.max_upload_size));
    }
    if let Some(concat::UploadConcat::Partial) = concat {
        return concat::create_partial(st, q, headers, body, &c, length).await;
    }
    if length != c.size {
        return Err(bad_header(
            "upload-length",
            format!("must equal the size the token was issued for ({})", c.size),
        ));
    }
    let rec = load(st, &c).await?;
    let dst = destination(q, &rec)?;
    let left = rec.size - offset_of(&rec);
    if left > 0 {
        st.uploads
            .volume(&rec.volume)?
            .check_space(rec.vfid.quota_scope.as_ref(), left)
            .await?;
    }
    let with_data = header_str(headers, "content-type")
        .is_some_and(|t| t.eq_ignore_ascii_case(OFFSET_OCTET_STREAM));
    let offset = if with_data {
        let expected = expected_checksum(headers)?;
        let announced = parse_u64_header(headers, "content-length")?;
        let at = offset_of(&rec);
        write_at(st, &rec, dst, at, announced, expected, body).await?
    } else {
        offset_of(&rec)
    };
    let mut h = upload_headers(&rec, offset);
    h.remove(header::CACHE_CONTROL);
    put_header(&mut h, "location", &location(q));
    Ok((StatusCode::CREATED, h).into_response())
}

/// Adds the static CORS headers to every `/upload` response.
pub async fn cors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let is_options = req.method() == Method::OPTIONS;
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (k, v) in CORS {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    if !is_options {
        h.entry(HeaderName::from_static("tus-resumable"))
            .or_insert(HeaderValue::from_static(TUS_VERSION));
    }
    resp
}
