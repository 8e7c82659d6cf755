//! Remote volumes (`mount = { at, fstype, source, options }`): mounted at startup or on
//! request, shared and counted like the buckets of sessions. End to end with a FUSE filesystem
//! that works on this machine: rclone's azureblob backend on Azurite. CIFS (this kernel has
//! none) through the exact invocation and what it keeps out of sight.

use std::time::{Duration, Instant};

use serde_json::json;
use storage_agent::pb;

use crate::common::agent::{ContainerGuard, keypair, mount, sftp_key, sftp_req, text};
use crate::common::azurite::{ACCOUNT, Azurite, KEY};
use crate::common::{Builder, Daemon, random_vfid};

const SECRET_MARK: &str = "sig=";

/// A container `team` with a read-write SAS minted by Azure's SDK, as an operator would.
fn team_container(az: &Azurite) -> String {
    az.py(&format!(
        "from azure.storage.blob import generate_container_sas, ContainerSasPermissions\n\
         from datetime import datetime, timedelta, timezone\n\
         svc.create_container('team')\n\
         sas = generate_container_sas({ACCOUNT:?}, 'team', account_key={KEY:?}, \
         permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True), \
         expiry=datetime.now(timezone.utc) + timedelta(hours=2))\n\
         print('{}/team?' + sas)",
        az.endpoint()
    ))
    .trim()
    .to_string()
}

/// vol1 (its usual directory) becomes the mount point of the container, via rclone.
fn remote_volume(b: Builder, at: &str, sas_url: &str) -> Builder {
    let mut options = toml::Table::new();
    options.insert("azureblob-sas-url".into(), sas_url.into());
    let mut m = toml::Table::new();
    m.insert("at".into(), at.into());
    m.insert("fstype".into(), "fuse.rclone".into());
    m.insert("source".into(), ":azureblob:team".into());
    m.insert("linger".into(), "2s".into());
    m.insert("options".into(), options.into());
    b.set("volume.vol1.mount", m)
}

fn mounted(d: &Daemon) -> bool {
    let path = d.vol_dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_str()) && l.contains("fuse.rclone"))
}

async fn wait_unmounted(d: &Daemon, why: &str) {
    let deadline = Instant::now() + crate::common::OUTCOME;
    while mounted(d) {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn hwinfo(d: &Daemon) -> serde_json::Value {
    let r = d
        .mgr("GET", "/volume/hwinfo", json!({"volume": "vol1"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn create_with_file(d: &Daemon, vfid: &str, name: &str, data: &[u8]) {
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = d.tus_put(vfid, name, data, data.len()).await;
    assert_eq!(r.status, 204, "{}", r.text());
}

/// tus concatenation on a remote volume: the staging on the mounted filesystem joins (FUSE takes
/// `copy_file_range` or its read/write fallback), and the joined file reads back whole.
async fn partials_join_on_the_mount(d: &Daemon, vfid: &str) {
    use crate::tus_concat::{patch_url, post_final, post_partial};
    let data = crate::tus_concat::pattern(3 << 20, 4);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "joined.bin", "size": data.len()}),
        )
        .await;
    let mut urls = Vec::new();
    for part in data.chunks(1_000_003) {
        let (r, url) = post_partial(d, &t, part.len() as u64, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(patch_url(d, &url, 0, part.to_vec()).await.status, 204);
        urls.push(url);
    }
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let r = post_final(d, &t, &urls).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "joined.bin"}),
        )
        .await;
    let r = d.get("client", &format!("/download?token={t}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body[..] == data[..], "the joined file reads back whole");
}

/// The SAS never shows in process lists, logs or API answers.
async fn secret_stays_hidden(d: &Daemon) {
    // The daemon's and rclone's arguments (other tests' clients may carry SAS URLs of theirs).
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ours: Vec<&str> = std::str::from_utf8(&ps.stdout)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("rclone") || l.contains("storage-agent"))
        .collect();
    assert!(
        !ours.iter().any(|l| l.contains(SECRET_MARK)),
        "a SAS in the process list: {ours:?}"
    );
    assert!(
        !d.log_tail(10_000).contains(SECRET_MARK),
        "a SAS in the log"
    );
    let vols = d
        .mgr_raw("GET", "/volumes", None, Some(crate::common::MANAGER_SECRET))
        .await;
    assert!(!vols.text().contains(SECRET_MARK), "{}", vols.text());
    assert!(!hwinfo(d).await.to_string().contains(SECRET_MARK));
}

#[tokio::test]
async fn a_startup_volume_is_mounted_at_start_and_reported_healthy() {
    let az = Azurite::start();
    let sas = team_container(&az);
    let d = remote_volume(Daemon::builder(), "startup", &sas)
        .start()
        .await;
    assert!(mounted(&d), "mounted when the daemon started");
    let hw = hwinfo(&d).await;
    assert_eq!(hw["status"], "healthy", "{hw}");
    assert_eq!(hw["metadata"]["mounted"], "true", "{hw}");

    // Per-user vfolders are UUID directories on it, in the container.
    let vfid = random_vfid();
    create_with_file(&d, &vfid, "notes.txt", b"kept in azure").await;
    let deadline = Instant::now() + crate::common::OUTCOME;
    loop {
        let names = az
            .py("print('\\n'.join(b.name for b in svc.get_container_client('team').list_blobs()))");
        if names.lines().any(|n| n.ends_with("/notes.txt")) {
            let folder = vfid.rsplit('/').next().unwrap();
            assert!(
                names.contains(&folder[4..]),
                "under the vfolder's UUID path: {names}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the file reaches the container: {names}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["used_bytes"], 13, "{}", r.text());
    assert!(r.json()["file_count"].as_u64().unwrap() >= 1);
    secret_stays_hidden(&d).await;
    partials_join_on_the_mount(&d, &vfid).await;
}

async fn sftp_session(d: &Daemon, user: &uuid::Uuid, vfid: &str, public: &str) -> pb::Session {
    let mut rpc = d.rpc().await;
    rpc.create_session(pb::CreateSessionRequest {
        max_sessions_per_user: Some(4),
        ..sftp_req(
            user,
            vec![mount("vol1", vfid, "data", false)],
            vec![public.to_string()],
        )
    })
    .await
    .expect("create session")
    .into_inner()
    .session
    .unwrap()
}

#[tokio::test]
async fn a_requested_volume_is_mounted_for_its_users_and_counted_across_a_restart() {
    let az = Azurite::start();
    let sas = team_container(&az);
    let mut d = remote_volume(Daemon::builder().agent(), "requested", &sas)
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    assert!(!mounted(&d), "nothing mounted before anyone needs it");
    assert_eq!(hwinfo(&d).await["status"], "healthy");

    // An API call mounts it; its linger (2 s) over, it goes.
    let user = uuid::Uuid::new_v4();
    let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    create_with_file(&d, &vfid, "hello.txt", b"hello").await;
    wait_unmounted(&d, "unmounted after the API call's linger").await;

    // Two sessions share one mount, which a restart keeps counted.
    let (key, public) = keypair(d.dir.path(), "remote");
    let a = sftp_session(&d, &user, &vfid, &public).await;
    let b = sftp_session(&d, &user, &vfid, &public).await;
    assert!(mounted(&d));
    let out = sftp_key(&key, "work", a.endpoints[0].port as u16, "ls data\n");
    assert!(text(&out).contains("hello.txt"), "{}", text(&out));
    d.restart().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(mounted(&d), "both sessions still count after the restart");
    let mut rpc = d.rpc().await;
    rpc.destroy_session(pb::DestroySessionRequest { id: a.id.clone() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(mounted(&d), "b still uses it");
    secret_stays_hidden(&d).await;
    let out = sftp_key(&key, "work", b.endpoints[0].port as u16, "ls data\n");
    assert!(text(&out).contains("hello.txt"), "{}", text(&out));
    rpc.destroy_session(pb::DestroySessionRequest { id: b.id.clone() })
        .await
        .unwrap();
    wait_unmounted(&d, "unmounted after the last session and the linger").await;
    secret_stays_hidden(&d).await;
}

#[tokio::test]
async fn cifs_keeps_its_password_out_of_sight_and_a_failed_mount_is_offline() {
    // This kernel has no CIFS: the mount fails, clearly, and the volume stays offline.
    let d = Daemon::builder()
        .set(
            "volume.vol1.mount",
            toml::Value::Table(toml::toml! {
                at = "startup"
                fstype = "cifs"
                source = "//127.0.0.1/vfolders"
                options = "vers=3.0,username=alice,password=Pa55-not-shown,dir_mode=0777"
            }),
        )
        .start()
        .await;
    let path = d.vol_dir.clone();
    let hw = hwinfo(&d).await;
    assert_eq!(hw["status"], "offline", "{hw}");
    let why = hw["status_info"].as_str().unwrap();
    assert!(why.contains("mount -t cifs //127.0.0.1/vfolders"), "{why}");
    assert!(!why.contains("Pa55"), "{why}");
    assert!(
        !d.log_tail(10_000).contains("Pa55"),
        "no password in the log"
    );
    // The password went to the credentials file mount.cifs reads, readable by root only.
    let cred = d.state_dir.join("mounts/vol1.credentials");
    let meta = std::fs::metadata(&cred).expect("credentials file");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&cred).unwrap(),
        "username=alice\npassword=Pa55-not-shown\n"
    );
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": random_vfid()}),
        )
        .await;
    assert_eq!(r.status, 503, "refused at once while offline: {}", r.text());
    assert!(
        !path.join(".storage-agent-health").exists(),
        "nothing written to the bare mount point"
    );
}
