//! Memory stays flat in file size: the daemon's peak RSS (VmHWM, reset between phases through
//! /proc/<pid>/clear_refs) during a 1 GiB upload and a 1 GiB download stays under 64 MiB.
//! `bench/` runs the same check at 10 GiB.

use std::process::Command;

use serde_json::json;

use crate::common::{Daemon, run};

const LIMIT_KIB: u64 = 64 * 1024;

pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

pub fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

#[tokio::test]
async fn one_gib_up_and_down_in_flat_memory() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let size: u64 = 1 << 30;
    let src = d.dir.path().join("src.bin");
    // Sparse: reading it costs no disk, and the daemon still moves every byte.
    std::fs::File::create(&src).unwrap().set_len(size).unwrap();
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "big.bin", "size": size}),
        )
        .await;

    reset_peak(d.pid());
    let url = d.url("client", &format!("/upload?token={t}"));
    let code = run(Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/offset+octet-stream",
            "-H",
            "Upload-Offset: 0",
            "-H",
            "Expect:",
            "-T",
        ])
        .arg(&src)
        .arg(&url));
    assert_eq!(code, "204");
    let up = peak_rss_kib(d.pid());
    assert_eq!(std::fs::metadata(path.join("big.bin")).unwrap().len(), size);

    reset_peak(d.pid());
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "big.bin"}),
        )
        .await;
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ])
        .arg(d.url("client", &format!("/download?token={t}"))));
    assert_eq!(out, format!("200 {size}"));
    let down = peak_rss_kib(d.pid());
    eprintln!("peak RSS: upload {up} KiB, download {down} KiB");
    assert!(up < LIMIT_KIB, "upload peak RSS {up} KiB");
    assert!(down < LIMIT_KIB, "download peak RSS {down} KiB");
}
