//! Client-API tokens: HS256 JWTs signed with `[storage-proxy] secret`, with Backend.AI's exact
//! claim names. The manager never holds the key; it asks the manager API to mint one and hands it
//! to the user, and the client API checks signature, expiry and claims.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::VFolderId;
use crate::volume::RelPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownloadOp {
    #[serde(rename = "download")]
    Download,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadOp {
    #[serde(rename = "upload")]
    Upload,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadClaims {
    pub op: DownloadOp,
    pub volume: String,
    pub vfid: VFolderId,
    pub relpath: RelPath,
    pub exp: i64,
    /// Accepted when present (Backend.AI's validator allows them), never minted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub archive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmanaged_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadClaims {
    pub op: UploadOp,
    pub volume: String,
    pub vfid: VFolderId,
    pub relpath: RelPath,
    pub size: u64,
    pub session: String,
    pub exp: i64,
}

/// The archive token uses different key names (`operation`, `virtual_folder_id`), as in 26.3+.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveClaims {
    pub operation: DownloadOp,
    pub volume: String,
    pub virtual_folder_id: VFolderId,
    pub files: Vec<String>,
    pub filename: Option<String>,
    pub exp: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot decode the given value as JWT: {0}")]
    Malformed(String),
    #[error("cannot decode the given value as JWT: Signature verification failed")]
    BadSignature,
    #[error("cannot decode the given value as JWT: Signature has expired")]
    Expired(serde_json::Value),
    #[error("invalid token payload: {0}")]
    Claims(String),
}

#[derive(Clone)]
pub struct Tokens {
    enc: EncodingKey,
    dec: DecodingKey,
    pub ttl: Duration,
}

impl Tokens {
    pub fn new(secret: &str, ttl: Duration) -> Self {
        Tokens {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            ttl,
        }
    }

    pub fn expiry(&self) -> i64 {
        crate::state::now_unix() + self.ttl.as_secs() as i64
    }

    pub fn mint<T: Serialize>(&self, claims: &T) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.enc)
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }

    /// Verifies the signature, then the expiry (checked here so an expired but genuine token can
    /// be told apart from a forged one), then the claims' shape.
    pub fn decode<T: DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &self.dec, &v).map_err(|e| match e
                .kind()
            {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed(e.to_string()),
            })?;
        let claims = data.claims;
        let exp = claims.get("exp").and_then(serde_json::Value::as_i64);
        match exp {
            None => return Err(TokenError::Claims("exp is required".into())),
            Some(exp) if exp <= crate::state::now_unix() => {
                return Err(TokenError::Expired(claims));
            }
            Some(_) => {}
        }
        serde_json::from_value(claims).map_err(|e| TokenError::Claims(e.to_string()))
    }
}

/// Refuses an upload whose destination can never be written: the vfolder is missing, a parent
/// is a file or a symlink leading outside, or the destination is a directory. Checked again at
/// completion, since the tree may change meanwhile.
pub async fn check_upload_destination(
    v: &dyn crate::volume::Volume,
    vfid: &crate::ids::VFolderId,
    dst: &crate::volume::RelPath,
) -> super::error::ApiResult<()> {
    Ok(v.check_file_destination(vfid, dst).await?)
}

/// Backend.AI's rules for the archive's file name.
pub fn check_archive_filename(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() || name.chars().count() > 255 {
        return Err("must be 1 to 255 characters");
    }
    if name == "." || name == ".." {
        return Err("must not be '.' or '..'");
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err("must not contain control characters, '/' or '\\'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> UploadClaims {
        UploadClaims {
            op: UploadOp::Upload,
            volume: "v".into(),
            vfid: VFolderId::parse(
                "user:550e8400-e29b-41d4-a716-446655440000/0123456789abcdef0123456789abcdef",
            )
            .unwrap(),
            relpath: RelPath::parse("a/b.txt").unwrap(),
            size: 3,
            session: "00".repeat(16),
            exp,
        }
    }

    #[test]
    fn round_trip_and_failures() {
        let t = Tokens::new("secret-secret-secret", Duration::from_secs(60));
        let tok = t.mint(&claims(t.expiry())).unwrap();
        let back: UploadClaims = t.decode(&tok).unwrap();
        assert_eq!(back.relpath.as_str(), "a/b.txt");
        // An upload token is not a download token.
        assert!(matches!(
            t.decode::<DownloadClaims>(&tok),
            Err(TokenError::Claims(_))
        ));
        let other = Tokens::new("another-secret-xx", Duration::from_secs(60));
        assert!(matches!(
            other.decode::<UploadClaims>(&tok),
            Err(TokenError::BadSignature)
        ));
        let old = t.mint(&claims(crate::state::now_unix() - 5)).unwrap();
        assert!(matches!(
            t.decode::<UploadClaims>(&old),
            Err(TokenError::Expired(_))
        ));
        assert!(matches!(
            t.decode::<UploadClaims>("garbage"),
            Err(TokenError::Malformed(_))
        ));
        // The wire claim names are Backend.AI's.
        let payload: serde_json::Value = serde_json::to_value(claims(1)).unwrap();
        for k in ["op", "volume", "vfid", "relpath", "size", "session", "exp"] {
            assert!(payload.get(k).is_some(), "{k}");
        }
    }
}
