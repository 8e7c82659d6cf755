//! A real Azure Blob service for one test: Azurite (Microsoft's emulator, from npm) on a free
//! loopback port, and Azure's own Python SDK (azure-storage-blob) to look at what the daemon
//! stored and to use the SAS it mints.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::free_port;
use super::tools::require_python_module;
use super::{Builder, run};

pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development key.
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    let cache = std::env::var("SA_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/storage-agent",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let local = PathBuf::from(cache).join("azurite/node_modules/.bin/azurite-blob");
    assert!(
        local.exists(),
        "Azurite is required: scripts/testenv.sh azurite (npm install azurite into {})",
        local.display()
    );
    local
}

impl Azurite {
    pub fn start() -> Self {
        require_python_module("azure.storage.blob", "azure-storage-blob");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // --disableTelemetry: never a connection off this machine.
        let child = Command::new(binary())
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--skipApiVersionCheck", "--loose"])
            .args(["--silent", "--disableTelemetry"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("azurite.log")).unwrap())
            .spawn()
            .expect("azurite-blob");
        let a = Azurite {
            port,
            child,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "azurite did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        a
    }

    /// The account URL, path-style as Azurite serves it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Runs Python with `svc` bound to a BlobServiceClient of this account; returns stdout.
    pub fn py(&self, code: &str) -> String {
        let script = format!(
            "import sys, json, hashlib\n\
             from azure.storage.blob import BlobServiceClient, ContainerClient, BlobClient\n\
             svc = BlobServiceClient.from_connection_string(\
             'DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={}/;')\n{code}\n",
            self.endpoint()
        );
        run(Command::new("python3").arg("-c").arg(script))
    }

    pub fn containers(&self) -> Vec<String> {
        self.py("print('\\n'.join(c['name'] for c in svc.list_containers()))")
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// A blob's bytes; None when it (or its container) is missing.
    pub fn blob(&self, container: &str, name: &str) -> Option<Vec<u8>> {
        let out = tempfile::NamedTempFile::new().unwrap();
        let said = self.py(&format!(
            "try:\n    data = svc.get_blob_client({container:?}, {name:?}).download_blob().readall()\n    \
             open({:?}, 'wb').write(data)\n    print('ok')\n\
             except Exception as e:\n    print('missing', e)",
            out.path().display().to_string()
        ));
        said.starts_with("ok")
            .then(|| std::fs::read(out.path()).unwrap())
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Builder {
    /// vol1 becomes an `azure-blob` volume on `endpoint` (container per vfolder).
    pub fn azure(self, endpoint: &str, container_prefix: &str) -> Self {
        let b = self
            .remove("volume", "vol1")
            .set("volume.vol1.backend", "azure-blob")
            .set("volume.vol1.account", ACCOUNT)
            .set("volume.vol1.account-key", KEY)
            .set("volume.vol1.endpoint", endpoint)
            .set("volume.vol1.part-size", "5m")
            .set("volume.vol1.request-timeout", "20s")
            .set("volume.vol1.connect-timeout", "2s")
            .set("volume.vol1.mount-linger", "2s");
        if container_prefix.is_empty() {
            b
        } else {
            b.set("volume.vol1.container-prefix", container_prefix)
        }
    }
}
