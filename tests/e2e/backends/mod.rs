//! The shared volume suite (`suite.rs`) against every backend: `vfs` on a directory, `cephfs`
//! on a single-node CephFS, `s3` on a real S3 service (moto), `azure-blob` on Azurite, with the backend's storage read
//! independently (the filesystem, boto3, Azure's Python SDK).

pub mod killed;
mod suite;

use crate::common::Daemon;
use crate::common::azurite::Azurite;
use crate::common::moto::Moto;

#[tokio::test]
async fn vfs_passes_the_volume_suite() {
    let d = Daemon::start().await;
    let peek = |vfid: &str, rel: &str| std::fs::read(d.vfolder_path(vfid).join(rel)).ok();
    suite::volume_suite(&d, &peek).await;
}

#[tokio::test]
async fn cephfs_passes_the_volume_suite() {
    let ceph = crate::common::ceph::CephCluster::up();
    let d = Daemon::builder()
        .set("volume.vol1.backend", "cephfs")
        .set("volume.vol1.path", ceph.dir("vol1").display().to_string())
        .start()
        .await;
    let peek = |vfid: &str, rel: &str| std::fs::read(d.vfolder_path(vfid).join(rel)).ok();
    suite::volume_suite(&d, &peek).await;
}

/// The bucket of a vfolder on a bucket-per-vfolder volume with `prefix`.
pub fn bucket_of(prefix: &str, vfid: &str) -> String {
    format!("{prefix}{}", vfid.rsplit('/').next().unwrap())
}

/// An object's bytes through boto3; None when it (or its bucket) is missing.
pub fn s3_object(moto: &Moto, bucket: &str, key: &str) -> Option<Vec<u8>> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let said = moto.boto(&format!(
        "try:\n    s3.download_file({bucket:?}, {key:?}, {:?})\n    print('ok')\n\
         except Exception as e:\n    print('missing', e)",
        out.path().display().to_string()
    ));
    said.starts_with("ok")
        .then(|| std::fs::read(out.path()).unwrap())
}

#[tokio::test]
async fn s3_passes_the_volume_suite() {
    let moto = Moto::start();
    let d = Daemon::builder()
        .s3(&moto.endpoint(), "suite-")
        .start()
        .await;
    let peek = |vfid: &str, rel: &str| s3_object(&moto, &bucket_of("suite-", vfid), rel);
    suite::volume_suite(&d, &peek).await;
    // What stays is the volume's own bucket of partial uploads (tus concatenation), emptied by
    // the join.
    assert_eq!(
        moto.buckets(),
        vec!["suite-partials".to_string()],
        "deleting the vfolders deleted their buckets"
    );
    assert!(
        moto.keys("suite-partials").is_empty(),
        "the partial uploads' objects went with the join"
    );
}

#[tokio::test]
async fn s3_with_a_prefix_per_vfolder_passes_the_volume_suite() {
    let moto = Moto::start();
    moto.boto("s3.create_bucket(Bucket='shared-bucket')");
    let d = Daemon::builder()
        .s3(&moto.endpoint(), "")
        .set("volume.vol1.layout", "prefix-per-vfolder")
        .set("volume.vol1.bucket", "shared-bucket")
        .start()
        .await;
    let peek = |vfid: &str, rel: &str| {
        let (qs, vf) = vfid.split_once('/').unwrap();
        let qs = uuid::Uuid::parse_str(qs.split_once(':').unwrap().1).unwrap();
        s3_object(
            &moto,
            "shared-bucket",
            &format!("{}/{vf}/{rel}", qs.simple()),
        )
    };
    suite::volume_suite(&d, &peek).await;
    let left = moto.boto("print(s3.list_objects_v2(Bucket='shared-bucket').get('KeyCount', 0))");
    assert_eq!(left.trim(), "0", "deleted vfolders leave no object behind");
}

#[tokio::test]
async fn azure_blob_passes_the_volume_suite() {
    let az = Azurite::start();
    let d = Daemon::builder()
        .azure(&az.endpoint(), "suite-")
        .start()
        .await;
    let peek = |vfid: &str, rel: &str| az.blob(&bucket_of("suite-", vfid), rel);
    suite::volume_suite(&d, &peek).await;
    assert!(
        az.containers().is_empty(),
        "deleting the vfolders deleted their containers: {:?}",
        az.containers()
    );
}
