#!/usr/bin/env python3
"""One vfolder lifecycle through a real Backend.AI manager, as its users drive it: the
`backend.ai` client CLI 26.9.6 for every action, the client SDK to look at the results. Run with
the manager venv's Python; prints one JSON document: the outcome of every step, normalised so
that two storage proxies can be compared (no ids, times or hosts).

  scenario.py lifecycle --host sa:vfs1 --name NAME --work DIR
  scenario.py swap --host pyproxy:vfs1 --name NAME --work DIR   (after stack.sh swap: NAME was
                                                                  made by the Python proxy)

The manager's endpoint and the admin keypair come from BACKEND_* in the environment; the second
user's keypair (user2@lablup.com, for invitations) from the fixtures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import requests
from ai.backend.client.request import Request
from ai.backend.client.session import AsyncSession, Session

CLI = str(Path(sys.executable).parent / "backend.ai")
HERE = Path(__file__).resolve().parent
USER2 = "user2@lablup.com"
TIMEOUT = 300  # per CLI call: nothing may hang


def keypair(email: str) -> tuple[str, str]:
    users = json.loads((HERE / "fixtures/example-users.json").read_text())["users"]
    uid = next(u["uuid"] for u in users if u["email"] == email)
    kps = json.loads((HERE / "fixtures/example-keypairs.json").read_text())["keypairs"]
    kp = next(k for k in kps if k.get("user") == uid)
    return kp["access_key"], kp["secret_key"]


def env_for(email: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if email is not None:
        env["BACKEND_ACCESS_KEY"], env["BACKEND_SECRET_KEY"] = keypair(email)
    return env


class Run:
    def __init__(self, host: str, name: str, work: Path) -> None:
        self.host = host
        self.name = name
        self.work = work
        self.steps: list[dict] = []

    def record(self, step: str, **outcome) -> dict:
        # Messages name the vfolder: the same outcome on two hosts reads the same.
        outcome = json.loads(json.dumps(outcome, ensure_ascii=False).replace(self.name, "<name>"))
        rec = {"step": step, **outcome}
        self.steps.append(rec)
        print(json.dumps(rec, ensure_ascii=False), file=sys.stderr, flush=True)
        return rec

    def cli(self, step: str, *args: str, stdin: str = "", user: str | None = None, cwd: Path | None = None) -> dict:
        """A CLI command; its outcome is the exit code and, on failure, the HTTP status and
        the message the manager gave the user."""
        try:
            p = subprocess.run([CLI, *args], input=stdin, capture_output=True, text=True,
                               timeout=TIMEOUT, env=env_for(user), cwd=cwd or self.work)
        except subprocess.TimeoutExpired:
            return self.record(step, ok=False, hang=True)
        out = p.stdout + p.stderr
        m = re.search(r"BackendAPIError: (\d{3})", out)
        msg = re.search(r"Message: (.*)", out)
        failed = p.returncode != 0 or m is not None
        rec = {"ok": not failed}
        if failed:
            rec["status"] = int(m.group(1)) if m else None
            rec["message"] = msg.group(1).strip() if msg else out.strip().splitlines()[-1:]
        return self.record(step, **rec)

    def sdk(self, step: str, fn, user: str | None = None) -> dict:
        """A look through the SDK: its (normalised) answer, or the error status."""
        env = env_for(user)
        old = {k: os.environ.get(k) for k in ("BACKEND_ACCESS_KEY", "BACKEND_SECRET_KEY")}
        os.environ.update({k: env[k] for k in old})
        try:
            with Session() as s:
                return self.record(step, ok=True, data=fn(s))
        except Exception as e:  # the SDK raises BackendAPIError(status, reason, data)
            status = e.args[0] if e.args and isinstance(e.args[0], int) else None
            return self.record(step, ok=False, status=status, error=type(e).__name__)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def listing(s, name: str, path: str) -> list:
    items = s.VFolder(name).list_files(path)["items"]
    # Directory sizes are the filesystem's (4096 on both); names, types and file sizes compare.
    return sorted([i["name"], i["type"], i["size"] if i["type"] == "FILE" else None] for i in items)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def write_random(p: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n


def wait_status(s, name: str, want: set[str], timeout: float = 180) -> str:
    """Polls the vfolder's status (background tasks end in events the manager consumes)."""
    end = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < end:
        found = [v for v in s.VFolder.list() if v["name"] == name]
        status = found[0]["status"] if found else "gone"
        if status in want:
            return status
        time.sleep(0.5)
    return f"timeout ({status})"


def vfolder_id(s, name: str) -> str:
    return next(v["id"] for v in s.VFolder.list() if v["name"] == name)


async def _signed(method: str, path: str, body: dict | None):
    async with AsyncSession():
        rq = Request(method, path)
        if body is not None:
            rq.set_json(body)
        async with rq.fetch() as resp:
            text = await resp.text()
            return json.loads(text) if text.strip() else {}


def signed(method: str, path: str, body: dict | None = None):
    """A signed manager call the 26.9.6 CLI cannot make (`request-download` crashes, `purge`
    refuses a delete-complete vfolder by name)."""
    import asyncio

    return asyncio.run(_signed(method, path, body))


def download_token(s, name: str, path: str) -> tuple[str, str]:
    r = signed("POST", f"/folders/{vfolder_id(s, name)}/request-download", {"path": path})
    return r["url"], r["token"]


def ranged(s, name: str, path: str, local: Path) -> dict:
    """Downloads straight from the client API with a token the manager minted: one range, and
    the whole file in two resumed halves; both checked against the file uploaded."""
    url, token = download_token(s, name, path)
    whole = local.read_bytes()
    r = requests.get(url, params={"token": token}, headers={"Range": "bytes=1000-1999"}, timeout=120)
    one = r.status_code, r.headers.get("Content-Range"), r.content == whole[1000:2000]
    half = len(whole) // 2
    a = requests.get(url, params={"token": token}, headers={"Range": f"bytes=0-{half - 1}"}, timeout=120)
    b = requests.get(url, params={"token": token}, headers={"Range": f"bytes={half}-"}, timeout=120)
    return {"range": list(one), "resumed": [a.status_code, b.status_code, a.content + b.content == whole]}


def lifecycle(run: Run, name: str) -> None:
    w = run.work
    small = w / "a.txt"
    small.write_bytes(b"hello\n")
    uni = w / "데이터 ü.txt"
    write_random(uni, 100_000, 1)
    big = w / "big.bin"
    write_random(big, 24 << 20, 2)  # two of the CLI's 16 MiB chunks
    write_random(w / "tree/sub/x.bin", 3000, 3)
    (w / "tree/y.txt").write_text("y\n")

    run.cli("create", "vfolder", "create", name, run.host)
    run.cli("create-again", "vfolder", "create", name, run.host)
    run.cli("upload", "vfolder", "upload", name, "a.txt", uni.name, "big.bin")
    run.cli("upload-recursive", "vfolder", "upload", "-r", name, "tree")
    run.cli("upload-dst-dir", "vfolder", "upload", "-d", "updir", name, "a.txt")
    run.sdk("ls-root", lambda s: listing(s, name, "."))
    run.sdk("ls-sub", lambda s: listing(s, name, "tree/sub"))
    run.sdk("ls-updir", lambda s: listing(s, name, "updir"))
    run.cli("ls-missing", "vfolder", "ls", name, "nope")
    run.cli("mkdir", "vfolder", "mkdir", name, "d1")
    run.cli("mkdir-existing", "vfolder", "mkdir", name, "d1")
    run.cli("mkdir-exist-ok", "vfolder", "mkdir", "-e", name, "d1")
    run.cli("mkdir-parents", "vfolder", "mkdir", "-p", name, "deep/a/b")
    run.cli("mkdir-no-parents", "vfolder", "mkdir", name, "nothere/x")
    run.cli("mv", "vfolder", "mv", name, "a.txt", "d1/a.txt")
    run.cli("rename-file", "vfolder", "rename-file", name, "d1/a.txt", "renamed.txt")
    run.cli("rename-missing", "vfolder", "rename-file", name, "d1/none.txt", "x.txt")
    run.sdk("ls-after-moves", lambda s: listing(s, name, "d1"))

    out = w / "out"
    # the 26.9.6 CLI writes d1/x to <base>/d1/x without making <base>/d1
    (out / "d1").mkdir(parents=True, exist_ok=True)
    run.cli("download", "vfolder", "download", "-b", str(out), name, "big.bin", uni.name, "d1/renamed.txt")
    run.record("downloaded", ok=True, data={
        "big": (out / "big.bin").exists() and sha256(out / "big.bin") == sha256(big),
        "unicode": (out / uni.name).exists() and sha256(out / uni.name) == sha256(uni),
        "renamed": (out / "d1/renamed.txt").exists() and (out / "d1/renamed.txt").read_bytes() == b"hello\n",
    })
    run.cli("download-missing", "vfolder", "download", "-b", str(out), "--max-retries", "1", name, "nope.bin")
    run.sdk("download-ranged", lambda s: ranged(s, name, "big.bin", big))
    run.sdk("download-unicode-ranged", lambda s: ranged(s, name, uni.name, uni))

    run.cli("rm-missing", "vfolder", "rm", name, "nope.txt", stdin="y\n")
    run.cli("rm-dir-not-recursive", "vfolder", "rm", name, "deep", stdin="y\n")
    # what that answer meant: is the directory still there?
    run.sdk("ls-after-rm-dir", lambda s: listing(s, name, "."))
    run.cli("rm-recursive", "vfolder", "rm", "-r", name, "deep", stdin="y\n")
    run.cli("rm-file", "vfolder", "rm", name, "updir/a.txt", stdin="y\n")
    run.sdk("ls-after-rm", lambda s: listing(s, name, "."))
    run.sdk("info", lambda s: {k: s.VFolder(name).info()[k] for k in ("status", "numFiles", "host")}
            | {"host": None})

    # Quota scopes (the manager's vfs_storage service): vfs has no quota, on either proxy.
    run.cli("quota-get", "admin", "quota-scope", "get", "-t", "user", run.host, "admin@lablup.com")
    run.cli("quota-set", "admin", "quota-scope", "set", "-t", "user", run.host, "admin@lablup.com", "1g")
    run.cli("quota-unset", "admin", "quota-scope", "unset", "-t", "user", run.host, "admin@lablup.com")
    # Unsupported by vfs on both: a 400 for the user, not a 500.
    run.cli("perf-metric", "admin", "vfolder", "perf-metric", run.host)
    run.cli("storage-info", "admin", "storage", "info", run.host)

    # Clone (a background task: the manager waits for our events to mark it ready).
    run.cli("set-cloneable", "vfolder", "update-options", "--set-cloneable", "true", name)
    run.cli("clone", "vfolder", "clone", name, f"{name}-clone", run.host)
    run.sdk("clone-ready", lambda s: wait_status(s, f"{name}-clone", {"ready", "clone-failed"}))
    run.sdk("ls-clone", lambda s: listing(s, f"{name}-clone", "."))

    # Sharing: user2 is invited read-only, accepts, lists and downloads. With upstream's
    # example fixtures on 26.9.6 the manager's RBAC refuses user2 its invitation list (403
    # "lacks permission READ on entity_share", on both proxies alike): the invitee steps then
    # only show that nothing of it reaches a storage proxy.
    run.cli("invite", "vfolder", "invite", "-p", "ro", name, USER2)
    run.sdk("accept", lambda s: len([s.VFolder.accept_invitation(i["id"])
                                     for i in s.VFolder.invitations()["invitations"]
                                     if i["vfolder_name"] == name]), user=USER2)
    run.sdk("ls-as-invitee", lambda s: listing(s, name, "d1"), user=USER2)
    inv_out = w / "inv"
    (inv_out / "d1").mkdir(parents=True, exist_ok=True)
    run.cli("download-as-invitee", "vfolder", "download", "-b", str(inv_out), name, "d1/renamed.txt", user=USER2)
    run.cli("upload-as-read-only-invitee", "vfolder", "upload", name, "a.txt", user=USER2)

    # Delete forever: trash, then the real delete (our delete task and its events), then purge.
    delete_forever(run, f"{name}-clone")


def delete_forever(run: Run, name: str) -> None:
    run.cli("delete", "vfolder", "delete", name)
    run.sdk("trashed", lambda s: wait_status(s, name, {"delete-pending"}))
    ident = {}
    run.sdk("id", lambda s: ident.setdefault("id", vfolder_id(s, name)) and None)
    run.cli("delete-trash", "vfolder", "delete-trash", name)
    # a delete-complete vfolder leaves the owner's list: "gone" is the same end
    run.sdk("delete-complete", lambda s: wait_status(s, name, {"delete-complete", "delete-error", "gone"}))
    run.sdk("purge", lambda s: signed("POST", "/folders/purge", {"id": ident["id"]}) and None)
    run.sdk("gone", lambda s: wait_status(s, name, {"gone"}, timeout=30))


def swap(run: Run, name: str) -> None:
    """storage-agent in the Python proxy's place, on that proxy's vfolders."""
    w = run.work
    big = w / "big.bin"
    run.sdk("ls-root", lambda s: listing(s, name, "."))
    run.sdk("ls-sub", lambda s: listing(s, name, "tree/sub"))
    out = w / "swap-out"
    out.mkdir(exist_ok=True)
    run.cli("download", "vfolder", "download", "-b", str(out), name, "big.bin")
    run.record("downloaded", ok=True, data=(out / "big.bin").exists() and sha256(out / "big.bin") == sha256(big))
    run.sdk("download-ranged", lambda s: ranged(s, name, "big.bin", big))
    write_random(w / "after-swap.bin", 20 << 20, 4)
    run.cli("upload", "vfolder", "upload", name, "after-swap.bin")
    run.sdk("ls-after-upload", lambda s: listing(s, name, "."))
    run.cli("mkdir", "vfolder", "mkdir", name, "made-after-swap")
    run.cli("clone", "vfolder", "clone", name, f"{name}-swapclone", run.host)
    run.sdk("clone-ready", lambda s: wait_status(s, f"{name}-swapclone", {"ready", "clone-failed"}))
    run.sdk("ls-clone", lambda s: listing(s, f"{name}-swapclone", "."))
    delete_forever(run, f"{name}-swapclone")
    delete_forever(run, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["lifecycle", "swap"])
    ap.add_argument("--host", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--work", required=True, type=Path)
    a = ap.parse_args()
    # the admin of upstream's example fixtures unless told otherwise
    os.environ.setdefault("BACKEND_ENDPOINT", "http://127.0.0.1:18081")
    if "BACKEND_ACCESS_KEY" not in os.environ:
        os.environ["BACKEND_ACCESS_KEY"], os.environ["BACKEND_SECRET_KEY"] = keypair("admin@lablup.com")
    a.work.mkdir(parents=True, exist_ok=True)
    run = Run(a.host, a.name, a.work)
    (lifecycle if a.mode == "lifecycle" else swap)(run, a.name)
    print(json.dumps(run.steps, ensure_ascii=False))


if __name__ == "__main__":
    main()
