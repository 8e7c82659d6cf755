//! What only `azure-blob` volumes do, against Azurite and checked with Azure's own Python SDK:
//! uploads as staged blocks that survive a kill -9, SAS URLs that grant one vfolder and no
//! more, and clear, bounded failures for a wrong key or a dead endpoint. The file operations
//! every backend shares are in `backends/`; the FUSE mount machinery is S3's (`s3.rs`) and
//! the remote volumes' (`remote_volumes.rs`).

use serde_json::json;

use crate::backends::bucket_of;
use crate::backends::killed::{killed_at_completion_is_in_place, killed_upload_resumes};
use crate::common::azurite::Azurite;
use crate::common::holdback::{Hold, Holdback};
use crate::common::redis::free_port;
use crate::common::{Daemon, random_vfid};
use crate::s3::{create, refused_clearly};

#[tokio::test]
async fn a_200mib_upload_killed_mid_way_resumes_with_its_staged_blocks() {
    let az = Azurite::start();
    let mut d = Daemon::builder()
        .azure(&az.endpoint(), "big-")
        .start()
        .await;
    let vfid = random_vfid();
    create(&d, &vfid).await;
    let container = bucket_of("big-", &vfid);
    // Blocks staged and not yet committed: the upload in progress, as Azure keeps it.
    let staged = || {
        az.py(&format!(
            "b = svc.get_blob_client({container:?}, 'data/big.bin')\n\
             try:\n    _, uncommitted = b.get_block_list('uncommitted')\n\
             except Exception:\n    uncommitted = []\n\
             print(json.dumps(sorted(x.id for x in uncommitted)))"
        ))
    };
    let sha256 = || {
        az.py(&format!(
            "h = hashlib.sha256()\n\
             for c in svc.get_blob_client({container:?}, 'data/big.bin').download_blob().chunks(): h.update(c)\n\
             print(h.hexdigest())"
        ))
    };
    killed_upload_resumes(&mut d, &vfid, &staged, &sha256).await;
}

/// Killed at the completion (Put Block List), before Azurite got it and after it committed
/// the blocks with the answer lost: the HEAD after the restart says complete only with the
/// blob in place.
#[tokio::test]
async fn an_upload_killed_at_its_completion_is_in_place_when_its_head_says_complete() {
    let az = Azurite::start();
    for hold in [Hold::Request, Hold::Answer] {
        let proxy = Holdback::start(
            &format!("127.0.0.1:{}", az.port),
            hold,
            "PUT",
            "comp=blocklist",
        );
        let account = az.endpoint();
        let account = account.rsplit('/').next().unwrap_or_default();
        let mut d = Daemon::builder()
            .azure(&proxy.endpoint(&format!("/{account}")), "fin-")
            .start()
            .await;
        let vfid = random_vfid();
        create(&d, &vfid).await;
        let container = bucket_of("fin-", &vfid);
        let staged = || {
            az.py(&format!(
                "b = svc.get_blob_client({container:?}, 'data/done.bin')\n\
                 try:\n    _, uncommitted = b.get_block_list('uncommitted')\n\
                 except Exception:\n    uncommitted = []\n\
                 print(json.dumps(sorted(x.id for x in uncommitted)))"
            ))
        };
        let sha256 = || {
            az.py(&format!(
                "print(hashlib.sha256(svc.get_blob_client({container:?}, 'data/done.bin').download_blob().readall()).hexdigest())"
            ))
        };
        killed_at_completion_is_in_place(&mut d, &vfid, &proxy, &staged, &sha256).await;
    }
}

async fn sas(d: &Daemon, vfid: &str, permission: &str, expiry: Option<u64>) -> crate::common::Resp {
    let mut body = json!({"volume": "vol1", "vfid": vfid, "permission": permission});
    if let Some(e) = expiry {
        body["expiry_secs"] = json!(e);
    }
    d.mgr("POST", "/folder/sas", body).await
}

#[tokio::test]
async fn sas_urls_grant_one_vfolder_and_no_more() {
    let az = Azurite::start();
    let d = Daemon::builder()
        .azure(&az.endpoint(), "sas-")
        .set("volume.vol1.presign-max-expiry", "2h")
        .start()
        .await;
    let vfid = random_vfid();
    create(&d, &vfid).await;
    let container = bucket_of("sas-", &vfid);
    az.py(&format!(
        "svc.get_container_client({container:?}).upload_blob('doc.txt', b'shared text')"
    ));
    let other = random_vfid();
    create(&d, &other).await;

    // Read: curl can GET a blob with it, and cannot PUT one.
    let r = sas(&d, &vfid, "read", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["url"].as_str().unwrap().to_string();
    let (base, query) = url.split_once('?').unwrap();
    let blob = |name: &str| format!("{base}/{name}?{query}");
    let get = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", &blob("doc.txt")])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&get.stdout).to_string();
    assert!(
        got.starts_with("shared text") && got.ends_with("200"),
        "{got}"
    );
    let put = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(["-H", "x-ms-blob-type: BlockBlob", "--data-binary", "nope"])
        .arg(blob("new.txt"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&put.stdout),
        "403",
        "a read SAS cannot write"
    );

    // Read-write with the SDK: list and upload in this container, nothing in another one.
    let r = sas(&d, &vfid, "read-write", Some(600)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rw = r.json()["url"].as_str().unwrap().to_string();
    let out = az.py(&format!(
        "c = ContainerClient.from_container_url({rw:?})\n\
         c.upload_blob('by-sdk.txt', b'written with the SAS')\n\
         print(sorted(b.name for b in c.list_blobs()))"
    ));
    assert_eq!(out.trim(), "['by-sdk.txt', 'doc.txt']");
    let other_container = bucket_of("sas-", &other);
    let out = az.py(&format!(
        "u = {rw:?}.replace({container:?}, {other_container:?})\n\
         try:\n    ContainerClient.from_container_url(u).upload_blob('x.txt', b'x')\n    print('written')\n\
         except Exception as e:\n    print('refused', type(e).__name__)"
    ));
    assert!(
        out.starts_with("refused"),
        "the SAS is for one container: {out}"
    );

    // Expiry is capped by the volume; a read-only vfolder never gets a writing SAS.
    let r = sas(&d, &vfid, "read", Some(365 * 86400)).await;
    let expires =
        chrono::DateTime::parse_from_rfc3339(r.json()["expires_at"].as_str().unwrap()).unwrap();
    let left = expires.signed_duration_since(chrono::Utc::now());
    assert!(
        left <= chrono::Duration::hours(2) + chrono::Duration::seconds(5),
        "{left}"
    );
    let ro = random_vfid();
    az.py("svc.create_container('sas-external')");
    let r = d
        .mgr(
            "POST",
            "/folder/register",
            json!({"volume": "vol1", "vfid": ro, "bucket": "sas-external", "read_only": true}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    sas(&d, &ro, "read-write", None).await.problem(403);
    assert_eq!(sas(&d, &ro, "read", None).await.status, 200);
    let p = sas(&d, &vfid, "everything", None).await;
    assert!(p.status == 400 || p.status == 422, "{}", p.text());

    // A presigned download URL for one blob, straight at the service.
    let r = d
        .mgr(
            "POST",
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "doc.txt", "presign": true}),
        )
        .await;
    assert_eq!(r.status, 400, "presign is off on this volume: {}", r.text());
}

#[tokio::test]
async fn a_wrong_key_or_a_dead_endpoint_fail_clearly_and_never_hang() {
    let az = Azurite::start();
    let wrong = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk=";
    let d = Daemon::builder()
        .azure(&az.endpoint(), "x-")
        .set("volume.vol1.account-key", wrong)
        .start()
        .await;
    refused_clearly(&d, "signature").await;

    let dead = format!("http://127.0.0.1:{}/devstoreaccount1", free_port());
    let d = Daemon::builder()
        .azure(&dead, "x-")
        .set("storage-agent.volume-check-timeout", "3s")
        .start()
        .await;
    refused_clearly(&d, "connect").await;
}

/// A session mounts a container with rclone through a container SAS (never the account key),
/// and sees what the API wrote.
#[tokio::test]
async fn a_session_mounts_its_container_through_a_sas() {
    let az = Azurite::start();
    let d = Daemon::builder()
        .agent()
        .azure(&az.endpoint(), "sess-")
        .start()
        .await;
    let _g = crate::common::agent::ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let vfid = format!("user:{user}/{}", uuid::Uuid::new_v4().simple());
    create(&d, &vfid).await;
    az.py(&format!(
        "svc.get_container_client({:?}).upload_blob('hello.txt', b'from azure')",
        bucket_of("sess-", &vfid)
    ));
    let (key, public) = crate::common::agent::keypair(d.dir.path(), "az");
    let mut rpc = d.rpc().await;
    let s = rpc
        .create_session(crate::common::agent::sftp_req(
            &user,
            vec![crate::common::agent::mount("vol1", &vfid, "data", false)],
            vec![public],
        ))
        .await
        .expect("create session")
        .into_inner()
        .session
        .unwrap();
    let local = d.dir.path().join("got.txt");
    let out = crate::common::agent::sftp_key(
        &key,
        "work",
        s.endpoints[0].port as u16,
        &format!("get data/hello.txt {}\n", local.display()),
    );
    assert!(out.status.success(), "{}", crate::common::agent::text(&out));
    assert_eq!(std::fs::read(&local).unwrap(), b"from azure");
    // The mount's credentials are a SAS for this container, not the account key: neither in
    // the arguments nor in the environment of the rclone serving it. (Only this container's
    // rclone: parallel tests run others, some legitimately on the key.)
    let remote = format!(":azureblob:{}", bucket_of("sess-", &vfid));
    let (args, env): (Vec<String>, Vec<String>) = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&remote).then(|| {
                let env = std::fs::read(p.path().join("environ"))
                    .map(|e| String::from_utf8_lossy(&e).into_owned())
                    .unwrap_or_default();
                (cmd, env)
            })
        })
        .unzip();
    assert_eq!(args.len(), 1, "one rclone serves {remote}: {args:?}");
    assert!(!args[0].contains(crate::common::azurite::KEY));
    let env = env.join("\n");
    assert!(
        env.contains("RCLONE_AZUREBLOB_SAS_URL="),
        "rclone runs on a SAS"
    );
    assert!(env.contains("sr=c"), "a container SAS");
    assert!(
        !env.contains(crate::common::azurite::KEY),
        "never the account key"
    );
}
