"""The faults, each logged with its start and end. One runs at a time, on a schedule spread
over the run (the smoke runs each once); between faults the load runs undisturbed so that a
resource that only grows shows as a slope rather than as a step."""

import json
import subprocess
import time

from common import log


class Faults:
    def __init__(self, soak):
        self.soak = soak
        self.rec = soak.rec
        # How long a dependency stays down (the smoke keeps every fault short).
        self.hold = 8 if soak.smoke else 30

    def all(self):
        """(name, callable) in the order they run."""
        s = self.soak
        return [
            ("kill -9 node a", lambda: self.kill_node(s.nodes[0])),
            ("Redis master killed, restarted from an older snapshot", self.redis_restart),
            ("state filesystem of node b full", lambda: self.fill_state(s.nodes[1])),
            ("Sentinel failover", self.sentinel_failover),
            ("moto frozen", self.moto_frozen),
            ("etcd stopped, node b killed meanwhile", self.etcd_down),
            ("rclone of a shared mount killed", self.kill_rclone),
            ("dockerd restarted", self.dockerd_restart),
            ("quota scope of an S3 vfolder hit, then raised", self.quota_hit),
            ("kill -9 node b", lambda: self.kill_node(s.nodes[1])),
        ]

    def run(self, name, fn):
        t = time.time() - self.rec.t0
        entry = [t, None, name]
        self.rec.faults.append(entry)
        log(f"FAULT {name}")
        try:
            fn()
        finally:
            entry[1] = time.time() - self.rec.t0
            log(f"FAULT over: {name} ({entry[1] - t:.0f}s)")

    def _down(self, node, on):
        self.rec.down[node.name] = on
        if not on:
            self.rec.down_until[node.name] = time.time() + 10

    def kill_node(self, node):
        self._down(node, True)
        node.proc.kill9()
        node.supervise()
        node.wait_ready(180)
        self._down(node, False)

    def redis_restart(self):
        port = self.soak.redis.restart_master()
        log(f"redis on {port} restarted from its older snapshot")
        time.sleep(20)

    def sentinel_failover(self):
        before = self.soak.redis.master_port()
        out = self.soak.redis.failover()
        end = time.time() + 60
        while time.time() < end and self.soak.redis.master_port() == before:
            time.sleep(0.5)
        log(f"sentinel failover ({out}): master {before} -> {self.soak.redis.master_port()}")
        time.sleep(15)

    def fill_state(self, node):
        node.statefs.fill()
        time.sleep(self.hold)
        node.statefs.free()
        time.sleep(5)

    def moto_frozen(self):
        self.soak.moto.proc.freeze(True)
        try:
            time.sleep(self.hold)
        finally:
            self.soak.moto.proc.freeze(False)
        time.sleep(5)

    def etcd_down(self):
        """etcd is read at start: a node restarting while it is down must wait for it or exit
        clearly (systemd starts it again), and be back once etcd is."""
        s = self.soak
        s.etcd.proc.stop()
        node = s.nodes[1]
        self._down(node, True)
        node.proc.kill9()
        t = time.time()
        while time.time() - t < self.hold:
            node.supervise()
            time.sleep(1)
        s.etcd.proc.start()
        node.wait_ready(180)
        self._down(node, False)

    def kill_rclone(self):
        """A session on an S3 vfolder (an rclone mount), then every rclone killed: the node
        must end that session (its mount is dead for good) within its reap interval."""
        s = self.soak
        node = s.nodes[0]
        user = s.new_user()
        vf = node.new_vfolder("s3", user)
        rc, out, err = node.ctl("session", "create", "sftp", "--user", user, "--mount", f"s3:{vf}:data",
                                "--key", str(s.key) + ".pub")
        if rc != 0:
            raise RuntimeError(f"a session on an S3 vfolder: {err.strip()[:300]}")
        sid = json.loads(out)["id"]
        r = subprocess.run(["pgrep", "-f", "rclone mount"], capture_output=True, text=True)
        pids = r.stdout.split()
        log(f"rclone mounts running: {pids}")
        for p in pids:
            subprocess.run(["kill", "-9", p], check=False)
        end = time.time() + 90  # reap-interval (30 s) and then some
        state = "running"
        while time.time() < end:
            rc, out, _ = node.ctl("session", "list")
            states = {x["id"]: x["state"] for x in json.loads(out)["sessions"]} if rc == 0 else {}
            state = states.get(sid, "gone")
            if state not in ("running", "starting"):
                break
            time.sleep(2)
        if state in ("running", "starting"):
            self.rec.violation(f"session {sid} still {state} 90 s after its rclone mount died")
        else:
            log(f"the session on the dead mount was ended ({state})")
        node.ctl("session", "destroy", sid)

    def dockerd_restart(self):
        subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=False)
        end = time.time() + 60
        while time.time() < end and subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
            time.sleep(0.5)
        subprocess.run([str(self.soak.root / "scripts/testenv.sh"), "docker"], check=True, timeout=180,
                       capture_output=True)
        time.sleep(10)

    def quota_hit(self):
        """The S3 uploader's scope on node a gets a limit just above what it holds (uploads are
        refused as over quota, documented), then a limit far above."""
        node = self.soak.nodes[0]
        vfid = self.soak.vfolders[(node.name, "s3")]
        qs = vfid.split("/")[0]
        st, _, body = node.mgr("/quota-scope", {"volume": "s3", "qsid": qs}, method="GET")
        used = (json.loads(body).get("used_bytes") or 0) if st == 200 else 0
        for limit in (used + (2 << 20), 100 << 30):
            st, _, body = node.mgr("/quota-scope", {"volume": "s3", "qsid": qs, "options": {"limit_bytes": limit}},
                                   method="PATCH")
            if st != 204:
                raise RuntimeError(f"PATCH /quota-scope: {st} {body[:200]!r}")
            log(f"quota of {qs} on s3: limit {limit} (used {used})")
            if limit < (100 << 30):
                time.sleep(self.hold)
