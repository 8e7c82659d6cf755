//! Session rows in SQLite: the source of truth for what counts against capacity and limits.

use sqlx::Row;
use uuid::Uuid;

use super::{Filter, Kind, Result, Session, SessionError, SessionSpec, State};
use crate::state::{State as Db, now_unix};

fn row_to_session(row: &sqlx::sqlite::SqliteRow) -> Result<Session> {
    let id: String = row.get("id");
    let spec: String = row.get("spec");
    let kind: String = row.get("kind");
    Ok(Session {
        id: Uuid::parse_str(&id)
            .map_err(|e| SessionError::Internal(format!("session id {id}: {e}")))?,
        kind: Kind::parse(&kind)
            .ok_or_else(|| SessionError::Internal(format!("session {id}: kind {kind}")))?,
        user_id: row.get("user_id"),
        access_key: row.get("access_key"),
        resource_group: row.get("resource_group"),
        username: row.get("username"),
        spec: serde_json::from_str::<SessionSpec>(&spec)
            .map_err(|e| SessionError::Internal(format!("session {id} spec: {e}")))?,
        state: State::parse(row.get("state")),
        reason: row.get("reason"),
        container_id: row.get("container_id"),
        port: row.get::<Option<i64>, _>("port").map(|p| p as u16),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
    })
}

pub async fn insert(db: &Db, s: &Session) -> Result<()> {
    let spec = serde_json::to_string(&s.spec).map_err(|e| SessionError::Internal(e.to_string()))?;
    sqlx::query(
        "INSERT INTO sessions (id, kind, user_id, access_key, resource_group, username, spec, state, reason, container_id, port, created_at, expires_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(s.id.to_string())
    .bind(s.kind.as_str())
    .bind(&s.user_id)
    .bind(&s.access_key)
    .bind(&s.resource_group)
    .bind(&s.username)
    .bind(spec)
    .bind(s.state.as_str())
    .bind(&s.reason)
    .bind(&s.container_id)
    .bind(s.port.map(i64::from))
    .bind(s.created_at)
    .bind(s.expires_at)
    .bind(now_unix())
    .execute(db.pool())
    .await?;
    Ok(())
}

pub async fn get(db: &Db, id: Uuid) -> Result<Option<Session>> {
    let row = sqlx::query("SELECT * FROM sessions WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?;
    row.as_ref().map(row_to_session).transpose()
}

pub async fn list(db: &Db, f: &Filter) -> Result<Vec<Session>> {
    let rows = sqlx::query(
        "SELECT * FROM sessions
         WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR kind = ?2) AND (?3 IS NULL OR state = ?3)
         ORDER BY created_at DESC, id",
    )
    .bind(f.user_id.as_deref())
    .bind(f.kind.map(Kind::as_str))
    .bind(f.state.map(State::as_str))
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(row_to_session).collect()
}

pub async fn live(db: &Db) -> Result<Vec<Session>> {
    let rows =
        sqlx::query("SELECT * FROM sessions WHERE state IN ('starting', 'running', 'terminating')")
            .fetch_all(db.pool())
            .await?;
    rows.iter().map(row_to_session).collect()
}

/// Moves a session to `state`; only from one of `from` (so a destroy and a crash report cannot
/// overwrite each other). Returns whether it moved.
pub async fn transition(
    db: &Db,
    id: Uuid,
    from: &[State],
    to: State,
    reason: Option<&str>,
) -> Result<bool> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let placeholders = vec!["?"; from.len()].join(", ");
    let sql = format!(
        "UPDATE sessions SET state = ?, reason = COALESCE(?, reason), updated_at = ? WHERE id = ? AND state IN ({placeholders})"
    );
    // Only "?" placeholders are interpolated; values are bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(to.as_str())
        .bind(reason)
        .bind(now_unix())
        .bind(id.to_string());
    for s in from {
        q = q.bind(s);
    }
    Ok(q.execute(db.pool()).await?.rows_affected() == 1)
}

/// Moves a starting session to another port; false if it is no longer starting (destroyed
/// meanwhile).
pub async fn set_port(db: &Db, id: Uuid, port: u16) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE sessions SET port = ?, updated_at = ? WHERE id = ? AND state = 'starting'",
    )
    .bind(i64::from(port))
    .bind(now_unix())
    .bind(id.to_string())
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn set_container(db: &Db, id: Uuid, container: &str) -> Result<()> {
    sqlx::query("UPDATE sessions SET container_id = ?, updated_at = ? WHERE id = ?")
        .bind(container)
        .bind(now_unix())
        .bind(id.to_string())
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Forgets sessions that ended (terminated or failed) before `before`: GetSession and
/// ListSessions answer for them until then, and the state database stays bounded (the soak
/// creates a thousand sessions an hour, and nothing else ever deleted their rows).
pub async fn forget_ended(db: &Db, before: i64) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM sessions WHERE state IN ('terminated', 'failed') AND updated_at < ?",
    )
    .bind(before)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected())
}
