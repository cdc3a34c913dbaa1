"""Workers announce themselves and their model in Redis, so front-ends can show /info without a model."""

import json
import os
import socket
import time

import redis

PREFIX = "pioneer:workers:"
TTL_S = 30


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def announce(client: redis.Redis, info: dict) -> None:
    client.set(PREFIX + worker_id(), json.dumps(info | {"seen_at": time.time()}, default=str), ex=TTL_S)


def withdraw(client: redis.Redis) -> None:
    client.delete(PREFIX + worker_id())


async def online(client) -> list[dict]:
    """Info of every worker seen in the last TTL_S seconds (client: redis.asyncio.Redis)."""
    keys = [key async for key in client.scan_iter(match=PREFIX + "*", count=100)]
    values = await client.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]
