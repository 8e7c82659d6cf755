//! Several storage nodes and one real redis-server: the cluster-wide per-user limit under
//! concurrency and node crashes, heartbeats, Redis outages. (The Backend.AI events are in
//! `dropin.rs`, decoded with Backend.AI's own classes.)

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value, json};
use storage_agent::pb;

use crate::common::agent::{ContainerGuard, keypair, mount};
use crate::common::redis::RedisServer;
use crate::common::{Builder, Daemon};

fn clustered(b: Builder, redis: &RedisServer, hb: &str) -> Builder {
    b.agent()
        .set("redis.addr", redis.url())
        .set("agent.heartbeat-interval", hb)
        .set("agent.resource-group", "storage-rg")
        .set("agent.max-containers", 20)
}

fn req(user: &uuid::Uuid, vf: &str, key: &str, limit: u32) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        kind: pb::SessionKind::Sftp as i32,
        user_id: user.to_string(),
        resource_group: "storage-rg".into(),
        mounts: vec![mount("vol1", vf, "data", false)],
        credentials: Some(pb::Credentials {
            public_keys: vec![key.into()],
            generate_password: false,
        }),
        max_sessions_per_user: Some(limit),
        ..Default::default()
    }
}

/// Reads the node's heartbeat stream (ours, in our database) with XREAD, as (name, source,
/// payload) tuples.
async fn heartbeats(redis: &RedisServer) -> Vec<(String, String, Value)> {
    let mut c = redis
        .client(2)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let r: redis::streams::StreamReadReply = c
        .xread_options(
            &[storage_agent::cluster::HEARTBEAT_STREAM],
            &["0"],
            &redis::streams::StreamReadOptions::default().count(100_000),
        )
        .await
        .unwrap();
    r.keys
        .into_iter()
        .flat_map(|k| k.ids)
        .collect::<Vec<_>>()
        .iter()
        .map(|e| {
            let s = |k: &str| -> String { e.get(k).unwrap_or_default() };
            (
                s("name"),
                s("source"),
                serde_json::from_str(&s("payload")).unwrap_or(Value::Null),
            )
        })
        .collect()
}

async fn live_count(nodes: &[&Daemon]) -> usize {
    let mut n = 0;
    for d in nodes {
        if d.addrs.contains_key("rpc") {
            let l = d
                .rpc()
                .await
                .list_sessions(pb::ListSessionsRequest {
                    state: pb::SessionState::Running as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            n += l.sessions.len();
        }
    }
    n
}

#[tokio::test]
async fn three_nodes_never_exceed_the_per_user_limit() {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(clustered(Daemon::builder(), &redis, "1s").start().await);
    }
    let _guards: Vec<_> = nodes.iter().map(|d| ContainerGuard(d.node_id())).collect();
    let user = uuid::Uuid::new_v4();
    let (_, key) = keypair(nodes[0].dir.path(), "k");
    let mut vfs = Vec::new();
    for d in &nodes {
        vfs.push(d.user_vfolder(&user).await.0);
    }
    // Warm the SFTP image on every node so the race is on admission.
    for (d, vf) in nodes.iter().zip(&vfs) {
        let s = d
            .rpc()
            .await
            .create_session(req(&user, vf, &key, 5))
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        d.rpc()
            .await
            .destroy_session(pb::DestroySessionRequest { id: s.id })
            .await
            .unwrap();
    }

    let mut tasks = Vec::new();
    for i in 0..60 {
        let d = &nodes[i % 3];
        let mut rpc = d.rpc().await;
        let r = req(&user, &vfs[i % 3], &key, 5);
        tasks.push(tokio::spawn(async move { rpc.create_session(r).await }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(
                    e.message().contains(&format!(
                        "user {user} has 5/5 sessions in resource group storage-rg"
                    )),
                    "{}",
                    e.message()
                );
                exhausted += 1;
            }
        }
    }
    assert_eq!((ok, exhausted), (5, 55));
    let refs: Vec<&Daemon> = nodes.iter().collect();
    assert_eq!(live_count(&refs).await, 5);
    let zkey = format!("storage_agent.user_sessions.storage-rg.{user}");
    assert_eq!(redis.cli(&["-n", "2", "ZCARD", &zkey]), "5");

    // Kill the node holding the most sessions; after its leases (3 heartbeats) they stop
    // counting and other nodes admit new sessions.
    let mut per_node = Vec::new();
    for d in &nodes {
        per_node.push(
            d.rpc()
                .await
                .list_sessions(pb::ListSessionsRequest {
                    state: pb::SessionState::Running as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .sessions
                .len(),
        );
    }
    let victim = (0..3).max_by_key(|i| per_node[*i]).unwrap();
    let held = per_node[victim];
    assert!(held > 0);
    nodes[victim].kill9();
    let survivor = (victim + 1) % 3;
    let deadline = Instant::now() + crate::common::OUTCOME;
    let mut admitted = 0;
    while admitted < held {
        match nodes[survivor]
            .rpc()
            .await
            .create_session(req(&user, &vfs[survivor], &key, 5))
            .await
        {
            Ok(_) => admitted += 1,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(
                    Instant::now() < deadline,
                    "the crashed node's sessions still count after their lease"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    assert_eq!(redis.cli(&["-n", "2", "ZCARD", &zkey]), "5");

    // The crashed node comes back: it adopts its containers, but re-registering them would exceed
    // the limit, so they are ended; nothing ever counts more than 5.
    nodes[victim].restart().await;
    let deadline = Instant::now() + crate::common::OUTCOME;
    loop {
        let refs: Vec<&Daemon> = nodes.iter().collect();
        let live = live_count(&refs).await;
        let counted: usize = redis.cli(&["-n", "2", "ZCARD", &zkey]).parse().unwrap();
        assert!(counted <= 5, "Redis counts {counted}");
        if live == 5 {
            break;
        }
        assert!(
            live >= 5 && Instant::now() < deadline,
            "{live} live sessions"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ended = nodes[victim]
        .rpc()
        .await
        .list_sessions(pb::ListSessionsRequest {
            state: pb::SessionState::Terminated as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        ended
            .sessions
            .iter()
            .any(|s| s.reason.contains("session limit")),
        "{:?}",
        ended.sessions.iter().map(|s| &s.reason).collect::<Vec<_>>()
    );
}

/// CreateSession on `d` right after Redis restarted, which must be refused; the first calls
/// may find the old connection broken (UNAVAILABLE) and are repeated.
async fn refused_after_restart(d: &Daemon, r: pb::CreateSessionRequest) -> tonic::Status {
    let t = Instant::now();
    loop {
        let e = d
            .rpc()
            .await
            .create_session(r.clone())
            .await
            .expect_err("the user is at the limit on another node");
        if e.code() != tonic::Code::Unavailable || t.elapsed() > crate::common::OUTCOME {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Found by the soak: Redis restarted without persistence knows no session until their nodes
/// renew the leases, and a node admitting meanwhile made room beyond the limit (the first
/// session was then ended). New sessions now wait a heartbeat after the registry was lost.
#[tokio::test]
async fn a_redis_that_lost_its_data_makes_no_room_beyond_the_limit() {
    let mut redis = RedisServer::start();
    // Renewals every 2 s: without the settle wait, an admission right after the restart
    // comes before the first renewal.
    let a = clustered(Daemon::builder(), &redis, "6s").start().await;
    let b = clustered(Daemon::builder(), &redis, "6s").start().await;
    let _g = (ContainerGuard(a.node_id()), ContainerGuard(b.node_id()));
    let user = uuid::Uuid::new_v4();
    let (_, key) = keypair(a.dir.path(), "k");
    let vf_a = a.user_vfolder(&user).await.0;
    let vf_b = b.user_vfolder(&user).await.0;
    let held = a
        .rpc()
        .await
        .create_session(req(&user, &vf_a, &key, 1))
        .await
        .expect("the first session")
        .into_inner()
        .session
        .unwrap();

    redis.restart();
    let e = refused_after_restart(&b, req(&user, &vf_b, &key, 1)).await;
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // Node a's session was counted again, not ended.
    let zkey = format!("storage_agent.user_sessions.storage-rg.{user}");
    assert_eq!(redis.cli(&["-n", "2", "ZRANGE", &zkey, "0", "-1"]), held.id);
    assert_eq!(live_count(&[&a, &b]).await, 1);
}

/// Found by the soak too: a Redis that restarts from an older snapshot (its own RDB, or a
/// replica's dump) has the registry's epoch but not the sessions admitted after the snapshot.
/// A new Redis process starts a new epoch, whatever its data.
#[tokio::test]
async fn a_redis_restarted_from_an_older_snapshot_makes_no_room_beyond_the_limit() {
    let mut redis = RedisServer::start();
    let a = clustered(Daemon::builder(), &redis, "6s").start().await;
    let b = clustered(Daemon::builder(), &redis, "6s").start().await;
    let _g = (ContainerGuard(a.node_id()), ContainerGuard(b.node_id()));
    let (_, key) = keypair(a.dir.path(), "k");
    // Another user's session makes the registry exist; the snapshot has it.
    let other = uuid::Uuid::new_v4();
    let vf_o = a.user_vfolder(&other).await.0;
    a.rpc()
        .await
        .create_session(req(&other, &vf_o, &key, 1))
        .await
        .expect("another user's session");
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    let user = uuid::Uuid::new_v4();
    let vf_a = a.user_vfolder(&user).await.0;
    let vf_b = b.user_vfolder(&user).await.0;
    let held = a
        .rpc()
        .await
        .create_session(req(&user, &vf_a, &key, 1))
        .await
        .expect("the user's session, after the snapshot")
        .into_inner()
        .session
        .unwrap();

    redis.restart();
    let epoch = storage_agent::cluster::EPOCH_KEY;
    assert_eq!(
        redis.cli(&["-n", "2", "EXISTS", epoch]),
        "1",
        "the snapshot has the registry"
    );
    let zkey = format!("storage_agent.user_sessions.storage-rg.{user}");
    assert_eq!(redis.cli(&["-n", "2", "ZCARD", &zkey]), "0");
    let e = refused_after_restart(&b, req(&user, &vf_b, &key, 1)).await;
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eq!(redis.cli(&["-n", "2", "ZRANGE", &zkey, "0", "-1"]), held.id);
    assert_eq!(live_count(&[&a, &b]).await, 2);
}

#[tokio::test]
async fn heartbeats_discovery_and_redis_outages() {
    let mut redis = RedisServer::start();
    let d = clustered(Daemon::builder(), &redis, "2s")
        .set("agent.region", "kr-seoul")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let node = d.node_id();
    let t0 = Instant::now();
    // The first heartbeat comes at start.
    let hb = loop {
        let evs = heartbeats(&redis).await;
        if let Some(e) = evs.into_iter().find(|e| e.0 == "storage_agent_heartbeat") {
            break e;
        }
        assert!(t0.elapsed() < crate::common::OUTCOME, "no heartbeat");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hb.1, node, "source is the node id");
    let p = &hb.2;
    assert_eq!(p["node_id"], node);
    assert_eq!(p["resource_group"], "storage-rg");
    assert_eq!(p["region"], "kr-seoul");
    assert!(p["version"].is_string());
    for k in ["manager_api", "client_api", "rpc", "public_host"] {
        assert!(
            p["addresses"][k].as_str().is_some_and(|s| !s.is_empty()),
            "{k}: {p}"
        );
    }
    assert_eq!(p["addresses"]["rpc"], d.addrs["rpc"]);
    assert_eq!(p["addresses"]["manager_api"], d.addrs["manager"]);
    let cap = &p["capacity"];
    for k in ["max_containers", "running", "starting", "available"] {
        assert!(cap[k].is_u64(), "{k}: {cap}");
        for kind in ["sftp", "filebrowser"] {
            assert!(cap["kinds"][kind][k].is_u64(), "{kind}.{k}: {cap}");
        }
    }
    // Configured 20, possibly bounded lower by this host's CPU or memory (2 cores here).
    let max = cap["max_containers"].as_u64().unwrap();
    assert!((1..=20).contains(&max), "{cap}");
    assert_eq!(cap["available"].as_u64(), Some(max));
    assert!(["config", "cpu", "memory", "ports"].contains(&cap["bounded_by"].as_str().unwrap()));
    for k in [
        "memory_total",
        "memory_available",
        "memory_reserved",
        "cpus",
        "cpus_reserved",
    ] {
        assert!(p["host"][k].is_number(), "{k}");
    }
    assert_eq!(p["volumes"][0]["name"], "vol1");
    assert_eq!(p["volumes"][0]["status"], "healthy");
    assert_eq!(
        redis.cli(&["-n", "0", "GET", &format!("container_count.{node}")]),
        "0"
    );
    assert_eq!(
        redis.cli(&[
            "-n",
            "2",
            "HGET",
            &format!("storage_agent.node.{node}"),
            "resource_group"
        ]),
        "storage-rg"
    );
    let ttl: i64 = redis
        .cli(&["-n", "2", "PTTL", &format!("storage_agent.node.{node}")])
        .parse()
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 6000,
        "discovery TTL is 3 heartbeats: {ttl}"
    );

    // A capacity change is published at once, not at the next interval.
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let (_, key) = keypair(d.dir.path(), "k");
    let s = d
        .rpc()
        .await
        .create_session(req(&user, &vf, &key, 3))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let after = Instant::now();
    loop {
        let evs = heartbeats(&redis).await;
        if evs.iter().any(|e| {
            e.0 == "storage_agent_heartbeat"
                && e.2["capacity"]["running"] == 1
                && e.2["capacity"]["kinds"]["sftp"]["running"] == 1
        }) {
            break;
        }
        assert!(
            after.elapsed() < crate::common::OUTCOME,
            "no heartbeat after the capacity change"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        redis.cli(&["-n", "0", "GET", &format!("container_count.{node}")]),
        "1"
    );
    let zkey = format!("storage_agent.user_sessions.storage-rg.{user}");
    assert_eq!(redis.cli(&["-n", "2", "ZRANGE", &zkey, "0", "-1"]), s.id);

    // Redis goes away: the storage proxy keeps working, admission needing Redis is UNAVAILABLE.
    redis.stop();
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vf}),
        )
        .await;
    assert_eq!(r.status, 200);
    let e = d
        .rpc()
        .await
        .create_session(req(&user, &vf, &key, 3))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("per-user session limit"),
        "{}",
        e.message()
    );
    let health = d.get("internal", "/health").await.json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(d.get("internal", "/readyz").await.status, 200);

    // It returns empty: heartbeats resume and the live session's lease is re-registered.
    redis.restart();
    let back = Instant::now();
    loop {
        let evs = heartbeats(&redis).await;
        if evs.iter().any(|e| e.0 == "storage_agent_heartbeat")
            && redis.cli(&["-n", "2", "ZRANGE", &zkey, "0", "-1"]) == s.id
        {
            break;
        }
        assert!(
            back.elapsed() < crate::common::OUTCOME,
            "heartbeats did not resume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    d.rpc()
        .await
        .create_session(req(&user, &vf, &key, 3))
        .await
        .expect("admission works again");
}

#[tokio::test]
async fn redis_over_tls_with_a_pinned_ca() {
    let redis = RedisServer::start_tls();
    let cert = redis.tls_cert.clone().unwrap();
    let d = clustered(Daemon::builder(), &redis, "1s")
        .set("redis.tls", true)
        .set("redis.tls-ca", cert.display().to_string())
        .start()
        .await;
    wait_for_discovery(&redis, &d, "no heartbeat over TLS").await;
    let check = redis_check(&d).await;
    assert_eq!(check["is_healthy"], true, "{check}");
}

#[tokio::test]
async fn redis_with_an_acl_user() {
    let redis = RedisServer::start_acl("storage-agent", "acl-s3cret");
    let d = clustered(Daemon::builder(), &redis, "1s")
        .set("redis.username", "storage-agent")
        .set("redis.password", "acl-s3cret")
        .start()
        .await;
    wait_for_discovery(&redis, &d, "no heartbeat as the ACL user").await;
    assert_eq!(redis_check(&d).await["is_healthy"], true);

    // A wrong password is an outage, not a failed start: vfolders work, /health names it, and
    // sessions that need the cross-node limit are refused rather than admitted unchecked.
    let bad = clustered(Daemon::builder(), &redis, "1s")
        .set("redis.username", "storage-agent")
        .set("redis.password", "wrong")
        .start()
        .await;
    let (vf, _) = bad.create_vfolder().await;
    assert!(!vf.is_empty());
    let start = Instant::now();
    let check = loop {
        let c = redis_check(&bad).await;
        if c["is_healthy"] == false {
            break c;
        }
        assert!(start.elapsed() < crate::common::OUTCOME, "{c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let msg = check["error_message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        msg.contains("wrongpass") || msg.contains("auth"),
        "the reason is given: {check}"
    );
    let user = uuid::Uuid::new_v4();
    let (uvf, _) = bad.user_vfolder(&user).await;
    let (_, key) = keypair(bad.dir.path(), "k");
    let e = bad
        .rpc()
        .await
        .create_session(req(&user, &uvf, &key, 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}

async fn redis_check(d: &Daemon) -> Value {
    let h = d.get("internal", "/health").await.json();
    h["connectivity"]["connectivity_checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["service_group"] == "redis")
        .unwrap()
        .clone()
}

/// Waits for the node's discovery hash, which its first heartbeat writes.
async fn wait_for_discovery(redis: &RedisServer, d: &Daemon, what: &str) {
    let node = d.node_id();
    let key = format!("storage_agent.node.{node}");
    let start = Instant::now();
    while redis.cli(&["-n", "2", "HGET", &key, "node_id"]) != node {
        assert!(start.elapsed() < crate::common::OUTCOME, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
