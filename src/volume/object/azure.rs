//! Azure Blob Storage (and Azurite). Data goes through object_store (blocks staged with Put
//! Block and committed with Put Block List, so an upload resumes by nature); container
//! create/delete/properties and `dir/` marker blobs are plain REST calls authorized with an
//! account SAS we sign (`sas.rs`), as are the SAS URLs handed to users and session mounts.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::Utc;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use reqwest::Url;

use super::sas::{self, Access};
use super::service::{BucketClient, BucketClients, Service, remote};
use crate::config::object::{AzureAuth, ObjectConfig, ServiceConfig};
use crate::volume::mounts::MountSpec;
use crate::volume::{Presign, RemoteLocation, Result, VolumeError};

/// How long our own requests' signatures stay valid (they are used at once).
const OWN_REQUEST: Duration = Duration::from_secs(300);
/// How long a session mount's SAS lives: mounts are long-lived, and are made again (with a new
/// SAS) after their linger.
/// The longest a presigned upload URL lives (it cannot bind the upload's length).
const UPLOAD_SAS: Duration = Duration::from_secs(15 * 60);

const MOUNT_SAS: Duration = Duration::from_secs(30 * 86400);

pub struct Azure {
    cfg: ObjectConfig,
    account: String,
    auth: AzureAuth,
    http: reqwest::Client,
    clients: BucketClients,
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Azure's error document: `<Code>` and `<Message>`.
fn azure_message(xml: &str) -> String {
    let tag = |t: &str| {
        xml.split(&format!("<{t}>"))
            .nth(1)
            .and_then(|r| r.split(&format!("</{t}>")).next())
            .map(|s| s.lines().next().unwrap_or("").to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => xml.chars().take(200).collect(),
    }
}

impl Azure {
    pub fn new(cfg: &ObjectConfig) -> Result<Self> {
        let ServiceConfig::Azure { account, auth } = &cfg.service else {
            return Err(VolumeError::Internal("not an Azure volume".into()));
        };
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .danger_accept_invalid_certs(!cfg.tls_verify)
            .build()
            .map_err(|e| VolumeError::Internal(format!("HTTP client: {e}")))?;
        Ok(Azure {
            cfg: cfg.clone(),
            account: account.clone(),
            auth: auth.clone(),
            http,
            clients: BucketClients::default(),
        })
    }

    /// The SAS our own requests carry: signed now with the key, or the configured one.
    fn own_sas(&self) -> Result<String> {
        match &self.auth {
            AzureAuth::Key(k) => {
                let expiry = Utc::now() + OWN_REQUEST;
                sas::account_sas(&self.account, k, expiry).map_err(VolumeError::Internal)
            }
            AzureAuth::Sas(s) => Ok(s.clone()),
        }
    }

    /// `<endpoint>/<container>[/<blob>]?<extra>&<sas>`.
    fn url(&self, container: &str, blob: Option<&str>, extra: &str) -> Result<Url> {
        let mut u: Url = self
            .cfg
            .endpoint
            .parse()
            .map_err(|e| VolumeError::Internal(format!("endpoint: {e}")))?;
        {
            let mut segs = u
                .path_segments_mut()
                .map_err(|_| VolumeError::Internal("endpoint cannot be a base".into()))?;
            segs.pop_if_empty().push(container);
            if let Some(b) = blob {
                // A marker's trailing '/' is part of its name: an empty last segment keeps it.
                segs.extend(b.split('/'));
            }
        }
        let sas = self.own_sas()?;
        u.set_query(Some(&match extra {
            "" => sas,
            e => format!("{e}&{sas}"),
        }));
        Ok(u)
    }

    /// Sends one of our own requests; 2xx and the statuses in `fine` are answers, anything else
    /// an error with the service's message.
    async fn send(
        &self,
        method: reqwest::Method,
        url: Url,
        headers: &[(&str, &str)],
        fine: &[u16],
    ) -> Result<u16> {
        let what = format!("{method} {}", url.path());
        let mut req = self
            .http
            .request(method, url)
            .header("x-ms-version", sas::VERSION)
            .header(reqwest::header::CONTENT_LENGTH, 0);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| remote(&self.location(), format!("{what}: {}", root_cause(&e))))?;
        let status = resp.status().as_u16();
        if resp.status().is_success() || fine.contains(&status) {
            return Ok(status);
        }
        let text = resp.text().await.unwrap_or_default();
        Err(remote(
            &self.location(),
            format!("{what}: {status}: {}", azure_message(&text)),
        ))
    }

    fn build(&self, container: &str) -> Result<object_store::azure::MicrosoftAzure> {
        let options = ClientOptions::new()
            .with_timeout(self.cfg.request_timeout)
            .with_connect_timeout(self.cfg.connect_timeout)
            .with_allow_http(self.cfg.endpoint.starts_with("http://"))
            .with_allow_invalid_certificates(!self.cfg.tls_verify);
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: self.cfg.request_timeout,
        };
        let b = MicrosoftAzureBuilder::new()
            .with_account(&self.account)
            .with_container_name(container)
            .with_endpoint(self.cfg.endpoint.clone())
            .with_allow_http(self.cfg.endpoint.starts_with("http://"))
            .with_client_options(options)
            .with_retry(retry);
        let b = match &self.auth {
            AzureAuth::Key(k) => b.with_access_key(k),
            AzureAuth::Sas(s) => b.with_sas_authorization(
                form_urlencoded::parse(s.as_bytes())
                    .into_owned()
                    .collect::<Vec<_>>(),
            ),
        };
        b.build()
            .map_err(|e| VolumeError::Internal(format!("Azure client for {container}: {e}")))
    }

    /// A SAS for one container (or blob), when we hold the key that signs it.
    fn user_sas(
        &self,
        container: &str,
        blob: Option<&str>,
        access: Access,
        ttl: Duration,
    ) -> Result<String> {
        match &self.auth {
            AzureAuth::Key(k) => {
                sas::service_sas(&self.account, k, container, blob, access, Utc::now() + ttl)
                    .map_err(VolumeError::Internal)
            }
            AzureAuth::Sas(_) => Err(VolumeError::BadRequest(
                "this volume is configured with an account SAS, not a key: it cannot sign SAS for vfolders".into(),
            )),
        }
    }
}

#[async_trait]
impl Service for Azure {
    fn kind(&self) -> &'static str {
        "azure-blob"
    }

    fn location(&self) -> String {
        self.cfg.location()
    }

    fn bucket(&self, name: &str) -> Result<BucketClient> {
        self.clients.get(name, || self.build(name))
    }

    async fn create_bucket(&self, name: &str) -> Result<bool> {
        let url = self.url(name, None, "restype=container")?;
        let status = self.send(reqwest::Method::PUT, url, &[], &[409]).await?;
        Ok(status != 409)
    }

    async fn delete_bucket(&self, name: &str) -> Result<()> {
        self.clients.forget(name);
        let url = self.url(name, None, "restype=container")?;
        self.send(reqwest::Method::DELETE, url, &[], &[404])
            .await
            .map(|_| ())
    }

    async fn bucket_exists(&self, name: &str) -> Result<bool> {
        let url = self.url(name, None, "restype=container")?;
        Ok(self.send(reqwest::Method::HEAD, url, &[], &[404]).await? != 404)
    }

    async fn put_dir_marker(&self, bucket: &str, key: &str) -> Result<()> {
        let url = self.url(bucket, Some(key), "")?;
        self.send(
            reqwest::Method::PUT,
            url,
            &[("x-ms-blob-type", "BlockBlob")],
            &[],
        )
        .await
        .map(|_| ())
    }

    async fn dir_marker_exists(&self, bucket: &str, key: &str) -> Result<bool> {
        let url = self.url(bucket, Some(key), "")?;
        Ok(self.send(reqwest::Method::HEAD, url, &[], &[404]).await? != 404)
    }

    async fn delete_dir_marker(&self, bucket: &str, key: &str) -> Result<()> {
        let url = self.url(bucket, Some(key), "")?;
        self.send(reqwest::Method::DELETE, url, &[], &[404])
            .await
            .map(|_| ())
    }

    async fn copy_across(
        &self,
        _from: (&str, &str),
        _to: (&str, &str),
        _size: u64,
    ) -> Result<bool> {
        // Copies between containers go through us, part by part (Azure's copy-from-URL would
        // need the source readable by URL, a SAS of its own).
        Ok(false)
    }

    fn partials(&self) -> super::service::Partials {
        super::service::Partials::BlocksOfTheBlob
    }

    fn presign_binds_length(&self) -> bool {
        false
    }

    fn presign(
        &self,
        bucket: &str,
        key: &str,
        access: Presign,
        expiry: Duration,
    ) -> Result<String> {
        // A blob SAS cannot bind a length: an upload gets create-only (one Put Blob of a blob
        // that does not exist yet; no blocks, no overwrite, no copy) for at most UPLOAD_SAS.
        let (access, expiry) = match access {
            Presign::Read => (Access::Read, expiry),
            Presign::Upload { .. } => (Access::Create, expiry.min(UPLOAD_SAS)),
        };
        let q = self.user_sas(bucket, Some(key), access, expiry)?;
        let mut u = self.url(bucket, Some(key), "")?;
        u.set_query(Some(&q));
        Ok(u.to_string())
    }

    fn container_sas(&self, bucket: &str, write: bool, expiry: Duration) -> Result<Option<String>> {
        let access = if write {
            Access::ReadWrite
        } else {
            Access::Read
        };
        let q = self.user_sas(bucket, None, access, expiry)?;
        let mut u = self.url(bucket, None, "")?;
        u.set_query(Some(&q));
        Ok(Some(u.to_string()))
    }

    fn remote_location(&self, bucket: &str, prefix: &str, read_only: bool) -> RemoteLocation {
        // What an agent gets to mount it: a SAS for this container (= this vfolder: the config
        // refuses the shared-container layout) in the vfolder's mode, never the key.
        let credentials = self
            .cfg
            .hand_out_credentials
            .then(|| {
                self.container_sas(bucket, !read_only, self.cfg.credential_expiry)
                    .ok()
                    .flatten()
                    .map(|url| vec![("account", self.account.clone()), ("sas_url", url)])
            })
            .flatten();
        RemoteLocation {
            backend: "azure-blob",
            endpoint: self.cfg.endpoint.clone(),
            region: String::new(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            read_only,
            credentials,
        }
    }

    fn fuse_spec(&self, key: String, bucket: &str, read_only: bool) -> MountSpec {
        // A SAS for this container with this mode where we can sign one; else the account SAS.
        let sas_url = match self.container_sas(bucket, !read_only, MOUNT_SAS) {
            Ok(Some(u)) => u,
            _ => {
                let sas = match &self.auth {
                    AzureAuth::Sas(s) => s.clone(),
                    AzureAuth::Key(_) => String::new(),
                };
                format!("{}?{sas}", self.cfg.endpoint)
            }
        };
        let mut env = vec![("RCLONE_AZUREBLOB_SAS_URL".to_string(), sas_url)];
        if !self.cfg.tls_verify {
            env.push(("RCLONE_NO_CHECK_CERTIFICATE".into(), "true".into()));
        }
        MountSpec::rclone(
            key,
            format!(":azureblob:{bucket}"),
            env,
            read_only,
            self.cfg.mount_linger,
            self.cfg.mount_pending_grace,
        )
    }

    async fn probe(&self) -> std::result::Result<(), String> {
        // One signed listing of containers: an answer says the service is there and takes us.
        let mut u: Url = self
            .cfg
            .endpoint
            .parse()
            .map_err(|e| format!("endpoint: {e}"))?;
        let sas = self.own_sas().map_err(|e| e.to_string())?;
        u.set_query(Some(&format!("comp=list&maxresults=1&{sas}")));
        let resp = self
            .http
            .get(u)
            .header("x-ms-version", sas::VERSION)
            .send()
            .await
            .map_err(|e| format!("cannot list: {}", root_cause(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let said = azure_message(&resp.text().await.unwrap_or_default());
        if status == reqwest::StatusCode::FORBIDDEN {
            return Err(format!(
                "{status}: the service refused our signature (wrong account key or SAS?): {said}"
            ));
        }
        Err(format!("{status}: {said}"))
    }

    async fn completed_from(&self, bucket: &str, key: &str, parts: &[String]) -> Result<bool> {
        // The blob's committed blocks, by id (base64 of object_store's content ids).
        let url = self.url(bucket, Some(key), "comp=blocklist&blocklisttype=committed")?;
        let what = format!("GET {} (block list)", url.path());
        let resp = self
            .http
            .get(url)
            .header("x-ms-version", sas::VERSION)
            .send()
            .await
            .map_err(|e| remote(&self.location(), format!("{what}: {}", root_cause(&e))))?;
        if !resp.status().is_success() {
            return Ok(false);
        }
        let xml = resp
            .text()
            .await
            .map_err(|e| remote(&self.location(), format!("{what}: {}", root_cause(&e))))?;
        let committed: Vec<&str> = xml
            .split("<Name>")
            .skip(1)
            .filter_map(|r| r.split("</Name>").next())
            .collect();
        let ours: Vec<String> = parts.iter().map(|p| B64.encode(p)).collect();
        Ok(!ours.is_empty() && committed == ours)
    }
}
