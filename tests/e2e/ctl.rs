//! `storage-agent ctl` end to end against a running daemon, as a user runs it: JSON output
//! parsed, an upload interrupted and resumed, a progress bar on a real pseudo-terminal
//! (`script`), errors with their exit codes, sessions over gRPC.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::agent::{ContainerGuard, keypair};
use crate::common::{Daemon, bin, random_file, sha256_file};

/// `storage-agent ctl --config <the daemon's> <args>`, with the test's own cache directory
/// (where interrupted uploads are remembered).
fn ctl(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("ctl")
        .arg("--config")
        .arg(&d.config_path)
        .args(args)
        .env("XDG_CACHE_HOME", d.dir.path().join("cache"))
        .env_remove("STORAGE_AGENT_MANAGER_URL");
    c
}

fn json_of(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "ctl failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

fn run_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    json_of(&ctl(d, &all).output().unwrap())
}

/// `ctl <args>` (an upload) started, once it has remembered its upload URL (it has a token
/// and is sending).
fn started_upload(d: &Daemon, args: &[&str]) -> std::process::Child {
    let child = ctl(d, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let remembered = d.dir.path().join("cache/storage-agent/ctl-uploads");
    let deadline = Instant::now() + crate::common::OUTCOME;
    while std::fs::read_dir(&remembered)
        .map(|r| r.count())
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test]
async fn uploads_resume_downloads_round_trip_and_json_is_parseable() {
    let d = Daemon::start().await;
    let vols = run_json(&d, &["volumes"]);
    assert_eq!(vols["volumes"][0]["name"], "vol1");
    let vfid = run_json(&d, &["folder", "create", "vol1"])["vfid"]
        .as_str()
        .unwrap()
        .to_string();

    // A 256 MiB upload interrupted (SIGINT) once some of it went up: exit code 5, and the same
    // command again resumes it from where the server stands.
    let src = d.dir.path().join("big.bin");
    random_file(&src, 256 << 20, 9);
    let args = [
        "--json",
        "upload",
        "vol1",
        &vfid,
        src.to_str().unwrap(),
        "--chunk",
        "4m",
        "--streams",
        "1",
    ];
    let child = started_upload(&d, &args);
    std::thread::sleep(Duration::from_millis(400));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let first = child.wait_with_output().unwrap();
    if first.status.success() {
        panic!("the upload finished before it could be interrupted; make the file bigger");
    }
    assert_eq!(
        first.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let err: Value = serde_json::from_slice(&first.stderr).expect("a JSON error");
    assert!(err["error"].as_str().unwrap().contains("resume"), "{err}");
    let second = json_of(&ctl(&d, &args).output().unwrap());
    let up = &second["results"][0]["uploaded"][0];
    assert_eq!(up["size"], 256 << 20);
    assert_eq!(up["streams"], 1);
    assert!(
        up["resumed_from"].as_u64().unwrap() > 0,
        "resumed, not started over: {up}"
    );
    assert_eq!(
        sha256_file(&d.vfolder_path(&vfid).join("big.bin")),
        sha256_file(&src),
        "byte-identical after the resume"
    );

    // A directory up, listed, and down again.
    let tree = d.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), b"alpha").unwrap();
    std::fs::write(tree.join("sub/b.txt"), b"beta").unwrap();
    std::fs::create_dir_all(tree.join("sub/empty")).unwrap();
    std::fs::create_dir_all(tree.join("empty")).unwrap();
    run_json(
        &d,
        &[
            "upload",
            "vol1",
            &vfid,
            tree.to_str().unwrap(),
            "--to",
            "docs",
        ],
    );
    let ls = run_json(&d, &["ls", "vol1", &vfid, "docs/tree"]);
    let mut names: Vec<&str> = ls["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "empty", "sub"]);
    let out = d.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run_json(
        &d,
        &[
            "download",
            "vol1",
            &vfid,
            "docs/tree",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(out.join("tree/sub/b.txt")).unwrap(), b"beta");
    // The same tree, empty directories included.
    assert!(
        out.join("tree/empty").is_dir(),
        "an empty directory comes down too"
    );
    assert!(out.join("tree/sub/empty").is_dir());
    let usage = run_json(&d, &["folder", "usage", "vol1", &vfid]);
    assert!(usage["used_bytes"].as_u64().unwrap() >= 256 << 20);
    let listed = run_json(&d, &["folder", "list", "vol1"]);
    assert!(
        listed["vfolders"]
            .to_string()
            .contains(vfid.rsplit('/').next().unwrap())
    );

    // Errors: refused (3) with the server's problem, unreachable (4), bad arguments (2).
    let missing = ctl(&d, &["--json", "ls", "vol1", &vfid, "nope"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(3));
    let err: Value = serde_json::from_slice(&missing.stderr).unwrap();
    assert_eq!(err["problem"]["errno"], 2, "{err}");
    let dead = ctl(&d, &["--manager", "http://127.0.0.1:9", "volumes"])
        .output()
        .unwrap();
    assert_eq!(dead.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&dead.stderr).contains("is the daemon running"));
    let bad = ctl(&d, &["upload", "vol1", &vfid]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let deleted = run_json(&d, &["folder", "delete", "vol1", &vfid]);
    assert_eq!(deleted["status"], "done");
}

#[tokio::test]
async fn the_progress_bar_shows_on_a_terminal_only() {
    crate::common::tools::require("script", "apt-get install bsdutils");
    let d = Daemon::start().await;
    let vfid = run_json(&d, &["folder", "create", "vol1"])["vfid"]
        .as_str()
        .unwrap()
        .to_string();
    let src = d.dir.path().join("p.bin");
    random_file(&src, 64 << 20, 3);
    // `script` gives the command a pseudo-terminal and copies what it draws.
    let cmd = format!(
        "XDG_CACHE_HOME={} {} ctl --config {} upload vol1 {vfid} {} --chunk 1m",
        d.dir.path().join("cache").display(),
        bin(),
        d.config_path.display(),
        src.display()
    );
    let tty = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let drawn = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{drawn}");
    assert!(
        drawn.contains("ETA") && drawn.contains("MiB"),
        "a progress bar: {drawn}"
    );
    // Off a terminal: no bar, only the result.
    let plain = ctl(
        &d,
        &[
            "upload",
            "vol1",
            &vfid,
            src.to_str().unwrap(),
            "--to",
            "again",
        ],
    )
    .output()
    .unwrap();
    assert!(plain.status.success());
    assert!(!String::from_utf8_lossy(&plain.stderr).contains("ETA"));
    assert!(String::from_utf8_lossy(&plain.stdout).contains("uploaded again/p.bin"));
}

#[tokio::test]
async fn sessions_from_the_command_line() {
    let d = Daemon::builder().agent().start().await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let vfid = run_json(
        &d,
        &[
            "folder",
            "create",
            "vol1",
            "--scope",
            &format!("user:{user}"),
        ],
    )["vfid"]
        .as_str()
        .unwrap()
        .to_string();
    let (_key, public) = keypair(d.dir.path(), "ctl");
    let pubfile = d.dir.path().join("ctl.pub");
    std::fs::write(&pubfile, public).unwrap();
    let created = run_json(
        &d,
        &[
            "session",
            "create",
            "sftp",
            "--user",
            &user.to_string(),
            "--mount",
            &format!("vol1:{vfid}:data"),
            "--key",
            pubfile.to_str().unwrap(),
        ],
    );
    let id = created["id"].as_str().unwrap().to_string();
    assert!(
        created["endpoints"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with("sftp://")
    );
    assert_eq!(created["state"], "running");
    let listed = run_json(&d, &["session", "list"]);
    assert!(listed["sessions"].to_string().contains(&id));
    let human = ctl(&d, &["session", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).starts_with("SESSION"));
    let gone = run_json(&d, &["session", "destroy", &id]);
    assert_eq!(gone["state"], "terminated");
    let cap = run_json(&d, &["capacity"]);
    assert!(cap["max_containers"].as_u64().unwrap() > 0);
}

/// `ctl upload --streams 4`: a big file goes as four partial uploads at once (tus
/// concatenation), is interrupted with Ctrl-C, and the same command resumes every stream from
/// where the server stands and joins them, byte-identical. Nothing is left in staging.
#[tokio::test]
async fn uploads_in_streams_resume_each_stream_and_join() {
    let d = Daemon::start().await;
    let vfid = run_json(&d, &["folder", "create", "vol1"])["vfid"]
        .as_str()
        .unwrap()
        .to_string();
    let src = d.dir.path().join("streams.bin");
    // Four streams of 64 MiB (where ctl cuts), the last a little shorter.
    let len: u64 = (256 << 20) - 4321;
    random_file(&src, len, 11);
    let args = [
        "--json",
        "upload",
        "vol1",
        &vfid,
        src.to_str().unwrap(),
        "--chunk",
        "4m",
        "--streams",
        "4",
    ];
    let child = started_upload(&d, &args);
    // Interrupted once the streams are under way (the remembered upload lists its partials).
    let remembered = d.dir.path().join("cache/storage-agent/ctl-uploads");
    let deadline = Instant::now() + crate::common::OUTCOME;
    loop {
        let text = std::fs::read_dir(&remembered)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect::<String>();
        if text.matches("partial=").count() == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the streams never started: {text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let first = child.wait_with_output().unwrap();
    if first.status.success() {
        panic!("the upload finished before it could be interrupted; make the file bigger");
    }
    assert_eq!(
        first.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = json_of(&ctl(&d, &args).output().unwrap());
    let up = &second["results"][0]["uploaded"][0];
    assert_eq!(up["size"], len);
    assert_eq!(up["streams"], 4, "{up}");
    assert!(
        up["resumed_from"].as_u64().unwrap() > 0,
        "resumed, not started over: {up}"
    );
    assert_eq!(
        sha256_file(&d.vfolder_path(&vfid).join("streams.bin")),
        sha256_file(&src),
        "byte-identical after the resume"
    );
    let qs =
        uuid::Uuid::parse_str(vfid.split_once(':').unwrap().1.split_once('/').unwrap().0).unwrap();
    let staging_dir = d.vol_dir.join(qs.simple().to_string()).join(".upload");
    assert!(
        staging_dir.is_dir(),
        "the streams were staged in {staging_dir:?}"
    );
    let staging: Vec<_> = std::fs::read_dir(&staging_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(staging.is_empty(), "staging left behind: {staging:?}");
}

/// `ctl upload` run again at once after a Ctrl-C, while the server is still finishing the PATCH
/// it was sent (the daemon is held stopped across the interruption, so the rerun's first
/// requests race the server's bookkeeping): it waits for the server and completes the upload.
#[tokio::test]
async fn an_upload_rerun_at_once_waits_for_the_server_to_settle() {
    let d = Daemon::start().await;
    let vfid = run_json(&d, &["folder", "create", "vol1"])["vfid"]
        .as_str()
        .unwrap()
        .to_string();
    let src = d.dir.path().join("mid.bin");
    random_file(&src, 96 << 20, 3);
    let args = [
        "--json",
        "upload",
        "vol1",
        &vfid,
        src.to_str().unwrap(),
        "--chunk",
        "8m",
    ];
    let child = started_upload(&d, &args);
    std::thread::sleep(Duration::from_millis(300));
    let daemon = nix::unistd::Pid::from_raw(d.pid() as i32);
    let signal = |pid, sig| nix::sys::signal::kill(pid, sig).unwrap();
    use nix::sys::signal::Signal::{SIGCONT, SIGINT, SIGSTOP};
    signal(daemon, SIGSTOP);
    signal(nix::unistd::Pid::from_raw(child.id() as i32), SIGINT);
    let first = child.wait_with_output().unwrap();
    let rerun = ctl(&d, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    signal(daemon, SIGCONT);
    let second = rerun.wait_with_output().unwrap();
    if first.status.success() {
        panic!("the upload finished before it could be interrupted; make the file bigger");
    }
    let up = &json_of(&second)["results"][0]["uploaded"][0];
    assert_eq!(up["size"], 96 << 20);
    assert_eq!(
        sha256_file(&d.vfolder_path(&vfid).join("mid.bin")),
        sha256_file(&src),
        "byte-identical after the rerun"
    );
}

/// `ctl upload --streams 4` into an S3 volume: the streams declare where they go, so their
/// parts go straight into the destination's multipart upload and the join copies nothing (the
/// volume never makes its bucket of partial uploads).
#[tokio::test]
async fn uploads_in_streams_into_s3_copy_nothing() {
    let moto = crate::common::moto::Moto::start();
    let d = Daemon::builder().s3(&moto.endpoint(), "ctl-").start().await;
    let vfid = run_json(&d, &["folder", "create", "vol1"])["vfid"]
        .as_str()
        .unwrap()
        .to_string();
    let src = d.dir.path().join("s3streams.bin");
    let len: u64 = (200 << 20) + 5;
    random_file(&src, len, 12);
    let out = run_json(
        &d,
        &[
            "upload",
            "vol1",
            &vfid,
            src.to_str().unwrap(),
            "--streams",
            "4",
        ],
    );
    assert_eq!(out["results"][0]["uploaded"][0]["streams"], 4, "{out}");
    let got = crate::backends::s3_object(
        &moto,
        &crate::backends::bucket_of("ctl-", &vfid),
        "s3streams.bin",
    )
    .expect("the object");
    assert!(got == std::fs::read(&src).unwrap(), "byte-identical");
    assert!(
        !moto.buckets().contains(&"ctl-partials".to_string()),
        "no stream needed an object of its own: {:?}",
        moto.buckets()
    );
}
