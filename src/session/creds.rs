//! Session credentials: validated OpenSSH public keys, generated passwords (returned once, kept
//! only as a sha512-crypt hash), and the node's SSH host key, generated once in the state dir so
//! fingerprints stay the same across sessions and restarts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rand::Rng;
use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey};

/// At most this many keys per session.
pub const MAX_KEYS: usize = 32;
const PASSWORD_LEN: usize = 24;
/// Unambiguous characters only (no 0/O, 1/l/I), for passwords read off a screen.
const PASSWORD_CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// Parses and normalizes OpenSSH public keys ("ssh-ed25519 AAAA... comment").
pub fn parse_public_keys(keys: &[String]) -> Result<Vec<String>, String> {
    if keys.len() > MAX_KEYS {
        return Err(format!(
            "at most {MAX_KEYS} public keys, got {}",
            keys.len()
        ));
    }
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            let k = k.trim();
            if k.contains('\n') || k.contains('\r') {
                return Err(format!("public key #{i} spans several lines"));
            }
            let key = PublicKey::from_openssh(k)
                .map_err(|e| format!("public key #{i} is not an OpenSSH public key: {e}"))?;
            if key.comment().chars().any(char::is_control) {
                return Err(format!(
                    "public key #{i} has control characters in its comment"
                ));
            }
            // Re-encoding drops options or anything else a hostile line could smuggle in.
            key.to_openssh()
                .map_err(|e| format!("public key #{i}: {e}"))
        })
        .collect()
}

pub fn generate_password() -> String {
    let mut rng = rand::rng();
    (0..PASSWORD_LEN)
        .map(|_| PASSWORD_CHARS[rng.random_range(0..PASSWORD_CHARS.len())] as char)
        .collect()
}

/// A crypt(3) sha512 hash for /etc/shadow.
pub fn shadow_hash(password: &str) -> Result<String, String> {
    let params = sha_crypt::Sha512Params::new(5000).map_err(|e| format!("{e:?}"))?;
    sha_crypt::sha512_simple(password, &params).map_err(|e| format!("{e:?}"))
}

/// The node's SSH host key (ed25519), mounted read-only into every SFTP session.
pub struct HostKey {
    pub private_path: PathBuf,
    pub fingerprint: String,
}

impl HostKey {
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let path = dir.join("ssh_host_ed25519_key");
        let key = match std::fs::read_to_string(&path) {
            Ok(pem) => PrivateKey::from_openssh(pem).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand::rng().fill(&mut seed);
                let key = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
                let pem = key
                    .to_openssh(LineEnding::LF)
                    .map_err(std::io::Error::other)?;
                crate::private_file::write(&path, pem.as_bytes())?;
                let public = key
                    .public_key()
                    .to_openssh()
                    .map_err(std::io::Error::other)?;
                std::fs::write(path.with_extension("pub"), format!("{public}\n"))?;
                tracing::info!(path = %path.display(), "generated the node's SSH host key");
                key
            }
            Err(e) => return Err(e),
        };
        // sshd refuses host keys others can read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(HostKey {
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            private_path: path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated_and_normalized() {
        let ok = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGOtyHyRct4eiSkPBtWhWUo77lT0qtiNdiCOcnDY2Nf4 alice@example";
        assert_eq!(
            parse_public_keys(&[ok.to_string()]).unwrap(),
            vec![ok.to_string()]
        );
        for bad in [
            "not a key",
            "ssh-ed25519 AAAA",
            "command=\"/bin/sh\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGOtyHyRct4eiSkPBtWhWUo77lT0qtiNdiCOcnDY2Nf4",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGOtyHyRct4eiSkPBtWhWUo77lT0qtiNdiCOcnDY2Nf4 x\nssh-rsa AAAA",
        ] {
            assert!(parse_public_keys(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_and_hashes() {
        let p = generate_password();
        assert_eq!(p.len(), PASSWORD_LEN);
        let h = shadow_hash(&p).unwrap();
        assert!(h.starts_with("$6$"));
        assert!(sha_crypt::sha512_check(&p, &h).is_ok());
    }

    #[test]
    fn host_key_is_stable() {
        let d = tempfile::tempdir().unwrap();
        let a = HostKey::load_or_create(d.path()).unwrap();
        let b = HostKey::load_or_create(d.path()).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert!(a.fingerprint.starts_with("SHA256:"));
        let mode = std::fs::metadata(&a.private_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
