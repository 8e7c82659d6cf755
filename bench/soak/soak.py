#!/usr/bin/env python3
"""The soak: two storage-agent nodes under a steady mix of users for a while, with their
dependencies failing underneath on a schedule; invariants checked as it runs and at the end,
resources sampled, and a report (tables and a plot) written.

    bench/run.sh --soak [--minutes 60]     the full run: bench/SOAK.md and bench/soak.svg
    bench/soak/soak.py --smoke             about 3 minutes, every fault once (scripts/test.sh):
                                           fails on any broken invariant; its report goes to
                                           bench/results/
Run as root with Docker, redis-server/redis-sentinel, etcd, moto_server, rclone, sftp, curl.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import Etcd, Moto, Node, RedisGroup  # noqa: E402
from common import MANAGER_SECRET, http, log  # noqa: E402
from faults import Faults  # noqa: E402
from load import CtlUploader, Downloader, Janitor, ManagerOps, Recorder, Uploader  # noqa: E402
from report import Report  # noqa: E402
from sessions import LimitProbe, SessionUser, docker_ids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
SA_CACHE = Path(os.environ.get("SA_CACHE", Path.home() / ".cache/storage-agent"))
NEEDS = {
    "docker": "scripts/testenv.sh docker", "redis-server": "apt-get install redis-server",
    "redis-sentinel": "apt-get install redis-sentinel", "etcd": "apt-get install etcd-server",
    "etcdctl": "apt-get install etcd-client", "moto_server": "pip install 'moto[server]'",
    "rclone": "apt-get install rclone", "sftp": "apt-get install openssh-client", "curl": "apt-get install curl",
    "mkfs.ext4": "apt-get install e2fsprogs",
}


class Soak:
    def __init__(self, args):
        self.args, self.smoke, self.root = args, args.smoke, ROOT
        self.rec = Recorder()
        self.stopping = threading.Event()
        self.manager_secret = MANAGER_SECRET
        self.completed, self.verify_queue = [], []
        # Relpaths being downloaded, with how many readers each (two downloaders may read one file;
        # the first to finish must not make it fair game): the janitor leaves them.
        self.reading = Counter()
        self.files_lock = threading.Lock()
        self.live_sessions, self.destroyed = {}, {}
        self.over_limit_admissions = []
        self.samples = []  # dicts, one per sampling tick
        self.limit_user = str(uuid.uuid4())
        self.ops_user = str(uuid.uuid4())
        self.work = Path(tempfile.mkdtemp(prefix="sa-soak.", dir="/var/tmp"))
        self.key = self.work / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.nodes = []

    def new_user(self):
        return str(uuid.uuid4())

    # ---- setup ----------------------------------------------------------------------------

    def start(self):
        missing = [f"{b} ({hint})" for b, hint in NEEDS.items() if not shutil.which(b)]
        if missing:
            raise SystemExit("missing: " + ", ".join(missing))
        self.redis = RedisGroup(self.work)
        self.etcd = Etcd(self.work, self.redis)
        self.moto = Moto(self.work)
        dufs = SA_CACHE / "dufs/bin/dufs"
        if not dufs.exists():
            raise SystemExit(f"{dufs} is missing: scripts/testenv.sh dufs")
        base = 36000 + (os.getpid() % 50) * 40
        for i, name in enumerate(("a", "b")):
            self.nodes.append(Node(self.work, name, self.args.sa_bin, self.etcd, self.moto, (base + i * 20, base + i * 20 + 19),
                                   dufs))
        for n in self.nodes:
            n.wait_ready(120)
        self.vfolders = {(n.name, v): n.new_vfolder(v, self.new_user()) for n in self.nodes for v in ("vol1", "s3")}
        log(f"work {self.work}; nodes up: " + ", ".join(f"{n.name} pid {n.proc.pid}" for n in self.nodes))

    def workers(self):
        w = [Uploader(self, "upload vfs", "vol1"), Uploader(self, "upload s3", "s3"), Uploader(self, "upload vfs 2", "vol1"),
             CtlUploader(self, "ctl upload"), Downloader(self, "download"), Downloader(self, "download 2"),
             ManagerOps(self, "manager ops"), LimitProbe(self, "limit probe"), Janitor(self, "janitor")]
        w += [SessionUser(self, f"sessions {n.name}", n) for n in self.nodes]
        return w

    # ---- sampling ---------------------------------------------------------------------------

    def limit_sessions(self):
        """The limit user's sessions running on both nodes together (None if a node cannot say)."""
        out = []
        for n in self.nodes:
            try:
                rc, stdout, _ = n.ctl("session", "list", timeout=60)
            except subprocess.TimeoutExpired:
                return None
            if rc != 0:
                return None
            out += [s for s in json.loads(stdout)["sessions"] if s["user_id"] == self.limit_user and s["state"] == "running"]
        return out

    def sample(self):
        t = time.time() - self.rec.t0
        row = {"t": t}
        for n in self.nodes:
            pid = n.proc.pid
            try:
                status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
                row[f"{n.name}.rss_mib"] = int(status["VmRSS"].split()[0]) / 1024
                row[f"{n.name}.threads"] = int(status["Threads"])
                row[f"{n.name}.fds"] = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, KeyError, ValueError):
                pass
            row[f"{n.name}.sqlite_kib"] = sum(p.stat().st_size for p in n.state.glob("state.db*")) / 1024
            try:
                st, _, body = http("GET", f"http://127.0.0.1:{n.internal_port}/metrics", timeout=10)
                for line in body.decode().splitlines():
                    if line.startswith("backendai_async_task_count"):
                        row[f"{n.name}.tasks"] = float(line.split()[-1])
                    elif line.startswith('storage_agent_heap_bytes{state="in_use"}'):
                        row[f"{n.name}.heap_mib"] = float(line.split()[-1]) / (1 << 20)
            except OSError:
                pass
            row[f"{n.name}.restarts"] = n.restarts
        ids = docker_ids(f"ai.backend.storage-agent.node={self.nodes[0].node_id}") or []
        ids += docker_ids(f"ai.backend.storage-agent.node={self.nodes[1].node_id}") or []
        row["containers"] = len(ids)
        with self.rec.lock:
            recent = [op for op in self.rec.ops if op[0] > t - 30 and op[3] == "ok"]
        for kind in sorted({op[1] for op in recent}):
            lat = sorted(op[2] for op in recent if op[1] == kind)
            row[f"p99.{kind}"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        running = self.limit_sessions()
        if running is not None:
            row["limit_user_running"] = len(running)
            if len(running) > 1:
                self.rec.violation(f"the limit user has {len(running)} sessions running on the two nodes (limit 1): "
                                   + ", ".join(s["id"] for s in running))
        self.samples.append(row)
        # Kept with the logs (--keep), to look at the numbers again without another run.
        with open(self.work / "samples.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def sampler(self):
        while not self.stopping.is_set():
            t = time.time()
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - the sampler must outlive a bad read
                log(f"sample failed: {e}")
            for n in self.nodes:  # systemd's Restart=always, between faults too
                if not self.rec.down.get(n.name) and n.supervise():
                    self.rec.violation(f"{n.name} exited by itself (restart {n.restarts})")
            self.stopping.wait(max(0.0, self.args.sample_every - (time.time() - t)))

    # ---- the run ----------------------------------------------------------------------------

    def run(self):
        minutes = 3 if self.smoke else self.args.minutes
        faults = Faults(self)
        schedule = faults.all()
        workers = self.workers()
        for w in workers:
            w.start()
        threading.Thread(target=self.sampler, daemon=True).start()
        end = self.rec.t0 + minutes * 60
        # Faults spread evenly after a warm-up of a tenth of the run, the last well before the
        # end; the smoke runs them back to back after 20 s.
        gap = (minutes * 60 * 0.8) / (len(schedule) + 1)
        for i, (name, fn) in enumerate(schedule):
            at = self.rec.t0 + (20 + 5 * i if self.smoke else minutes * 60 * 0.1 + gap * (i + 1))
            while time.time() < at:
                time.sleep(0.5)
            try:
                faults.run(name, fn)
            except Exception as e:  # noqa: BLE001 - a fault that cannot be injected is reported
                self.rec.violation(f"fault '{name}' could not be injected or undone: {e}")
        end = max(end, time.time() + 20)
        while time.time() < end:
            time.sleep(1)
        log("load stops; in-flight work finishes")
        self.stopping.set()
        for w in workers:
            w.join(600)
            if w.is_alive():
                self.rec.violation(f"worker {w.name} did not finish within 600 s of the stop")
        self.final_checks()

    def final_checks(self):
        """What must be gone once the load has stopped and the grace times have passed."""
        self.checks = {}
        for n in self.nodes:
            rc, out, _ = n.ctl("session", "list", timeout=120)
            for s in json.loads(out)["sessions"] if rc == 0 else []:
                n.ctl("session", "destroy", s["id"], timeout=120)
        # Documented grace: mount-linger (10 s) for rclone mounts, a sweep for containers.
        end = time.time() + 120
        while time.time() < end:
            state = self.leftovers()
            if not any(state.values()):
                break
            time.sleep(3)
        for k, v in self.leftovers().items():
            self.checks[k] = "none" if not v else f"{len(v)}: {v[:5]}"
            if v:
                self.rec.violation(f"left over after the grace: {k}: {v[:5]}")
        # Every completed upload once more, at the end (after every fault): still byte-identical.
        dl = Downloader(self, "final check")
        self.stopping.clear()
        for f in list(self.completed):
            dl.whole(*f)
        self.stopping.set()
        self.checks["completed uploads re-read at the end"] = str(len(self.completed))
        # A node ending a session because another node admitted one beyond the limit means the
        # limit was exceeded, however briefly.
        for n in self.nodes:
            log_text = (n.dir / "log").read_text(errors="replace")
            over = log_text.count("per-user limit reached while this session's lease was lost")
            if over:
                self.rec.violation(f"{n.name} ended {over} session(s) admitted beyond the per-user limit "
                                   "while their leases were lost")

    def leftovers(self):
        out = {}
        ids = []
        for n in self.nodes:
            ids += docker_ids(f"ai.backend.storage-agent.node={n.node_id}") or []
        out["containers"] = ids
        mounts = [line.split()[1] for line in open("/proc/mounts")
                  if str(self.work) in line.split()[1] and not line.split()[1].endswith("-state")]
        out["mounts (FUSE, session binds)"] = mounts
        out["staging files (vfs .upload/)"] = [str(p) for n in self.nodes for p in n.vol.glob("*/.upload/*")]
        out["staging files (object parts on the state disk)"] = [
            str(p) for n in self.nodes for p in (n.state / "objects").rglob("*") if p.is_file()]
        try:
            s3 = self.moto.client()
            multipart = []
            for b in s3.list_buckets()["Buckets"]:
                if b["Name"].startswith("soak-"):
                    multipart += [f"{b['Name']}/{u['Key']}" for u in s3.list_multipart_uploads(Bucket=b["Name"]).get("Uploads", [])]
            out["multipart uploads in S3"] = multipart
        except Exception as e:  # noqa: BLE001
            out["multipart uploads in S3"] = [f"cannot list: {e}"]
        return out

    def stop(self):
        self.stopping.set()
        for n in self.nodes:
            n.stop()
        for n in self.nodes:
            for c in docker_ids(f"ai.backend.storage-agent.node={n.node_id}") or []:
                subprocess.run(["docker", "rm", "-f", c], capture_output=True)
        for p in (getattr(self, "moto", None), getattr(self, "etcd", None)):
            if p:
                p.proc.stop()
        if getattr(self, "redis", None):
            self.redis.stop()
        subprocess.run(["pkill", "-f", f"rclone mount.*{self.work}"], check=False)
        for line in reversed(open("/proc/mounts").read().splitlines()):
            if str(self.work) in line.split()[1]:
                subprocess.run(["umount", "-l", line.split()[1]], check=False)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sample-every", type=float, default=5)
    ap.add_argument("--sa-bin", default=str(ROOT / "target/release/storage-agent"))
    ap.add_argument("--out", default=None, help="report file (default bench/SOAK.md; smoke: bench/results/)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    soak = Soak(args)
    try:
        soak.start()
        soak.run()
    finally:
        soak.stop()
    out = Path(args.out) if args.out else (ROOT / "bench/results/soak-smoke.md" if args.smoke else ROOT / "bench/SOAK.md")
    ok = Report(soak).write(out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
