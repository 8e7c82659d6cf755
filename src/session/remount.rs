//! Makes a session's mount read-only, or writable again, inside its running container.
//!
//! An object-store vfolder past its quota is made read-only in the sessions that write to it
//! (security review 2, G7). A mount's flags can only be changed from inside its mount namespace,
//! and setns(2) into a mount namespace needs a single-threaded caller, which the daemon is not:
//! so the daemon runs itself (`storage-agent remount-in-container`, a hidden command) for each
//! change. The child enters the container's namespace and root, then remounts the one mount
//! point; nothing in the container is executed.
//!
//! A mount with a file open for writing cannot be made read-only (EBUSY): the change is then
//! retried at the next check, once the write is over.

use std::time::Duration;

use nix::mount::MsFlags;

/// How long the helper process may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// The per-mount options kept across the change, besides `ro`/`rw` which is what changes.
const KEPT: &[(&str, MsFlags)] = &[
    ("nosuid", MsFlags::MS_NOSUID),
    ("nodev", MsFlags::MS_NODEV),
    ("noexec", MsFlags::MS_NOEXEC),
    ("noatime", MsFlags::MS_NOATIME),
    ("nodiratime", MsFlags::MS_NODIRATIME),
    ("relatime", MsFlags::MS_RELATIME),
];

/// The per-mount options of the mount at `target` as the container `pid` sees it (the last
/// one mounted there wins), from its mountinfo; None when nothing is mounted there.
pub fn options(pid: i64, target: &str) -> Option<Vec<String>> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    info.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let point = crate::volume::mounts::unescape_mountinfo(f.nth(4)?);
            let opts = f.next()?;
            (point == target).then(|| opts.split(',').map(str::to_string).collect())
        })
        .next_back()
}

/// Whether the mount at `target` in the container `pid` is read-only (None: not mounted).
pub fn is_read_only(pid: i64, target: &str) -> Option<bool> {
    options(pid, target).map(|o| o.iter().any(|x| x == "ro"))
}

/// Makes the mount at `target` in the container `pid` read-only or writable, keeping its other
/// per-mount options.
pub async fn set_read_only(pid: i64, target: &str, read_only: bool) -> Result<(), String> {
    let current = options(pid, target).ok_or_else(|| format!("nothing is mounted at {target}"))?;
    let mut wanted: Vec<&str> = vec![if read_only { "ro" } else { "rw" }];
    wanted.extend(
        KEPT.iter()
            .map(|(name, _)| *name)
            .filter(|name| current.iter().any(|c| c == name)),
    );
    // /proc/self/exe: the very binary running, even if a package upgrade replaced its file.
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.args(["remount-in-container", &pid.to_string(), target])
        .arg(wanted.join(","))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(HELPER_TIMEOUT, cmd.output()).await {
        Err(_) => Err(format!(
            "the remount helper did not finish within {HELPER_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("cannot run the remount helper: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

/// The helper's body: enters the mount namespace and root of `pid` and remounts `target` with
/// `options` (`ro` or `rw`, plus those of [`KEPT`]). Must run single-threaded (before any
/// runtime starts).
pub fn in_container(pid: i32, target: &str, options: &str) -> Result<(), String> {
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    for o in options.split(',') {
        match (o, KEPT.iter().find(|(name, _)| *name == o)) {
            ("ro", _) => flags |= MsFlags::MS_RDONLY,
            ("rw", _) => {}
            (_, Some((_, f))) => flags |= *f,
            _ => return Err(format!("unknown mount option {o:?}")),
        }
    }
    // Opened before entering: the container's root, to chroot into (setns resets the root to
    // the namespace's, which is not the container's after its pivot_root).
    let root = std::fs::File::open(format!("/proc/{pid}/root"))
        .map_err(|e| format!("container process {pid}: {e}"))?;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| format!("container process {pid}: {e}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot enter the container's mount namespace: {e}"))?;
    nix::unistd::fchdir(&root).map_err(|e| format!("fchdir: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| {
        if e == nix::errno::Errno::EBUSY {
            format!("{target} has files open for writing; retried at the next check")
        } else {
            format!("cannot remount {target}: {e}")
        }
    })
}
