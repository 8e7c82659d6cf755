//! The quota-scope cases every quota-enforcing backend passes, against the real daemon and the
//! real kernel: btrfs on the host, XFS inside a VM booting a kernel with XFS quota (`mod.rs`).

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::common::{Daemon, Resp, send};

pub const MIB: u64 = 1 << 20;

/// What the kernel itself says a scope directory uses, read with the filesystem's own tool after
/// flushing what is pending (so the daemon reads the same settled number right after).
pub type KernelUsage = dyn Fn(&Path) -> u64;

fn qsid() -> String {
    format!("user:{}", uuid::Uuid::new_v4())
}

pub fn scope_dir(d: &Daemon, qs: &str) -> PathBuf {
    let id = uuid::Uuid::parse_str(qs.split_once(':').unwrap().1).unwrap();
    d.vol_dir.join(id.simple().to_string())
}

async fn scope(d: &Daemon, method: &str, qs: &str, limit: Option<u64>) -> Resp {
    let mut body = json!({"volume": "vol1", "qsid": qs});
    if let Some(l) = limit {
        body["options"] = json!({"limit_bytes": l});
    }
    let path = if method == "DELETE-QUOTA" {
        "/quota-scope/quota"
    } else {
        "/quota-scope"
    };
    let m = if method == "DELETE-QUOTA" {
        "DELETE"
    } else {
        method
    };
    d.mgr(m, path, body).await
}

async fn usage(d: &Daemon, qs: &str) -> (u64, Option<u64>) {
    let r = scope(d, "GET", qs, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["used_bytes"]
            .as_u64()
            .expect("used_bytes from the kernel"),
        v["limit_bytes"].as_u64(),
    )
}

async fn vfolder_in(d: &Daemon, qs: &str) -> (String, PathBuf) {
    let vfid = format!("{qs}/{}", uuid::Uuid::new_v4().simple());
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let p = d.vfolder_path(&vfid);
    (vfid, p)
}

async fn mint(d: &Daemon, vfid: &str, name: &str, size: u64) -> Resp {
    d.mgr(
        "POST",
        "/folder/file/upload",
        json!({"volume": "vol1", "vfid": vfid, "relpath": name, "size": size}),
    )
    .await
}

async fn patch(d: &Daemon, token: &str, offset: u64, body: Vec<u8>) -> Resp {
    send(
        d.http
            .patch(d.url("client", &format!("/upload?token={token}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .body(body),
    )
    .await
}

async fn head_offset(d: &Daemon, token: &str) -> u64 {
    let r = send(
        d.http
            .head(d.url("client", &format!("/upload?token={token}"))),
    )
    .await;
    assert_eq!(r.status, 200);
    r.header("upload-offset").unwrap().parse().unwrap()
}

/// An upload of `size` bytes of `byte` in one PATCH; returns the PATCH's answer.
async fn upload(d: &Daemon, vfid: &str, name: &str, size: u64, byte: u8) -> Resp {
    let r = mint(d, vfid, name, size).await;
    assert_eq!(r.status, 200, "mint: {}", r.text());
    let t = r.json()["token"].as_str().unwrap().to_string();
    patch(d, &t, 0, vec![byte; size as usize]).await
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

pub async fn quota_scopes(d: &mut Daemon, kernel_used: &KernelUsage) {
    // /volumes says the backend enforces quota.
    let r = d
        .mgr_raw("GET", "/volumes", None, Some(crate::common::MANAGER_SECRET))
        .await;
    let caps = r.json()["volumes"][0]["capabilities"].clone();
    assert!(caps.as_array().unwrap().contains(&json!("quota")), "{caps}");

    // A scope limited to 10 MiB: 9 MiB fit, the next 2 MiB are refused up front (413).
    let a = qsid();
    let r = scope(d, "POST", &a, Some(10 * MIB)).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(usage(d, &a).await.1, Some(10 * MIB));
    let (va, pa) = vfolder_in(d, &a).await;
    let r = upload(d, &va, "nine.bin", 9 * MIB, 1).await;
    assert_eq!(r.status, 204, "{}", r.text());
    kernel_used(&scope_dir(d, &a));
    let r = mint(d, &va, "two.bin", 2 * MIB).await;
    let p = r.problem(413);
    assert_eq!(p["data"]["reason"], "quota", "{p}");
    assert_eq!(p["data"]["limit"], 10 * MIB);
    assert_eq!(p["data"]["needed"], 2 * MIB);
    assert!(p["data"]["used"].as_u64().unwrap() >= 9 * MIB, "{p}");

    // Usage is the kernel's own number, read in O(1).
    let kernel = kernel_used(&scope_dir(d, &a));
    let (used, _) = usage(d, &a).await;
    assert_eq!(used, kernel, "GET /quota-scope and the kernel's report");
    assert!(used >= 9 * MIB);

    // Unset: no limit any more, and writes pass; set again: enforced again.
    let r = scope(d, "DELETE-QUOTA", &a, None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(usage(d, &a).await.1, None);
    let r = upload(d, &va, "two.bin", 2 * MIB, 2).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = scope(d, "PATCH", &a, Some(12 * MIB)).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(usage(d, &a).await.1, Some(12 * MIB));
    kernel_used(&scope_dir(d, &a));
    mint(d, &va, "more.bin", 2 * MIB).await.problem(413);

    // Two scopes: one's writes are not the other's usage.
    let b = qsid();
    assert_eq!(scope(d, "POST", &b, Some(50 * MIB)).await.status, 204);
    let (vb, _) = vfolder_in(d, &b).await;
    let before_a = kernel_used(&scope_dir(d, &a));
    let r = upload(d, &vb, "b.bin", 3 * MIB, 3).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let after_a = kernel_used(&scope_dir(d, &a));
    let after_b = kernel_used(&scope_dir(d, &b));
    assert_eq!(before_a, after_a, "scope a does not see b's writes");
    assert!((3 * MIB..10 * MIB).contains(&after_b), "{after_b}");
    assert_eq!(usage(d, &b).await.0, after_b);

    // A chunked upload that runs into the limit, well past it (CephFS stops writers a little
    // late): 507 with its offset intact; raising the limit lets it finish, byte-identical.
    let c = qsid();
    assert_eq!(scope(d, "POST", &c, Some(10 * MIB)).await.status, 204);
    let (vc, pc) = vfolder_in(d, &c).await;
    let _ = pa;
    let r = mint(d, &vc, "big.bin", 8 * MIB).await;
    assert_eq!(
        r.status,
        200,
        "8 MiB fit an empty 10 MiB scope: {}",
        r.text()
    );
    let token = r.json()["token"].as_str().unwrap().to_string();
    // Someone else (a session) fills the scope meanwhile.
    std::fs::write(pc.join("other.bin"), vec![7u8; 9 * MIB as usize]).unwrap();
    let _ = std::process::Command::new("sync").status();
    kernel_used(&scope_dir(d, &c));
    let data = pattern(8 * MIB as usize);
    let mut off = 0u64;
    let refused = loop {
        let end = (off + MIB).min(data.len() as u64);
        let r = patch(d, &token, off, data[off as usize..end as usize].to_vec()).await;
        if r.status == 204 {
            off = r.header("upload-offset").unwrap().parse().unwrap();
            assert!(off < data.len() as u64, "the upload should not fit");
            continue;
        }
        break r;
    };
    let p = refused.problem(507);
    assert_eq!(p["data"]["reason"], "quota", "{p}");
    assert_eq!(
        head_offset(d, &token).await,
        off,
        "the durable offset is intact"
    );
    let r = scope(d, "PATCH", &c, Some(20 * MIB)).await;
    assert_eq!(r.status, 204);
    while off < data.len() as u64 {
        let end = (off + MIB).min(data.len() as u64);
        let r = patch(d, &token, off, data[off as usize..end as usize].to_vec()).await;
        assert_eq!(r.status, 204, "after raising the limit: {}", r.text());
        off = r.header("upload-offset").unwrap().parse().unwrap();
    }
    assert_eq!(std::fs::read(pc.join("big.bin")).unwrap(), data);

    // A restart keeps scopes, limits and usage as they were.
    for q in [&a, &b, &c] {
        kernel_used(&scope_dir(d, q));
    }
    let limits: Vec<(u64, Option<u64>)> =
        futures::future::join_all([&a, &b, &c].map(|q| usage(d, q))).await;
    d.restart().await;
    for (q, want) in [&a, &b, &c].iter().zip(&limits) {
        let got = usage(d, q).await;
        assert_eq!(got.1, want.1, "{q}: limit after a restart");
        assert_eq!(got.0, want.0, "{q}: usage after a restart");
    }
    mint(d, &va, "still.bin", 2 * MIB).await.problem(413);

    // A scope holding a vfolder is not deleted (409); once empty it is, limit and all.
    let r = scope(d, "DELETE", &b, None).await;
    r.problem(409);
    let t = d.start_delete(&vb).await;
    assert_eq!(d.wait_task(&t).await["status"], "done");
    let r = scope(d, "DELETE", &b, None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    scope(d, "GET", &b, None).await.problem(404);
    // A new scope does not inherit anything of the deleted one.
    let e = qsid();
    assert_eq!(scope(d, "POST", &e, None).await.status, 204);
    assert_eq!(usage(d, &e).await.1, None);

    // /folder/create makes a missing scope with `initial_max_size_for_quota_scope` as its limit.
    let f = qsid();
    let vfid = format!("{f}/{}", uuid::Uuid::new_v4().simple());
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid,
                   "options": {"initial_max_size_for_quota_scope": 5 * MIB}}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(usage(d, &f).await.1, Some(5 * MIB));
    let r = mint(d, &vfid, "six.bin", 6 * MIB).await;
    assert_eq!(r.problem(413)["data"]["reason"], "quota");
}

/// Partial uploads in a scope and the join, on a filesystem that reflinks (btrfs): 8 MiB staged
/// as two block-aligned partials in a 10 MiB scope join into place although a second copy of a
/// partial would not fit, because `copy_file_range` clones the extents. A partial that would
/// take the scope past its limit is refused when it is created, before any byte.
pub async fn partials_join_by_reflink_within_the_quota(d: &Daemon) {
    use crate::tus_concat::{patch_url, post_final, post_partial};
    let qs = qsid();
    let r = scope(d, "POST", &qs, Some(10 * MIB)).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let (vf, path) = vfolder_in(d, &qs).await;
    let data = pattern(8 * MIB as usize);
    let r = mint(d, &vf, "joined.bin", 8 * MIB).await;
    let t = r.json()["token"].as_str().unwrap().to_string();
    let mut urls = Vec::new();
    for half in data.chunks(4 * MIB as usize) {
        let (r, url) = post_partial(d, &t, half.len() as u64, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let r = patch_url(d, &url, 0, half.to_vec()).await;
        assert_eq!(r.status, 204, "{}", r.text());
        urls.push(url);
    }
    let r = post_final(d, &t, &[&urls[0], &urls[1]]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(std::fs::read(path.join("joined.bin")).unwrap(), data);
    let (used, _) = usage(d, &qs).await;
    assert!(used <= 10 * MIB, "{used}");

    // A token minted while 1.5 MiB fit; then 1 MiB more is written: its partial is refused
    // when created, before any byte, saying it was the quota.
    let late = MIB + MIB / 2;
    let r = mint(d, &vf, "late.bin", late).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.json()["token"].as_str().unwrap().to_string();
    let r = upload(d, &vf, "more.bin", MIB, 1).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let (r, _) = post_partial(d, &t, late, None).await;
    assert_eq!(r.problem(413)["data"]["reason"], "quota", "{}", r.text());
}
