//! TLS everywhere: operator certificates and CAs for sessions, bad operator files refused at
//! start, and the manager, client and RPC listeners over TLS with the node CA.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use storage_agent::pb;

use crate::common::agent::ContainerGuard;
use crate::common::tools::require;
use crate::common::{Daemon, run};
use crate::filebrowser::{FilebrowserBuilder, start_fb};

fn openssl(args: &[&str]) -> String {
    require("openssl", "apt-get install openssl");
    run(Command::new("openssl").args(args))
}

/// A self-signed certificate for 127.0.0.1 made by openssl (the operator's own).
fn operator_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("op.crt"), dir.join("op.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=files.example",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        k.to_str().unwrap(),
        "-out",
        c.to_str().unwrap(),
    ]);
    (c, k)
}

/// An operator CA (PKCS#8 key) made by openssl.
fn operator_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("opca.crt"), dir.join("opca.key"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        k.to_str().unwrap(),
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        k.to_str().unwrap(),
        "-days",
        "30",
        "-subj",
        "/CN=Operator CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        c.to_str().unwrap(),
    ]);
    (c, k)
}

fn fingerprint_of(cert: &Path) -> String {
    let out = openssl(&[
        "x509",
        "-in",
        cert.to_str().unwrap(),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]);
    out.trim().rsplit('=').next().unwrap().to_string()
}

#[tokio::test]
async fn operator_certificate_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = operator_cert(dir.path());
    let d = Daemon::builder()
        .filebrowser()
        .set("agent.tls.cert", c.display().to_string())
        .set("agent.tls.key", k.display().to_string())
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let created = start_fb(&d, &user, &vf).await;
    let s = created.session.unwrap();
    assert_eq!(
        s.tls_cert_fingerprint,
        format!("SHA256:{}", fingerprint_of(&c))
    );
    // Clients pin the operator's certificate itself (it is self-signed).
    let ca = d.dir.path().join("pin.pem");
    std::fs::write(&ca, &created.ca_cert_pem).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .args([
            "-u",
            &format!("work:{}", created.password),
            &format!("https://127.0.0.1:{}/", s.endpoints[0].port),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn operator_ca_signs_session_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = operator_ca(dir.path());
    let d = Daemon::builder()
        .filebrowser()
        .set("agent.tls.ca-cert", c.display().to_string())
        .set("agent.tls.ca-key", k.display().to_string())
        .start()
        .await;
    let _g = ContainerGuard(d.node_id());
    let user = uuid::Uuid::new_v4();
    let (vf, _) = d.user_vfolder(&user).await;
    let created = start_fb(&d, &user, &vf).await;
    let port = created.session.unwrap().endpoints[0].port;
    assert_eq!(
        created.ca_cert_pem.trim(),
        std::fs::read_to_string(&c).unwrap().trim()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("echo | openssl s_client -connect 127.0.0.1:{port} -CAfile {} -verify_return_error 2>&1", c.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("Operator CA"), "{text}");
}

fn rcgen_cert(path: &Path, expired: bool) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    if expired {
        p.not_before = now - time::Duration::days(10);
        p.not_after = now - time::Duration::days(1);
    }
    let cert = p.self_signed(&key).unwrap();
    let (c, k) = (path.join("c.pem"), path.join("k.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn expired_or_mismatched_operator_files_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("expired");
    std::fs::create_dir(&exp).unwrap();
    let (c, k) = rcgen_cert(&exp, true);
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, other_key) = rcgen_cert(&other, false);
    let good = dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    let (good_c, _) = rcgen_cert(&good, false);
    for (label, cert, key, want) in [
        ("expired", &c, &k, "expired"),
        ("mismatched", &good_c, &other_key, "does not match"),
    ] {
        for (section, ck, kk) in [
            ("agent.tls", "cert", "key"),
            ("api.manager", "ssl-cert", "ssl-privkey"),
        ] {
            let b = Daemon::builder()
                .set(&format!("{section}.{ck}"), cert.display().to_string())
                .set(&format!("{section}.{kk}"), key.display().to_string())
                .set("api.manager.ssl-enabled", true);
            let p = b.dir.path().join("c.toml");
            std::fs::write(&p, toml::to_string(&b.config).unwrap()).unwrap();
            let out = Command::new(crate::common::bin())
                .args(["config", "check", "--config"])
                .arg(&p)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{label} {section}: {err}");
            assert!(err.contains(&format!("{section}.{ck}")), "{label}: {err}");
            assert!(
                err.contains(&cert.display().to_string()),
                "the path is named: {err}"
            );
            assert!(err.contains(want), "{label}: {err}");
            let out = Command::new(crate::common::bin())
                .args(["serve", "--config"])
                .arg(&p)
                .output()
                .unwrap();
            assert_ne!(out.status.code(), Some(0));
            assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
        }
    }
}

fn tls_client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

use rustls_pki_types::pem::PemObject;

#[tokio::test]
async fn apis_and_rpc_over_tls_with_the_node_ca() {
    let d = Daemon::builder()
        .agent()
        .set("api.manager.ssl-enabled", true)
        .set("api.client.ssl-enabled", true)
        .set("agent.rpc.ssl-enabled", true)
        .start()
        .await;
    let ca = d.state_dir.join("tls/ca.crt");
    assert!(
        std::fs::read_to_string(d.stdout_path())
            .unwrap()
            .contains("api=manager addr=127.0.0.1")
    );
    let curl = |url: String, extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
            .arg(&ca)
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let m = curl(
        format!(
            "https://127.0.0.1:{}/status",
            d.addrs["manager"].rsplit(':').next().unwrap()
        ),
        &[],
    );
    assert!(m.ends_with("200") && m.contains("manager-facing"), "{m}");
    let m = curl(
        format!(
            "https://localhost:{}/volumes",
            d.addrs["manager"].rsplit(':').next().unwrap()
        ),
        &[
            "-H",
            &format!(
                "X-BackendAI-Storage-Auth-Token: {}",
                crate::common::MANAGER_SECRET
            ),
        ],
    );
    assert!(
        m.ends_with("200"),
        "the certificate names localhost too: {m}"
    );
    let c = curl(
        format!(
            "https://127.0.0.1:{}/",
            d.addrs["client"].rsplit(':').next().unwrap()
        ),
        &[],
    );
    assert!(c.contains("client-facing"), "{c}");
    // Plain HTTP to a TLS listener gets nothing useful.
    let out = Command::new("curl")
        .args(["-sS", "-m", "5"])
        .arg(format!("http://{}/status", d.addrs["manager"]))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("manager-facing"));

    // gRPC over TLS, verified against the node CA.
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_client(&ca_pem));
    let addr = d.addrs["rpc"].clone();
    let ch = tonic::transport::Endpoint::from_static("http://storage-agent")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let tls = connector
                    .connect(
                        rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                        tcp,
                    )
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .expect("TLS channel to the RPC listener");
    let mut rpc = pb::storage_agent_client::StorageAgentClient::with_interceptor(
        ch,
        |mut r: tonic::Request<()>| {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", crate::common::agent::RPC_SECRET)
                    .parse()
                    .unwrap(),
            );
            Ok(r)
        },
    );
    let cap = rpc
        .get_capacity(pb::GetCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(cap.max_containers > 0);
}
