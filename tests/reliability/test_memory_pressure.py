"""Redis under memory pressure (maxmemory, volatile-lru as in docker-compose.yml): the attention cache gives way;
queued tasks and reply streams in progress stay, and a worker still answers the queue."""

import asyncio
import time
import uuid

import pytest
import torch

from pioneer_model import AttentionCache
from pioneer_model.cache import cache_key
from tests.reliability.stack import pioneer_env, worker
from tests.services import RedisServer
from worker.dispatch import CeleryDispatcher
from worker.redis_cache import RedisLRUStorage, recommended_redis_config
from worker.streams import RedisStreamBus, ReplyAssembler, StreamTimeout

MAXMEMORY = 8 * 1024 * 1024
QUEUED = 30
ENTRY = {"k": torch.zeros(80, 128), "v": torch.ones(80, 128)}  # about 80 KB in the cache


@pytest.fixture
def squeezed_redis(tmp_path):
    policy = recommended_redis_config()["maxmemory-policy"]
    with RedisServer(tmp_path, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", policy) as server:
        yield server


async def test_cache_entries_go_first_and_queued_work_and_live_streams_stay(tmp_path, tiny_model_dir, squeezed_redis):
    url, client = squeezed_redis.url, squeezed_redis.client()
    dispatcher, bus = CeleryDispatcher(url), RedisStreamBus(url)
    request_ids = [uuid.uuid4().hex for _ in range(QUEUED)]
    for n, request_id in enumerate(request_ids):  # nobody is answering yet: the tasks wait in the queue
        await dispatcher.submit({"request_id": request_id, "mode": "local", "enqueued_at": time.time(),
                                 "messages": [{"role": "user", "content": f"queued question {n}"}]})
    bus.chunk("in-progress", "a1", 1, "a reply that a worker is still writing ")

    cache = AttentionCache(storage=RedisLRUStorage(url, namespace="pressure", capacity=100_000))
    written = 0
    while written * 80_000 < 3 * MAXMEMORY:  # three times what Redis may hold
        cache.put(cache_key("entry", written), ENTRY)
        written += 1
        if written % 20 == 0:
            bus.chunk("in-progress", "a1", written // 20 + 1, "and more ")  # the stream goes on meanwhile

    info = client.info()
    entries_left = len(list(client.scan_iter(match="pioneer:cache:pressure:e:*", count=1000)))
    print(f"\nMETRICS redis maxmemory {MAXMEMORY >> 20} MB volatile-lru: {written} cache entries written, "
          f"{entries_left} kept, {info['evicted_keys']} keys evicted, used {info['used_memory'] >> 10} KB")
    assert info["evicted_keys"] > 0 and entries_left < written // 2
    assert info["used_memory"] <= MAXMEMORY * 1.05
    assert client.llen("pioneer") == QUEUED  # every queued task is still there
    assert client.xlen("pioneer:reply:in-progress") == written // 20 + 1  # and every record of the live stream
    assert client.ttl("pioneer:reply:in-progress") == -1  # no TTL while in progress: volatile-lru passes it by
    bus.final("in-progress", "a1", {"method": "local"})
    assert 0 < client.ttl("pioneer:reply:in-progress") <= bus.ttl_s  # finished: it may expire, or be evicted
    assert cache.get(cache_key("entry", written - 1)) is not None  # the newest entries are the ones kept

    env = pioneer_env(tiny_model_dir, url, tmp_path, max_new_tokens=8)
    answering = worker(env, "pressure", tmp_path)
    try:
        replies = await asyncio.gather(*(whole_reply(bus, request_id) for request_id in request_ids))
    finally:
        code = answering.stop()
        await dispatcher.close()
        bus.close()
    assert all(reply.done and reply.error is None and reply.text.strip() for reply in replies)
    assert client.llen("pioneer") == 0 and code == 0 and "Traceback" not in answering.log()


async def whole_reply(bus: RedisStreamBus, request_id: str, timeout_s: float = 60) -> ReplyAssembler:
    assembler = ReplyAssembler()
    async for event in bus.read(request_id, timeout_s=timeout_s):
        assembler.add(event)
    return assembler


async def test_a_stream_nobody_finishes_expires_once_its_reader_gives_up(redis_server):
    bus, client = RedisStreamBus(redis_server.url, block_slice_s=0.1), redis_server.client()
    bus.chunk("orphan", "a1", 1, "the worker died after this")
    assert client.ttl("pioneer:reply:orphan") == -1
    with pytest.raises(StreamTimeout):
        await whole_reply(bus, "orphan", timeout_s=0.3)
    assert 0 < client.ttl("pioneer:reply:orphan") <= bus.ttl_s  # no leak: it goes like a finished one
    bus.close()
