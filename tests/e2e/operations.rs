//! What operators run the daemon with: Prometheus `/metrics` (parsed by prometheus_client's own
//! parser), gRPC reflection for v1alpha clients (grpcio-reflection), systemd's notify protocol
//! (a notify socket of our own) and the unit file (`systemd-analyze verify`).

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::cluster::bai_python;
use crate::common::{Daemon, bin, run, send};

/// Every sample, `[[name, {labels}, value], ...]`, as prometheus_client's parser reads the text.
async fn scrape(d: &Daemon) -> Value {
    let r = send(d.http.get(d.url("internal", "/metrics"))).await;
    assert_eq!(r.status, 200);
    assert!(
        r.content_type().starts_with("text/plain"),
        "{}",
        r.content_type()
    );
    let text = r.text();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("metrics.txt");
    std::fs::write(&f, text).unwrap();
    let out = run(Command::new(bai_python()).arg("-c").arg(format!(
        "import json\nfrom prometheus_client.parser import text_string_to_metric_families\n\
         samples = [[s.name, s.labels, s.value] \
         for f in text_string_to_metric_families(open({:?}).read()) for s in f.samples]\n\
         print(json.dumps(samples))",
        f.display().to_string()
    )));
    serde_json::from_str(&out).unwrap()
}

/// The sum of the samples named `sample` (in any family) whose labels include `want`; None
/// when there is no such sample at all.
fn total(m: &Value, sample: &str, want: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s[0] == sample)
        .filter(|s| want.iter().all(|(k, v)| s[1][*k] == *v))
        .map(|s| s[2].as_f64().unwrap())
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}

/// Each format as its own parser reads it: the families and their types, `[[name, type], ...]`.
async fn families(d: &Daemon, openmetrics: bool) -> Vec<(String, String)> {
    let mut req = d.http.get(d.url("internal", "/metrics"));
    if openmetrics {
        req = req.header(
            "Accept",
            "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
        );
    }
    let r = send(req).await;
    assert_eq!(r.status, 200);
    let want = if openmetrics {
        "application/openmetrics-text"
    } else {
        "text/plain; version=0.0.4"
    };
    assert!(r.content_type().starts_with(want), "{}", r.content_type());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("metrics.txt");
    std::fs::write(&f, r.text()).unwrap();
    let parser = if openmetrics {
        "prometheus_client.openmetrics.parser"
    } else {
        "prometheus_client.parser"
    };
    let out = run(Command::new(bai_python()).arg("-c").arg(format!(
        "import json\nfrom {parser} import text_string_to_metric_families\n\
         print(json.dumps([[f.name, f.type] for f in text_string_to_metric_families(open({:?}).read())]))",
        f.display().to_string()
    )));
    serde_json::from_str(&out).unwrap()
}

/// The body is in the format its Content-Type names: 0.0.4 text by default, OpenMetrics when
/// asked; both parse with every family typed (no counter read as untyped `..._total`).
#[tokio::test]
async fn metrics_bodies_match_their_content_type() {
    let d = Daemon::start().await;
    let _ = d.create_vfolder().await;
    // A refused secret is counted under its route, not "unmatched".
    let r = d
        .mgr_raw(
            "POST",
            "/folder/create",
            Some(b"{}".to_vec()),
            Some("wrong"),
        )
        .await;
    assert_eq!(r.status, 403);
    let m = scrape(&d).await;
    assert_eq!(
        total(
            &m,
            "backendai_api_request_count_total",
            &[("endpoint", "/folder/create"), ("status_code", "403")]
        ),
        Some(1.0),
        "{m}"
    );
    // The process, as Backend.AI's SystemMetricObserver reports it, under our pid.
    let pid = d.pid().to_string();
    for family in [
        "backendai_async_task_count",
        "backendai_memory_used_rss",
        "backendai_memory_used_vms",
    ] {
        let v = total(&m, family, &[("pid", &pid)]).unwrap_or(0.0);
        assert!(v > 0.0, "{family} of pid {pid}: {v}");
    }
    assert!(total(&m, "backendai_cpu_usage_percent", &[("pid", &pid)]).is_some());
    // The allocator's heap: what is in use, apart from what it keeps freed.
    let in_use = total(&m, "storage_agent_heap_bytes", &[("state", "in_use")]).unwrap_or(0.0);
    assert!(in_use > 0.0, "heap in use: {in_use}");
    assert!(total(&m, "storage_agent_heap_bytes", &[("state", "free")]).is_some());
    for openmetrics in [false, true] {
        let fams = families(&d, openmetrics).await;
        assert!(!fams.is_empty());
        let untyped: Vec<_> = fams
            .iter()
            .filter(|(_, t)| t == "unknown" || t == "untyped")
            .collect();
        assert!(
            untyped.is_empty(),
            "openmetrics {openmetrics}: untyped {untyped:?}"
        );
        for counter in ["backendai_api_request_count", "storage_agent_upload_bytes"] {
            assert!(
                fams.iter().any(|(n, t)| n == counter && t == "counter"),
                "openmetrics {openmetrics}: {counter} is a counter: {fams:?}"
            );
        }
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_move_with_the_work() {
    let d = Daemon::start().await;
    let before = scrape(&d).await;
    for sample in [
        "storage_agent_volume_bytes",
        "storage_agent_check_up",
        "storage_agent_events_queued",
        "storage_agent_upload_patches_in_flight",
    ] {
        assert!(
            total(&before, sample, &[]).is_some(),
            "{sample} missing: {before}"
        );
    }
    assert_eq!(
        total(
            &before,
            "storage_agent_volume_status",
            &[("volume", "vol1"), ("status", "healthy")]
        ),
        Some(1.0)
    );
    assert_eq!(
        total(&before, "storage_agent_upload_bytes_total", &[]),
        Some(0.0)
    );

    // Work: a folder, an upload, a delete as a background task, an unknown route.
    let (vfid, _) = d.create_vfolder().await;
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "a.bin", "size": 5000}),
        )
        .await;
    let r = send(
        d.http
            .patch(d.url("client", &format!("/upload?token={t}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "0")
            .body(vec![1u8; 5000]),
    )
    .await;
    assert_eq!(r.status, 204);
    // The upload is remembered as done (recorded just after its 204).
    let deadline = Instant::now() + crate::common::OUTCOME;
    while total(
        &scrape(&d).await,
        "storage_agent_upload_sessions",
        &[("state", "done")],
    )
    .is_none()
    {
        assert!(Instant::now() < deadline, "upload sessions by state");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let task = d.start_delete(&vfid).await;
    assert_eq!(d.wait_task(&task).await["status"], "done");
    assert_eq!(d.mgr("GET", "/no/such/route", json!({})).await.status, 404);

    let after = scrape(&d).await;
    let count = |endpoint: &str, status: &str| {
        total(
            &after,
            "backendai_api_request_count_total",
            &[("endpoint", endpoint), ("status_code", status)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("/folder/file/upload", "200"), 1.0);
    assert_eq!(count("/upload", "204"), 1.0);
    assert_eq!(count("/folder/delete", "202"), 1.0);
    assert!(count("unmatched", "404") >= 1.0);
    assert!(
        total(
            &after,
            "backendai_api_request_duration_sec_count",
            &[("endpoint", "/upload")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        total(&after, "storage_agent_upload_bytes_total", &[]),
        Some(5000.0)
    );
    assert_eq!(
        total(
            &after,
            "backendai_bgtask_done_count_total",
            &[("task_name", "delete_vfolder"), ("status", "done")]
        ),
        Some(1.0)
    );
    assert!(
        total(
            &after,
            "storage_agent_http_request_bytes_total",
            &[("api", "client")]
        )
        .unwrap_or(0.0)
            >= 5000.0
    );
}

#[tokio::test]
async fn reflection_answers_v1alpha_clients() {
    let d = Daemon::builder().agent().start().await;
    let addr = d.addrs["rpc"].clone();
    let out = {
        run(Command::new(bai_python()).arg("-c").arg(format!(
            "import grpc\n\
             from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase\n\
             class Bearer(grpc.StreamStreamClientInterceptor):\n    \
                 def intercept_stream_stream(self, cont, details, it):\n        \
                     md = list(details.metadata or []) + [('authorization', 'Bearer {}')]\n        \
                     return cont(details._replace(metadata=md), it)\n\
             ch = grpc.intercept_channel(grpc.insecure_channel({addr:?}), Bearer())\n\
             db = ProtoReflectionDescriptorDatabase(ch)\n\
             print(sorted(db.get_services()))\n\
             print(db.FindFileContainingSymbol('storage_agent.v1.StorageAgent').name)",
            crate::common::agent::RPC_SECRET
        )))
    };
    assert!(out.contains("storage_agent.v1.StorageAgent"), "{out}");
    assert!(
        out.contains("grpc.reflection.v1alpha.ServerReflection"),
        "{out}"
    );
    assert!(out.contains(".proto"), "{out}");
}

/// Reads notify messages until one contains `want` (or times out).
fn wait_for(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + crate::common::OUTCOME;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(msg.clone());
            if msg.lines().any(|l| l == want) {
                return;
            }
        }
    }
    panic!("no {want} among {seen:?}");
}

#[tokio::test]
async fn systemd_hears_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut d = Daemon::builder()
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .start()
        .await;
    let mut seen = Vec::new();
    wait_for(&sock, "READY=1", &mut seen);
    wait_for(&sock, "WATCHDOG=1", &mut seen);
    assert_eq!(d.terminate(), Some(0));
    wait_for(&sock, "STOPPING=1", &mut seen);
}

#[test]
fn the_unit_file_verifies() {
    crate::common::tools::require("systemd-analyze", "apt-get install systemd");
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/storage-agent.service"
    ))
    .unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("ExecStartPre="),
        "{unit}"
    );
    // The paths it names must exist for verify: the binary under test and a config.
    let config = dir.path().join("storage-agent.toml");
    std::fs::write(&config, "").unwrap();
    let unit = unit.replace("/usr/local/bin/storage-agent", bin()).replace(
        "/etc/backend.ai/storage-agent.toml",
        config.to_str().unwrap(),
    );
    let f = dir.path().join("storage-agent.service");
    std::fs::write(&f, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&f)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("storage-agent.service"))
        .collect();
    assert!(out.status.success() && complaints.is_empty(), "{said}");
}

#[tokio::test]
async fn openapi_documents_are_valid_checked_in_and_match_the_routes() {
    let d = Daemon::start().await;
    for (api, listener) in [("manager", "manager"), ("client", "client")] {
        let r = send(
            d.http
                .get(d.url("internal", &format!("/openapi/{api}.json"))),
        )
        .await;
        assert_eq!(r.status, 200);
        let served = r.json();
        let file = format!("{}/docs/openapi-{api}.json", env!("CARGO_MANIFEST_DIR"));
        let checked_in: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert!(
            served == checked_in,
            "{file} drifted from the code: regenerate it with `storage-agent openapi {api} > {file}`"
        );
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), served.to_string()).unwrap();
        run(Command::new(bai_python()).arg("-c").arg(format!(
            "import json\nfrom openapi_spec_validator import validate\nvalidate(json.load(open({:?})))",
            f.path().display().to_string()
        )));
        // Every documented operation is a route that exists (never the not-found fallback).
        for (path, item) in served["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let url = d.url(
                    listener,
                    &path.replace("{id}", &uuid::Uuid::new_v4().to_string()),
                );
                let mut req = d
                    .http
                    .request(
                        reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                        url,
                    )
                    .header(
                        "X-BackendAI-Storage-Auth-Token",
                        crate::common::MANAGER_SECRET,
                    );
                if item[method].get("requestBody").is_some() && api == "manager" {
                    req = req.header("content-type", "application/json").body("{}");
                }
                let r = send(req).await;
                let fallback =
                    (r.status == 404 && r.text().contains("storage/not-found")) || r.status == 405;
                assert!(
                    !fallback,
                    "{method} {path} is documented but not routed: {}",
                    r.status
                );
            }
        }
    }
    assert_eq!(
        send(d.http.get(d.url("internal", "/openapi.json")))
            .await
            .json()["info"]["title"],
        "storage-agent manager API"
    );
}

/// A value for a documented field: real names where the field needs one, else by its type.
fn example(doc: &Value, name: &str, schema: &Value, vfid: &str, qs: &str) -> Value {
    let fresh_vfid = || json!(format!("{qs}/{}", uuid::Uuid::new_v4().simple()));
    match name {
        "volume" | "src_volume" | "dst_volume" => return json!("vol1"),
        "vfid" | "src_vfid" | "virtual_folder_id" => return json!(vfid),
        "dst_vfid" => return fresh_vfid(),
        "qsid" | "quota_scope" => return json!(qs),
        "relpath" | "src_relpath" | "subpath" => return json!("a.txt"),
        "dst_relpath" => return json!("b.txt"),
        "relpaths" | "files" => return json!(["a.txt"]),
        "new_name" => return json!("renamed.txt"),
        "filename" => return json!("out.zip"),
        "permission" => return json!("read"),
        _ => {}
    }
    let resolved = |s: &Value| -> Value {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => doc["components"]["schemas"][r.rsplit('/').next().unwrap()].clone(),
            None => s.clone(),
        }
    };
    let s = resolved(schema);
    if let Some(first) = s["oneOf"].as_array().and_then(|a| a.first()) {
        return example(doc, name, first, vfid, qs);
    }
    let ty = match &s["type"] {
        Value::Array(a) => a[0].as_str().unwrap_or("string").to_string(),
        Value::String(t) => t.clone(),
        _ => "string".into(),
    };
    match ty.as_str() {
        "integer" | "number" => json!(1),
        "boolean" => json!(false),
        "array" => json!([example(doc, "", &s["items"], vfid, qs)]),
        "object" => body_from(doc, &s, vfid, qs),
        "null" => Value::Null,
        _ => json!("x"),
    }
}

/// A body with every required field of `schema`, built from the document alone.
fn body_from(doc: &Value, schema: &Value, vfid: &str, qs: &str) -> Value {
    let s = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap()],
        None => schema,
    };
    let mut body = serde_json::Map::new();
    for req in s["required"].as_array().into_iter().flatten() {
        let name = req.as_str().unwrap();
        body.insert(
            name.to_string(),
            example(doc, name, &s["properties"][name], vfid, qs),
        );
    }
    Value::Object(body)
}

/// Every manager operation accepts a body built from its documented schema alone: whatever it
/// answers (404 for what does not exist, 400 for what vfs cannot do), never that the body's
/// shape was wrong.
#[tokio::test]
async fn bodies_built_from_the_openapi_document_are_accepted() {
    let d = Daemon::start().await;
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/openapi-manager.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let (vfid, path) = d.create_vfolder().await;
    std::fs::write(path.join("a.txt"), b"a").unwrap();
    let qs = vfid.split_once('/').unwrap().0.to_string();
    let mut wrong = Vec::new();
    for (route, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(schema) = op["requestBody"]["content"]["application/json"].get("schema")
            else {
                continue;
            };
            let body = body_from(&doc, schema, &vfid, &qs);
            let r = d.mgr(&method.to_uppercase(), route, body.clone()).await;
            // (422 with per-path "results" is Backend.AI's batch answer about the paths, e.g.
            // after an earlier operation deleted the vfolder, not about the body's shape.)
            let shape = (r.status == 422 && !r.text().contains("\"results\""))
                || (r.status == 400 && r.text().contains("invalid-api-params"));
            if shape {
                wrong.push(format!(
                    "{method} {route} {body}: {} {}",
                    r.status,
                    r.text()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "bodies the document describes were refused:\n{}",
        wrong.join("\n")
    );
}
