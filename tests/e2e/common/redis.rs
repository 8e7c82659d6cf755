//! A real redis-server on a free loopback port, for one test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tools::require;

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// With TLS: the CA that signed the server's certificate, which clients pin.
    pub tls_cert: Option<std::path::PathBuf>,
    /// With ACL: the only user that may log in (the default user is off).
    acl_user: Option<(String, String)>,
    /// A replica of the server on this port.
    replica_of: Option<u16>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub fn start() -> Self {
        Self::launch(tempfile::tempdir().unwrap(), None, None)
    }

    /// A server whose default user is switched off: only `user` with `password` gets in.
    pub fn start_acl(user: &str, password: &str) -> Self {
        let acl_user = Some((user.to_string(), password.to_string()));
        Self::launch(tempfile::tempdir().unwrap(), None, acl_user)
    }

    fn launch(
        dir: tempfile::TempDir,
        tls_cert: Option<std::path::PathBuf>,
        acl_user: Option<(String, String)>,
    ) -> Self {
        require("redis-server", "apt-get install redis-server");
        let mut r = RedisServer {
            port: free_port(),
            dir,
            child: None,
            tls_cert,
            acl_user,
            replica_of: None,
        };
        r.spawn();
        r
    }

    /// A replica of the server on `master_port`.
    pub fn start_replica(master_port: u16) -> Self {
        require("redis-server", "apt-get install redis-server");
        let mut r = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls_cert: None,
            acl_user: None,
            replica_of: Some(master_port),
        };
        r.spawn();
        r
    }

    /// A TLS-only server whose certificate for 127.0.0.1 is signed by a CA of its own
    /// (openssl), as an operator would set it up.
    pub fn start_tls() -> Self {
        require("openssl", "apt-get install openssl");
        let dir = tempfile::tempdir().unwrap();
        let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=redis-test-ca -keyout ca.key -out ca.pem 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj /CN=127.0.0.1 -keyout key.pem -out req.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext
openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
  -extfile ext -out cert.pem 2>/dev/null
"#;
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ca = dir.path().join("ca.pem");
        Self::launch(dir, Some(ca), None)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        match &self.tls_cert {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(_) => cmd
                .args(["--port", "0", "--tls-auth-clients", "no", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(self.dir.path().join("cert.pem"))
                .arg("--tls-key-file")
                .arg(self.dir.path().join("key.pem")),
        };
        if let Some((user, password)) = &self.acl_user {
            cmd.args(["--user", "default", "off", "--user", user])
                .args(["on", &format!(">{password}"), "~*", "&*", "+@all"]);
        }
        if let Some(m) = self.replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
        }
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while self.cli(&["PING"]) != "PONG" {
            assert!(
                start.elapsed() < super::OUTCOME,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGKILL: its data is gone, as after a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// redis-cli against database `db` (0 unless given as "-n N" first).
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if let Some(cert) = &self.tls_cert {
            cmd.args(["--tls", "--cacert"]).arg(cert);
        }
        if let Some((user, password)) = &self.acl_user {
            cmd.args(["--no-auth-warning", "--user", user, "--pass", password]);
        }
        let out = cmd
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn client(&self, db: i64) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/{db}", self.port)).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
