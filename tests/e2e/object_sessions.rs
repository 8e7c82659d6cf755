//! What sessions write to object-store vfolders, where no kernel enforces quotas and rclone
//! stands between the session and the service (security review 2, G7 and G8): a full quota
//! scope makes the session's mount read-only until it has room again, writes stream to the
//! bucket instead of filling the node's disk, and uploads that keep failing do not hold a mount
//! for ever.

use std::time::{Duration, Instant};

use serde_json::json;
use storage_agent::pb;

use crate::common::agent::{ContainerGuard, keypair, sftp_key, text};
use crate::common::moto::Moto;
use crate::common::{Daemon, OUTCOME};
use crate::s3::{create, fuse_mounts, sftp_session, usage};

/// The scope's limit, and what a session writes past it. Below rclone's streaming cutoff
/// (100 KiB), which it sends as one PutObject: moto answers rclone 1.60's streamed multipart
/// uploads with 400 (real S3 takes them).
const LIMIT: usize = 64 << 10;
const WRITTEN: usize = 96 << 10;

fn tree_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Waits until the session's notices satisfy `done`.
async fn wait_notices(d: &Daemon, id: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    loop {
        let notices = d.session(id).await.notices;
        if done(&notices) {
            return notices;
        }
        assert!(start.elapsed() < OUTCOME, "notices stayed {notices:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_full_quota_scope_makes_session_mounts_read_only_until_it_has_room() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .agent()
        .s3(&moto.endpoint(), "qg-")
        .set("agent.quota-check-interval", "1s")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    create(&d, &vfid).await;
    let qs = vfid.split_once('/').unwrap().0;
    let r = d
        .mgr(
            "PATCH",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": qs, "options": {"limit_bytes": LIMIT}}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let (key, public) = keypair(d.dir.path(), "qg");
    let s = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .expect("session");
    let port = s.endpoints[0].port as u16;
    assert!(s.notices.is_empty(), "{:?}", s.notices);

    // 96 KiB through the session, past the 64 KiB limit: nothing sees a write as it happens. It
    // goes to the bucket without being completed in rclone's cache on the node's disk.
    let big = d.dir.path().join("big.bin");
    std::fs::write(
        &big,
        (0..WRITTEN).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let put = |name: &str| {
        sftp_key(
            &key,
            "work",
            port,
            &format!("put {} data/{name}\n", big.display()),
        )
    };
    let out = put("big.bin");
    assert!(out.status.success(), "{}\n{}", text(&out), rclone_logs(&d));
    let cache = tree_bytes(&d.state_dir.join("fuse").join("cache"));
    assert!(cache < WRITTEN as u64, "rclone's cache holds {cache} bytes");

    // The next check recounts the vfolder, finds the scope full, makes the mount read-only in
    // the container and tells the session why.
    let notices = wait_notices(&d, &s.id, |n| !n.is_empty()).await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].starts_with("data is read-only")
            && notices[0].contains(&format!("limit is {LIMIT}")),
        "{notices:?}"
    );
    assert_eq!(usage(&d, &vfid, false).await, (1, WRITTEN as u64));
    let out = put("more.bin");
    assert!(
        !out.status.success(),
        "a write past the quota: {}",
        text(&out)
    );
    // Only this session's view changed: the bucket's shared FUSE mount on the node stays
    // writable for the others.
    let shared = fuse_mounts(&d);
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert!(
        shared[0]
            .split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "rw"),
        "{shared:?}"
    );
    // Reading still works.
    let out = sftp_key(&key, "work", port, "get data/big.bin /dev/null\n");
    assert!(out.status.success(), "{}", text(&out));

    // Room again (the file deleted through the API): writable again, and the notice goes.
    let r = d
        .mgr(
            "POST",
            "/folder/file/delete",
            json!({"volume": "vol1", "vfid": vfid, "relpaths": ["big.bin"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_notices(&d, &s.id, |n| n.is_empty()).await;
    std::fs::write(&big, b"small again").unwrap();
    let out = put("small.txt");
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test]
async fn uploads_that_keep_failing_do_not_hold_a_mount_for_ever() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .agent()
        .s3(&moto.endpoint(), "pg-")
        .set("volume.vol1.mount-pending-grace", "3s")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    create(&d, &vfid).await;
    let (_, public) = keypair(d.dir.path(), "pg");
    let s = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .expect("session");
    let mounts = fuse_mounts(&d);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let point = std::path::PathBuf::from(mounts[0].split(' ').nth(4).unwrap());

    // A file written read-write goes through rclone's cache and is uploaded a few seconds
    // after it is closed (--vfs-write-back 5s); the service is gone by then, for good.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(point.join("stuck.bin"))
            .unwrap();
        f.write_all(b"never uploaded").unwrap();
    }
    drop(moto);

    // The session ends; after the linger (2 s) the mount waits for the upload for its grace
    // (3 s), then sets the file aside and goes.
    d.rpc()
        .await
        .destroy_session(pb::DestroySessionRequest { id: s.id.clone() })
        .await
        .unwrap();
    let start = Instant::now();
    while !fuse_mounts(&d).is_empty() {
        assert!(
            start.elapsed() < OUTCOME,
            "still mounted: {:?}\n{}",
            fuse_mounts(&d),
            d.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let unsaved = d.state_dir.join("fuse").join("unsaved");
    let kept: Vec<std::path::PathBuf> = walk(&unsaved)
        .into_iter()
        .filter(|p| p.ends_with("stuck.bin"))
        .collect();
    assert_eq!(kept.len(), 1, "set aside under {}", unsaved.display());
    assert_eq!(std::fs::read(&kept[0]).unwrap(), b"never uploaded");
    let log = std::fs::read_to_string(d.log_path()).unwrap();
    assert!(log.contains("the unsaved files are set aside"), "{log}");
}

/// rclone's logs, for failure messages.
fn rclone_logs(d: &Daemon) -> String {
    walk(&d.state_dir.join("fuse").join("log"))
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Found by the soak: rclone killed under a running session left the session "running" with
/// its vfolder answering ENOTCONN for good (a new rclone makes a new mount, which a running
/// container never sees). The session is ended with a reason, and the next one gets a new
/// mount.
#[tokio::test]
async fn a_session_whose_mount_process_died_is_ended_and_the_next_gets_a_new_mount() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .agent()
        .s3(&moto.endpoint(), "dm-")
        .set("agent.reap-interval", "1s")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    create(&d, &vfid).await;
    let (_, public) = keypair(d.dir.path(), "dm");
    let first = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .expect("session");
    let mounts = fuse_mounts(&d);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let point = mounts[0].split(' ').nth(4).unwrap().to_string();
    let killed = std::process::Command::new("pkill")
        .args(["-9", "-f", &format!("rclone mount .*{point}")])
        .status()
        .unwrap();
    assert!(killed.success(), "no rclone process for {point}");

    let start = Instant::now();
    let ended = loop {
        let s = d.session(&first.id).await;
        if s.state != pb::SessionState::Running as i32 {
            break s;
        }
        assert!(start.elapsed() < OUTCOME, "still running with a dead mount");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(ended.reason.contains("stopped working"), "{}", ended.reason);
    let second = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .expect("a new session");
    let point = fuse_mounts(&d)[0].split(' ').nth(4).unwrap().to_string();
    assert!(std::fs::metadata(&point).is_ok(), "the new mount answers");
    // Nothing ends the new session: its mount is alive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        d.session(&second.id).await.state,
        pb::SessionState::Running as i32
    );
}
