//! tus concatenation's records: partial uploads belong to the upload their token describes (the
//! parent); the final upload is that same upload, listing its partials. Joining the partials'
//! staged bytes into the destination is the volume's (`UploadStaging::concat`).

use super::*;

impl Concat {
    pub fn parent(&self) -> Option<&str> {
        match self {
            Concat::Partial { parent, .. } => Some(parent),
            _ => None,
        }
    }

    /// What a volume's staging needs to know of a partial upload.
    pub fn partial_of(&self) -> Option<crate::volume::PartialOf> {
        match self {
            Concat::Partial { parent, at, total } => Some(crate::volume::PartialOf {
                parent: parent.clone(),
                at: *at,
                total: *total,
            }),
            _ => None,
        }
    }

    /// The final upload's partials as stored: sessions separated by spaces.
    pub fn parts(&self) -> Option<String> {
        match self {
            Concat::Final { parts } => Some(parts.join(" ")),
            _ => None,
        }
    }
}

/// A partial upload's session: its parent's, then its own id. Never `parent.` (object volumes
/// name their part buffers `<session>.<offset>`).
pub fn partial_session(parent: &str, id: &str) -> String {
    format!("{parent}-{id}")
}

/// Whether a staging session is a partial upload's (its parent's session, '-', its id).
pub fn is_partial_session(session: &str) -> bool {
    session.contains('-')
}

/// The id a partial upload's URL carries.
pub fn partial_id<'a>(parent: &str, session: &'a str) -> Option<&'a str> {
    session
        .strip_prefix(parent)
        .and_then(|s| s.strip_prefix('-'))
}

impl Uploads {
    /// Every partial upload made under `parent`, whatever its state.
    pub async fn partials_of(&self, parent: &str) -> Result<Vec<UploadRecord>, UploadError> {
        let rows = sqlx::query("SELECT * FROM uploads WHERE parent = ? ORDER BY created_at")
            .bind(parent)
            .fetch_all(self.state.pool())
            .await?;
        rows.iter().map(row_to_record).collect()
    }

    /// Whether `parent` has partial uploads that are not terminated, joined or expired.
    pub async fn has_live_partials(&self, parent: &str) -> Result<bool, UploadError> {
        let row = sqlx::query(
            "SELECT 1 FROM uploads WHERE parent = ? AND state IN ('active', 'done') LIMIT 1",
        )
        .bind(parent)
        .fetch_optional(self.state.pool())
        .await?;
        Ok(row.is_some())
    }

    /// Records `rec` as the final upload of its partials (before the join starts, so a crash
    /// mid-join is known as one). Only an upload nothing was written to can become one.
    pub async fn begin_final(&self, rec: &UploadRecord) -> Result<bool, UploadError> {
        self.ensure(rec).await?;
        let r = sqlx::query(
            r#"UPDATE uploads SET parts = ? WHERE session = ? AND state = 'active' AND "offset" = 0"#,
        )
        .bind(rec.concat.parts())
        .bind(&rec.session)
        .execute(self.state.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Forgets that `session` is a final upload, whose join was refused before it began.
    pub async fn abandon_final(&self, session: &str) -> Result<(), UploadError> {
        sqlx::query("UPDATE uploads SET parts = NULL WHERE session = ? AND state = 'active'")
            .bind(session)
            .execute(self.state.pool())
            .await?;
        Ok(())
    }

    /// Joins the final upload's partials into `dst` (the volume's durable step), then remembers
    /// the upload as done and its partials as joined. Safe to repeat after a crash at any point:
    /// the volume's join picks up where it stopped.
    pub async fn join(&self, rec: &UploadRecord, dst: &RelPath) -> Result<(), UploadError> {
        let Concat::Final { parts } = &rec.concat else {
            return Err(UploadError::Corrupt(format!(
                "upload {} is not a final upload",
                rec.session
            )));
        };
        let mut sized = Vec::with_capacity(parts.len());
        for p in parts {
            let part = self
                .get(p)
                .await?
                .ok_or_else(|| UploadError::Corrupt(format!("partial upload {p} is gone")))?;
            sized.push((part.session, part.size));
        }
        let v = self.volumes.get(&rec.volume)?;
        v.staging()
            .concat(&rec.vfid, &rec.session, &sized, dst)
            .await?;
        self.record_done(rec).await?;
        for p in parts {
            self.set_state(p, UploadState::Joined).await?;
        }
        Ok(())
    }

    /// Terminates the partial uploads of `parent` that are not joined yet (their staged bytes
    /// go): the parent was terminated, or its final upload replaced them.
    pub async fn terminate_partials(&self, parent: &str) -> Result<(), UploadError> {
        for p in self.partials_of(parent).await? {
            if p.state == UploadState::Active || p.state == UploadState::Done {
                self.terminate(&p).await?;
            }
        }
        Ok(())
    }
}
