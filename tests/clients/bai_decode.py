"""Decodes what storage-agent writes to Redis with Backend.AI's own classes (PyPI
backend.ai-common 26.9.6), the way the 26.9 manager decodes it. Prints one JSON object per
decoded item; any message the classes reject makes the script fail.

  bai_decode.py stream    REDIS_URL           the anycast `events` stream (vfolder events)
  bai_decode.py broadcast                     raw events_all messages, one per stdin line
  bai_decode.py cache     REDIS_URL TASK_ID   the cached bgtask.<id> broadcast
  bai_decode.py discovery HOST:PORT SERVICE_ID   service discovery, through RedisServiceDiscovery
"""

import asyncio
import inspect
import json
import sys
import uuid

import redis

from ai.backend.common.events.event_types.bgtask import broadcast as _bgtask  # noqa: F401 (registers)
from ai.backend.common.events.event_types.vfolder import anycast as vfolder_events
from ai.backend.common.events.message import EventMessage
from ai.backend.common.events.types import AbstractAnycastEvent, AbstractBroadcastEvent
from ai.backend.common.message_queue.payload import AnycastMessagePayload, BroadcastMessagePayload

def _anycast_classes():
    out = {}
    for _, cls in inspect.getmembers(vfolder_events, inspect.isclass):
        if not issubclass(cls, AbstractAnycastEvent):
            continue
        try:
            out[cls.event_name()] = cls
        except NotImplementedError:
            pass
    return out


def emit(obj):
    print(json.dumps(obj, default=str), flush=True)


def decode_broadcast(raw):
    p = BroadcastMessagePayload.from_json(raw)
    ev = AbstractBroadcastEvent.from_broadcast_payload(p)
    return {
        "name": p.name,
        "source": p.legacy_source,
        "class": type(ev).__name__,
        "body": ev.model_dump(mode="json"),
        "metadata": p.metadata.model_dump(mode="json") if p.metadata else None,
    }


def stream(url):
    classes = _anycast_classes()
    r = redis.Redis.from_url(url)
    for entry_id, fields in r.xrange("events", "-", "+"):
        p = AnycastMessagePayload.from_stream_fields(fields)
        cls = classes.get(p.name)
        if cls is None:
            raise SystemExit(f"no Backend.AI anycast event class for {p.name!r}")
        ev = cls.from_message(EventMessage(name=p.name, payload=p.payload))
        emit({
            "id": entry_id.decode(),
            "name": p.name,
            "source": p.legacy_source,
            "class": type(ev).__name__,
            "body": ev.model_dump(mode="json"),
            "metadata": p.metadata.model_dump(mode="json") if p.metadata else None,
            "fields": sorted(k.decode() for k in fields),
        })


def broadcast():
    for line in sys.stdin:
        line = line.strip()
        if line:
            emit(decode_broadcast(line))


def cache(url, task_id):
    r = redis.Redis.from_url(url)
    key = f"bgtask.{uuid.UUID(task_id)}"
    raw = r.get(key)
    if raw is None:
        raise SystemExit(f"no cached event under {key}")
    out = decode_broadcast(raw)
    out["ttl"] = r.ttl(key)
    emit(out)


async def discovery(addr, service_id):
    from ai.backend.common.service_discovery.redis_discovery.service_discovery import (
        RedisServiceDiscovery,
        RedisServiceDiscoveryArgs,
    )
    from ai.backend.common.types import ValkeyTarget

    sd = await RedisServiceDiscovery.create(
        RedisServiceDiscoveryArgs(valkey_target=ValkeyTarget(addr=addr))
    )
    try:
        meta = await sd.get_service("storage-proxy", uuid.UUID(service_id))
        emit(meta.model_dump(mode="json"))
        listed = await sd.discover()
        emit({"discovered": [str(m.id) for m in listed]})
    finally:
        await sd.close()


def main():
    mode = sys.argv[1]
    if mode == "stream":
        stream(sys.argv[2])
    elif mode == "broadcast":
        broadcast()
    elif mode == "cache":
        cache(sys.argv[2], sys.argv[3])
    elif mode == "discovery":
        asyncio.run(discovery(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
