//! Volume health: a volume whose mount goes away turns offline within one check interval and
//! requests on it fail fast; a hung mount (a FUSE daemon frozen with SIGSTOP) never hangs a
//! request, /health, or the heartbeat.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::redis::RedisServer;
use crate::common::tools::{require, require_python_module};
use crate::common::{Daemon, OUTCOME, PROMPT, run};

fn fast_checks(b: crate::common::Builder, path: &Path) -> crate::common::Builder {
    b.set("volume.vol1.path", path.display().to_string())
        .set("storage-agent.volume-check-interval", "1s")
        .set("storage-agent.volume-check-timeout", "1s")
}

async fn wait_status(d: &Daemon, want: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let asked = Instant::now();
        let r = d
            .mgr("GET", "/volume/hwinfo", json!({"volume": "vol1"}))
            .await;
        assert!(asked.elapsed() < PROMPT, "hwinfo itself must not hang");
        let v = r.json();
        if v["status"] == want {
            return v;
        }
        assert!(start.elapsed() < OUTCOME, "volume not {want}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[tokio::test]
async fn an_unmounted_volume_goes_offline_and_requests_fail_fast() {
    require("mkfs.ext4", "apt-get install e2fsprogs");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.img");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    let _unmount = Unmount(mnt.clone());
    let d = fast_checks(Daemon::builder(), &mnt).start().await;
    let (vfid, _) = d.create_vfolder().await;
    let v = wait_status(&d, "healthy").await;
    assert!(v["status_info"].is_null(), "{v}");
    assert_eq!(d.get("internal", "/readyz").await.status, 200);

    // The device goes away under the mount path (lazy unmount: the daemon's open descriptor
    // does not keep it from happening, as a dead NFS server would not either).
    run(Command::new("umount").arg("-l").arg(&mnt));
    let v = wait_status(&d, "offline").await;
    assert!(
        v["status_info"]
            .as_str()
            .unwrap()
            .contains("another device"),
        "{v}"
    );
    let start = Instant::now();
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert!(start.elapsed() < PROMPT, "fails fast");
    assert_eq!(
        r.problem(503)["type"],
        "https://api.backend.ai/probs/storage/volume/offline"
    );
    let r = d
        .mgr(
            "POST",
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "a", "size": 1}),
        )
        .await;
    r.problem(503);
    let r = d.get("internal", "/readyz").await;
    assert_eq!(r.status, 503);
    let h = r.json();
    let check = h["connectivity"]["connectivity_checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["service_group"] == "volume")
        .unwrap()
        .clone();
    assert_eq!(check["is_healthy"], false);
    assert!(
        check["error_message"]
            .as_str()
            .unwrap()
            .starts_with("offline"),
        "{check}"
    );
    // Other volumes and routes keep working.
    assert_eq!(d.get("manager", "/").await.status, 200);
}

/// moto (S3) + s3fs (FUSE): freezing s3fs with SIGSTOP makes every call on the mount block in
/// the kernel — a hung mount.
struct HungMount {
    moto: Child,
    s3fs_pid: Option<i32>,
    mnt: PathBuf,
}

impl HungMount {
    fn s3fs_pid(mnt: &Path) -> Option<i32> {
        let out = Command::new("pgrep")
            .args(["-f", &format!("s3fs .* {}", mnt.display())])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    fn freeze(&self) {
        let pid = self.s3fs_pid.expect("s3fs pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
    }

    fn thaw(&self) {
        if let Some(pid) = self.s3fs_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
}

impl Drop for HungMount {
    fn drop(&mut self) {
        self.thaw();
        let _ = Command::new("fusermount")
            .arg("-uz")
            .arg(&self.mnt)
            .output();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

fn hung_mount_fixture(dir: &Path) -> HungMount {
    require("s3fs", "apt-get install s3fs");
    require("moto_server", "pip install 'moto[server]'");
    require_python_module("boto3", "boto3");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let moto = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < OUTCOME, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    run(Command::new("python3").arg("-c").arg(format!(
        "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', aws_access_key_id='t', aws_secret_access_key='t', region_name='us-east-1').create_bucket(Bucket='hung-volume')"
    )));
    let passwd = dir.join("s3fs.passwd");
    std::fs::write(&passwd, "t:t\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mnt = dir.join("s3mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fixture = HungMount {
        moto,
        s3fs_pid: None,
        mnt: mnt.clone(),
    };
    run(Command::new("s3fs")
        .arg("hung-volume")
        .arg(&mnt)
        .arg("-o")
        .arg(format!(
            "url=http://127.0.0.1:{port},use_path_request_style,passwd_file={},endpoint=us-east-1",
            passwd.display()
        )));
    fixture.s3fs_pid = HungMount::s3fs_pid(&mnt);
    assert!(fixture.s3fs_pid.is_some(), "s3fs is running");
    fixture
}

#[tokio::test]
async fn a_hung_mount_never_hangs_requests_health_or_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let fuse = hung_mount_fixture(dir.path());
    let redis = RedisServer::start();
    let d = fast_checks(Daemon::builder(), &fuse.mnt)
        .agent()
        .set("redis.addr", redis.url())
        .set("agent.heartbeat-interval", "1s")
        .start()
        .await;
    wait_status(&d, "healthy").await;

    fuse.freeze();
    let v = wait_status(&d, "offline").await;
    assert!(
        v["status_info"].as_str().unwrap().contains("hung mount"),
        "{v}"
    );
    // Everything that reports on the volume answers at once.
    for (api, path) in [
        ("internal", "/health"),
        ("internal", "/readyz"),
        ("manager", "/health"),
    ] {
        let start = Instant::now();
        let r = d.get(api, path).await;
        assert!(
            start.elapsed() < PROMPT,
            "{api}{path} took {:?}",
            start.elapsed()
        );
        assert!(r.status == 200 || r.status == 503);
    }
    let start = Instant::now();
    let r = d
        .mgr("GET", "/folder/fs-usage", json!({"volume": "vol1"}))
        .await;
    assert!(start.elapsed() < PROMPT);
    r.problem(503);
    // Heartbeats keep coming and carry the verdict.
    let start = Instant::now();
    loop {
        let out = redis.cli(&[
            "-n",
            "2",
            "XREVRANGE",
            storage_agent::cluster::HEARTBEAT_STREAM,
            "+",
            "-",
            "COUNT",
            "1",
        ]);
        if out.contains("storage_agent_heartbeat") && out.contains("\"status\":\"offline\"") {
            break;
        }
        assert!(
            start.elapsed() < OUTCOME,
            "no heartbeat reporting the hung volume: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Thawed, it recovers by itself.
    fuse.thaw();
    wait_status(&d, "healthy").await;
}

/// When every blocking I/O thread is stuck (reads on a hung mount that the health check has
/// not caught yet), `/readyz` says so instead of answering 200 while no file API can; it
/// recovers once the threads come back.
#[tokio::test]
async fn readyz_tells_when_file_io_is_saturated() {
    let dir = tempfile::tempdir().unwrap();
    let fuse = hung_mount_fixture(dir.path());
    let d = Daemon::builder()
        .set("volume.vol1.path", fuse.mnt.display().to_string())
        // A slow health check, so requests still reach the hung mount.
        .set("storage-agent.volume-check-interval", "1h")
        .set("storage-agent.blocking-threads", 8)
        .start()
        .await;
    let (vfid, vpath) = d.create_vfolder().await;
    std::fs::write(vpath.join("f.txt"), b"x").unwrap();
    assert_eq!(d.get("internal", "/readyz").await.status, 200);
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "f.txt"}),
        )
        .await;
    fuse.freeze();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut stuck = Vec::new();
    for _ in 0..12 {
        let (c, u) = (
            client.clone(),
            d.url("client", &format!("/download?token={t}")),
        );
        stuck.push(tokio::spawn(async move { c.get(u).send().await }));
    }
    let start = Instant::now();
    loop {
        let r = d.get("internal", "/readyz").await;
        if r.status == 503 {
            let v = r.json();
            let pool = v["connectivity"]["connectivity_checks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["service_group"] == "io-pool")
                .unwrap()
                .clone();
            assert_eq!(pool["is_healthy"], false, "{v}");
            break;
        }
        assert!(
            start.elapsed() < OUTCOME,
            "readyz still 200 with every I/O thread stuck"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fuse.thaw();
    let start = Instant::now();
    while d.get("internal", "/readyz").await.status != 200 {
        assert!(start.elapsed() < OUTCOME, "readyz did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in stuck {
        let _ = s.await;
    }
}
