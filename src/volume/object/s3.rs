//! S3 and S3-compatible services (AWS, MinIO, Ceph RGW, moto). Data goes through object_store;
//! what it lacks (bucket create/delete/head, zero-byte `dir/` markers, copies between buckets,
//! presigned URLs) is signed by rusty-s3 and sent with reqwest. rusty-s3 only signs (no HTTP
//! client, no async runtime, a handful of small dependencies), where the AWS SDK would add
//! hundreds of crates to a 2-core build for four calls.

use std::time::Duration;

use async_trait::async_trait;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use reqwest::Url;
use rusty_s3::{S3Action, UrlStyle};

use super::service::{BucketClient, BucketClients, Service, remote};
use crate::config::object::{Credentials, ObjectConfig, ServiceConfig};
use crate::volume::mounts::MountSpec;
use crate::volume::{Presign, RemoteLocation, Result, VolumeError};

/// How long the URLs we sign for our own requests stay valid (they are used at once).
const OWN_REQUEST: Duration = Duration::from_secs(300);

pub struct S3 {
    cfg: ObjectConfig,
    region: String,
    credentials: Credentials,
    path_style: bool,
    http: reqwest::Client,
    creds: rusty_s3::Credentials,
    endpoint: Url,
    clients: BucketClients,
}

impl S3 {
    pub fn new(cfg: &ObjectConfig) -> Result<Self> {
        let ServiceConfig::S3 {
            region,
            credentials,
            path_style,
        } = &cfg.service
        else {
            return Err(VolumeError::Internal("not an S3 volume".into()));
        };
        let endpoint: Url = cfg
            .endpoint
            .parse()
            .map_err(|e| VolumeError::Internal(format!("endpoint {:?}: {e}", cfg.endpoint)))?;
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .danger_accept_invalid_certs(!cfg.tls_verify)
            .build()
            .map_err(|e| VolumeError::Internal(format!("HTTP client: {e}")))?;
        Ok(S3 {
            creds: rusty_s3::Credentials::new(
                credentials.access_key.clone(),
                credentials.secret_key.clone(),
            ),
            region: region.clone(),
            credentials: credentials.clone(),
            path_style: *path_style,
            cfg: cfg.clone(),
            http,
            endpoint,
            clients: BucketClients::default(),
        })
    }

    fn signer(&self, bucket: &str) -> Result<rusty_s3::Bucket> {
        let style = if self.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        rusty_s3::Bucket::new(
            self.endpoint.clone(),
            style,
            bucket.to_string(),
            self.region.clone(),
        )
        .map_err(|e| VolumeError::BadRequest(format!("bucket {bucket:?}: {e}")))
    }

    /// The endpoint object_store talks to for one bucket: virtual-hosted style puts the
    /// bucket in the host name itself.
    fn bucket_endpoint(&self, bucket: &str) -> String {
        if self.path_style {
            return self.cfg.endpoint.clone();
        }
        let mut u = self.endpoint.clone();
        if let Some(host) = u.host_str().map(|h| format!("{bucket}.{h}")) {
            let _ = u.set_host(Some(&host));
        }
        u.as_str().trim_end_matches('/').to_string()
    }

    fn build(&self, bucket: &str) -> Result<AmazonS3> {
        let options = ClientOptions::new()
            .with_timeout(self.cfg.request_timeout)
            .with_connect_timeout(self.cfg.connect_timeout)
            .with_allow_http(self.cfg.endpoint.starts_with("http://"))
            .with_allow_invalid_certificates(!self.cfg.tls_verify);
        // A dead endpoint must fail a request in bounded time, not after minutes of retries.
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: self.cfg.request_timeout,
        };
        AmazonS3Builder::new()
            .with_endpoint(self.bucket_endpoint(bucket))
            .with_virtual_hosted_style_request(!self.path_style)
            .with_region(&self.region)
            .with_bucket_name(bucket)
            .with_access_key_id(&self.credentials.access_key)
            .with_secret_access_key(&self.credentials.secret_key)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| VolumeError::Internal(format!("S3 client for {bucket}: {e}")))
    }

    /// Sends a request signed by rusty-s3; answers other than 2xx come back as errors with
    /// their status and the service's message.
    async fn send(
        &self,
        method: reqwest::Method,
        url: Url,
        headers: &[(&str, String)],
        body: String,
    ) -> Result<reqwest::StatusCode> {
        self.send_read(method, url, headers, body)
            .await
            .map(|(s, _)| s)
    }

    /// `send`, and the answer's body.
    async fn send_read(
        &self,
        method: reqwest::Method,
        url: Url,
        headers: &[(&str, String)],
        body: String,
    ) -> Result<(reqwest::StatusCode, String)> {
        let what = format!("{method} {}", url.path());
        // Explicit even when empty: S3 wants a Content-Length on every PUT.
        let mut req = self
            .http
            .request(method, url)
            .header(reqwest::header::CONTENT_LENGTH, body.len())
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| remote(&self.location(), format!("{what}: {}", error_chain(&e))))?;
        let status = resp.status();
        if status.is_success()
            || status == reqwest::StatusCode::NOT_FOUND
            || status == reqwest::StatusCode::CONFLICT
        {
            let text = resp
                .text()
                .await
                .map_err(|e| remote(&self.location(), format!("{what}: {}", error_chain(&e))))?;
            return Ok((status, text));
        }
        let text = resp.text().await.unwrap_or_default();
        Err(remote(
            &self.location(),
            format!("{what}: {status}: {}", s3_message(&text)),
        ))
    }
}

/// reqwest's error with its causes ("error sending request" alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The innermost cause of an error (what actually failed: "Connection refused", a timeout).
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The `<Code>` and `<Message>` of an S3 error document.
fn s3_message(xml: &str) -> String {
    let tag = |t: &str| {
        xml.split(&format!("<{t}>"))
            .nth(1)
            .and_then(|r| r.split(&format!("</{t}>")).next())
            .map(str::to_string)
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => xml.chars().take(200).collect(),
    }
}

#[async_trait]
impl Service for S3 {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn location(&self) -> String {
        self.cfg.location()
    }

    fn bucket(&self, name: &str) -> Result<BucketClient> {
        self.clients.get(name, || self.build(name))
    }

    async fn create_bucket(&self, name: &str) -> Result<bool> {
        let b = self.signer(name)?;
        let action = b.create_bucket(&self.creds);
        let body = action.body();
        let status = self
            .send(reqwest::Method::PUT, action.sign(OWN_REQUEST), &[], body)
            .await?;
        Ok(status != reqwest::StatusCode::CONFLICT)
    }

    async fn delete_bucket(&self, name: &str) -> Result<()> {
        self.clients.forget(name);
        let b = self.signer(name)?;
        let url = b.delete_bucket(&self.creds).sign(OWN_REQUEST);
        match self
            .send(reqwest::Method::DELETE, url, &[], String::new())
            .await?
        {
            s if s == reqwest::StatusCode::CONFLICT => Err(remote(
                &self.location(),
                format!("bucket {name} is not empty"),
            )),
            _ => Ok(()),
        }
    }

    async fn bucket_exists(&self, name: &str) -> Result<bool> {
        let b = self.signer(name)?;
        let url = b.head_bucket(Some(&self.creds)).sign(OWN_REQUEST);
        let status = self
            .send(reqwest::Method::HEAD, url, &[], String::new())
            .await?;
        Ok(status != reqwest::StatusCode::NOT_FOUND)
    }

    async fn put_dir_marker(&self, bucket: &str, key: &str) -> Result<()> {
        let b = self.signer(bucket)?;
        let url = b.put_object(Some(&self.creds), key).sign(OWN_REQUEST);
        self.send(reqwest::Method::PUT, url, &[], String::new())
            .await
            .map(|_| ())
    }

    async fn dir_marker_exists(&self, bucket: &str, key: &str) -> Result<bool> {
        let b = self.signer(bucket)?;
        let url = b.head_object(Some(&self.creds), key).sign(OWN_REQUEST);
        Ok(self
            .send(reqwest::Method::HEAD, url, &[], String::new())
            .await?
            != reqwest::StatusCode::NOT_FOUND)
    }

    async fn delete_dir_marker(&self, bucket: &str, key: &str) -> Result<()> {
        let b = self.signer(bucket)?;
        let url = b.delete_object(Some(&self.creds), key).sign(OWN_REQUEST);
        self.send(reqwest::Method::DELETE, url, &[], String::new())
            .await
            .map(|_| ())
    }

    async fn copy_across(&self, from: (&str, &str), to: (&str, &str), size: u64) -> Result<bool> {
        // CopyObject takes objects up to 5 GiB in one request.
        if size > 5 << 30 {
            return Ok(false);
        }
        let b = self.signer(to.0)?;
        let source = format!(
            "/{}/{}",
            from.0,
            percent_encoding::utf8_percent_encode(from.1, COPY_SOURCE)
        );
        let mut action = b.put_object(Some(&self.creds), to.1);
        action
            .headers_mut()
            .insert("x-amz-copy-source", source.clone());
        let url = action.sign(OWN_REQUEST);
        match self
            .send(
                reqwest::Method::PUT,
                url,
                &[("x-amz-copy-source", source)],
                String::new(),
            )
            .await?
        {
            s if s == reqwest::StatusCode::NOT_FOUND => Err(VolumeError::Io {
                path: from.1.to_string(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            }),
            _ => Ok(true),
        }
    }

    async fn copy_part(
        &self,
        to: (&str, &str),
        upload_id: &str,
        part_number: u16,
        from: (&str, &str),
        range: (u64, u64),
    ) -> Result<String> {
        let b = self.signer(to.0)?;
        let source = format!(
            "/{}/{}",
            from.0,
            percent_encoding::utf8_percent_encode(from.1, COPY_SOURCE)
        );
        let bytes = format!("bytes={}-{}", range.0, range.1 - 1);
        let mut action = b.upload_part(Some(&self.creds), to.1, part_number, upload_id);
        action
            .headers_mut()
            .insert("x-amz-copy-source", source.clone());
        action
            .headers_mut()
            .insert("x-amz-copy-source-range", bytes.clone());
        let url = action.sign(OWN_REQUEST);
        let (status, xml) = self
            .send_read(
                reqwest::Method::PUT,
                url,
                &[
                    ("x-amz-copy-source", source),
                    ("x-amz-copy-source-range", bytes),
                ],
                String::new(),
            )
            .await?;
        // <CopyPartResult><ETag>"…"</ETag>…
        let etag = xml
            .split("<ETag>")
            .nth(1)
            .and_then(|r| r.split("</ETag>").next())
            .map(|e| e.replace("&quot;", "\""));
        match (status.is_success(), etag) {
            (true, Some(e)) => Ok(e),
            _ => Err(remote(
                &self.location(),
                format!(
                    "UploadPartCopy of {}/{} into {}/{}: {status}: {}",
                    from.0,
                    from.1,
                    to.0,
                    to.1,
                    s3_message(&xml)
                ),
            )),
        }
    }

    fn partials(&self) -> super::service::Partials {
        super::service::Partials::CopiedParts
    }

    fn presign_binds_length(&self) -> bool {
        true
    }

    fn presign(
        &self,
        bucket: &str,
        key: &str,
        access: Presign,
        expiry: Duration,
    ) -> Result<String> {
        let b = self.signer(bucket)?;
        let url = match access {
            Presign::Read => b.get_object(Some(&self.creds), key).sign(expiry),
            Presign::Upload { size } => {
                // Content-Length is a signed header: a PUT of any other length is refused
                // by the service, so the URL stores exactly what the token allows.
                let mut put = b.put_object(Some(&self.creds), key);
                put.headers_mut().insert("content-length", size.to_string());
                put.sign(expiry)
            }
        };
        Ok(url.to_string())
    }

    fn remote_location(&self, bucket: &str, prefix: &str, read_only: bool) -> RemoteLocation {
        RemoteLocation {
            backend: "s3",
            endpoint: self.cfg.endpoint.clone(),
            region: self.region.clone(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            read_only,
            // Never the volume's own keys: they reach every vfolder (the config refuses
            // hand-out-credentials on s3).
            credentials: None,
        }
    }

    fn fuse_spec(&self, key: String, bucket: &str, read_only: bool) -> MountSpec {
        let mut env = vec![
            ("RCLONE_S3_PROVIDER".into(), "Other".into()),
            ("RCLONE_S3_ENDPOINT".into(), self.cfg.endpoint.clone()),
            ("RCLONE_S3_REGION".into(), self.region.clone()),
            (
                "RCLONE_S3_ACCESS_KEY_ID".into(),
                self.credentials.access_key.clone(),
            ),
            (
                "RCLONE_S3_SECRET_ACCESS_KEY".into(),
                self.credentials.secret_key.clone(),
            ),
            (
                "RCLONE_S3_FORCE_PATH_STYLE".into(),
                self.path_style.to_string(),
            ),
        ];
        if !self.cfg.tls_verify {
            env.push(("RCLONE_NO_CHECK_CERTIFICATE".into(), "true".into()));
        }
        MountSpec::rclone(
            key,
            format!(":s3:{bucket}"),
            env,
            read_only,
            self.cfg.mount_linger,
            self.cfg.mount_pending_grace,
        )
    }

    async fn probe(&self) -> std::result::Result<(), String> {
        // One signed listing of the layout's bucket, or of one that cannot exist: an answer or
        // NoSuchBucket says the service is there and takes our signature.
        let name = match &self.cfg.layout {
            crate::config::object::Layout::PrefixPerVFolder { bucket } => bucket.clone(),
            crate::config::object::Layout::BucketPerVFolder { bucket_prefix } => {
                format!("{bucket_prefix}probe-{}", uuid::Uuid::new_v4().simple())
            }
        };
        let store = self.build(&name).map_err(|e| e.to_string())?;
        let opts = object_store::list::PaginatedListOptions {
            max_keys: Some(1),
            ..Default::default()
        };
        use object_store::list::PaginatedListStore;
        let refused = |said: String| {
            format!("the service refused our signature (wrong access key or secret key?): {said}")
        };
        match store.list_paginated(None, opts).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(
                e @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ) => Err(refused(s3_message(&e.to_string()))),
            Err(e) => {
                let msg = e.to_string();
                if msg.contains("NoSuchBucket") {
                    Ok(())
                } else if msg.contains("403 Forbidden")
                    || [
                        "InvalidAccessKeyId",
                        "SignatureDoesNotMatch",
                        "AccessDenied",
                    ]
                    .iter()
                    .any(|c| msg.contains(c))
                {
                    Err(refused(s3_message(&msg)))
                } else {
                    Err(format!("cannot list: {}", root_cause(&e)))
                }
            }
        }
    }

    async fn completed_from(&self, bucket: &str, key: &str, parts: &[String]) -> Result<bool> {
        let path = object_store::path::Path::parse(key)
            .map_err(|e| VolumeError::BadRequest(format!("{key:?}: {e}")))?;
        let store = self.bucket(bucket)?.store;
        Ok(
            match object_store::ObjectStoreExt::head(&store, &path).await {
                Ok(m) => {
                    let etag = m.e_tag.as_deref().map(|t| t.trim_matches('"'));
                    etag.is_some() && etag == multipart_etag(parts).as_deref()
                }
                Err(_) => false,
            },
        )
    }
}

/// `x-amz-copy-source` is a path: keep '/' and the unreserved characters.
const COPY_SOURCE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The ETag S3 gives an object completed from these parts (the MD5 of their MD5s, then the
/// number of parts), unquoted; None when a part's ETag is not an MD5 (another
/// service, or encryption with KMS).
fn multipart_etag(parts: &[String]) -> Option<String> {
    use md5::Digest;
    let mut all = md5::Md5::new();
    for etag in parts {
        let hex = etag.trim_matches('"');
        if hex.len() != 32 {
            return None;
        }
        for i in (0..32).step_by(2) {
            all.update([u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()?]);
        }
    }
    let digest: String = all.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{digest}-{}", parts.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::object::Layout;

    fn cfg(endpoint: &str, path_style: bool) -> ObjectConfig {
        ObjectConfig {
            endpoint: endpoint.into(),
            service: ServiceConfig::S3 {
                region: "eu-west-1".into(),
                credentials: Credentials {
                    access_key: "k".into(),
                    secret_key: "s".into(),
                },
                path_style,
            },
            tls_verify: true,
            layout: Layout::BucketPerVFolder {
                bucket_prefix: "p-".into(),
            },
            part_size: 8 << 20,
            parts_in_flight: 4,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            rescan_interval: Duration::ZERO,
            hand_out_credentials: false,
            credential_expiry: Duration::from_secs(60),
            presign: false,
            presign_max_expiry: Duration::from_secs(60),
            capacity: 1,
            mount_linger: Duration::ZERO,
            mount_pending_grace: Duration::ZERO,
        }
    }

    #[test]
    fn virtual_hosted_style_puts_the_bucket_in_the_host() {
        let s = S3::new(&cfg("https://s3.eu-west-1.amazonaws.com", false)).unwrap();
        assert_eq!(
            s.bucket_endpoint("data"),
            "https://data.s3.eu-west-1.amazonaws.com"
        );
        let s = S3::new(&cfg("http://minio:9000", true)).unwrap();
        assert_eq!(s.bucket_endpoint("data"), "http://minio:9000");
        let url = s
            .presign("data", "a b/c.txt", Presign::Read, Duration::from_secs(60))
            .unwrap();
        assert!(
            url.starts_with("http://minio:9000/data/a%20b/c.txt?"),
            "{url}"
        );
        assert!(url.contains("X-Amz-Signature="), "{url}");
    }

    #[test]
    fn error_documents_are_summarized() {
        let xml = "<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>";
        assert_eq!(s3_message(xml), "NoSuchKey: gone");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(root_cause(&io), "Connection refused");
    }

    #[test]
    fn a_multipart_etag_is_the_md5_of_the_parts_md5s_and_their_count() {
        let parts = [
            "\"0cc175b9c0f1b6a831c399e269772661\"".to_string(), // md5("a")
            "92eb5ffee6ae2fec3ad71c777531578f".to_string(),     // md5("b")
        ];
        assert_eq!(
            multipart_etag(&parts).as_deref(),
            Some("96e024ba2074fe77e8e965ba43a704be-2")
        );
        assert_eq!(multipart_etag(&["AAAAAA==".to_string()]), None);
    }
}
