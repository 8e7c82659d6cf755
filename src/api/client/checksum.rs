//! tus checksum extension: `Upload-Checksum: <algorithm> <base64 digest>`.

use base64::Engine;
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

/// Advertised in `Tus-Checksum-Algorithm`; sha1 is mandatory in the spec.
pub const ALGORITHMS: &str = "sha1,sha256,sha512,md5";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
    Md5,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("unsupported checksum algorithm {0:?} (supported: {ALGORITHMS})")]
    Unsupported(String),
    #[error("Upload-Checksum must be \"<algorithm> <base64 digest>\"")]
    Malformed,
}

/// The expected digest of one PATCH body.
#[derive(Debug, Clone)]
pub struct Expected {
    pub algorithm: Algorithm,
    pub digest: Vec<u8>,
}

pub fn parse(header: &str) -> Result<Expected, ChecksumError> {
    let (name, b64) = header
        .trim()
        .split_once(' ')
        .ok_or(ChecksumError::Malformed)?;
    let algorithm = match name {
        "sha1" => Algorithm::Sha1,
        "sha256" => Algorithm::Sha256,
        "sha512" => Algorithm::Sha512,
        "md5" => Algorithm::Md5,
        other => return Err(ChecksumError::Unsupported(other.to_string())),
    };
    let digest = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| ChecksumError::Malformed)?;
    Ok(Expected { algorithm, digest })
}

pub enum Hasher {
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
    Md5(Md5),
}

impl Hasher {
    pub fn new(a: Algorithm) -> Self {
        match a {
            Algorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
            Algorithm::Md5 => Hasher::Md5(Md5::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
            Hasher::Md5(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
            Hasher::Md5(h) => h.finalize().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hashes() {
        // sha1("hello") = aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d
        let e = parse("sha1 qvTGHdzF6KLavt4PO0gs2a6pQ00=").unwrap();
        let mut h = Hasher::new(e.algorithm);
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), e.digest);
        assert_eq!(
            parse("crc32 AAAA").unwrap_err(),
            ChecksumError::Unsupported("crc32".into())
        );
        assert_eq!(parse("sha1").unwrap_err(), ChecksumError::Malformed);
        assert_eq!(parse("sha1 ***").unwrap_err(), ChecksumError::Malformed);
    }
}
