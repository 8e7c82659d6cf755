//! tus `concatenation` on the client API: partial uploads made under one upload token, joined by
//! a final upload at the token's destination; the spec's edge cases answered as raw HTTP; a join
//! cut off by kill -9 completes when the final POST is repeated. tus-js-client's
//! `parallelUploads` runs in `tus_clients.rs`, and every file backend runs `partials_join` in
//! the shared volume suite.

use serde_json::json;

use crate::common::{Daemon, Resp, random_file, send, sha256_file};
use crate::tus::{Upload, head, mint};

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// POST `Upload-Concat: partial` of `len` bytes (with `data`, creation-with-upload); returns the
/// answer and the partial upload's absolute URL.
pub async fn post_partial(
    d: &Daemon,
    token: &str,
    len: u64,
    data: Option<Vec<u8>>,
) -> (Resp, String) {
    let mut req = d
        .http
        .post(d.url("client", &format!("/upload?token={token}")))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Concat", "partial")
        .header("Upload-Length", len.to_string());
    if let Some(b) = data {
        req = req
            .header("Content-Type", "application/offset+octet-stream")
            .body(b);
    }
    let r = send(req).await;
    let url = r
        .header("location")
        .map(|l| d.url("client", &format!("/{l}")))
        .unwrap_or_default();
    (r, url)
}

pub async fn patch_url(d: &Daemon, url: &str, offset: u64, body: Vec<u8>) -> Resp {
    send(
        d.http
            .patch(url)
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .body(body),
    )
    .await
}

pub async fn post_final(d: &Daemon, token: &str, urls: &[&str]) -> Resp {
    send(
        d.http
            .post(d.url("client", &format!("/upload?token={token}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", format!("final;{}", urls.join(" "))),
    )
    .await
}

fn staging_names(d: &Daemon, u: &Upload) -> Vec<String> {
    let dir = crate::tus::staging_file(d, u)
        .parent()
        .unwrap()
        .to_path_buf();
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn partial_uploads_join_at_the_destination() {
    let d = Daemon::start().await;
    let data = pattern(3 * 1024 * 1024 + 12345, 7);
    let u = mint(&d, "big/joined.bin", data.len() as u64).await;
    let cuts = [1024 * 1024 + 3, 2 * 1024 * 1024 + 77];

    // Three partials, the second created with its data; none has a destination of its own.
    let (r, p0) = post_partial(&d, &u.token, cuts[0] as u64, None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("upload-concat").unwrap(), "partial");
    assert_eq!(r.header("upload-offset").unwrap(), "0");
    let (r, p1) = post_partial(
        &d,
        &u.token,
        (cuts[1] - cuts[0]) as u64,
        Some(data[cuts[0]..cuts[1]].to_vec()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.header("upload-offset").unwrap(),
        (cuts[1] - cuts[0]).to_string()
    );
    let (r, p2) = post_partial(&d, &u.token, (data.len() - cuts[1]) as u64, None).await;
    assert_eq!(r.status, 201);
    assert_ne!(p0, p1);

    // Partials take PATCHes like any upload, in pieces, and answer HEAD as partials.
    let r = patch_url(&d, &p2, 0, data[cuts[1]..cuts[1] + 1000].to_vec()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = patch_url(&d, &p2, 1000, data[cuts[1] + 1000..].to_vec()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = patch_url(&d, &p0, 0, data[..cuts[0]].to_vec()).await;
    assert_eq!(r.status, 204);
    let r = send(d.http.head(&p0).header("Tus-Resumable", "1.0.0")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("upload-concat").unwrap(), "partial");
    assert_eq!(r.header("upload-offset").unwrap(), cuts[0].to_string());
    assert!(
        !u.vfpath.join("big/joined.bin").exists(),
        "a partial upload lands nowhere in the vfolder"
    );
    let r = d
        .mgr(
            "POST",
            "/folder/file/list",
            json!({"volume": "vol1", "vfid": u.vfid, "relpath": "."}),
        )
        .await;
    assert_eq!(r.json()["items"], json!([]), "nothing to see or download");

    // The final upload: the token's own, made of the partials in the order named.
    let r = post_final(&d, &u.token, &[&p0, &p1, &p2]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let loc = r.header("location").unwrap();
    assert!(loc.starts_with("upload?token="), "{loc}");
    assert!(!loc.contains("partial="), "{loc}");
    assert_eq!(
        std::fs::read(u.vfpath.join("big/joined.bin")).unwrap(),
        data,
        "byte-identical"
    );
    assert_eq!(
        staging_names(&d, &u),
        Vec::<String>::new(),
        "the partials' staging is used up"
    );

    // HEAD on the final upload, as the spec says: complete, and which partials it is made of.
    let r = head(&d, &u.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("upload-offset").unwrap(), data.len().to_string());
    assert_eq!(r.header("upload-length").unwrap(), data.len().to_string());
    let concat = r.header("upload-concat").unwrap();
    let listed: Vec<&str> = concat.strip_prefix("final;").unwrap().split(' ').collect();
    assert_eq!(listed.len(), 3, "{concat}");
    for (l, p) in listed.iter().zip([&p0, &p1, &p2]) {
        let id = |s: &str| s.rsplit_once("partial=").unwrap().1.to_string();
        assert_eq!(id(l), id(p));
    }

    // The same final again (a client that missed the answer) is the same success; a PATCH on a
    // final upload is refused, as the spec says.
    let r = post_final(&d, &u.token, &[&p0, &p1, &p2]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = crate::tus::patch(&d, &u.token, 0, vec![1], &[]).await;
    r.problem(403);
    assert_eq!(
        std::fs::read(u.vfpath.join("big/joined.bin")).unwrap(),
        data
    );
}

#[tokio::test]
async fn the_specs_edge_cases() {
    let d = Daemon::start().await;
    let data = pattern(40_000, 3);
    let u = mint(&d, "edge.bin", data.len() as u64).await;

    // Malformed Upload-Concat headers.
    for bad in ["partia", "final", "final;", "final;http://x/upload?token=t"] {
        let r = send(
            d.http
                .post(d.url("client", &format!("/upload?token={}", u.token)))
                .header("Tus-Resumable", "1.0.0")
                .header("Upload-Concat", bad)
                .header("Upload-Length", "10"),
        )
        .await;
        assert!(r.problem(400)["data"]["upload-concat"].is_string(), "{bad}");
    }

    // Partials may together hold no more than the upload: N streams are no way around its
    // length.
    let (r, a) = post_partial(&d, &u.token, 25_000, None).await;
    assert_eq!(r.status, 201);
    let (r, _) = post_partial(&d, &u.token, 15_001, None).await;
    r.problem(413);
    let (r, b) = post_partial(&d, &u.token, 10_000, None).await;
    assert_eq!(r.status, 201);
    // A partial terminated gives its share back.
    let r = send(d.http.delete(&b).header("Tus-Resumable", "1.0.0")).await;
    assert_eq!(r.status, 204);
    assert_eq!(
        send(d.http.head(&b).header("Tus-Resumable", "1.0.0"))
            .await
            .status,
        404
    );
    let (r, c) = post_partial(&d, &u.token, 15_000, None).await;
    assert_eq!(r.status, 201, "{}", r.text());

    // Unknown and foreign partials; a partial named twice.
    let unknown = format!(
        "{}&partial={}",
        a.split("&partial=").next().unwrap(),
        "ab".repeat(16)
    );
    post_final(&d, &u.token, &[&a, &unknown]).await.problem(404);
    let other = mint(&d, "other.bin", 100).await;
    let (r, foreign) = post_partial(&d, &other.token, 100, Some(vec![9; 100])).await;
    assert_eq!(r.status, 201);
    post_final(&d, &u.token, &[&a, &foreign]).await.problem(404);
    post_final(&d, &u.token, &[&a, &a]).await.problem(400);

    // Unfinished partials are refused (no concatenation-unfinished), and so are sizes that do
    // not add up to the upload.
    patch_url(&d, &a, 0, data[..25_000].to_vec()).await;
    let r = post_final(&d, &u.token, &[&a, &c]).await;
    let why = r.problem(400)["data"]["upload-concat"].to_string();
    assert!(why.contains("not finished"), "{why}");
    assert_eq!(
        patch_url(&d, &c, 0, data[25_000..].to_vec()).await.status,
        204
    );
    let r = post_final(&d, &u.token, &[&a]).await;
    let why = r.problem(400)["data"]["upload-concat"].to_string();
    assert!(why.contains("25000"), "{why}");
    // An Upload-Length on the final that is not the upload's.
    let r = send(
        d.http
            .post(d.url("client", &format!("/upload?token={}", u.token)))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", "5")
            .header("Upload-Concat", format!("final;{a} {c}")),
    )
    .await;
    r.problem(400);
    assert!(!u.vfpath.join("edge.bin").exists(), "nothing joined so far");

    // The partials in the other order: what the final names is what lands.
    let r = post_final(&d, &u.token, &[&c, &a]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mut want = data[25_000..].to_vec();
    want.extend_from_slice(&data[..25_000]);
    assert_eq!(std::fs::read(u.vfpath.join("edge.bin")).unwrap(), want);

    // A partial reused in another final: the upload is complete, and the partials are used up.
    post_final(&d, &u.token, &[&a, &c]).await.problem(409);
    let (r, _) = post_partial(&d, &u.token, 10, None).await;
    r.problem(409);

    // An upload written in one stream takes no partials, and a partial is no plain upload.
    let plain = mint(&d, "plain.bin", 1000).await;
    crate::tus::patch(&d, &plain.token, 0, vec![1; 10], &[]).await;
    post_partial(&d, &plain.token, 10, None)
        .await
        .0
        .problem(409);
}

#[tokio::test]
async fn termination_takes_the_partials_along() {
    let d = Daemon::start().await;
    let u = mint(&d, "t.bin", 3000).await;
    let (_, a) = post_partial(&d, &u.token, 1000, Some(vec![1; 1000])).await;
    let (_, b) = post_partial(&d, &u.token, 2000, Some(vec![2; 500])).await;
    assert_eq!(staging_names(&d, &u).len(), 2);
    let r = send(
        d.http
            .delete(d.url("client", &format!("/upload?token={}", u.token)))
            .header("Tus-Resumable", "1.0.0"),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(staging_names(&d, &u), Vec::<String>::new());
    for p in [&a, &b] {
        assert_eq!(
            send(d.http.head(p).header("Tus-Resumable", "1.0.0"))
                .await
                .status,
            404
        );
    }
}

/// A final upload whose partials are not all used: the unused ones go with the join, not at the
/// token's expiry.
#[tokio::test]
async fn partials_left_out_of_the_final_are_discarded() {
    let d = Daemon::start().await;
    let u = mint(&d, "s.bin", 2000).await;
    let (_, a) = post_partial(&d, &u.token, 1000, Some(vec![1; 1000])).await;
    let (r, stray) = post_partial(&d, &u.token, 500, Some(vec![5; 200])).await;
    assert_eq!(r.status, 201);
    // The stray partial holds its share: a second 1000 bytes do not fit beside it.
    post_partial(&d, &u.token, 1000, None).await.0.problem(413);
    let (r, b) = post_partial(&d, &u.token, 500, Some(vec![2; 500])).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (r, c) = post_partial(&d, &u.token, 500, Some(vec![3; 500])).await;
    r.problem(413);
    assert_eq!(c, "");
    // Made of a and b (1500 bytes) the upload does not add up; the stray goes, c comes.
    post_final(&d, &u.token, &[&a, &b]).await.problem(400);
    assert_eq!(
        send(d.http.delete(&stray).header("Tus-Resumable", "1.0.0"))
            .await
            .status,
        204
    );
    let (r, c) = post_partial(&d, &u.token, 500, Some(vec![3; 500])).await;
    assert_eq!(r.status, 201);
    let (r, unused) = post_partial(&d, &u.token, 0, None).await;
    assert_eq!(r.status, 201, "an empty partial fits: {}", r.text());
    assert_eq!(post_final(&d, &u.token, &[&a, &b, &c]).await.status, 201);
    assert_eq!(staging_names(&d, &u), Vec::<String>::new());
    assert_eq!(
        send(d.http.head(&unused).header("Tus-Resumable", "1.0.0"))
            .await
            .status,
        404,
        "the unused partial was terminated"
    );
    let mut want = vec![1u8; 1000];
    want.extend(vec![2u8; 500]);
    want.extend(vec![3u8; 500]);
    assert_eq!(std::fs::read(u.vfpath.join("s.bin")).unwrap(), want);
}

/// kill -9 while the final upload joins its partials: the partials' bytes are never lost, and
/// the final POST repeated after the restart completes the join byte-identical. The join is
/// caught in the act by watching its staging file grow; should it finish first, the crash
/// comes right after it, before its record (the other window a join has).
#[tokio::test]
async fn a_join_cut_off_by_kill_9_completes_when_repeated() {
    let mut d = Daemon::start().await;
    const PARTS: usize = 8;
    const PART: u64 = 48 << 20;
    let src = d.dir.path().join("src.bin");
    random_file(&src, PART * PARTS as u64, 5);
    let u = mint(&d, "crash/joined.bin", PART * PARTS as u64).await;
    let mut urls = Vec::new();
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&src).unwrap();
        for i in 0..PARTS {
            let mut buf = vec![0u8; PART as usize];
            f.seek(SeekFrom::Start(i as u64 * PART)).unwrap();
            f.read_exact(&mut buf).unwrap();
            let (r, url) = post_partial(&d, &u.token, PART, Some(buf)).await;
            assert_eq!(r.status, 201, "{}", r.text());
            urls.push(url);
        }
    }
    let joining = crate::tus::staging_file(&d, &u).with_extension("join");
    let (http, final_url) = (
        d.http.clone(),
        d.url("client", &format!("/upload?token={}", u.token)),
    );
    let header = format!("final;{}", urls.join(" "));
    let req = tokio::spawn(async move {
        http.post(final_url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", header)
            .send()
            .await
    });
    // Watch the join: its file (the first partial, renamed to `<session>.join`) grows part by
    // part.
    let deadline = std::time::Instant::now() + crate::common::OUTCOME;
    let mut caught = None;
    while std::time::Instant::now() < deadline && !req.is_finished() {
        if let Ok(m) = std::fs::metadata(&joining)
            && m.len() > PART
            && m.len() < PART * PARTS as u64
        {
            caught = Some(m.len());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    d.kill9();
    let _ = req.await;
    eprintln!("killed with the join at {caught:?} bytes");
    d.restart().await;
    if caught.is_some() {
        // A partial of a join under way cannot be terminated on its own.
        let p = format!("/upload{}", urls[1].split_once("/upload").unwrap().1);
        let r = send(
            d.http
                .delete(d.url("client", &p))
                .header("Tus-Resumable", "1.0.0"),
        )
        .await;
        r.problem(409);
    }
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let r = post_final(&d, &u.token, &urls).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        sha256_file(&u.vfpath.join("crash/joined.bin")),
        sha256_file(&src),
        "byte-identical after kill -9 mid-join ({caught:?})"
    );
    assert_eq!(staging_names(&d, &u), Vec::<String>::new());
    assert_eq!(
        head(&d, &u.token).await.header("upload-offset").unwrap(),
        (PART * PARTS as u64).to_string()
    );
}

/// The object stores, with partials big enough to be parts of their own: S3 joins by
/// server-side copies (UploadPartCopy), a partial under S3's 5 MiB minimum sent along with the
/// start of the next; Azure commits the partials' blocks in the final's order. The partials are
/// created in one order and joined in another (as tus-js-client's racing POSTs may leave them).
async fn object_volume_joins(d: &Daemon, peek: &dyn Fn(&str, &str) -> Option<Vec<u8>>) {
    let vfid = d.new_vfolder().await;
    let sizes = [7 << 20, 1 << 20, (6 << 20) + 5, 3];
    let data = pattern(sizes.iter().sum(), 21);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "obj/joined.bin", "size": data.len()}),
        )
        .await;
    let mut bounds = vec![0usize];
    for s in sizes {
        bounds.push(bounds.last().unwrap() + s);
    }
    // Created last to first, written in pieces, joined first to last.
    let mut urls = vec![String::new(); sizes.len()];
    for i in (0..sizes.len()).rev() {
        let (r, url) = post_partial(d, &t, sizes[i] as u64, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        urls[i] = url;
    }
    for (i, url) in urls.iter().enumerate() {
        let piece = &data[bounds[i]..bounds[i + 1]];
        let mut at = 0;
        for chunk in piece.chunks(3 << 20) {
            let r = patch_url(d, url, at as u64, chunk.to_vec()).await;
            assert_eq!(r.status, 204, "{}", r.text());
            at += chunk.len();
        }
    }
    assert_eq!(
        peek(&vfid, "obj/joined.bin"),
        None,
        "nothing lands before the final"
    );
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let r = post_final(d, &t, &refs).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        peek(&vfid, "obj/joined.bin").as_deref() == Some(&data[..]),
        "byte-identical"
    );
    // Usage counts the joined object once.
    let r = d
        .mgr(
            "GET",
            "/folder/usage",
            json!({"volume": "vol1", "vfid": vfid}),
        )
        .await;
    assert_eq!(r.json()["used_bytes"], data.len(), "{}", r.text());
    assert_eq!(r.json()["file_count"], 1, "{}", r.text());
}

#[tokio::test]
async fn s3_joins_partials_by_server_side_copies() {
    use crate::backends::{bucket_of, s3_object};
    let moto = crate::common::moto::Moto::start();
    let d = Daemon::builder().s3(&moto.endpoint(), "cat-").start().await;
    let peek = |vfid: &str, rel: &str| s3_object(&moto, &bucket_of("cat-", vfid), rel);
    object_volume_joins(&d, &peek).await;
    assert!(
        moto.keys("cat-partials").is_empty(),
        "partials' objects removed"
    );
}

#[tokio::test]
async fn azure_joins_partials_by_one_block_list() {
    let az = crate::common::azurite::Azurite::start();
    let d = Daemon::builder()
        .azure(&az.endpoint(), "cat-")
        .start()
        .await;
    let peek = |vfid: &str, rel: &str| az.blob(&crate::backends::bucket_of("cat-", vfid), rel);
    object_volume_joins(&d, &peek).await;
}

/// S3, kill -9 twice: once with a partial half written (it resumes from its offset after the
/// restart), once just after the final POST went out (the join, wherever it was, is repeated
/// after the restart). The result is byte-identical, and neither the partials' objects nor a
/// half-copied multipart upload is left behind. Partials of their own (joined by copies), and
/// partials placed in the destination's multipart upload by their declared offsets.
#[tokio::test]
async fn s3_partials_and_join_survive_kill_9() {
    s3_kill_9(false).await;
}

#[tokio::test]
async fn s3_placed_partials_and_join_survive_kill_9() {
    s3_kill_9(true).await;
}

async fn s3_kill_9(declare: bool) {
    use crate::backends::{bucket_of, s3_object};
    let moto = crate::common::moto::Moto::start();
    let mut d = Daemon::builder()
        .s3(&moto.endpoint(), "kill-")
        .start()
        .await;
    let vfid = d.new_vfolder().await;
    // Whole parts (of 8 MiB: the configured 5 MiB rounded up) so declared partials are placed.
    const PART: usize = 16 << 20;
    let data = pattern(4 * PART, 33);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "k.bin", "size": data.len()}),
        )
        .await;
    // Paths only: a restarted daemon listens on new ports.
    let mut paths = Vec::new();
    for i in 0..4 {
        let mut req = d
            .http
            .post(d.url("client", &format!("/upload?token={t}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", "partial")
            .header("Upload-Length", PART.to_string());
        if declare {
            req = req.header("Storage-Agent-Partial-Offset", (i * PART).to_string());
        }
        let r = send(req).await;
        assert_eq!(r.status, 201, "{}", r.text());
        paths.push(format!("/{}", r.header("location").unwrap()));
    }
    let pieces: Vec<&[u8]> = data.chunks(PART).collect();
    for (p, piece) in paths.iter().zip(&pieces).take(3) {
        let r = patch_url(&d, &d.url("client", p), 0, piece.to_vec()).await;
        assert_eq!(r.status, 204, "{}", r.text());
    }
    // Half of the last partial, then kill -9.
    let r = patch_url(
        &d,
        &d.url("client", &paths[3]),
        0,
        pieces[3][..PART / 2].to_vec(),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    d.kill9();
    d.restart().await;
    let last = d.url("client", &paths[3]);
    let r = send(d.http.head(&last).header("Tus-Resumable", "1.0.0")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let at: usize = r.header("upload-offset").unwrap().parse().unwrap();
    assert!(at >= PART / 2, "the acknowledged half is kept: {at}");
    let r = patch_url(&d, &last, at as u64, pieces[3][at..].to_vec()).await;
    assert_eq!(r.status, 204, "{}", r.text());

    // The final POST, and kill -9 while the join runs (or just after).
    let urls: Vec<String> = paths.iter().map(|p| d.url("client", p)).collect();
    let (http, url) = (
        d.http.clone(),
        d.url("client", &format!("/upload?token={t}")),
    );
    let header = format!("final;{}", urls.join(" "));
    let req = tokio::spawn(async move {
        http.post(url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", header)
            .send()
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    d.kill9();
    let _ = req.await;
    d.restart().await;
    let urls: Vec<String> = paths.iter().map(|p| d.url("client", p)).collect();
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let r = post_final(&d, &t, &refs).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        s3_object(&moto, &bucket_of("kill-", &vfid), "k.bin").as_deref() == Some(&data[..]),
        "byte-identical"
    );
    if declare {
        assert!(
            !moto.buckets().contains(&"kill-partials".to_string()),
            "placed partials need no objects of their own"
        );
    } else {
        assert!(
            moto.keys("kill-partials").is_empty(),
            "partials' objects removed"
        );
    }
    let pending = moto.boto(&format!(
        "print(len(s3.list_multipart_uploads(Bucket='{}').get('Uploads', [])))",
        bucket_of("kill-", &vfid)
    ));
    assert_eq!(pending.trim(), "0", "no multipart upload left behind");
}

#[tokio::test]
async fn an_upload_takes_a_bounded_number_of_partials() {
    let d = Daemon::start().await;
    let u = mint(&d, "many.bin", 1000).await;
    let mut urls = Vec::new();
    for _ in 0..16 {
        let (r, url) = post_partial(&d, &u.token, 1, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        urls.push(url);
    }
    let r = post_partial(&d, &u.token, 1, None).await.0;
    let why = r.problem(400)["data"]["upload-concat"].to_string();
    assert!(why.contains("at most 16"), "{why}");
    // Terminating one makes room for another.
    let r = send(d.http.delete(&urls[0]).header("Tus-Resumable", "1.0.0")).await;
    assert_eq!(r.status, 204);
    assert_eq!(post_partial(&d, &u.token, 1, None).await.0.status, 201);
}

/// S3, partials whose client declared their offsets (`Storage-Agent-Partial-Offset`) at whole
/// parts: their bytes go straight into the destination's multipart upload, so the join copies
/// nothing (no partials' bucket is ever made). A final naming them against their declared
/// order is refused and loses nothing; a partial without a declared offset joins them by a
/// server-side copy.
#[tokio::test]
async fn s3_places_partials_with_declared_offsets() {
    use crate::backends::{bucket_of, s3_object};
    let moto = crate::common::moto::Moto::start();
    let d = Daemon::builder().s3(&moto.endpoint(), "dec-").start().await;
    let vfid = d.new_vfolder().await;
    // The volume's part size for partials: its configured 5 MiB, up to a power of two.
    const PS: usize = 8 << 20;
    let data = pattern(2 * PS + 3, 8);
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "placed.bin", "size": data.len()}),
        )
        .await;
    let declared = |at: usize, len: usize| {
        d.http
            .post(d.url("client", &format!("/upload?token={t}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", "partial")
            .header("Upload-Length", len.to_string())
            .header("Storage-Agent-Partial-Offset", at.to_string())
    };
    // Overlapping or overlong declarations are refused.
    let (r, a) = {
        let r = send(declared(0, PS)).await;
        let url = d.url(
            "client",
            &format!("/{}", r.header("location").unwrap_or_default()),
        );
        (r, url)
    };
    assert_eq!(r.status, 201, "{}", r.text());
    send(declared(PS / 2, PS)).await.problem(409);
    send(declared(2 * PS, 4)).await.problem(400);
    let r = send(declared(PS, PS + 3)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let b = d.url("client", &format!("/{}", r.header("location").unwrap()));
    // Written out of order, in pieces.
    assert_eq!(patch_url(&d, &b, 0, data[PS..].to_vec()).await.status, 204);
    assert_eq!(
        patch_url(&d, &a, 0, data[..PS / 2].to_vec()).await.status,
        204
    );
    assert_eq!(
        patch_url(&d, &a, (PS / 2) as u64, data[PS / 2..PS].to_vec())
            .await
            .status,
        204
    );
    // Named against their declared order: refused, nothing lost.
    let why = post_final(&d, &t, &[&b, &a]).await.problem(400)["msg"].to_string();
    assert!(why.contains("declared"), "{why}");
    let r = post_final(&d, &t, &[&a, &b]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        s3_object(&moto, &bucket_of("dec-", &vfid), "placed.bin").as_deref() == Some(&data[..]),
        "byte-identical"
    );
    assert!(
        !moto.buckets().contains(&"dec-partials".to_string()),
        "nothing was copied: no partial needed an object of its own"
    );

    // One partial declared, one not: the undeclared one is copied in after the placed one.
    let t = d
        .token(
            "/folder/file/upload",
            json!({"volume": "vol1", "vfid": vfid, "relpath": "mixed.bin", "size": data.len()}),
        )
        .await;
    let r = send(
        d.http
            .post(d.url("client", &format!("/upload?token={t}")))
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", "partial")
            .header("Upload-Length", PS.to_string())
            .header("Storage-Agent-Partial-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream")
            .body(data[..PS].to_vec()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let a = d.url("client", &format!("/{}", r.header("location").unwrap()));
    let (r, b) = post_partial(&d, &t, (PS + 3) as u64, Some(data[PS..].to_vec())).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = post_final(&d, &t, &[&a, &b]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        s3_object(&moto, &bucket_of("dec-", &vfid), "mixed.bin").as_deref() == Some(&data[..]),
        "byte-identical"
    );
    assert!(
        moto.keys("dec-partials").is_empty(),
        "the copied partial's object is gone"
    );
    let pending = moto.boto(&format!(
        "print(len(s3.list_multipart_uploads(Bucket='{}').get('Uploads', [])))",
        bucket_of("dec-", &vfid)
    ));
    assert_eq!(pending.trim(), "0", "no multipart upload left behind");
}

/// A token whose plain upload left staging behind at offset 0 (a checksummed chunk refused),
/// then made of partials: the join never takes that file for its own.
#[tokio::test]
async fn a_plain_uploads_leftover_staging_is_not_taken_for_a_join() {
    let d = Daemon::start().await;
    let data = pattern(3000, 5);
    let u = mint(&d, "left.bin", 3000).await;
    let r = crate::tus::patch(
        &d,
        &u.token,
        0,
        data[..1000].to_vec(),
        &[(
            "upload-checksum",
            "sha256 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )],
    )
    .await;
    assert_eq!(r.status, 460, "{}", r.text());
    assert!(
        crate::tus::staging_file(&d, &u).exists(),
        "left behind, at 0"
    );
    let (_, a) = post_partial(&d, &u.token, 1000, Some(data[..1000].to_vec())).await;
    let (_, b) = post_partial(&d, &u.token, 2000, Some(data[1000..].to_vec())).await;
    let r = post_final(&d, &u.token, &[&a, &b]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(std::fs::read(u.vfpath.join("left.bin")).unwrap(), data);
    assert_eq!(staging_names(&d, &u), Vec::<String>::new());
}

/// Backend.AI's `dst_dir`: partials made under an upload URL with it carry it in their own URLs,
/// and the final upload lands below it.
#[tokio::test]
async fn partials_keep_the_uploads_dst_dir() {
    let d = Daemon::start().await;
    let u = mint(&d, "d.bin", 2000).await;
    let base = d.url(
        "client",
        &format!("/upload?token={}&dst_dir=sub%2Fdir", u.token),
    );
    let mut urls = Vec::new();
    for b in [1u8, 2] {
        let r = send(
            d.http
                .post(&base)
                .header("Tus-Resumable", "1.0.0")
                .header("Upload-Concat", "partial")
                .header("Upload-Length", "1000")
                .header("Content-Type", "application/offset+octet-stream")
                .body(vec![b; 1000]),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let loc = r.header("location").unwrap();
        assert!(loc.contains("dst_dir=sub%2Fdir"), "{loc}");
        urls.push(d.url("client", &format!("/{loc}")));
    }
    let r = send(
        d.http
            .post(&base)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Concat", format!("final;{} {}", urls[0], urls[1])),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mut want = vec![1u8; 1000];
    want.extend(vec![2u8; 1000]);
    assert_eq!(std::fs::read(u.vfpath.join("sub/dir/d.bin")).unwrap(), want);
}

/// Partial uploads expire with their token: the reaper deletes their staging, done ones
/// (waiting for a final upload) as well as unfinished ones.
#[tokio::test]
async fn expired_partials_are_reaped() {
    let d = Daemon::builder()
        .set("storage-proxy.session-expire", "2s")
        .set("storage-agent.upload-reap-interval", "1s")
        .start()
        .await;
    let u = mint(&d, "exp.bin", 2000).await;
    let (r, done) = post_partial(&d, &u.token, 1000, Some(vec![1; 1000])).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (r, _unfinished) = post_partial(&d, &u.token, 1000, Some(vec![2; 500])).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(staging_names(&d, &u).len(), 2);
    let deadline = std::time::Instant::now() + crate::common::OUTCOME;
    while !staging_names(&d, &u).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the reaper left {:?}",
            staging_names(&d, &u)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let r = send(d.http.head(&done).header("Tus-Resumable", "1.0.0")).await;
    assert_eq!(r.status, 410);
    assert!(!u.vfpath.join("exp.bin").exists());
}
