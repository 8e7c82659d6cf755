//! `[volume.<name>] mount = { at, fstype, source, options, linger }`: a remote filesystem the
//! node mounts at the volume's path, at startup or on request (the per-user storage proposal's
//! "remote volumes").

use std::time::Duration;

use super::reader::Section;
use toml::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountAt {
    /// Mounted when the daemon starts, and kept.
    Startup,
    /// Mounted when a session or an API call first needs it; unmounted after the last one
    /// plus `linger`.
    Requested,
}

#[derive(Clone)]
pub struct RemoteMount {
    pub at: MountAt,
    /// A kernel filesystem (`cifs`, `nfs`, ...) or `fuse.rclone`.
    pub fstype: String,
    pub source: String,
    /// In the order given: `key` or `key=value`.
    pub options: Vec<(String, Option<String>)>,
    pub linger: Duration,
}

impl std::fmt::Debug for RemoteMount {
    // Options carry passwords and keys: only their names are ever printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteMount")
            .field("at", &self.at)
            .field("fstype", &self.fstype)
            .field("source", &self.source)
            .field(
                "options",
                &self
                    .options
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RemoteMount {
    pub fn is_rclone(&self) -> bool {
        matches!(self.fstype.as_str(), "fuse.rclone" | "rclone")
    }
}

/// Option names whose values are secrets.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "pass", "password", "secret", "key", "token", "sas", "sas-url", "sas_url",
    ]
    .iter()
    .any(|s| k == *s || k.ends_with(&format!("-{s}")) || k.ends_with(&format!("_{s}")))
}

/// cifs options that go into its credentials file (mount.cifs reads `credentials=`).
pub const CIFS_CREDENTIALS: &[&str] = &["username", "user", "password", "pass", "domain", "dom"];

fn parse_options(sec: &Section, v: Option<&Value>) -> Vec<(String, Option<String>)> {
    match v {
        None => Vec::new(),
        Some(Value::String(s)) => s
            .split(',')
            .filter(|o| !o.is_empty())
            .map(|o| match o.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), Some(v.to_string())),
                None => (o.trim().to_string(), None),
            })
            .collect(),
        Some(Value::Table(t)) => t
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Boolean(true) => None,
                    other => Some(other.to_string()),
                };
                (k.clone(), v)
            })
            .collect(),
        Some(_) => {
            sec.problems().push(
                sec.key_path("options"),
                "not a string or table",
                "\"a=b,c\" or { a = \"b\", c = true }",
            );
            Vec::new()
        }
    }
}

/// Reads `mount` of a volume table (None when absent or unusable; problems pushed).
pub fn read(vol: &Section, backend: &str) -> Option<RemoteMount> {
    vol.get("mount")?;
    let sec = vol.section("mount");
    let at = match sec
        .choice("at", &["startup", "requested"], "requested")
        .as_str()
    {
        "startup" => MountAt::Startup,
        _ => MountAt::Requested,
    };
    let fstype = sec.opt_string("fstype");
    let source = sec.opt_string("source");
    let options = parse_options(&sec, sec.get("options"));
    let linger = sec.duration("linger", Duration::from_secs(60));
    sec.finish(&[]);
    let (Some(fstype), Some(source)) = (fstype, source) else {
        vol.problems().push(
            vol.key_path("mount"),
            "without fstype or source",
            "{ at = \"startup\" | \"requested\", fstype = \"cifs\" | \"nfs\" | \"fuse.rclone\" | ..., source = \"...\", options = ... }",
        );
        return None;
    };
    if backend != "vfs" {
        vol.problems().push(
            vol.key_path("mount"),
            format!("on a {backend} volume"),
            "remote mounts for vfs volumes (xfs and btrfs need their quota on a local filesystem)",
        );
        return None;
    }
    let m = RemoteMount {
        at,
        fstype,
        source,
        options,
        linger,
    };
    // Secrets never go on a command line: rclone takes them from its environment, cifs from
    // its credentials file; any other filesystem must be given one of its own.
    if !m.is_rclone() && m.fstype != "cifs" && m.fstype != "smb3" {
        for (k, _) in &m.options {
            if is_secret(k) {
                vol.problems().push(
                    vol.key_path("mount.options"),
                    format!("{k}=... for {}", m.fstype),
                    "no secret in mount options (they would show in process lists): use the filesystem's credentials file option",
                );
            }
        }
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised_by_name() {
        for k in [
            "password",
            "pass",
            "azureblob-key",
            "azureblob-sas-url",
            "s3_secret",
            "token",
        ] {
            assert!(is_secret(k), "{k}");
        }
        for k in ["vers", "username", "dir_mode", "keyfile-path"] {
            assert!(!is_secret(k), "{k}");
        }
    }

    #[test]
    fn debug_shows_no_option_value() {
        let m = RemoteMount {
            at: MountAt::Requested,
            fstype: "cifs".into(),
            source: "//srv/share".into(),
            options: vec![("password".into(), Some("S3cret".into()))],
            linger: Duration::ZERO,
        };
        assert!(!format!("{m:?}").contains("S3cret"));
    }
}
