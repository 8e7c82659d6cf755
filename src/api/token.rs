//! Client-API tokens: HS256 JWTs signed with `[storage-proxy] secret`, with Backend.AI's exact
//! claim names. The manager never holds the key; it asks the manager API to mint one and hands it
//! to the user, and the client API checks signature, expiry and claims.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    verified: Arc<Verified>,
    pub ttl: Duration,
}

/// Tokens already verified, with their claims: a player fetching a file in hundreds of ranges
/// sends the same token each time, and checking its HMAC and parsing its JSON again was a tenth
/// of a range's CPU (bench/ANALYSIS.md). Only byte-identical tokens hit, so a hit is exactly as
/// genuine as the first check; the expiry is checked again on every use.
#[derive(Default)]
struct Verified {
    entries: Mutex<HashMap<Box<str>, Remembered>>,
}

/// A verified token's expiry and its claims (of whichever type it was decoded as).
type Remembered = (i64, Arc<dyn Any + Send + Sync>);

/// Tokens remembered at most. Past it, the expired go first, and if that frees less than a
/// quarter, all of them (a token is only verified again, never refused, by being forgotten;
/// and a full map of live tokens is not scanned again for every new one).
const VERIFIED_CAP: usize = 4096;

/// Longer tokens are verified every time and never remembered: with the claims they carry,
/// 4096 entries then stay under ~16 MiB. Download and upload tokens are a few hundred bytes;
/// an archive token can list thousands of files and is used once anyway.
const VERIFIED_MAX_LEN: usize = 2048;

impl Verified {
    fn get<T: Clone + 'static>(&self, token: &str, now: i64) -> Option<T> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(token) {
            Some((exp, claims)) if *exp > now => claims.downcast_ref::<T>().cloned(),
            _ => None,
        }
    }

    fn put<T: Send + Sync + 'static>(&self, token: &str, exp: i64, claims: T, now: i64) {
        if token.len() > VERIFIED_MAX_LEN {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= VERIFIED_CAP {
            entries.retain(|_, (exp, _)| *exp > now);
            if entries.len() > VERIFIED_CAP / 4 * 3 {
                entries.clear();
            }
        }
        entries.insert(token.into(), (exp, Arc::new(claims)));
    }
}

impl Tokens {
    pub fn new(secret: &str, ttl: Duration) -> Self {
        Tokens {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            verified: Arc::default(),
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
    /// be told apart from a forged one), then the claims' shape; a token verified before as the
    /// same claims and not expired since is answered from memory.
    pub fn decode<T>(&self, token: &str) -> Result<T, TokenError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let now = crate::state::now_unix();
        if let Some(claims) = self.verified.get::<T>(token, now) {
            return Ok(claims);
        }
        let (exp, claims) = self.verify::<T>(token, now)?;
        self.verified.put(token, exp, claims.clone(), now);
        Ok(claims)
    }

    fn verify<T: DeserializeOwned>(&self, token: &str, now: i64) -> Result<(i64, T), TokenError> {
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
        let exp = match claims.get("exp").and_then(serde_json::Value::as_i64) {
            None => return Err(TokenError::Claims("exp is required".into())),
            Some(exp) if exp <= now => return Err(TokenError::Expired(claims)),
            Some(exp) => exp,
        };
        let claims =
            serde_json::from_value(claims).map_err(|e| TokenError::Claims(e.to_string()))?;
        Ok((exp, claims))
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
        // Verified once, then answered from memory: still refused as another kind of token.
        assert_eq!(t.verified.entries.lock().unwrap().len(), 1);
        let again: UploadClaims = t.decode(&tok).unwrap();
        assert_eq!(again.session, back.session);
        assert!(matches!(
            t.decode::<DownloadClaims>(&tok),
            Err(TokenError::Claims(_))
        ));
        // The wire claim names are Backend.AI's.
        let payload: serde_json::Value = serde_json::to_value(claims(1)).unwrap();
        for k in ["op", "volume", "vfid", "relpath", "size", "session", "exp"] {
            assert!(payload.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn remembered_tokens_expire_and_stay_bounded() {
        let v = Verified::default();
        v.put("a", 100, 7u32, 50);
        assert_eq!(v.get::<u32>("a", 99), Some(7));
        assert_eq!(v.get::<u32>("a", 100), None, "expired at exp");
        assert_eq!(v.get::<u64>("a", 50), None, "another claims type");
        assert_eq!(v.get::<u32>("b", 50), None);
        // Full: the expired go first, the live stay.
        for i in 0..VERIFIED_CAP - 1 {
            v.put(&format!("old{i}"), 60, 0u32, 50);
        }
        v.put("new", 200, 1u32, 70);
        assert_eq!(v.entries.lock().unwrap().len(), 2);
        assert_eq!(v.get::<u32>("a", 70), Some(7));
        // Full of live ones: all are forgotten (verified again at their next use).
        for i in 0..VERIFIED_CAP {
            v.put(&format!("live{i}"), 300, 0u32, 70);
        }
        // Cleared when live4094 came (the map held a, new and live0..=live4093).
        assert_eq!(v.entries.lock().unwrap().len(), 2);
        assert_eq!(v.get::<u32>("a", 70), None);
        assert_eq!(v.get::<u32>("live4093", 70), None);
        assert_eq!(v.get::<u32>("live4095", 70), Some(0));
        // Long tokens are never remembered.
        v.put(&"x".repeat(VERIFIED_MAX_LEN + 1), 300, 0u32, 70);
        assert_eq!(v.entries.lock().unwrap().len(), 2);
    }
}
