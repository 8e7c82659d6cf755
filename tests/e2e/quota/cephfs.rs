//! `cephfs` volumes on a real single-node CephFS (ceph-fuse; this kernel has no ceph module):
//! the shared quota suite, quota xattrs the Python proxy reads the same way, and usage from the
//! MDS's recursive statistics instead of a walk.

use serde_json::json;

use super::daemon_on;
use super::suite::{MIB, quota_scopes, scope_dir};
use crate::common::OUTCOME;
use crate::common::agent::{ContainerGuard, keypair, mount, sftp_key, sftp_req, text};
use crate::common::ceph::{CephCluster, settled_rbytes, vxattr, walked};

#[tokio::test]
async fn cephfs_quota_scopes_are_directories_with_quota_xattrs() {
    let ceph = CephCluster::up();
    let mut d = daemon_on("cephfs", &ceph.dir("vol1")).await;
    let caps = d
        .mgr_raw("GET", "/volumes", None, Some(crate::common::MANAGER_SECRET))
        .await
        .json()["volumes"][0]["capabilities"]
        .clone();
    assert_eq!(caps, json!(["vfolder", "quota", "fast-size"]));
    quota_scopes(&mut d, &settled_rbytes).await;

    // What CephFS itself holds: the limit as ceph.quota.max_bytes on the scope directory, where
    // the Python proxy (and `getfattr`) read it; unset is 0, which CephFS reports as no xattr.
    let qs = format!("user:{}", uuid::Uuid::new_v4());
    let r = d
        .mgr(
            "POST",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": qs, "options": {"limit_bytes": 7 * MIB}}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let dir = scope_dir(&d, &qs);
    assert_eq!(vxattr(&dir, "ceph.quota.max_bytes"), Some(7 * MIB));
    let r = d
        .mgr(
            "DELETE",
            "/quota-scope/quota",
            json!({"volume": "vol1", "qsid": qs}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(vxattr(&dir, "ceph.quota.max_bytes"), None);
}

/// `/folder/usage` and `used-bytes` of a 10 000-file vfolder are the MDS's counters, which agree
/// with a walk once the writes have propagated; deleting it survives a kill -9.
#[tokio::test]
async fn cephfs_usage_comes_from_recursive_stats_and_a_killed_delete_resumes() {
    let ceph = CephCluster::up();
    let d = daemon_on("cephfs", &ceph.dir("vol1")).await;
    let (vfid, path) = d.create_vfolder().await;
    for i in 0..100 {
        let sub = path.join(format!("d{i}"));
        std::fs::create_dir(&sub).unwrap();
        for j in 0..100 {
            std::fs::write(sub.join(format!("f{j}")), vec![b'x'; (i * 100 + j) % 4096]).unwrap();
        }
    }
    let (bytes, entries) = walked(&path);
    assert_eq!(entries, 10_100);
    let start = std::time::Instant::now();
    loop {
        let u = d
            .mgr(
                "GET",
                "/folder/usage",
                json!({"volume": "vol1", "vfid": vfid}),
            )
            .await
            .json();
        let used = d
            .mgr(
                "GET",
                "/folder/used-bytes",
                json!({"volume": "vol1", "vfid": vfid}),
            )
            .await
            .json();
        let qs = vfid.split_once('/').unwrap().0;
        let scope = d
            .mgr("GET", "/quota-scope", json!({"volume": "vol1", "qsid": qs}))
            .await
            .json();
        // rentries counts the vfolder directory itself, as the Python proxy reports it.
        if u["used_bytes"] == bytes
            && u["file_count"] == entries + 1
            && used["used_bytes"] == bytes
            && scope["used_bytes"] == bytes
        {
            break;
        }
        assert!(
            start.elapsed() < OUTCOME,
            "usage {u}, used-bytes {used}, scope {scope}; the files hold {bytes} bytes in \
             {entries} entries"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // A kill -9 in the middle of deleting it: the delete resumes after the restart and ends.
    let mut d = d;
    let task = d.start_delete(&vfid).await;
    let start = std::time::Instant::now();
    while walked(&path).1 == entries {
        assert!(start.elapsed() < OUTCOME, "the delete did not start");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    d.restart().await;
    assert_eq!(d.wait_task(&task).await["status"], "done");
    let log = std::fs::read_to_string(d.log_path()).unwrap();
    assert!(
        log.contains("resuming background task interrupted by a restart"),
        "the kill came mid-delete: {log}"
    );
    assert!(!path.exists(), "{} is gone", path.display());
}

/// An SFTP session on a full CephFS scope gets "disk quota exceeded" in the client, and the node
/// goes on serving. CephFS checks a write against the quota realm's recursive statistics, which
/// count writes in nested directories (a vfolder is three levels below its scope) only once they
/// propagate: a first fast write may go past the limit whole, the writes after it are refused.
#[tokio::test]
async fn cephfs_sftp_past_the_quota_fails_in_the_client_and_the_node_keeps_working() {
    let ceph = CephCluster::up();
    let (d, user) = super::small_scope_on(
        crate::common::Daemon::builder().agent(),
        "cephfs",
        &ceph.dir("vol1"),
    )
    .await;
    let _g = ContainerGuard(d.node_id());
    let (vf, vf_path) = d.user_vfolder(&user).await;
    let (key, public) = keypair(d.dir.path(), "cephquota");
    let s = d
        .rpc()
        .await
        .create_session(sftp_req(
            &user,
            vec![mount("vol1", &vf, "data", false)],
            vec![public],
        ))
        .await
        .expect("create session")
        .into_inner()
        .session
        .unwrap();
    let port = s.endpoints[0].port as u16;
    let scope = &scope_dir(&d, &format!("user:{user}"));
    let put = |local: &std::path::Path, name: &str| {
        sftp_key(
            &key,
            "work",
            port,
            &format!("put {} data/{name}\n", local.display()),
        )
    };

    // 16 MiB into the 5 MiB scope: stopped or not (see above), it is counted once settled.
    let big = d.dir.path().join("big.bin");
    crate::common::random_file(&big, 16 * MIB, 7);
    let _ = put(&big, "big.bin");
    assert!(settled_rbytes(scope) > 5 * MIB);

    // Past the limit, the next write fails in the client.
    let small = d.dir.path().join("small.bin");
    std::fs::write(&small, b"still fits").unwrap();
    let out = put(&small, "small.bin");
    assert!(
        !out.status.success(),
        "a write into a full 5 MiB scope: {}",
        text(&out)
    );
    // The node goes on serving, and says the scope is over its limit.
    let r = d
        .mgr(
            "GET",
            "/quota-scope",
            json!({"volume": "vol1", "qsid": format!("user:{user}")}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["used_bytes"].as_u64().unwrap() > 5 * MIB);

    // Room again (the big file removed, and the statistics caught up): the write goes through.
    let out = sftp_key(&key, "work", port, "rm data/big.bin\n");
    assert!(out.status.success(), "{}", text(&out));
    settled_rbytes(scope);
    let out = put(&small, "small.bin");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(vf_path.join("small.bin")).unwrap(),
        b"still fits"
    );
}

/// `config check` refuses a CephFS path whose client may not set quotas (no 'p' in its MDS
/// caps), and says which cap is missing.
#[tokio::test]
async fn cephfs_without_the_quota_cap_is_refused_and_says_why() {
    let ceph = CephCluster::up();
    ceph.dir("vol1");
    let mnt = ceph.mount_as(
        "noquota",
        &[("mon", "allow r"), ("mds", "allow rw"), ("osd", "allow rw")],
    );
    let (code, out) = super::config_check("cephfs", &mnt.join("vol1"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("'p' flag"), "{out}");
    // The same directory through the admin client (which has 'p') is fine.
    let (code, out) = super::config_check("cephfs", &ceph.mnt.join("vol1"));
    assert_eq!(code, 0, "{out}");
}
