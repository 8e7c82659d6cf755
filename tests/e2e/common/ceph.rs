//! A real single-node CephFS (one mon, one OSD on memstore, one MDS, ceph-fuse, cephx on), made
//! by `scripts/ceph-single-node.sh` under a temporary directory on loopback ports of its own,
//! and torn down when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::tools::require;

pub struct CephCluster {
    dir: PathBuf,
    pub mnt: PathBuf,
    _parent: tempfile::TempDir,
}

/// A port base whose 100 ports (mon, then the daemons) look free: ceph binds BASE..BASE+99.
fn port_base() -> u16 {
    for _ in 0..50 {
        let base = 20_000 + 100 * (rand::random::<u16>() % 400);
        let free = (0..100)
            .step_by(7)
            .chain([0, 1])
            .all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free port range for a Ceph cluster")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-single-node.sh")
}

impl CephCluster {
    pub fn up() -> Self {
        for tool in ["ceph-mon", "ceph-osd", "ceph-mds", "ceph-fuse", "getfattr"] {
            require(
                tool,
                "scripts/testenv.sh ceph (apt-get install --no-install-recommends ceph-mon \
                 ceph-osd ceph-mds ceph-mgr ceph-fuse ceph-common attr)",
            );
        }
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("ceph");
        let started = Instant::now();
        let out = Command::new("timeout")
            .arg("600")
            .arg(script())
            .arg("up")
            .arg(&dir)
            .env("CEPH_PORT_BASE", port_base().to_string())
            // With a mgr: without one, the cluster has no usage statistics and statfs on the
            // mount says 0 bytes, free and total.
            .env("CEPH_WITH_MGR", "1")
            .output()
            .expect("ceph-single-node.sh");
        assert!(
            out.status.success(),
            "the Ceph cluster did not come up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = dir.join("mnt");
        eprintln!("cephfs up at {} in {:?}", mnt.display(), started.elapsed());
        CephCluster {
            dir,
            mnt,
            _parent: parent,
        }
    }

    /// The filesystem mounted again with ceph-fuse as a client whose caps are `caps` (mon, mds,
    /// osd, in `ceph auth` syntax), at a mount point under the cluster's directory.
    pub fn mount_as(&self, client: &str, caps: &[(&str, &str)]) -> PathBuf {
        let conf = self.dir.join("ceph.conf");
        let keyring = self.dir.join(format!("{client}.keyring"));
        let mut auth = Command::new("timeout");
        auth.args(["120", "ceph", "-c"]).arg(&conf).args([
            "auth",
            "get-or-create",
            &format!("client.{client}"),
        ]);
        for (kind, cap) in caps {
            auth.args([*kind, *cap]);
        }
        let out = auth.arg("-o").arg(&keyring).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = self.dir.join(format!("mnt-{client}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let out = Command::new("timeout")
            .args(["120", "ceph-fuse", "-c"])
            .arg(&conf)
            .args(["--id", client, "-k"])
            .arg(&keyring)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        mnt
    }

    /// A directory on the CephFS.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .arg("120")
            .arg(script())
            .arg("down")
            .arg(&self.dir)
            .output();
    }
}

/// A directory's CephFS virtual xattr, read with getfattr.
pub fn vxattr(dir: &Path, name: &str) -> Option<u64> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", name])
        .arg(dir)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// What the files below `dir` hold, summed from a walk: (bytes, files and directories).
pub fn walked(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut entries) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        // Tolerant: what vanishes meanwhile (a delete in progress) is not counted.
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                bytes += m.len();
            }
        }
    }
    (bytes, entries)
}

/// `ceph.dir.rbytes` of `dir` once it agrees with a walk: the MDS's recursive statistics lag
/// writes by a few seconds.
pub fn settled_rbytes(dir: &Path) -> u64 {
    let _ = Command::new("sync").status();
    let start = Instant::now();
    loop {
        let want = walked(dir).0;
        let got = vxattr(dir, "ceph.dir.rbytes");
        if got == Some(want) {
            return want;
        }
        assert!(
            start.elapsed() < super::OUTCOME,
            "ceph.dir.rbytes of {} stayed {got:?}, the files hold {want}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
