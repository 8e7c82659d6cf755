//! Unit tests of reading config files (the e2e tests run `config check` itself).

use super::*;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(text, "test.toml", ConfigSource::Embedded)
}

fn parse_file(dir: &Path, text: &str) -> Result<Config, ConfigError> {
    let p = dir.join("storage-proxy.toml");
    std::fs::write(&p, text).unwrap();
    parse(text, "storage-proxy.toml", ConfigSource::File(p))
}

/// Backend.AI 26.9.6's own file (as `start-server` takes it), unmodified.
#[test]
fn a_python_proxy_file_is_taken_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vfs1")).unwrap();
    let c = parse_file(
        dir.path(),
        r#"
[storage-proxy]
node-id = "pyproxy-node"
num-proc = 1
pid-file = "./sp.pid"
ipc-base-path = "/tmp/ipc"
event-loop = "asyncio"
scandir-limit = "1_000"
max-upload-size = "100gbytes"
secret = "short"
session-expire = "1h"
use-watcher = "false"
auto_quota_scope_creation = false
user = -1
group = ""
aiomonitor-termui-port = 38310
aiomonitor-webui-port = 39310
volume-stats = { observe-interval = 10.0 }
some-future-key = 1

[logging]
level = "DEBUG"
drivers = ["console"]
pkg-ns = { "" = "WARNING", "ai.backend" = "INFO" }
[logging.console]
colored = false
format = "simple"

[api.client]
service-addr = { host = "127.0.0.1", port = "17021" }
ssl-enabled = false

[api.manager]
service-addr = ["127.0.0.1", 17022]
announce-addr = { host = "storage.example.com", port = 17022 }
internal-addr = "127.0.0.1:17023"
announce-internal-addr = { host = "::1", port = 17023 }
ssl-enabled = 0
secret = "py-manager-secret"

[volume.vfs1]
backend = "vfs"
path = "vfs1"

[debug]
enabled = false

[etcd]
namespace = "local"
addr = { host = "::1", port = "12379" }

[otel]
enabled = false

[pyroscope]
enabled = false
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.proxy.scandir_limit, 1000);
    assert_eq!(c.proxy.max_upload_size, 100 << 30);
    assert!(!c.proxy.allow_auto_quota_scope_creation);
    assert_eq!(c.proxy.pid_file, Some(dir.path().join("sp.pid")));
    assert_eq!(c.client_api.addr.port(), 17021);
    assert_eq!(c.manager_api.listener.addr.port(), 17022);
    assert_eq!(
        c.manager_api.announce_addr.as_deref(),
        Some("storage.example.com:17022")
    );
    assert_eq!(
        c.manager_api.announce_internal_addr.as_deref(),
        Some("[::1]:17023")
    );
    assert_eq!(c.volumes[0].path, dir.path().join("vfs1"));
    assert_eq!(c.etcd.unwrap().addrs, vec!["[::1]:12379".to_string()]);
    assert_eq!(c.daemon.log_level, "debug");
    assert!(
        !c.agent.enabled,
        "a Python proxy's file runs no session agent"
    );
    let warned = c.warnings.join("\n");
    assert!(warned.contains("some-future-key"), "{warned}");
    assert!(warned.contains("storage-proxy.secret"), "{warned}");
}

#[test]
fn python_only_backends_are_named() {
    let dir = std::env::temp_dir();
    let err = parse_str(&format!(
        "[volume.v]\nbackend = \"purestorage\"\npath = {dir:?}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not implement"), "{err}");
}

#[test]
fn snake_and_kebab_keys_are_the_same() {
    let dir = std::env::temp_dir();
    let c = parse_str(&format!(
        "[storage_proxy]\nnode_id = \"n1\"\nscandir_limit = 5\n[volume.v]\nbackend = \"vfs\"\npath = {:?}\n",
        dir
    ))
    .unwrap();
    assert_eq!(c.proxy.node_id, "n1");
    assert_eq!(c.proxy.scandir_limit, 5);
}

#[test]
fn all_problems_are_listed() {
    let err = parse_str(
        "[storage-proxy]\nsession-expire = \"soon\"\nsecret = \"\"\n[api.client]\nservice-addr = \"nowhere\"\n[volume.v]\nbackend = \"nfs9\"\npath = \"/does/not/exist\"\n[storage-agent]\nbogus = 1\n",
    )
    .unwrap_err();
    let ConfigError::Invalid { problems, .. } = err else {
        panic!("expected Invalid, got {err}");
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "storage-proxy.session-expire",
        "storage-proxy.secret",
        "api.client.service-addr",
        "volume.v.backend",
        "volume.v.path",
        "storage-agent.bogus",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
}

#[test]
fn backend_ai_addr_tables_are_accepted() {
    let dir = std::env::temp_dir();
    let c = parse_str(&format!(
        "[api.client]\nservice-addr = {{ host = \"127.0.0.1\", port = 7001 }}\n[volume.v]\nbackend = \"vfs\"\npath = {dir:?}\n"
    ))
    .unwrap();
    assert_eq!(c.client_api.addr.port(), 7001);
}

#[test]
fn project_files_belong_to_xfs_volumes() {
    let dir = std::env::temp_dir();
    let err = parse_str(&format!(
        "[volume.v]\nbackend = \"vfs\"\npath = {dir:?}\nproject-files = {dir:?}\n"
    ))
    .unwrap_err();
    let ConfigError::Invalid { problems, .. } = err else {
        panic!("expected Invalid, got {err}");
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "volume.v.project-files");
    assert!(problems[0].allowed.contains("only on xfs"), "{problems:?}");
}
