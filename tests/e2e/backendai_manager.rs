//! The real Backend.AI manager 26.9.6 in front of storage-agent, as users meet it: PostgreSQL,
//! etcd, Redis, the manager with upstream's example fixtures, the Python storage proxy 26.9.6 and
//! storage-agent registered side by side (`tests/manager/stack.sh`). One vfolder lifecycle is
//! driven through the manager with the `backend.ai` client CLI 26.9.6 against each proxy
//! (`tests/manager/scenario.py`); every step must end the same on both, bar the deliberate
//! differences listed below. Then storage-agent is started in the Python proxy's place from that
//! proxy's own, unmodified `storage-proxy.toml` and serves its vfolders.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::bin;

/// Steps whose outcome differs on purpose, and why (README, "Where it deliberately differs").
const DELIBERATE_DIFFERENCES: &[(&str, &str)] = &[(
    "rm-dir-not-recursive",
    "deleting a non-empty directory without recursive is a 400 (ENOTEMPTY) here; the Python \
     proxy answers 200 and keeps the directory, so the user is told it was deleted",
)];

const MANAGER: &str = "http://127.0.0.1:18081";

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manager")
}

fn venv() -> PathBuf {
    let cache = std::env::var_os("SA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/storage-agent")
        });
    cache.join("mgr-venv")
}

/// The cluster of `stack.sh`, stopped when dropped (also when the test fails).
struct Stack {
    dir: tempfile::TempDir,
}

impl Stack {
    fn up() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sa-mgr-")
            .tempdir()
            .expect("tempdir");
        // PostgreSQL runs as the "postgres" user: it must reach its directory below this one.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let stack = Stack { dir };
        let out = stack.script("up");
        assert!(
            out.status.success(),
            "the manager stack did not come up (install: scripts/testenv.sh manager):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stack
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn script(&self, action: &str) -> Output {
        Command::new(here().join("stack.sh"))
            .arg(action)
            .env("E2E_DIR", self.path())
            .env("SA_BIN", bin())
            .env("VENV", venv())
            .output()
            .expect("run tests/manager/stack.sh")
    }

    /// Runs `scenario.py MODE` on a vfolder host; the outcome of every step, by step name.
    fn scenario(&self, mode: &str, host: &str, name: &str) -> Vec<(String, Value)> {
        let work = self.path().join("work").join(name);
        let out = Command::new(venv().join("bin/python"))
            .arg(here().join("scenario.py"))
            .args([mode, "--host", host, "--name", name, "--work"])
            .arg(&work)
            .env("BACKEND_ENDPOINT", MANAGER)
            .output()
            .expect("run tests/manager/scenario.py");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "scenario {mode} on {host} failed:\n{stderr}"
        );
        let steps: Vec<Value> = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("scenario output is not JSON ({e}):\n{stderr}"));
        steps
            .into_iter()
            .map(|mut s| {
                let step = s["step"].as_str().unwrap_or_default().to_string();
                s.as_object_mut().map(|o| o.remove("step"));
                (step, s)
            })
            .collect()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join("logs").join(name)).unwrap_or_default()
    }

    /// The manager log's length, to look only at what a scenario made it write.
    fn manager_log_len(&self) -> usize {
        self.log("manager.log").len()
    }

    /// ERROR records the manager wrote since `from` (a record's traceback comes with it).
    fn manager_errors_since(&self, from: usize) -> Vec<String> {
        let log = self.log("manager.log");
        log.get(from..)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let out = self.script("down");
        if !out.status.success() {
            eprintln!("stack.sh down: {}", String::from_utf8_lossy(&out.stderr));
        }
        if std::thread::panicking() {
            for log in ["manager.log", "storage-agent.log", "storage-agent-swap.log"] {
                let text = self.log(log);
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- tail of {log}");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn require_manager_venv() {
    let cli = venv().join("bin/backend.ai");
    assert!(
        cli.exists(),
        "Backend.AI manager 26.9.6 is required ({}): run scripts/testenv.sh manager",
        cli.display()
    );
}

/// Steps that end differently on the two proxies (the deliberate differences excepted).
fn differences(sa: &[(String, Value)], py: &[(String, Value)]) -> Vec<String> {
    let names = |s: &[(String, Value)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(sa), names(py), "both scenarios run the same steps");
    sa.iter()
        .zip(py)
        .filter(|((step, a), (_, b))| {
            a != b && !DELIBERATE_DIFFERENCES.iter().any(|(d, _)| d == step)
        })
        .map(|((step, a), (_, b))| format!("{step}: storage-agent {a} / Python proxy {b}"))
        .collect()
}

/// A status poll that gave up is a hang, even when both proxies hang alike.
fn no_timeouts(steps: &[(String, Value)]) {
    for (step, o) in steps {
        let timed_out =
            o["hang"] == true || o["data"].as_str().is_some_and(|d| d.starts_with("timeout"));
        assert!(!timed_out, "{step} timed out: {o}");
    }
}

fn outcome<'a>(steps: &'a [(String, Value)], step: &str) -> &'a Value {
    &steps
        .iter()
        .find(|(n, _)| n == step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .1
}

#[test]
fn the_real_manager_drives_storage_agent_as_it_drives_the_python_proxy() {
    require_manager_venv();
    let stack = Stack::up();

    // One proxy at a time, so every ERROR the manager logs in a window is that proxy's.
    let from = stack.manager_log_len();
    let sa = stack.scenario("lifecycle", "sa:vfs1", "life-sa");
    let sa_errors = stack.manager_errors_since(from);
    let py = stack.scenario("lifecycle", "pyproxy:vfs1", "life-py");

    for steps in [&sa, &py] {
        no_timeouts(steps);
    }
    let diff = differences(&sa, &py);
    assert!(diff.is_empty(), "outcomes differ:\n{}", diff.join("\n"));
    assert!(
        sa_errors.is_empty(),
        "the manager logged ERRORs while it talked to storage-agent:\n{}",
        sa_errors.join("\n")
    );

    // The steps that matter most end well, not merely equally.
    for step in [
        "create",
        "upload",
        "upload-recursive",
        "download",
        "clone",
        "delete-trash",
    ] {
        assert_eq!(
            outcome(&sa, step)["ok"],
            true,
            "{step}: {}",
            outcome(&sa, step)
        );
    }
    assert_eq!(outcome(&sa, "clone-ready")["data"], "ready");
    let downloaded = &outcome(&sa, "downloaded")["data"];
    assert!(
        downloaded
            .as_object()
            .is_some_and(|o| o.values().all(|v| v == true)),
        "downloads match what was uploaded: {downloaded}"
    );

    // What the manager really sent: the upload size as a string, which we accept.
    let wire = stack.log("wire-sa.jsonl");
    let upload = wire
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["path"] == "/folder/file/upload")
        .expect("the manager asked storage-agent for an upload session");
    let body: Value = serde_json::from_str(upload["req_body"].as_str().unwrap_or_default())
        .expect("the upload request is JSON");
    let size = &body["size"];
    assert!(
        size.is_string(),
        "the manager sends the size as a string: {upload}"
    );

    // storage-agent in the Python proxy's place, from its unmodified storage-proxy.toml.
    let out = stack.script("swap");
    assert!(
        out.status.success(),
        "storage-agent did not start from the Python proxy's own config file:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from = stack.manager_log_len();
    let swapped = stack.scenario("swap", "pyproxy:vfs1", "life-py");
    let swap_errors = stack.manager_errors_since(from);
    no_timeouts(&swapped);
    let failed: Vec<String> = swapped
        .iter()
        .filter(|(_, o)| o["ok"] != true)
        .map(|(s, o)| format!("{s}: {o}"))
        .collect();
    assert!(failed.is_empty(), "after the swap:\n{}", failed.join("\n"));
    assert_eq!(outcome(&swapped, "downloaded")["data"], true);
    assert_eq!(outcome(&swapped, "clone-ready")["data"], "ready");
    assert!(
        swap_errors.is_empty(),
        "the manager logged ERRORs while storage-agent served the Python proxy's vfolders:\n{}",
        swap_errors.join("\n")
    );
}
