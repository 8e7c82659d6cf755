#!/usr/bin/env python3
"""storage-agent against its peers and ceilings, in one run (bench/run.sh calls this).

Starts everything it measures on loopback, interleaves the systems within each round (the
machine is noisy: ratios measured minutes apart mean little), takes the median of the rounds and
keeps the spread, writes bench/RESULTS.md (tables, machine, date, then bench/ANALYSIS.md) and the
raw numbers to bench/results/<timestamp>.json, and stops everything it started.

Peers and ceilings: dd and the raw syscalls on the same filesystem; nginx with sendfile; the
Backend.AI Python storage proxy 26.9.6 (with its etcd and Redis); @tus/server with its file
store; the host's OpenSSH sshd. --smoke runs every scenario once at tiny sizes (CI keeps the
script working with it) and writes its tables under bench/results/ instead.
"""

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SA_CACHE", Path.home() / ".cache/storage-agent"))
MANAGER_SECRET = "bench-manager-secret-0123456789"
JWT_SECRET = "bench-jwt-secret-0123456789"
RPC_SECRET = "bench-rpc-secret-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        # What the tool said (a panic's message comes first), not just its exit status.
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stderr[:3000]}")
    return p.stdout


def empty(d):
    """Removes what a measurement wrote (a full run writes about 50 GiB otherwise, and a full
    disk fails the later scenarios)."""
    for p in Path(d).iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def tree_pids(pid):
    """pid and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK_TCK


def reset_peak(pid):
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_rss_mib(pid):
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def http_json(method, url, body, headers=None):
    import urllib.request

    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            data = r.read()
            return json.loads(data) if data else None
    except urllib.error.HTTPError as e:
        # What the server said (a problem+json body), not just its status.
        raise RuntimeError(f"{method} {url}: {e.code} {e.read()[:1000]!r}") from None


def curl_speed(url, headers=()):
    """Downloads to /dev/null; returns bytes/s."""
    cmd = ["curl", "-fsSk", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}"]
    for h in headers:
        cmd += ["-H", h]
    speed, size = run(cmd + [url]).split()
    return float(speed), int(size)


def make_tree(root, files):
    """`files` small files, 1000 per directory, two levels deep."""
    per = 1000
    for dn in range((files + per - 1) // per):
        p = root / f"d{dn:04}" / "sub"
        p.mkdir(parents=True)
        for i in range(min(per, files - dn * per)):
            with open(p / f"f{i:05}", "wb") as f:
                f.write(b"x" * (i % 4096))


def warm(path):
    """Reads a file into the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 24)
            f.write(os.urandom(n))
            left -= n


# ---- the systems ------------------------------------------------------------------------------


class Proxy:
    """Something that speaks the storage-proxy manager and client APIs."""

    name = "?"
    manager = client = None
    scheme = "http"
    pid = None
    vol = None  # the volume's directory

    def mgr(self, path, body, method="POST"):
        return http_json(
            method,
            f"http://{self.manager}{path}",
            body,
            {"X-BackendAI-Storage-Auth-Token": MANAGER_SECRET},
        )

    def new_vfolder(self):
        vfid = f"user:{uuid.uuid4()}/{uuid.uuid4().hex}"
        self.mgr("/folder/create", {"volume": "vol1", "vfid": vfid})
        return vfid

    def vfolder_path(self, vfid):
        qs, folder = vfid.split("/")
        q = uuid.UUID(qs.split(":")[1]).hex
        f = uuid.UUID(folder).hex
        return self.vol / q / f[:2] / f[2:4] / f[4:]

    def upload_url(self, vfid, relpath, size):
        t = self.mgr("/folder/file/upload", {"volume": "vol1", "vfid": vfid, "relpath": relpath, "size": size})
        return f"http://{self.client}/upload?token={t['token']}"

    def download_url(self, vfid, relpath, archive=False):
        t = self.mgr("/folder/file/download", {"volume": "vol1", "vfid": vfid, "relpath": relpath, "archive": archive})
        url = f"{self.scheme}://{self.client}/download?token={t['token']}"
        return url + "&archive=true" if archive else url


class StorageAgent(Proxy):
    name = "storage-agent"

    def __init__(self, work, binary, agent_ports=None, backend="vfs", vol=None, volume_extra="", daemon_extra="",
                 subdir="sa", public_addr="127.0.0.1", client_tls=False):
        self.dir = work / subdir
        # TLS on the client API: a certificate the daemon makes itself (curl runs with -k).
        self.scheme = "https" if client_tls else "http"
        self.vol = vol or self.dir / "vol1"
        self.vol.mkdir(parents=True, exist_ok=True)
        (self.dir / "state").mkdir(parents=True)
        agent = "[agent]\nenabled = false\n"
        if agent_ports:
            lo, hi = agent_ports
            agent = (
                f'[agent]\nenabled = true\nbase-image = "{os.environ.get("BASE_IMAGE", "localbase:bookworm-slim")}"\n'
                f'public-addr = "{public_addr}"\nport-range = "{lo}-{hi}"\nkernel-uid = 2301\nkernel-gid = 2301\n'
                f'[agent.rpc]\nservice-addr = "127.0.0.1:0"\nsecret = "{RPC_SECRET}"\n'
            )
        cfg = self.dir / "storage-agent.toml"
        cfg.write_text(
            f'[storage-proxy]\nnode-id = "bench-{os.getpid()}"\nsecret = "{JWT_SECRET}"\n'
            'session-expire = "1d"\nmax-upload-size = "100g"\n'
            f'[storage-agent]\nstate-dir = "{self.dir / "state"}"\nlog-level = "warn"\n{daemon_extra}'
            f'[api.client]\nservice-addr = "127.0.0.1:0"\nssl-enabled = {str(client_tls).lower()}\n'
            f'[api.manager]\nservice-addr = "127.0.0.1:0"\ninternal-addr = "127.0.0.1:0"\nsecret = "{MANAGER_SECRET}"\n'
            f'[volume.vol1]\nbackend = "{backend}"\npath = "{self.vol}"\n{volume_extra}' + agent
        )
        out = open(self.dir / "out", "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", cfg], stdout=out, stderr=open(self.dir / "err", "w")
        )
        self.pid = self.proc.pid
        end = time.time() + 60
        while "ready" not in (self.dir / "out").read_text():
            if time.time() > end or self.proc.poll() is not None:
                raise RuntimeError("storage-agent did not start: " + (self.dir / "err").read_text()[-2000:])
            time.sleep(0.05)
        addrs = {}
        for line in (self.dir / "out").read_text().splitlines():
            if line.startswith("listening"):
                kv = dict(x.split("=", 1) for x in line.split()[1:])
                addrs[kv["api"]] = kv["addr"]
        self.manager, self.client, self.rpc = addrs["manager"], addrs["client"], addrs.get("rpc")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class PythonProxy(Proxy):
    """Backend.AI's storage proxy 26.9.6, with the etcd and Redis it needs (TESTENV §10)."""

    name = "python-proxy"

    def __init__(self, work):
        py = CACHE / "peer-venv/bin/backend.ai"
        if not py.exists():
            raise RuntimeError(f"{py} is missing: run bench/run.sh (scripts/testenv.sh peers installs it)")
        self.dir = work / "py"
        self.vol = self.dir / "vol1"
        self.vol.mkdir(parents=True)
        (self.vol / "version.txt").write_text("3\n")
        etcd_port, peer_port, redis_port = free_port(), free_port(), free_port()
        self.etcd = subprocess.Popen(
            ["etcd", "--data-dir", self.dir / "etcd", "--name", "default",
             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(etcd_port)
        wait_port(redis_port)
        end = time.time() + 30
        while True:
            r = subprocess.run(
                ["etcdctl", "--endpoints", f"127.0.0.1:{etcd_port}", "put", "/sorna/local/config/redis/addr",
                 f"127.0.0.1:{redis_port}"],
                env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True,
            )
            if r.returncode == 0 or time.time() > end:
                break
            time.sleep(0.3)
        cp, mp, ip, m1, m2 = (free_port() for _ in range(5))
        cfg = self.dir / "storage-proxy.toml"
        cfg.write_text(
            f'[etcd]\nnamespace = "local"\naddr = {{ host = "127.0.0.1", port = {etcd_port} }}\n'
            f'[storage-proxy]\nnode-id = "peer-{os.getpid()}"\nnum-proc = 1\npid-file = "{self.dir}/proxy.pid"\n'
            f'event-loop = "asyncio"\nsecret = "{JWT_SECRET}"\nsession-expire = "1d"\nmax-upload-size = "100g"\n'
            f'scandir-limit = 1000\naiomonitor-termui-port = {m1}\naiomonitor-webui-port = {m2}\n'
            f'[api.client]\nservice-addr = {{ host = "127.0.0.1", port = {cp} }}\nssl-enabled = false\n'
            f'[api.manager]\nservice-addr = {{ host = "127.0.0.1", port = {mp} }}\n'
            f'internal-addr = {{ host = "127.0.0.1", port = {ip} }}\nssl-enabled = false\nsecret = "{MANAGER_SECRET}"\n'
            f'[volume.vol1]\nbackend = "vfs"\npath = "{self.vol}"\n'
            '[logging]\nlevel = "WARNING"\ndrivers = ["console"]\n[logging.console]\ncolored = false\n'
        )
        # It keeps runtime files (prometheus multiprocess state) under ./run: its own cwd.
        self.proc = subprocess.Popen(
            [py, "storage", "start-server", "-f", cfg], cwd=self.dir,
            stdout=open(self.dir / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.manager, self.client = f"127.0.0.1:{mp}", f"127.0.0.1:{cp}"
        wait_port(mp, 120)
        wait_port(cp, 120)

    def stop(self):
        for p in (self.proc, self.etcd, self.redis):
            try:
                os.killpg(p.pid, signal.SIGTERM) if p is self.proc else p.terminate()
            except OSError:
                pass
        for p in (self.proc, self.etcd, self.redis):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


class TusServer:
    """@tus/server with its file store (Node), the reference tus server."""

    name = "tus-server"

    def __init__(self, work):
        peers = ROOT / "bench/peers"
        if not (peers / "node_modules/@tus/server").is_dir():
            raise RuntimeError("bench/peers/node_modules is missing: (cd bench/peers && npm ci)")
        self.dir = work / "tus"
        self.dir.mkdir()
        port = free_port()
        self.proc = subprocess.Popen(
            ["node", peers / "tus-server.mjs", str(port), self.dir],
            stdout=subprocess.DEVNULL, stderr=open(work / "tus.log", "w"),
        )
        self.pid = self.proc.pid
        self.endpoint = f"http://127.0.0.1:{port}/files"
        wait_port(port)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


class Nginx:
    name = "nginx"

    def __init__(self, work, root, tls=False):
        self.dir = work / ("nginx-tls" if tls else "nginx")
        self.dir.mkdir()
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        listen = f"listen 127.0.0.1:{self.port}"
        if tls:
            # OpenSSL encrypts in the process (this kernel has no kTLS), so sendfile is unused.
            run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                 "-keyout", self.dir / "key.pem", "-out", self.dir / "cert.pem"])
            listen += f" ssl; ssl_certificate {self.dir}/cert.pem; ssl_certificate_key {self.dir}/key.pem"
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"user root;\nworker_processes 1;\ndaemon off;\npid {self.dir}/pid;\nerror_log {self.dir}/error.log;\n"
            "events { worker_connections 64; }\n"
            f"http {{ access_log off; sendfile on; tcp_nopush off; server {{ {listen}; root {root}; }} }}\n"
        )
        self.proc = subprocess.Popen(["nginx", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        wait_port(self.port)

    def url(self, name):
        return f"{self.scheme}://127.0.0.1:{self.port}/{name}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


# ---- results ------------------------------------------------------------------------------------


class MotoServer:
    """moto's S3 server (what the tests use) on a free loopback port."""

    name = "moto"

    def __init__(self, work):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        self.proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=open(work / "moto.log", "w"), env=env,
        )
        self.pid = self.proc.pid
        wait_port(self.port)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # moto loads its S3 backend at the first request, which can take longer than the
        # daemon's volume probe waits (5 s) on a busy machine: the volume would start offline.
        import urllib.request
        try:
            urllib.request.urlopen(self.endpoint, timeout=120).read()
        except urllib.error.URLError:
            pass

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


class AzuriteServer:
    """Azurite's blob service (what the tests use) on a free loopback port, in memory."""

    name = "azurite"
    ACCOUNT = "devstoreaccount1"
    KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

    def __init__(self, work):
        binary = CACHE / "azurite/node_modules/.bin/azurite-blob"
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: scripts/testenv.sh azurite installs it")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
             "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"],
            stdout=subprocess.DEVNULL, stderr=open(work / "azurite.log", "w"),
        )
        self.pid = self.proc.pid
        wait_port(self.port)
        self.endpoint = f"http://127.0.0.1:{self.port}/{self.ACCOUNT}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


class CephCluster:
    """A single-node CephFS (scripts/ceph-single-node.sh: mon, mgr, memstore OSD, MDS,
    ceph-fuse) on its own loopback ports."""

    name = "ceph"

    def __init__(self, work):
        self.dir = work / "ceph-cluster"
        self.script = ROOT / "scripts/ceph-single-node.sh"
        env = {**os.environ, "CEPH_PORT_BASE": str(20000 + 100 * random.randrange(400))}
        out = subprocess.run([self.script, "up", self.dir], capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError("ceph did not come up (scripts/testenv.sh ceph installs it): " + out.stderr[-2000:])
        self.mnt = self.dir / "mnt"

    def stop(self):
        subprocess.run([self.script, "down", self.dir], capture_output=True, timeout=120)


class LoopBtrfs:
    """A btrfs on a loop file with quotas on (what backend = "btrfs" needs)."""

    name = "btrfs loop"

    def __init__(self, work, size=2 << 30):
        self.img, self.mnt = work / "btrfs.img", work / "btrfs"
        self.mnt.mkdir()
        with open(self.img, "wb") as f:
            f.truncate(size)
        run(["mkfs.btrfs", "-q", self.img])
        run(["mount", "-o", "loop", self.img, self.mnt])
        run(["btrfs", "quota", "enable", self.mnt])

    def stop(self):
        subprocess.run(["umount", "-l", self.mnt], capture_output=True)


class Results:
    def __init__(self):
        self.rows = []  # (scenario, system, unit, [values], better)

    def add(self, scenario, system, unit, values, better="higher"):
        values = [float(v) for v in values]
        self.rows.append({"scenario": scenario, "system": system, "unit": unit, "values": values, "better": better})
        m = statistics.median(values)
        log(f"{scenario:<40} {system:<16} {m:12.2f} {unit}  ({min(values):.2f}..{max(values):.2f}, n={len(values)})")

    def median(self, scenario, system):
        for r in self.rows:
            if r["scenario"] == scenario and r["system"] == system:
                return statistics.median(r["values"])
        return None

    def markdown(self, ours="storage-agent"):
        lines = ["| scenario | system | median | spread (min–max) | n | storage-agent ÷ this |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            m = statistics.median(r["values"])
            mine = self.median(r["scenario"], ours)
            if r["system"] == ours or mine is None or m == 0:
                rel = ""
            elif r["better"] == "higher":
                rel = f"{mine / m:.2f}× ({'faster' if mine >= m else 'slower'})"
            else:
                rel = f"{m / mine:.2f}× ({'faster' if mine <= m else 'slower'})" if mine else ""
            spread = f"{min(r['values']):.2f}–{max(r['values']):.2f}"
            lines.append(
                f"| {r['scenario']} | {r['system']} | {m:.2f} {r['unit']} | {spread} | {len(r['values'])} | {rel} |"
            )
        return "\n".join(lines)


# ---- scenarios ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.smoke = args.smoke
        self.rounds = 1 if args.smoke else args.rounds
        self.work = Path(tempfile.mkdtemp(prefix="sa-bench-", dir="/var/tmp"))
        self.sa_bin = args.sa_bin
        self.bench_bin = args.bench_bin
        self.baseline_bin = args.baseline_bin
        self.results = Results()
        self.started = []
        self.big = (8 << 20) if args.smoke else (1 << 30)

    def start(self, thing):
        self.started.append(thing)
        return thing

    def stop_all(self):
        for t in reversed(self.started):
            try:
                t.stop()
            except Exception as e:  # keep stopping the rest
                log(f"stopping {t.name}: {e}")
        # Session containers outlive a stopped daemon (it adopts them at its next start).
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=ai.backend.storage-agent.node=bench-{os.getpid()}"],
            capture_output=True, text=True,
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def bench(self, *args):
        return run([self.bench_bin, *map(str, args)], env={**os.environ, "RUST_BACKTRACE": "0"})

    @staticmethod
    def field(out, key):
        for w in out.replace("\n", " ").split():
            if w.startswith(key + "="):
                v = w.split("=", 1)[1]
                for unit in ("ms", "/s", "s"):
                    v = v.removesuffix(unit)
                return float(v)
        raise RuntimeError(f"no {key} in {out!r}")

    def line_field(self, out, prefix, key):
        for line in out.splitlines():
            if line.startswith(prefix):
                return self.field(line, key)
        raise RuntimeError(f"no {prefix} line in {out!r}")

    # -- uploads

    def uploads(self, sa, py, tus):
        src = self.work / "src.bin"
        random_file(src, self.big)
        warm(src)  # into the page cache: the sender is not the bottleneck
        size = self.big
        label = f"upload {size >> 20} MiB"
        res = {k: [] for k in ["dd", "sa1", "sa16", "py1", "py16", "tus1", "tus16", "off1"]}
        # The same daemon with the checkpoints of a long PATCH pushed out of reach: what they cost.
        off = self.start(StorageAgent(self.work / "no-checkpoints", self.sa_bin, daemon_extra=(
            'upload-checkpoint-interval = "365d"\nupload-checkpoint-bytes = "1000t"\n')))
        for _ in range(self.rounds):
            for who, proxy in (("sa", sa), ("off", off), ("py", py)):
                vfid = proxy.new_vfolder()
                for chunk, key in ((0, "1"), (16 << 20, "16")):
                    if who == "off" and chunk:
                        continue
                    os.sync()  # every upload starts with the disk's writeback drained
                    url = proxy.upload_url(vfid, f"up{key}.bin", size)
                    out = self.bench("upload", "--url", url, "--file", src, "--chunk", chunk)
                    res[who + key].append(self.field(out, "MBps"))
                if who == "sa":
                    d = proxy.vfolder_path(vfid)
                    os.sync()
                    t = time.time()
                    run(["dd", f"if={src}", f"of={d}/dd.bin", "bs=16M", "conv=fsync", "status=none"])
                    res["dd"].append(size / (time.time() - t) / MB)
                empty(proxy.vfolder_path(vfid))
            for chunk, key in ((0, "1"), (16 << 20, "16")):
                os.sync()
                out = self.bench("upload", "--url", tus.endpoint, "--file", src, "--chunk", chunk, "--create")
                res["tus" + key].append(self.field(out, "MBps"))
                empty(tus.dir)
        r = self.results
        for key, scen in (("1", f"{label}, one PATCH"), ("16", f"{label}, 16 MiB PATCHes")):
            r.add(scen, "storage-agent", "MB/s", res["sa" + key])
            if key == "1":
                r.add(scen, "storage-agent, checkpoints off", "MB/s", res["off1"])
            r.add(scen, "python-proxy", "MB/s", res["py" + key])
            r.add(scen, "tus-server", "MB/s", res["tus" + key])
            r.add(scen, "dd conv=fsync", "MB/s", res["dd"])

    # -- downloads, ranges

    def downloads(self, sa, py, nginx_root):
        size = self.big
        # The same binary with zero-copy downloads off: what splice saves, in the same run.
        copying = self.start(StorageAgent(self.work, self.sa_bin, subdir="sa-copying",
                                          daemon_extra="zero-copy-downloads = false\n"))
        # Over TLS every byte is encrypted in the process (no kTLS here): what that costs, beside
        # nginx's OpenSSL doing the same.
        sa_tls = self.start(StorageAgent(self.work, self.sa_bin, subdir="sa-tls", client_tls=True))
        vf_sa, vf_py, vf_copy, vf_tls = sa.new_vfolder(), py.new_vfolder(), copying.new_vfolder(), sa_tls.new_vfolder()
        src = self.work / "src.bin"
        for p in (sa.vfolder_path(vf_sa), py.vfolder_path(vf_py), copying.vfolder_path(vf_copy),
                  sa_tls.vfolder_path(vf_tls)):
            shutil.copy(src, p / "dl.bin")
        shutil.copy(src, nginx_root / "dl.bin")
        nginx = self.start(Nginx(self.work, nginx_root))
        nginx_tls = self.start(Nginx(self.work, nginx_root, tls=True))
        urls = {
            "storage-agent": (sa.download_url(vf_sa, "dl.bin"), sa.pid),
            "storage-agent, copying": (copying.download_url(vf_copy, "dl.bin"), copying.pid),
            "python-proxy": (py.download_url(vf_py, "dl.bin"), py.pid),
            "nginx sendfile": (nginx.url("dl.bin"), nginx.pid),
        }
        self.whole_downloads(urls, src, f"download {size >> 20} MiB")
        self.whole_downloads({
            "storage-agent": (sa_tls.download_url(vf_tls, "dl.bin"), sa_tls.pid),
            "nginx (OpenSSL)": (nginx_tls.url("dl.bin"), nginx_tls.pid),
        }, src, f"download {size >> 20} MiB over HTTPS")
        self.random_ranges(urls, size, 50 if self.smoke else 1000)

    def random_ranges(self, urls, size, n):
        """n random 64 KiB ranges over one connection, each URL in turn within a round (the
        order alternating), warm: the rate and the server's CPU time per request (from /proc's
        10 ms ticks: 10 µs a request over 1000 of them)."""
        rates = {k: [] for k in urls}
        cpu = {k: [] for k in urls}
        for r in range(self.rounds):
            for name, (url, pid) in (list(urls.items()) if r % 2 == 0 else list(urls.items())[::-1]):
                c0 = cpu_seconds(pid)
                out = self.bench("ranges", "--url", url, "--size", size, "--n", n, "--len", 65536)
                cpu[name].append((cpu_seconds(pid) - c0) / n * 1e6)
                rates[name].append(self.field(out, "rate"))
        for name in urls:
            self.results.add(f"{n} random 64 KiB ranges", name, "req/s", rates[name])
        for name in urls:
            self.results.add(f"{n} random 64 KiB ranges: server CPU", name, "µs/req", cpu[name], better="lower")

    def ranges(self):
        """Random ranges alone: ours, the build given as --baseline-bin, and nginx."""
        size = (64 << 20) if self.smoke else self.big
        src = self.work / "rsrc.bin"
        random_file(src, size)
        root = self.work / "www"
        root.mkdir(exist_ok=True)
        shutil.copy(src, root / "dl.bin")
        bins = [("storage-agent", self.sa_bin)] + ([("storage-agent baseline", self.baseline_bin)]
                                                    if self.baseline_bin else [])
        urls = {}
        for i, (name, b) in enumerate(bins):
            sa = self.start(StorageAgent(self.work / f"ranges-{i}", b))
            vfid = sa.new_vfolder()
            shutil.copy(src, sa.vfolder_path(vfid) / "dl.bin")
            warm(sa.vfolder_path(vfid) / "dl.bin")
            urls[name] = (sa.download_url(vfid, "dl.bin"), sa.pid)
        nginx = self.start(Nginx(self.work, root))
        urls["nginx sendfile"] = (nginx.url("dl.bin"), nginx.pid)
        warm(root / "dl.bin")
        # More requests than the full run's row, so /proc's ticks resolve 2 µs a request.
        self.random_ranges(urls, size, 50 if self.smoke else 5000)

    def whole_downloads(self, urls, src, label):
        """Each URL's whole file, warm and cold, interleaved per round: speed and server CPU."""
        size = src.stat().st_size
        for cache in ("warm", "cold"):
            speed = {k: [] for k in urls}
            cpu = {k: [] for k in urls}
            for _ in range(self.rounds):
                for name, (url, pid) in urls.items():
                    if cache == "cold":
                        drop_caches()
                    else:
                        warm(src)
                    c0 = cpu_seconds(pid)
                    bps, n = curl_speed(url)
                    assert n == size, (name, n)
                    speed[name].append(bps / MB)
                    cpu[name].append((cpu_seconds(pid) - c0) / (size / (1 << 30)))
            for name in urls:
                self.results.add(f"{label}, {cache}", name, "MB/s", speed[name])
            for name in urls:
                self.results.add(
                    f"{label}, {cache}: server CPU", name, "s/GiB", cpu[name], better="lower"
                )

    # -- small files

    def small_files(self, sa, py):
        n = 40 if self.smoke else 1000
        for conc in (1, 16):
            res = {"storage-agent": [], "python-proxy": [], "mint": [], "patch": []}
            for _ in range(self.rounds):
                for proxy in (sa, py):
                    vfid = proxy.new_vfolder()
                    out = self.bench(
                        "smallfiles", "--manager", proxy.manager, "--client", proxy.client,
                        "--secret", MANAGER_SECRET, "--volume", "vol1", "--vfid", vfid,
                        "--n", n, "--concurrency", conc, "--size", 4096,
                    )
                    res[proxy.name].append(self.line_field(out, "files", "rate"))
            label = f"4 KiB files (mint + PATCH), {'sequential' if conc == 1 else f'{conc} concurrent clients'}"
            self.results.add(label, "storage-agent", "files/s", res["storage-agent"])
            self.results.add(label, "python-proxy", "files/s", res["python-proxy"])
            if conc == 1:
                raw = []
                for _ in range(self.rounds):
                    d = self.work / f"raw{random.random()}"
                    d.mkdir()
                    dfd = os.open(d, os.O_RDONLY)
                    data = b"Z" * 4096
                    t = time.time()
                    for i in range(n):
                        p = d / f"t{i}"
                        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        os.write(fd, data)
                        os.fsync(fd)
                        os.close(fd)
                        os.rename(p, d / f"f{i}")
                        os.fsync(dfd)
                    raw.append(n / (time.time() - t))
                    os.close(dfd)
                self.results.add(label, "raw write+fsync+rename+dir fsync", "files/s", raw)

    # -- manager API

    def manager_api(self, sa, py):
        n = 10 if self.smoke else 200
        per = {}
        for _ in range(self.rounds):
            for proxy in (sa, py):
                out = self.bench("mgrlat", "--manager", proxy.manager, "--secret", MANAGER_SECRET, "--volume", "vol1", "--n", n)
                for op in ("create", "mkdir", "list"):
                    for stat in ("p50", "p99"):
                        per.setdefault((op, stat, proxy.name), []).append(self.line_field(out, op, stat))
        for op in ("create", "mkdir", "list"):
            for stat in ("p50", "p99"):
                for name in ("storage-agent", "python-proxy"):
                    self.results.add(f"manager API {op}, {stat}", name, "ms", per[(op, stat, name)], better="lower")

    # -- archives and usage

    def archive(self, sa, py):
        files = 8 if self.smoke else 1024
        res = {}
        for proxy in (sa, py):
            vfid = proxy.new_vfolder()
            d = proxy.vfolder_path(vfid) / "z"
            d.mkdir()
            for i in range(files):
                random_file(d / f"f{i:04}.bin", 1 << 20)
            res[proxy] = vfid
        speeds = {sa.name: [], py.name: []}
        for _ in range(self.rounds):
            for proxy, vfid in res.items():
                bps, _ = curl_speed(proxy.download_url(vfid, "z", archive=True))
                speeds[proxy.name].append(bps / MB)
        for name, v in speeds.items():
            self.results.add(f"zip of a folder of {files} × 1 MiB", name, "MB/s", v)

    def usage(self, sa, py):
        files = 500 if self.smoke else 100_000
        trees = {}
        for proxy in (sa, py):
            vfid = proxy.new_vfolder()
            root = proxy.vfolder_path(vfid)
            make_tree(root, files)
            trees[proxy] = (vfid, root)
        for cache in ("warm", "cold"):
            times = {"du -s": [], sa.name: [], py.name: []}
            for _ in range(self.rounds):
                for proxy, (vfid, root) in trees.items():
                    if cache == "cold":
                        drop_caches()
                    else:
                        run(["du", "-s", root])
                    t = time.time()
                    proxy.mgr("/folder/usage", {"volume": "vol1", "vfid": vfid}, method="GET")
                    times[proxy.name].append(time.time() - t)
                    if proxy is sa:
                        if cache == "cold":
                            drop_caches()
                        t = time.time()
                        run(["du", "-s", root])
                        times["du -s"].append(time.time() - t)
            for name, v in times.items():
                self.results.add(f"usage of {files} files, {cache} cache", name, "s", v, better="lower")

    def quota(self):
        """Usage of a quota scope on btrfs: the kernel's counter (GET /quota-scope) against the
        walk the same daemon does for /folder/usage, and du -s."""
        files = 500 if self.smoke else 100_000
        fs = self.start(LoopBtrfs(self.work))
        sa = self.start(StorageAgent(self.work / "quota", self.sa_bin, backend="btrfs", vol=fs.mnt / "vol1"))
        vfid = sa.new_vfolder()
        root = sa.vfolder_path(vfid)
        make_tree(root, files)
        run(["btrfs", "filesystem", "sync", fs.mnt])
        qs = vfid.split("/")[0]
        walk = "storage-agent /folder/usage (walk)"
        for cache in ("warm", "cold"):
            times = {sa.name: [], walk: [], "du -s": []}
            for _ in range(self.rounds):
                steps = (
                    (sa.name, lambda: sa.mgr("/quota-scope", {"volume": "vol1", "qsid": qs}, method="GET")),
                    (walk, lambda: sa.mgr("/folder/usage", {"volume": "vol1", "vfid": vfid}, method="GET")),
                    ("du -s", lambda: run(["du", "-s", root])),
                )
                for name, step in steps:
                    if cache == "cold":
                        drop_caches()
                    else:
                        step()
                    t = time.time()
                    step()
                    times[name].append((time.time() - t) * 1000)
            for name, v in times.items():
                self.results.add(
                    f"usage of a {files}-file quota scope (btrfs), {cache} cache", name, "ms", v, better="lower"
                )

    def cephfs_usage(self):
        """Usage of a quota scope on CephFS (single-node, ceph-fuse): the MDS's recursive
        statistics (GET /quota-scope and /folder/usage of a cephfs volume) against our own walk
        of the same tree (a vfs volume on the same directory) and du -s."""
        files = 200 if self.smoke else 10_000
        ceph = self.start(CephCluster(self.work))
        vol = ceph.mnt / "vol1"
        vol.mkdir()
        sa = self.start(StorageAgent(self.work / "ceph", self.sa_bin, backend="cephfs", vol=vol))
        walker = self.start(StorageAgent(self.work / "ceph-walk", self.sa_bin, backend="vfs", vol=vol))
        vfid = sa.new_vfolder()
        root = sa.vfolder_path(vfid)
        make_tree(root, files)
        os.sync()
        qs = vfid.split("/")[0]
        # Recursive statistics lag writes by a few seconds: wait until they hold the files' sizes.
        # (A walk with lstat semantics, ours, the Python proxy's vfs or du, also adds directory
        # sizes, which on CephFS are their rbytes: it overcounts.)
        want = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        end = time.time() + 120
        while sa.mgr("/folder/usage", {"volume": "vol1", "vfid": vfid}, method="GET")["used_bytes"] != want:
            if time.time() > end:
                raise RuntimeError("ceph.dir.rbytes never reached the files' sizes")
            time.sleep(0.5)
        steps = (
            ("storage-agent GET /quota-scope (rbytes)",
             lambda: sa.mgr("/quota-scope", {"volume": "vol1", "qsid": qs}, method="GET")),
            ("storage-agent /folder/usage (rbytes)",
             lambda: sa.mgr("/folder/usage", {"volume": "vol1", "vfid": vfid}, method="GET")),
            ("storage-agent /folder/usage (walk, vfs)",
             lambda: walker.mgr("/folder/usage", {"volume": "vol1", "vfid": vfid}, method="GET")),
            ("du -s", lambda: run(["du", "-s", root])),
        )
        times = {name: [] for name, _ in steps}
        for _ in range(self.rounds):
            for name, step in steps:
                step()
                t = time.time()
                step()
                times[name].append((time.time() - t) * 1000)
        for name, v in times.items():
            self.results.add(f"usage of a {files}-file quota scope (CephFS), warm", name, "ms", v, better="lower")

    def s3(self):
        """An upload into S3 (moto) and Azure Blob (Azurite) through us (tus, one PATCH, parts
        sent as they fill, `parts-in-flight` at once) against the service's own SDK straight to
        the same service: boto3's upload_file and azure-storage-blob's upload_blob, both with
        their defaults. "parts-in-flight = 1" is the same binary sending one part at a time."""
        size = (16 << 20) if self.smoke else self.big
        moto = self.start(MotoServer(self.work))
        azurite = self.start(AzuriteServer(self.work))
        src = self.work / "s3src.bin"
        random_file(src, size)
        warm(src)
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        services = {
            "S3 (moto)": (
                "s3",
                f'endpoint = "{moto.endpoint}"\nregion = "us-east-1"\naccess-key = "bench"\n'
                'secret-key = "bench-secret"\nbucket-prefix = "bench-"\npart-size = "16m"\n',
                "boto3 upload_file",
                "import boto3, sys, time\n"
                "from boto3.s3.transfer import TransferConfig\n"
                f"s3 = boto3.client('s3', endpoint_url='{moto.endpoint}', aws_access_key_id='bench',"
                " aws_secret_access_key='bench-secret', region_name='us-east-1')\n"
                "b = sys.argv[2]\ns3.create_bucket(Bucket=b)\nt = time.time()\n"
                "s3.upload_file(sys.argv[1], b, 'up.bin', Config=TransferConfig(multipart_chunksize=16 << 20))\n"
                "print(time.time() - t, time.process_time())\n",
            ),
            "Azure (Azurite)": (
                "azure-blob",
                f'endpoint = "{azurite.endpoint}"\naccount = "{AzuriteServer.ACCOUNT}"\n'
                f'account-key = "{AzuriteServer.KEY}"\ncontainer-prefix = "bench-"\npart-size = "16m"\n',
                "Azure SDK upload_blob",
                "import sys, time\n"
                "from azure.storage.blob import BlobServiceClient\n"
                f"svc = BlobServiceClient(account_url='{azurite.endpoint}', credential="
                f"{{'account_name': '{AzuriteServer.ACCOUNT}', 'account_key': '{AzuriteServer.KEY}'}})\n"
                "c = svc.create_container(sys.argv[2])\nt = time.time()\n"
                "with open(sys.argv[1], 'rb') as f:\n    c.upload_blob('up.bin', f, length=None)\n"
                "print(time.time() - t, time.process_time())\n",
            ),
        }
        # boto3 declares a CRC32 per part (botocore >= 1.36), which lets moto build a COMPOSITE
        # checksum from them; with no checksum declared (as object_store sends, and boto3 with
        # request_checksum_calculation="when_required") moto computes a FULL_OBJECT one over a
        # second copy of the whole object in Python. The same SDK both ways says what that costs.
        boto3_plain = services["S3 (moto)"][3].replace(
            "region_name='us-east-1')",
            "region_name='us-east-1', config=botocore.config.Config("
            "request_checksum_calculation='when_required'))",
        ).replace("import boto3,", "import boto3, botocore.config,")
        for service, (backend, extra, peer, script) in services.items():
            daemons = [
                (name, self.start(StorageAgent(self.work / f"s3-{backend}-{i}", self.sa_bin, backend=backend,
                                               volume_extra=extra + more)))
                for i, (name, more) in enumerate([("storage-agent", ""),
                                                  ("storage-agent, parts-in-flight = 1", "parts-in-flight = 1\n")])
            ]
            service_pid = moto.pid if backend == "s3" else azurite.pid
            gib = size / (1 << 30)
            # Where the two cores go: the service's CPU and the uploader's (our daemon, or the
            # SDK's Python process, its whole process time), per GiB.
            res, service_cpu, uploader_cpu = {}, {}, {}
            for i in range(self.rounds):
                for name, sa in daemons:
                    vfid = sa.new_vfolder()
                    c0, u0 = cpu_seconds(service_pid), cpu_seconds(sa.pid)
                    out = self.bench("upload", "--url", sa.upload_url(vfid, "up.bin", size), "--file", src,
                                     "--chunk", 0)
                    res.setdefault(name, []).append(self.field(out, "MBps"))
                    service_cpu.setdefault(name, []).append((cpu_seconds(service_pid) - c0) / gib)
                    uploader_cpu.setdefault(name, []).append((cpu_seconds(sa.pid) - u0) / gib)
                peers = [(peer, script)]
                if backend == "s3":
                    peers.append(("boto3 upload_file, no checksum declared", boto3_plain))
                for j, (peer_name, peer_script) in enumerate(peers):
                    c0 = cpu_seconds(service_pid)
                    secs, own = map(float, subprocess.run(
                        ["python3", "-c", peer_script, str(src), f"sdk-{os.getpid()}-{i}-{j}"],
                        check=True, capture_output=True, text=True, env=env,
                    ).stdout.split())
                    res.setdefault(peer_name, []).append(size / secs / MB)
                    service_cpu.setdefault(peer_name, []).append((cpu_seconds(service_pid) - c0) / gib)
                    uploader_cpu.setdefault(peer_name, []).append(own / gib)
            label = f"upload {size >> 20} MiB into {service}"
            for name, v in res.items():
                self.results.add(label, name, "MB/s", v)
            for name, v in service_cpu.items():
                self.results.add(f"{label}: {moto.name if backend == 's3' else azurite.name} CPU", name, "s/GiB", v,
                                 better="lower")
            for name, v in uploader_cpu.items():
                self.results.add(f"{label}: uploader CPU", name, "s/GiB", v, better="lower")

    def object_uploads(self):
        """Uploads into S3 (moto) and Azure Blob (Azurite) through us, and through the binary
        given as --baseline-bin (e.g. the build before a change), interleaved in each round:
        the ratio says whether the change cost throughput. One PATCH, and PATCHes of one part
        (16 MiB) each carrying an Upload-Checksum (the path security review 2 bounded)."""
        size = (16 << 20) if self.smoke else (256 << 20)
        src = self.work / "objsrc.bin"
        random_file(src, size)
        warm(src)
        moto = self.start(MotoServer(self.work))
        azurite = self.start(AzuriteServer(self.work))
        services = {
            "S3 (moto)": ("s3", f'endpoint = "{moto.endpoint}"\nregion = "us-east-1"\naccess-key = "bench"\n'
                          'secret-key = "bench-secret"\nbucket-prefix = "bench-"\npart-size = "16m"\n'),
            "Azure (Azurite)": ("azure-blob", f'endpoint = "{azurite.endpoint}"\naccount = "{AzuriteServer.ACCOUNT}"\n'
                                f'account-key = "{AzuriteServer.KEY}"\ncontainer-prefix = "bench-"\npart-size = "16m"\n'),
        }
        bins = [("storage-agent", self.sa_bin)]
        if self.baseline_bin:
            bins.append(("storage-agent baseline", self.baseline_bin))
        for service, (backend, extra) in services.items():
            daemons = [
                (name, self.start(StorageAgent(self.work / f"obj-{backend}-{i}", b, backend=backend, volume_extra=extra)))
                for i, (name, b) in enumerate(bins)
            ]
            res = {}
            for r in range(self.rounds):
                # Alternating who goes first: the service slows down as it fills.
                for name, sa in (daemons if r % 2 == 0 else daemons[::-1]):
                    for chunk, how in ((0, "one PATCH"), (16 << 20, "16 MiB checksummed PATCHes")):
                        vfid = sa.new_vfolder()
                        args = ["upload", "--url", sa.upload_url(vfid, "up.bin", size), "--file", src, "--chunk", chunk]
                        if chunk:
                            args.append("--checksum")
                        out = self.bench(*args)
                        res.setdefault((how, name), []).append(self.field(out, "MBps"))
            for (how, name), v in res.items():
                self.results.add(f"upload {size >> 20} MiB into {service}, {how}", name, "MB/s", v)

    def streams(self):
        """`ctl upload` of one big file in 1, 2 and 4 streams (tus concatenation: partial
        uploads sent at once, joined by the final upload) into a vfs volume and into S3 (moto).
        "storage-agent" is ctl's default (4 streams); the ratio says what the streams bring."""
        size = (64 << 20) if self.smoke else (1 << 30)
        src = self.work / "streamsrc.bin"
        random_file(src, size)
        warm(src)
        moto = self.start(MotoServer(self.work))
        s3 = (f'endpoint = "{moto.endpoint}"\nregion = "us-east-1"\naccess-key = "bench"\n'
              'secret-key = "bench-secret"\nbucket-prefix = "bench-"\npart-size = "16m"\n')
        targets = {
            "vfs": self.start(StorageAgent(self.work / "st-vfs", self.sa_bin)),
            # moto (one Python process) stalls for seconds while it completes a 1 GiB multipart
            # upload: the volume's health probe must outwait it, or the volume goes offline.
            "S3 (moto)": self.start(StorageAgent(self.work / "st-s3", self.sa_bin, backend="s3", volume_extra=s3,
                                                 daemon_extra='volume-check-timeout = "120s"\n')),
        }
        env = dict(os.environ, XDG_CACHE_HOME=str(self.work / "ctl-cache"))
        names = {1: "--streams 1", 2: "--streams 2", 4: "storage-agent"}
        for target, sa in targets.items():
            res = {n: [] for n in names}
            for r in range(self.rounds):
                # Alternating who goes first: a service slows down as it fills.
                for n in (names if r % 2 == 0 else list(names)[::-1]):
                    vfid = sa.new_vfolder()
                    t = time.time()
                    subprocess.run(
                        [self.sa_bin, "ctl", "--config", sa.dir / "storage-agent.toml", "--json", "upload", "vol1",
                         vfid, src, "--streams", str(n)],
                        check=True, capture_output=True, env=env,
                    )
                    res[n].append(size / (time.time() - t) / MB)
                    try:
                        sa.mgr("/folder/delete", {"volume": "vol1", "vfid": vfid})
                    except urllib.error.HTTPError as e:
                        log(f"deleting {vfid}: {e.code} {e.read()[:300]!r}")
            for n, v in res.items():
                self.results.add(f"ctl upload {size >> 20} MiB into {target}", names[n], "MB/s", v)

    # -- concurrency, memory

    def concurrent(self, sa, py, tus):
        size = (2 << 20) if self.smoke else (256 << 20)
        src = self.work / "c.bin"
        random_file(src, size)
        warm(src)
        res = {sa.name: [], py.name: [], "tus-server": []}
        for _ in range(self.rounds):
            for proxy in (sa, py):
                vfid = proxy.new_vfolder()
                out = self.bench(
                    "concurrent-uploads", "--file", src, "--n", 8, "--manager", proxy.manager,
                    "--client", proxy.client, "--secret", MANAGER_SECRET, "--volume", "vol1", "--vfid", vfid,
                )
                res[proxy.name].append(self.field(out, "MBps"))
                empty(proxy.vfolder_path(vfid))
            out = self.bench("concurrent-uploads", "--file", src, "--n", 8, "--tus-endpoint", tus.endpoint)
            res["tus-server"].append(self.field(out, "MBps"))
            empty(tus.dir)
        for name, v in res.items():
            self.results.add(f"8 concurrent {size >> 20} MiB uploads", name, "MB/s (all)", v)

    def memory(self, servers):
        for s in servers:
            self.results.add("peak RSS over the run", s.name, "MiB", [peak_rss_mib(s.pid)], better="lower")

    # -- sessions

    def sessions(self):
        lo = 33000 + random.randrange(500)
        # Published on every address: loopback goes through docker-proxy, the node's own address
        # through the kernel's DNAT, as a user on another host would.
        sa = StorageAgent(self.work / "sess", self.sa_bin, (lo, lo + 60), public_addr="0.0.0.0")
        self.started.append(sa)
        user = str(uuid.uuid4())
        vfid = f"user:{user}/{uuid.uuid4().hex}"
        sa.mgr("/folder/create", {"volume": "vol1", "vfid": vfid})
        key = self.work / "sesskey"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
        n = 2 if self.smoke else 20
        lat = {"p50": [], "p99": []}
        for _ in range(1):
            out = self.bench(
                "session-latency", "--rpc", sa.rpc, "--secret", RPC_SECRET, "--volume", "vol1",
                "--vfid", vfid, "--user", user, "--pubkey", f"{key}.pub", "--key", key, "--n", n,
            )
            lat["p50"].append(self.field(out, "p50"))
            lat["p99"].append(self.field(out, "p99"))
        for stat, v in lat.items():
            self.results.add(f"SFTP CreateSession → first login, {stat} of {n}", "storage-agent", "ms", v, better="lower")
        # 1 GiB put and get: through a session vs the host's sshd on loopback.
        out = self.bench(
            "create", "--rpc", sa.rpc, "--secret", RPC_SECRET, "--volume", "vol1", "--vfid", vfid,
            "--user", user, "--pubkey", f"{key}.pub",
        )
        sport = int(out.split("port=")[1].split()[0])
        host = self.start(HostSshd(self.work, f"{key}.pub"))
        src = self.work / "src.bin"
        if not src.exists():  # run alone (--only sessions)
            random_file(src, self.big)
        opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-i", str(key)]
        hostdir = self.work / "hostsftp"
        hostdir.mkdir()
        size = src.stat().st_size

        def sftp(port, user, batch, addr="127.0.0.1", cipher=None):
            t = time.time()
            extra = ["-c", cipher] if cipher else []
            subprocess.run(["sftp", *opts, *extra, "-P", str(port), "-b", "-", f"{user}@{addr}"], input=batch,
                           text=True, check=True, capture_output=True)
            return size / (time.time() - t) / MB

        node = node_addr()
        container = run(["docker", "ps", "-q", "--filter",
                         f"label=ai.backend.storage-agent.node=bench-{os.getpid()}"]).split()[0]
        gcm = "aes128-gcm@openssh.com"
        # What a get reads is warmed from the host first, for both: a file just written through
        # a session is partly out of the page cache, because the memory cgroup charges the pages a
        # container writes to its memory limit (1 GiB by default, sshd included) and reclaims
        # them there. One row shows that case: a get right after its put.
        in_vfolder = sa.vfolder_path(vfid)
        # (row name, port, user, remote dir, its host path, address, cipher, session CPUs, warm)
        systems = [
            ("storage-agent", sport, "work", "data", in_vfolder, "127.0.0.1", None, 1, True),
            ("storage-agent, node address", sport, "work", "data", in_vfolder, node, None, 1, True),
            (f"storage-agent, node address, {gcm.split('@')[0]}", sport, "work", "data", in_vfolder, node, gcm, 1,
             True),
            ("storage-agent, node address, 2 CPUs", sport, "work", "data", in_vfolder, node, None, 2, True),
            ("storage-agent, node address, read back at once", sport, "work", "data", in_vfolder, node, None, 1,
             False),
            ("host sshd", host.port, "root", hostdir, hostdir, "127.0.0.1", None, None, True),
            ("host sshd, node address", host.port, "root", hostdir, hostdir, node, None, None, True),
            (f"host sshd, node address, {gcm.split('@')[0]}", host.port, "root", hostdir, hostdir, node, gcm, None,
             True),
        ]
        res = {}
        for _ in range(self.rounds):
            for name, port, user, rdir, on_host, addr, cipher, cpus, warm_first in systems:
                if cpus:
                    run(["docker", "update", "--cpus", str(cpus), container])
                warm(src)
                res.setdefault(("put", name), []).append(
                    sftp(port, user, f"put {src} {rdir}/s.bin\n", addr, cipher))
                if warm_first:
                    warm(on_host / "s.bin")
                res.setdefault(("get", name), []).append(
                    sftp(port, user, f"get {rdir}/s.bin /dev/null\n", addr, cipher))
        for (op, name), v in sorted(res.items(), key=lambda kv: kv[0][0] != "put"):
            self.results.add(f"sftp {op} {size >> 20} MiB", name, "MB/s", v)


class HostSshd:
    name = "sshd"

    def __init__(self, work, pubkey):
        d = work / "sshd"
        d.mkdir()
        self.port = free_port()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "hostkey"])
        shutil.copy(pubkey, d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nListenAddress {node_addr()}\nHostKey {d}/hostkey\n"
            f"PidFile {d}/pid\n"
            f"PermitRootLogin prohibit-password\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\n"
            "UsePAM no\nSubsystem sftp internal-sftp\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", d / "sshd_config"])
        wait_port(self.port)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def node_addr():
    """The address other hosts reach this one at (the source of the default route), or
    loopback on a machine without one."""
    try:
        out = subprocess.run(["ip", "-4", "route", "get", "192.0.2.254"], capture_output=True, text=True).stdout
        return out.split(" src ")[1].split()[0]
    except (IndexError, OSError):
        return "127.0.0.1"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    fs = run(["df", "-T", "/var/tmp"]).splitlines()[-1].split()[1]
    return f"{os.cpu_count()} × {cpu}, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, /var/tmp on {fs}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sa-bin", default=str(ROOT / "target/release/storage-agent"))
    ap.add_argument("--bench-bin", default=str(ROOT / "target/release/examples/bench"))
    ap.add_argument("--baseline-bin", help="another storage-agent build measured beside ours in "
                    "object_uploads and ranges (e.g. the commit before a change)")
    ap.add_argument("--skip-sessions", action="store_true", help="without Docker")
    ap.add_argument("--only", help="one scenario (uploads, downloads, small_files, manager_api, "
                    "archive, usage, quota, cephfs_usage, s3, object_uploads, streams, concurrent, sessions, ranges); results are printed, RESULTS.md untouched")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (drop_caches, sshd, Docker)")
    b = Bench(args)
    t0 = time.time()
    try:
        # Scenarios that start their own systems need none of the shared ones.
        standalone = {"quota": b.quota, "cephfs_usage": b.cephfs_usage, "s3": b.s3, "object_uploads": b.object_uploads,
                      "streams": b.streams, "sessions": b.sessions, "ranges": b.ranges}
        if args.only in standalone:
            standalone[args.only]()
            return
        sa = b.start(StorageAgent(b.work, args.sa_bin))
        py = b.start(PythonProxy(b.work))
        tus = b.start(TusServer(b.work))
        nginx_root = b.work / "www"
        nginx_root.mkdir()
        steps = {
            "uploads": lambda: b.uploads(sa, py, tus),
            "downloads": lambda: b.downloads(sa, py, nginx_root),
            "small_files": lambda: b.small_files(sa, py),
            "manager_api": lambda: b.manager_api(sa, py),
            "archive": lambda: b.archive(sa, py),
            "usage": lambda: b.usage(sa, py),
            "quota": b.quota,
            "cephfs_usage": b.cephfs_usage,
            "s3": b.s3,
            "object_uploads": b.object_uploads,
            "streams": b.streams,
            "concurrent": lambda: b.concurrent(sa, py, tus),
        }
        if args.only:
            if args.only in ("downloads",):
                random_file(b.work / "src.bin", b.big)
            (b.sessions if args.only == "sessions" else steps[args.only])()
            return
        for step in steps.values():
            step()
        b.memory([sa, py, tus])
        if not args.skip_sessions:
            b.sessions()
    finally:
        b.stop_all()
    took = time.time() - t0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header = (
        f"# Benchmark results\n\nMeasured {stamp} by `bench/run.sh{' --smoke' if args.smoke else ''}` in {took / 60:.1f} min "
        f"on {machine()}; release build; every system on loopback, interleaved within each round; "
        f"median of {b.rounds} round(s) with the spread. \"storage-agent ÷ this\" compares the "
        "medians (throughput: ours over theirs; times: theirs over ours), so above 1× is storage-agent ahead.\n\n"
    )
    body = header + b.results.markdown() + "\n"
    analysis = ROOT / "bench/ANALYSIS.md"
    if analysis.exists():
        body += "\n" + analysis.read_text()
    outdir = ROOT / "bench/results"
    outdir.mkdir(exist_ok=True)
    tag = "smoke-" if args.smoke else ""
    (outdir / f"{tag}{stamp}.json").write_text(json.dumps(b.results.rows, indent=1))
    target = outdir / f"{tag}{stamp}.md" if args.smoke else ROOT / "bench/RESULTS.md"
    target.write_text(body)
    log(f"wrote {target} ({took:.0f} s)")


if __name__ == "__main__":
    main()
