//! tus 1.0 on `/upload`: core plus creation, creation-with-upload, termination, checksum and
//! expiration. Upload sessions minted by the manager API (the Backend.AI flow: the client gets
//! `…/upload?token=…` and starts with HEAD/PATCH) and sessions created by POST (plain tus
//! clients pointed at the same URL) are the same record.
//!
//! This file owns the protocol: headers, offsets, status codes. Bytes go through the volume's
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
use crate::api::manager::check_upload_destination;
use crate::api::token::{TokenError, UploadClaims};
use crate::state::now_unix;
use crate::upload::{UploadLock, UploadRecord, UploadState};
use crate::volume::{ByteStream, Checkpointing, RelPath, VolumeError, WritePlan};

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
        "Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, Content-Type, Upload-Checksum, Upload-Defer-Length, Upload-Concat, X-HTTP-Method-Override, X-Requested-With",
    ),
    (
        "access-control-expose-headers",
        "Tus-Resumable, Tus-Version, Tus-Max-Size, Tus-Extension, Tus-Checksum-Algorithm, Upload-Length, Upload-Metadata, Upload-Offset, Upload-Expires, Location, Content-Type",
    ),
];

#[derive(Deserialize)]
pub struct UploadQuery {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    dst_dir: Option<String>,
}

// ---- protocol errors, one table ----------------------------------------------------------

fn not_found() -> ApiError {
    ApiError::problem(
        StatusCode::NOT_FOUND,
        "storage/tus-session-not-found",
        "TUS session not found",
    )
    .code("storage-proxy_read_not-found")
    .msg("no such upload session (completed uploads are kept until they expire)")
}

fn gone(expired_at: i64) -> ApiError {
    ApiError::problem(
        StatusCode::GONE,
        "storage/tus-session-expired",
        "Upload expired",
    )
    .code("storage-proxy_read_gone")
    .msg(format!(
        "the upload expired at {}; start a new one",
        httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + Duration::from_secs(expired_at.max(0) as u64)
        )
    ))
}

fn offset_mismatch(expected: u64, got: u64) -> ApiError {
    ApiError::problem(
        StatusCode::CONFLICT,
        "storage/upload-offset-mismatch",
        "Upload Offset Mismatch",
    )
    .code("storage-proxy_update_conflict")
    .msg(format!(
        "Upload offset mismatch: expected {expected}, got {got}"
    ))
}

fn locked() -> ApiError {
    ApiError::problem(
        StatusCode::LOCKED,
        "storage/tus-upload-locked",
        "Upload locked",
    )
    .code("storage-proxy_update_conflict")
    .msg("another request is still writing to this upload; retry shortly")
}

fn too_large(size: u64) -> ApiError {
    ApiError::problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "storage/tus-upload-too-large",
        "Upload exceeds its length",
    )
    .msg(format!(
        "the upload is {size} bytes long; nothing past that is accepted"
    ))
}

fn checksum_mismatch() -> ApiError {
    ApiError::problem(
        StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
        "storage/tus-checksum-mismatch",
        "Checksum Mismatch",
    )
    .msg("Upload-Checksum does not match the body; the chunk was discarded")
}

fn bad_header(name: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid_param(name, msg)
}

/// 507 for a write that ran out of room, saying which: the scope's quota or the disk. btrfs
/// answers EDQUOT for a quota; XFS answers ENOSPC for both, so with a limit set and room left on
/// the volume it was the quota. The durable offset is intact either way.
async fn insufficient_storage(
    v: &dyn crate::volume::Volume,
    rec: &UploadRecord,
    committed: u64,
    e: &VolumeError,
) -> ApiError {
    let usage = match (v.quota(), rec.vfid.quota_scope.as_ref()) {
        (Some(q), Some(qs)) => q.usage(qs).await.ok(),
        _ => None,
    };
    let limited = usage.is_some_and(|u| u.limit_bytes.is_some());
    let errno = match e {
        VolumeError::Io { source, .. } => source.raw_os_error(),
        _ => None,
    };
    let disk_has_room = || async {
        v.fs_usage()
            .await
            .is_ok_and(|fs| fs.available_bytes >= 1 << 20)
    };
    let over_quota = errno == Some(libc::EDQUOT) || (limited && disk_has_room().await);
    let (kind, title, what) = if over_quota {
        (
            "storage/quota-exceeded",
            "Quota Exceeded",
            "the quota scope's limit is reached",
        )
    } else {
        (
            "storage/insufficient-storage",
            "Insufficient Storage",
            "the volume is full",
        )
    };
    ApiError::problem(StatusCode::INSUFFICIENT_STORAGE, kind, title)
        .msg(format!(
            "{what} ({e}); the upload stays at offset {committed} and resumes from there once there is room"
        ))
        .data(serde_json::json!({
            "reason": if over_quota { "quota" } else { "disk" },
            "offset": committed,
            "used": usage.and_then(|u| u.used_bytes),
            "limit": usage.and_then(|u| u.limit_bytes),
        }))
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
        "creation,creation-with-upload,termination,checksum,expiration",
    );
    put("tus-checksum-algorithm", checksum::ALGORITHMS);
    put("access-control-max-age", "86400");
    put("x-content-type-options", "nosniff");
    // 200 rather than 204: some browsers reject 204 on a CORS preflight.
    (StatusCode::OK, h).into_response()
}

pub async fn head(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
) -> ApiResult<Response> {
    let c = upload_claims(&st, q.token.as_deref())?;
    let rec = load(&st, &c).await?;
    destination(&q, &rec)?;
    Ok((StatusCode::OK, upload_headers(&rec, offset_of(&rec))).into_response())
}

pub async fn delete(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resumable(&headers)?;
    let c = upload_claims(&st, q.token.as_deref())?;
    let rec = load(&st, &c).await?;
    let _lock = st
        .uploads
        .locks
        .lock(&rec.session)
        .await
        .map_err(|_| locked())?;
    st.uploads.terminate(&rec).await?;
    Ok((
        StatusCode::NO_CONTENT,
        [(HeaderName::from_static("tus-resumable"), TUS_VERSION)],
    )
        .into_response())
}

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
    // The record is read once, under the upload's lock (`precheck`).
    let rec = from_claims(&c);
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
    let mut location = format!(
        "upload?token={}",
        percent_encoding::utf8_percent_encode(
            q.token.as_deref().unwrap_or(""),
            percent_encoding::NON_ALPHANUMERIC
        )
    );
    if let Some(d) = q.dst_dir.as_deref().filter(|d| !d.is_empty()) {
        location.push_str("&dst_dir=");
        location.push_str(
            &percent_encoding::utf8_percent_encode(d, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
    }
    let mut h = upload_headers(&rec, offset);
    h.remove(header::CACHE_CONTROL);
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    Ok((StatusCode::CREATED, h).into_response())
}

// ---- the write path -------------------------------------------------------------------------

/// Why a body stopped before its end.
#[derive(Debug, thiserror::Error)]
enum BodyStop {
    #[error("the body goes past the upload's length")]
    TooLarge,
    #[error("no data received for {0:?}")]
    Idle(Duration),
    #[error("a newer request took over this upload")]
    TakenOver,
    #[error("the server is shutting down")]
    Shutdown,
    #[error("the client connection broke: {0}")]
    Client(String),
}

fn stop_of(e: &std::io::Error) -> Option<&BodyStop> {
    e.get_ref().and_then(|i| i.downcast_ref::<BodyStop>())
}

struct Guard {
    inner: axum::body::BodyDataStream,
    remaining: u64,
    hasher: Option<Hasher>,
    digest: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    lock_touch: Arc<UploadLock>,
    takeover: CancellationToken,
    shutdown: CancellationToken,
    idle: Duration,
    received: Arc<AtomicU64>,
}

/// The request body as the staging layer sees it: bounded by the upload's length, hashed for the
/// checksum extension, cut off when idle, on takeover or at shutdown, and marking lock progress.
fn guarded(g: Guard) -> ByteStream {
    futures::stream::unfold(Some(g), |state| async move {
        let mut g = state?;
        let next = tokio::select! {
            biased;
            _ = g.takeover.cancelled() => Err(BodyStop::TakenOver),
            _ = g.shutdown.cancelled() => Err(BodyStop::Shutdown),
            r = tokio::time::timeout(g.idle, g.inner.next()) => match r {
                Err(_) => Err(BodyStop::Idle(g.idle)),
                Ok(None) => {
                    if let Some(h) = g.hasher.take() {
                        *g.digest.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.finish());
                    }
                    return None;
                }
                Ok(Some(Err(e))) => Err(BodyStop::Client(e.to_string())),
                Ok(Some(Ok(chunk))) => Ok(chunk),
            },
        };
        match next {
            Ok(chunk) => {
                let n = chunk.len() as u64;
                if n > g.remaining {
                    drain(&mut g.inner).await;
                    let e = std::io::Error::other(BodyStop::TooLarge);
                    return Some((Err(e), None));
                }
                g.remaining -= n;
                g.received.fetch_add(n, Ordering::Relaxed);
                if let Some(h) = g.hasher.as_mut() {
                    h.update(&chunk);
                }
                g.lock_touch.touch();
                Some((Ok::<Bytes, std::io::Error>(chunk), Some(g)))
            }
            Err(stop) => Some((Err(std::io::Error::other(stop)), None)),
        }
    })
    .boxed()
}

enum Precheck {
    /// Go ahead: the record as read under the lock (or as the token describes it), whether it
    /// is recorded, and its volume.
    Write(Box<UploadRecord>, bool, Arc<dyn crate::volume::Volume>),
    /// Nothing to write; the upload is at this offset.
    Done(u64),
}

/// The checks made under the lock, before any byte is read. An upload not recorded yet is
/// recorded now, unless this PATCH brings all of it: then its completion records it, and it
/// costs no write before its data.
async fn precheck(
    st: &AppState,
    claimed: &UploadRecord,
    offset: u64,
    announced: Option<u64>,
    dst: &RelPath,
) -> ApiResult<Precheck> {
    // The record and the destination are independent: read and check them at once.
    let v = st.uploads.volume(&claimed.volume)?.clone();
    let (found, checked) = tokio::join!(
        st.uploads.get(&claimed.session),
        check_upload_destination(v.as_ref(), &claimed.vfid, dst)
    );
    let (rec, recorded) = match found? {
        Some(rec) => {
            usable(&rec, claimed)?;
            (rec, true)
        }
        None => {
            usable(claimed, claimed)?;
            let whole = offset == 0 && announced == Some(claimed.size);
            if !whole {
                st.uploads.ensure(claimed).await?;
            }
            (claimed.clone(), !whole)
        }
    };
    if rec.state == UploadState::Done {
        return if offset == rec.size {
            Ok(Precheck::Done(rec.size))
        } else {
            Err(offset_mismatch(rec.size, offset))
        };
    }
    if offset != rec.offset {
        return Err(offset_mismatch(rec.offset, offset));
    }
    checked?;
    if rec.offset == rec.size && rec.size > 0 {
        // Everything is staged but the move into place failed before; try again. (An empty
        // upload takes the write path: its staging file is made by its one, empty, PATCH.)
        st.uploads.complete(&rec, dst).await?;
        return Ok(Precheck::Done(rec.size));
    }
    Ok(Precheck::Write(Box::new(rec), recorded, v))
}

/// Reads and drops what is left of an over-long body (bounded), so the client finishes sending
/// and reads our 413 instead of a reset connection.
async fn drain(inner: &mut axum::body::BodyDataStream) {
    const DRAIN_LIMIT: u64 = 8 << 20;
    let mut dropped = 0u64;
    while dropped < DRAIN_LIMIT {
        match tokio::time::timeout(Duration::from_secs(2), inner.next()).await {
            Ok(Some(Ok(chunk))) => dropped += chunk.len() as u64,
            _ => break,
        }
    }
}

/// Writes one PATCH body at `offset` and returns the new durable offset. Runs as its own task
/// so that a client disconnecting mid-body cannot abort the bookkeeping halfway: whatever was
/// synced is acknowledged (or, with a checksum, discarded) and the lock is released.
async fn write_at(
    st: &AppState,
    rec: &UploadRecord,
    dst: RelPath,
    offset: u64,
    announced: Option<u64>,
    expected: Option<Expected>,
    body: &mut Option<Body>,
) -> ApiResult<u64> {
    if let Some(n) = announced
        && offset.saturating_add(n) > rec.size
    {
        return Err(too_large(rec.size));
    }
    let lock = st
        .uploads
        .locks
        .lock(&rec.session)
        .await
        .map_err(|_| locked())?;
    let st = st.clone();
    let loaded = rec.clone();
    let body = body.take().unwrap_or_default();
    tokio::spawn(async move {
        write_locked(&st, lock, &loaded, dst, offset, announced, expected, body).await
    })
    .await
    .map_err(|e| ApiError::internal(format!("upload task failed: {e}")))?
}

#[allow(clippy::too_many_arguments)]
async fn write_locked(
    st: &AppState,
    lock: UploadLock,
    loaded: &UploadRecord,
    dst: RelPath,
    offset: u64,
    announced: Option<u64>,
    expected: Option<Expected>,
    body: Body,
) -> ApiResult<u64> {
    tracing::debug!(session = %loaded.session, offset, "upload PATCH");
    let (rec, recorded, v) = match precheck(st, loaded, offset, announced, &dst).await {
        Ok(Precheck::Write(rec, recorded, v)) => (rec, recorded, v),
        Ok(Precheck::Done(n)) => return Ok(n),
        Err(e) => {
            drain(&mut body.into_data_stream()).await;
            return Err(e);
        }
    };
    let lock = Arc::new(lock);
    let digest = Arc::new(std::sync::Mutex::new(None));
    let received = Arc::new(AtomicU64::new(0));
    let stream = guarded(Guard {
        inner: body.into_data_stream(),
        remaining: rec.size - offset,
        hasher: expected.as_ref().map(|e| Hasher::new(e.algorithm)),
        digest: digest.clone(),
        lock_touch: lock.clone(),
        takeover: lock.takeover().clone(),
        shutdown: st.shutdown.clone(),
        idle: st.config.daemon.upload_idle_timeout,
        received: received.clone(),
    });
    // A PATCH with a checksum is all or nothing, so it has no checkpoints; any other commits
    // its offset as it goes, so a crash mid-body loses at most a checkpoint's worth.
    let (checkpoints, committer) = match expected {
        Some(_) => (None, None),
        None => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let c = Checkpointing {
                every: st.config.daemon.upload_checkpoint_interval,
                every_bytes: st.config.daemon.upload_checkpoint_bytes,
                durable: tx,
            };
            (
                Some(c),
                Some(spawn_committer(st, &rec, recorded, offset, rx)),
            )
        }
    };
    let staging = v.staging();
    let staged = staging
        .write(
            &rec.vfid,
            &rec.session,
            stream,
            WritePlan {
                offset,
                dst: dst.clone(),
                size: rec.size,
                checkpoints,
                // With a checksum the move waits for the digest; without, it is part of the
                // write.
                finish_to: expected.is_none().then(|| dst.clone()),
                atomic: expected.is_some(),
            },
        )
        .await;
    // Where the record stands now: the last checkpoint committed (or the start).
    let committed = match committer {
        Some(c) => c.await.unwrap_or(offset),
        None => offset,
    };
    // Back to the committed offset; an object store may have to keep more (parts it stored),
    // which is then committed too.
    let cut_back = || async {
        let held = staging
            .truncate(&rec.vfid, &rec.session, committed)
            .await
            .map_err(ApiError::from)?;
        if held > committed {
            if !recorded {
                st.uploads.ensure(&rec).await?;
            }
            st.uploads
                .commit_offset(&rec.session, committed, held)
                .await?;
        }
        Ok::<u64, ApiError>(held)
    };
    let staged = match staged {
        Ok(s) => s,
        Err(e) => {
            let held = cut_back().await.unwrap_or(committed);
            return Err(match &e {
                VolumeError::Io { source, .. }
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::ENOSPC) | Some(libc::EDQUOT)
                    ) =>
                {
                    insufficient_storage(v.as_ref(), &rec, held, &e).await
                }
                _ => e.into(),
            });
        }
    };
    let new_offset = offset + staged.written;
    match staged.body_error.as_ref().map(|e| (stop_of(e), e)) {
        None => {
            if let Some(exp) = &expected {
                let got = digest.lock().unwrap_or_else(|p| p.into_inner()).take();
                if got.as_deref() != Some(exp.digest.as_slice()) {
                    cut_back().await?;
                    return Err(checksum_mismatch());
                }
            }
        }
        Some((Some(BodyStop::TooLarge), _)) => {
            cut_back().await?;
            return Err(too_large(rec.size));
        }
        Some((stop, e)) => {
            // The body broke off. What was synced is kept (tus: store what was received),
            // unless a checksum was promised, which a partial chunk cannot meet.
            if expected.is_some() {
                cut_back().await?;
            } else if new_offset > committed {
                if !recorded {
                    st.uploads.ensure(&rec).await?;
                }
                st.uploads
                    .commit_offset(&rec.session, committed, new_offset)
                    .await?;
            }
            tracing::info!(session = %rec.session, kept = if expected.is_some() { 0 } else { staged.written }, reason = %e, "upload body ended early");
            return Err(match stop {
                Some(BodyStop::TakenOver) => locked(),
                Some(BodyStop::Shutdown) => {
                    ApiError::unavailable("the server is shutting down; resume from Upload-Offset")
                }
                Some(BodyStop::Idle(d)) => ApiError::problem(
                    StatusCode::REQUEST_TIMEOUT,
                    "storage/tus-body-timeout",
                    "Request body timed out",
                )
                .msg(format!(
                    "no data for {d:?}; resume from the last Upload-Offset"
                )),
                _ => ApiError::problem(
                    StatusCode::BAD_REQUEST,
                    "storage/tus-unexpected-eof",
                    "Request body ended early",
                )
                .msg(e.to_string()),
            });
        }
    }
    if new_offset == rec.size {
        // Complete: the one durable step is the move into place (synced data, synced
        // directory), made by the write itself when it could. Until then the record keeps its
        // last committed offset, which a crash before the move falls back to.
        if staged.finished {
            // The file is in place, durably: that is the promise of the 204. Remembering the
            // upload as done promises nothing more (it is not synced either), so it does not
            // hold the answer up.
            let (uploads, done) = (st.uploads.clone(), (*rec).clone());
            tokio::spawn(async move {
                if let Err(e) = uploads.record_done(&done).await {
                    tracing::warn!(session = %done.session, error = %e, "cannot record a completed upload");
                }
            });
        } else {
            st.uploads.complete(&rec, &dst).await?;
        }
        tracing::info!(session = %rec.session, size = rec.size, dst = %dst, "upload complete");
    } else if new_offset > committed
        && !st
            .uploads
            .commit_offset(&rec.session, committed, new_offset)
            .await?
    {
        // Only possible if the record changed under the lock (expired and reaped meanwhile).
        return Err(not_found());
    }
    drop(lock);
    Ok(new_offset)
}

/// Commits each checkpoint's offset as the staging layer reports it durable (recording the
/// upload first if this PATCH had not); returns the last one committed.
fn spawn_committer(
    st: &AppState,
    rec: &UploadRecord,
    recorded: bool,
    from: u64,
    mut durable: tokio::sync::mpsc::UnboundedReceiver<u64>,
) -> tokio::task::JoinHandle<u64> {
    let uploads = st.uploads.clone();
    let rec = rec.clone();
    tokio::spawn(async move {
        let mut last = from;
        let mut recorded = recorded;
        while let Some(to) = durable.recv().await {
            if !recorded {
                if let Err(e) = uploads.ensure(&rec).await {
                    tracing::warn!(session = %rec.session, error = %e, "cannot record an upload");
                    continue;
                }
                recorded = true;
            }
            match uploads.commit_offset(&rec.session, last, to).await {
                Ok(true) => {
                    tracing::debug!(session = %rec.session, offset = to, "upload checkpoint committed");
                    last = to;
                }
                Ok(false) => break, // taken over or reaped: the record is no longer ours
                Err(e) => {
                    tracing::warn!(session = %rec.session, error = %e, "cannot commit an upload checkpoint");
                }
            }
        }
        last
    })
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
