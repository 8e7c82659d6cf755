//! Every manager-API route with the bodies the Backend.AI 26.9.6 manager sends
//! (`manager/clients/storage_proxy/manager_facing_client.py`), and every refusal checked against
//! how that manager sorts a storage proxy's errors (`_handle_exceptional_response`): by the
//! domain of `error_code`, where `vfolder` or no code means the matching 4xx for the user,
//! `quota-scope` a quota error, and any other domain a 500 with an ERROR in its log.
//!
//! The real manager drives the same routes in `backendai_manager.rs`; this file keeps the
//! shapes and the classification fast to check on every run.

use serde_json::{Value, json};

use crate::common::{Daemon, Resp, random_vfid};

/// What the 26.9.6 manager makes of an error answer, as `_handle_exceptional_response` does.
#[derive(Debug, PartialEq)]
enum ManagerSees {
    /// The user gets this 4xx (a vfolder error, or the proxy's own status for non-JSON).
    User(u16),
    /// QuotaScopeNotFoundError (404) or another quota error.
    Quota(u16),
    /// UnexpectedStorageProxyResponseError: HTTP 500 and an ERROR with a traceback.
    Server,
}

/// `ErrorCode.from_str`: three `_`-separated parts, the second one of Backend.AI's operations.
fn error_domain(code: &str) -> Option<&str> {
    const OPERATIONS: &[&str] = &[
        "generic",
        "create",
        "upsert",
        "access",
        "read",
        "search",
        "update",
        "start",
        "soft-delete",
        "restore",
        "purge",
        "auth",
        "hook",
        "request",
        "parsing",
        "execute",
        "schedule",
        "setup",
        "grant",
        "check-limit",
    ];
    let parts: Vec<&str> = code.split('_').collect();
    (parts.len() == 3 && OPERATIONS.contains(&parts[1])).then_some(parts[0])
}

fn manager_sees(r: &Resp) -> ManagerSees {
    let ct = r.content_type();
    let is_json = ct.starts_with("application/json") || ct.starts_with("application/problem+json");
    if !is_json {
        return ManagerSees::User(r.status);
    }
    let body = r.json();
    let code = body["error_code"].as_str().unwrap_or("");
    match error_domain(code).unwrap_or("vfolder") {
        "vfolder" => ManagerSees::User(match r.status {
            400 | 404 | 410 => r.status,
            _ => 400, // VFolderOperationFailed is an HTTPBadRequest
        }),
        "quota-scope" => ManagerSees::Quota(if r.status == 404 { 404 } else { 500 }),
        _ => ManagerSees::Server,
    }
}

async fn ok(d: &Daemon, method: &str, path: &str, body: Value) -> Resp {
    let r = d.mgr(method, path, body.clone()).await;
    assert!(
        (200..300).contains(&r.status),
        "{method} {path} {body}: {} {}",
        r.status,
        r.text()
    );
    r
}

/// The manager's bodies, route by route, as its client sends them (types included).
#[tokio::test]
async fn every_route_takes_the_managers_own_payloads() {
    let d = Daemon::start().await;
    let vfid = random_vfid();
    let qsid = vfid.split_once('/').unwrap().0.to_string();
    let v = "vol1";

    // get_volumes sends no body at all.
    let r = d
        .mgr_raw("GET", "/volumes", None, Some(crate::common::MANAGER_SECRET))
        .await;
    assert_eq!(r.status, 200, "no body at all: {}", r.text());
    ok(&d, "GET", "/volume/hwinfo", json!({"volume": v})).await;
    ok(&d, "GET", "/folder/fs-usage", json!({"volume": v})).await;

    // create_folder: options {} or {initial_max_size_for_quota_scope}; mode only sometimes.
    ok(
        &d,
        "POST",
        "/folder/create",
        json!({"volume": v, "vfid": vfid, "options": {}}),
    )
    .await;
    let mode = std::fs::metadata(d.vfolder_path(&vfid)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o7777,
        0o775,
        "the manager leaves mode out: Backend.AI's default applies"
    );
    let vf2 = format!("{qsid}/{}", uuid::Uuid::new_v4().simple());
    ok(
        &d,
        "POST",
        "/folder/create",
        json!({"volume": v, "vfid": vf2, "options": {"initial_max_size_for_quota_scope": 1 << 30}, "mode": 509}),
    )
    .await;

    // Quota scopes: the manager sends ints, possibly 0 or negative for "no limit".
    ok(
        &d,
        "GET",
        "/quota-scope",
        json!({"volume": v, "qsid": qsid}),
    )
    .await;
    for limit in [json!(1 << 30), json!(0), json!(-1), json!("2048")] {
        ok(
            &d,
            "PATCH",
            "/quota-scope",
            json!({"volume": v, "qsid": qsid, "options": {"limit_bytes": limit}}),
        )
        .await;
    }
    ok(
        &d,
        "DELETE",
        "/quota-scope/quota",
        json!({"volume": v, "qsid": qsid}),
    )
    .await;

    // mkdir: exist_ok always, parents when not None (mount.py sends a list of one).
    ok(
        &d,
        "POST",
        "/folder/file/mkdir",
        json!({"volume": v, "vfid": vfid, "relpath": "a/b", "exist_ok": false, "parents": true}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/mkdir",
        json!({"volume": v, "vfid": vfid, "relpath": ["c"], "exist_ok": true}),
    )
    .await;

    // upload_file: size is str(size) in 26.9.6.
    let t = ok(
        &d,
        "POST",
        "/folder/file/upload",
        json!({"volume": v, "vfid": vfid, "relpath": "a/x.txt", "size": "5"}),
    )
    .await;
    let token = t.json()["token"].as_str().unwrap().to_string();
    let r = crate::common::send(
        d.http
            .patch(d.url("client", &format!("/upload?token={token}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream")
            .body("hello"),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        std::fs::read(d.vfolder_path(&vfid).join("a/x.txt")).unwrap(),
        b"hello"
    );

    ok(
        &d,
        "POST",
        "/folder/file/list",
        json!({"volume": v, "vfid": vfid, "relpath": "."}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/fetch",
        json!({"volume": v, "vfid": vfid, "relpath": "./a/x.txt"}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/download",
        json!({"volume": v, "vfid": vfid, "relpath": "a/x.txt", "archive": false, "unmanaged_path": null}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/archive-download-token",
        json!({"volume": v, "virtual_folder_id": vfid, "files": ["a"]}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/rename",
        json!({"volume": v, "vfid": vfid, "relpath": "a/x.txt", "new_name": "y.txt"}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/move",
        json!({"volume": v, "vfid": vfid, "src_relpath": "a/y.txt", "dst_relpath": "c/y.txt"}),
    )
    .await;
    // A `..` that stays inside the vfolder is resolved, as the Python proxy does.
    ok(
        &d,
        "POST",
        "/folder/file/list",
        json!({"volume": v, "vfid": vfid, "relpath": "a/../c"}),
    )
    .await;
    ok(
        &d,
        "GET",
        "/folder/usage",
        json!({"volume": v, "vfid": vfid}),
    )
    .await;
    ok(
        &d,
        "GET",
        "/folder/used-bytes",
        json!({"volume": v, "vfid": vfid}),
    )
    .await;
    ok(
        &d,
        "GET",
        "/folder/mount",
        json!({"volume": v, "vfid": vfid, "subpath": "."}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/delete",
        json!({"volume": v, "vfid": vfid, "relpaths": ["c/y.txt"], "recursive": false}),
    )
    .await;
    ok(
        &d,
        "POST",
        "/folder/file/delete-async",
        json!({"volume": v, "vfid": vfid, "relpaths": ["a"], "recursive": true}),
    )
    .await;
    let clone = format!("{qsid}/{}", uuid::Uuid::new_v4().simple());
    let r = ok(
        &d,
        "POST",
        "/folder/clone",
        json!({"src_volume": v, "src_vfid": vfid, "dst_volume": v, "dst_vfid": clone}),
    )
    .await;
    let task = d.wait_task(r.json()["bgtask_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "done", "{task}");
    ok(
        &d,
        "POST",
        "/folder/delete",
        json!({"volume": v, "vfid": clone}),
    )
    .await;
}

/// The trafaret coercions: strings for numbers, words for booleans, null where nullable.
#[tokio::test]
async fn fields_take_the_python_proxys_coercions() {
    let d = Daemon::start().await;
    let vfid = random_vfid();
    ok(
        &d,
        "POST",
        "/folder/create",
        json!({"volume": "vol1", "vfid": vfid, "mode": null, "options": null}),
    )
    .await;
    for size in [json!(" 12 "), json!(12.0), json!("+12")] {
        ok(
            &d,
            "POST",
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "f", "size": size}),
        )
        .await;
    }
    for (parents, exist_ok) in [(json!("yes"), json!(1)), (json!("true"), json!("on"))] {
        ok(
            &d,
            "POST",
            "/folder/file/mkdir",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "p/q", "parents": parents, "exist_ok": exist_ok}),
        )
        .await;
    }
    ok(
        &d,
        "POST",
        "/folder/file/delete",
        json!({"volume": "vol1", "vfid": vfid, "relpaths": ["p"], "recursive": "1"}),
    )
    .await;
    assert!(!d.vfolder_path(&vfid).join("p").exists());

    // Still refused, and named: fractions, negative sizes, words that are not booleans.
    for (body, field) in [
        (
            json!({"volume": "vol1", "vfid": vfid, "relpath": "f", "size": "1.5"}),
            "size",
        ),
        (
            json!({"volume": "vol1", "vfid": vfid, "relpath": "f", "size": -1}),
            "size",
        ),
    ] {
        let r = d.mgr("POST", "/folder/file/upload", body).await;
        let p = r.problem(400);
        assert!(p["data"][field].is_string(), "{p}");
    }
    let r = d
        .mgr(
            "POST",
            "/folder/file/mkdir",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "z", "parents": "maybe"}),
        )
        .await;
    assert!(r.problem(400)["data"]["parents"].is_string());
}

/// Each refusal a manager call can meet is one the 26.9.6 manager turns into the same 4xx the
/// Python proxy's refusal gets, never into a 500 of its own.
#[tokio::test]
async fn refusals_are_errors_the_manager_can_classify() {
    let d = Daemon::start().await;
    let (vfid, _) = d.create_vfolder().await;
    let qsid = vfid.split_once('/').unwrap().0.to_string();
    let cases: Vec<(&str, &str, Value, ManagerSees)> = vec![
        // Validation: no error_code, as trafaret's failures (VFolderBadRequest 400).
        (
            "POST",
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "f"}),
            ManagerSees::User(400),
        ),
        (
            "POST",
            "/folder/file/mkdir",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "/abs"}),
            ManagerSees::User(400),
        ),
        // Escaping paths: InvalidSubpathError (vfolder_access_invalid-parameters).
        (
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "../x"}),
            ManagerSees::User(400),
        ),
        (
            "POST",
            "/folder/file/rename",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "a", "new_name": ".."}),
            ManagerSees::User(400),
        ),
        // Unsupported by vfs: no code, as NotImplementedError (admin vfolder perf-metric).
        (
            "GET",
            "/volume/performance-metric",
            json!({"volume": "vol1"}),
            ManagerSees::User(400),
        ),
        // Missing things.
        (
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": random_vfid(), "relpath": "."}),
            ManagerSees::User(404),
        ),
        (
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "nope"}),
            ManagerSees::User(400),
        ),
        (
            "GET",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": format!("user:{}", uuid::Uuid::new_v4())}),
            ManagerSees::Quota(404),
        ),
        (
            "DELETE",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": qsid}),
            ManagerSees::Quota(500),
        ),
        // Malformed JSON is a 400 (the Python proxy answers 500 text/plain).
        (
            "POST",
            "/folder/file/list",
            Value::String("{".into()),
            ManagerSees::User(400),
        ),
    ];
    for (method, path, body, want) in cases {
        let r = match &body {
            Value::String(raw) => {
                d.mgr_raw(
                    method,
                    path,
                    Some(raw.clone().into_bytes()),
                    Some(crate::common::MANAGER_SECRET),
                )
                .await
            }
            _ => d.mgr(method, path, body.clone()).await,
        };
        assert!(r.status >= 400, "{method} {path} {body}: {}", r.status);
        assert_eq!(
            manager_sees(&r),
            want,
            "{method} {path} {body}: {} {}",
            r.status,
            r.text()
        );
    }

    // The one code Backend.AI puts on a validation error, and only there.
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": uuid::Uuid::new_v4().simple().to_string()}),
        )
        .await;
    assert_eq!(
        r.problem(400)["error_code"],
        "storage-proxy_request_invalid-parameters"
    );
    // The only non-vfolder code we send on a manager route is the Python proxy's own for an
    // unknown volume (its InvalidVolumeError).
    let r = d
        .mgr("GET", "/volume/hwinfo", json!({"volume": "nope"}))
        .await;
    assert_eq!(
        r.problem(400)["error_code"],
        "storage_access_invalid-parameters"
    );
}
