//! What `CreateSession` checks before touching Docker: names, credentials, limits, TTLs, and
//! every mount (the vfolder is the user's, its subpath stays inside, its directory is opened
//! now). Mounts a volume makes for it (FUSE, remote volumes) are counted from here on.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::time::Duration;

use uuid::Uuid;

use super::manager::SessionManager;
use super::{CreateRequest, Kind, Mount, Result, Session, SessionError, SessionSpec, State, creds};
use crate::ids::{QuotaScopeKind, VFolderId};
use crate::state::now_unix;
use crate::tls::Leaf;
use crate::volume::{RelPath, VolumeError};

const MAX_MOUNTS: usize = 32;
const RESERVED_USERS: &[&str] = &["root", "sshd", "nobody", "daemon", "bin", "sys", "admin"];

pub(super) fn invalid(msg: impl Into<String>) -> SessionError {
    SessionError::Invalid(msg.into())
}

fn valid_username(u: &str) -> bool {
    let mut chars = u.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && u.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && !RESERVED_USERS.contains(&u)
}

/// Mount names become directory names in sessions and parts of dufs' auth rules (which use
/// `,`, `:` and `@` as separators): plain characters only.
fn valid_mount_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n != "."
        && n != ".."
        && !n.starts_with('-')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
}

/// What `validate` prepares for `admit` and `start`.
pub(super) struct Prepared {
    pub session: Session,
    pub password: Option<String>,
    pub limit: u32,
    pub leaf: Option<Leaf>,
    /// The checked mount directories, parallel to `session.spec.mounts`.
    pub sources: Vec<OwnedFd>,
}

fn valid_group_name(g: &str) -> bool {
    (1..=64).contains(&g.len())
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl SessionManager {
    /// Checks and opens every mount of a request. Volumes that mount something for it (FUSE)
    /// count `id` as a user from here on; on an error here they are released again.
    async fn resolve_mounts(
        &self,
        req: &CreateRequest,
        user: &str,
        id: Uuid,
    ) -> Result<(Vec<Mount>, Vec<OwnedFd>)> {
        let resolved = self.resolve_mounts_for(req, user, id).await;
        if resolved.is_err() {
            self.release_mounts(id, req.mounts.iter().map(|m| m.volume.as_str()))
                .await;
        }
        resolved
    }

    /// Tells each volume `volumes` that session `id` needs nothing mounted any more.
    pub(super) async fn release_mounts<'a>(
        &self,
        id: Uuid,
        volumes: impl Iterator<Item = &'a str>,
    ) {
        let names: std::collections::BTreeSet<&str> = volumes.collect();
        for name in names {
            if let Ok(v) = self.volumes.get_ungated(name) {
                v.release_mounts(&id.to_string()).await;
            }
        }
    }

    async fn resolve_mounts_for(
        &self,
        req: &CreateRequest,
        user: &str,
        id: Uuid,
    ) -> Result<(Vec<Mount>, Vec<OwnedFd>)> {
        if req.mounts.is_empty() {
            return Err(invalid("at least one mount is required"));
        }
        if req.mounts.len() > MAX_MOUNTS {
            return Err(invalid(format!("at most {MAX_MOUNTS} mounts per session")));
        }
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(req.mounts.len());
        let mut sources = Vec::with_capacity(req.mounts.len());
        for (i, m) in req.mounts.iter().enumerate() {
            let name = RelPath::parse_name(&m.name)
                .map_err(|e| invalid(format!("mounts[{i}].name {:?}: {e}", m.name)))?;
            if !valid_mount_name(&name) {
                return Err(invalid(format!(
                    "mounts[{i}].name {name:?}: letters, digits, ' ', '.', '_' and '-' only"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(format!("duplicate mount name {name:?}")));
            }
            let vol = self.volumes.get(&m.volume).map_err(|e| match e {
                VolumeError::Offline { .. } => SessionError::Unavailable(e.to_string()),
                _ => invalid(format!("mounts[{i}]: unknown volume {:?}", m.volume)),
            })?;
            let vfid =
                VFolderId::parse(&m.vfid).map_err(|e| invalid(format!("mounts[{i}].vfid: {e}")))?;
            // A user's own quota scope, or a project's (the manager checked membership). Another
            // user's private folder is refused here whatever the manager says; a vfid without a
            // quota scope (pre-quota-scope layout) names no owner, so it cannot be checked and
            // is refused too.
            let Some(qs) = &vfid.quota_scope else {
                return Err(invalid(format!(
                    "mounts[{i}]: vfid {vfid} has no quota scope (user:<uuid>/... or project:<uuid>/...), so its owner cannot be checked"
                )));
            };
            if qs.kind == QuotaScopeKind::User && qs.id.to_string() != user {
                return Err(invalid(format!(
                    "mounts[{i}]: vfolder {vfid} belongs to another user"
                )));
            }
            let subpath = RelPath::parse(&m.subpath)
                .map_err(|e| invalid(format!("mounts[{i}].subpath {:?}: {e}", m.subpath)))?;
            let source = vol
                .mount_source(&vfid, &subpath, m.read_only, &id.to_string())
                .await
                .map_err(|e| match e {
                    VolumeError::VFolderNotFound(_) => invalid(format!(
                        "mounts[{i}]: no vfolder {vfid} on volume {}",
                        m.volume
                    )),
                    VolumeError::Escapes(p) => {
                        invalid(format!("mounts[{i}].subpath {p:?} escapes the vfolder"))
                    }
                    VolumeError::Io { path, source } => {
                        invalid(format!("mounts[{i}].subpath {path:?}: {source}"))
                    }
                    VolumeError::ReadOnly(vf) => invalid(format!(
                        "mounts[{i}]: vfolder {vf} is read-only; mount it with read_only"
                    )),
                    e @ VolumeError::Remote { .. } => {
                        SessionError::Unavailable(format!("mounts[{i}]: {e}"))
                    }
                    other => SessionError::Internal(other.to_string()),
                })?;
            out.push(Mount {
                volume: m.volume.clone(),
                vfid,
                name,
                read_only: m.read_only,
                subpath,
                host_path: source.shown,
            });
            sources.push(source.dir);
        }
        Ok((out, sources))
    }

    /// Checks everything that can be checked before touching Docker.
    pub(super) async fn validate(&self, req: &CreateRequest, id: Uuid) -> Result<Prepared> {
        let user = uuid::Uuid::parse_str(&req.user_id)
            .map_err(|_| invalid(format!("user_id {:?} is not a UUID", req.user_id)))?
            .hyphenated()
            .to_string();
        let rg = if req.resource_group.is_empty() {
            self.cfg.resource_group.clone()
        } else {
            req.resource_group.clone()
        };
        if !valid_group_name(&rg) {
            return Err(invalid(format!(
                "resource_group {rg:?} is not a valid name"
            )));
        }
        if req.access_key.len() > 128 || req.access_key.chars().any(char::is_control) {
            return Err(invalid("access_key is not printable or too long"));
        }
        let username = req.username.clone().unwrap_or_else(|| "work".to_string());
        if !valid_username(&username) {
            return Err(invalid(format!(
                "username {username:?}: lowercase letters, digits, '_' and '-', up to 32, not a system account"
            )));
        }
        let public_keys = creds::parse_public_keys(&req.public_keys).map_err(invalid)?;
        match req.kind {
            Kind::Sftp if public_keys.is_empty() && !req.generate_password => {
                return Err(invalid(
                    "no credentials: give public keys and/or ask for a generated password",
                ));
            }
            Kind::Filebrowser if !public_keys.is_empty() => {
                return Err(invalid(
                    "public keys are for SFTP sessions; a file browser session always gets a generated password",
                ));
            }
            _ => {}
        }
        let (d, m) = (self.cfg.default_limits, self.cfg.max_limits);
        let cpus = req.limits.cpus.unwrap_or(d.cpus);
        let memory = req.limits.memory.unwrap_or(d.memory);
        let pids = req.limits.pids.unwrap_or(d.pids);
        if !(0.01..=m.cpus).contains(&cpus) || !cpus.is_finite() {
            return Err(invalid(format!(
                "limits.cpus {cpus} is outside 0.01..{} (the node maximum)",
                m.cpus
            )));
        }
        if !(16 << 20..=m.memory).contains(&memory) {
            return Err(invalid(format!(
                "limits.memory_bytes {memory} is outside 16 MiB..{} (the node maximum)",
                m.memory
            )));
        }
        if !(16..=m.pids).contains(&pids) {
            return Err(invalid(format!(
                "limits.pids {pids} is outside 16..{} (the node maximum)",
                m.pids
            )));
        }
        let ttl = req.ttl.unwrap_or(self.cfg.session_ttl);
        if ttl < Duration::from_secs(10) || ttl > self.cfg.max_session_ttl {
            return Err(invalid(format!(
                "ttl {}s is outside 10s..{}s",
                ttl.as_secs(),
                self.cfg.max_session_ttl.as_secs()
            )));
        }
        let idle = req.idle_timeout.unwrap_or(self.cfg.idle_timeout);
        // 0 turns idle reaping off; anything else is bounded by the longest session (a huge
        // value would wrap negative where it is compared, and end the session at once).
        if idle > self.cfg.max_session_ttl {
            return Err(invalid(format!(
                "idle_timeout {}s is above the longest session, {}s (0 turns idle reaping off)",
                idle.as_secs(),
                self.cfg.max_session_ttl.as_secs()
            )));
        }
        let limit = req
            .max_sessions_per_user
            .unwrap_or(self.cfg.max_sessions_per_user);
        let (mounts, sources) = self.resolve_mounts(req, &user, id).await?;
        // A file browser always logs in with a password.
        let password =
            (req.generate_password || req.kind == Kind::Filebrowser).then(creds::generate_password);
        let leaf = match req.kind {
            Kind::Filebrowser => match self.certs.leaf(ttl + Duration::from_secs(3600)) {
                Ok(l) => Some(l),
                Err(e) => {
                    self.release_mounts(id, mounts.iter().map(|m| m.volume.as_str()))
                        .await;
                    return Err(SessionError::Internal(e.to_string()));
                }
            },
            Kind::Sftp => None,
        };
        let now = now_unix();
        let session = Session {
            id,
            kind: req.kind,
            user_id: user,
            access_key: req.access_key.clone(),
            resource_group: rg,
            username,
            spec: SessionSpec {
                mounts,
                public_keys,
                password_auth: password.is_some(),
                cpus,
                memory,
                pids,
                idle_timeout_secs: idle.as_secs(),
                tls_cert_fingerprint: leaf.as_ref().map(|l| l.fingerprint.clone()),
                engine: (req.kind == Kind::Filebrowser).then(|| self.engine.as_str().to_string()),
                user_limit: limit,
            },
            state: State::Starting,
            reason: None,
            container_id: None,
            port: None,
            created_at: now,
            expires_at: now + ttl.as_secs() as i64,
        };
        Ok(Prepared {
            session,
            password,
            limit,
            leaf,
            sources,
        })
    }
}
