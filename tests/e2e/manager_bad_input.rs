//! Every manager route against bad input: no body, malformed JSON, wrong types, unknown volume,
//! malformed ids, a vfolder that does not exist, hostile paths (`..`, absolute, NUL, over-long
//! names, symlinks out of the vfolder as the target and as an intermediate component) and an
//! oversize body. Each gets a 4xx, nothing outside the vfolder changes, the daemon keeps serving.

use std::os::unix::fs::symlink;
use std::path::Path;

use serde_json::{Value, json};

use crate::common::Daemon;

/// A snapshot of everything under `dir` (names, sizes, contents hash) to prove nothing changed.
fn snapshot(dir: &Path) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            if ft.is_symlink() {
                let target = std::fs::read_link(e.path()).unwrap();
                out.push((rel, 0, target.display().to_string()));
            } else if ft.is_dir() {
                stack.push(e.path());
                out.push((rel, 0, String::new()));
            } else {
                let len = e.metadata().unwrap().len();
                out.push((rel, len, crate::common::sha256_file(&e.path())));
            }
        }
    }
    out.sort();
    out
}

struct Route {
    method: &'static str,
    path: &'static str,
    /// The route's valid body, with `{P}` where hostile paths go.
    body: fn(vfid: &str, p: &str) -> Value,
}

fn routes() -> Vec<Route> {
    vec![
        Route {
            method: "GET",
            path: "/folder/usage",
            body: |v, _| json!({"volume": "vol1", "vfid": v}),
        },
        Route {
            method: "GET",
            path: "/folder/used-bytes",
            body: |v, _| json!({"volume": "vol1", "vfid": v}),
        },
        Route {
            method: "GET",
            path: "/folder/mount",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "subpath": p}),
        },
        Route {
            method: "GET",
            path: "/folder/metadata",
            body: |v, _| json!({"volume": "vol1", "vfid": v}),
        },
        Route {
            method: "POST",
            path: "/folder/file/mkdir",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "relpath": p}),
        },
        Route {
            method: "POST",
            path: "/folder/file/list",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "relpath": p}),
        },
        Route {
            method: "POST",
            path: "/folder/file/rename",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "relpath": p, "new_name": "renamed"}),
        },
        Route {
            method: "POST",
            path: "/folder/file/move",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "src_relpath": p, "dst_relpath": "moved"}),
        },
        Route {
            method: "POST",
            path: "/folder/file/move",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "src_relpath": "inside.txt", "dst_relpath": p}),
        },
        Route {
            method: "POST",
            path: "/folder/file/delete",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "relpaths": [p], "recursive": true}),
        },
        Route {
            method: "POST",
            path: "/folder/file/fetch",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "relpath": p}),
        },
        Route {
            method: "POST",
            path: "/folder/file/upload",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "relpath": p, "size": 10}),
        },
        Route {
            method: "POST",
            path: "/folder/file/download",
            body: |v, p| json!({"volume": "vol1", "vfid": v, "relpath": p}),
        },
        Route {
            method: "POST",
            path: "/folder/file/archive-download-token",
            body: |v, p| json!({"volume": "vol1", "virtual_folder_id": v, "files": [p]}),
        },
    ]
}

/// Routes whose only inputs are volume/ids (no path field), for the id battery.
fn id_routes() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("GET", "/volume/hwinfo", json!({"volume": "vol1"})),
        (
            "GET",
            "/volume/performance-metric",
            json!({"volume": "vol1"}),
        ),
        ("GET", "/folder/fs-usage", json!({"volume": "vol1"})),
        (
            "POST",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": "user:00000000-0000-0000-0000-000000000001"}),
        ),
        (
            "GET",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": "user:00000000-0000-0000-0000-000000000001"}),
        ),
        (
            "PATCH",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": "user:00000000-0000-0000-0000-000000000001", "options": {"limit_bytes": 5}}),
        ),
        (
            "DELETE",
            "/quota-scope/quota",
            json!({"volume": "vol1", "qsid": "user:00000000-0000-0000-0000-000000000001"}),
        ),
        (
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": "user:00000000-0000-0000-0000-000000000001/0123456789abcdef0123456789abcdef"}),
        ),
        (
            "POST",
            "/folder/delete",
            json!({"volume": "vol1", "vfid": "user:00000000-0000-0000-0000-000000000001/0123456789abcdef0123456789abcdef"}),
        ),
        (
            "POST",
            "/folder/clone",
            json!({"src_volume": "vol1", "src_vfid": "user:00000000-0000-0000-0000-000000000001/0123456789abcdef0123456789abcdef", "dst_volume": null, "dst_vfid": "user:00000000-0000-0000-0000-000000000002/0123456789abcdef0123456789abcdef"}),
        ),
        (
            "POST",
            "/folder/file/delete-async",
            json!({"volume": "vol1", "vfid": "user:00000000-0000-0000-0000-000000000001/0123456789abcdef0123456789abcdef", "relpaths": ["a"]}),
        ),
    ]
}

#[tokio::test]
async fn every_route_refuses_malformed_requests() {
    let d = Daemon::start().await;
    let (vfid, _) = d.create_vfolder().await;
    let mut all: Vec<(&str, &str, Value)> = id_routes();
    for r in routes() {
        all.push((r.method, r.path, (r.body)(&vfid, "inside.txt")));
    }
    for (method, path, valid) in all {
        let ctx = format!("{method} {path}");
        // No body at all: every required field is reported.
        let r = d
            .mgr_raw(method, path, None, Some(crate::common::MANAGER_SECRET))
            .await;
        let p = r.problem(400);
        assert_eq!(
            p["type"], "https://api.backend.ai/probs/storage/invalid-api-params",
            "{ctx}"
        );
        assert!(
            p["data"].as_object().is_some_and(|o| !o.is_empty()),
            "{ctx}: {p}"
        );
        // Malformed JSON.
        let r = d
            .mgr_raw(
                method,
                path,
                Some(b"{\"volume\": ".to_vec()),
                Some(crate::common::MANAGER_SECRET),
            )
            .await;
        assert_eq!(
            r.problem(400)["type"],
            "https://api.backend.ai/probs/storage/malformed-request",
            "{ctx}"
        );
        // Not an object.
        let r = d.mgr(method, path, json!([1, 2, 3])).await;
        r.problem(400);
        // Each field with a wrong type.
        for key in valid.as_object().unwrap().keys() {
            let mut bad = valid.clone();
            bad[key] = json!({"nested": [true]});
            let r = d.mgr(method, path, bad).await;
            let p = r.problem(400);
            assert!(
                p["data"].get(key.as_str()).is_some() || p["data"].as_object().is_some(),
                "{ctx} {key}: {p}"
            );
        }
        // Unknown volume.
        for vkey in ["volume", "src_volume"] {
            if valid.get(vkey).is_some() {
                let mut bad = valid.clone();
                bad[vkey] = json!("no-such-volume");
                let r = d.mgr(method, path, bad).await;
                let p = r.problem(400);
                assert_eq!(
                    p["type"], "https://api.backend.ai/probs/storage/volume/invalid",
                    "{ctx}"
                );
                assert_eq!(p["msg"], "no-such-volume");
            }
        }
        // Malformed ids.
        for idkey in ["vfid", "src_vfid", "dst_vfid", "virtual_folder_id", "qsid"] {
            if valid.get(idkey).is_some() {
                for bad_id in [
                    "",
                    "user:nope/xyz",
                    "../../etc",
                    "group:00000000-0000-0000-0000-000000000001",
                    "user:00000000-0000-0000-0000-000000000001/../../x",
                ] {
                    let mut bad = valid.clone();
                    bad[idkey] = json!(bad_id);
                    let r = d.mgr(method, path, bad).await;
                    let p = r.problem(400);
                    assert!(
                        p["data"][idkey].is_string(),
                        "{ctx} {idkey}={bad_id:?}: {p}"
                    );
                }
            }
        }
        // Oversize body (default max-json-body 1 MiB).
        let mut huge = valid.clone();
        huge["padding"] = json!("x".repeat(2 << 20));
        let r = d.mgr(method, path, huge).await;
        r.problem(413);
    }
    let r = d.get("manager", "/").await;
    assert_eq!(r.status, 200, "the daemon keeps serving");
}

#[tokio::test]
async fn routes_on_a_missing_vfolder_are_404() {
    let d = Daemon::start().await;
    let missing = crate::common::random_vfid();
    for r in routes() {
        let body = (r.body)(&missing, "a.txt");
        let resp = d.mgr(r.method, r.path, body).await;
        match r.path {
            // Backend.AI mints download tokens without looking; the download itself 404s.
            "/folder/file/download" | "/folder/file/archive-download-token" => {
                assert_eq!(resp.status, 200)
            }
            // Backend.AI's plain-JSON shape for mount.
            "/folder/mount" => {
                assert_eq!(resp.status, 400);
                assert_eq!(resp.json()["msg"], "VFolder not found");
            }
            // mkdir reports per item (422 when all fail).
            "/folder/file/mkdir" => {
                assert_eq!(resp.status, 422);
                assert!(
                    resp.json()["results"]["failed"][0]["msg"]
                        .as_str()
                        .unwrap()
                        .starts_with("VFolderNotFound")
                );
            }
            _ => {
                let p = resp.problem(404);
                assert_eq!(
                    p["error_code"], "vfolder_read_not-found",
                    "{} {}",
                    r.method, r.path
                );
            }
        }
    }
}

#[tokio::test]
async fn hostile_paths_touch_nothing_outside() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    // Outside the vfolder: a sibling directory on the same volume and one elsewhere on the host.
    let outside = d.dir.path().join("outside");
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("secret.txt"), b"top secret").unwrap();
    std::fs::write(outside.join("sub/deep.txt"), b"deep").unwrap();
    std::fs::write(path.join("inside.txt"), b"inside").unwrap();
    symlink(&outside, path.join("out")).unwrap();
    symlink(outside.join("secret.txt"), path.join("outfile")).unwrap();
    symlink("../../../..", path.join("up")).unwrap();
    let before_outside = snapshot(&outside);
    // Everything on the volume except this vfolder (and upload staging) must stay as it is.
    let vf_rel = path.strip_prefix(&d.vol_dir).unwrap().display().to_string();
    let rest_of_volume = || -> Vec<_> {
        snapshot(&d.vol_dir)
            .into_iter()
            .filter(|(p, _, _)| !p.starts_with(&vf_rel) && !p.contains(".upload"))
            .collect()
    };
    let before_volume = rest_of_volume();

    let long = "n".repeat(300);
    let hostile: Vec<(&str, String)> = vec![
        ("dotdot", "../x".into()),
        ("dotdot-deep", "a/../../../../etc/passwd".into()),
        ("absolute", "/etc/passwd".into()),
        ("nul", "inside.txt\0.png".into()),
        ("overlong", long.clone()),
        ("overlong-path", "a/".repeat(2100)),
        ("symlink-intermediate", "out/secret.txt".into()),
        ("symlink-intermediate-deep", "out/sub/deep.txt".into()),
        ("symlink-target-dir", "out".into()),
        ("symlink-target-file", "outfile".into()),
        ("symlink-up", "up/etc/passwd".into()),
    ];
    for r in routes() {
        for (label, p) in &hostile {
            let resp = d.mgr(r.method, r.path, (r.body)(&vfid, p)).await;
            let ctx = format!(
                "{} {} {label}: {} {}",
                r.method,
                r.path,
                resp.status,
                resp.text()
            );
            match (r.path, *label) {
                // Acting on the symlink itself stays inside the vfolder and is allowed: a rename,
                // move or delete of the link, never of its target.
                (
                    "/folder/file/rename" | "/folder/file/move" | "/folder/file/delete",
                    "symlink-target-dir" | "symlink-target-file",
                ) => {
                    assert!(resp.status < 500, "{ctx}");
                }
                // Tokens for downloads are checked when used (below), as in Backend.AI.
                ("/folder/file/download", l) if l.starts_with("symlink") => {
                    assert_eq!(resp.status, 200, "{ctx}")
                }
                ("/folder/file/archive-download-token", l) if l.starts_with("symlink") => {
                    assert_eq!(resp.status, 200, "{ctx}")
                }
                ("/folder/file/mkdir", l) if l.starts_with("symlink") => {
                    assert_eq!(resp.status, 422, "{ctx}");
                }
                ("/folder/usage" | "/folder/used-bytes" | "/folder/metadata", _) => {
                    assert!(resp.status == 200, "{ctx}")
                }
                _ => assert!((400..500).contains(&resp.status), "{ctx}"),
            }
            if resp.status >= 400 {
                let ct = resp.content_type();
                assert!(
                    ct.starts_with("application/problem+json")
                        || ct.starts_with("application/json"),
                    "{ctx}"
                );
            }
        }
        // Recreate links a rename/move/delete may have acted on, so every route sees them.
        for (name, target) in [
            ("out", outside.clone()),
            ("outfile", outside.join("secret.txt")),
        ] {
            let link = path.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(&target, &link).unwrap();
            }
        }
        if !path.join("inside.txt").exists() {
            std::fs::write(path.join("inside.txt"), b"inside").unwrap();
        }
    }
    // Downloads through hostile tokens never read outside.
    for p in ["out/secret.txt", "outfile", "up/etc/passwd"] {
        let t = d
            .token(
                "/folder/file/download",
                json!({"volume": "vol1", "vfid": vfid, "relpath": p}),
            )
            .await;
        let r = d.get("client", &format!("/download?token={t}")).await;
        assert_eq!(r.status, 404, "{p}: {}", r.text());
        assert!(!r.text().contains("top secret"));
        let t = d
            .token(
                "/folder/file/archive-download-token",
                json!({"volume": "vol1", "virtual_folder_id": vfid, "files": [p]}),
            )
            .await;
        let r = d
            .get("client", &format!("/download-archive?token={t}"))
            .await;
        assert!((400..500).contains(&r.status), "{p}: {}", r.status);
    }
    // A dst_dir that escapes is refused before any byte is read.
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "secret.txt"}),
        )
        .await;
    let r = d
        .get("client", &format!("/download?token={t}&dst_dir=out"))
        .await;
    assert_eq!(r.status, 404);
    let r = d
        .get("client", &format!("/download?token={t}&dst_dir=../.."))
        .await;
    assert_eq!(r.status, 400);

    assert_eq!(
        snapshot(&outside),
        before_outside,
        "nothing outside the vfolder changed"
    );
    assert_eq!(
        rest_of_volume(),
        before_volume,
        "nothing else on the volume changed"
    );
    assert_eq!(
        d.get("manager", "/").await.status,
        200,
        "the daemon keeps serving"
    );
}

#[tokio::test]
async fn rename_and_mkdir_names_are_checked() {
    let d = Daemon::start().await;
    let (vfid, path) = d.create_vfolder().await;
    std::fs::write(path.join("f"), b"x").unwrap();
    for bad in ["../../evil", "a/b", "..", ".", "", "x\0y"] {
        let r = d
            .mgr(
                "POST",
                "/folder/file/rename",
                json!({"volume": "vol1", "vfid": vfid, "relpath": "f", "new_name": bad}),
            )
            .await;
        let p = r.problem(400);
        if bad == ".." {
            // Climbing out is Backend.AI's InvalidSubpathError, as the Python proxy answers.
            assert_eq!(p["error_code"], "vfolder_access_invalid-parameters", "{p}");
        } else {
            assert!(p["data"]["new_name"].is_string(), "{bad:?}");
        }
    }
    for bad in [json!("/abs"), json!(["ok", "/abs"]), json!(5), json!([1])] {
        let r = d
            .mgr(
                "POST",
                "/folder/file/mkdir",
                json!({"volume": "vol1", "vfid": vfid, "relpath": bad}),
            )
            .await;
        r.problem(400);
    }
    assert!(
        !path.join("ok").exists(),
        "a refused mkdir list creates nothing"
    );
    assert!(path.join("f").exists());
}
