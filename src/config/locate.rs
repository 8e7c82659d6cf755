//! Where the config file is: `--config`, our own names, then where Backend.AI's Python proxy
//! looks; and whether, run as root, the file found may be trusted.

use std::path::{Path, PathBuf};

use super::ConfigError;

/// Where `serve` and `config check` look for the file, in order: `--config`, then
/// `$STORAGE_AGENT_CONFIG`, our own names, then Backend.AI's (`$BACKEND_CONFIG_FILE` and the
/// places the Python proxy looks for `storage-proxy.toml`), so a node's existing file is found.
pub const ENV_CONFIG: &str = "STORAGE_AGENT_CONFIG";
pub const BACKEND_ENV_CONFIG: &str = "BACKEND_CONFIG_FILE";
pub const LOOKUP_PATHS: &[&str] = &[
    "./storage-agent.toml",
    "/etc/backend.ai/storage-agent.toml",
    "./storage-proxy.toml",
    "~/.config/backend.ai/storage-proxy.toml",
    "/etc/backend.ai/storage-proxy.toml",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    /// No file anywhere: one local vfs volume under ./data, state under ./state.
    Embedded,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Embedded => write!(f, "<embedded default>"),
        }
    }
}

/// Finds the config file: `--config`, `$STORAGE_AGENT_CONFIG`, then the lookup paths; none of
/// them existing means the embedded default. An explicitly named file must exist.
pub fn locate(explicit: Option<&Path>) -> Result<ConfigSource, ConfigError> {
    let named = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(ENV_CONFIG).map(PathBuf::from));
    let named = named.or_else(|| {
        // Our own names come before Backend.AI's variable, so an operator can move over.
        let ours = LOOKUP_PATHS[..2].iter().any(|p| Path::new(p).is_file());
        (!ours)
            .then(|| std::env::var_os(BACKEND_ENV_CONFIG).map(PathBuf::from))
            .flatten()
    });
    if let Some(p) = named {
        return if p.is_file() {
            check_trusted(&p)?;
            Ok(ConfigSource::File(p))
        } else {
            Err(ConfigError::Read {
                path: p,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            })
        };
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let found = LOOKUP_PATHS
        .iter()
        .filter_map(|p| match p.strip_prefix("~/") {
            Some(rest) => home.as_ref().map(|h| h.join(rest)),
            None => Some(PathBuf::from(p)),
        })
        .find(|p| p.is_file());
    match found {
        Some(p) => {
            check_trusted(&p)?;
            Ok(ConfigSource::File(p))
        }
        None => Ok(ConfigSource::Embedded),
    }
}

/// Run as root, the daemon and `ctl` take a config only from root, and only one nobody else
/// may change: the file chooses the state directory and where secrets are sent, so a file
/// planted in a shared working directory must not be obeyed.
fn check_trusted(p: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let md = std::fs::metadata(p).map_err(|e| ConfigError::Read {
        path: p.to_path_buf(),
        source: e,
    })?;
    let why = if md.uid() != 0 {
        Some(format!("it belongs to uid {}, not root", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "its mode {:o} lets others change it",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(ConfigError::Read {
            path: p.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "refusing it as root: {why} (chown root and chmod go-w it, or name a trusted file with --config)"
                ),
            ),
        }),
    }
}
