//! The write path of a PATCH: one writer per upload (the lock), the body guarded (size,
//! checksum, idle, take-over, shutdown), staged by the volume with checkpoints committed as they
//! become durable, and what is durable acknowledged however the body ends.

use super::*;

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
    if let Concat::Final { .. } = rec.concat {
        return Err(ApiError::problem(
            StatusCode::FORBIDDEN,
            "storage/tus-final-upload",
            "A final upload cannot be modified",
        )
        .msg("this upload is made of partial uploads; PATCH those (or repeat the final POST)"));
    }
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
    // An upload being made of partials is not also written in one stream (its staging would
    // double, and the partials would wait for nothing).
    if rec.concat == Concat::None
        && rec.offset == 0
        && st.uploads.has_live_partials(&rec.session).await?
    {
        return Err(ApiError::problem(
            StatusCode::CONFLICT,
            "storage/tus-concatenation-conflict",
            "Upload is made of partial uploads",
        )
        .code("storage-proxy_update_conflict")
        .msg("this upload has partial uploads; PATCH those, or terminate them first"));
    }
    checked?;
    // What is left of the upload must still fit the scope's quota (others may have filled it
    // since the token was minted): refused before a byte of this body is written, rather than
    // left to the filesystem, whose enforcement can come late (CephFS stops a writer some
    // megabytes past the limit).
    let left = rec.size - rec.offset;
    if left > 0
        && let Err(e @ VolumeError::SpaceExceeded { .. }) =
            v.check_quota(rec.vfid.quota_scope.as_ref(), left).await
    {
        return Err(insufficient_storage(v.as_ref(), &rec, rec.offset, &e).await);
    }
    if rec.offset == rec.size && rec.size > 0 {
        // Everything is staged but the move into place failed before; try again. (An empty
        // upload takes the write path: its staging file is made by its one, empty, PATCH.)
        complete(st, &rec, dst).await?;
        return Ok(Precheck::Done(rec.size));
    }
    Ok(Precheck::Write(Box::new(rec), recorded, v))
}

/// Reads and drops what is left of an over-long body (bounded), so the client finishes sending
/// and reads our 413 instead of a reset connection.
pub(super) async fn drain(inner: &mut axum::body::BodyDataStream) {
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
pub(super) async fn write_at(
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
        st.metrics.patches_in_flight.inc();
        let r = write_locked(&st, lock, &loaded, dst, offset, announced, expected, body).await;
        st.metrics.patches_in_flight.dec();
        r
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
    if expected.is_some()
        && let Some(max) = v.staging().max_atomic_write()
        && announced.is_some_and(|n| n > max)
    {
        drain(&mut body.into_data_stream()).await;
        return Err(VolumeError::AtomicTooLarge {
            limit: max,
            why: "this volume holds a checksummed body back until it is verified; send \
                  checksummed PATCHes no longer than that",
        }
        .into());
    }
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
                // write. A partial upload stays in staging until its final upload joins it.
                finish_to: (expected.is_none() && rec.concat == Concat::None).then(|| dst.clone()),
                atomic: expected.is_some(),
                partial: rec.concat.partial_of(),
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
            return Err(if out_of_room(&e) {
                insufficient_storage(v.as_ref(), &rec, held, &e).await
            } else {
                e.into()
            });
        }
    };
    let new_offset = offset + staged.written;
    st.metrics.upload_bytes.inc_by(staged.written);
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
            // The file is in place, durably: that is the promise of the 204. The done record
            // (not synced: a relaxed write) still goes first, so a HEAD right after the 204
            // already answers the full offset.
            if let Err(e) = st.uploads.record_done(&rec).await {
                tracing::warn!(session = %rec.session, error = %e, "cannot record a completed upload");
            }
        } else {
            complete(st, &rec, &dst).await?;
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

/// A completely staged upload is done: moved into place, or, for a partial upload, kept in
/// staging (synced by the write) for its final upload.
async fn complete(st: &AppState, rec: &UploadRecord, dst: &RelPath) -> ApiResult<()> {
    match rec.concat {
        Concat::Partial { .. } => {
            // Done first: a crash while sealing then leaves a done partial whose join does the
            // rest, never one that looks complete but is not done.
            st.uploads.record_done(rec).await?;
            // What the join can be spared is done now, while the other streams still run; if
            // it fails, the join does it.
            let v = st.uploads.volume(&rec.volume)?;
            if let Err(e) = v.staging().seal(&rec.vfid, &rec.session).await {
                tracing::warn!(session = %rec.session, error = %e, "cannot seal a partial upload; its join will");
            }
        }
        _ => match st.uploads.complete(rec, dst).await {
            // The move into place can need room of its own (a directory's new block): a 507
            // like any write's, the upload whole and resumable, not a bare OS error.
            Err(UploadError::Volume(e)) if out_of_room(&e) => {
                let v = st.uploads.volume(&rec.volume)?;
                return Err(insufficient_storage(v.as_ref(), rec, rec.offset, &e).await);
            }
            r => r?,
        },
    }
    Ok(())
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
