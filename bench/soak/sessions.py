"""Sessions as users have them: SFTP and file-browser sessions created, used (a put and a get)
and destroyed on both nodes, some on an S3 vfolder (an rclone mount); and CreateSession at the
per-user limit from both nodes, with the sessions of that user counted on both nodes together."""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from load import HANG, Worker


def docker_ids(*filters):
    args = ["docker", "ps", "-aq"]
    for f in filters:
        args += ["--filter", f"label={f}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return r.stdout.split() if r.returncode == 0 else None


def sftp(port, user, key, batch):
    r = subprocess.run(
        ["sftp", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-i", str(key), "-P", str(port), "-b", "-",
         f"{user}@127.0.0.1"], input=batch, capture_output=True, text=True, timeout=HANG)
    return r.returncode, r.stderr


class SessionUser(Worker):
    """One user's sessions on one node, one at a time: create, use, destroy, and check that
    the container is gone."""

    def __init__(self, soak, name, node):
        super().__init__(soak, name)
        self.node = node
        self.user = soak.new_user()
        self.vf = node.new_vfolder("vol1", self.user)
        self.s3vf = node.new_vfolder("s3", self.user)
        self.n = 0

    def create(self, kind, mounts):
        node = self.node
        args = ["session", "create", kind, "--user", self.user]
        for m in mounts:
            args += ["--mount", m]
        if kind == "sftp":
            args += ["--key", str(self.soak.key) + ".pub"]
        t = time.time()
        for _ in range(60):
            try:
                rc, out, err = node.ctl(*args, timeout=HANG)
            except subprocess.TimeoutExpired:
                self.rec.violation(f"session create on {node.name}: no answer in {HANG}s")
                return None
            if rc == 0:
                self.rec.op(f"{kind} session create", time.time() - t)
                return json.loads(out)
            status = self.status(err)
            self.rec.op(f"{kind} session create", time.time() - t, status)
            if status == "gRPC RESOURCE_EXHAUSTED":
                # Our previous session is still counted (a node restarted before destroying it,
                # its lease has not run out): a documented refusal; try later.
                time.sleep(5)
                continue
            if self.rec.any_fault_active() or self.rec.node_unavailable(node.name) or status == "gRPC UNAVAILABLE":
                time.sleep(3)
                continue
            self.rec.violation(f"session create on {node.name}: exit {rc}: {err.strip()[:400]}")
            return None
        return None

    @staticmethod
    def status(err):
        """The gRPC status `ctl` reported ("ResourceExhausted: ..." or "RESOURCE_EXHAUSTED")."""
        flat = err.upper().replace("_", "").replace(" ", "")
        for word in ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION",
                     "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"):
            if word.replace("_", "") in flat:
                return f"gRPC {word}"
        return "ctl error: " + err.strip().splitlines()[-1][:60] if err.strip() else "ctl error"

    def step(self):
        self.n += 1
        kind = "sftp" if self.n % 3 else "filebrowser"
        on_s3 = self.n % 4 == 0
        vf, vol = (self.s3vf, "s3") if on_s3 else (self.vf, "vol1")
        s = self.create(kind, [f"{vol}:{vf}:data"])
        if not s:
            time.sleep(5)
            return
        sid = s["id"]
        self.soak.live_sessions[sid] = (self.node, s)
        try:
            if kind == "sftp":
                self.use_sftp(s, vol)
            else:
                self.use_filebrowser(s, vol)
        finally:
            self.destroy(sid)
        time.sleep(self.rng.uniform(2, 8))

    def use_sftp(self, s, vol):
        port = s["endpoints"][0]["port"]
        with tempfile.TemporaryDirectory(dir=self.soak.work) as d:
            src, back = Path(d) / "up", Path(d) / "down"
            # Below rclone's streaming cutoff (100 KiB): moto answers rclone's streamed multipart
            # uploads with 400 (real S3 takes them; tests/e2e/object_sessions.rs says the same).
            src.write_bytes(os.urandom(64 << 10))
            t, end = time.time(), time.time() + 90
            while True:
                rc, err = sftp(port, s["username"], self.soak.key, f"put {src} data/soak-{self.n}\nget data/soak-{self.n} {back}\n")
                if rc == 0 or time.time() > end or self.stopping.is_set():
                    break
                time.sleep(2)  # sshd may still be starting
            if rc != 0:
                if self.ended_by_node(s["id"]):
                    self.rec.op(f"sftp put+get ({vol})", time.time() - t, "session ended by its node")
                elif self.rec.any_fault_active():
                    self.rec.op(f"sftp put+get ({vol})", time.time() - t, "failed during a fault")
                else:
                    self.rec.violation(f"sftp on {self.node.name} ({vol}) session {s['id']}: {err.strip()[-300:]}")
                return
            if back.read_bytes() != src.read_bytes():
                self.rec.violation(f"sftp get on {self.node.name} ({vol}): bytes differ from the put")
            self.rec.op(f"sftp put+get ({vol})", time.time() - t)

    def use_filebrowser(self, s, vol):
        url = s["endpoints"][0]["url"].rstrip("/")
        with tempfile.TemporaryDirectory(dir=self.soak.work) as d:
            ca = Path(d) / "ca.pem"
            ca.write_text(s["ca_certificate_pem"])
            src = Path(d) / "up"
            src.write_bytes(os.urandom(64 << 10))
            auth = f"{s['username']}:{s['password']}"
            t, end = time.time(), time.time() + 90
            while True:
                put = subprocess.run(["curl", "-sS", "--max-time", "60", "--cacert", str(ca), "-u", auth, "-o",
                                      "/dev/null", "-w", "%{http_code}", "-T", str(src), f"{url}/data/fb-{self.n}"],
                                     capture_output=True, text=True, timeout=HANG)
                if put.stdout.strip() in ("200", "201") or time.time() > end or self.stopping.is_set():
                    break
                time.sleep(2)
            get = subprocess.run(["curl", "-fsS", "--max-time", "60", "--cacert", str(ca), "-u", auth,
                                  f"{url}/data/fb-{self.n}"], capture_output=True, timeout=HANG)
            if put.stdout.strip() not in ("200", "201") or get.returncode != 0:
                if self.ended_by_node(s["id"]):
                    self.rec.op(f"filebrowser put+get ({vol})", time.time() - t, "session ended by its node")
                elif self.rec.any_fault_active():
                    self.rec.op(f"filebrowser put+get ({vol})", time.time() - t, "failed during a fault")
                else:
                    self.rec.violation(f"file browser on {self.node.name} ({vol}): PUT {put.stdout.strip()} "
                                       f"{put.stderr.strip()[:200]} GET {get.returncode} {get.stderr[:200]!r}")
                return
            if get.stdout != src.read_bytes():
                self.rec.violation(f"file browser GET on {self.node.name}: bytes differ from the PUT")
            self.rec.op(f"filebrowser put+get ({vol})", time.time() - t)

    def ended_by_node(self, sid):
        """Whether the node ended the session itself (a documented end with a reason: its
        container died, its mount died); then failing to reach it is what a user sees."""
        try:
            rc, out, _ = self.node.ctl("session", "list", timeout=60)
        except subprocess.TimeoutExpired:
            return False
        if rc != 0:
            return False
        live = {x["id"]: x["state"] for x in json.loads(out)["sessions"]}
        return live.get(sid) not in ("running", "starting")

    def destroy(self, sid):
        node = self.node
        t = time.time()
        for _ in range(60):
            try:
                rc, _, err = node.ctl("session", "destroy", sid, timeout=HANG)
            except subprocess.TimeoutExpired:
                self.rec.violation(f"session destroy on {node.name}: no answer in {HANG}s")
                return
            if rc == 0 or self.status(err) == "gRPC NOT_FOUND":
                self.rec.op("session destroy", time.time() - t, "ok" if rc == 0 else "gone already")
                break
            self.rec.op("session destroy", time.time() - t, self.status(err))
            if self.stopping.is_set() and not node.ready():
                return
            time.sleep(3)
        self.soak.live_sessions.pop(sid, None)
        self.soak.destroyed[sid] = time.time()


class LimitProbe(Worker):
    """One user with a limit of one session: holds one on a node and asks both nodes for
    another, which must be refused (RESOURCE_EXHAUSTED). The user's running sessions on both
    nodes together are counted by the sampler."""

    def __init__(self, soak, name):
        super().__init__(soak, name)
        self.user = soak.limit_user
        self.vfs = {n.name: n.new_vfolder("vol1", self.user) for n in soak.nodes}
        self.held = None

    def create(self, node):
        return node.ctl("session", "create", "sftp", "--user", self.user, "--mount",
                        f"vol1:{self.vfs[node.name]}:data", "--key", str(self.soak.key) + ".pub", timeout=HANG)

    def step(self):
        running = self.soak.limit_sessions()
        if running is None:
            time.sleep(2)
            return
        if not running:
            node = self.rng.choice(self.soak.nodes)
            t = time.time()
            try:
                rc, out, err = self.create(node)
            except subprocess.TimeoutExpired:
                self.rec.violation(f"limit probe create on {node.name}: no answer in {HANG}s")
                return
            self.rec.op("CreateSession (limit user)", time.time() - t,
                        "ok" if rc == 0 else SessionUser.status(err))
        else:
            for node in self.soak.nodes:
                t = time.time()
                try:
                    rc, out, err = self.create(node)
                except subprocess.TimeoutExpired:
                    self.rec.violation(f"limit probe on {node.name}: no answer in {HANG}s")
                    continue
                outcome = "ok" if rc == 0 else SessionUser.status(err)
                self.rec.op("CreateSession at the limit", time.time() - t, outcome)
                if rc == 0:
                    # Admitted beyond the limit: the sampler sees two running; end it again.
                    s = json.loads(out)
                    self.soak.over_limit_admissions.append((time.time() - self.rec.t0, node.name))
                    self.rec.violation(f"CreateSession at the limit admitted on {node.name} "
                                       f"(user already had {len(running)} running)")
                    node.ctl("session", "destroy", s["id"], timeout=HANG)
        time.sleep(self.rng.uniform(1, 3))
