//! File browser sessions over HTTPS (the dufs engine, built here), checked with curl against the
//! node CA, openssl s_client, and a real headless Chromium; the official Filebrowser engine when
//! its image is present.

use std::path::{Path, PathBuf};
use std::process::Command;

use storage_agent::pb;

use crate::common::agent::{ContainerGuard, KERNEL_GID, KERNEL_UID, inspect, mount, text};
use crate::common::tools::require;
use crate::common::{Builder, Daemon, run};

/// The dufs binary scripts/testenv.sh installs.
pub fn dufs_binary() -> PathBuf {
    let p = std::env::var_os("DUFS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("SA_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/storage-agent")
                });
            home.join("dufs/bin/dufs")
        });
    assert!(
        p.is_file(),
        "the dufs binary is required at {} (scripts/testenv.sh dufs installs it, or set DUFS_BIN)",
        p.display()
    );
    p
}

pub trait FilebrowserBuilder {
    fn filebrowser(self) -> Self;
}

impl FilebrowserBuilder for Builder {
    fn filebrowser(self) -> Self {
        self.agent().set("agent.filebrowser.engine", "dufs").set(
            "agent.filebrowser.dufs-binary",
            dufs_binary().display().to_string(),
        )
    }
}

pub fn fb_req(user: &uuid::Uuid, mounts: Vec<pb::Mount>) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        kind: pb::SessionKind::Filebrowser as i32,
        user_id: user.to_string(),
        resource_group: "storage".into(),
        mounts,
        ..Default::default()
    }
}

/// Starts a file browser session for `user` with their vfolder `vf` mounted as `work`.
pub async fn start_fb(d: &Daemon, user: &uuid::Uuid, vf: &str) -> pb::CreateSessionResponse {
    d.rpc()
        .await
        .create_session(fb_req(user, vec![mount("vol1", vf, "work", false)]))
        .await
        .expect("create file browser session")
        .into_inner()
}

/// curl with the session's CA pinned; returns (status, body).
pub fn curl(ca: &Path, args: &[&str]) -> (u16, Vec<u8>) {
    require("curl", "apt-get install curl");
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("b");
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca)
        .args(["-o"])
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, std::fs::read(&body).unwrap_or_default())
}

#[tokio::test]
async fn dufs_session_over_https() {
    let d = Daemon::builder().filebrowser().start().await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (rw_vf, rw_path) = d.user_vfolder(&user).await;
    let (ro_vf, ro_path) = d.user_vfolder(&user).await;
    std::fs::write(ro_path.join("readme.txt"), b"read only").unwrap();
    let outside = d.dir.path().join("outside-secret.txt");
    std::fs::write(&outside, b"must not leak").unwrap();
    std::os::unix::fs::symlink(&outside, rw_path.join("leak")).unwrap();
    let mut rpc = d.rpc().await;
    let created = rpc
        .create_session(fb_req(
            &user,
            vec![
                mount("vol1", &rw_vf, "work", false),
                mount("vol1", &ro_vf, "shared", true),
            ],
        ))
        .await
        .expect("create file browser session")
        .into_inner();
    let s = created.session.unwrap();
    assert_eq!(s.state, pb::SessionState::Running as i32);
    assert!(created.password.len() >= 16);
    assert!(
        created
            .ca_cert_pem
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(s.tls_cert_fingerprint.starts_with("SHA256:"));
    let ep = &s.endpoints[0];
    assert_eq!(ep.protocol, "https");
    let port = ep.port;
    assert_eq!(ep.url, format!("https://127.0.0.1:{port}/"));
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, &created.ca_cert_pem).unwrap();
    // The node's session CA in the state dir is the one returned, key 0600.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::read_to_string(d.state_dir.join("tls/sessions-ca.crt")).unwrap(),
        created.ca_cert_pem
    );
    assert_eq!(
        std::fs::metadata(d.state_dir.join("tls/sessions-ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let base = format!("https://127.0.0.1:{port}");
    let auth = format!("work:{}", created.password);
    // 401 without or with wrong credentials.
    assert_eq!(curl(&ca, &[&format!("{base}/")]).0, 401);
    assert_eq!(curl(&ca, &["-u", "work:wrong", &format!("{base}/")]).0, 401);
    // List (JSON and the HTML page).
    let (code, body) = curl(&ca, &["-u", &auth, &format!("{base}/?json")]);
    assert_eq!(code, 200);
    let listing: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<&str> = listing["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"work") && names.contains(&"shared"),
        "{names:?}"
    );
    let (code, html) = curl(&ca, &["-u", &auth, &format!("{base}/")]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&html).contains("<html"));
    // Upload to the read-write mount: byte-identical on disk, owned by the kernel uid.
    let src = d.dir.path().join("up.bin");
    crate::common::random_file(&src, 2 << 20, 5);
    let (code, _) = curl(
        &ca,
        &[
            "-u",
            &auth,
            "-T",
            src.to_str().unwrap(),
            &format!("{base}/work/dir/up.bin"),
        ],
    );
    assert_eq!(code, 201);
    let landed = rw_path.join("dir/up.bin");
    assert_eq!(
        crate::common::sha256_file(&landed),
        crate::common::sha256_file(&src)
    );
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&landed).unwrap();
    assert_eq!((md.uid(), md.gid()), (KERNEL_UID, KERNEL_GID));
    let (code, body) = curl(&ca, &["-u", &auth, &format!("{base}/work/dir/up.bin")]);
    assert_eq!(code, 200);
    assert_eq!(body, std::fs::read(&src).unwrap());
    // The read-only mount refuses uploads and deletes. (A small body: dufs answers 403 before
    // reading it, and curl would see a reset while still sending a large one.)
    let small = d.dir.path().join("small.txt");
    std::fs::write(&small, b"nope").unwrap();
    // dufs may close right after its 403, before curl reads it (curl then reports 000): ask
    // again until an HTTP status comes back.
    let mut code = 0;
    for _ in 0..5 {
        code = curl(
            &ca,
            &[
                "-u",
                &auth,
                "-T",
                small.to_str().unwrap(),
                &format!("{base}/shared/new.bin"),
            ],
        )
        .0;
        if code != 0 {
            break;
        }
    }
    assert_eq!(code, 403);
    let (code, _) = curl(
        &ca,
        &[
            "-u",
            &auth,
            "-X",
            "DELETE",
            &format!("{base}/shared/readme.txt"),
        ],
    );
    assert_eq!(code, 403);
    assert!(ro_path.join("readme.txt").exists() && !ro_path.join("new.bin").exists());
    // Path escapes through the browser fail; the symlink out of the vfolder is not followed.
    for p in [
        "/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/work/leak",
    ] {
        let (code, body) = curl(&ca, &["-u", &auth, "--path-as-is", &format!("{base}{p}")]);
        assert!(code >= 400, "{p}: {code}");
        assert!(!String::from_utf8_lossy(&body).contains("must not leak"));
        assert!(!String::from_utf8_lossy(&body).contains("root:x:0"));
    }
    // Deleting on the read-write mount works.
    let (code, _) = curl(
        &ca,
        &[
            "-u",
            &auth,
            "-X",
            "DELETE",
            &format!("{base}/work/dir/up.bin"),
        ],
    );
    assert_eq!(code, 204);
    assert!(!landed.exists());

    // Plain HTTP on the HTTPS port never serves files.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-m",
            "5",
            "-u",
            &auth,
            &format!("http://127.0.0.1:{port}/shared/readme.txt"),
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("read only"),
        "{}",
        text(&out)
    );

    // The served certificate chains to the node CA and names the public host.
    require("openssl", "apt-get install openssl");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo | openssl s_client -connect 127.0.0.1:{port} -CAfile {} -verify_return_error -showcerts 2>&1",
            ca.display()
        ))
        .output()
        .unwrap();
    let s_client = String::from_utf8_lossy(&out.stdout);
    assert!(
        s_client.contains("Verify return code: 0 (ok)"),
        "{s_client}"
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo | openssl s_client -connect 127.0.0.1:{port} 2>/dev/null | openssl x509 -noout -ext subjectAltName -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    let x = String::from_utf8_lossy(&out.stdout);
    assert!(x.contains("IP Address:127.0.0.1"), "{x}");
    assert!(
        x.to_uppercase().contains(
            &s.tls_cert_fingerprint
                .trim_start_matches("SHA256:")
                .to_uppercase()
        ),
        "{x} vs {}",
        s.tls_cert_fingerprint
    );

    // The same limits and hardening as SFTP sessions, with no capabilities at all.
    let c = inspect(&s.container_id);
    let hc = &c["HostConfig"];
    assert_eq!(hc["NanoCpus"], 1_000_000_000i64);
    assert_eq!(hc["Memory"], 1i64 << 30);
    assert_eq!(hc["PidsLimit"], 256);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert!(hc["CapAdd"].as_array().is_none_or(|a| a.is_empty()));
    assert_eq!(hc["SecurityOpt"], serde_json::json!(["no-new-privileges"]));
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert_eq!(c["Config"]["User"], format!("{KERNEL_UID}:{KERNEL_GID}"));
    assert_eq!(
        c["Config"]["Labels"]["ai.backend.storage-agent.kind"],
        "filebrowser"
    );
    let args = c["Args"].to_string();
    assert!(
        !args.contains(&created.password),
        "the plaintext password is not in the container's arguments"
    );

    // A real browser loads the page (screenshot kept for the record).
    screenshot(&d, &base, &created.password, &ca).await;

    rpc.destroy_session(pb::DestroySessionRequest { id: s.id })
        .await
        .unwrap();
    assert!(d.containers().is_empty());
}

/// scripts/screenshot.sh drives headless Chromium with the session certificate pinned.
async fn screenshot(d: &Daemon, base: &str, password: &str, ca: &Path) {
    require("chromium", "apt-get install chromium");
    require("socat", "apt-get install socat");
    let out_png = std::env::var_os("SCREENSHOT_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| d.dir.path().join("filebrowser.png"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/screenshot.sh");
    let o = run(Command::new("bash")
        .arg(&script)
        .arg(format!("{base}/work/"))
        .arg("work")
        .arg(password)
        .arg(ca)
        .arg(&out_png));
    let png = std::fs::read(&out_png).unwrap_or_else(|e| panic!("no screenshot ({e}): {o}"));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        png.len() > 5_000,
        "a blank page would be tiny: {} bytes",
        png.len()
    );
}

#[tokio::test]
async fn filebrowser_sessions_reject_keys_and_need_the_dufs_binary() {
    let d = Daemon::builder()
        .agent()
        .set("agent.filebrowser.dufs-binary", "/nonexistent/dufs")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let mut rpc = d.rpc().await;
    let mut r = fb_req(&user, vec![mount("vol1", &vf, "work", false)]);
    r.credentials = Some(pb::Credentials {
        public_keys: vec!["ssh-ed25519 AAAA".into()],
        generate_password: false,
    });
    assert_eq!(
        rpc.create_session(r).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let e = rpc
        .create_session(fb_req(&user, vec![mount("vol1", &vf, "work", false)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("dufs-binary"), "{}", e.message());
    d.assert_nothing_left().await;
}

/// The official Filebrowser engine runs a registry image. Where that image is present, the
/// session is driven end to end. Where it is absent and no registry answers (this machine and CI
/// have no Docker Hub), CreateSession must fail at once with UNAVAILABLE naming the image, and
/// leave no container and no reservation behind.
#[tokio::test]
async fn official_filebrowser_engine() {
    const IMAGE: &str = "filebrowser/filebrowser:v2.63.23";
    crate::common::agent::require_docker();
    let present = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !present {
        official_engine_without_its_image_fails_clearly(IMAGE).await;
        return;
    }
    let d = Daemon::builder()
        .agent()
        .set("agent.filebrowser.engine", "filebrowser")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vf, path) = d.user_vfolder(&user).await;
    std::fs::write(path.join("hello.txt"), b"hello").unwrap();
    let c = start_fb(&d, &user, &vf).await;
    let s = c.session.unwrap();
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, &c.ca_cert_pem).unwrap();
    let base = format!("https://127.0.0.1:{}", s.endpoints[0].port);
    let login = serde_json::json!({"username": "work", "password": c.password}).to_string();
    let (code, token) = curl(
        &ca,
        &["-X", "POST", "-d", &login, &format!("{base}/api/login")],
    );
    assert_eq!(code, 200);
    let token = String::from_utf8_lossy(&token).to_string();
    let (code, body) = curl(
        &ca,
        &[
            "-H",
            &format!("X-Auth: {token}"),
            &format!("{base}/api/resources/work/hello.txt"),
        ],
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, _) = curl(
        &ca,
        &[
            "-X",
            "POST",
            "-d",
            "{\"username\":\"work\",\"password\":\"wrong\"}",
            &format!("{base}/api/login"),
        ],
    );
    assert_eq!(code, 403);
}

async fn official_engine_without_its_image_fails_clearly(image: &str) {
    let d = Daemon::builder()
        .agent()
        .set("agent.filebrowser.engine", "filebrowser")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let mut rpc = d.rpc().await;
    let call = rpc.create_session(fb_req(&user, vec![mount("vol1", &vf, "work", false)]));
    let e = tokio::time::timeout(std::time::Duration::from_secs(150), call)
        .await
        .expect("a pull from an unreachable registry ends with an answer")
        .expect_err(&format!("{image} is not present and cannot be pulled here"));
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(image) && e.message().contains("cannot be pulled"),
        "{}",
        e.message()
    );
    d.assert_nothing_left().await;
}

#[tokio::test]
async fn filebrowser_sessions_are_adopted_after_kill9() {
    let mut d = Daemon::builder().filebrowser().start().await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vf, path) = d.user_vfolder(&user).await;
    std::fs::write(path.join("kept.txt"), b"kept").unwrap();
    let created = start_fb(&d, &user, &vf).await;
    let s = created.session.unwrap();
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, &created.ca_cert_pem).unwrap();
    d.restart().await;
    let got = d.session(&s.id).await;
    assert_eq!(got.state, pb::SessionState::Running as i32);
    let (code, body) = curl(
        &ca,
        &[
            "-u",
            &format!("work:{}", created.password),
            &format!("https://127.0.0.1:{}/work/kept.txt", s.endpoints[0].port),
        ],
    );
    assert_eq!((code, body.as_slice()), (200, &b"kept"[..]));
    let cap = d.capacity().await;
    let fb = cap
        .kinds
        .iter()
        .find(|k| k.kind == pb::SessionKind::Filebrowser as i32)
        .unwrap();
    assert_eq!(fb.running, 1);
}

/// `docker image prune` while the daemon runs: the next session builds the image again instead
/// of failing on a tag the daemon remembered.
#[tokio::test]
async fn a_pruned_session_image_is_built_again() {
    crate::common::agent::require_docker();
    // A base of its own gives this test an image tag no other test uses.
    let base = format!("sa-test/prune-base:{}", uuid::Uuid::new_v4().simple());
    run(Command::new("docker").args(["tag", crate::common::agent::BASE_IMAGE, &base]));
    let d = Daemon::builder()
        .filebrowser()
        .set("agent.base-image", base.clone())
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let first = start_fb(&d, &user, &vf).await.session.unwrap();
    let image = inspect(&d.containers()[0])["Config"]["Image"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(image.starts_with("storage-agent/filebrowser:"), "{image}");
    d.rpc()
        .await
        .destroy_session(pb::DestroySessionRequest { id: first.id })
        .await
        .unwrap();
    run(Command::new("docker").args(["rmi", &image]));

    let again = start_fb(&d, &user, &vf).await.session.unwrap();
    assert_eq!(again.state, pb::SessionState::Running as i32);
    assert_eq!(
        inspect(&d.containers()[0])["Config"]["Image"],
        image.as_str()
    );
    d.rpc()
        .await
        .destroy_session(pb::DestroySessionRequest { id: again.id })
        .await
        .unwrap();
    run(Command::new("docker").args(["rmi", &image, &base]));
}
