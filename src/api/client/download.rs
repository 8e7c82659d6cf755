//! `GET/HEAD /download` and `GET /download-archive`: files with ranges and conditional requests,
//! directories and selections as streaming zips.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

use super::archive::{self, Root};
use super::ranges::{self, RangeRequest};
use crate::api::AppState;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{ApiQuery, query_bool};
use crate::api::token::check_archive_filename;
use crate::api::token::{ArchiveClaims, DownloadClaims, TokenError};
use crate::api::zerocopy::ZeroCopy;
use crate::volume::{ByteStream, EntryKind, EntryStat, ReadHandle, RelPath, VolumeError};

#[derive(Deserialize)]
pub struct DownloadQuery {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    dst_dir: Option<String>,
    #[serde(default, with = "query_bool")]
    archive: bool,
    #[serde(default, with = "query_bool")]
    no_cache: bool,
}

#[derive(Deserialize)]
pub struct ArchiveQuery {
    #[serde(default)]
    token: Option<String>,
}

fn file_not_found(what: &str) -> ApiError {
    ApiError::problem(
        StatusCode::NOT_FOUND,
        "storage/file-not-found",
        "File not found",
    )
    .msg(format!("File not found: {what}"))
}

/// Anything that means "there is no such file for you" (missing, outside the vfolder, a
/// symlink escaping it) is a 404, as in Backend.AI.
fn not_found_or(e: VolumeError, what: &str) -> ApiError {
    match &e {
        VolumeError::VFolderNotFound(_) | VolumeError::Escapes(_) => file_not_found(what),
        VolumeError::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
            ) =>
        {
            file_not_found(what)
        }
        _ => e.into(),
    }
}

/// RFC 5987 attr-char: everything else is percent-encoded in `filename*`.
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// `attachment;filename="<ascii fallback>"; filename*=UTF-8''<percent-encoded>`.
pub fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .collect::<String>()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    let ascii = if ascii.trim().is_empty() {
        "download".to_string()
    } else {
        ascii
    };
    format!(
        "attachment;filename=\"{ascii}\"; filename*=UTF-8''{}",
        utf8_percent_encode(name, ATTR_CHAR)
    )
}

fn etag_of(stat: &EntryStat) -> String {
    match &stat.etag {
        // The object's own ETag (already quoted by the service).
        Some(e) if e.starts_with('"') => e.clone(),
        Some(e) => format!("\"{e}\""),
        None => format!("\"{:x}-{:x}\"", stat.mtime_nanos, stat.size),
    }
}

fn http_date_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn etag_matches(list: &str, etag: &str, weak: bool) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || (weak && t.strip_prefix("W/") == Some(etag)))
}

fn parse_date(h: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
}

/// Ranges shorter than this are copied, never spliced (measured in bench/ANALYSIS.md).
const SPLICE_FROM: u64 = 256 << 10;

/// How the bytes of an opened file reach the client.
struct Source {
    handle: Box<dyn ReadHandle>,
    zero_copy: Option<(ZeroCopy, Counter)>,
}

impl Source {
    /// Bytes `a..b`: handed to the kernel where the connection and the volume allow it, read
    /// and copied otherwise. Small ranges are always read: copying a few pages costs less
    /// than a pipe and a hand-over to a blocking thread, and a read from the page cache needs
    /// no hand-over at all.
    fn range(&self, a: u64, b: u64) -> ByteStream {
        match (&self.zero_copy, self.handle.local_file()) {
            (Some((z, counted)), Some(file)) if b - a >= SPLICE_FROM => z
                .file_range(file, a, b, counted.clone())
                .unwrap_or_else(|| self.handle.read_range(a, b)),
            _ => self.handle.read_range(a, b),
        }
    }
}

/// Serves an opened regular file with conditional requests and ranges.
pub fn serve_file(
    req: &HeaderMap,
    h: Box<dyn ReadHandle>,
    zero_copy: Option<(ZeroCopy, Counter)>,
    filename: &str,
    no_cache: bool,
) -> Response {
    let h = Source {
        handle: h,
        zero_copy,
    };
    let stat = h.handle.stat().clone();
    let size = stat.size;
    let etag = etag_of(&stat);
    let mtime = http_date_secs(stat.modified);
    let last_modified = httpdate::fmt_http_date(mtime);

    let mut headers = HeaderMap::new();
    let mut put = |k: header::HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(k, v);
        }
    };
    put(header::ETAG, &etag);
    put(header::LAST_MODIFIED, &last_modified);
    put(header::ACCEPT_RANGES, "bytes");
    put(header::CONTENT_DISPOSITION, &content_disposition(filename));
    if no_cache {
        put(header::CACHE_CONTROL, "no-store");
    }

    // Preconditions, in RFC 9110 §13.2.2 order.
    let if_match = req.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    if let Some(list) = if_match {
        if !etag_matches(list, &etag, false) {
            return (StatusCode::PRECONDITION_FAILED, headers).into_response();
        }
    } else if let Some(t) = parse_date(req, header::IF_UNMODIFIED_SINCE)
        && mtime > t
    {
        return (StatusCode::PRECONDITION_FAILED, headers).into_response();
    }
    let if_none_match = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if let Some(list) = if_none_match {
        if etag_matches(list, &etag, true) {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
    } else if let Some(t) = parse_date(req, header::IF_MODIFIED_SINCE)
        && mtime <= t
    {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }

    let range = req
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_holds(req, &etag, mtime))
        .map(|r| ranges::parse(r, size))
        .unwrap_or(RangeRequest::Full);

    match range {
        RangeRequest::Full => {
            put_len(&mut headers, size);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            (StatusCode::OK, headers, Body::from_stream(h.range(0, size))).into_response()
        }
        RangeRequest::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response()
        }
        RangeRequest::Ranges(rs) if rs.len() == 1 => {
            let (a, b) = rs[0];
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{}/{size}", b - 1)) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            put_len(&mut headers, b - a);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                headers,
                Body::from_stream(h.range(a, b)),
            )
                .into_response()
        }
        RangeRequest::Ranges(rs) => multipart(headers, h, &rs, size),
    }
}

fn put_len(h: &mut HeaderMap, n: u64) {
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
}

/// `If-Range`: the range applies only if the validator still matches (a strong ETag, or the
/// exact Last-Modified date); otherwise the whole file is sent.
fn if_range_holds(req: &HeaderMap, etag: &str, mtime: SystemTime) -> bool {
    let Some(v) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let v = v.trim();
    if v.starts_with('"') || v.starts_with("W/") {
        v == etag
    } else {
        httpdate::parse_http_date(v).is_ok_and(|t| t == mtime)
    }
}

/// `multipart/byteranges` with an exact Content-Length, streamed part by part.
fn multipart(mut headers: HeaderMap, h: Source, rs: &[(u64, u64)], size: u64) -> Response {
    let boundary = uuid::Uuid::new_v4().simple().to_string();
    let mut total = 0u64;
    let mut parts = Vec::new();
    for &(a, b) in rs {
        let head = format!(
            "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{}/{size}\r\n\r\n",
            b - 1
        );
        total += head.len() as u64 + (b - a);
        parts.push(futures::stream::once(futures::future::ready(Ok(Bytes::from(head)))).boxed());
        parts.push(h.range(a, b));
    }
    let tail = format!("\r\n--{boundary}--\r\n");
    total += tail.len() as u64;
    parts.push(futures::stream::once(futures::future::ready(Ok(Bytes::from(tail)))).boxed());
    put_len(&mut headers, total);
    if let Ok(v) = HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}")) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    let body = Body::from_stream(futures::stream::iter(parts).flatten());
    (StatusCode::PARTIAL_CONTENT, headers, body).into_response()
}

fn zip_response(body: Body, filename: &str, no_cache: bool) -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    if let Ok(v) = HeaderValue::from_str(&content_disposition(filename)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if no_cache {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    (StatusCode::OK, h, body).into_response()
}

#[utoipa::path(get, path = "/download", tag = "downloads", summary = "Download a file (ranges, conditionals; HEAD too) or, with archive=true, a directory as zip",
    params(("token" = String, Query, description = "The JWT the manager API minted"), ("archive" = Option<bool>, Query, description = "A directory as a zip archive"), ("no_cache" = Option<bool>, Query, description = "Cache-Control: no-store"), ("dst_dir" = Option<String>, Query, description = "Backend.AI's path override")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream"), (status = 206, description = "The ranges asked for"), (status = 304, description = "Not modified"), (status = 416, description = "Range not satisfiable"), (status = "4XX", description = "Refused", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
pub async fn download(
    State(st): State<AppState>,
    zero_copy: Option<Extension<ZeroCopy>>,
    method: Method,
    ApiQuery(q): ApiQuery<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let token = q
        .token
        .as_deref()
        .ok_or_else(|| ApiError::invalid_param("token", "is required"))?;
    let c: DownloadClaims = st
        .tokens
        .decode(token)
        .map_err(|e| ApiError::invalid_param("token", e.to_string()))?;
    let path = match q.dst_dir.as_deref().filter(|d| !d.is_empty()) {
        None => c.relpath.clone(),
        Some(d) => RelPath::parse(d)
            .map_err(|e| ApiError::invalid_param("dst_dir", format!("{e}: {d:?}")))?
            .join(&c.relpath),
    };
    let v = st.volumes.get(&c.volume)?.clone();
    let shown = path.as_str();
    let no_cache = q.no_cache;
    // A file is opened straight away (the usual case, one step); only a directory needs more.
    let is_dir = |e: &VolumeError| matches!(e, VolumeError::Io { source, .. } if source.raw_os_error() == Some(libc::EISDIR));
    match v.open_read(&c.vfid, &path).await {
        Ok(h) => {
            let name = path.file_name().unwrap_or("download").to_string();
            let zero_copy = zero_copy
                .filter(|_| st.config.daemon.zero_copy_downloads)
                .map(|Extension(z)| (z, st.metrics.spliced_bytes.clone()));
            return Ok(serve_file(&headers, h, zero_copy, &name, no_cache));
        }
        Err(e) if is_dir(&e) => {}
        Err(e) => return Err(not_found_or(e, shown)),
    }
    let stat = v
        .stat(&c.vfid, &path)
        .await
        .map_err(|e| not_found_or(e, shown))?;
    if stat.kind != EntryKind::Directory {
        // Replaced by a file since: ask again.
        return Err(not_found_or(
            VolumeError::io(&path, std::io::Error::from_raw_os_error(libc::ENOENT)),
            shown,
        ));
    }
    if !(q.archive || c.archive) {
        return Err(ApiError::invalid_param(
            "relpath",
            "The file is not a regular file. (pass archive=true to download a directory as zip)",
        ));
    }
    let name = format!(
        "{}.zip",
        path.file_name()
            .map(str::to_string)
            .unwrap_or_else(|| c.vfid.folder.simple().to_string())
    );
    if method == Method::HEAD {
        return Ok(zip_response(Body::empty(), &name, no_cache));
    }
    let slot = archive_slot(&st, &c.vfid)?;
    let body = archive::zip_body(
        v,
        c.vfid,
        vec![Root {
            path,
            name: String::new(),
            stat,
        }],
        slot,
    );
    Ok(zip_response(body, &name, no_cache))
}

/// A production slot for an archive of `vfid`'s data, or 429 when the node or the vfolder's
/// owner (its quota scope) has enough running.
fn archive_slot(st: &AppState, vfid: &crate::ids::VFolderId) -> ApiResult<archive::Slot> {
    let owner = match &vfid.quota_scope {
        Some(qs) => qs.to_string(),
        None => vfid.to_string(),
    };
    st.archives.take(&owner).ok_or_else(|| {
        ApiError::problem(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-archives",
            "Too many archives in progress",
        )
        .msg("too many zip archives are being built (on this node or of this owner); try again shortly")
        .header(header::RETRY_AFTER, "5")
    })
}

fn jwt_error(e: TokenError) -> ApiError {
    let status = match e {
        TokenError::Expired(_) | TokenError::BadSignature => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::problem(status, "jwt-decode-error", "Invalid token").msg(e.to_string())
}

#[utoipa::path(get, path = "/download-archive", tag = "downloads", summary = "Download the files an archive token names, as zip",
    params(("token" = String, Query, description = "The JWT the manager API minted")),
    responses((status = 200, description = "The zip archive", content_type = "application/zip"), (status = 429, description = "Too many archives at once (Retry-After)"), (status = "4XX", description = "Refused", body = crate::api::error::ProblemDoc, content_type = "application/problem+json")))]
pub async fn download_archive(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ArchiveQuery>,
) -> ApiResult<Response> {
    let token = q
        .token
        .as_deref()
        .ok_or_else(|| ApiError::invalid_param("token", "is required"))?;
    let c: ArchiveClaims = st.tokens.decode(token).map_err(jwt_error)?;
    if c.files.is_empty() {
        return Err(jwt_error(TokenError::Claims(
            "files must not be empty".into(),
        )));
    }
    if let Some(name) = &c.filename {
        check_archive_filename(name).map_err(|e| ApiError::invalid_param("filename", e))?;
    }
    let v = st.volumes.get(&c.volume)?.clone();
    let vf = c.virtual_folder_id;
    if !v.vfolder_exists(&vf).await? {
        return Err(VolumeError::VFolderNotFound(vf).into());
    }
    // Every entry is resolved before the first byte goes out: a bad one fails the request.
    let mut roots = Vec::with_capacity(c.files.len());
    for f in &c.files {
        let path = RelPath::parse(f).map_err(|_| ApiError::subpath_invalid(f))?;
        let stat = match v.stat(&vf, &path).await {
            Ok(s) => s,
            Err(VolumeError::Escapes(_)) => return Err(ApiError::subpath_invalid(f)),
            Err(e) => return Err(not_found_or(e, f)),
        };
        let name = if path.is_root() {
            String::new()
        } else {
            path.as_str().to_string()
        };
        roots.push(Root { path, name, stat });
    }
    let filename = c.filename.unwrap_or_else(|| "archive.zip".to_string());
    let slot = archive_slot(&st, &vf)?;
    let body = archive::zip_body(v, vf, roots, slot);
    Ok(zip_response(body, &filename, false))
}

/// CORS for the download routes. Downloads are authorized by the token in the URL alone, so
/// any origin may read them, but never with credentials: `*` without
/// `Access-Control-Allow-Credentials`, as for uploads. (Echoing the Origin with credentials
/// allowed, as aiohttp_cors does for Backend.AI, would open every response to any site the day
/// the API is fronted by cookie auth.)
pub async fn cors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let has_origin = req.headers().contains_key(header::ORIGIN);
    let preflight_headers = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    let is_preflight = req.method() == Method::OPTIONS;
    let mut resp = if is_preflight {
        StatusCode::OK.into_response()
    } else {
        next.run(req).await
    };
    if has_origin {
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(
                "Content-Disposition, Content-Length, Content-Range, Content-Type, Accept-Ranges, ETag, Last-Modified, Date, Server",
            ),
        );
        if is_preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, HEAD, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                preflight_headers.unwrap_or(HeaderValue::from_static(
                    "Range, If-Range, If-None-Match, If-Modified-Since",
                )),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_disposition_has_ascii_fallback_and_utf8() {
        assert_eq!(
            content_disposition("blob.bin"),
            "attachment;filename=\"blob.bin\"; filename*=UTF-8''blob.bin"
        );
        assert_eq!(
            content_disposition("résumé \"x\".pdf"),
            "attachment;filename=\"rsum \\\"x\\\".pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22x%22.pdf"
        );
        assert!(content_disposition("데이터").starts_with("attachment;filename=\"download\""));
    }

    #[test]
    fn etags_compare() {
        assert!(etag_matches("\"a\", \"b\"", "\"b\"", false));
        assert!(etag_matches("W/\"b\"", "\"b\"", true));
        assert!(!etag_matches("W/\"b\"", "\"b\"", false));
        assert!(etag_matches("*", "\"b\"", false));
    }
}
