//! The attacks of the security review (`F1`…`F13`), run against the real binary: each test fails
//! on the code the review read.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use storage_agent::pb;
use storage_agent::volume::fsops;

use crate::common::agent::{ContainerGuard, inspect, keypair};
use crate::common::{Daemon, random_file};

/// A chain of `depth` directories named `d` under `base`, built with *at calls (the path passes
/// PATH_MAX long before the bottom), with `files_per_level` files at every level.
fn deep_tree(base: &Path, depth: usize, files_per_level: usize) {
    let mut fd = fsops::open_dir_path(base).unwrap();
    for _ in 0..depth {
        fsops::mkdir_at(fd.as_fd(), "d", 0o755).unwrap();
        for f in 0..files_per_level {
            fsops::create_at(fd.as_fd(), format!("f{f}"), 0o644).unwrap();
        }
        fd = fsops::open_subdir_nofollow(fd.as_fd(), "d").unwrap();
    }
}

async fn task_status(d: &Daemon, id: &str) -> String {
    let r = d.mgr("GET", &format!("/bgtask/{id}"), json!({})).await;
    r.json()["status"].as_str().unwrap_or_default().to_string()
}

/// F1: a user swaps the subpath of a new session for a symlink to `/` (from another session of
/// theirs) while sessions are created against it. The mount is made from the directory the
/// daemon checked and opened, so no container ever sees anything but that directory.
#[tokio::test]
async fn a_subpath_swapped_for_a_symlink_never_mounts_the_host() {
    let d = Daemon::builder().agent().start().await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vfid, vpath) = d.user_vfolder(&user).await;
    std::fs::create_dir(vpath.join("d")).unwrap();
    std::fs::write(vpath.join("d/inside.txt"), b"mine").unwrap();
    std::os::unix::fs::symlink("/", vpath.join("s")).unwrap();
    let (_, public) = keypair(d.dir.path(), "swapper");

    // The swapper: exchange `d` and `s` about half the time, as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, vpath) = (stop.clone(), vpath.clone());
        std::thread::spawn(move || {
            let dir = fsops::open_dir_path(&vpath).unwrap();
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                nix::fcntl::renameat2(
                    dir.as_fd(),
                    "d",
                    dir.as_fd(),
                    "s",
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
                swaps += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            swaps
        })
    };

    let mut rpc = d.rpc().await;
    let (mut mounted, mut refused) = (0, 0);
    for i in 0..14 {
        let read_only = i % 2 == 0;
        let r = rpc
            .create_session(pb::CreateSessionRequest {
                kind: pb::SessionKind::Sftp as i32,
                user_id: user.to_string(),
                access_key: "AKIATEST".into(),
                resource_group: "storage".into(),
                mounts: vec![pb::Mount {
                    volume: "vol1".into(),
                    vfid: vfid.clone(),
                    name: "m".into(),
                    read_only,
                    subpath: "d".into(),
                }],
                credentials: Some(pb::Credentials {
                    public_keys: vec![public.clone()],
                    generate_password: false,
                }),
                ..Default::default()
            })
            .await;
        let s = match r {
            Ok(c) => c.into_inner().session.unwrap(),
            Err(status) => {
                // The check saw the symlink: refused, as it must be.
                assert!(
                    status.message().contains("escapes the vfolder"),
                    "unexpected refusal: {status:?}"
                );
                refused += 1;
                continue;
            }
        };
        mounted += 1;
        let pid = inspect(&s.container_id)["State"]["Pid"].as_i64().unwrap();
        let seen = Path::new(&format!("/proc/{pid}/root/srv/sftp/work/m")).to_path_buf();
        let names: Vec<String> = std::fs::read_dir(&seen)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["inside.txt"],
            "session {i} sees something other than the checked directory"
        );
        let probe = seen.join("probe.txt");
        let wrote = std::fs::write(&probe, b"x");
        if read_only {
            let e = wrote.expect_err("a read-only mount must refuse writes");
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        } else {
            wrote.unwrap();
            std::fs::remove_file(&probe).unwrap();
        }
        rpc.destroy_session(pb::DestroySessionRequest { id: s.id })
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 100, "the swapper ran ({swaps} swaps)");
    assert!(mounted > 0, "some sessions got through ({refused} refused)");
    // Nothing is left mounted on the host under the state dir.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&d.state_dir.display().to_string()),
        "staging mounts were detached"
    );
}

/// F2: a tree 20 000 levels deep is deleted without taking the daemon down; killed in the
/// middle of such a delete, the daemon comes back and finishes it.
#[tokio::test]
async fn a_very_deep_tree_is_deleted_and_survives_a_crash() {
    let mut d = Daemon::start().await;
    let (vfid, vpath) = d.create_vfolder().await;
    deep_tree(&vpath, 20_000, 0);
    let task = d.start_delete(&vfid).await;
    let t = d.wait_task(&task).await;
    assert_eq!(t["status"], "done", "{t}");
    assert!(!vpath.exists());
    assert_eq!(d.get("manager", "/").await.status, 200, "the daemon lives");

    // Again, killed mid-delete: the restart resumes it and does not crash.
    let (vfid, vpath) = d.create_vfolder().await;
    deep_tree(&vpath, 20_000, 1);
    let task = d.start_delete(&vfid).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let was_running = task_status(&d, &task).await == "running";
    d.restart().await;
    let t = d.wait_task(&task).await;
    assert_eq!(t["status"], "done", "{t}");
    assert!(!vpath.exists());
    assert!(
        was_running || t["status"] == "done",
        "the delete was killed while it ran, or had finished"
    );
    assert_eq!(d.get("manager", "/").await.status, 200);
}

/// F2: a task under which the daemon dies twice (here: kill -9 during the first run and during
/// the resumed one) is marked failed instead of being resumed for ever.
#[tokio::test]
async fn a_task_interrupted_by_two_crashes_is_not_resumed_again() {
    let mut d = Daemon::start().await;
    let (vfid, vpath) = d.create_vfolder().await;
    deep_tree(&vpath, 20_000, 1);
    let task = d.start_delete(&vfid).await;
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            task_status(&d, &task).await,
            "running",
            "round {round}: the delete must still run to be killed (tree too small?)"
        );
        d.restart().await;
    }
    let t = d.wait_task(&task).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["error"].as_str().unwrap().contains("not resumed again"),
        "{t}"
    );
}

/// F3: a setuid file, cloned, comes out without the bit and not owned by root.
#[tokio::test]
async fn a_clone_never_makes_set_id_files() {
    let d = Daemon::start().await;
    let (src, spath) = d.create_vfolder().await;
    let tool = spath.join("tool");
    std::fs::write(&tool, b"#!/bin/sh\nid\n").unwrap();
    std::os::unix::fs::chown(&tool, Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o6755)).unwrap();
    std::fs::create_dir(spath.join("shared")).unwrap();
    std::fs::set_permissions(
        spath.join("shared"),
        std::fs::Permissions::from_mode(0o3777),
    )
    .unwrap();
    let dst = format!(
        "{}/{}",
        src.split_once('/').unwrap().0,
        uuid::Uuid::new_v4().simple()
    );
    let task = d.start_clone(&src, &dst).await;
    assert_eq!(d.wait_task(&task).await["status"], "done");
    let dpath = d.vfolder_path(&dst);
    let md = std::fs::metadata(dpath.join("tool")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o755, "set-id bits dropped");
    assert_ne!(md.uid(), 0, "not root-owned");
    assert_eq!(
        std::fs::metadata(dpath.join("shared")).unwrap().mode() & 0o7777,
        0o777
    );
    // /folder/create refuses set-id modes outright.
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": crate::common::random_vfid(), "mode": 0o4755}),
        )
        .await;
    r.problem(400);
}

/// F4–F5: FIFOs are never opened. 600 downloads of one (the blocking pool has 512 threads), a
/// fetch, and a clone around one all answer at once, and the node keeps serving.
#[tokio::test]
async fn fifos_never_block_a_thread() {
    // 600 connections at once from one address: above the default per-address cap.
    let d = Daemon::builder()
        .set("storage-agent.max-connections-per-ip", 1000)
        .start()
        .await;
    let (vfid, vpath) = d.create_vfolder().await;
    nix::unistd::mkfifo(
        &vpath.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o666),
    )
    .unwrap();
    std::fs::write(vpath.join("ok.txt"), b"fine").unwrap();
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "pipe"}),
        )
        .await;
    let url = d.url("client", &format!("/download?token={t}"));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..600 {
        let (c, u) = (client.clone(), url.clone());
        set.spawn(async move { c.get(u).send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(r) = set.join_next().await {
        let status = r.unwrap().expect("every FIFO download answers");
        assert!((400..500).contains(&status), "{status}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "600 refusals took {:?}",
        started.elapsed()
    );
    let r = d
        .mgr(
            "POST",
            "/folder/file/fetch",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "pipe"}),
        )
        .await;
    assert!((400..500).contains(&r.status), "{}", r.text());
    // The node still answers at once.
    let t0 = Instant::now();
    let r = d
        .mgr(
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "."}),
        )
        .await;
    assert_eq!(r.status, 200);
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "ok.txt"}),
        )
        .await;
    let r = d.get("client", &format!("/download?token={t}")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"fine"[..]));
    assert!(t0.elapsed() < crate::common::PROMPT, "{:?}", t0.elapsed());
    assert_eq!(d.get("internal", "/readyz").await.status, 200);
    // A clone of the folder skips the FIFO instead of waiting on it.
    let dst = format!(
        "{}/{}",
        vfid.split_once('/').unwrap().0,
        uuid::Uuid::new_v4().simple()
    );
    let task = d.start_clone(&vfid, &dst).await;
    assert_eq!(d.wait_task(&task).await["status"], "done");
    assert!(d.vfolder_path(&dst).join("ok.txt").exists());
    assert!(!d.vfolder_path(&dst).join("pipe").exists());
}

/// Whether the server closed the connection (EOF or reset), without waiting.
fn is_closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 4096];
    let mut r = s;
    let closed = loop {
        match r.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue, // data the server sent before closing (or still sending)
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Opens `n` connections that send a request and then never read the response.
pub fn stalled_readers(addr: &str, request: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let s = TcpStream::connect(addr).ok()?;
            // A tiny receive window fills at once, so the server's writes block.
            let size: libc::c_int = 4096;
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let mut w = &s;
            w.write_all(request.as_bytes()).ok()?;
            Some(s)
        })
        .collect()
}

/// F6: 300 connections that ask for an archive and never read cannot stall the node: a listing
/// and a download answer within a second, `/readyz` stays truthful, and the stalled
/// connections are closed after the write-idle timeout.
#[tokio::test]
async fn stalled_archive_readers_do_not_starve_the_node() {
    let d = Daemon::builder()
        .set("storage-agent.write-idle-timeout", "3s")
        .set("storage-agent.idle-timeout", "3s")
        .start()
        .await;
    let (vfid, vpath) = d.create_vfolder().await;
    random_file(&vpath.join("big.bin"), 16 << 20, 1);
    for i in 0..50 {
        std::fs::write(vpath.join(format!("small{i}.txt")), vec![b'x'; 4096]).unwrap();
    }
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": ".", "archive": true}),
        )
        .await;
    let addr = d.addrs["client"].clone();
    let request = format!("GET /download?token={t}&archive=true HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut stalled = stalled_readers(&addr, &request, 300);
    assert!(
        stalled.len() >= 290,
        "connections opened: {}",
        stalled.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t0 = Instant::now();
    let r = d
        .mgr(
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "."}),
        )
        .await;
    assert_eq!(r.status, 200);
    let dt = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "small1.txt"}),
        )
        .await;
    let r = d.get("client", &format!("/download?token={dt}")).await;
    assert_eq!(r.status, 200);
    // Starved, they would wait for a connection or a thread (tens of seconds); the bound is
    // loose so a loaded machine does not fail it.
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    let ready = d.get("internal", "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());

    // Beyond the caps, archives are refused at once with 429.
    let mut refused = 0;
    for s in stalled.iter_mut().take(40) {
        let mut head = [0u8; 12];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.read_exact(&mut head).is_ok() && &head[9..12] == b"429" {
            refused += 1;
        }
    }
    assert!(
        refused > 20,
        "most over-cap archives got 429 ({refused}/40)"
    );

    // The ones that got an archive and never read are closed after write-idle-timeout (their
    // FIN waits behind the unsent data, so the daemon's side is what tells), and the 429 ones
    // after idle-timeout; the archive threads are gone with them.
    let pid = d.pid();
    let count = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .unwrap()
            .count()
    };
    let archive_threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).unwrap_or_default().trim() == "archive"
            })
            .count()
    };
    assert!(
        count("fd") > 250,
        "the stalled connections are open at first"
    );
    assert!(
        archive_threads() > 0,
        "and some archives are being produced"
    );
    let deadline = Instant::now() + crate::common::OUTCOME;
    while (count("fd") > 60 || archive_threads() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        count("fd") <= 60,
        "the daemon still holds {} fds",
        count("fd")
    );
    assert_eq!(archive_threads(), 0, "archive threads ended");
    drop(stalled);
}

/// F7: 2000 connections that never send a byte are closed within the first-byte timeout, the
/// per-address cap holds, and a real client from another address is served meanwhile.
#[tokio::test]
async fn silent_connections_are_closed_and_capped() {
    // 2000 sockets here and as many in the daemon (which inherits the limit).
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
    let d = Daemon::builder()
        .set("storage-agent.first-byte-timeout", "2s")
        .set("storage-agent.max-connections-per-ip", 1000)
        .start()
        .await;
    let addr = d.addrs["client"].clone();
    let silent: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();

    // A client from 127.0.0.2 is served while 127.0.0.1 is at its cap.
    let other = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .timeout(crate::common::PROMPT)
        .build()
        .unwrap();
    let port = addr.rsplit_once(':').unwrap().1;
    let r = other
        .get(format!("http://127.0.0.1:{port}/download?token=x"))
        .send()
        .await
        .expect("a real client is served");
    assert_eq!(r.status(), 400);

    // Over the cap: closed at once, so never more than 1000 open. Under it: closed by the
    // first-byte timeout.
    let open_now = silent.iter().filter(|s| !is_closed(s)).count();
    assert!(open_now <= 1000, "the cap of 1000 holds ({open_now} open)");
    assert!(open_now > 0, "some connections were admitted");
    // The timeout is 2 s; the bound leaves room for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(2 + 60);
    loop {
        let open = silent.iter().filter(|s| !is_closed(s)).count();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} silent connections still open after the first-byte timeout"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// F8: an archive never carries what could escape on extraction: symlinks whose target leaves
/// the archive root are left out, and `\` (a separator on Windows) never reaches an entry name.
#[tokio::test]
async fn archives_hold_nothing_that_escapes_on_extraction() {
    let d = Daemon::start().await;
    let (vfid, vpath) = d.create_vfolder().await;
    let deep = vpath.join("d1/d2/d3");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("ok.txt"), b"ok").unwrap();
    std::os::unix::fs::symlink("../../..", deep.join("up")).unwrap();
    std::os::unix::fs::symlink("../../../x", deep.join("lnk")).unwrap();
    std::os::unix::fs::symlink("ok.txt", deep.join("same")).unwrap();
    std::fs::write(deep.join("..\\..\\..\\evil.bat"), b"echo").unwrap();
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "d1/d2/d3", "archive": true}),
        )
        .await;
    let r = d
        .get("client", &format!("/download?token={t}&archive=true"))
        .await;
    assert_eq!(r.status, 200);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(r.body.to_vec())).unwrap();
    let names: Vec<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
    assert!(names.contains(&"ok.txt".to_string()), "{names:?}");
    assert!(
        names.contains(&"same".to_string()),
        "an inside link is kept"
    );
    assert!(!names.iter().any(|n| n == "up" || n == "lnk"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains('\\')), "{names:?}");
    assert!(
        names.contains(&".._.._.._evil.bat".to_string()),
        "{names:?}"
    );
    let same = zip.by_name("same").unwrap();
    assert!(same.is_symlink());
}

/// F10: overlapping ranges are merged: asking for a file 64 times returns it once.
#[tokio::test]
async fn overlapping_ranges_do_not_amplify() {
    let d = Daemon::start().await;
    let (vfid, vpath) = d.create_vfolder().await;
    random_file(&vpath.join("f.bin"), 1 << 20, 3);
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "f.bin"}),
        )
        .await;
    let ranges = vec!["0-"; 64].join(",");
    let r = crate::common::send(
        d.http
            .get(d.url("client", &format!("/download?token={t}")))
            .header("Range", format!("bytes={ranges}")),
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body.len(), 1 << 20, "{:?}", r.headers);
    assert_eq!(
        r.header("content-range").unwrap(),
        "bytes 0-1048575/1048576"
    );
}

/// F11: a file dated after year 9999 (tmpfs keeps such times) downloads and lists normally.
#[tokio::test]
async fn far_future_times_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tmpfs");
    std::fs::create_dir(&mnt).unwrap();
    crate::common::run(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&mnt),
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .output();
        }
    }
    let _u = Unmount(mnt.clone());
    let d = Daemon::builder()
        .set("volume.vol1.path", mnt.display().to_string())
        .start()
        .await;
    let (vfid, vpath) = d.create_vfolder().await;
    let f = vpath.join("future.txt");
    std::fs::write(&f, b"later").unwrap();
    crate::common::run(
        std::process::Command::new("touch")
            .args(["-d", "@300000000000"])
            .arg(&f),
    );
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "future.txt"}),
        )
        .await;
    let r = d.get("client", &format!("/download?token={t}")).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"later"[..]));
    assert!(r.header("last-modified").unwrap().contains("9999"));
    let r = d
        .mgr(
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "."}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// F12: the state directory and database are the daemon's alone.
#[tokio::test]
async fn state_is_not_world_readable() {
    let d = Daemon::start().await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&d.state_dir), 0o700);
    assert_eq!(mode(&d.state_dir.join("state.db")), 0o600);
    let (vfid, _) = d.create_vfolder().await;
    let _ = d
        .mgr(
            "POST",
            "/folder/file/mkdir",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "x"}),
        )
        .await;
    for f in ["state.db-wal", "state.db-shm"] {
        let p = d.state_dir.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
}

/// F13: usage counts a tree deeper than PATH_MAX instead of failing (which would hide it).
#[tokio::test]
async fn usage_counts_past_path_max() {
    let d = Daemon::start().await;
    let (vfid, vpath) = d.create_vfolder().await;
    deep_tree(&vpath, 3000, 1);
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["file_count"], 6000);
    let r = d
        .mgr(
            "GET",
            "/folder/used-bytes",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
