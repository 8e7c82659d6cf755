//! Certificates: the node CA (ECDSA P-256, made with rcgen on first start, key 0600), short-lived
//! per-session leaves for `[agent] public-host`, operator-provided certificates or CAs (checked
//! at start: readable, matching key, not expired), and rustls server configs for the listeners.
//! Everything uses the process-wide aws-lc-rs provider installed in `main`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot make a certificate: {0}")]
    Generate(String),
}

fn invalid(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        source: e,
    })
}

fn gen_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// `SHA256:AB:CD:…`, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    let hex: Vec<String> = Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    format!("SHA256:{}", hex.join(":"))
}

fn parse_chain(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| invalid(path, format!("not a PEM private key: {e}")))
}

/// Rejects a certificate outside its validity period.
fn check_validity<'a>(
    path: &Path,
    der: &'a [u8],
) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(path, format!("unreadable certificate: {e}")))?;
    let now = x509_parser::time::ASN1Time::now();
    let v = cert.validity();
    if v.not_after < now {
        return Err(invalid(
            path,
            format!("the certificate expired on {}", v.not_after),
        ));
    }
    if v.not_before > now {
        return Err(invalid(
            path,
            format!("the certificate is not valid before {}", v.not_before),
        ));
    }
    Ok(cert)
}

/// A certificate chain and its key, checked to belong together and to be valid now.
pub fn check_cert_key(cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let certs = parse_chain(cert_path, &read(cert_path)?)?;
    let key = parse_key(key_path, &read(key_path)?)?;
    check_validity(cert_path, &certs[0])?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(key_path, format!("unusable private key: {e}")))?;
    rustls::sign::CertifiedKey::new(certs, signing)
        .keys_match()
        .map_err(|e| {
            invalid(
                cert_path,
                format!("does not match the key in {}: {e}", key_path.display()),
            )
        })
}

/// An operator's CA: valid, a CA, and its key matching.
pub fn check_ca(cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    check_cert_key(cert_path, key_path)?;
    let pem = read(cert_path)?;
    let der = parse_chain(cert_path, &pem)?.remove(0);
    let cert = check_validity(cert_path, &der)?;
    if !cert.is_ca() {
        return Err(invalid(
            cert_path,
            "not a CA certificate (basic constraints)",
        ));
    }
    KeyPair::from_pem(&read(key_path)?)
        .map_err(|e| invalid(key_path, format!("the CA key must be PKCS#8 PEM: {e}")))?;
    Ok(())
}

/// A CA that signs leaves: ours (generated once) or the operator's.
pub struct Ca {
    pub cert_pem: String,
    key: KeyPair,
}

impl Ca {
    /// `<dir>/ca.crt` and `<dir>/ca.key` (0600), made on first use.
    pub fn node(dir: &Path, node_id: &str) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if cert_path.exists() && key_path.exists() {
            return Self::from_files(&cert_path, &key_path);
        }
        std::fs::create_dir_all(dir).map_err(|e| TlsError::Read {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("storage-agent node CA {node_id}"),
        );
        dn.push(DnType::OrganizationName, "storage-agent");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(3650);
        let cert = p.self_signed(&key).map_err(gen_err)?;
        let io = |e| TlsError::Read {
            path: key_path.clone(),
            source: e,
        };
        crate::private_file::write(&key_path, key.serialize_pem().as_bytes()).map_err(io)?;
        std::fs::write(&cert_path, cert.pem()).map_err(|e| TlsError::Read {
            path: cert_path.clone(),
            source: e,
        })?;
        tracing::info!(cert = %cert_path.display(), "generated the node CA");
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?)
            .map_err(|e| invalid(key_path, format!("the CA key must be PKCS#8 PEM: {e}")))?;
        Ok(Ca { cert_pem, key })
    }

    /// A leaf for `names` (DNS names and/or IPs), valid for `validity`, with its chain.
    pub fn issue(&self, names: &[String], validity: Duration) -> Result<Leaf, TlsError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(gen_err)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut p = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        // A little slack for clocks that lag behind ours.
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
        let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
        Ok(Leaf {
            fingerprint: fingerprint(cert.der()),
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A server certificate (with its chain), its key, and what clients should pin.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: String,
    pub ca_pem: String,
}

/// Where session certificates come from.
pub enum SessionCerts {
    /// Signed per session by the node CA or the operator's CA.
    Issued {
        ca: Ca,
        names: Vec<String>,
        max_validity: Duration,
    },
    /// The operator's certificate and key, used as they are.
    Fixed(Leaf),
}

impl SessionCerts {
    pub fn leaf(&self, validity: Duration) -> Result<Leaf, TlsError> {
        match self {
            SessionCerts::Issued {
                ca,
                names,
                max_validity,
            } => ca.issue(names, validity.min(*max_validity)),
            SessionCerts::Fixed(l) => Ok(l.clone()),
        }
    }

    /// An operator certificate used as-is: the leaf, its key, and its chain's last certificate
    /// (the issuer, or the leaf itself when self-signed) for clients to pin.
    pub fn fixed(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        check_cert_key(cert_path, key_path)?;
        let cert_pem = read(cert_path)?;
        let chain = parse_chain(cert_path, &cert_pem)?;
        let last = chain.last().cloned().unwrap_or_else(|| chain[0].clone());
        let ca_pem = pem_of(&last);
        Ok(SessionCerts::Fixed(Leaf {
            fingerprint: fingerprint(&chain[0]),
            cert_pem,
            key_pem: read(key_path)?,
            ca_pem,
        }))
    }
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A rustls server config (HTTP/2 and HTTP/1.1) from PEM text.
pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let p = Path::new("<memory>");
    let certs = parse_chain(p, cert_pem)?;
    let key = parse_key(p, key_pem)?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(p, e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS for one listener: the operator's files, or a certificate from the node CA for the names
/// this host answers to ("self-signed" in Backend.AI's words, but pinnable through the CA).
pub fn listener_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Ca>,
    names: &[String],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    match (cert, key, ca) {
        (Some(c), Some(k), _) => {
            check_cert_key(c, k)?;
            server_config(&read(c)?, &read(k)?)
        }
        (_, _, Some(ca)) => {
            let leaf = ca.issue(names, Duration::from_secs(365 * 86400))?;
            server_config(&leaf.cert_pem, &leaf.key_pem)
        }
        _ => Err(TlsError::Generate(
            "TLS is enabled without a certificate and without the node CA".into(),
        )),
    }
}

/// A client config that skips certificate verification, for probing our own containers on
/// loopback (whether they answer TLS at all), never for talking to anyone else.
pub fn probe_client_config() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    // Built once: readiness probes run every 100 ms while a session starts.
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let cfg = rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
                .with_no_client_auth();
            Arc::new(cfg)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ca_issues_leaves_that_verify() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::node(d.path(), "n1").unwrap();
        let again = Ca::node(d.path(), "n1").unwrap();
        assert_eq!(ca.cert_pem, again.cert_pem, "the CA is made once");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let leaf = ca
            .issue(
                &["files.example.com".into(), "127.0.0.1".into()],
                Duration::from_secs(3600),
            )
            .unwrap();
        assert!(leaf.fingerprint.starts_with("SHA256:"));
        std::fs::write(d.path().join("l.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(d.path().join("l.key"), &leaf.key_pem).unwrap();
        check_cert_key(&d.path().join("l.crt"), &d.path().join("l.key")).unwrap();
        // A key that is not the certificate's is refused.
        let other = ca.issue(&["x".into()], Duration::from_secs(60)).unwrap();
        std::fs::write(d.path().join("o.key"), &other.key_pem).unwrap();
        let e = check_cert_key(&d.path().join("l.crt"), &d.path().join("o.key")).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        check_ca(&d.path().join("ca.crt"), &d.path().join("ca.key")).unwrap();
        let e = check_ca(&d.path().join("l.crt"), &d.path().join("l.key")).unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
        server_config(&leaf.cert_pem, &leaf.key_pem).unwrap();
    }
}
