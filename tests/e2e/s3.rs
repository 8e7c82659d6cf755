//! What only object-store volumes do, against a real S3 service (moto) and checked with boto3:
//! registered buckets, multipart uploads that survive a kill -9, usage counters and rescans,
//! presigned URLs, `/folder/mount` for agents, shared FUSE mounts for sessions, and clear,
//! bounded failures for dead endpoints and wrong keys. The file operations every backend shares
//! are in `backends/`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use storage_agent::pb;

use crate::backends::killed::{killed_at_completion_is_in_place, killed_upload_resumes};
use crate::backends::{bucket_of, s3_object};
use crate::common::agent::{ContainerGuard, keypair, mount, sftp_key, sftp_req, text};
use crate::common::holdback::{Hold, Holdback};
use crate::common::moto::Moto;
use crate::common::redis::free_port;
use crate::common::{Daemon, random_file, random_vfid, send, sha256_file};

const MIB: u64 = 1 << 20;

async fn op(d: &Daemon, path: &str, vfid: &str, mut body: Value) -> crate::common::Resp {
    body["volume"] = json!("vol1");
    body["vfid"] = json!(vfid);
    d.mgr("POST", path, body).await
}

pub async fn create(d: &Daemon, vfid: &str) {
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
}

async fn put_small(d: &Daemon, vfid: &str, relpath: &str, data: &[u8]) {
    let r = d.tus_put(vfid, relpath, data, data.len()).await;
    assert_eq!(r.status, 204, "{}", r.text());
}

pub async fn usage(d: &Daemon, vfid: &str, rescan: bool) -> (u64, u64) {
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid, "rescan": rescan}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["file_count"].as_u64().unwrap(),
        v["used_bytes"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_registered_bucket_stays_its_owners() {
    let moto = Moto::start();
    moto.boto(
        "s3.create_bucket(Bucket='owned-data')\n\
         for i in range(3): s3.put_object(Bucket='owned-data', Key=f'dir/f{i}.txt', Body=f'data {i}'.encode())\n\
         s3.put_object(Bucket='owned-data', Key='top.bin', Body=b'x' * 1000)",
    );
    let d = Daemon::builder().s3(&moto.endpoint(), "reg-").start().await;
    let count = || {
        moto.boto("print(s3.list_objects_v2(Bucket='owned-data').get('KeyCount', 0))")
            .trim()
            .parse::<u32>()
            .unwrap()
    };

    // Read-only: everything readable, nothing writable (403), counted in the background.
    let ro = random_vfid();
    let r = op(
        &d,
        "/folder/register",
        &ro,
        json!({"bucket": "owned-data", "read_only": true}),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = op(&d, "/folder/file/list", &ro, json!({"relpath": "dir"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 3);
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": ro, "relpath": "dir/f1.txt"}),
        )
        .await;
    let r = send(d.http.get(d.url("client", &format!("/download?token={t}")))).await;
    assert_eq!(&r.body[..], b"data 1");
    let deadline = Instant::now() + crate::common::OUTCOME;
    while usage(&d, &ro, false).await != (4, 1000 + 3 * 6) {
        assert!(
            Instant::now() < deadline,
            "the registered bucket is counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // mkdir answers per path (Backend.AI's batch format).
    let r = op(&d, "/folder/file/mkdir", &ro, json!({"relpath": "new"})).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("read-only"), "{}", r.text());
    for (path, body) in [
        ("/folder/file/delete", json!({"relpaths": ["top.bin"]})),
        (
            "/folder/file/rename",
            json!({"relpath": "top.bin", "new_name": "x"}),
        ),
        (
            "/folder/file/upload",
            json!({"relpath": "up.txt", "size": 3}),
        ),
    ] {
        let p = op(&d, path, &ro, body).await.problem(403);
        assert!(
            p["msg"].as_str().unwrap().contains("read-only"),
            "{path}: {p}"
        );
    }
    let r = op(&d, "/folder/deregister", &ro, json!({})).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        op(&d, "/folder/file/list", &ro, json!({"relpath": "."}))
            .await
            .status,
        404
    );
    assert_eq!(count(), 4, "deregistering leaves every object");

    // Read-write on a prefix: our writes land in the owner's bucket; deleting the vfolder only
    // forgets it.
    let rw = random_vfid();
    let r = op(
        &d,
        "/folder/register",
        &rw,
        json!({"bucket": "owned-data", "prefix": "dir"}),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = op(&d, "/folder/file/list", &rw, json!({"relpath": "."})).await;
    assert_eq!(
        r.json()["items"].as_array().unwrap().len(),
        3,
        "{}",
        r.text()
    );
    put_small(&d, &rw, "new.txt", b"ours").await;
    assert_eq!(
        s3_object(&moto, "owned-data", "dir/new.txt").as_deref(),
        Some(&b"ours"[..])
    );
    let t = d.start_delete(&rw).await;
    assert_eq!(d.wait_task(&t).await["status"], "done");
    assert_eq!(
        count(),
        5,
        "deleting a registered vfolder deletes nothing of the bucket"
    );

    // What cannot be registered, and what cannot be deregistered.
    let p = op(
        &d,
        "/folder/register",
        &random_vfid(),
        json!({"bucket": "no-such-bucket"}),
    )
    .await
    .problem(400);
    assert!(p["msg"].as_str().unwrap().contains("does not exist"), "{p}");
    let mine = random_vfid();
    create(&d, &mine).await;
    op(&d, "/folder/deregister", &mine, json!({}))
        .await
        .problem(400);
}

#[tokio::test]
async fn a_200mib_upload_killed_mid_way_continues_its_multipart_upload() {
    let moto = Moto::start();
    let mut d = Daemon::builder().s3(&moto.endpoint(), "big-").start().await;
    let vfid = random_vfid();
    create(&d, &vfid).await;
    let bucket = bucket_of("big-", &vfid);
    let uploads = || {
        moto.boto(&format!(
            "print(json.dumps([u['UploadId'] for u in s3.list_multipart_uploads(Bucket='{bucket}').get('Uploads', [])]))"
        ))
    };
    let sha256 = || {
        moto.boto(&format!(
            "h = hashlib.sha256()\n\
             for c in s3.get_object(Bucket='{bucket}', Key='data/big.bin')['Body'].iter_chunks(1 << 20): h.update(c)\n\
             print(h.hexdigest())"
        ))
    };
    killed_upload_resumes(&mut d, &vfid, &uploads, &sha256).await;
    assert_eq!(
        usage(&d, &vfid, false).await,
        (1, 200 * MIB),
        "counted by our own write"
    );
}

/// Killed at the completion: before CompleteMultipartUpload reached moto, and after moto did
/// it but before the answer arrived. Both times the HEAD after the restart says complete only
/// with the object in place (found by the soak: an empty staging file left, the upload
/// active, its HEAD at the full offset; failed before the fix).
#[tokio::test]
async fn an_upload_killed_at_its_completion_is_in_place_when_its_head_says_complete() {
    let moto = Moto::start();
    let upstream = moto.endpoint().trim_start_matches("http://").to_string();
    for hold in [Hold::Request, Hold::Answer] {
        let proxy = Holdback::start(&upstream, hold, "POST", "uploadId=");
        let mut d = Daemon::builder()
            .s3(&proxy.endpoint(""), "fin-")
            .start()
            .await;
        let vfid = random_vfid();
        create(&d, &vfid).await;
        let bucket = bucket_of("fin-", &vfid);
        let uploads = || {
            moto.boto(&format!(
                "print(json.dumps([u['UploadId'] for u in s3.list_multipart_uploads(Bucket='{bucket}').get('Uploads', [])]))"
            ))
        };
        let sha256 = || {
            moto.boto(&format!(
                "print(hashlib.sha256(s3.get_object(Bucket='{bucket}', Key='data/done.bin')['Body'].read()).hexdigest())"
            ))
        };
        killed_at_completion_is_in_place(&mut d, &vfid, &proxy, &uploads, &sha256).await;
    }
}

/// What a crash (or a full state disk) in the last steps of an upload can leave: an upload put
/// in place whose done mark was lost (its record still active, its staging rows forgotten), and
/// a buffer whose rows were forgotten but which was not removed. The first's HEAD says complete
/// and its object stays whole, both when the HEAD finds it so (it was overwritten by an empty
/// object before the fix) and when the restart does (its record was dropped, the HEAD said 0).
/// The second is removed at start, while the buffer of an upload still going stays and that
/// upload completes (found by the soak: a buffer left on a node's state disk after its
/// disk-full and kill -9 faults).
#[tokio::test]
async fn a_lost_done_mark_keeps_the_object_and_orphan_buffers_go_at_start() {
    let moto = Moto::start();
    let mut d = Daemon::builder()
        .s3(&moto.endpoint(), "orph-")
        .start()
        .await;
    let vfid = random_vfid();
    create(&d, &vfid).await;
    let bucket = bucket_of("orph-", &vfid);
    let sha256 = |key: &str| {
        moto.boto(&format!(
            "print(hashlib.sha256(s3.get_object(Bucket='{bucket}', Key='{key}')['Body'].read()).hexdigest())"
        ))
        .trim()
        .to_string()
    };
    let patch = |d: &Daemon, t: &str, at: u64, data: Vec<u8>| {
        d.http
            .patch(d.url("client", &format!("/upload?token={t}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", at.to_string())
            .body(data)
    };
    // One upload done (in parts), one half way.
    let src = d.dir.path().join("done.bin");
    random_file(&src, 7 * MIB, 3);
    let done_sha = sha256_file(&src);
    let t_done = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "data/done.bin", "size": 7 * MIB}),
        )
        .await;
    let r = send(patch(&d, &t_done, 0, std::fs::read(&src).unwrap())).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(sha256("data/done.bin"), done_sha);
    let half = d.dir.path().join("half.bin");
    random_file(&half, 2 * MIB, 4);
    let half_bytes = std::fs::read(&half).unwrap();
    let t_half = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "data/half.bin", "size": 2 * MIB}),
        )
        .await;
    let r = send(patch(&d, &t_half, 0, half_bytes[..MIB as usize].to_vec())).await;
    assert_eq!(r.status, 204, "{}", r.text());

    // The done upload as its done mark lost leaves it (SQLite takes a second writer).
    let set = |d: &Daemon, offset: u64| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=60); \
                 print(c.execute(sys.argv[2], (int(sys.argv[3]),)).rowcount); c.commit()",
            ])
            .arg(d.state_dir.join("state.db"))
            .arg(r#"UPDATE uploads SET state = 'active', "offset" = ? WHERE size = 7340032"#)
            .arg(offset.to_string())
            .output()
            .expect("python3 runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");
    };
    let head_done = |d: &Daemon| {
        d.http
            .head(d.url("client", &format!("/upload?token={t_done}")))
            .header("Tus-Resumable", "1.0.0")
    };
    set(&d, 7 * MIB);
    let head = send(head_done(&d)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("upload-offset"), Some((7 * MIB).to_string()));
    assert_eq!(sha256("data/done.bin"), done_sha, "the object stays whole");
    // Lost again, at the last checkpoint before the final PATCH, and the daemon restarted.
    set(&d, 5 * MIB);

    // A buffer no row owns, as a crash inside the forgetting leaves it.
    d.kill9();
    let staging = d.state_dir.join("objects/vol1");
    let live: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(live.len(), 1, "the half-way upload's buffer: {live:?}");
    let orphan = staging.join(format!("{}.{}", "ab".repeat(16), 5 * MIB));
    std::fs::write(&orphan, vec![7u8; 4096]).unwrap();
    d.restart().await;
    let head = send(head_done(&d)).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("upload-offset"), Some((7 * MIB).to_string()));
    assert_eq!(sha256("data/done.bin"), done_sha, "the object stays whole");
    assert!(!orphan.exists(), "the orphan buffer is removed at start");
    assert!(
        live[0].exists(),
        "the buffer of an upload still going stays"
    );
    let r = send(patch(&d, &t_half, MIB, half_bytes[MIB as usize..].to_vec())).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(sha256("data/half.bin"), sha256_file(&half));
    let left: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "nothing left staged: {left:?}");
}

/// A client that stops reading for longer than the request timeout, mid-download: the read
/// ahead of it still completes (on its own), and the download ends whole when the client
/// reads on (found by the soak: 256 MiB downloads cut at 8 MiB read boundaries under load;
/// failed before the fix).
#[tokio::test]
async fn a_download_paused_longer_than_the_request_timeout_ends_whole() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .s3(&moto.endpoint(), "slow-")
        // Short enough that the pauses below outlast it; long enough for a loaded machine's
        // moto to serve an 8 MiB read within it.
        .set("volume.vol1.request-timeout", "4s")
        .start()
        .await;
    let vfid = random_vfid();
    create(&d, &vfid).await;
    let bucket = bucket_of("slow-", &vfid);
    let want = moto.boto(&format!(
        "import random\n\
         data = random.Random(5).randbytes(40 * 1024 * 1024)\n\
         s3.put_object(Bucket='{bucket}', Key='big.bin', Body=data)\n\
         print(hashlib.sha256(data).hexdigest())"
    ));
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "big.bin"}),
        )
        .await;
    let r = d
        .http
        .get(d.url("client", &format!("/download?token={t}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    use futures::StreamExt;
    use sha2::Digest;
    let mut body = r.bytes_stream();
    let mut h = sha2::Sha256::new();
    // A pause 1 MiB into the 2nd, 3rd and 4th 8 MiB read: the read after it is under way.
    let mut pauses = vec![25 * MIB, 17 * MIB, 9 * MIB];
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("cut at {got}: {e}"));
        got += chunk.len() as u64;
        h.update(&chunk);
        if pauses.last().is_some_and(|&p| got >= p) {
            pauses.pop();
            // Well past the request timeout without reading.
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
    assert_eq!(got, 40 * MIB);
    assert_eq!(format!("{:x}", h.finalize()), want.trim());
}

#[tokio::test]
async fn usage_counters_rescans_presigned_urls_and_mount_info() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .s3(&moto.endpoint(), "use-")
        .set("volume.vol1.presign", true)
        .start()
        .await;
    let vfid = random_vfid();
    create(&d, &vfid).await;
    let bucket = bucket_of("use-", &vfid);
    put_small(&d, &vfid, "a.bin", &[1u8; 1000]).await;
    assert_eq!(
        usage(&d, &vfid, false).await,
        (1, 1000),
        "our writes count at once"
    );
    moto.boto(&format!(
        "s3.put_object(Bucket='{bucket}', Key='behind/b.bin', Body=b'2' * 2000)"
    ));
    assert_eq!(
        usage(&d, &vfid, false).await,
        (1, 1000),
        "counters, not a listing"
    );
    assert_eq!(
        usage(&d, &vfid, true).await,
        (2, 3000),
        "a rescan finds what changed"
    );
    assert_eq!(usage(&d, &vfid, false).await, (2, 3000));

    // Presigned URLs straight to the service.
    let r = d
        .mgr(
            "POST",
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "a.bin", "presign": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["presigned_url"].as_str().unwrap().to_string();
    let got = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], &[1u8; 1000]);
    let r = d
        .mgr(
            "POST",
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "direct.txt", "size": 6, "presign": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["presigned_url"].as_str().unwrap().to_string();
    let put = reqwest::Client::new()
        .put(&url)
        .body("direct")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    assert_eq!(
        s3_object(&moto, &bucket, "direct.txt").as_deref(),
        Some(&b"direct"[..])
    );

    // What a compute agent is told: no host path, where the bucket is; no keys unless allowed.
    let r = d
        .mgr(
            "GET",
            "/folder/mount",
            json!({"volume": "vol1", "vfid": vfid, "subpath": "behind"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    assert_eq!(m["path"], Value::Null);
    assert_eq!(m["remote"]["bucket"], bucket);
    assert_eq!(m["remote"]["prefix"], "behind/");
    assert_eq!(m["remote"]["endpoint"], moto.endpoint());
    assert_eq!(m["remote"]["credentials"], Value::Null);
    let r = d
        .mgr(
            "GET",
            "/folder/mount",
            json!({"volume": "vol1", "vfid": vfid, "subpath": "a.bin"}),
        )
        .await;
    assert_eq!(
        r.status,
        400,
        "a file is not a mountable directory: {}",
        r.text()
    );

    // A volume that does not allow them refuses presigning, clearly.
    let other = Daemon::builder()
        .s3(&moto.endpoint(), "other-")
        .start()
        .await;
    let vfid = random_vfid();
    create(&other, &vfid).await;
    put_small(&other, &vfid, "a.bin", b"a").await;
    let p = other
        .mgr(
            "POST",
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "a.bin", "presign": true}),
        )
        .await
        .problem(400);
    assert!(p["msg"].as_str().unwrap().contains("presign"), "{p}");
}

/// The FUSE mounts of object-store volumes under the daemon's state dir.
pub fn fuse_mounts(d: &Daemon) -> Vec<String> {
    let state = d.state_dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("fuse.rclone") && l.contains(&state))
        .map(str::to_string)
        .collect()
}

pub async fn sftp_session(
    d: &Daemon,
    user: &uuid::Uuid,
    vfid: &str,
    read_only: bool,
    public: &str,
) -> Result<pb::Session, tonic::Status> {
    let mut rpc = d.rpc().await;
    rpc.create_session(pb::CreateSessionRequest {
        max_sessions_per_user: Some(4),
        ..sftp_req(
            user,
            vec![mount("vol1", vfid, "data", read_only)],
            vec![public.to_string()],
        )
    })
    .await
    .map(|r| r.into_inner().session.unwrap())
}

#[tokio::test]
async fn sessions_on_one_bucket_share_one_fuse_mount_until_the_linger_ends() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .agent()
        .s3(&moto.endpoint(), "sess-")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    create(&d, &vfid).await;
    put_small(&d, &vfid, "hello.txt", b"from the api").await;
    let bucket = bucket_of("sess-", &vfid);
    let (key, public) = keypair(d.dir.path(), "s3");

    let a = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .expect("session a");
    let b = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .expect("session b");
    assert_eq!(
        fuse_mounts(&d).len(),
        1,
        "one mount for both: {:?}",
        fuse_mounts(&d)
    );

    // Both see the bucket; what one writes lands in it.
    let local = d.dir.path().join("got.txt");
    let up = d.dir.path().join("up.txt");
    std::fs::write(&up, b"from sftp").unwrap();
    let out = sftp_key(
        &key,
        "work",
        a.endpoints[0].port as u16,
        &format!(
            "get data/hello.txt {}\nput {} data/up.txt\n",
            local.display(),
            up.display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&local).unwrap(), b"from the api");
    let deadline = Instant::now() + crate::common::OUTCOME;
    while s3_object(&moto, &bucket, "up.txt").as_deref() != Some(&b"from sftp"[..]) {
        assert!(
            Instant::now() < deadline,
            "the sftp upload reaches the bucket"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = sftp_key(&key, "work", b.endpoints[0].port as u16, "ls data\n");
    assert!(text(&out).contains("hello.txt"), "{}", text(&out));

    // A restart adopts the sessions and keeps counting them: the mount is not released.
    let mut d = d;
    d.restart().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        fuse_mounts(&d).len(),
        1,
        "still held by the adopted sessions"
    );
    let out = sftp_key(&key, "work", b.endpoints[0].port as u16, "ls data\n");
    assert!(text(&out).contains("up.txt"), "{}", text(&out));

    // A mount whose rclone died is found stale and made again for the next session.
    let killed = std::process::Command::new("pkill")
        .args(["-9", "-f", &format!("rclone mount :s3:{bucket} ")])
        .status()
        .unwrap();
    assert!(killed.success(), "rclone was running");
    // Dead, not dying: a session made while the process still exits can find its mount alive
    // and then not connected (seen once on a loaded CI machine).
    let gone = Instant::now() + Duration::from_secs(30);
    while std::process::Command::new("pgrep")
        .args(["-f", &format!("rclone mount :s3:{bucket} ")])
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(Instant::now() < gone, "rclone did not exit after SIGKILL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .expect("session c");
    let out = sftp_key(&key, "work", c.endpoints[0].port as u16, "ls data\n");
    assert!(
        text(&out).contains("hello.txt"),
        "remounted: {}",
        text(&out)
    );
    assert_eq!(fuse_mounts(&d).len(), 1, "{:?}", fuse_mounts(&d));

    // The mount outlives the first session, and goes after the last one plus the linger (2 s).
    let mut rpc = d.rpc().await;
    rpc.destroy_session(pb::DestroySessionRequest { id: a.id.clone() })
        .await
        .unwrap();
    assert_eq!(fuse_mounts(&d).len(), 1, "still used by b");
    rpc.destroy_session(pb::DestroySessionRequest { id: b.id.clone() })
        .await
        .unwrap();
    assert_eq!(fuse_mounts(&d).len(), 1, "still used by c");
    rpc.destroy_session(pb::DestroySessionRequest { id: c.id.clone() })
        .await
        .unwrap();
    assert_eq!(fuse_mounts(&d).len(), 1, "kept for the linger");
    let deadline = Instant::now() + crate::common::OUTCOME;
    while !fuse_mounts(&d).is_empty() {
        assert!(
            Instant::now() < deadline,
            "unmounted after the linger: {:?}",
            fuse_mounts(&d)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_read_only_bucket_is_mounted_read_only_at_the_fuse_layer() {
    let moto = Moto::start();
    moto.boto("s3.create_bucket(Bucket='ro-data')\ns3.put_object(Bucket='ro-data', Key='keep.txt', Body=b'keep')");
    let d = Daemon::builder()
        .agent()
        .s3(&moto.endpoint(), "ro-")
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    let r = op(
        &d,
        "/folder/register",
        &vfid,
        json!({"bucket": "ro-data", "read_only": true}),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let (key, public) = keypair(d.dir.path(), "ro");

    let e = sftp_session(&d, &user, &vfid, false, &public)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("read-only"), "{}", e.message());

    let s = sftp_session(&d, &user, &vfid, true, &public)
        .await
        .expect("read-only session");
    let mounts = fuse_mounts(&d);
    assert_eq!(mounts.len(), 1);
    let mount_options = mounts[0].split(' ').nth(5).unwrap_or("");
    assert!(
        mount_options.split(',').any(|o| o == "ro"),
        "FUSE mount is ro: {}",
        mounts[0]
    );
    // Not even root on the host writes through it.
    let point = mounts[0].split(' ').nth(4).unwrap();
    let e = std::fs::write(std::path::Path::new(point).join("x.txt"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    let up = d.dir.path().join("up.txt");
    std::fs::write(&up, b"nope").unwrap();
    let port = s.endpoints[0].port as u16;
    let out = sftp_key(
        &key,
        "work",
        port,
        &format!("put {} data/up.txt\n", up.display()),
    );
    assert!(
        !out.status.success(),
        "a write into a read-only bucket: {}",
        text(&out)
    );
    let out = sftp_key(&key, "work", port, "get data/keep.txt /dev/null\n");
    assert!(out.status.success(), "{}", text(&out));
    let keys = moto
        .boto("print(sorted(o['Key'] for o in s3.list_objects_v2(Bucket='ro-data')['Contents']))");
    assert_eq!(keys.trim(), "['keep.txt']");
}

/// A daemon on a service that cannot be used starts, says why, and answers every call on the
/// volume at once with that reason instead of hanging.
pub async fn refused_clearly(d: &Daemon, says: &str) {
    let r = d
        .mgr("GET", "/volume/hwinfo", json!({"volume": "vol1"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let hw = r.json();
    assert_eq!(hw["status"], "offline", "{hw}");
    let info = hw["status_info"].as_str().unwrap_or("").to_lowercase();
    assert!(
        info.contains(says),
        "the reason names the problem ({says}): {hw}"
    );
    let started = Instant::now();
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": random_vfid()}),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() < crate::common::PROMPT,
        "answered at once"
    );
}

#[tokio::test]
async fn dead_endpoints_and_wrong_keys_fail_clearly_and_never_hang() {
    // Nothing listens there.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let d = Daemon::builder().s3(&dead, "x-").start().await;
    refused_clearly(&d, "connect").await;

    // A service that takes the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let d = Daemon::builder()
        .s3(&silent_url, "x-")
        .set("storage-agent.volume-check-timeout", "3s")
        .start()
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the start is not held up for long"
    );
    refused_clearly(&d, "did not answer").await;

    // A service that refuses our keys.
    let moto = Moto::start_with_auth();
    let d = Daemon::builder().s3(&moto.endpoint(), "x-").start().await;
    refused_clearly(&d, "signature").await;
    drop(silent);
}

/// A service behind TLS: its certificate is verified (a self-signed one takes the volume
/// offline, saying why), and with `tls-verify = false` everything works over HTTPS.
#[tokio::test]
async fn tls_endpoints_are_verified_unless_told_otherwise() {
    let moto = Moto::start_tls();
    let d = Daemon::builder().s3(&moto.endpoint(), "tls-").start().await;
    refused_clearly(&d, "certificate").await;
    drop(d);

    let d = Daemon::builder()
        .s3(&moto.endpoint(), "tls-")
        .set("volume.vol1.tls-verify", false)
        .start()
        .await;
    let vfid = random_vfid();
    create(&d, &vfid).await;
    put_small(&d, &vfid, "over/tls.txt", b"sent over https").await;
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "over/tls.txt"}),
        )
        .await;
    let r = send(d.http.get(d.url("client", &format!("/download?token={t}")))).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"sent over https");
    let buckets = moto.buckets();
    assert_eq!(buckets.len(), 1, "{buckets:?}");
    let got = moto.boto(&format!(
        "print(s3.get_object(Bucket={:?}, Key='over/tls.txt')['Body'].read().decode())",
        buckets[0]
    ));
    assert_eq!(got.trim(), "sent over https");
}
