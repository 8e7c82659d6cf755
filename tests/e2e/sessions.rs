//! Session admission, bad requests, authentication, lifecycle (adoption after kill -9, reaping,
//! containers dying) against a real Docker engine.

use std::process::Command;
use std::time::Instant;

use storage_agent::pb;

use crate::common::Daemon;
use crate::common::agent::{ContainerGuard, Rpc, keypair, mount, port_block, sftp_key, text};

fn req(user: &uuid::Uuid, mounts: Vec<pb::Mount>, key: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        kind: pb::SessionKind::Sftp as i32,
        user_id: user.to_string(),
        resource_group: "storage".into(),
        mounts,
        credentials: Some(pb::Credentials {
            public_keys: vec![key.to_string()],
            generate_password: false,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_and_start_nothing() {
    let d = Daemon::builder().agent().start().await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let other = uuid::Uuid::new_v4();
    let (vf, vpath) = d.user_vfolder(&user).await;
    let (foreign, _) = d.user_vfolder(&other).await;
    let outside = d.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, vpath.join("out")).unwrap();
    std::fs::create_dir(vpath.join("inner")).unwrap();
    let (_, key) = keypair(d.dir.path(), "k");
    let mut rpc = d.rpc().await;
    let good = || req(&user, vec![mount("vol1", &vf, "data", false)], &key);

    let mut cases: Vec<(&str, pb::CreateSessionRequest)> = Vec::new();
    let mut r = good();
    r.mounts[0].volume = "nope".into();
    cases.push(("unknown volume", r));
    let mut r = good();
    r.mounts[0].vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    cases.push(("unknown vfid", r));
    let mut r = good();
    r.mounts[0].vfid = "garbage".into();
    cases.push(("malformed vfid", r));
    let mut r = good();
    r.mounts[0].vfid = foreign.clone();
    cases.push(("another user's vfolder", r));
    let mut r = good();
    r.mounts[0].subpath = "../..".into();
    cases.push(("subpath ../..", r));
    let mut r = good();
    r.mounts[0].subpath = "out".into();
    cases.push(("subpath through a symlink out", r));
    let mut r = good();
    r.mounts[0].subpath = "missing".into();
    cases.push(("missing subpath", r));
    let mut r = good();
    r.credentials = Some(pb::Credentials {
        public_keys: vec!["ssh-ed25519 notakey".into()],
        generate_password: false,
    });
    cases.push(("a public key that is not a key", r));
    let mut r = good();
    r.credentials = Some(pb::Credentials {
        public_keys: vec![],
        generate_password: false,
    });
    cases.push(("no credentials", r));
    let mut r = good();
    r.limits = Some(pb::Limits {
        cpus: 64.0,
        memory_bytes: 0,
        pids: 0,
    });
    cases.push(("cpus above the node maximum", r));
    let mut r = good();
    r.limits = Some(pb::Limits {
        cpus: 0.0,
        memory_bytes: 1 << 40,
        pids: 0,
    });
    cases.push(("memory above the node maximum", r));
    let mut r = good();
    r.limits = Some(pb::Limits {
        cpus: 0.0,
        memory_bytes: 0,
        pids: 1 << 30,
    });
    cases.push(("pids above the node maximum", r));
    let mut r = good();
    r.mounts.push(mount("vol1", &vf, "data", true));
    cases.push(("duplicate mount names", r));
    let mut r = good();
    r.mounts[0].name = "../x".into();
    cases.push(("mount name with a path", r));
    let mut r = good();
    r.mounts.clear();
    cases.push(("no mounts", r));
    let mut r = good();
    r.kind = 0;
    cases.push(("no kind", r));
    let mut r = good();
    r.user_id = "not-a-uuid".into();
    cases.push(("bad user id", r));
    let mut r = good();
    r.username = "root".into();
    cases.push(("reserved username", r));
    let mut r = good();
    r.ttl_seconds = 365 * 86400;
    cases.push(("ttl beyond the maximum", r));
    for (what, r) in cases {
        let e = rpc.create_session(r).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(!e.message().is_empty());
    }
    assert!(
        d.containers().is_empty(),
        "no container for refused requests"
    );
    // A subpath inside the vfolder is fine.
    let mut r = good();
    r.mounts[0].subpath = "inner".into();
    let ok = rpc.create_session(r).await.unwrap().into_inner();
    assert_eq!(ok.session.unwrap().mounts[0].subpath, "inner");
}

#[tokio::test]
async fn rpc_needs_the_secret_health_and_reflection_work() {
    let d = Daemon::builder().agent().start().await;
    for secret in [None, Some("wrong-secret")] {
        let mut rpc = d.rpc_with(secret).await;
        let e = rpc
            .get_capacity(pb::GetCapacityRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{secret:?}");
    }
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", d.addrs["rpc"]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "storage_agent.v1.StorageAgent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Reflection lists the service (with the secret), as grpcurl would ask.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::with_interceptor(ch, |mut r: tonic::Request<()>| {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", crate::common::agent::RPC_SECRET)
                .parse()
                .unwrap(),
        );
        Ok(r)
    });
    let reqs = futures::stream::iter(vec![ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]);
    let mut resp = refl
        .server_reflection_info(reqs)
        .await
        .unwrap()
        .into_inner();
    let first = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("{first:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"storage_agent.v1.StorageAgent".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn capacity_and_per_user_limits() {
    let d = Daemon::builder()
        .agent()
        .set("agent.max-containers", 3)
        .set("agent.max-sessions-per-user", 1)
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let (_, key) = keypair(d.dir.path(), "k");
    let mut rpc = d.rpc().await;
    let cap = d.capacity().await;
    assert_eq!(
        (cap.max_containers, cap.running, cap.starting, cap.available),
        (3, 0, 0, 3)
    );
    assert_eq!(cap.bounded_by, "config");
    assert_eq!(cap.configured_max_containers, 3);
    // The same numbers on the internal listener, for probes without gRPC.
    let internal = d.get("internal", "/capacity").await.json();
    assert_eq!(
        (
            internal["max_containers"].as_u64(),
            internal["available"].as_u64()
        ),
        (Some(3), Some(3))
    );
    assert_eq!(internal["kinds"]["sftp"]["running"], 0);
    assert!(cap.host.as_ref().unwrap().memory_total_bytes > 0);
    let mut watch = rpc
        .watch_capacity(pb::WatchCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.available, 3);

    let alice = uuid::Uuid::new_v4();
    let (a_vf, _) = d.user_vfolder(&alice).await;
    let s1 = rpc
        .create_session(req(&alice, vec![mount("vol1", &a_vf, "data", false)], &key))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    // The node default limit is 1 per user per resource group.
    let e = rpc
        .create_session(req(&alice, vec![mount("vol1", &a_vf, "data", false)], &key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        e.message(),
        format!("user {alice} has 1/1 sessions in resource group storage")
    );
    // Another resource group counts separately; the manager's own limit overrides the default.
    let mut other_rg = req(&alice, vec![mount("vol1", &a_vf, "data", false)], &key);
    other_rg.resource_group = "other-rg".into();
    rpc.create_session(other_rg).await.unwrap();
    let mut raised = req(&alice, vec![mount("vol1", &a_vf, "data", false)], &key);
    raised.max_sessions_per_user = Some(5);
    rpc.create_session(raised).await.unwrap();
    // The node is full now.
    let bob = uuid::Uuid::new_v4();
    let (b_vf, _) = d.user_vfolder(&bob).await;
    let e = rpc
        .create_session(req(&bob, vec![mount("vol1", &b_vf, "data", false)], &key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().starts_with("node full: 3/3 containers"),
        "{}",
        e.message()
    );
    let cap = d.capacity().await;
    assert_eq!((cap.running, cap.available), (3, 0));
    assert_eq!(
        cap.kinds
            .iter()
            .find(|k| k.kind == pb::SessionKind::Sftp as i32)
            .unwrap()
            .running,
        3
    );
    // Watchers hear about every change.
    let mut last = first;
    let deadline = Instant::now() + crate::common::OUTCOME;
    while last.available != 0 && Instant::now() < deadline {
        last = tokio::time::timeout(crate::common::OUTCOME, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert_eq!(last.available, 0);
    rpc.destroy_session(pb::DestroySessionRequest { id: s1.id })
        .await
        .unwrap();
    // Updates arrive in order (starting → running, then the destroy); the freed slot shows up.
    let mut next = last;
    while next.available == 0 {
        next = tokio::time::timeout(crate::common::OUTCOME, watch.message())
            .await
            .expect("a capacity update after destroy")
            .unwrap()
            .unwrap();
    }
    assert_eq!((next.available, next.running), (1, 2));
    rpc.create_session(req(&bob, vec![mount("vol1", &b_vf, "data", false)], &key))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_creates_never_over_admit() {
    let d = Daemon::builder()
        .agent()
        .set("agent.max-containers", 10)
        .set("agent.max-sessions-per-user", 3)
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let (_, key) = keypair(d.dir.path(), "k");
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    // Warm the image so every call races on admission, not on the build.
    let mut rpc = d.rpc().await;
    let warm = rpc
        .create_session(req(&user, vec![mount("vol1", &vf, "data", false)], &key))
        .await
        .unwrap()
        .into_inner();
    rpc.destroy_session(pb::DestroySessionRequest {
        id: warm.session.unwrap().id,
    })
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut rpc = d.rpc().await;
        let r = req(&user, vec![mount("vol1", &vf, "data", false)], &key);
        tasks.push(tokio::spawn(async move { rpc.create_session(r).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}"),
        }
    }
    assert_eq!(ok, 3, "exactly the per-user limit was admitted");
    assert_eq!(d.containers().len(), 3);
}

/// A port free when picked can be taken before Docker binds it (a client's outgoing connection
/// in the ephemeral range, another program): the session moves to another free port instead of
/// failing. The test takes the port itself the moment the session is admitted. (Docker must
/// bind published ports itself: its userland proxy, the default, or Docker 28+ without it.)
#[tokio::test]
async fn a_port_taken_before_docker_binds_it_moves_the_session() {
    // Room to move: the block lies in the ephemeral range, where other tests' connections take
    // ports too (with 3, a fresh-clone run found none free to move to).
    let (lo, hi) = port_block(16);
    let d = Daemon::builder()
        .agent()
        .set("agent.port-range", format!("{lo}-{hi}"))
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let (keyfile, key) = keypair(d.dir.path(), "k");
    let user = uuid::Uuid::new_v4();
    let (vf, path) = d.user_vfolder(&user).await;
    std::fs::write(path.join("hello.txt"), b"hi").unwrap();
    let mut rpc = d.rpc().await;
    let create = |rpc: &Rpc| {
        let mut rpc = rpc.clone();
        let r = req(&user, vec![mount("vol1", &vf, "data", false)], &key);
        tokio::spawn(async move { rpc.create_session(r).await })
    };
    // Destroyed, and its port bindable again (Docker lets go of it a moment later).
    let destroy = |rpc: &Rpc, s: pb::Session| {
        let mut rpc = rpc.clone();
        async move {
            rpc.destroy_session(pb::DestroySessionRequest { id: s.id })
                .await
                .unwrap();
            let port = s.endpoints[0].port as u16;
            let end = Instant::now() + std::time::Duration::from_secs(120);
            while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < end,
                    "port {port} still held 2 minutes after destroy"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    // The image is built by the first session: later ones start in a fraction of a second,
    // which is still long enough for the test to get in between (tried a few times if not).
    let warm = create(&rpc).await.unwrap().unwrap().into_inner();
    destroy(&rpc, warm.session.unwrap()).await;
    for attempt in 1..=5 {
        let creating = create(&rpc);
        // Admitted: its row holds its port while it starts. Polled, since the start takes a
        // fraction of a second; a start that ends first means Docker was quicker.
        let taken = loop {
            if creating.is_finished() {
                break None;
            }
            let starting = rpc
                .list_sessions(pb::ListSessionsRequest {
                    state: pb::SessionState::Starting as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .sessions;
            if let Some(e) = starting.first().and_then(|s| s.endpoints.first()) {
                break std::net::TcpListener::bind(("127.0.0.1", e.port as u16)).ok();
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        };
        let s = creating
            .await
            .unwrap()
            .expect("the session starts although its first port was taken")
            .into_inner()
            .session
            .unwrap();
        let Some(listener) = taken else {
            // Docker was quicker this time: nothing was taken from it.
            destroy(&rpc, s).await;
            continue;
        };
        let held = listener.local_addr().unwrap().port();
        let port = s.endpoints[0].port as u16;
        assert_ne!(port, held, "attempt {attempt}: moved off the taken port");
        assert!((lo..=hi).contains(&port), "{port} in {lo}-{hi}");
        assert_eq!(s.state, pb::SessionState::Running as i32);
        let out = sftp_key(&keyfile, "work", port, "get data/hello.txt /dev/null\n");
        assert!(
            out.status.success(),
            "usable on its new port: {}",
            text(&out)
        );
        return;
    }
    panic!("in 5 attempts Docker always bound the port before the test could take it");
}

#[tokio::test]
async fn adoption_after_kill9_and_containers_that_die() {
    let mut d = Daemon::builder().agent().start().await;
    let _g = ContainerGuard(d.node_id());
    let (keyfile, key) = keypair(d.dir.path(), "k");
    let mut ids = Vec::new();
    let mut ports = Vec::new();
    // Four sessions: three to be adopted, one whose container disappears while the daemon is down.
    for _ in 0..4 {
        let user = uuid::Uuid::new_v4();
        let (vf, path) = d.user_vfolder(&user).await;
        std::fs::write(path.join("hello.txt"), b"hi").unwrap();
        let s = d
            .rpc()
            .await
            .create_session(req(&user, vec![mount("vol1", &vf, "data", false)], &key))
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        ports.push(s.endpoints[0].port as u16);
        ids.push((s.id, s.container_id));
    }
    // One container is removed behind the daemon's back while it is down.
    d.kill9();
    let out = Command::new("docker")
        .args(["rm", "-f", &ids[3].1])
        .output()
        .unwrap();
    assert!(out.status.success());
    d.restart().await;
    let s = d
        .wait_session(
            &ids[3].0,
            pb::SessionState::Terminated,
            "the vanished container's session is not terminated",
        )
        .await;
    assert!(s.reason.contains("vanished"), "{}", s.reason);
    for (i, (id, _)) in ids.iter().take(3).enumerate() {
        let s = d.session(id).await;
        assert_eq!(s.state, pb::SessionState::Running as i32, "adopted");
        let out = sftp_key(&keyfile, "work", ports[i], "get data/hello.txt /dev/null\n");
        assert!(
            out.status.success(),
            "adopted session {i} is usable: {}",
            text(&out)
        );
    }
    let cap = d.capacity().await;
    assert_eq!(cap.running, 3, "counts are exact after the crash");
    assert_eq!(d.containers().len(), 3);

    // A container that dies on its own: the session is marked failed with a reason.
    let out = Command::new("docker")
        .args(["kill", &ids[0].1])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = d
        .wait_session(&ids[0].0, pb::SessionState::Failed, "death not noticed")
        .await;
    assert!(s.reason.contains("exited with code"), "{}", s.reason);
    let cap = d.capacity().await;
    assert_eq!(cap.running, 2);
}

#[tokio::test]
async fn ttl_and_idle_reaping() {
    let d = Daemon::builder().agent().start().await;
    let _g = ContainerGuard(d.node_id());
    let (_, key) = keypair(d.dir.path(), "k");
    let mut rpc = d.rpc().await;
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let mut r = req(&user, vec![mount("vol1", &vf, "data", false)], &key);
    r.ttl_seconds = 10;
    r.max_sessions_per_user = Some(5);
    let ttl = rpc
        .create_session(r)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let mut r = req(&user, vec![mount("vol1", &vf, "data", false)], &key);
    r.idle_timeout_seconds = 3;
    r.max_sessions_per_user = Some(5);
    let idle = rpc
        .create_session(r)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let reaped = pb::SessionState::Terminated;
    let reason = d.wait_session(&idle.id, reaped, "not reaped").await.reason;
    assert!(reason.starts_with("idle for"), "{reason}");
    let reason = d.wait_session(&ttl.id, reaped, "not reaped").await.reason;
    assert_eq!(reason, "ttl expired");
    assert!(d.containers().is_empty());
}

/// Ended sessions answer GetSession until `ended-retention`, then are forgotten (their rows
/// are the state database's only record kind nothing else deletes); running ones stay.
#[tokio::test]
async fn ended_sessions_are_forgotten_after_their_retention() {
    let d = Daemon::builder()
        .agent()
        .set("agent.ended-retention", "5s")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let (_, key) = keypair(d.dir.path(), "k");
    let mut rpc = d.rpc().await;
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let start = |mut rpc: Rpc| {
        let mut r = req(&user, vec![mount("vol1", &vf, "data", false)], &key);
        r.max_sessions_per_user = Some(5);
        async move {
            let s = rpc.create_session(r).await.expect("CreateSession");
            s.into_inner().session.expect("a session")
        }
    };
    let ended = start(rpc.clone()).await;
    let kept = start(rpc.clone()).await;
    let running = pb::SessionState::Running;
    d.wait_session(&ended.id, running, "not started").await;
    d.wait_session(&kept.id, running, "not started").await;
    let seen = rpc
        .destroy_session(pb::DestroySessionRequest {
            id: ended.id.clone(),
        })
        .await
        .expect("DestroySession")
        .into_inner();
    let destroyed = Instant::now();
    assert_eq!(seen.state, pb::SessionState::Terminated as i32, "{seen:?}");
    let deadline = destroyed + crate::common::OUTCOME;
    loop {
        let got = rpc
            .get_session(pb::GetSessionRequest {
                id: ended.id.clone(),
            })
            .await;
        match got {
            Err(s) if s.code() == tonic::Code::NotFound => {
                // Its end is kept in whole seconds: forgotten no sooner than 4 s after it.
                let after = destroyed.elapsed();
                assert!(after.as_secs() >= 4, "forgotten {after:?} after its end");
                break;
            }
            Err(s) => panic!("GetSession of an ended session: {s:?}"),
            Ok(s) => assert!(
                Instant::now() < deadline,
                "still remembered long after its retention: {:?}",
                s.into_inner()
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let listed = rpc
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .expect("ListSessions")
        .into_inner()
        .sessions;
    let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [kept.id.as_str()],
        "only the running session is listed"
    );
    assert_eq!(d.session(&kept.id).await.state, running as i32);
}

#[tokio::test]
async fn docker_unreachable_is_unavailable() {
    let d = Daemon::builder()
        .agent()
        .set("agent.docker-socket", "/nonexistent/docker.sock")
        .start()
        .await;
    let (_, key) = keypair(d.dir.path(), "k");
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let e = d
        .rpc()
        .await
        .create_session(req(&user, vec![mount("vol1", &vf, "data", false)], &key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("Docker is unavailable"),
        "{}",
        e.message()
    );
    // The storage proxy keeps working and /health says what is wrong.
    let h = d.get("internal", "/health").await.json();
    assert_eq!(h["status"], "degraded");
    let r = d.get("internal", "/readyz").await;
    assert_eq!(r.status, 200, "Docker does not gate readiness");
}
