//! What differs between object services (S3 today; Azure Blob on the same seam): buckets, dir
//! markers, presigned URLs, how a session mounts a bucket, and the data client of a bucket.
//! Everything else in `object/` is written once against this.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use object_store::ObjectStore;
use object_store::list::PaginatedListStore;
use object_store::multipart::MultipartStore;

use crate::volume::mounts::MountSpec;
use crate::volume::{Presign, RemoteLocation, Result, VolumeError};

/// The data client of one bucket (container).
#[derive(Clone)]
pub struct BucketClient {
    pub name: String,
    pub store: Arc<dyn ObjectStore>,
    pub multipart: Arc<dyn MultipartStore>,
    pub pages: Arc<dyn PaginatedListStore>,
}

/// Each bucket's data client, built on first use and kept: object_store clients are per bucket,
/// and building one costs. Bounded, so buckets of deleted vfolders are not kept for ever.
#[derive(Default)]
pub struct BucketClients(std::sync::Mutex<std::collections::HashMap<String, BucketClient>>);

impl BucketClients {
    /// The client of `name`, built by `build` if missing (one object serves all three roles).
    pub fn get<T>(&self, name: &str, build: impl FnOnce() -> Result<T>) -> Result<BucketClient>
    where
        T: ObjectStore + MultipartStore + PaginatedListStore + 'static,
    {
        let mut clients = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(name) {
            return Ok(c.clone());
        }
        let client = Arc::new(build()?);
        let c = BucketClient {
            name: name.to_string(),
            store: client.clone(),
            multipart: client.clone(),
            pages: client,
        };
        if clients.len() > 1024 {
            clients.clear();
        }
        clients.insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// Forgets a deleted bucket's client.
    pub fn forget(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// Where a partial upload's bytes wait until the final upload joins them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partials {
    /// As uncommitted blocks of the destination blob, committed in the final upload's order by
    /// one block list (Azure: blocks have any size, and a block list any order).
    BlocksOfTheBlob,
    /// As objects of their own outside every vfolder, joined by server-side part copies (S3: a
    /// multipart upload's part numbers fix the order, and partials are numbered before the
    /// final upload says their order).
    CopiedParts,
}

#[async_trait]
pub trait Service: Send + Sync {
    /// The backend name (`s3`).
    fn kind(&self) -> &'static str;
    /// Where it is, for `/volumes` and logs (never with credentials).
    fn location(&self) -> String;
    fn bucket(&self, name: &str) -> Result<BucketClient>;
    /// Makes a bucket; one that exists already is `Ok(false)`.
    async fn create_bucket(&self, name: &str) -> Result<bool>;
    /// Removes an empty bucket; a missing one is fine.
    async fn delete_bucket(&self, name: &str) -> Result<()>;
    async fn bucket_exists(&self, name: &str) -> Result<bool>;
    /// Stores the zero-byte object `key` (which ends with "/"): an empty directory.
    async fn put_dir_marker(&self, bucket: &str, key: &str) -> Result<()>;
    /// Whether the marker `key` (ending with "/") exists: listings do not always show it
    /// (Azure leaves a prefix's own marker out).
    async fn dir_marker_exists(&self, bucket: &str, key: &str) -> Result<bool>;
    /// Removes the marker `key` (ending with "/"); object_store's paths cannot name it.
    async fn delete_dir_marker(&self, bucket: &str, key: &str) -> Result<()>;
    /// Copies an object between buckets inside the service; `Ok(false)` when it cannot for
    /// this one (too large for one request), so the caller streams it instead.
    async fn copy_across(&self, from: (&str, &str), to: (&str, &str), size: u64) -> Result<bool>;
    /// How partial uploads (tus concatenation) wait for their final upload here.
    fn partials(&self) -> Partials;
    /// S3's UploadPartCopy: part `part_number` of the multipart upload `upload_id` at `to`
    /// (bucket, key) becomes bytes `range` (start, end exclusive) of the object `from`, copied
    /// inside the service; returns the part's ETag.
    async fn copy_part(
        &self,
        _to: (&str, &str),
        _upload_id: &str,
        _part_number: u16,
        _from: (&str, &str),
        _range: (u64, u64),
    ) -> Result<String> {
        Err(crate::volume::VolumeError::Unsupported {
            backend: self.kind(),
            op: "server-side part copies",
        })
    }
    /// A URL straight to the service for GET of `key`, or one PUT of exactly the upload's size
    /// where the service can bind it (else as narrow as it allows: see each service).
    fn presign(&self, bucket: &str, key: &str, access: Presign, expiry: Duration)
    -> Result<String>;
    /// Whether a presigned upload URL binds the upload's length (S3: a signed Content-Length;
    /// an Azure blob SAS cannot).
    fn presign_binds_length(&self) -> bool;
    /// A URL with a SAS for a whole container (Azure); None where the service has none.
    fn container_sas(
        &self,
        _bucket: &str,
        _write: bool,
        _expiry: Duration,
    ) -> Result<Option<String>> {
        Ok(None)
    }
    /// What `/folder/mount` reports for a location.
    fn remote_location(&self, bucket: &str, prefix: &str, read_only: bool) -> RemoteLocation;
    /// How a session mounts a bucket with rclone (`key` names the shared mount).
    fn fuse_spec(&self, key: String, bucket: &str, read_only: bool) -> MountSpec;
    /// One cheap authenticated request: the service answers and accepts our credentials.
    async fn probe(&self) -> std::result::Result<(), String>;
    /// Whether the object at `key` was completed from exactly these parts (their content ids,
    /// in order): a completion whose answer a crash or the network took cannot be sent again
    /// everywhere (S3 forgets the upload), but its object says whether it happened.
    async fn completed_from(&self, bucket: &str, key: &str, parts: &[String]) -> Result<bool>;
}

/// An object_store error as a volume error: missing objects keep the errno of a missing file
/// (the APIs answer them as they do for directories), the rest says which service failed.
pub fn store_err(service: &str, key: &str, e: object_store::Error) -> VolumeError {
    use object_store::Error as E;
    let errno = |code| VolumeError::Io {
        path: key.to_string(),
        source: std::io::Error::from_raw_os_error(code),
    };
    match e {
        E::NotFound { .. } => errno(libc::ENOENT),
        E::AlreadyExists { .. } => errno(libc::EEXIST),
        E::InvalidPath { source } => VolumeError::BadRequest(format!(
            "{key:?} is not a key this volume can store: {source}"
        )),
        other => remote(service, other.to_string()),
    }
}

/// A failed call to the service: unreachable (no answer, timeouts) or an error answer.
pub fn remote(service: &str, message: String) -> VolumeError {
    let lower = message.to_ascii_lowercase();
    let unreachable = [
        "timed out",
        "timeout",
        "connection refused",
        "error sending request",
        "dns error",
        "connect error",
        "operation timed out",
    ]
    .iter()
    .any(|s| lower.contains(s));
    VolumeError::Remote {
        service: service.to_string(),
        message,
        unreachable,
    }
}
