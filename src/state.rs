//! The daemon's own state: one SQLite database under `[storage-agent] state-dir`, in WAL mode with
//! a busy timeout. Each domain module (bgtask, upload, session) owns its queries; this module only
//! opens the pool and runs the migrations in `migrations/`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("state database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("state database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("state database: {0}")]
    Query(#[from] sqlx::Error),
}

#[derive(Clone)]
pub struct State {
    pool: SqlitePool,
    relaxed: SqlitePool,
}

/// The state directory and what the daemon keeps there (session rows with user ids and keys,
/// upload records, secrets, the CA key) are for the daemon's user only: directories 0700, files
/// 0600. Wider modes found at start are narrowed, with a warning.
pub fn secure_state_dir(state_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)?;
    let narrow = |p: &Path, mode: u32| -> std::io::Result<()> {
        let meta = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let have = meta.permissions().mode() & 0o777;
        if have & !mode != 0 {
            tracing::warn!(
                path = %p.display(),
                mode = format!("{have:o}"),
                "narrowing the permissions of daemon state (was readable by others)"
            );
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    };
    narrow(state_dir, 0o700)?;
    for f in [
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "secrets.toml",
        "tls/ca.key",
        "tls/sessions-ca.key",
    ] {
        narrow(&state_dir.join(f), 0o600)?;
    }
    Ok(())
}

impl State {
    pub async fn open(state_dir: &Path) -> Result<Self, StateError> {
        let dir_err = |e| StateError::Dir {
            path: state_dir.display().to_string(),
            source: e,
        };
        secure_state_dir(state_dir).map_err(dir_err)?;
        let path = state_dir.join("state.db");
        // SQLite gives the -wal and -shm files the mode of the database file: create it 0600.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(dir_err)?;
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| StateError::Open {
                path: path.display().to_string(),
                source: e,
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // An acknowledged upload offset must survive power loss, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let open_err = |e| StateError::Open {
            path: path.display().to_string(),
            source: e,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        // Same database, commits without an fsync of their own: durable against a crash of the
        // process (WAL in the page cache), not against power loss until the next synchronous
        // commit. For records whose loss on power failure costs nothing that was promised.
        let relaxed = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.synchronous(SqliteSynchronous::Normal))
            .await
            .map_err(open_err)?;
        Ok(State { pool, relaxed })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Commits without their own fsync (see `open`): use only where losing the write to a
    /// power failure breaks no promise made to a client.
    pub fn relaxed(&self) -> &SqlitePool {
        &self.relaxed
    }

    /// A cheap round trip for health checks.
    pub async fn ping(&self) -> Result<(), StateError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
