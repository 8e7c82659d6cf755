//! Which bucket and prefix each vfolder of an object-store volume is, whether it is ours or
//! registered, its usage counters, and the quota scopes with their limits (SQLite).

use sqlx::Row;

use crate::ids::{QuotaScopeId, VFolderId};
use crate::state::State;
use crate::volume::{Result, TreeUsage, VolumeError};

#[derive(Debug, Clone)]
pub struct Entry {
    pub bucket: String,
    /// "" or ending with "/".
    pub prefix: String,
    pub registered: bool,
    pub read_only: bool,
    pub objects: u64,
    pub bytes: u64,
    pub scanned_at: Option<i64>,
}

#[derive(Clone)]
pub struct Registry {
    volume: String,
    state: State,
}

fn db(e: sqlx::Error) -> VolumeError {
    VolumeError::Internal(format!("state database: {e}"))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Registry {
    pub fn new(volume: &str, state: State) -> Self {
        Registry {
            volume: volume.to_string(),
            state,
        }
    }

    pub async fn get(&self, vf: &VFolderId) -> Result<Option<Entry>> {
        let row = sqlx::query(
            "SELECT bucket, prefix, registered, read_only, objects, bytes, scanned_at
             FROM object_vfolders WHERE volume = ? AND vfid = ?",
        )
        .bind(&self.volume)
        .bind(vf.to_string())
        .fetch_optional(self.state.pool())
        .await
        .map_err(db)?;
        Ok(row.map(|r| Entry {
            bucket: r.get(0),
            prefix: r.get(1),
            registered: r.get::<i64, _>(2) != 0,
            read_only: r.get::<i64, _>(3) != 0,
            objects: r.get::<i64, _>(4).max(0) as u64,
            bytes: r.get::<i64, _>(5).max(0) as u64,
            scanned_at: r.get(6),
        }))
    }

    /// Records a vfolder; an existing one is `VFolderExists`.
    pub async fn insert(&self, vf: &VFolderId, e: &Entry) -> Result<()> {
        let r = sqlx::query(
            "INSERT OR IGNORE INTO object_vfolders
             (volume, vfid, bucket, prefix, registered, read_only, objects, bytes, scanned_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&self.volume)
        .bind(vf.to_string())
        .bind(&e.bucket)
        .bind(&e.prefix)
        .bind(e.registered as i64)
        .bind(e.read_only as i64)
        .bind(e.objects as i64)
        .bind(e.bytes as i64)
        .bind(e.scanned_at)
        .bind(now())
        .execute(self.state.pool())
        .await
        .map_err(db)?;
        if r.rows_affected() == 0 {
            return Err(VolumeError::VFolderExists(*vf));
        }
        Ok(())
    }

    /// The prefixes at which vfolders of any volume on this node hold `bucket` (a bucket name
    /// can be reached from several volumes on one endpoint).
    pub async fn prefixes_in(&self, bucket: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT prefix FROM object_vfolders WHERE bucket = ?")
            .bind(bucket)
            .fetch_all(self.state.pool())
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn remove(&self, vf: &VFolderId) -> Result<()> {
        sqlx::query("DELETE FROM object_vfolders WHERE volume = ? AND vfid = ?")
            .bind(&self.volume)
            .bind(vf.to_string())
            .execute(self.state.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Our own writes: `objects` and `bytes` change by these amounts (never below zero).
    pub async fn add(&self, vf: &VFolderId, objects: i64, bytes: i64) -> Result<()> {
        sqlx::query(
            "UPDATE object_vfolders SET objects = MAX(0, objects + ?), bytes = MAX(0, bytes + ?)
             WHERE volume = ? AND vfid = ?",
        )
        .bind(objects)
        .bind(bytes)
        .bind(&self.volume)
        .bind(vf.to_string())
        .execute(self.state.relaxed())
        .await
        .map_err(db)?;
        Ok(())
    }

    /// A recount's result.
    pub async fn set_counts(&self, vf: &VFolderId, u: TreeUsage) -> Result<()> {
        sqlx::query(
            "UPDATE object_vfolders SET objects = ?, bytes = ?, scanned_at = ?
             WHERE volume = ? AND vfid = ?",
        )
        .bind(u.file_count as i64)
        .bind(u.used_bytes as i64)
        .bind(now())
        .bind(&self.volume)
        .bind(vf.to_string())
        .execute(self.state.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Vfolders not recounted since `before` (unix seconds).
    pub async fn stale(&self, before: i64) -> Result<Vec<VFolderId>> {
        self.ids(
            "SELECT vfid FROM object_vfolders WHERE volume = ?
             AND (scanned_at IS NULL OR scanned_at < ?)",
            Some(before),
            |s| VFolderId::parse(s).ok(),
        )
        .await
    }

    /// Every vfolder recorded on this volume.
    pub async fn all(&self) -> Result<Vec<VFolderId>> {
        let sql = "SELECT vfid FROM object_vfolders WHERE volume = ?";
        self.ids(sql, None, |s| VFolderId::parse(s).ok()).await
    }

    pub async fn scopes(&self) -> Result<Vec<QuotaScopeId>> {
        let sql = "SELECT qsid FROM object_quota_scopes WHERE volume = ?";
        self.ids(sql, None, |s| QuotaScopeId::parse(s).ok()).await
    }

    /// The ids a one-column query of this volume's rows (and an optional second parameter)
    /// returns; rows that don't parse are skipped.
    async fn ids<T>(
        &self,
        sql: &'static str,
        param: Option<i64>,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>> {
        let mut q = sqlx::query(sql).bind(&self.volume);
        if let Some(p) = param {
            q = q.bind(p);
        }
        let rows = q.fetch_all(self.state.pool()).await.map_err(db)?;
        Ok(rows
            .iter()
            .filter_map(|r| parse(&r.get::<String, _>(0)))
            .collect())
    }

    // ---- quota scopes ----------------------------------------------------------------------

    /// Creates a scope; an existing one is `QuotaScopeExists`.
    pub async fn create_scope(&self, qs: &QuotaScopeId, limit: Option<u64>) -> Result<()> {
        let r = sqlx::query(
            "INSERT OR IGNORE INTO object_quota_scopes (volume, qsid, limit_bytes) VALUES (?, ?, ?)",
        )
        .bind(&self.volume)
        .bind(qs.to_string())
        .bind(limit.map(|l| l as i64))
        .execute(self.state.pool())
        .await
        .map_err(db)?;
        if r.rows_affected() == 0 {
            return Err(VolumeError::QuotaScopeExists(*qs));
        }
        Ok(())
    }

    /// `Some(limit)` for an existing scope.
    pub async fn scope(&self, qs: &QuotaScopeId) -> Result<Option<Option<u64>>> {
        let row = sqlx::query(
            "SELECT limit_bytes FROM object_quota_scopes WHERE volume = ? AND qsid = ?",
        )
        .bind(&self.volume)
        .bind(qs.to_string())
        .fetch_optional(self.state.pool())
        .await
        .map_err(db)?;
        Ok(row.map(|r| r.get::<Option<i64>, _>(0).map(|l| l.max(0) as u64)))
    }

    pub async fn set_limit(&self, qs: &QuotaScopeId, limit: Option<u64>) -> Result<()> {
        let r = sqlx::query(
            "UPDATE object_quota_scopes SET limit_bytes = ? WHERE volume = ? AND qsid = ?",
        )
        .bind(limit.map(|l| l as i64))
        .bind(&self.volume)
        .bind(qs.to_string())
        .execute(self.state.pool())
        .await
        .map_err(db)?;
        if r.rows_affected() == 0 {
            return Err(VolumeError::QuotaScopeNotFound(*qs));
        }
        Ok(())
    }

    /// Bytes and vfolders counted in a scope.
    pub async fn scope_usage(&self, qs: &QuotaScopeId) -> Result<(u64, u64)> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM object_vfolders
             WHERE volume = ? AND vfid LIKE ?",
        )
        .bind(&self.volume)
        .bind(format!("{qs}/%"))
        .fetch_one(self.state.pool())
        .await
        .map_err(db)?;
        Ok((
            row.get::<i64, _>(0).max(0) as u64,
            row.get::<i64, _>(1).max(0) as u64,
        ))
    }

    pub async fn delete_scope(&self, qs: &QuotaScopeId) -> Result<()> {
        let (_, vfolders) = self.scope_usage(qs).await?;
        if vfolders > 0 {
            return Err(VolumeError::QuotaScopeNotEmpty(*qs));
        }
        let r = sqlx::query("DELETE FROM object_quota_scopes WHERE volume = ? AND qsid = ?")
            .bind(&self.volume)
            .bind(qs.to_string())
            .execute(self.state.pool())
            .await
            .map_err(db)?;
        if r.rows_affected() == 0 {
            return Err(VolumeError::QuotaScopeNotFound(*qs));
        }
        Ok(())
    }

    /// Bytes counted over the whole volume (what `/folder/fs-usage` reports as used).
    pub async fn total_bytes(&self) -> Result<u64> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(bytes), 0) FROM object_vfolders WHERE volume = ? AND registered = 0",
        )
        .bind(&self.volume)
        .fetch_one(self.state.pool())
        .await
        .map_err(db)?;
        Ok(row.get::<i64, _>(0).max(0) as u64)
    }
}
