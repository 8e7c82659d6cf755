//! The daemon in its own container (`docker/storage-agent/Dockerfile`, the prebuilt target with
//! the binary under test on the local base image): it starts, serves the APIs on the host
//! network, keeps its state in the mounted state dir, and has the tools it drives (rclone).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::agent::require_docker;
use crate::common::redis::free_port;
use crate::common::{MANAGER_SECRET, bin, run};

struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

#[tokio::test]
async fn the_daemon_runs_in_its_container() {
    require_docker();
    let root = env!("CARGO_MANIFEST_DIR");
    // The binary under test, from the build context (.dockerignore lets exactly it through).
    let binary = std::path::Path::new(bin())
        .strip_prefix(root)
        .expect("the binary is built inside the repository")
        .to_string_lossy()
        .into_owned();
    let base = std::env::var("BASE_IMAGE").unwrap_or_else(|_| "localbase:bookworm-slim".into());
    let tag = format!("storage-agent-test:{}", std::process::id());
    run(Command::new("docker")
        .current_dir(root)
        .args([
            "build",
            "-q",
            "-f",
            "docker/storage-agent/Dockerfile",
            "--target",
            "prebuilt",
        ])
        .args(["--build-arg", &format!("BASE_IMAGE={base}")])
        .args(["--build-arg", &format!("BINARY={binary}"), "-t", &tag, "."]));
    let _image = Image(tag.clone());

    let dir = tempfile::tempdir().unwrap();
    let (vol, state) = (dir.path().join("vol1"), dir.path().join("state"));
    std::fs::create_dir_all(&vol).unwrap();
    let port = free_port();
    let internal = free_port();
    let config = dir.path().join("storage-agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[storage-proxy]
node-id = "container-test"
[storage-agent]
state-dir = "{state}"
[api.client]
service-addr = "127.0.0.1:0"
[api.manager]
service-addr = "127.0.0.1:{port}"
internal-addr = "127.0.0.1:{internal}"
secret = "{MANAGER_SECRET}"
[volume.vol1]
backend = "vfs"
path = "{vol}"
[agent]
enabled = false
"#,
            state = state.display(),
            vol = vol.display()
        ),
    )
    .unwrap();
    let name = format!("storage-agent-test-{}", std::process::id());
    let d = dir.path().display().to_string();
    run(Command::new("docker")
        .args(["run", "-d", "--name", &name, "--network", "host"])
        .args(["-v", &format!("{d}:{d}")])
        .args([&tag, "serve", "--config", &config.display().to_string()]));
    let _container = Removed(name.clone());

    let http = reqwest::Client::new();
    let deadline = Instant::now() + crate::common::OUTCOME;
    let status = loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/status"))
            .send()
            .await
        {
            break r.json::<serde_json::Value>().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the container never answered: {}",
            String::from_utf8_lossy(
                &Command::new("docker")
                    .args(["logs", &name])
                    .output()
                    .unwrap()
                    .stderr
            )
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["status"], "ok");
    let vols = http
        .get(format!("http://127.0.0.1:{port}/volumes"))
        .header("X-BackendAI-Storage-Auth-Token", MANAGER_SECRET)
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(vols["volumes"][0]["path"], vol.display().to_string());
    let ready = http
        .get(format!("http://127.0.0.1:{internal}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(
        state.join("state.db").exists(),
        "state in the mounted state dir"
    );
    let rclone = run(Command::new("docker").args(["exec", &name, "rclone", "version"]));
    assert!(rclone.starts_with("rclone v"), "{rclone}");
}

/// Removes the image when the test ends.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}
