"""RedisLRUStorage against a real Redis: a shared LRU, counters, TTLs, and the attention cache on top."""

import random
import socket
import threading
import time
import uuid

import pytest
import redis
import torch

from pioneer_model.cache import AttentionCache, cache_key
from worker.redis_bulk import LARGE_REPLY_BYTES
from worker.redis_cache import RedisLRUStorage, recommended_redis_config

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def client():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def namespace(client):
    namespace = f"test-{uuid.uuid4().hex}"
    yield namespace
    keys = list(client.scan_iter(match=f"pioneer:cache:{namespace}:*", count=500))
    if keys:
        client.delete(*keys)


def namespace_keys(client, namespace) -> list[bytes]:
    return sorted(client.scan_iter(match=f"pioneer:cache:{namespace}:*", count=500))


def test_lru_order_is_shared_by_two_workers(client, namespace):
    worker_a = RedisLRUStorage(client, namespace=namespace, capacity=3)
    worker_b = RedisLRUStorage(REDIS_URL, namespace=namespace, capacity=3)

    assert worker_a.put("k1", b"1") == 0
    assert worker_b.put("k2", b"2") == 0
    assert worker_a.put("k3", b"3") == 0
    assert worker_b.get("k1") == b"1"  # k1 is now the most recently used; k2 the least
    assert worker_a.put("k4", b"4") == 1

    assert worker_b.get("k2") is None
    assert [worker_a.get(k) for k in ("k1", "k3", "k4")] == [b"1", b"3", b"4"]
    assert worker_b.put("k5", b"5") == 1  # k1, k3, k4 were touched in that order: k1 goes
    assert worker_a.get("k1") is None
    assert len(worker_a) == len(worker_b) == 3
    assert client.exists(worker_a.entry_key("k1"), worker_a.entry_key("k2")) == 0


def test_counters_are_shared(client, namespace):
    worker_a = RedisLRUStorage(client, namespace=namespace)
    worker_b = RedisLRUStorage(client, namespace=namespace)
    worker_a.incr("hits")
    worker_b.incr("hits", 2)
    worker_b.incr("misses")
    assert worker_a.counters() == {"hits": 3, "misses": 1}


def test_every_key_it_writes_has_a_ttl(client, namespace):
    storage = RedisLRUStorage(client, namespace=namespace, capacity=10, ttl_s=100)
    storage.put("k1", b"v")
    storage.get("k1")
    storage.incr("hits")

    keys = namespace_keys(client, namespace)
    assert keys == sorted(
        key.encode() for key in (storage.entry_key("k1"), storage.index_key, storage.stats_key)
    )
    assert 0 < client.ttl(storage.entry_key("k1")) <= 100
    assert 100 < client.ttl(storage.index_key) <= 200
    assert 100 < client.ttl(storage.stats_key) <= 200


def test_an_entry_removed_behind_its_back_is_a_miss(client, namespace):
    storage = RedisLRUStorage(client, namespace=namespace)
    storage.put("gone", b"v")
    storage.put("expiring", b"v")
    storage.put("kept", b"v")
    client.delete(storage.entry_key("gone"))
    client.pexpire(storage.entry_key("expiring"), 1)
    time.sleep(0.02)

    assert storage.get("gone") is None
    assert storage.get("expiring") is None
    assert storage.get("kept") == b"v"
    assert client.zrange(storage.index_key, 0, -1) == [b"kept"]
    assert len(storage) == 1


def test_values_are_binary_safe(client, namespace):
    storage = RedisLRUStorage(client, namespace=namespace)
    value = bytes(range(256)) * 4 + b"\x00"
    storage.put("bin", value)
    assert storage.get("bin") == value


def test_delete_and_clear(client, namespace):
    storage = RedisLRUStorage(client, namespace=namespace)
    for n in range(5):
        storage.put(f"k{n}", b"v")
    storage.incr("hits")
    storage.delete("k0")
    assert storage.get("k0") is None and len(storage) == 4

    client.zrem(storage.index_key, "k1")  # an entry the index has lost is still cleared
    storage.clear()
    assert namespace_keys(client, namespace) == []
    assert len(storage) == 0 and storage.counters() == {}


def test_attention_cache_round_trips_tensors_exactly(client, namespace):
    cache = AttentionCache(storage=RedisLRUStorage(client, namespace=namespace, capacity=4))
    torch.manual_seed(0)
    tensors = {
        "weights": torch.softmax(torch.randn(2, 4, 7, 7), dim=-1),
        "half": torch.randn(3, 5).half(),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "ids": torch.randint(0, 50_000, (2, 9)),
        "empty": torch.zeros(0, 3),
    }
    key = cache_key("attn", tensors["ids"])

    assert cache.get(key) is None
    cache.put(key, tensors)
    restored = cache.get(key)

    assert restored.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)


def test_concurrent_puts_never_exceed_capacity(client, namespace):
    capacity = 10
    storage = RedisLRUStorage(REDIS_URL, namespace=namespace, capacity=capacity)
    evictions = []
    sizes = []
    stop = threading.Event()

    def put_many(worker: int):
        evictions.append(sum(storage.put(f"w{worker}-{n}", b"x" * 64) for n in range(50)))

    def watch():
        while not stop.is_set():
            sizes.append(len(storage))

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=put_many, args=(w,)) for w in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    watcher.join()

    assert max(sizes) <= capacity
    assert len(storage) == capacity
    assert sum(evictions) == 200 - capacity
    entry_keys = client.scan_iter(match=f"pioneer:cache:{namespace}:e:*", count=500)
    assert len(list(entry_keys)) == capacity


def test_fails_open_when_redis_is_unreachable():
    storage = RedisLRUStorage("redis://127.0.0.1:1/0", namespace="unreachable")
    assert storage.get("k") is None
    assert storage.put("k", b"v") == 0
    storage.incr("hits")
    storage.delete("k")


def test_rejects_a_decoding_client():
    with pytest.raises(ValueError, match="decode_responses"):
        RedisLRUStorage(redis.Redis.from_url(REDIS_URL, decode_responses=True))


def test_recommended_config_never_evicts_broker_keys():
    assert recommended_redis_config()["maxmemory-policy"] == "volatile-lru"


@pytest.mark.parametrize("size", [0, 1, LARGE_REPLY_BYTES - 1, LARGE_REPLY_BYTES, LARGE_REPLY_BYTES + 1, 3_000_001])
def test_get_many_returns_values_of_every_size_whole(client, namespace, size):
    storage = RedisLRUStorage(REDIS_URL, namespace=namespace)
    values = {f"k{i}": bytes(random.Random(i).randbytes(size + i)) for i in range(3)}  # large ones read directly
    for key, value in values.items():
        storage.put(key, value)
    got = storage.get_many(["k0", "missing", "k1", "k2"])
    assert [None if v is None else bytes(v) for v in got] == [values["k0"], None, values["k1"], values["k2"]]


def test_a_resp3_url_reads_through_a_plain_client(client, namespace):
    storage = RedisLRUStorage(REDIS_URL + "?protocol=3", namespace=namespace)
    value = bytes(random.Random(0).randbytes(3 * LARGE_REPLY_BYTES))
    storage.put("k", value)
    assert storage.get_many(["k", "missing"]) == [value, None]


def test_get_many_can_leave_the_lru_order_to_touch_many(client, namespace):
    storage = RedisLRUStorage(REDIS_URL, namespace=namespace, capacity=3)
    for key in ("k1", "k2", "k3"):
        storage.put(key, key.encode())
    assert storage.get_many(["k1"], touch=False) == [b"k1"]
    storage.put("k4", b"k4")  # k1 is still the least recently used
    assert storage.get("k1") is None
    storage.touch_many(["k2", "missing"])
    storage.put("k5", b"k5")  # k3 now is
    assert storage.get("k3") is None and storage.get("k2") == b"k2"
    assert len(storage) == 3


def test_a_connection_cut_inside_a_large_value_is_a_miss(caplog):
    """A fake server that answers every command with OK, and a GET with half of a large value before it hangs up
    (on every connection: the client retries)."""
    server = socket.create_server(("127.0.0.1", 0))
    cuts = []

    def serve_one(conn):
        with conn, conn.makefile("rb") as commands:
            while line := commands.readline():
                args = []
                for _ in range(int(line[1:])):
                    commands.readline()  # $<length>
                    args.append(commands.readline().strip())
                if args[0].upper() == b"GET":
                    conn.sendall(b"$%d\r\n" % (4 * LARGE_REPLY_BYTES) + bytes(2 * LARGE_REPLY_BYTES))
                    cuts.append(args[1])
                    return
                conn.sendall(b"+OK\r\n")

    def serve():
        while True:
            try:
                serve_one(server.accept()[0])
            except OSError:  # the test closed the server
                return

    threading.Thread(target=serve, daemon=True).start()
    storage = RedisLRUStorage(f"redis://127.0.0.1:{server.getsockname()[1]}/0", namespace="cut")
    started = time.monotonic()
    assert storage.get_many(["k"], touch=False) == [None]
    server.close()
    assert cuts and all(key == storage.entry_key("k").encode() for key in cuts)
    assert "Connection closed" in caplog.text and time.monotonic() - started < 2
