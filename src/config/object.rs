//! `[volume.<name>]` keys of object-store backends (`s3`, `azure-blob`): where the service is,
//! how to sign, and how vfolders map onto buckets (containers).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::reader::Section;

/// Access key and secret. Never printed: Debug shows the key id only.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <secret>)", self.access_key)
    }
}

/// Azure's shared key, or an account SAS (the query string, without '?').
#[derive(Clone)]
pub enum AzureAuth {
    Key(String),
    Sas(String),
}

impl fmt::Debug for AzureAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AzureAuth::Key(_) => "AzureAuth::Key(<secret>)",
            AzureAuth::Sas(_) => "AzureAuth::Sas(<secret>)",
        })
    }
}

/// What differs between the services.
#[derive(Debug, Clone)]
pub enum ServiceConfig {
    S3 {
        region: String,
        credentials: Credentials,
        /// Path-style (`endpoint/bucket/key`) or virtual-hosted (`bucket.endpoint/key`) URLs.
        path_style: bool,
    },
    Azure {
        account: String,
        auth: AzureAuth,
    },
}

impl ObjectConfig {
    /// Where the volume's data is, for `/volumes` and logs (never with credentials).
    pub fn location(&self) -> String {
        match &self.layout {
            Layout::PrefixPerVFolder { bucket } => format!("{}/{bucket}", self.endpoint),
            Layout::BucketPerVFolder { bucket_prefix } => {
                format!("{}/{bucket_prefix}*", self.endpoint)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Each vfolder is a bucket `<bucket-prefix><vfolder uuid hex>` (the S3 proposal's choice).
    BucketPerVFolder { bucket_prefix: String },
    /// Each vfolder is the prefix `<quota scope hex>/<vfolder hex>/` in one bucket.
    PrefixPerVFolder { bucket: String },
}

#[derive(Debug, Clone)]
pub struct ObjectConfig {
    /// The service's URL: the S3 endpoint, or Azure's account URL.
    pub endpoint: String,
    pub service: ServiceConfig,
    pub tls_verify: bool,
    pub layout: Layout,
    /// Size of each part of a multipart upload.
    pub part_size: u64,
    /// Parts of one PATCH on their way up at once. A tus upload holds at most this many parts
    /// plus the one being filled on local disk (and this many in memory while they are sent).
    pub parts_in_flight: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// How often usage counters are recounted from a listing (objects change behind our back).
    pub rescan_interval: Duration,
    /// `/folder/mount` includes a credential scoped to the one vfolder and its mode (compute
    /// agents mount it themselves). Only where one can be made: see `unscopable_credentials`.
    pub hand_out_credentials: bool,
    /// The lifetime of a handed-out credential (apart from presigned URLs').
    pub credential_expiry: Duration,
    /// Token routes may answer with presigned URLs straight to the service.
    pub presign: bool,
    /// The longest a presigned URL (or SAS) lives.
    pub presign_max_expiry: Duration,
    /// What `/folder/fs-usage` reports as capacity (object stores have no fixed size).
    pub capacity: u64,
    /// Session mounts (FUSE) stay this long after their last user, so churn does not remount.
    pub mount_linger: Duration,
    /// How long after its linger a session mount waits for rclone's failing uploads before it
    /// sets the unsaved files aside and goes (security review 2, G8).
    pub mount_pending_grace: Duration,
}

pub const MIN_PART: u64 = 5 << 20;
/// The default `mount-pending-grace`: rclone retries a failed upload with backoff, and an
/// outage of the service this long is not a blip.
pub const PENDING_GRACE: Duration = Duration::from_secs(15 * 60);
pub const MAX_PART: u64 = 5 << 30;

/// Reads the object-store keys of a volume table; `None` (with problems pushed) when unusable.
pub fn read(sec: &Section, backend: &str) -> Option<ObjectConfig> {
    let azure = backend == "azure-blob";
    let endpoint = sec.opt_string("endpoint");
    if let Some(e) = &endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        sec.problems().push(
            sec.key_path("endpoint"),
            format!("{e:?}"),
            "an http:// or https:// URL of the service",
        );
    }
    let (service, endpoint) = if azure {
        let account = sec.opt_string("account");
        let Some(account) = account.filter(|a| {
            (3..=24).contains(&a.len())
                && a.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        }) else {
            sec.problems().push(
                sec.key_path("account"),
                "missing or invalid",
                "the storage account name (3-24 lowercase letters and digits)",
            );
            return None;
        };
        let auth = read_azure_auth(sec)?;
        let endpoint =
            endpoint.unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
        (ServiceConfig::Azure { account, auth }, endpoint)
    } else {
        let region = sec.string("region", "us-east-1");
        // AWS itself is virtual-hosted; anything named by URL is most likely path-style (MinIO,
        // Ceph RGW, moto).
        let default_addressing = if endpoint.is_some() {
            "path"
        } else {
            "virtual-hosted"
        };
        let addressing = sec.choice(
            "addressing",
            &["path", "virtual-hosted"],
            default_addressing,
        );
        let credentials = read_credentials(sec)?;
        let endpoint = endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        (
            ServiceConfig::S3 {
                region,
                credentials,
                path_style: addressing == "path",
            },
            endpoint,
        )
    };
    // The same choice under each service's own words: buckets, or containers.
    let noun = if azure { "container" } else { "bucket" };
    let per_vfolder = format!("{noun}-per-vfolder");
    let layout = match sec
        .choice(
            "layout",
            &[per_vfolder.as_str(), "prefix-per-vfolder"],
            &per_vfolder,
        )
        .as_str()
    {
        "prefix-per-vfolder" => match sec.opt_string(noun) {
            Some(b) if valid_bucket(&b) => Layout::PrefixPerVFolder { bucket: b },
            other => {
                sec.problems().push(
                    sec.key_path(noun),
                    other.map_or("missing".into(), |b| format!("{b:?}")),
                    format!("the {noun} that holds every vfolder (3-63 of a-z, 0-9, '-', '.')"),
                );
                return None;
            }
        },
        _ => {
            let key = format!("{noun}-prefix");
            let prefix = sec.string(&key, "");
            if prefix.len() > 31
                || !prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                sec.problems().push(
                    sec.key_path(&key),
                    format!("{prefix:?}"),
                    format!("at most 31 of a-z, 0-9 and '-' ({noun} names are the prefix and 32 hex digits)"),
                );
            }
            Layout::BucketPerVFolder {
                bucket_prefix: prefix,
            }
        }
    };
    let part_size = sec.size("part-size", 8 << 20);
    if !(MIN_PART..=MAX_PART).contains(&part_size) {
        sec.problems().push(
            sec.key_path("part-size"),
            part_size.to_string(),
            "5m to 5g (S3's limits for a part; Azure blocks fit in them too)",
        );
    }
    let hand_out_credentials = sec.bool("hand-out-credentials", false);
    if hand_out_credentials && let Some(why) = unscopable_credentials(&service, &layout) {
        sec.problems()
            .push(sec.key_path("hand-out-credentials"), "true", why);
    }
    let credential_expiry = sec.duration("credential-expiry", Duration::from_secs(86400));
    if credential_expiry > Duration::from_secs(7 * 86400) || credential_expiry.is_zero() {
        sec.problems().push(
            sec.key_path("credential-expiry"),
            format!("{credential_expiry:?}"),
            "1s to 7d (Azure's longest user delegation)",
        );
    }
    Some(ObjectConfig {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        service,
        tls_verify: sec.bool("tls-verify", true),
        layout,
        part_size,
        parts_in_flight: sec.int_in("parts-in-flight", 1, 64, 4) as usize,
        connect_timeout: sec.duration("connect-timeout", Duration::from_secs(5)),
        request_timeout: sec.duration("request-timeout", Duration::from_secs(60)),
        rescan_interval: sec.duration("rescan-interval", Duration::from_secs(3600)),
        hand_out_credentials,
        credential_expiry,
        presign: sec.bool("presign", false),
        presign_max_expiry: sec.duration(
            "presign-max-expiry",
            Duration::from_secs(if azure { 7 * 86400 } else { 3600 }),
        ),
        capacity: sec.size("capacity", 1 << 50),
        mount_linger: sec.duration("mount-linger", Duration::from_secs(60)),
        mount_pending_grace: sec.duration("mount-pending-grace", PENDING_GRACE),
    })
}

/// Why `hand-out-credentials` cannot be honoured with this service and layout (security review
/// 2, G1): what an agent gets must reach the one vfolder and nothing else, read-only when the
/// vfolder is. A container SAS signed with the account key is exactly that when a vfolder is a
/// container; nothing we can sign is, on a shared container or with S3's keys.
fn unscopable_credentials(service: &ServiceConfig, layout: &Layout) -> Option<&'static str> {
    match (service, layout) {
        (ServiceConfig::S3 { .. }, _) => Some(
            "false on s3: the only keys we hold are the volume's own, which reach every vfolder \
             and bucket and ignore read-only; sessions mount through storage-agent and clients \
             use presigned URLs instead",
        ),
        (ServiceConfig::Azure { .. }, Layout::PrefixPerVFolder { .. }) => Some(
            "false with layout = \"prefix-per-vfolder\": a SAS is scoped to a container at the \
             narrowest, and that container holds every vfolder (use bucket-per-vfolder)",
        ),
        (
            ServiceConfig::Azure {
                auth: AzureAuth::Sas(_),
                ..
            },
            _,
        ) => Some(
            "false with an account sas: a container SAS is signed with the account key \
             (account-key)",
        ),
        (ServiceConfig::Azure { .. }, Layout::BucketPerVFolder { .. }) => None,
    }
}

/// An account key (base64), or an account SAS, inline or in `AZURE_STORAGE_KEY`.
fn read_azure_auth(sec: &Section) -> Option<AzureAuth> {
    let key = sec
        .opt_string("account-key")
        .or_else(|| std::env::var("AZURE_STORAGE_KEY").ok());
    let sas = sec.opt_string("sas");
    match (key, sas) {
        (Some(k), None) => {
            use base64::Engine;
            if base64::engine::general_purpose::STANDARD
                .decode(&k)
                .is_err()
            {
                sec.problems().push(
                    sec.key_path("account-key"),
                    "not base64",
                    "the storage account's key, as the portal shows it",
                );
                return None;
            }
            Some(AzureAuth::Key(k))
        }
        (None, Some(s)) => Some(AzureAuth::Sas(s.trim_start_matches('?').to_string())),
        (Some(_), Some(_)) => {
            sec.problems().push(
                sec.key_path("sas"),
                "both account-key and sas",
                "one of account-key and sas",
            );
            None
        }
        (None, None) => {
            sec.problems().push(
                sec.key_path("account-key"),
                "missing",
                "account-key (or AZURE_STORAGE_KEY in the environment), or an account sas",
            );
            None
        }
    }
}

/// S3 bucket naming rules (the subset every S3-compatible service accepts).
pub fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Inline keys, else a credentials file (AWS's INI format, `profile`), else the environment.
fn read_credentials(sec: &Section) -> Option<Credentials> {
    let inline = (sec.opt_string("access-key"), sec.opt_string("secret-key"));
    let file = sec.opt_path("credentials-file");
    let profile = sec.string("profile", "default");
    match inline {
        (Some(access_key), Some(secret_key)) => {
            return Some(Credentials {
                access_key,
                secret_key,
            });
        }
        (Some(_), None) | (None, Some(_)) => {
            sec.problems().push(
                sec.key_path("access-key"),
                "only one of access-key and secret-key",
                "both, or neither (then credentials-file or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
            );
            return None;
        }
        (None, None) => {}
    }
    if let Some(path) = file {
        return match from_file(&path, &profile) {
            Ok(c) => Some(c),
            Err(why) => {
                sec.problems().push(
                    sec.key_path("credentials-file"),
                    format!("{} ({why})", path.display()),
                    "a readable AWS credentials file with aws_access_key_id and aws_secret_access_key",
                );
                None
            }
        };
    }
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(access_key), Ok(secret_key)) => Some(Credentials {
            access_key,
            secret_key,
        }),
        _ => {
            sec.problems().push(
                sec.key_path("access-key"),
                "missing",
                "access-key and secret-key, credentials-file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment",
            );
            None
        }
    }
}

/// `[profile]` sections with `aws_access_key_id` / `aws_secret_access_key`, as the AWS CLI
/// writes them.
fn from_file(path: &Path, profile: &str) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let (mut section, mut key, mut secret) = (String::new(), None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().trim_start_matches("profile ").to_string();
            continue;
        }
        if section != profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => key = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    match (key, secret) {
        (Some(access_key), Some(secret_key)) => Ok(Credentials {
            access_key,
            secret_key,
        }),
        _ => Err(format!("no complete [{profile}] profile")),
    }
}

/// Where the daemon keeps what an object-store volume needs locally (multipart part buffers).
pub fn local_dir(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("objects").join(volume)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_files_are_read_by_profile() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("creds");
        std::fs::write(
            &p,
            "[default]\naws_access_key_id = AK1\naws_secret_access_key = S1\n\n[profile other]\naws_access_key_id=AK2\naws_secret_access_key=S2\n",
        )
        .unwrap();
        let c = from_file(&p, "default").unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.secret_key.as_str()),
            ("AK1", "S1")
        );
        let c = from_file(&p, "other").unwrap();
        assert_eq!(c.access_key, "AK2");
        assert!(from_file(&p, "missing").is_err());
        assert!(
            !format!("{c:?}").contains("S2"),
            "secrets are never printed"
        );
    }

    #[test]
    fn bucket_names() {
        assert!(valid_bucket("bai-0123"));
        assert!(!valid_bucket("ab"));
        assert!(!valid_bucket("Upper"));
        assert!(!valid_bucket("-lead"));
    }
}
