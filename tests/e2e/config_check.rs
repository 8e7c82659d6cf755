//! `storage-agent config check` and `serve` on broken configs: every problem is listed with its
//! key path, the bad value and what is allowed; `serve` refuses to start (exit ≠ 0, no listener).

use std::process::Command;

use crate::common::{Daemon, bin};

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["config", "check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn serve(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_config_checks_clean() {
    let b = Daemon::builder();
    let p = b.dir.path().join("ok.toml");
    std::fs::write(&p, toml::to_string(&b.config).unwrap()).unwrap();
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is valid"));
}

#[test]
fn every_problem_is_reported_and_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        r#"
[storage-proxy]
node-id = "has space"
secret = ""
session-expire = "soon"
scandir-limit = -5
max-upload-size = "lots"

[storage-agent]
log-format = "xml"
typo-key = 1

[api.client]
service-addr = "not-an-address"

[api.manager]
service-addr = "127.0.0.1:6999"
internal-addr = "127.0.0.1:6999"
ssl-enabled = true
ssl-cert = "/nonexistent.pem"

[volume.vol1]
backend = "nfs9"
path = "/does/not/exist"

[volume."bad name!"]
backend = "vfs"
"#,
    )
    .unwrap();
    let (code, _, err) = check(&p);
    assert_eq!(code, 2);
    for (key, value_part) in [
        ("storage-proxy.node-id", "has space"),
        ("storage-proxy.secret", "an empty secret"),
        ("storage-proxy.session-expire", "soon"),
        ("storage-proxy.scandir-limit", "-5"),
        ("storage-proxy.max-upload-size", "lots"),
        ("storage-agent.log-format", "xml"),
        ("storage-agent.typo-key", "unknown key"),
        ("api.client.service-addr", "not-an-address"),
        ("api.manager.internal-addr", "127.0.0.1:6999"),
        ("api.manager.ssl-privkey", "missing"),
        ("volume.vol1.backend", "nfs9"),
        ("volume.vol1.path", "/does/not/exist"),
        ("volume.bad name!", "volume name"),
        ("volume.bad name!.path", "missing"),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("- {key}:")))
            .unwrap_or_else(|| panic!("{key} not reported in:\n{err}"));
        assert!(line.contains(value_part), "{line}");
        assert!(line.contains("allowed:"), "{line}");
    }
    // serve refuses on the same problems and binds nothing.
    let (code, out, err2) = serve(&p);
    assert_ne!(code, 0);
    assert!(!out.contains("listening"), "{out}");
    assert!(err2.contains("refusing to start"), "{err2}");
    assert!(err2.contains("volume.vol1.path"));
}

#[test]
fn unreadable_and_invalid_toml() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, 2);
    assert!(err.contains("missing.toml"), "{err}");
    let p = dir.path().join("broken.toml");
    std::fs::write(&p, "[storage-proxy\nnode-id = ").unwrap();
    let (code, _, err) = check(&p);
    assert_eq!(code, 2);
    assert!(err.contains("not valid TOML"), "{err}");
}

#[test]
fn lookup_through_the_environment_and_embedded_default() {
    let b = Daemon::builder();
    let p = b.dir.path().join("env.toml");
    std::fs::write(&p, toml::to_string(&b.config).unwrap()).unwrap();
    let out = Command::new(bin())
        .args(["config", "check"])
        .env("STORAGE_AGENT_CONFIG", &p)
        .current_dir(b.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("env.toml"));
    // No file anywhere: the embedded default (a vfs volume under ./data).
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["config", "check"])
        .env_remove("STORAGE_AGENT_CONFIG")
        .env_remove("BACKEND_CONFIG_FILE")
        .env("HOME", empty.path())
        .current_dir(empty.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("embedded default"));
    assert!(empty.path().join("data/local").is_dir());
}

/// A Backend.AI node's file is found where the Python proxy finds it, relative paths in it are
/// relative to it, and (run as root) a file others could have planted or changed is refused.
#[test]
fn backend_ai_config_names_are_found_and_untrusted_files_refused() {
    use std::os::unix::fs::PermissionsExt;
    let b = Daemon::builder();
    let mut cfg = b.config.clone();
    let vol = b.dir.path().join("relvol");
    std::fs::create_dir(&vol).unwrap();
    cfg["volume"]["vol1"]["path"] = "relvol".into();
    let text = toml::to_string(&cfg).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let check_in = |cwd: &std::path::Path, env: &[(&str, &std::path::Path)]| {
        let mut c = Command::new(bin());
        c.args(["config", "check"])
            .env_remove("STORAGE_AGENT_CONFIG")
            .env_remove("BACKEND_CONFIG_FILE")
            .env("HOME", elsewhere.path())
            .current_dir(cwd);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // $BACKEND_CONFIG_FILE, from another working directory: "relvol" is next to the file.
    let py = b.dir.path().join("storage-proxy.toml");
    std::fs::write(&py, &text).unwrap();
    let (code, out, err) = check_in(elsewhere.path(), &[("BACKEND_CONFIG_FILE", &py)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("storage-proxy.toml is valid"), "{out}");

    // ./storage-proxy.toml in the working directory.
    let (code, out, err) = check_in(b.dir.path(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("storage-proxy.toml is valid"), "{out}");

    if !nix::unistd::geteuid().is_root() {
        return;
    }
    // Writable by others: refused as root, with what to do about it.
    std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, err) = check_in(b.dir.path(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lets others change it"), "{err}");
    // Owned by someone else: refused too.
    std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&py, Some(65534), None).unwrap();
    let (code, _, err) = check_in(b.dir.path(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("belongs to uid 65534"), "{err}");
}

#[tokio::test]
async fn busy_port_stops_the_start_completely() {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port();
    let b = Daemon::builder().set("api.client.service-addr", format!("127.0.0.1:{port}"));
    let p = b.dir.path().join("busy.toml");
    std::fs::write(&p, toml::to_string(&b.config).unwrap()).unwrap();
    let (code, out, err) = serve(&p);
    assert_ne!(code, 0);
    assert!(err.contains("binding the client API"), "{err}");
    assert!(!out.contains("ready"));
}

#[tokio::test]
async fn missing_secrets_are_generated_once_and_kept() {
    let mut d = Daemon::builder()
        .remove("storage-proxy", "secret")
        .remove("api", "nothing")
        .start()
        .await;
    // The manager secret in the config is still used; the JWT secret was generated.
    let secrets = d.state_dir.join("secrets.toml");
    let text = std::fs::read_to_string(&secrets).unwrap();
    assert!(text.contains("storage-proxy.secret"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        d.log_tail(200).contains("secrets.toml"),
        "the log says where the secret lives"
    );
    let (vfid, _) = d.create_vfolder().await;
    let t = d
        .token(
            "/folder/file/download",
            serde_json::json!({"volume": "vol1", "vfid": vfid, "relpath": "x"}),
        )
        .await;
    d.restart().await;
    assert_eq!(std::fs::read_to_string(&secrets).unwrap(), text);
    // A token minted before the restart still verifies (same key): the file is simply missing.
    let r = d.get("client", &format!("/download?token={t}")).await;
    assert_eq!(r.status, 404, "{}", r.text());
}

/// The documented sample stays a valid config (with its volume path pointed somewhere real).
#[test]
fn the_sample_config_is_valid() {
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/storage-agent.toml"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = sample
        .replace(
            "path = \"/vfroot/local\"",
            &format!("path = {:?}", dir.path()),
        )
        .replace(
            "state-dir = \"/var/lib/storage-agent\"",
            &format!("state-dir = {:?}", dir.path().join("state")),
        );
    let p = dir.path().join("sample.toml");
    std::fs::write(&p, text).unwrap();
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "{out}{err}");
}
