"""What the soak runs and breaks: two storage-agent nodes sharing a Redis Sentinel group (the
per-user limit) whose address they read from etcd, moto for their S3 volumes, Docker for their
sessions, and each node's state directory on a small filesystem of its own (so it can be
filled). Every process is started here and can be killed, frozen or restarted by a fault."""

import json
import os
import signal
import subprocess
import time
import uuid

from common import MANAGER_SECRET, RPC_SECRET, JWT_SECRET, free_port, wait_port, log, http


class Proc:
    """A child process the soak can kill -9 and start again with the same command line."""

    def __init__(self, name, argv, cwd=None, log_path=None, env=None):
        self.name, self.argv, self.cwd, self.log_path, self.env = name, argv, cwd, log_path, env
        self.proc = None
        self.start()

    def start(self):
        out = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def freeze(self, on):
        os.killpg(self.proc.pid, signal.SIGSTOP if on else signal.SIGCONT)

    def stop(self):
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill9()


def redis_cli(port, *args):
    r = subprocess.run(["redis-cli", "-p", str(port), *map(str, args)], capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


class RedisGroup:
    """A master, a replica and one Sentinel (quorum 1), each on its own port and directory, no
    automatic snapshots: a restarted server comes back with its last snapshot (empty the first
    time), as after a crash."""

    def __init__(self, work):
        self.dir = work / "redis"
        self.dir.mkdir()
        self.ports = [free_port(), free_port()]
        self.servers = [self._server(0, None), self._server(1, self.ports[0])]
        for p in self.ports:
            wait_port(p)
        self.sentinel_port = free_port()
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor soak 127.0.0.1 {self.ports[0]} 1\n"
            "sentinel down-after-milliseconds soak 3000\nsentinel failover-timeout soak 15000\n"
        )
        self.sentinel = Proc("sentinel", ["redis-sentinel", str(conf)], log_path=self.dir / "sentinel.log")
        wait_port(self.sentinel_port)

    def _server(self, i, master):
        d = self.dir / f"redis-{i}"
        d.mkdir(exist_ok=True)
        argv = ["redis-server", "--port", str(self.ports[i]), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(d)]
        if master:
            argv += ["--replicaof", "127.0.0.1", str(master)]
        return Proc(f"redis-{i}", argv, log_path=self.dir / f"redis-{i}.log")

    def master_port(self):
        out = redis_cli(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", "soak").split()
        return int(out[1]) if len(out) == 2 else self.ports[0]

    def restart_master(self):
        """kill -9 of the current master and a start on the same port: it comes back with the
        snapshot taken when it last restarted (empty the first time), older than the sessions
        admitted since; a snapshot is taken now for the next time."""
        port = self.master_port()
        s = self.servers[self.ports.index(port)]
        s.kill9()
        if "--replicaof" in s.argv:
            s.argv = s.argv[:s.argv.index("--replicaof")]
        s.start()
        wait_port(port)
        end = time.time() + 30
        while redis_cli(port, "SAVE") != "OK" and time.time() < end:
            time.sleep(0.2)  # still loading its snapshot
        return port

    def failover(self):
        return redis_cli(self.sentinel_port, "SENTINEL", "FAILOVER", "soak")

    def stop(self):
        for p in [self.sentinel, *self.servers]:
            p.stop()


class Etcd:
    """etcd with its data on disk: stopped and started again, it still holds Redis' address."""

    def __init__(self, work, redis):
        self.dir = work / "etcd"
        self.port, peer = free_port(), free_port()
        self.proc = Proc("etcd", [
            "etcd", "--data-dir", str(self.dir / "data"), "--name", "soak",
            "--listen-client-urls", f"http://127.0.0.1:{self.port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"soak=http://127.0.0.1:{peer}",
        ], log_path=work / "etcd.log")
        wait_port(self.port)
        self.put("config/redis/sentinel", f"127.0.0.1:{redis.sentinel_port}")
        self.put("config/redis/service_name", "soak")

    def put(self, key, value):
        end = time.time() + 60
        while True:
            r = subprocess.run(["etcdctl", "--endpoints", f"127.0.0.1:{self.port}", "put", f"/sorna/soak/{key}", value],
                               env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True)
            if r.returncode == 0:
                return
            if time.time() > end:
                raise RuntimeError(f"etcdctl put: {r.stderr}")
            time.sleep(0.3)


class Moto:
    """moto's S3 server. A fault freezes it (SIGSTOP): the endpoint hangs, as a dead S3 does, and
    keeps its data (a restarted moto would come back empty, which no real S3 does)."""

    def __init__(self, work):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        self.proc = Proc("moto", ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                         log_path=work / "moto.log")
        wait_port(self.port)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # moto loads its S3 backend at the first request, slower than the daemons' volume
        # probe waits on a busy machine: warm it before they start.
        http("GET", self.endpoint + "/", timeout=120)

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="soak",
                            aws_secret_access_key="soak-secret", region_name="us-east-1",
                            config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}))


class StateFs:
    """A small ext4 on a loop device for a node's state directory (SQLite, staging): a fault
    fills it and frees it."""

    def __init__(self, work, name, size_mib):
        self.img = work / f"{name}.img"
        self.mnt = work / name
        self.mnt.mkdir()
        subprocess.run(["truncate", "-s", f"{size_mib}M", self.img], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", self.img], check=True)
        subprocess.run(["mount", "-o", "loop", self.img, self.mnt], check=True)
        self.filler = self.mnt / "soak-filler"

    def fill(self):
        # Everything but a few blocks: SQLite and staging writes hit ENOSPC.
        st = os.statvfs(self.mnt)
        free = st.f_bavail * st.f_frsize
        with open(self.filler, "wb") as f:
            try:
                f.truncate(0)
                os.posix_fallocate(f.fileno(), 0, max(free - 64 * 1024, 0))
            except OSError:
                pass

    def free(self):
        self.filler.unlink(missing_ok=True)

    def umount(self):
        subprocess.run(["umount", "-l", self.mnt], check=False)


class Node:
    """One storage-agent daemon: a vfs volume (on the disk), an S3 volume (moto), sessions
    (Docker), Redis from etcd; fixed ports, so clients keep their addresses across restarts.
    Supervised as systemd would (Restart=always, RestartSec=2): a node that exits is started
    again."""

    def __init__(self, work, name, binary, etcd, moto, ports, dufs):
        self.name, self.binary = name, binary
        self.dir = work / name
        self.vol = self.dir / "vol1"
        self.vol.mkdir(parents=True)
        self.statefs = StateFs(work, f"{name}-state", 256)
        self.state = self.statefs.mnt / "state"
        self.state.mkdir()
        self.node_id = f"soak-{name}-{os.getpid()}"
        self.manager_port, self.client_port, self.internal_port, self.rpc_port = (free_port() for _ in range(4))
        lo, hi = ports
        self.cfg = self.dir / "storage-agent.toml"
        self.cfg.write_text(
            f'[storage-proxy]\nnode-id = "{self.node_id}"\nsecret = "{JWT_SECRET}"\n'
            'session-expire = "1d"\nmax-upload-size = "10g"\n'
            f'[storage-agent]\nstate-dir = "{self.state}"\nlog-level = "{os.environ.get("SOAK_LOG_LEVEL", "warn")}"\n'
            f'[etcd]\nnamespace = "soak"\naddr = {{ host = "127.0.0.1", port = {etcd.port} }}\n'
            f'[api.client]\nservice-addr = "127.0.0.1:{self.client_port}"\n'
            f'[api.manager]\nservice-addr = "127.0.0.1:{self.manager_port}"\n'
            f'internal-addr = "127.0.0.1:{self.internal_port}"\nsecret = "{MANAGER_SECRET}"\n'
            f'[volume.vol1]\nbackend = "vfs"\npath = "{self.vol}"\n'
            f'[volume.s3]\nbackend = "s3"\nendpoint = "{moto.endpoint}"\nregion = "us-east-1"\n'
            f'access-key = "soak"\nsecret-key = "soak-secret"\nbucket-prefix = "soak-{name}-"\npart-size = "5m"\n'
            'request-timeout = "20s"\nconnect-timeout = "2s"\nmount-linger = "10s"\n'
            f'[agent]\nenabled = true\nbase-image = "{os.environ.get("BASE_IMAGE", "localbase:bookworm-slim")}"\n'
            f'public-addr = "127.0.0.1"\nport-range = "{lo}-{hi}"\nkernel-uid = 2301\nkernel-gid = 2301\n'
            f'[agent.filebrowser]\nengine = "dufs"\ndufs-binary = "{dufs}"\n'
            f'[agent.rpc]\nservice-addr = "127.0.0.1:{self.rpc_port}"\nsecret = "{RPC_SECRET}"\n'
        )
        self.proc = Proc(name, [binary, "serve", "--config", str(self.cfg)], log_path=self.dir / "log")
        self.restarts = 0

    @property
    def manager(self):
        return f"127.0.0.1:{self.manager_port}"

    @property
    def client(self):
        return f"127.0.0.1:{self.client_port}"

    def ready(self):
        try:
            return http("GET", f"http://127.0.0.1:{self.internal_port}/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if self.ready():
                return True
            if not self.proc.alive():
                self.supervise()
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n" + (self.dir / "log").read_text()[-3000:])

    def supervise(self):
        """What systemd's Restart=always does; True when it (re)started the daemon."""
        if self.proc.alive():
            return False
        time.sleep(2)
        self.restarts += 1
        log(f"{self.name}: exited ({self.proc.proc.returncode}); restarting")
        self.proc.start()
        return True

    def mgr(self, path, body, method="POST", timeout=60):
        return http(method, f"http://{self.manager}{path}", json.dumps(body).encode(),
                    {"X-BackendAI-Storage-Auth-Token": MANAGER_SECRET, "Content-Type": "application/json"},
                    timeout=timeout)

    def ctl(self, *args, timeout=180):
        r = subprocess.run([self.binary, "ctl", "--json", "--config", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def new_vfolder(self, volume, user):
        vfid = f"user:{user}/{uuid.uuid4().hex}"
        st, _, body = self.mgr("/folder/create", {"volume": volume, "vfid": vfid})
        if st not in (200, 201, 204):
            raise RuntimeError(f"create vfolder on {self.name}/{volume}: {st} {body[:300]!r}")
        return vfid

    def stop(self):
        self.proc.stop()
        self.statefs.umount()
