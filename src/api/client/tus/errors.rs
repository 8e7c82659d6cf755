//! The tus protocol's error answers, one table.

use super::*;

pub(super) fn not_found() -> ApiError {
    ApiError::problem(
        StatusCode::NOT_FOUND,
        "storage/tus-session-not-found",
        "TUS session not found",
    )
    .code("storage-proxy_read_not-found")
    .msg("no such upload session (completed uploads are kept until they expire)")
}

pub(super) fn gone(expired_at: i64) -> ApiError {
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

pub(super) fn offset_mismatch(expected: u64, got: u64) -> ApiError {
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

pub(super) fn locked() -> ApiError {
    ApiError::problem(
        StatusCode::LOCKED,
        "storage/tus-upload-locked",
        "Upload locked",
    )
    .code("storage-proxy_update_conflict")
    .msg("another request is still writing to this upload; retry shortly")
}

pub(super) fn too_large(size: u64) -> ApiError {
    ApiError::problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "storage/tus-upload-too-large",
        "Upload exceeds its length",
    )
    .msg(format!(
        "the upload is {size} bytes long; nothing past that is accepted"
    ))
}

pub(super) fn checksum_mismatch() -> ApiError {
    ApiError::problem(
        StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
        "storage/tus-checksum-mismatch",
        "Checksum Mismatch",
    )
    .msg("Upload-Checksum does not match the body; the chunk was discarded")
}

pub(super) fn bad_header(name: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid_param(name, msg)
}

/// Whether a volume error is a filesystem out of room (the disk, or a quota).
pub(super) fn out_of_room(e: &VolumeError) -> bool {
    matches!(e, VolumeError::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
}

/// 507 for a write that ran out of room, saying which: the scope's quota or the disk. btrfs
/// answers EDQUOT for a quota; XFS answers ENOSPC for both, so with a limit set and room left on
/// the volume it was the quota. The durable offset is intact either way.
pub(super) async fn insufficient_storage(
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
    let refused_by_quota = matches!(e, VolumeError::SpaceExceeded { limit: Some(_), .. });
    let over_quota =
        errno == Some(libc::EDQUOT) || refused_by_quota || (limited && disk_has_room().await);
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
