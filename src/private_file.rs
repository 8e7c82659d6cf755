//! Files the daemon writes whole and others must never see half-written or with a wider mode
//! than meant: generated secrets, the SSH host key, the node CA key, and the account and key
//! files bind-mounted into session containers. Each is written to a fresh temporary file created
//! with its final mode, synced, then renamed into place.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Readable by the daemon's user only.
pub fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_with_mode(path, contents, 0o600)
}

pub fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    // A leftover from a crash may carry another mode (or be read-only); start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
