//! Real filesystems on loop files, made and removed by the tests: btrfs with quotas, a small
//! ext4 that fills up, XFS mounted with project quota (inside the VM).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run;
use super::tools::require;

pub struct LoopFs {
    /// Where it is mounted.
    pub mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// `size` bytes of `fstype` (a sparse image) mounted with `options`; in `/run` inside the
    /// VM (its `/tmp` is RAM under a read-only root; `/run` is the tmpfs meant for it).
    fn make(fstype: &str, size: u64, options: &str, pkg: &str) -> LoopFs {
        let mkfs = format!("mkfs.{fstype}");
        require(&mkfs, &format!("apt-get install {pkg}"));
        let base = if std::env::var_os("SA_IN_VM").is_some() {
            "/run"
        } else {
            "/tmp"
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("sa-{fstype}-"))
            .tempdir_in(base)
            .expect("tempdir");
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .unwrap();
        run(Command::new(&mkfs).arg("-q").arg(&img));
        let mut opts = String::from("loop");
        if !options.is_empty() {
            opts = format!("loop,{options}");
        }
        run(Command::new("mount")
            .args(["-o", &opts])
            .arg(&img)
            .arg(&mnt));
        LoopFs { mnt, _dir: dir }
    }

    /// btrfs with quotas (qgroups) on.
    pub fn btrfs(size: u64) -> LoopFs {
        let fs = LoopFs::make("btrfs", size, "", "btrfs-progs");
        run(Command::new("btrfs").args(["quota", "enable"]).arg(&fs.mnt));
        fs
    }

    /// btrfs as it comes: quotas off.
    pub fn btrfs_without_quota(size: u64) -> LoopFs {
        LoopFs::make("btrfs", size, "", "btrfs-progs")
    }

    pub fn ext4(size: u64) -> LoopFs {
        LoopFs::make("ext4", size, "", "e2fsprogs")
    }

    /// XFS with project quota accounted and enforced (needs a kernel with CONFIG_XFS_QUOTA).
    pub fn xfs_prjquota(size: u64) -> LoopFs {
        LoopFs::make("xfs", size, "prjquota", "xfsprogs")
    }

    /// XFS without quota.
    pub fn xfs(size: u64) -> LoopFs {
        LoopFs::make("xfs", size, "", "xfsprogs")
    }

    /// A directory on it (a volume root), made now.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Lazy: a daemon or container still holding a file must not leave the mount behind;
        // the loop device goes with the last reference (autoclear).
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
