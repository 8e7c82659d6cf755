//! tus `concatenation`: partial uploads (`Upload-Concat: partial`) made under an upload token,
//! each at `upload?token=…&partial=<id>`, and the final upload (`Upload-Concat: final;<urls>`),
//! which is the token's own upload: its partials joined at the token's destination.
//!
//! What is promised:
//! - A partial has no destination of its own: its bytes wait in the volume's staging, where
//!   nothing can download them, until the final upload joins them.
//! - The partials of one token together may hold at most the token's size, and there are at
//!   most `MAX_PARTIALS` of them, so splitting an upload into streams never gets around its
//!   length, the staging bounds of security review 2 (G2) or the quota check, which counts the
//!   whole upload when the partials are created.
//! - The final upload lands at once: the join happens in staging and moves into place like any
//!   completed upload. A join cut off (kill -9, full disk) completes when the final POST is
//!   repeated, as tus clients do on an error.
//! - `concatenation-unfinished` (a final upload named before its partials are done) is not
//!   offered: its only gain is one request's latency, and it would make the final upload a
//!   second writer that has to wait on several others, with its own crash cases. tus-js-client
//!   and tusd's clients send the final upload after their partials anyway.

use super::*;
use crate::upload::{Concat, partial_id, partial_session};

/// Live partial uploads one upload may have. Each holds staging of its own (on object volumes
/// up to two parts in a local buffer, and a multipart upload), so their number is bounded like
/// an upload's length is; no client needs more streams than this to fill a path.
pub(super) const MAX_PARTIALS: usize = 16;

/// What an `Upload-Concat` header asks for.
pub(super) enum UploadConcat {
    Partial,
    /// The partial uploads' ids, in order.
    Final(Vec<String>),
}

fn bad_concat(msg: impl Into<String>) -> ApiError {
    bad_header("upload-concat", msg)
}

/// A partial upload's id as its URL carries it: what `create_partial` makes (32 hex digits).
fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) fn parse(h: &HeaderMap) -> ApiResult<Option<UploadConcat>> {
    let Some(v) = header_str(h, "upload-concat") else {
        return Ok(None);
    };
    let v = v.trim();
    if v == "partial" {
        return Ok(Some(UploadConcat::Partial));
    }
    let Some(urls) = v.strip_prefix("final;") else {
        return Err(bad_concat(format!(
            "expected \"partial\" or \"final;<urls>\", got {v:?}"
        )));
    };
    let mut ids = Vec::new();
    for u in urls.split_whitespace() {
        let query = u.split_once('?').map(|(_, q)| q).unwrap_or("");
        let id = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("partial="))
            .filter(|id| valid_id(id))
            .map(str::to_string)
            .ok_or_else(|| bad_concat(format!("{u:?} is not the URL of a partial upload")))?;
        if ids.contains(&id) {
            return Err(bad_concat(format!("{u:?} is named twice")));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(bad_concat(
            "a final upload names at least one partial upload",
        ));
    }
    Ok(Some(UploadConcat::Final(ids)))
}

/// The partial upload `id` of the token's upload, as recorded (404 when this token made none).
pub(super) async fn partial(st: &AppState, c: &UploadClaims, id: &str) -> ApiResult<UploadRecord> {
    if !valid_id(id) {
        return Err(not_found());
    }
    let rec = st
        .uploads
        .get(&partial_session(&c.session, id))
        .await?
        .ok_or_else(not_found)?;
    usable(&rec, &from_claims(c))?;
    Ok(rec)
}

/// The `Upload-Concat` header a HEAD answers with for `rec`.
pub(super) fn header_of(rec: &UploadRecord, token: &str) -> Option<String> {
    match &rec.concat {
        Concat::None => None,
        Concat::Partial { .. } => Some("partial".into()),
        Concat::Final { parts } => {
            let urls: Vec<String> = parts
                .iter()
                .filter_map(|p| partial_id(&rec.session, p))
                .map(|id| partial_location(token, id))
                .collect();
            Some(format!("final;{}", urls.join(" ")))
        }
    }
}

fn partial_location(token: &str, id: &str) -> String {
    format!("{}&partial={id}", token_location(token))
}

fn refused_on_volume(v: &dyn crate::volume::Volume) -> ApiResult<()> {
    if v.staging().can_concat() {
        return Ok(());
    }
    Err(ApiError::problem(
        StatusCode::NOT_IMPLEMENTED,
        "storage/tus-concatenation-unsupported",
        "Concatenation is not supported here",
    )
    .msg(format!(
        "volume {} ({}) does not take partial uploads yet; upload in one stream",
        v.name(),
        v.backend()
    )))
}

fn conflict(msg: impl Into<String>) -> ApiError {
    ApiError::problem(
        StatusCode::CONFLICT,
        "storage/tus-concatenation-conflict",
        "Upload cannot be concatenated",
    )
    .code("storage-proxy_update_conflict")
    .msg(msg)
}

/// The token's upload may still be made of partials: nothing written to it in one stream, not
/// complete, no other join under way.
fn open_for_partials(rec: &UploadRecord) -> ApiResult<()> {
    match &rec.concat {
        Concat::Final { .. } if rec.state == UploadState::Done => Err(conflict(
            "the upload is complete: its final upload was made already",
        )),
        Concat::Final { .. } => Err(conflict(
            "a final upload of this upload is being joined; repeat its POST to finish it",
        )),
        _ if rec.state == UploadState::Done => Err(conflict("the upload is complete")),
        _ if rec.offset > 0 => Err(conflict(
            "this upload is being written in one stream; resume it instead",
        )),
        _ => Ok(()),
    }
}

/// A partial upload named by a final upload whose join is under way (cut off, to be repeated)
/// cannot be terminated on its own: the repeat would fail for good.
pub(super) async fn check_terminable(
    st: &AppState,
    c: &UploadClaims,
    partial: &UploadRecord,
) -> ApiResult<()> {
    if let Some(parent) = st.uploads.get(&c.session).await?
        && parent.state == UploadState::Active
        && let Concat::Final { parts } = &parent.concat
        && parts.contains(&partial.session)
    {
        return Err(conflict(
            "this partial upload is being joined; repeat the final upload's POST, or terminate \
             the whole upload",
        ));
    }
    Ok(())
}

/// POST with `Upload-Concat: partial`: a new partial upload of the token's upload.
pub(super) async fn create_partial(
    st: &AppState,
    q: &UploadQuery,
    headers: &HeaderMap,
    body: &mut Option<Body>,
    c: &UploadClaims,
    length: u64,
) -> ApiResult<Response> {
    // One creation at a time (they are short: no body is read under it), so each sees the
    // partials before it and together they stay within the limits.
    let creating = st.uploads.partial_creation.lock().await;
    let parent = load(st, c).await?;
    let v = st.uploads.volume(&parent.volume)?.clone();
    refused_on_volume(v.as_ref())?;
    open_for_partials(&parent)?;
    let dst = destination(q, &parent)?;
    check_upload_destination(v.as_ref(), &c.vfid, &dst).await?;
    let others = st.uploads.partials_of(&c.session).await?;
    let live = |p: &&UploadRecord| matches!(p.state, UploadState::Active | UploadState::Done);
    if others.iter().filter(live).count() >= MAX_PARTIALS {
        return Err(bad_concat(format!(
            "an upload takes at most {MAX_PARTIALS} partial uploads at a time (terminate unused \
             ones first)"
        )));
    }
    let claimed: u64 = others.iter().filter(live).map(|p| p.size).sum();
    if claimed.saturating_add(length) > c.size {
        return Err(ApiError::problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "storage/tus-upload-too-large",
            "Partial uploads exceed the upload",
        )
        .msg(format!(
            "the upload is {} bytes; its partial uploads hold {claimed} already, {length} more \
             do not fit (terminate unused partial uploads to free their share)",
            c.size
        )));
    }
    let at = declared_offset(headers, &others, length, c.size)?;
    // The whole upload must fit, not only this stream: what the partials staged so far is
    // counted in the scope's usage already.
    let staged: u64 = others.iter().filter(live).map(offset_of).sum();
    let left = c.size.saturating_sub(staged);
    if left > 0 {
        v.check_space(c.vfid.quota_scope.as_ref(), left).await?;
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let rec = UploadRecord {
        session: partial_session(&c.session, &id),
        size: length,
        concat: Concat::Partial {
            parent: c.session.clone(),
            at,
            total: c.size,
        },
        ..from_claims(c)
    };
    st.uploads.ensure(&rec).await?;
    drop(creating);
    let with_data = header_str(headers, "content-type")
        .is_some_and(|t| t.eq_ignore_ascii_case(OFFSET_OCTET_STREAM));
    let offset = if with_data {
        let expected = expected_checksum(headers)?;
        let announced = parse_u64_header(headers, "content-length")?;
        write_at(st, &rec, dst, 0, announced, expected, body).await?
    } else {
        0
    };
    let mut h = upload_headers(&rec, offset);
    h.remove(header::CACHE_CONTROL);
    put_header(&mut h, "upload-concat", "partial");
    // With the upload's dst_dir, if it has one: its PATCHes then check the same destination
    // the final upload joins at.
    put_header(&mut h, "location", &format!("{}&partial={id}", location(q)));
    Ok((StatusCode::CREATED, h).into_response())
}

/// Where a partial upload starts in the final upload, as its client declares it with
/// `Storage-Agent-Partial-Offset` (our extension; `ctl upload --streams` sends it): an object
/// store may then put its bytes where they belong at once (S3: parts of the destination's
/// multipart upload, no copy at the join). The range must lie within the upload and overlap no
/// other partial's declared range; the final upload must then name the partials in that order.
fn declared_offset(
    headers: &HeaderMap,
    others: &[UploadRecord],
    length: u64,
    size: u64,
) -> ApiResult<Option<u64>> {
    const NAME: &str = "storage-agent-partial-offset";
    let Some(at) = parse_u64_header(headers, NAME)? else {
        return Ok(None);
    };
    if at.saturating_add(length) > size {
        return Err(bad_header(
            NAME,
            format!("{length} bytes at {at} go past the upload's {size}"),
        ));
    }
    for o in others {
        let live = matches!(o.state, UploadState::Active | UploadState::Done);
        if let (true, Some(p)) = (live, o.concat.partial_of().and_then(|p| p.at))
            && at < p + o.size
            && p < at + length
        {
            return Err(conflict(format!(
                "bytes {at}..{} overlap another partial upload's {p}..{}",
                at + length,
                p + o.size
            )));
        }
    }
    Ok(Some(at))
}

/// POST with `Upload-Concat: final;<urls>`: the token's upload, made of the partials named.
pub(super) async fn create_final(
    st: &AppState,
    q: &UploadQuery,
    headers: &HeaderMap,
    c: &UploadClaims,
    ids: Vec<String>,
) -> ApiResult<Response> {
    if let Some(n) = parse_u64_header(headers, "upload-length")?
        && n != c.size
    {
        return Err(bad_header(
            "upload-length",
            "a final upload's length is its partials' (and must equal the token's size)",
        ));
    }
    let fresh = from_claims(c);
    let v = st.uploads.volume(&fresh.volume)?.clone();
    refused_on_volume(v.as_ref())?;
    let dst = destination(q, &fresh)?;
    let _lock = st
        .uploads
        .locks
        .lock(&c.session)
        .await
        .map_err(|_| locked())?;
    let rec = load(st, c).await?;
    let sessions: Vec<String> = ids.iter().map(|i| partial_session(&c.session, i)).collect();
    let fin = UploadRecord {
        concat: Concat::Final {
            parts: sessions.clone(),
        },
        ..rec.clone()
    };
    match &rec.concat {
        // The same final again (a client repeating its POST): done, or a join to finish.
        Concat::Final { parts } if *parts == sessions => {
            if rec.state == UploadState::Done {
                return Ok(created_final(q, &fin));
            }
        }
        _ => {
            open_for_partials(&rec)?;
            let total = check_partials(st, c, &ids, &sessions).await?;
            if total != c.size {
                return Err(bad_concat(format!(
                    "the partial uploads hold {total} bytes; the upload is {} bytes",
                    c.size
                )));
            }
            check_upload_destination(v.as_ref(), &c.vfid, &dst).await?;
            if !st.uploads.begin_final(&fin).await? {
                return Err(conflict(
                    "the upload changed meanwhile; send the request again",
                ));
            }
        }
    }
    if let Err(e) = st.uploads.join(&fin, &dst).await {
        if let crate::upload::UploadError::Volume(VolumeError::BadRequest(_)) = e {
            // Refused before anything was joined (the partials named against the order they
            // declared): the upload is open for another final upload.
            st.uploads.abandon_final(&c.session).await?;
        }
        return Err(match e {
            crate::upload::UploadError::Volume(ref ve) if out_of_room(ve) => {
                insufficient_storage(v.as_ref(), &fin, 0, ve).await
            }
            e => e.into(),
        });
    }
    // Partials made under this token but left out (a client that started over) go now, not
    // at the token's expiry.
    if let Err(e) = st.uploads.terminate_partials(&c.session).await {
        tracing::warn!(session = %c.session, error = %e, "cannot discard unused partial uploads");
    }
    tracing::info!(session = %c.session, size = c.size, parts = ids.len(), dst = %dst, "upload joined from partial uploads");
    Ok(created_final(q, &fin))
}

/// Every partial named exists under this token (404 for the first that does not) and is
/// complete; returns their total length.
async fn check_partials(
    st: &AppState,
    c: &UploadClaims,
    ids: &[String],
    sessions: &[String],
) -> ApiResult<u64> {
    let mut found = Vec::with_capacity(ids.len());
    for (id, s) in ids.iter().zip(sessions) {
        let p = st.uploads.get(s).await?.ok_or_else(|| {
            ApiError::problem(
                StatusCode::NOT_FOUND,
                "storage/tus-session-not-found",
                "Partial upload not found",
            )
            .code("storage-proxy_read_not-found")
            .msg(format!(
                "no partial upload {id} of this upload (partial uploads belong to the token that made them)"
            ))
        })?;
        usable(&p, &from_claims(c))?;
        found.push(p);
    }
    let mut total = 0u64;
    for (id, p) in ids.iter().zip(&found) {
        if p.state != UploadState::Done {
            return Err(bad_concat(format!(
                "partial upload {id} is not finished: {} of {} bytes",
                p.offset, p.size
            )));
        }
        total = total.saturating_add(p.size);
    }
    Ok(total)
}

fn created_final(q: &UploadQuery, fin: &UploadRecord) -> Response {
    let token = q.token.as_deref().unwrap_or("");
    let mut h = upload_headers(fin, fin.size);
    h.remove(header::CACHE_CONTROL);
    if let Some(v) = header_of(fin, token) {
        put_header(&mut h, "upload-concat", &v);
    }
    put_header(&mut h, "location", &location(q));
    (StatusCode::CREATED, h).into_response()
}
