#!/usr/bin/env python3
"""Logging reverse proxy for a storage proxy's manager API (small JSON bodies).

  relay.py --listen PORT --target http://127.0.0.1:PORT --log FILE.jsonl [--name NAME]

Every exchange is one JSONL record: time, method, path+query, request headers (the auth token
value is replaced by its length), request body (first 4 KiB, as text), status, response headers,
response body (first 4 KiB), elapsed ms. The manager is pointed at the relay (etcd
volumes/proxies/<name>/manager_api), so what it sends and what it gets back are on file.
"""
from __future__ import annotations

import argparse
import json
import time

import aiohttp
from aiohttp import web

LIMIT = 4096
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
       "content-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def text(b: bytes) -> str:
    s = b[:LIMIT].decode("utf-8", "replace")
    return s + (f"...(+{len(b) - LIMIT} bytes)" if len(b) > LIMIT else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--name", default="")
    a = ap.parse_args()
    logf = open(a.log, "a", encoding="utf-8")
    session: aiohttp.ClientSession | None = None

    async def handler(req: web.Request) -> web.StreamResponse:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        body = await req.read()
        hdrs = {k: v for k, v in req.headers.items() if k.lower() not in HOP}
        t0 = time.time()
        rec = {"t": round(t0, 3), "proxy": a.name, "method": req.method, "path": req.path_qs,
               "req_headers": {k: (f"<{len(v)} chars>" if k.lower() == "x-backendai-storage-auth-token" else v)
                               for k, v in hdrs.items()},
               "req_body": text(body)}
        try:
            async with session.request(req.method, a.target + req.path_qs, headers=hdrs,
                                       data=body if body else None, allow_redirects=False) as r:
                rbody = await r.read()
                rec.update(status=r.status, resp_headers=dict(r.headers), resp_body=text(rbody),
                           ms=round((time.time() - t0) * 1000, 1))
                out = web.Response(status=r.status, body=rbody,
                                   headers={k: v for k, v in r.headers.items() if k.lower() not in HOP})
        except Exception as e:  # upstream down: answer 502 like a gateway, and record it
            rec.update(status=502, error=repr(e), ms=round((time.time() - t0) * 1000, 1))
            out = web.Response(status=502, text=repr(e))
        logf.write(json.dumps(rec, ensure_ascii=False) + "\n")
        logf.flush()
        return out

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=a.listen, access_log=None, print=None)


if __name__ == "__main__":
    main()
