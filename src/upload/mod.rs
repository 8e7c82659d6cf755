//! Upload sessions: the records behind tus uploads, one writer at a time per upload, durable
//! offsets, crash recovery and expiry. The tus protocol (headers, status codes) lives in
//! `api::client::tus`; the bytes live in the volume's `UploadStaging`.
//!
//! The acknowledged offset is in SQLite and only advances after the staged bytes are synced, so
//! after a crash the staging file is cut back to it and resuming from it is byte-exact. A long
//! PATCH advances it at checkpoints while it runs; a PATCH that completes the upload needs no
//! offset commit at all: its one durable step is the move into place.
//!
//! A token is self-describing, so minting one writes nothing: the record is made from the token
//! the first time a request uses it. Records that promise nothing to a client (a new upload at
//! offset 0, a completed one) are written without an fsync of their own (`State::relaxed`); every
//! acknowledged offset is written with one.

mod concat;
mod lock;

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;

pub use concat::{is_partial_session, partial_id, partial_session};
pub use lock::{LockError, UploadLock, UploadLocks};

use crate::ids::VFolderId;
use crate::state::{State, StateError, now_unix};
use crate::volume::{RelPath, Volume, VolumeError, Volumes};

/// How long the start waits, per upload, to learn from its volume whether an upload whose
/// staging is gone is in place (an object store's HEAD); past it, the upload is dropped as one
/// whose staging was lost.
const IN_PLACE_CHECK: Duration = Duration::from_secs(10);

/// Expired uploads are remembered this long so clients get 410 rather than 404.
const TOMBSTONE_SECS: i64 = 86400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    Active,
    /// Completed and moved into place; remembered until expiry so a resuming client sees the
    /// full offset.
    Done,
    Expired,
    /// Ended by tus termination: kept until expiry so its token cannot start it again.
    Terminated,
    /// A partial upload whose bytes are now part of its final upload (tus concatenation): its
    /// staging data is gone, the record stays until expiry.
    Joined,
}

impl UploadState {
    fn as_str(self) -> &'static str {
        match self {
            UploadState::Active => "active",
            UploadState::Done => "done",
            UploadState::Expired => "expired",
            UploadState::Terminated => "terminated",
            UploadState::Joined => "joined",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "done" => UploadState::Done,
            "expired" => UploadState::Expired,
            "terminated" => UploadState::Terminated,
            "joined" => UploadState::Joined,
            _ => UploadState::Active,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UploadRecord {
    pub session: String,
    pub volume: String,
    pub vfid: VFolderId,
    pub relpath: RelPath,
    pub size: u64,
    pub offset: u64,
    pub state: UploadState,
    pub created_at: i64,
    pub expires_at: i64,
    /// tus concatenation: the role of this upload.
    pub concat: Concat,
}

impl UploadRecord {
    /// Whether staging data of this upload may exist: it is being written, or it is a complete
    /// partial upload waiting for its final upload.
    pub fn holds_staging(&self) -> bool {
        self.state == UploadState::Active
            || (self.state == UploadState::Done && matches!(self.concat, Concat::Partial { .. }))
    }
}

/// What an upload is to tus concatenation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concat {
    /// A plain upload: its bytes go to the token's destination.
    None,
    /// A partial upload of the upload (token session) named: its bytes wait in staging until a
    /// final upload joins them. `at`: where the client declared it starts in the final upload
    /// (`Storage-Agent-Partial-Offset`), if it did; `total`: the upload's length.
    Partial {
        parent: String,
        at: Option<u64>,
        total: u64,
    },
    /// The final upload: the token's destination made of these partials' sessions, in order.
    Final { parts: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("upload record is corrupt: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for UploadError {
    fn from(e: sqlx::Error) -> Self {
        UploadError::State(StateError::Query(e))
    }
}

pub struct Uploads {
    state: State,
    volumes: Volumes,
    pub locks: UploadLocks,
    /// Held while a partial upload is created (tus concatenation): see `api::client::tus`.
    pub partial_creation: tokio::sync::Mutex<()>,
}

fn row_to_record(row: &sqlx::sqlite::SqliteRow) -> Result<UploadRecord, UploadError> {
    let vfid: String = row.get("vfid");
    let relpath: String = row.get("relpath");
    Ok(UploadRecord {
        session: row.get("session"),
        volume: row.get("volume"),
        vfid: VFolderId::parse(&vfid).map_err(|e| UploadError::Corrupt(e.to_string()))?,
        relpath: RelPath::parse(&relpath).map_err(|e| UploadError::Corrupt(e.to_string()))?,
        size: row.get::<i64, _>("size") as u64,
        offset: row.get::<i64, _>("offset") as u64,
        state: UploadState::parse(row.get("state")),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        concat: match (
            row.get::<Option<String>, _>("parent"),
            row.get::<Option<String>, _>("parts"),
        ) {
            (Some(parent), _) => Concat::Partial {
                parent,
                at: row.get::<Option<i64>, _>("partial_at").map(|v| v as u64),
                total: row.get::<Option<i64>, _>("partial_total").unwrap_or(0) as u64,
            },
            (None, Some(parts)) => Concat::Final {
                parts: parts.split_whitespace().map(str::to_string).collect(),
            },
            (None, None) => Concat::None,
        },
    })
}

impl Uploads {
    pub fn new(state: State, volumes: Volumes, stale_after: Duration) -> Arc<Self> {
        Arc::new(Uploads {
            state,
            volumes,
            locks: UploadLocks::new(stale_after),
            partial_creation: tokio::sync::Mutex::new(()),
        })
    }

    pub fn volume(&self, name: &str) -> Result<&Arc<dyn Volume>, VolumeError> {
        self.volumes.get(name)
    }

    /// Records a new upload (from its token) unless it is known already. The staging file is
    /// made by the first write.
    pub async fn ensure(&self, rec: &UploadRecord) -> Result<(), UploadError> {
        sqlx::query(
            r#"INSERT OR IGNORE INTO uploads (session, volume, vfid, relpath, size, "offset", state, created_at, expires_at, parent, partial_at, partial_total, parts)
               VALUES (?, ?, ?, ?, ?, 0, 'active', ?, ?, ?, ?, ?, ?)"#,
        )
        .bind(&rec.session)
        .bind(&rec.volume)
        .bind(rec.vfid.to_string())
        .bind(rec.relpath.as_str())
        .bind(rec.size as i64)
        .bind(rec.created_at)
        .bind(rec.expires_at)
        .bind(rec.concat.parent())
        .bind(rec.concat.partial_of().and_then(|p| p.at).map(|v| v as i64))
        .bind(rec.concat.partial_of().map(|p| p.total as i64))
        .bind(rec.concat.parts())
        .execute(self.state.relaxed())
        .await?;
        Ok(())
    }

    pub async fn get(&self, session: &str) -> Result<Option<UploadRecord>, UploadError> {
        let row = sqlx::query("SELECT * FROM uploads WHERE session = ?")
            .bind(session)
            .fetch_optional(self.state.pool())
            .await?;
        row.as_ref().map(row_to_record).transpose()
    }

    /// Advances the durable offset, but only from the offset the caller wrote at: a second
    /// writer can never move it sideways.
    pub async fn commit_offset(
        &self,
        session: &str,
        from: u64,
        to: u64,
    ) -> Result<bool, UploadError> {
        let r = sqlx::query(
            r#"UPDATE uploads SET "offset" = ? WHERE session = ? AND "offset" = ? AND state = 'active'"#,
        )
        .bind(to as i64)
        .bind(session)
        .bind(from as i64)
        .execute(self.state.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Moves the completed upload to `dst` (synced: the durable step) and remembers it as done
    /// (recording it now if it never was: an upload done in one PATCH). The record needs no
    /// fsync of its own: if a power failure takes it, the file is in place anyway and a client
    /// asking again re-sends what it already sent.
    pub async fn complete(&self, rec: &UploadRecord, dst: &RelPath) -> Result<(), UploadError> {
        let v = self.volumes.get(&rec.volume)?;
        v.staging()
            .finish(&rec.vfid, &rec.session, dst, rec.size)
            .await?;
        self.record_done(rec).await
    }

    /// Remembers an upload that is in place as done (see `complete`).
    pub async fn record_done(&self, rec: &UploadRecord) -> Result<(), UploadError> {
        sqlx::query(
            r#"INSERT INTO uploads (session, volume, vfid, relpath, size, "offset", state, created_at, expires_at)
               VALUES (?, ?, ?, ?, ?, ?, 'done', ?, ?)
               ON CONFLICT(session) DO UPDATE SET state = 'done', "offset" = size WHERE state = 'active'"#,
        )
        .bind(&rec.session)
        .bind(&rec.volume)
        .bind(rec.vfid.to_string())
        .bind(rec.relpath.as_str())
        .bind(rec.size as i64)
        .bind(rec.size as i64)
        .bind(rec.created_at)
        .bind(rec.expires_at)
        .execute(self.state.relaxed())
        .await?;
        Ok(())
    }

    /// Staging data older than `older_than` on every volume, never resumable (see
    /// `UploadStaging::sweep`).
    pub async fn sweep_staging(&self, older_than: std::time::SystemTime) -> usize {
        let mut n = 0;
        for v in self.volumes.iter() {
            match v.staging().sweep(older_than).await {
                Ok(k) => n += k,
                Err(e) => {
                    tracing::warn!(volume = v.name(), error = %e, "cannot sweep upload staging")
                }
            }
        }
        if n > 0 {
            tracing::info!(
                files = n,
                "removed staging data of uploads no token can resume"
            );
        }
        n
    }

    /// tus termination: the staged bytes are gone, and the record stays as a tombstone until
    /// expiry so the token cannot start the upload again.
    pub async fn terminate(&self, rec: &UploadRecord) -> Result<(), UploadError> {
        let v = self.volumes.get(&rec.volume)?;
        v.staging().discard(&rec.vfid, &rec.session).await?;
        self.ensure(rec).await?;
        self.set_state(&rec.session, UploadState::Terminated).await
    }

    async fn set_state(&self, session: &str, st: UploadState) -> Result<(), UploadError> {
        sqlx::query("UPDATE uploads SET state = ? WHERE session = ?")
            .bind(st.as_str())
            .bind(session)
            .execute(self.state.pool())
            .await?;
        Ok(())
    }

    /// After a crash: every active upload's staging file is cut back to its acknowledged offset
    /// (bytes received but never acknowledged are dropped, as the tus client will resend them).
    /// Staging data no upload owns goes first; an upload whose staging is gone because it was
    /// put in place is recorded as done, any other is dropped.
    pub async fn recover(&self) -> Result<(), UploadError> {
        for v in self.volumes.iter() {
            match v.staging().remove_orphans().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    volume = v.name(),
                    files = n,
                    "removed staging data no upload owns"
                ),
                Err(e) => {
                    tracing::warn!(volume = v.name(), error = %e, "cannot look for staging data no upload owns")
                }
            }
        }
        let rows = sqlx::query("SELECT * FROM uploads WHERE state = 'active'")
            .fetch_all(self.state.pool())
            .await?;
        let mut n = 0;
        for row in &rows {
            let rec = match row_to_record(row) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "skipping unreadable upload record");
                    continue;
                }
            };
            // A final upload's staging is its join, which knows from the bytes themselves how
            // far it got: cutting it back to the recorded offset (0) would lose joined partials.
            if matches!(rec.concat, Concat::Final { .. }) {
                continue;
            }
            let Ok(v) = self.volumes.get(&rec.volume) else {
                tracing::warn!(session = %rec.session, volume = %rec.volume, "upload on a volume no longer configured");
                continue;
            };
            let truncated = v
                .staging()
                .truncate(&rec.vfid, &rec.session, rec.offset)
                .await;
            // An object store may hold more than was acknowledged (parts stored before the
            // crash): the upload resumes from there.
            if let Ok(held) = truncated
                && held > rec.offset
            {
                let _ = self.commit_offset(&rec.session, rec.offset, held).await;
            }
            let staging_gone = matches!(&truncated, Err(VolumeError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT));
            let never_written = staging_gone && rec.offset == 0;
            // Put in place before a crash took its done mark (its staging already forgotten):
            // done, where the volume can tell. Bounded: the start waits for it.
            if staging_gone
                && !never_written
                && rec.concat == Concat::None
                && matches!(
                    tokio::time::timeout(
                        IN_PLACE_CHECK,
                        v.staging()
                            .finish(&rec.vfid, &rec.session, &rec.relpath, rec.size)
                    )
                    .await,
                    Ok(Ok(()))
                )
            {
                match self.record_done(&rec).await {
                    Ok(()) => {
                        tracing::info!(session = %rec.session, "upload found in place; recorded as done")
                    }
                    Err(e) => {
                        tracing::warn!(session = %rec.session, error = %e, "upload found in place, not recorded as done")
                    }
                }
                continue;
            }
            if let Err(e) = truncated.as_ref()
                && !never_written
            {
                // Without its staging file the acknowledged bytes are gone: forget the upload so
                // the client starts over instead of resuming into a hole.
                tracing::warn!(session = %rec.session, error = %e, "staging file lost; dropping upload");
                let _ = sqlx::query("DELETE FROM uploads WHERE session = ?")
                    .bind(&rec.session)
                    .execute(self.state.pool())
                    .await;
                continue;
            }
            n += 1;
        }
        if n > 0 {
            tracing::info!(
                uploads = n,
                "upload staging restored to acknowledged offsets"
            );
        }
        Ok(())
    }

    /// Deletes the staging data of expired uploads; forgets them a day later.
    pub async fn reap_expired(&self) -> Result<usize, UploadError> {
        let now = now_unix();
        let rows =
            sqlx::query("SELECT * FROM uploads WHERE state != 'expired' AND expires_at <= ?")
                .bind(now)
                .fetch_all(self.state.pool())
                .await?;
        let mut reaped = 0;
        for row in &rows {
            let Ok(rec) = row_to_record(row) else {
                continue;
            };
            // Never reap an upload someone is writing right now, nor a partial upload while its
            // upload is locked (a final upload may be joining it); the next round will.
            let Ok(_lock) = self.locks.try_lock(&rec.session) else {
                continue;
            };
            let _parent = match rec.concat.parent() {
                Some(p) => match self.locks.try_lock(p) {
                    Ok(l) => Some(l),
                    Err(_) => continue,
                },
                None => None,
            };
            if rec.holds_staging()
                && let Ok(v) = self.volumes.get(&rec.volume)
                && let Err(e) = v.staging().discard(&rec.vfid, &rec.session).await
            {
                tracing::warn!(session = %rec.session, error = %e, "cannot delete expired staging file");
                continue;
            }
            self.set_state(&rec.session, UploadState::Expired).await?;
            reaped += 1;
        }
        sqlx::query("DELETE FROM uploads WHERE expires_at <= ?")
            .bind(now - TOMBSTONE_SECS)
            .execute(self.state.pool())
            .await?;
        if reaped > 0 {
            tracing::info!(uploads = reaped, "expired uploads reaped");
        }
        Ok(reaped)
    }
}

/// A deleted vfolder takes its pending uploads with it.
pub async fn forget_vfolder(state: &State, volume: &dyn Volume, vfid: &VFolderId) {
    let rows = sqlx::query(
        "SELECT session FROM uploads WHERE volume = ? AND vfid = ?
         AND (state = 'active' OR (state = 'done' AND parent IS NOT NULL))",
    )
    .bind(volume.name())
    .bind(vfid.to_string())
    .fetch_all(state.pool())
    .await
    .unwrap_or_default();
    for row in rows {
        let session: String = row.get(0);
        let _ = volume.staging().discard(vfid, &session).await;
    }
    let _ = sqlx::query("DELETE FROM uploads WHERE volume = ? AND vfid = ?")
        .bind(volume.name())
        .bind(vfid.to_string())
        .execute(state.pool())
        .await;
}
