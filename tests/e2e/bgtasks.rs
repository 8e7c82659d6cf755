//! Background tasks across restarts: an interrupted delete resumes, an interrupted clone is
//! rolled back, SIGTERM leaves tasks to resume.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::Daemon;

fn many_files(dir: &std::path::Path, dirs: usize, per_dir: usize) {
    for i in 0..dirs {
        let sub = dir.join(format!("d{i:03}"));
        std::fs::create_dir_all(&sub).unwrap();
        for j in 0..per_dir {
            std::fs::write(sub.join(format!("f{j:04}")), b"0123456789").unwrap();
        }
    }
}

async fn wait_progress(d: &Daemon, id: &str) {
    let start = Instant::now();
    loop {
        let v = d
            .mgr("GET", &format!("/bgtask/{id}"), json!({}))
            .await
            .json();
        if v["progress"]["current"].as_u64().unwrap_or(0) > 0 || v["status"] != "running" {
            return;
        }
        assert!(start.elapsed() < crate::common::OUTCOME);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn interrupted_delete_resumes_after_kill9() {
    let mut d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    many_files(&path, 60, 500);
    let id = d.start_delete(&vfid).await;
    wait_progress(&d, &id).await;
    d.restart().await;
    let t = d.wait_task(&id).await;
    assert_eq!(t["status"], "done", "{t}");
    assert!(!path.exists());
}

#[tokio::test]
async fn interrupted_clone_is_rolled_back() {
    let mut d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    many_files(&path, 60, 500);
    let dst = crate::common::random_vfid();
    let id = d.start_clone(&vfid, &dst).await;
    wait_progress(&d, &id).await;
    d.restart().await;
    let t = d.wait_task(&id).await;
    if t["status"] == "done" {
        // The copy finished before the kill landed; then it must be complete.
        assert_eq!(std::fs::read_dir(d.vfolder_path(&dst)).unwrap().count(), 60);
    } else {
        assert_eq!(t["status"], "failed", "{t}");
        assert!(
            t["error"]
                .as_str()
                .unwrap()
                .contains("interrupted by a restart"),
            "{t}"
        );
        assert!(
            !d.vfolder_path(&dst).exists(),
            "the partial copy is removed"
        );
    }
    assert!(path.join("d000/f0000").exists(), "the source is untouched");
}

#[tokio::test]
async fn sigterm_during_delete_exits_zero_and_the_task_resumes() {
    let mut d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    many_files(&path, 60, 500);
    let id = d.start_delete(&vfid).await;
    wait_progress(&d, &id).await;
    assert_eq!(d.terminate(), Some(0));
    d.restart().await;
    let t = d.wait_task(&id).await;
    assert_eq!(t["status"], "done", "{t}");
    assert!(!path.exists());
}
