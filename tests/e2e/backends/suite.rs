//! What every volume backend does the same through the manager and client APIs: vfolder
//! lifecycle, uploads (one PATCH and chunked), listings, mkdir, rename, move (also as a
//! background task), fetch, ranged downloads, archives, usage, deletes, clones. The backend's
//! own storage is looked at independently through `peek` (the filesystem, or boto3).

use std::io::Read;

use serde_json::{Value, json};

use crate::common::{Daemon, Resp, send};

/// Reads `relpath` of vfolder `vfid` straight from the backend's storage; None when missing.
pub type Peek<'a> = dyn Fn(&str, &str) -> Option<Vec<u8>> + 'a;

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn op(d: &Daemon, path: &str, vfid: &str, mut body: Value) -> Resp {
    body["volume"] = json!("vol1");
    body["vfid"] = json!(vfid);
    d.mgr("POST", path, body).await
}

async fn upload(d: &Daemon, vfid: &str, relpath: &str, data: &[u8], chunk: usize) -> Resp {
    d.tus_put(vfid, relpath, data, chunk).await
}

fn names(listing: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn list(d: &Daemon, vfid: &str, dir: &str) -> Value {
    let r = op(d, "/folder/file/list", vfid, json!({"relpath": dir})).await;
    assert_eq!(r.status, 200, "list {dir}: {}", r.text());
    r.json()
}

pub async fn volume_suite(d: &Daemon, peek: &Peek<'_>) {
    let qs = format!("user:{}", uuid::Uuid::new_v4());
    let vfid = format!("{qs}/{}", uuid::Uuid::new_v4().simple());
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = d
        .mgr(
            "POST",
            "/folder/create",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 409, "creating it again: {}", r.text());

    // Uploads: one PATCH, and chunked across several parts.
    let small = b"hello, volume".to_vec();
    assert_eq!(
        upload(d, &vfid, "a/b/hello.txt", &small, 1 << 30)
            .await
            .status,
        204
    );
    assert_eq!(peek(&vfid, "a/b/hello.txt").as_deref(), Some(&small[..]));
    let big = pattern(12 * MIB + 123, 7);
    let r = upload(d, &vfid, "big.bin", &big, 3 * MIB).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(
        peek(&vfid, "big.bin") == Some(big.clone()),
        "the chunked upload is byte-identical"
    );
    // A PATCH with a checksum is kept whole or not at all, also across several parts.
    let summed = pattern(11 * MIB, 3);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "sum.bin", "size": summed.len()}),
        )
        .await;
    let url = d.url("client", &format!("/upload?token={t}"));
    let patch = |off: usize, end: usize, sum: String| {
        send(
            d.http
                .patch(&url)
                .header("Tus-Resumable", "1.0.0")
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", off.to_string())
                .header("Upload-Checksum", sum)
                .body(summed[off..end].to_vec()),
        )
    };
    let sha1 = |b: &[u8]| {
        use base64::Engine;
        use sha1::Digest;
        format!(
            "sha1 {}",
            base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(b))
        )
    };
    // A wrong checksum is 460; a backend that holds checksummed bodies back in a bounded
    // buffer (object stores: one part) refuses a longer one with 413 and says its bound.
    let r = patch(0, 7 * MIB, sha1(b"not this")).await;
    let bound = match r.status {
        460 => 7 * MIB,
        413 => r.json()["data"]["max_checksummed_body"]
            .as_u64()
            .expect("the bound is said") as usize,
        other => panic!("{other}: {}", r.text()),
    };
    if bound < 7 * MIB {
        let r = patch(0, bound, sha1(b"not this")).await;
        assert_eq!(r.status, 460, "{}", r.text());
    }
    let head = send(d.http.head(&url).header("Tus-Resumable", "1.0.0")).await;
    assert_eq!(
        head.header("upload-offset").as_deref(),
        Some("0"),
        "nothing kept"
    );
    let mut off = 0;
    while off < summed.len() {
        let end = (off + bound).min(summed.len());
        let r = patch(off, end, sha1(&summed[off..end])).await;
        assert_eq!(r.status, 204, "at {off}: {}", r.text());
        off = end;
    }
    assert!(
        peek(&vfid, "sum.bin") == Some(summed.clone()),
        "checksummed upload is intact"
    );
    let r = op(
        d,
        "/folder/file/delete",
        &vfid,
        json!({"relpaths": ["sum.bin"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let empty: Vec<u8> = Vec::new();
    assert_eq!(upload(d, &vfid, "empty.txt", &empty, 1).await.status, 204);
    assert_eq!(peek(&vfid, "empty.txt").as_deref(), Some(&empty[..]));

    partials_join(d, &vfid, peek).await;

    // mkdir and listings: files, directories from keys below them, empty directories.
    let r = op(
        d,
        "/folder/file/mkdir",
        &vfid,
        json!({"relpath": "made/deep", "parents": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = op(d, "/folder/file/mkdir", &vfid, json!({"relpath": "made"})).await;
    assert!(
        r.status >= 400,
        "mkdir of an existing directory: {}",
        r.text()
    );
    let root = list(d, &vfid, ".").await;
    assert_eq!(
        names(&root),
        [
            ("a".into(), "DIRECTORY".into()),
            ("big.bin".into(), "FILE".into()),
            ("empty.txt".into(), "FILE".into()),
            ("made".into(), "DIRECTORY".into()),
        ]
    );
    let item = root["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "big.bin")
        .unwrap()
        .clone();
    assert_eq!(item["stat"]["size"], big.len());
    assert_eq!(
        names(&list(d, &vfid, "made").await),
        [("deep".into(), "DIRECTORY".into())]
    );
    assert!(names(&list(d, &vfid, "made/deep").await).is_empty());
    let r = op(d, "/folder/file/list", &vfid, json!({"relpath": "nope"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["errno"], 2);

    // rename (never onto an existing name), move into a directory and to a new name.
    let r = op(
        d,
        "/folder/file/rename",
        &vfid,
        json!({"relpath": "big.bin", "new_name": "big2.bin"}),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(peek(&vfid, "big.bin").is_none());
    assert!(peek(&vfid, "big2.bin") == Some(big.clone()));
    let r = op(
        d,
        "/folder/file/rename",
        &vfid,
        json!({"relpath": "empty.txt", "new_name": "big2.bin"}),
    )
    .await;
    assert_eq!(r.json()["errno"], 17, "{}", r.text());
    let r = op(
        d,
        "/folder/file/move",
        &vfid,
        json!({"src_relpath": "a/b/hello.txt", "dst_relpath": "made"}),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(peek(&vfid, "made/hello.txt").as_deref(), Some(&small[..]));
    // A folder moved as a background task, with everything in it.
    let r = op(
        d,
        "/folder/file/move-async",
        &vfid,
        json!({"src_relpath": "made", "dst_relpath": "moved"}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let task = d.wait_task(r.json()["bgtask_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "done", "{task}");
    assert_eq!(peek(&vfid, "moved/hello.txt").as_deref(), Some(&small[..]));
    assert!(peek(&vfid, "made/hello.txt").is_none());
    assert_eq!(
        names(&list(d, &vfid, "moved").await),
        [
            ("deep".into(), "DIRECTORY".into()),
            ("hello.txt".into(), "FILE".into()),
        ]
    );

    // fetch.
    let r = op(
        d,
        "/folder/file/fetch",
        &vfid,
        json!({"relpath": "moved/hello.txt"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], &small[..]);
    op(
        d,
        "/folder/file/fetch",
        &vfid,
        json!({"relpath": "missing"}),
    )
    .await
    .problem(404);

    // Ranged download with validators.
    let t = d
        .token(
            "/folder/file/download",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "big2.bin"}),
        )
        .await;
    let url = d.url("client", &format!("/download?token={t}"));
    let r = send(d.http.get(&url).header("Range", "bytes=5000000-5000009")).await;
    assert_eq!(r.status, 206, "{}", r.text());
    assert_eq!(&r.body[..], &big[5_000_000..5_000_010]);
    let etag = r.header("etag").expect("an ETag");
    let r = send(d.http.get(&url).header("If-None-Match", &etag)).await;
    assert_eq!(r.status, 304);
    let r = send(d.http.get(&url)).await;
    assert_eq!(r.status, 200);
    assert!(r.body[..] == big[..], "a whole download is byte-identical");

    // An archive of a folder.
    let t = d
        .token(
            "/folder/file/archive-download-token",
            json!({"volume": "vol1", "virtual_folder_id": vfid, "files": ["moved"], "filename": "m.zip"}),
        )
        .await;
    let r = send(
        d.http
            .get(d.url("client", &format!("/download-archive?token={t}"))),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(r.body.to_vec())).unwrap();
    let mut found = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        found.push((f.name().unwrap().trim_end_matches('/').to_string(), data));
    }
    found.sort();
    let got: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        got.contains(&"moved/hello.txt") && got.contains(&"moved/deep"),
        "{got:?}"
    );
    assert_eq!(
        found
            .iter()
            .find(|(n, _)| n == "moved/hello.txt")
            .unwrap()
            .1,
        small
    );

    // Usage counts what is there.
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let used = r.json()["used_bytes"].as_u64().unwrap();
    assert!(used >= (big.len() + small.len()) as u64, "{}", r.text());

    // Deletes: a non-empty directory needs recursive; missing paths are fine.
    let r = op(
        d,
        "/folder/file/delete",
        &vfid,
        json!({"relpaths": ["moved"]}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["errno"], 39);
    let r = op(
        d,
        "/folder/file/delete",
        &vfid,
        json!({"relpaths": ["moved", "never"], "recursive": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(peek(&vfid, "moved/hello.txt").is_none());
    assert!(
        !names(&list(d, &vfid, ".").await)
            .iter()
            .any(|(n, _)| n == "moved")
    );

    // Clone, then delete both.
    let clone = format!("{qs}/{}", uuid::Uuid::new_v4().simple());
    let t = d.start_clone(&vfid, &clone).await;
    assert_eq!(d.wait_task(&t).await["status"], "done");
    assert!(
        peek(&clone, "big2.bin") == Some(big.clone()),
        "the clone is byte-identical"
    );
    for v in [&vfid, &clone] {
        let t = d.start_delete(v).await;
        assert_eq!(d.wait_task(&t).await["status"], "done");
        let r = op(d, "/folder/file/list", v, json!({"relpath": "."})).await;
        assert!(r.status == 404 || r.status == 400, "{}", r.text());
        assert!(peek(v, "big2.bin").is_none());
    }
}

/// tus concatenation: three partial uploads (one empty, one under S3's 5 MiB part minimum, cut
/// at no block boundary), written out of order, joined by the final upload at the token's
/// destination, where nothing was before.
async fn partials_join(d: &Daemon, vfid: &str, peek: &Peek<'_>) {
    use crate::tus_concat::{patch_url, post_final, post_partial};
    let data = pattern(2 * MIB + 4097, 9);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "joined/parts.bin", "size": data.len()}),
        )
        .await;
    let (r, first) = post_partial(d, &t, MIB as u64 + 3, None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (r, empty) = post_partial(d, &t, 0, Some(Vec::new())).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let rest = data[MIB + 3..].to_vec();
    let (r, second) = post_partial(d, &t, rest.len() as u64, Some(rest)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = patch_url(d, &first, 0, data[..MIB + 3].to_vec()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        peek(vfid, "joined/parts.bin"),
        None,
        "partials land nowhere"
    );
    let r = post_final(d, &t, &[&first, &empty, &second]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(peek(vfid, "joined/parts.bin").as_deref(), Some(&data[..]));
    let r = op(
        d,
        "/folder/file/delete",
        vfid,
        json!({"relpaths": ["joined"], "recursive": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
