"""Small shared pieces: ports, logging, one HTTP call with a deadline, deterministic content."""

import hashlib
import http.client as httpclient
import random
import sys
import time
import urllib.parse
from pathlib import Path

# The port helpers bench.py already has (bench/ is this package's parent).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import free_port, wait_port  # noqa: E402,F401

MANAGER_SECRET = "soak-manager-secret-0123456789"
JWT_SECRET = "soak-jwt-secret-0123456789"
RPC_SECRET = "soak-rpc-secret-0123456789"
T0 = time.time()


def log(*a):
    print(f"[soak {time.time() - T0:7.1f}s]", *a, file=sys.stderr, flush=True)


def http(method, url, body=None, headers=None, timeout=60, sink=None):
    """One request on a fresh connection: (status, headers, body). With `sink`, the body is
    passed to it in pieces instead (memory stays flat for big downloads). Connection errors and
    timeouts raise OSError."""
    u = urllib.parse.urlsplit(url)
    c = httpclient.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + ("?" + u.query if u.query else "")
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        if sink and 200 <= r.status < 300:
            got = 0
            while True:
                b = r.read(1 << 20)
                if not b:
                    break
                got += len(b)
                sink(b)
            # read(n) returns what came before the peer closed, without complaint.
            if "content-length" in hdrs and got != int(hdrs["content-length"]):
                raise ConnectionError(f"body cut at {got} of {hdrs['content-length']} bytes")
            return r.status, hdrs, b""
        body = r.read()
        if "content-length" in hdrs and method != "HEAD" and len(body) != int(hdrs["content-length"]):
            raise ConnectionError(f"body cut at {len(body)} of {hdrs['content-length']} bytes")
        return r.status, hdrs, body
    except httpclient.HTTPException as e:
        raise ConnectionError(f"{type(e).__name__}: {e}") from e
    finally:
        c.close()


BLOCK = 1 << 20


def _block(seed, k):
    return random.Random(seed * 1_000_003 + k).randbytes(BLOCK)


def content(seed, off, n):
    """Bytes [off, off+n) of the file named by `seed`: any range can be made again to check it."""
    out = bytearray()
    while n > 0:
        k, o = divmod(off, BLOCK)
        take = min(n, BLOCK - o)
        out += _block(seed, k)[o:o + take]
        off += take
        n -= take
    return bytes(out)


def sha256_of(seed, size):
    h = hashlib.sha256()
    for off in range(0, size, BLOCK):
        h.update(content(seed, off, min(BLOCK, size - off)))
    return h.hexdigest()
