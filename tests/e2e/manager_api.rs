//! Manager API success paths: exact status codes and JSON keys of every route, plus auth.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::process::Command;

use serde_json::json;

use crate::common::{Daemon, MANAGER_SECRET, run};

fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test]
async fn status_health_and_auth() {
    let d = Daemon::start().await;
    for path in ["/", "/status"] {
        let r = d.mgr_raw("GET", path, None, None).await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["type"], "manager-facing");
        assert!(v["storage-proxy"].is_string());
        // Parameterless routes refuse a body.
        let r = d
            .mgr_raw("GET", path, Some(b"{\"a\":1}".to_vec()), None)
            .await;
        let p = r.problem(400);
        assert_eq!(
            p["type"],
            "https://api.backend.ai/probs/storage/malformed-request"
        );
    }
    for path in ["/health", "/livez", "/readyz"] {
        for api in ["manager", "internal"] {
            let r = d.get(api, path).await;
            assert_eq!(r.status, 200, "{api}{path}");
            let v = r.json();
            assert_eq!(v["status"], "ok");
            assert_eq!(v["component"], "storage-proxy");
            assert_eq!(v["connectivity"]["overall_healthy"], true);
            let checks = v["connectivity"]["connectivity_checks"].as_array().unwrap();
            assert!(checks.iter().any(|c| c["service_group"] == "volume"));
            for c in checks {
                assert_eq!(
                    keys(c),
                    [
                        "component_id",
                        "error_message",
                        "is_healthy",
                        "last_checked_at",
                        "service_group"
                    ]
                );
            }
        }
    }
    let c = d.get("client", "/").await;
    assert_eq!(c.json()["type"], "client-facing");

    // Missing and wrong secrets: 403 with Backend.AI's exact bodies, before routing.
    for path in ["/volumes", "/no/such/route"] {
        let r = d.mgr_raw("GET", path, None, None).await;
        let p = r.problem(403);
        assert_eq!(
            p,
            json!({"type":"https://api.backend.ai/probs/storage/forbidden","title":"Forbidden (missing auth token)"})
        );
        let r = d.mgr_raw("GET", path, None, Some("wrong")).await;
        assert_eq!(r.problem(403)["title"], "Forbidden (invalid auth token)");
        let almost = format!("{MANAGER_SECRET}x");
        let r = d.mgr_raw("GET", path, None, Some(&almost)).await;
        assert_eq!(r.status, 403);
    }
    let r = d.mgr("GET", "/no/such/route", json!({})).await;
    r.problem(404);
    let r = d.mgr("DELETE", "/volumes", json!({})).await;
    r.problem(405);
}

#[tokio::test]
async fn volume_routes() {
    let d = Daemon::start().await;
    let r = d
        .mgr_raw("GET", "/volumes", None, Some(MANAGER_SECRET))
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let vol = &v["volumes"][0];
    assert_eq!(
        keys(vol),
        ["backend", "capabilities", "fsprefix", "name", "path"]
    );
    assert_eq!(vol["name"], "vol1");
    assert_eq!(vol["backend"], "vfs");
    assert_eq!(vol["fsprefix"], ".");
    assert_eq!(vol["path"], d.vol_dir.display().to_string());
    assert!(
        vol["capabilities"]
            .as_array()
            .unwrap()
            .contains(&json!("vfolder"))
    );
    // Backend.AI's layout marker.
    assert_eq!(
        std::fs::read_to_string(d.vol_dir.join("version.txt"))
            .unwrap()
            .trim(),
        "3"
    );

    let r = d
        .mgr("GET", "/volume/hwinfo", json!({"volume": "vol1"}))
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(keys(&v), ["metadata", "status", "status_info"]);
    assert_eq!(v["status"], "healthy");

    let r = d
        .mgr(
            "GET",
            "/volume/performance-metric",
            json!({"volume": "vol1"}),
        )
        .await;
    let p = r.problem(400);
    assert_eq!(
        p["type"],
        "https://api.backend.ai/probs/storage/unsupported-operation"
    );

    for m in ["GET", "PATCH"] {
        let r = d
            .mgr(
                m,
                "/volume/quota",
                json!({"volume": "vol1", "size_bytes": 1}),
            )
            .await;
        assert_eq!(r.status, 400, "{m} /volume/quota");
    }

    let r = d
        .mgr("GET", "/folder/fs-usage", json!({"volume": "vol1"}))
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(keys(&v), ["capacity_bytes", "used_bytes"]);
    let st = nix::sys::statvfs::statvfs(&d.vol_dir).unwrap();
    assert_eq!(
        v["capacity_bytes"].as_u64().unwrap(),
        st.fragment_size() * st.blocks()
    );
}

#[tokio::test]
async fn quota_scopes() {
    let d = Daemon::start().await;
    let qs = format!("project:{}", uuid::Uuid::new_v4());
    let body = json!({"volume": "vol1", "qsid": qs});

    let r = d.mgr("GET", "/quota-scope", body.clone()).await;
    let p = r.problem(404);
    assert_eq!(p["error_code"], "quota-scope_read_not-found");

    let r = d
        .mgr("POST", "/quota-scope", json!({"volume": "vol1", "qsid": qs, "options": {"limit_bytes": 1048576}, "extra_args": null}))
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    let qs_dir = d.vol_dir.join(
        uuid::Uuid::parse_str(qs.split_once(':').unwrap().1)
            .unwrap()
            .simple()
            .to_string(),
    );
    assert!(qs_dir.is_dir());

    // A second create is the plain-JSON 409 the manager expects.
    let r = d.mgr("POST", "/quota-scope", body.clone()).await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json(),
        json!({"msg": "Volume already exists with given quota scope."})
    );

    let r = d.mgr("GET", "/quota-scope", body.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"used_bytes": null, "limit_bytes": null}));

    // PATCH is an upsert.
    let other = format!("user:{}", uuid::Uuid::new_v4());
    let r = d
        .mgr(
            "PATCH",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": other, "options": {"limit_bytes": 10}}),
        )
        .await;
    assert_eq!(r.status, 204);
    let r = d
        .mgr(
            "GET",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": other}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = d.mgr("PATCH", "/quota-scope", body.clone()).await;
    assert_eq!(r.problem(400)["data"]["options"], "is required");

    let r = d.mgr("DELETE", "/quota-scope/quota", body.clone()).await;
    assert_eq!(r.status, 204);
    let missing = json!({"volume": "vol1", "qsid": format!("user:{}", uuid::Uuid::new_v4())});
    let r = d.mgr("DELETE", "/quota-scope/quota", missing).await;
    r.problem(404);
    // Only user: and project: scopes exist (Backend.AI answered 500 here).
    let r = d
        .mgr(
            "POST",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": format!("group:{}", uuid::Uuid::new_v4())}),
        )
        .await;
    assert!(r.problem(400)["data"]["qsid"].is_string());
}

#[tokio::test]
async fn folder_lifecycle_and_usage() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o775,
        "Backend.AI's default vfolder mode"
    );
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(
        r.problem(409)["error_code"],
        "vfolder_create_already-exists"
    );

    // mode is applied exactly, whatever the umask.
    let qs = format!("user:{}", uuid::Uuid::new_v4());
    let v2 = format!("{qs}/{}", uuid::Uuid::new_v4().simple());
    let r = d
        .mgr("POST", "/folder/create", json!({"volume": "vol1", "vfid": v2, "mode": 0o770, "options": {"initial_max_size_for_quota_scope": 1000}}))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        std::fs::metadata(d.vfolder_path(&v2))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o770
    );
    // A legacy id has no quota scope: refused on create.
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": uuid::Uuid::new_v4().simple().to_string()}),
        )
        .await;
    r.problem(400);

    let r = d
        .mgr(
            "GET",
            "/folder/mount",
            json!({"volume": "vol1", "vfid": vfid, "subpath": "."}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"path": path.display().to_string()}));

    for m in ["GET", "POST"] {
        let r = d
            .mgr(
                m,
                "/folder/metadata",
                json!({"volume": "vol1", "vfid": vfid, "payload": "eyJ4IjoxfQ=="}),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), json!({"status": "ok"}));
    }

    // A known tree: 2 dirs, 3 files (one hard link), 1 symlink.
    std::fs::create_dir_all(path.join("a/b")).unwrap();
    std::fs::write(path.join("a/f1"), vec![7u8; 100_000]).unwrap();
    std::fs::write(path.join("a/b/f2"), b"hello").unwrap();
    std::fs::hard_link(path.join("a/f1"), path.join("hl")).unwrap();
    symlink("a/f1", path.join("ln")).unwrap();
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(keys(&v), ["file_count", "used_bytes"]);
    assert_eq!(v["file_count"], 6);
    let dirsz = std::fs::metadata(path.join("a")).unwrap().len()
        + std::fs::metadata(path.join("a/b")).unwrap().len();
    assert_eq!(v["used_bytes"].as_u64().unwrap(), 200_000 + 5 + 4 + dirsz);

    let r = d
        .mgr(
            "GET",
            "/folder/used-bytes",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 200);
    let du = run(Command::new("du").args(["-s", "-B1"]).arg(&path));
    let du: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(r.json(), json!({"used_bytes": du}));

    // Clone: same tree (symlink kept as a link, modes kept), done as a background task.
    let dst = crate::common::random_vfid();
    std::fs::set_permissions(path.join("a/b/f2"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = d
        .mgr(
            "POST",
            "/folder/clone",
            json!({"src_volume": "vol1", "src_vfid": vfid, "dst_volume": "vol1", "dst_vfid": dst}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let task = r.json()["bgtask_id"].as_str().unwrap().to_string();
    let t = d.wait_task(&task).await;
    assert_eq!(t["status"], "done", "{t}");
    assert_eq!(t["kind"], "clone_vfolder");
    let dpath = d.vfolder_path(&dst);
    assert_eq!(std::fs::read(dpath.join("a/b/f2")).unwrap(), b"hello");
    assert_eq!(
        std::fs::metadata(dpath.join("a/b/f2"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(dpath.join("ln")).unwrap().to_str(),
        Some("a/f1")
    );
    assert_eq!(std::fs::read(dpath.join("hl")).unwrap().len(), 100_000);
    // Clone errors are immediate.
    let r = d
        .mgr(
            "POST",
            "/folder/clone",
            json!({"src_volume": "vol1", "src_vfid": vfid, "dst_volume": null, "dst_vfid": dst}),
        )
        .await;
    r.problem(409);
    let r = d
        .mgr("POST", "/folder/clone", json!({"src_volume": "vol1", "src_vfid": crate::common::random_vfid(), "dst_volume": null, "dst_vfid": crate::common::random_vfid()}))
        .await;
    r.problem(404);

    // Delete: 202 + bgtask; the vfolder and its empty shard directories go.
    let r = d
        .mgr(
            "POST",
            "/folder/delete",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 202);
    let task = r.json()["bgtask_id"].as_str().unwrap().to_string();
    let t = d.wait_task(&task).await;
    assert_eq!(t["status"], "done", "{t}");
    assert!(!path.exists());
    assert!(!path.parent().unwrap().exists());
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    r.problem(404);
    // Deleting again is fine (idempotent), and unknown task ids are 404.
    d.start_delete(&vfid).await;
    let r = d
        .mgr(
            "GET",
            &format!("/bgtask/{}", uuid::Uuid::new_v4()),
            json!({}),
        )
        .await;
    r.problem(404);
    let r = d.mgr("GET", "/bgtask/not-a-uuid", json!({})).await;
    r.problem(400);
}

#[tokio::test]
async fn auto_quota_scope_creation_can_be_disabled() {
    let d = Daemon::builder()
        .set("storage-proxy.allow-auto-quota-scope-creation", false)
        .start()
        .await;
    let vfid = crate::common::random_vfid();
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    r.problem(404);
}

#[tokio::test]
async fn file_operations() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let b = |extra: serde_json::Value| {
        let mut base = json!({"volume": "vol1", "vfid": vfid});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    };

    // mkdir: 200 / 207 / 422 with per-item results.
    let r = d
        .mgr("POST", "/folder/file/mkdir", b(json!({"relpath": "x/y/z"})))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"results": {"success": [{"msg": null, "item": "x/y/z"}], "failed": []}})
    );
    let r = d
        .mgr(
            "POST",
            "/folder/file/mkdir",
            b(json!({"relpath": ["x/y/z", "n1"]})),
        )
        .await;
    assert_eq!(r.status, 207);
    assert_eq!(
        r.json()["results"]["failed"][0]["msg"],
        "FileExistsError(17, 'File exists')"
    );
    let r = d
        .mgr(
            "POST",
            "/folder/file/mkdir",
            b(json!({"relpath": ["x/y/z"], "exist_ok": true})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = d
        .mgr(
            "POST",
            "/folder/file/mkdir",
            b(json!({"relpath": ["q/r"], "parents": false})),
        )
        .await;
    assert_eq!(r.status, 422);
    let many: Vec<String> = (0..51).map(|i| format!("m{i}")).collect();
    let r = d
        .mgr("POST", "/folder/file/mkdir", b(json!({"relpath": many})))
        .await;
    r.problem(400);
    assert!(
        !path.join("m0").exists(),
        "nothing is created when the request is refused"
    );

    // list: Backend.AI's item shape, plus `truncated`.
    std::fs::write(path.join("x/file.txt"), b"12345").unwrap();
    symlink("file.txt", path.join("x/ln")).unwrap();
    symlink("/etc/passwd", path.join("x/abs")).unwrap();
    let r = d
        .mgr("POST", "/folder/file/list", b(json!({"relpath": "x"})))
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["truncated"], false);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    let item = |n: &str| items.iter().find(|i| i["name"] == n).unwrap().clone();
    let f = item("file.txt");
    assert_eq!(keys(&f), ["name", "stat", "symlink_target", "type"]);
    assert_eq!(keys(&f["stat"]), ["created", "mode", "modified", "size"]);
    assert_eq!(f["type"], "FILE");
    assert_eq!(f["stat"]["size"], 5);
    assert_eq!(f["stat"]["mode"].as_u64().unwrap() & 0o170000, 0o100000);
    assert!(f["stat"]["modified"].as_str().unwrap().ends_with("+00:00"));
    assert_eq!(item("y")["type"], "DIRECTORY");
    assert_eq!(item("ln")["type"], "SYMLINK");
    assert_eq!(item("ln")["symlink_target"], "file.txt");
    assert_eq!(item("abs")["symlink_target"], "");
    let r = d
        .mgr("POST", "/folder/file/list", b(json!({"relpath": "nope"})))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"msg": "No such file or directory", "errno": 2, "paths": ["nope"]})
    );

    // rename, move.
    let r = d
        .mgr(
            "POST",
            "/folder/file/rename",
            b(json!({"relpath": "x/file.txt", "new_name": "renamed.txt", "is_dir": false})),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(path.join("x/renamed.txt").is_file());
    std::fs::write(path.join("x/other"), b"o").unwrap();
    let r = d
        .mgr(
            "POST",
            "/folder/file/rename",
            b(json!({"relpath": "x/other", "new_name": "renamed.txt"})),
        )
        .await;
    assert_eq!(
        r.json()["errno"],
        17,
        "renaming onto an existing name is refused"
    );
    let r = d
        .mgr(
            "POST",
            "/folder/file/move",
            b(json!({"src_relpath": "x/renamed.txt", "dst_relpath": "n1"})),
        )
        .await;
    assert_eq!(r.status, 204);
    assert!(
        path.join("n1/renamed.txt").is_file(),
        "moved into the existing directory"
    );
    let r = d
        .mgr(
            "POST",
            "/folder/file/move",
            b(json!({"src_relpath": "n1/renamed.txt", "dst_relpath": "top.txt"})),
        )
        .await;
    assert_eq!(r.status, 204);
    assert!(path.join("top.txt").is_file());

    // fetch.
    let r = d
        .mgr(
            "POST",
            "/folder/file/fetch",
            b(json!({"relpath": "top.txt"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type(), "application/octet-stream");
    assert_eq!(&r.body[..], b"12345");
    let r = d
        .mgr(
            "POST",
            "/folder/file/fetch",
            b(json!({"relpath": "missing.log"})),
        )
        .await;
    r.problem(404);

    // delete: missing paths ignored, non-empty directory without recursive refused.
    let r = d
        .mgr(
            "POST",
            "/folder/file/delete",
            b(json!({"relpaths": ["top.txt", "never-existed"]})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    assert!(!path.join("top.txt").exists());
    let r = d
        .mgr("POST", "/folder/file/delete", b(json!({"relpaths": ["x"]})))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["errno"], 39);
    assert!(path.join("x").exists());
    let r = d
        .mgr(
            "POST",
            "/folder/file/delete",
            b(json!({"relpaths": ["q"], "recursive": false})),
        )
        .await;
    assert_eq!(r.status, 200, "empty directories go without recursive");
    let r = d
        .mgr(
            "POST",
            "/folder/file/delete-async",
            b(json!({"relpaths": ["x"], "recursive": true})),
        )
        .await;
    assert_eq!(r.status, 202);
    let t = d.wait_task(r.json()["bgtask_id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "done", "{t}");
    assert_eq!(t["kind"], "delete_files");
    assert!(!path.join("x").exists());
    let r = d
        .mgr("POST", "/folder/file/delete", b(json!({"relpaths": ["."]})))
        .await;
    r.problem(400);
    assert!(path.is_dir());
}

#[tokio::test]
async fn listing_says_when_it_is_truncated() {
    let d = Daemon::builder()
        .set("storage-proxy.scandir-limit", 3)
        .start()
        .await;
    let (vfid, path) = d.create_vfolder().await;
    for i in 0..5 {
        std::fs::write(path.join(format!("f{i}")), b"").unwrap();
    }
    let r = d
        .mgr(
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "."}),
        )
        .await;
    let v = r.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    assert_eq!(v["truncated"], true);
    assert_eq!(v["limit"], 3);
}

#[tokio::test]
async fn sigterm_exits_zero() {
    let mut d = Daemon::start().await;
    // Sessions are disabled in this config: the capacity route says so.
    d.get("internal", "/capacity").await.problem(404);
    assert_eq!(d.terminate(), Some(0));
}

/// SIGTERM while an upload is streaming: the PATCH is checkpointed (what arrived is synced and
/// acknowledged, the client is told 503), the daemon exits 0, and the upload resumes after a
/// restart from exactly what was received.
#[tokio::test]
async fn sigterm_checkpoints_an_upload_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    let token = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "f.bin", "size": 100_000}),
        )
        .await;
    let mut s = tokio::net::TcpStream::connect(&d.addrs["client"])
        .await
        .unwrap();
    let head = format!(
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: x\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: 100000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[6u8; 40_000]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let exit = tokio::task::spawn_blocking(move || {
        let code = d.terminate();
        (d, code)
    });
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(crate::common::OUTCOME, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    let (mut d, code) = exit.await.unwrap();
    assert_eq!(code, Some(0));
    d.restart().await;
    let r = crate::common::send(
        d.http
            .head(d.url("client", &format!("/upload?token={token}"))),
    )
    .await;
    assert_eq!(r.header("upload-offset").as_deref(), Some("40000"));
    let r = crate::common::send(
        d.http
            .patch(d.url("client", &format!("/upload?token={token}")))
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "40000")
            .body(vec![7u8; 60_000]),
    )
    .await;
    assert_eq!(r.status, 204);
    let got = std::fs::read(path.join("f.bin")).unwrap();
    assert!(got[..40_000].iter().all(|&b| b == 6) && got[40_000..].iter().all(|&b| b == 7));
}
