//! SFTP sessions through the gRPC API, a real Docker engine and the real OpenSSH client.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use storage_agent::pb;

use crate::common::Daemon;
use crate::common::agent::{
    ContainerGuard, KERNEL_GID, KERNEL_UID, inspect, keypair, mount, sftp_key, sftp_password,
    sftp_req, text,
};

fn create_req(
    user: &uuid::Uuid,
    mounts: Vec<pb::Mount>,
    keys: Vec<String>,
    password: bool,
) -> pb::CreateSessionRequest {
    let mut r = sftp_req(user, mounts, keys);
    if let Some(c) = r.credentials.as_mut() {
        c.generate_password = password;
    }
    r
}

#[tokio::test]
async fn sftp_session_end_to_end() {
    let d = Daemon::builder().agent().start().await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (data_vf, data_path) = d.user_vfolder(&user).await;
    let (ref_vf, ref_path) = d.user_vfolder(&user).await;
    std::fs::write(ref_path.join("readme.txt"), b"read only").unwrap();
    std::fs::create_dir(data_path.join("sub")).unwrap();
    std::fs::write(data_path.join("sub/existing.txt"), b"existing").unwrap();
    let (key, public) = keypair(d.dir.path(), "alice");
    let mut rpc = d.rpc().await;

    let created = rpc
        .create_session(create_req(
            &user,
            vec![
                mount("vol1", &data_vf, "data", false),
                mount("vol1", &ref_vf, "ref", true),
            ],
            vec![public],
            true,
        ))
        .await
        .expect("create session")
        .into_inner();
    let s = created.session.unwrap();
    assert_eq!(s.state, pb::SessionState::Running as i32);
    assert_eq!(s.username, "work");
    assert!(created.password.len() >= 16);
    assert!(s.password_auth);
    let ep = &s.endpoints[0];
    assert_eq!(ep.protocol, "sftp");
    let port = ep.port as u16;
    assert_eq!(ep.url, format!("sftp://work@127.0.0.1:{port}"));
    assert_eq!(s.host_key_fingerprints.len(), 1);
    assert!(s.expires_at.unwrap().seconds > s.created_at.unwrap().seconds);

    // The fingerprint the daemon reports is the one sshd serves.
    let scan = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ssh-keyscan -p {port} -t ed25519 127.0.0.1 2>/dev/null | ssh-keygen -lf -"
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&scan.stdout).contains(&s.host_key_fingerprints[0]),
        "{}",
        text(&scan)
    );

    // put / get / ls with the key.
    let src = d.dir.path().join("upload.bin");
    crate::common::random_file(&src, 3 << 20, 9);
    let back = d.dir.path().join("back.bin");
    let out = sftp_key(
        &key,
        "work",
        port,
        &format!(
            "ls /\nput {} data/upload.bin\nget data/upload.bin {}\nls data/sub\nget ref/readme.txt {}\n",
            src.display(),
            back.display(),
            d.dir.path().join("readme.copy").display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("data") && listing.contains("ref"),
        "{listing}"
    );
    assert!(listing.contains("existing.txt"));
    assert_eq!(
        crate::common::sha256_file(&data_path.join("upload.bin")),
        crate::common::sha256_file(&src)
    );
    assert_eq!(
        crate::common::sha256_file(&back),
        crate::common::sha256_file(&src)
    );
    // Files written over SFTP belong to the kernel uid/gid.
    let md = std::fs::metadata(data_path.join("upload.bin")).unwrap();
    assert_eq!((md.uid(), md.gid()), (KERNEL_UID, KERNEL_GID));

    // AES ciphers only (cheaper per byte on the node than chacha20-poly1305): a client that
    // offers nothing else is refused, one that offers both gets AES-GCM.
    let cipher = |c: &str| {
        std::process::Command::new("timeout")
            .args(["60", "ssh", "-vv", "-c", c])
            .args(crate::common::agent::SSH_OPTS)
            .args(["-o", "BatchMode=yes", "-i"])
            .arg(&key)
            .args(["-p", &port.to_string(), "-s", "work@127.0.0.1", "sftp"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = cipher("chacha20-poly1305@openssh.com");
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("no matching cipher"),
        "{out:?}"
    );
    let out = cipher("chacha20-poly1305@openssh.com,aes128-gcm@openssh.com");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cipher: aes128-gcm@openssh.com"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The chroot shows only the mounts; nothing outside is reachable.
    let out = sftp_key(&key, "work", port, "ls -a /\n");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| !w.starts_with("sftp>") && !w.starts_with('/') && *w != "ls" && *w != "-a")
        .map(str::to_string)
        .collect();
    for n in &names {
        assert!(
            ["data", "ref", ".", ".."].contains(&n.as_str()),
            "unexpected entry {n} in {names:?}"
        );
    }
    for attempt in [
        "get /etc/passwd",
        "cd /..\nget etc/passwd",
        "get ../../../../etc/shadow",
        "put /etc/hostname /x",
    ] {
        let out = sftp_key(&key, "work", port, &format!("{attempt}\n"));
        assert!(!out.status.success(), "{attempt}: {}", text(&out));
    }
    // Read-only mount refuses writes.
    let out = sftp_key(
        &key,
        "work",
        port,
        &format!("put {} ref/new.bin\n", src.display()),
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!ref_path.join("new.bin").exists());
    let out = sftp_key(&key, "work", port, "rm ref/readme.txt\n");
    assert!(!out.status.success());
    assert!(ref_path.join("readme.txt").exists());

    // The generated password works; a wrong one does not.
    let out = sftp_password(&created.password, "work", port, "ls data\n");
    assert!(out.status.success(), "{}", text(&out));
    let out = sftp_password("wrong-password-123", "work", port, "ls data\n");
    assert!(!out.status.success());

    // No shell, no forwarding.
    let ssh = |extra: &[&str]| {
        Command::new("timeout")
            .arg("30")
            .arg("ssh")
            .args(crate::common::agent::SSH_OPTS)
            .args(["-o", "BatchMode=yes", "-i"])
            .arg(&key)
            .args(["-p", &port.to_string()])
            .args(extra)
            .arg("work@127.0.0.1")
            .args(["cat", "/etc/passwd"])
            .output()
            .unwrap()
    };
    let out = ssh(&[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sftp connections only")
            || !out.status.success(),
        "{}",
        text(&out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("root:"));
    let out = Command::new("timeout")
        .arg("30")
        .arg("ssh")
        .args(crate::common::agent::SSH_OPTS)
        .args(["-o", "BatchMode=yes", "-i"])
        .arg(&key)
        .args([
            "-p",
            &port.to_string(),
            "-W",
            "127.0.0.1:22",
            "work@127.0.0.1",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "stdio forwarding must be refused: {}",
        text(&out)
    );

    // The container: limits, hardening, labels.
    let c = inspect(&s.container_id);
    let hc = &c["HostConfig"];
    assert_eq!(hc["NanoCpus"], 1_000_000_000i64);
    assert_eq!(hc["Memory"], 1i64 << 30);
    assert_eq!(
        hc["MemorySwap"],
        1i64 << 30,
        "no swap beyond the memory limit"
    );
    assert_eq!(hc["PidsLimit"], 256);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    let mut caps: Vec<String> = serde_json::from_value(hc["CapAdd"].clone()).unwrap();
    caps.sort();
    assert_eq!(
        caps.iter()
            .map(|c| c.trim_start_matches("CAP_"))
            .collect::<Vec<_>>(),
        ["SETGID", "SETUID", "SYS_CHROOT"]
    );
    assert_eq!(hc["SecurityOpt"], serde_json::json!(["no-new-privileges"]));
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert_eq!(hc["Privileged"], false);
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["ai.backend.storage-agent.node"], d.node_id());
    assert_eq!(labels["ai.backend.storage-agent.session"], s.id);
    assert_eq!(labels["ai.backend.storage-agent.kind"], "sftp");
    assert_eq!(labels["ai.backend.storage-agent.user"], user.to_string());
    assert_eq!(hc["PortBindings"]["22/tcp"][0]["HostIp"], "127.0.0.1");

    // Get / List.
    let got = rpc
        .get_session(pb::GetSessionRequest { id: s.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, s.id);
    assert_eq!(got.mounts.len(), 2);
    assert!(got.mounts.iter().any(|m| m.name == "ref" && m.read_only));
    let list = rpc
        .list_sessions(pb::ListSessionsRequest {
            user_id: user.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sessions.len(), 1);
    let none = rpc
        .list_sessions(pb::ListSessionsRequest {
            user_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.sessions.is_empty());

    // Destroy removes the container.
    let gone = rpc
        .destroy_session(pb::DestroySessionRequest { id: s.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.state, pb::SessionState::Terminated as i32);
    assert!(gone.endpoints.is_empty());
    assert!(d.containers().is_empty(), "container removed");
    let again = rpc
        .destroy_session(pb::DestroySessionRequest { id: s.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.state,
        pb::SessionState::Terminated as i32,
        "destroy is idempotent"
    );
    let e = rpc
        .get_session(pb::GetSessionRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

/// Sessions share a network where containers cannot reach each other (review F15): a user who
/// took over one session's sshd cannot probe another user's session, while the host (and so the
/// published ports) still reaches both.
#[tokio::test]
async fn sessions_cannot_reach_each_other() {
    let d = Daemon::builder().agent().start().await;
    let _g = ContainerGuard(d.node_id());
    let mut rpc = d.rpc().await;
    let mut ips = Vec::new();
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let user = uuid::Uuid::new_v4();
        let (vf, _) = d.user_vfolder(&user).await;
        let (_, public) = keypair(d.dir.path(), name);
        let s = rpc
            .create_session(create_req(
                &user,
                vec![mount("vol1", &vf, "data", false)],
                vec![public],
                false,
            ))
            .await
            .expect("create session")
            .into_inner()
            .session
            .unwrap();
        let c = inspect(&s.container_id);
        let nets = c["NetworkSettings"]["Networks"].as_object().unwrap();
        assert_eq!(
            nets.keys().collect::<Vec<_>>(),
            ["storage-agent"],
            "only on the sessions' network"
        );
        ips.push(
            nets["storage-agent"]["IPAddress"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        ids.push(s.container_id);
    }
    let out = Command::new("docker")
        .args(["network", "inspect", "storage-agent"])
        .output()
        .unwrap();
    let net: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        net[0]["Options"]["com.docker.network.bridge.enable_icc"], "false",
        "inter-container traffic off"
    );
    // The host reaches b's sshd directly...
    let from_host = std::net::TcpStream::connect_timeout(
        &format!("{}:22", ips[1]).parse().unwrap(),
        std::time::Duration::from_secs(3),
    );
    assert!(
        from_host.is_ok(),
        "the host reaches a session: {from_host:?}"
    );
    // ...and a's container cannot.
    let probe = format!("echo > /dev/tcp/{}/22", ips[1]);
    let out = Command::new("docker")
        .args(["exec", &ids[0], "timeout", "3", "bash", "-c", &probe])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a session reached another: {}",
        text(&out)
    );
    let to_self = format!("echo > /dev/tcp/{}/22", ips[0]);
    let out = Command::new("docker")
        .args(["exec", &ids[0], "timeout", "3", "bash", "-c", &to_self])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the probe itself works (own address): {}",
        text(&out)
    );
}
