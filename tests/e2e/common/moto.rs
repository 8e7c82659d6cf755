//! A real S3 service for one test: moto's server on a free loopback port, and boto3 (AWS's own
//! Python SDK) to look at what the daemon stored, independently of it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::free_port;
use super::tools::{require, require_python_module};
use super::{Builder, run};

pub struct Moto {
    pub port: u16,
    /// Serving HTTPS with moto's own self-signed certificate.
    tls: bool,
    child: Child,
    _dir: tempfile::TempDir,
}

pub const KEY: &str = "testing-key";
pub const SECRET: &str = "testing-secret";

impl Moto {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A moto serving HTTPS with a self-signed certificate no trust store knows.
    pub fn start_tls() -> Self {
        Self::launch(&[], true)
    }

    /// A moto that checks signatures against IAM: with no user created, every key is wrong
    /// (how a service with bad credentials answers).
    pub fn start_with_auth() -> Self {
        Self::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
    }

    fn start_with(env: &[(&str, &str)]) -> Self {
        Self::launch(env, false)
    }

    fn launch(env: &[(&str, &str)], tls: bool) -> Self {
        require("moto_server", "pip install 'moto[server]'");
        require_python_module("boto3", "boto3");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .args(if tls { &["--ssl"][..] } else { &[] })
            .envs(env.iter().copied())
            .env_remove("AWS_CA_BUNDLE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("moto.log")).unwrap())
            .spawn()
            .expect("moto_server");
        let m = Moto {
            port,
            tls,
            child,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Runs Python with `s3` bound to a boto3 client of this server; returns its stdout.
    pub fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3, hashlib, sys, json\n\
             s3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='{KEY}', \
             aws_secret_access_key='{SECRET}', region_name='us-east-1', verify={})\n{code}\n",
            self.endpoint(),
            if self.tls { "False" } else { "None" }
        );
        run(Command::new("python3")
            .arg("-c")
            .arg(script)
            .env_remove("AWS_CA_BUNDLE"))
    }

    pub fn buckets(&self) -> Vec<String> {
        self.boto("print('\\n'.join(b['Name'] for b in s3.list_buckets()['Buckets']))")
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The keys in `bucket`.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        self.boto(&format!(
            "print('\\n'.join(o['Key'] for o in s3.list_objects_v2(Bucket='{bucket}').get('Contents', [])))"
        ))
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Builder {
    /// vol1 becomes an `s3` volume on `endpoint` (bucket per vfolder, `bucket-prefix`).
    pub fn s3(self, endpoint: &str, bucket_prefix: &str) -> Self {
        let b = self.remove("volume", "vol1");
        let b = if bucket_prefix.is_empty() {
            b
        } else {
            b.set("volume.vol1.bucket-prefix", bucket_prefix)
        };
        b.set("volume.vol1.backend", "s3")
            .set("volume.vol1.endpoint", endpoint)
            .set("volume.vol1.region", "us-east-1")
            .set("volume.vol1.access-key", KEY)
            .set("volume.vol1.secret-key", SECRET)
            .set("volume.vol1.part-size", "5m")
            .set("volume.vol1.request-timeout", "20s")
            .set("volume.vol1.connect-timeout", "2s")
            .set("volume.vol1.mount-linger", "2s")
    }
}
