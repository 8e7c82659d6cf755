//! A drop-in for a running Backend.AI 26.9 cluster beyond HTTP: every event and cache entry the
//! daemon writes is decoded with Backend.AI's own classes (backend.ai-common 26.9.6) as the
//! manager decodes them; Redis is found through etcd `config/redis`; a Sentinel failover is
//! followed without a restart; service discovery registers the node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::common::cluster::{EtcdServer, SERVICE, SentinelGroup, bai_decode};
use crate::common::redis::{RedisServer, free_port};
use crate::common::{Builder, Daemon, bin};

/// Every message on `events_all`, with the length of the `events` stream at the moment it
/// arrived (to check that a vfolder event was written before its task's terminal event).
#[derive(Clone, Default)]
struct Broadcasts(Arc<Mutex<Vec<(String, usize)>>>);

impl Broadcasts {
    async fn subscribe(redis_addr: &str) -> Self {
        let b = Broadcasts::default();
        let client = redis::Client::open(format!("redis://{redis_addr}/4")).unwrap();
        let mut ps = client.get_async_pubsub().await.unwrap();
        ps.subscribe("events_all").await.unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let sink = b.clone();
        tokio::spawn(async move {
            let mut msgs = ps.into_on_message();
            while let Some(m) = msgs.next().await {
                let raw: String = m.get_payload().unwrap_or_default();
                let xlen: usize = redis::cmd("XLEN")
                    .arg("events")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(0);
                sink.0.lock().unwrap().push((raw, xlen));
            }
        });
        b
    }

    fn raw(&self) -> Vec<(String, usize)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until every task in `ids` has a terminal event; returns them decoded by
    /// Backend.AI's classes, each with the stream length at arrival.
    async fn until_ended(&self, ids: &[&str]) -> Vec<(Value, usize)> {
        let start = Instant::now();
        loop {
            let raw = self.raw();
            let input: String = raw.iter().map(|(r, _)| format!("{r}\n")).collect();
            let decoded: Vec<(Value, usize)> = bai_decode(&["broadcast"], Some(&input))
                .into_iter()
                .zip(raw.iter().map(|(_, n)| *n))
                .collect();
            let ended = |id: &str| {
                decoded.iter().any(|(e, _)| {
                    e["body"]["task_id"] == id
                        && matches!(
                            e["name"].as_str(),
                            Some("bgtask_done" | "bgtask_failed" | "bgtask_cancelled")
                        )
                })
            };
            if ids.iter().all(|id| ended(id)) {
                return decoded;
            }
            assert!(
                start.elapsed() < crate::common::OUTCOME,
                "tasks {ids:?} did not end on events_all: {decoded:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The anycast `events` stream, decoded with Backend.AI's classes.
fn stream(redis: &str) -> Vec<Value> {
    bai_decode(&["stream", &format!("redis://{redis}/4")], None)
}

/// Waits until the decoded stream has an event `name` whose body matches `vfid`.
async fn wait_stream(redis: &str, name: &str, vfid: &str) -> Value {
    let start = Instant::now();
    loop {
        if let Some(e) = stream(redis)
            .into_iter()
            .find(|e| e["name"] == name && e["body"]["vfid"] == vfid)
        {
            return e;
        }
        assert!(
            start.elapsed() < crate::common::OUTCOME,
            "no {name} for {vfid} on the events stream: {:?}",
            stream(redis)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn with_redis(b: Builder, redis: &RedisServer) -> Builder {
    b.set("redis.addr", redis.url())
}

/// A vfolder whose clone or delete takes a few seconds: a tree deep and wide enough.
fn slow_tree(root: &std::path::Path) {
    use std::os::fd::AsFd;
    use storage_agent::volume::fsops;
    let mut fd = fsops::open_dir_path(root).unwrap();
    for _ in 0..20_000 {
        fsops::mkdir_at(fd.as_fd(), "d", 0o755).unwrap();
        fsops::create_at(fd.as_fd(), "f", 0o644).unwrap();
        fd = fsops::open_subdir_nofollow(fd.as_fd(), "d").unwrap();
    }
}

#[tokio::test]
async fn events_and_the_bgtask_cache_decode_with_backend_ai_classes() {
    let redis = RedisServer::start();
    let b = Broadcasts::subscribe(&redis.url()).await;
    let d = with_redis(Daemon::builder(), &redis).start().await;
    let (src, spath) = d.create_vfolder().await;
    std::fs::write(spath.join("f"), b"x").unwrap();
    std::fs::write(spath.join("g"), b"y").unwrap();
    let dst = crate::common::random_vfid();
    let clone = d.start_clone(&src, &dst).await;
    d.wait_task(&clone).await;
    // delete-async: only bgtask events, no vfolder event.
    let r = d
        .mgr(
            "POST",
            "/folder/file/delete-async",
            json!({"volume": "vol1", "vfid": src, "relpaths": ["g"]}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let del_files = r.json()["bgtask_id"].as_str().unwrap().to_string();
    d.wait_task(&del_files).await;
    let delete = d.start_delete(&src).await;
    d.wait_task(&delete).await;
    // A clone that fails: the destination's shard directory is occupied by a file.
    let bad_qs = uuid::Uuid::new_v4();
    let bad_id = uuid::Uuid::new_v4().simple().to_string();
    let qs_dir = d.vol_dir.join(bad_qs.simple().to_string());
    std::fs::create_dir_all(&qs_dir).unwrap();
    std::fs::write(qs_dir.join(&bad_id[..2]), b"in the way").unwrap();
    let (src2, _) = d.create_vfolder().await;
    let bad_dst = format!("user:{bad_qs}/{bad_id}");
    let failing = d.start_clone(&src2, &bad_dst).await;
    assert_eq!(d.wait_task(&failing).await["status"], "failed");

    // Broadcasts: per task, "Task started" first and one terminal event last.
    let tasks = [
        clone.as_str(),
        del_files.as_str(),
        delete.as_str(),
        failing.as_str(),
    ];
    let decoded = b.until_ended(&tasks).await;
    let anycast = stream(&redis.url());
    for (task, terminal, vfolder_event) in [
        (
            &clone,
            "BgtaskDoneEvent",
            Some(("vfolder_clone_success", &src)),
        ),
        (&del_files, "BgtaskDoneEvent", None),
        (
            &delete,
            "BgtaskDoneEvent",
            Some(("vfolder_deletion_success", &src)),
        ),
        (
            &failing,
            "BgtaskFailedEvent",
            Some(("vfolder_clone_failure", &src2)),
        ),
    ] {
        let mine: Vec<&(Value, usize)> = decoded
            .iter()
            .filter(|(e, _)| e["body"]["task_id"] == task.as_str())
            .collect();
        let first = &mine.first().unwrap().0;
        assert_eq!(first["class"], "BgtaskUpdatedEvent", "{first}");
        assert_eq!(first["body"]["message"], "Task started");
        assert_eq!(first["body"]["current_progress"], json!(0.0));
        assert_eq!(first["source"], "storage");
        let (last, xlen) = mine.last().unwrap();
        assert_eq!(last["class"], terminal, "{last}");
        assert_eq!(
            mine.iter()
                .filter(|(e, _)| e["class"] != "BgtaskUpdatedEvent")
                .count(),
            1,
            "exactly one terminal event for {task}"
        );
        if terminal == "BgtaskDoneEvent" {
            assert_eq!(last["body"]["message"], "Task completed successfully");
        }
        // The vfolder event was on the stream before the terminal event went out.
        if let Some((name, vfid)) = vfolder_event {
            let pos = anycast
                .iter()
                .position(|e| e["name"] == name && e["body"]["vfid"] == vfid.as_str())
                .unwrap_or_else(|| panic!("no {name} for {vfid}: {anycast:?}"));
            assert!(pos < *xlen, "{name} came after the terminal bgtask event");
        }
        // The cache the manager reads when a client subscribes late: the terminal event.
        let cached = bai_decode(
            &["cache", &format!("redis://{}/4", redis.url()), task],
            None,
        );
        assert_eq!(cached[0]["class"], terminal, "{cached:?}");
        let ttl = cached[0]["ttl"].as_i64().unwrap();
        assert!(ttl > 0 && ttl <= 300, "{ttl}");
    }

    // Anycast: vfolder events only, each as the Python proxy writes them.
    let by_name: HashMap<&str, &Value> = anycast
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(anycast.len(), 3, "{anycast:?}");
    assert_eq!(by_name["vfolder_clone_success"]["body"]["dst_vfid"], dst);
    assert_eq!(
        by_name["vfolder_clone_failure"]["body"]["dst_vfid"],
        bad_dst
    );
    assert!(
        by_name["vfolder_clone_failure"]["body"]["message"]
            .as_str()
            .unwrap()
            .len()
            > 5
    );
    for e in &anycast {
        assert_eq!(e["source"], "storage");
        assert_eq!(
            e["fields"],
            json!(["metadata", "name", "payload", "source"])
        );
        assert!(e["metadata"].is_object(), "{e}");
    }
    // Nothing of ours reads the stream: no consumer group exists on it.
    assert_eq!(redis.cli(&["-n", "4", "XINFO", "GROUPS", "events"]), "");
}

#[tokio::test]
async fn a_crash_or_shutdown_mid_task_still_ends_in_terminal_events() {
    let redis = RedisServer::start();
    let b = Broadcasts::subscribe(&redis.url()).await;
    let mut d = with_redis(Daemon::builder(), &redis).start().await;

    // kill -9 during a clone: rolled back at restart, and the manager hears of it.
    let (src, spath) = d.create_vfolder().await;
    slow_tree(&spath);
    let dst = crate::common::random_vfid();
    let clone = d.start_clone(&src, &dst).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.restart().await;
    let e = wait_stream(&redis.url(), "vfolder_clone_failure", &src).await;
    assert_eq!(e["body"]["dst_vfid"], dst);

    // kill -9 during a delete: resumed at restart, and it ends in success.
    let delete = d.start_delete(&src).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.restart().await;
    wait_stream(&redis.url(), "vfolder_deletion_success", &src).await;

    // SIGTERM during a delete: bgtask_cancelled, as the Python proxy sends; resumed at the next
    // start, the delete ends in success.
    let (v2, p2) = d.create_vfolder().await;
    slow_tree(&p2);
    let cancelled = d.start_delete(&v2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(d.terminate(), Some(0));
    let decoded = b.until_ended(&[&clone, &delete, &cancelled]).await;
    assert!(
        decoded
            .iter()
            .any(|(e, _)| e["class"] == "BgtaskCancelledEvent"
                && e["body"]["task_id"] == cancelled.as_str()
                && e["body"]["message"] == "Task cancelled"),
        "{decoded:?}"
    );
    d.restart().await;
    wait_stream(&redis.url(), "vfolder_deletion_success", &v2).await;
}

#[tokio::test]
async fn service_discovery_registers_the_node_for_prometheus() {
    let redis = RedisServer::start();
    let d = with_redis(Daemon::builder(), &redis)
        .set("api.manager.announce-addr", "10.0.0.5:6022")
        .set("api.manager.announce-internal-addr", "10.0.0.5:16023")
        .start()
        .await;
    let id = storage_agent::cluster::service_id("10.0.0.5:16023");
    let key = format!("service_discovery.storage-proxy.{id}");
    let start = Instant::now();
    while redis.cli(&["-n", "0", "EXISTS", &key]) != "1" {
        assert!(start.elapsed() < crate::common::OUTCOME, "no {key}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ttl: i64 = redis.cli(&["-n", "0", "TTL", &key]).parse().unwrap();
    assert!(ttl > 170 && ttl <= 180, "{ttl}");
    // Read back through Backend.AI's RedisServiceDiscovery, as the manager's HTTP-SD does.
    let got = bai_decode(&["discovery", &redis.url(), &id.to_string()], None);
    let meta = &got[0];
    assert_eq!(meta["service_group"], "storage-proxy");
    assert_eq!(meta["display_name"], format!("storage-{}", d.node_id()));
    assert_eq!(meta["endpoint"]["address"], "10.0.0.5:6022");
    assert_eq!(meta["endpoint"]["port"], 6022);
    assert_eq!(meta["endpoint"]["prometheus_address"], "10.0.0.5:16023");
    assert_eq!(got[1]["discovered"], json!([id.to_string()]));
}

fn node_id(b: &Builder) -> String {
    b.config["storage-proxy"]["node-id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn redis_is_found_through_etcd_with_node_overrides() {
    let etcd = EtcdServer::start();
    let redis = RedisServer::start();
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    etcd.put(&ns, "config/redis/addr", &redis.url());
    let d = Daemon::builder()
        .set("etcd.namespace", ns.as_str())
        .set("etcd.addr", etcd.addr())
        .start()
        .await;
    let (vf, _) = d.create_vfolder().await;
    let t = d.start_delete(&vf).await;
    d.wait_task(&t).await;
    wait_stream(&redis.url(), "vfolder_deletion_success", &vf).await;
    drop(d);

    // The global scope points at a dead port; this node's scope overrides it.
    let ns2 = format!("{ns}b");
    etcd.put(
        &ns2,
        "config/redis/addr",
        &format!("127.0.0.1:{}", free_port()),
    );
    let b = Daemon::builder()
        .set("etcd.namespace", ns2.as_str())
        .set("etcd.addr", etcd.addr());
    etcd.put(
        &ns2,
        &format!("nodes/storage/{}/config/redis/addr", node_id(&b)),
        &redis.url(),
    );
    let d = b.start().await;
    let (vf, _) = d.create_vfolder().await;
    let t = d.start_delete(&vf).await;
    d.wait_task(&t).await;
    wait_stream(&redis.url(), "vfolder_deletion_success", &vf).await;
}

fn serve_fails(b: Builder) -> String {
    let p = b.dir.path().join("etcd.toml");
    std::fs::write(&p, toml::to_string(&b.config).unwrap()).unwrap();
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(bin())
        .args(["serve", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve must refuse to start");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_missing_etcd_or_config_redis_stops_the_start() {
    let dead = format!("127.0.0.1:{}", free_port());
    let err = serve_fails(Daemon::builder().set("etcd.addr", dead.as_str()));
    assert!(err.contains("etcd") && err.contains("unreachable"), "{err}");
    let etcd = EtcdServer::start();
    let err = serve_fails(
        Daemon::builder()
            .set("etcd.namespace", "empty")
            .set("etcd.addr", etcd.addr()),
    );
    assert!(err.contains("config/redis"), "{err}");
}

#[tokio::test]
async fn sentinel_failover_is_followed_without_a_restart() {
    let group = SentinelGroup::start();
    let sentinels: Vec<toml::Value> = group
        .sentinel_list()
        .into_iter()
        .map(toml::Value::String)
        .collect();
    let mut d = Daemon::builder()
        .agent()
        .set("redis.sentinel", toml::Value::Array(sentinels))
        .set("redis.service-name", SERVICE)
        .set("redis.role-check-interval", "1s")
        .set("agent.heartbeat-interval", "1s")
        .start()
        .await;
    let _g = crate::common::agent::ContainerGuard(d.node_id());
    let first = group.master.url();
    let (vf, _) = d.create_vfolder().await;
    let t = d.start_delete(&vf).await;
    d.wait_task(&t).await;
    wait_stream(&first, "vfolder_deletion_success", &vf).await;

    // A session counted against a limit of 1 (acknowledged by the replica).
    let user = uuid::Uuid::new_v4();
    let (uvf, _) = d.user_vfolder(&user).await;
    let (_, key) = crate::common::agent::keypair(d.dir.path(), "k");
    let req = storage_agent::pb::CreateSessionRequest {
        kind: storage_agent::pb::SessionKind::Sftp as i32,
        user_id: user.to_string(),
        resource_group: "storage".into(),
        mounts: vec![crate::common::agent::mount("vol1", &uvf, "data", false)],
        credentials: Some(storage_agent::pb::Credentials {
            public_keys: vec![key],
            generate_password: false,
        }),
        max_sessions_per_user: Some(1),
        ..Default::default()
    };
    d.rpc()
        .await
        .create_session(req.clone())
        .await
        .expect("first session admitted");

    // The master dies; the sentinels promote the replica.
    let mut group = group;
    group.master.stop();
    let start = Instant::now();
    while group.current_master() == first {
        assert!(
            start.elapsed() < crate::common::OUTCOME,
            "no failover happened"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second = group.current_master();
    assert_eq!(second, group.replica.url());

    // Without a restart: events reach the new master, heartbeats go on there, and the
    // session admitted before the failover still counts (the limit of 1 holds).
    let (vf2, _) = d.create_vfolder().await;
    let t = d.start_delete(&vf2).await;
    d.wait_task(&t).await;
    wait_stream(&second, "vfolder_deletion_success", &vf2).await;
    let start = Instant::now();
    while group
        .replica
        .cli(&["-n", "2", "XLEN", storage_agent::cluster::HEARTBEAT_STREAM])
        == "0"
    {
        assert!(
            start.elapsed() < crate::common::OUTCOME,
            "no heartbeat on the new master"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = d
        .rpc()
        .await
        .create_session(req)
        .await
        .expect_err("the limit of 1 holds across the failover");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    d.terminate();
}

#[tokio::test]
async fn sentinel_from_etcd() {
    let group = SentinelGroup::start();
    let etcd = EtcdServer::start();
    let ns = format!("s{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    etcd.put(
        &ns,
        "config/redis/sentinel",
        &group.sentinel_list().join(","),
    );
    etcd.put(&ns, "config/redis/service_name", SERVICE);
    let d = Daemon::builder()
        .set("etcd.namespace", ns.as_str())
        .set("etcd.addr", etcd.addr())
        .start()
        .await;
    let (vf, _) = d.create_vfolder().await;
    let t = d.start_delete(&vf).await;
    d.wait_task(&t).await;
    wait_stream(&group.master.url(), "vfolder_deletion_success", &vf).await;
}
