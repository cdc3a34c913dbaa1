"""Reply streams: both buses against the same semantics, plus Redis-only keys, TTLs and reconnects."""

import asyncio
import socket
import subprocess
import threading
import time
import uuid

import pytest
import redis

from worker.streams import (
    MemoryStreamBus,
    RedisStreamBus,
    ReplyAssembler,
    StreamEvent,
    StreamTimeout,
    make_stream_bus,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


def delete_prefixed(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=500))
    if keys:
        client.delete(*keys)


@pytest.fixture
def admin():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def prefix(admin):
    prefix = f"test:streams:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefixed(admin, prefix)


def make_redis_bus(prefix, **options):
    options.setdefault("block_slice_s", 0.2)
    return RedisStreamBus(REDIS_URL, key_prefix=prefix, client_name="test-" + prefix.split(":")[2][:12], **options)


@pytest.fixture(params=["memory", "redis"])
def bus(request, prefix):
    bus = MemoryStreamBus() if request.param == "memory" else make_redis_bus(prefix)
    yield bus
    bus.close()


async def collect(bus, request_id, timeout_s=5.0, **options):
    return [event async for event in bus.read(request_id, timeout_s=timeout_s, **options)]


def publish_reply(bus, request_id, parts, attempt="a1", delay_s=0.0, meta=None):
    for seq, text in enumerate(parts, start=1):
        bus.chunk(request_id, attempt, seq, text)
        if delay_s:
            time.sleep(delay_s)
    bus.final(request_id, attempt, meta or {"method": "local", "confidence": 0.9})


async def test_late_reader_replays_from_the_start(bus):
    publish_reply(bus, "r1", ["Hel", "lo", "!"], meta={"method": "openai", "usage": {"prompt_tokens": 3}})

    events = await collect(bus, "r1")

    assert [(e.kind, e.seq, e.text) for e in events] == [
        ("chunk", 1, "Hel"),
        ("chunk", 2, "lo"),
        ("chunk", 3, "!"),
        ("final", 0, ""),
    ]
    assert events[-1].meta == {"method": "openai", "usage": {"prompt_tokens": 3}}
    assert all(e.attempt == "a1" and e.stream_id for e in events)


async def test_reader_follows_a_live_publisher_in_order(bus):
    parts = [f"part{i} " for i in range(20)]
    reader = asyncio.create_task(collect(bus, "live"))
    await asyncio.sleep(0.05)
    publisher = threading.Thread(target=publish_reply, args=(bus, "live", parts), kwargs={"delay_s": 0.005})
    publisher.start()

    events = await reader
    publisher.join()

    assert [e.text for e in events if e.kind == "chunk"] == parts
    assert [e.seq for e in events[:-1]] == list(range(1, 21))
    assert events[-1].kind == "final"


async def test_resuming_from_last_id_skips_what_was_seen(bus):
    publish_reply(bus, "resume", ["a", "b", "c"])
    first_two = (await collect(bus, "resume"))[:2]

    rest = await collect(bus, "resume", last_id=first_two[-1].stream_id)

    assert [(e.kind, e.text) for e in rest] == [("chunk", "c"), ("final", "")]


async def test_error_record_ends_the_stream(bus):
    bus.chunk("bad", "a1", 1, "Half an ans")
    bus.error("bad", "a1", "Sorry, that took too long.", "timeout")

    events = await collect(bus, "bad")
    reply = ReplyAssembler()
    for event in events:
        reply.add(event)

    assert [e.kind for e in events] == ["chunk", "error"]
    assert reply.done and reply.error == "Sorry, that took too long."
    assert reply.meta == {"kind": "timeout"}
    assert bus.is_finished("bad")


async def test_is_finished_only_after_final(bus):
    assert not bus.is_finished("f")
    bus.chunk("f", "a1", 1, "x")
    assert not bus.is_finished("f")
    bus.final("f", "a1", {"method": "local"})
    assert bus.is_finished("f")


async def test_timeout_when_nothing_arrives(bus):
    started = time.monotonic()
    with pytest.raises(StreamTimeout):
        await collect(bus, "silent", timeout_s=0.3)
    assert 0.25 < time.monotonic() - started < 1.5


async def test_timeout_counts_from_the_last_event(bus):
    bus.chunk("stalled", "a1", 1, "only this")
    seen = []
    with pytest.raises(StreamTimeout):
        async for event in bus.read("stalled", timeout_s=0.3):
            seen.append(event.text)
    assert seen == ["only this"]


async def test_redelivered_attempt_replaces_the_half_reply(bus):
    bus.chunk("redo", "a1", 1, "The ans")
    bus.chunk("redo", "a1", 2, "wer is")
    bus.chunk("redo", "a1", 2, "wer is")  # a retried write that landed twice
    publish_reply(bus, "redo", ["The answer ", "is 42."], attempt="a2")

    reply = ReplyAssembler()
    texts = []
    for event in await collect(bus, "redo"):
        if reply.add(event):
            texts.append(reply.text)

    assert texts == ["The ans", "The answer is", "The answer ", "The answer is 42.", "The answer is 42."]
    assert reply.done and reply.text == "The answer is 42." and reply.attempt == "a2"
    assert reply.meta["method"] == "local" and reply.error is None


def test_assembler_ignores_a_stale_attempt_after_a_new_one():
    reply = ReplyAssembler()
    reply.add(StreamEvent("chunk", 1, "old", "stale "))
    reply.add(StreamEvent("chunk", 1, "new", "fresh "))
    assert not reply.add(StreamEvent("chunk", 2, "old", "zombie"))
    assert reply.add(StreamEvent("chunk", 2, "new", "text"))
    assert not reply.add(StreamEvent("chunk", 2, "new", "text"))
    assert reply.text == "fresh text" and not reply.done


async def test_concurrent_publishers_for_different_requests(bus):
    request_ids = [f"req{i}" for i in range(8)]
    expected = {rid: [f"{rid}:{n} " for n in range(40)] for rid in request_ids}
    readers = [asyncio.create_task(collect(bus, rid)) for rid in request_ids]
    threads = [threading.Thread(target=publish_reply, args=(bus, rid, expected[rid])) for rid in request_ids]
    for thread in threads:
        thread.start()

    results = await asyncio.gather(*readers)
    for thread in threads:
        thread.join()

    for rid, events in zip(request_ids, results):
        assert [e.text for e in events if e.kind == "chunk"] == expected[rid]
        assert events[-1].kind == "final"


def test_event_fields_are_flat_strings_and_round_trip():
    event = StreamEvent("final", 0, "a1", "", {"method": "hybrid", "usage": {"prompt_tokens": 5}})
    fields = event.to_fields()
    assert all(isinstance(value, str) for value in fields.values())
    assert StreamEvent.from_fields(fields) == event


def test_make_stream_bus_picks_the_transport():
    assert isinstance(make_stream_bus(None), MemoryStreamBus)
    assert isinstance(make_stream_bus("memory://"), MemoryStreamBus)
    redis_bus = make_stream_bus(REDIS_URL)
    assert isinstance(redis_bus, RedisStreamBus)
    redis_bus.close()


def test_memory_bus_drops_streams_after_ttl():
    now = [1000.0]
    bus = MemoryStreamBus(ttl_s=60, clock=lambda: now[0])
    publish_reply(bus, "old", ["x"])
    now[0] += 61
    publish_reply(bus, "new", ["y"])
    assert len(bus) == 1
    assert not bus.is_finished("old") and bus.is_finished("new")


async def test_memory_bus_keeps_the_newest_maxlen_events():
    bus = MemoryStreamBus(maxlen=5)
    publish_reply(bus, "long", [str(n) for n in range(1, 11)])
    events = await collect(bus, "long")
    assert [e.text for e in events] == ["7", "8", "9", "10", ""]


def test_redis_keys_have_maxlen_and_ttl(admin, prefix):
    bus = make_redis_bus(prefix, maxlen=10, ttl_s=120)
    publish_reply(bus, "keys", ["x"] * 400)
    key = f"{prefix}keys"

    assert admin.xlen(key) < 250  # MAXLEN ~ trims whole nodes (100 entries each), never below 10
    assert admin.xlen(key) >= 10
    assert 0 < admin.ttl(key) <= 120
    assert 0 < admin.ttl(f"{prefix}keys:done") <= 120
    bus.close()


def test_redis_records_are_not_pickles(admin, prefix):
    bus = make_redis_bus(prefix)
    bus.final("plain", "a1", {"method": "local", "confidence": 0.5})
    [(_, fields)] = admin.xrange(f"{prefix}plain")
    assert fields == {"kind": "final", "seq": "0", "attempt": "a1", "text": "",
                      "meta": '{"method":"local","confidence":0.5}'}
    bus.close()


def kill_clients(admin, name):
    """Kill only this test's connections: the Redis server is shared with other tests."""
    ids = [client["id"] for client in admin.client_list() if client.get("name") == name]
    for client_id in ids:
        admin.client_kill_filter(_id=client_id)
    return len(ids)


async def test_redis_reader_survives_killed_connections(admin, prefix):
    bus = make_redis_bus(prefix)
    got = []
    first_chunk = asyncio.Event()

    async def follow():
        async for event in bus.read("kill", timeout_s=5):
            got.append(event)
            first_chunk.set()

    reader = asyncio.create_task(follow())
    bus.chunk("kill", "a1", 1, "one ")
    await asyncio.wait_for(first_chunk.wait(), 5)
    await asyncio.sleep(0.05)  # back to blocking in XREAD

    assert kill_clients(admin, f"{bus.client_name}-reader") >= 1
    assert kill_clients(admin, f"{bus.client_name}-publisher") >= 1
    bus.chunk("kill", "a1", 2, "two ")
    await asyncio.sleep(0.1)
    kill_clients(admin, f"{bus.client_name}-reader")
    bus.chunk("kill", "a1", 3, "three")
    bus.final("kill", "a1", {"method": "local"})
    await asyncio.wait_for(reader, 5)

    assert [(e.seq, e.text) for e in got] == [(1, "one "), (2, "two "), (3, "three"), (0, "")]
    bus.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, directory) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.01)
    process.kill()
    raise RuntimeError("throwaway redis-server did not start")


async def test_redis_reader_survives_a_server_restart(tmp_path):
    port = free_port()
    server = start_redis(port, tmp_path)
    bus = RedisStreamBus(f"redis://127.0.0.1:{port}/0", block_slice_s=0.2)
    got = []
    try:
        first_chunk = asyncio.Event()

        async def follow():
            async for event in bus.read("restart", timeout_s=5):
                got.append(event)
                first_chunk.set()

        reader = asyncio.create_task(follow())
        bus.chunk("restart", "a1", 1, "before ")
        await asyncio.wait_for(first_chunk.wait(), 5)
        server.terminate()
        server.wait(5)
        await asyncio.sleep(0.5)  # the reader keeps reconnecting meanwhile
        assert not reader.done()
        server = start_redis(port, tmp_path)
        bus.chunk("restart", "a1", 2, "after")
        bus.final("restart", "a1", {"method": "local"})
        await asyncio.wait_for(reader, 5)
    finally:
        bus.close()
        server.terminate()
        server.wait(5)

    assert [e.text for e in got] == ["before ", "after", ""]


async def test_redis_reader_times_out_while_the_server_is_down():
    bus = RedisStreamBus(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(StreamTimeout):
        await collect(bus, "nobody", timeout_s=0.5)
    assert time.monotonic() - started < 2
    bus.close()


def test_begin_claims_once_and_sees_finished_requests(prefix):
    """One Lua round trip decides: answered already, another live attempt holds the lease, or ours."""
    bus = make_redis_bus(prefix)
    try:
        assert bus.begin("r", "a1", 5) == "claimed"
        assert bus.begin("r", "a2", 5) == "busy"
        bus.release("r", "a1")
        assert bus.begin("r", "a2", 5) == "claimed"
        bus.final("r", "a2", {"method": "local"})
        assert bus.begin("r", "a3", 5) == "duplicate"
        assert bus.begin("short", "a1", 0.05) == "claimed"
        time.sleep(0.1)  # the lease lapses: a crashed attempt does not block the request for ever
        assert bus.begin("short", "a2", 5) == "claimed"
    finally:
        bus.close()


def test_memory_bus_begin_sees_finished_requests():
    bus = MemoryStreamBus()
    assert bus.begin("r", "a1", 5) == "claimed"
    bus.final("r", "a1", {"method": "local"})
    assert bus.begin("r", "a2", 5) == "duplicate"


async def test_redis_replies_are_read_on_reused_connections(admin, prefix):
    """A front-end reads every reply on a pooled connection: no new connection (and handshake) per reply."""
    bus = make_redis_bus(prefix)
    name = f"test-{prefix.split(':')[2][:12]}-reader"

    def readers() -> int:
        return sum(1 for c in admin.client_list() if c.get("name") == name)

    try:
        for i in range(5):
            publish_reply(bus, f"r{i}", ["hi"])
            assert [e.kind for e in await collect(bus, f"r{i}")] == ["chunk", "final"]
        assert readers() == 1
        both = await asyncio.gather(collect(bus, "late1", timeout_s=5), collect(bus, "late2", timeout_s=5),
                                    asyncio.to_thread(lambda: [time.sleep(0.2), publish_reply(bus, "late1", ["a"]),
                                                               publish_reply(bus, "late2", ["b"])]))
        assert [e.text for e in both[0]][0] == "a" and [e.text for e in both[1]][0] == "b"
        assert readers() == 2  # two replies read at once: two connections, both kept for later replies
    finally:
        bus.close()
