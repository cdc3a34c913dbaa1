"""Attention-cache storage in Redis, one LRU shared by every worker process."""

from __future__ import annotations

import logging
import re

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .redis_bulk import bulk_client

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError)

# Shared by both scripts. KEYS[2] is the LRU index; scores are Redis server time in microseconds,
# forced strictly above the newest score so order holds even if the clock steps back.
_LUA_PRELUDE = """
local function touch(index, member)
    local now = redis.call('TIME')
    local score = tonumber(now[1]) * 1000000 + tonumber(now[2])
    local newest = redis.call('ZREVRANGE', index, 0, 0, 'WITHSCORES')
    if newest[2] and tonumber(newest[2]) >= score then
        score = tonumber(newest[2]) + 1
    end
    return redis.call('ZADD', index, score, member)
end

local function evict_beyond(index, capacity, entry_prefix)
    local evicted = 0
    local excess = redis.call('ZCARD', index) - capacity
    if excess > 0 then
        for _, member in ipairs(redis.call('ZRANGE', index, 0, excess - 1)) do
            evicted = evicted + redis.call('DEL', entry_prefix .. member)
            redis.call('ZREM', index, member)
        end
    end
    return evicted
end
"""

# KEYS: entry, index. ARGV: key, value, ttl_s, capacity, index_ttl_s, entry_prefix.
_PUT_SCRIPT = _LUA_PRELUDE + """
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
touch(KEYS[2], ARGV[1])
local evicted = evict_beyond(KEYS[2], tonumber(ARGV[4]), ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return evicted
"""

# KEYS: entry, index. ARGV: key, ttl_s, capacity, index_ttl_s, entry_prefix.
_GET_SCRIPT = _LUA_PRELUDE + """
local value = redis.call('GET', KEYS[1])
if not value then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return false
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
if touch(KEYS[2], ARGV[1]) == 1 then
    -- the entry had lost its index member (index expired or evicted): adopt it, within capacity
    evict_beyond(KEYS[2], tonumber(ARGV[3]), ARGV[5])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return value
"""

# KEYS: index. ARGV: ttl_s, capacity, index_ttl_s, entry_prefix, key...: refresh the entries that exist.
_TOUCH_SCRIPT = _LUA_PRELUDE + """
for i = 5, #ARGV do
    if redis.call('EXPIRE', ARGV[4] .. ARGV[i], ARGV[1]) == 1 and touch(KEYS[1], ARGV[i]) == 1 then
        evict_beyond(KEYS[1], tonumber(ARGV[2]), ARGV[4])
    end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""


def recommended_redis_config() -> dict[str, str]:
    """Redis settings for a server shared by the Celery broker, the reply streams and this cache.

    `maxmemory-policy volatile-lru` lets Redis evict, under memory pressure, only keys that carry a TTL:
    cache entries (and their index and counters, and finished reply streams) expire, while broker keys and
    queued tasks have no TTL and are never evicted. The default `noeviction` would instead fail writes,
    including enqueues, once `maxmemory` is reached; `allkeys-*` policies could drop queued tasks.
    Also set `maxmemory` (for example 75% of the memory given to Redis), e.g.
    `redis-cli CONFIG SET maxmemory-policy volatile-lru`.
    """
    return {"maxmemory-policy": "volatile-lru"}


class RedisLRUStorage:
    """CacheStorage over Redis: entries with a TTL, an LRU index ZSET, atomic put-and-evict in Lua.

    Keys, for namespace N: `pioneer:cache:N:e:<key>` (value, TTL ttl_s, refreshed on read),
    `pioneer:cache:N:lru` (ZSET key -> last access), `pioneer:cache:N:stats` (HASH of counters);
    index and stats carry a longer TTL (2 * ttl_s), refreshed on each write.
    The hot path (get, put, delete, incr) fails open on connection errors: a miss, never a failed reply.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str,
        *,
        namespace: str = "default",
        capacity: int = 1000,
        ttl_s: int = 86400,
    ):
        if capacity < 1 or ttl_s < 1:
            raise ValueError("capacity and ttl_s must be at least 1")
        bulk = None
        if isinstance(client_or_url, str):
            options = dict(socket_timeout=5, socket_connect_timeout=2,
                           retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))  # a cache should give up quickly
            bulk = bulk_client(client_or_url, **options)
            client_or_url = redis.Redis.from_url(client_or_url, **options)
        if client_or_url.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisLRUStorage needs a client with decode_responses=False (values are bytes)")
        self.client = client_or_url
        self.bulk = bulk or client_or_url  # get_many's client: large values read by BulkReplyParser
        self.namespace = namespace
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.index_ttl_s = 2 * ttl_s
        self.prefix = f"pioneer:cache:{namespace}:"
        self.entry_prefix = self.prefix + "e:"
        self.index_key = self.prefix + "lru"
        self.stats_key = self.prefix + "stats"
        self._put = self.client.register_script(_PUT_SCRIPT)
        self._get = self.client.register_script(_GET_SCRIPT)
        self._touch = self.client.register_script(_TOUCH_SCRIPT)

    def entry_key(self, key: str) -> str:
        return self.entry_prefix + key

    def get(self, key):
        try:
            return self._get(
                keys=[self.entry_key(key), self.index_key],
                args=[key, self.ttl_s, self.capacity, self.index_ttl_s, self.entry_prefix],
            )
        except TRANSIENT_ERRORS as exc:
            log.warning("attention cache get failed, treating as a miss: %s", exc)
            return None

    def get_many(self, keys: list[str], touch: bool = True) -> list[bytes | memoryview | None]:
        """Several values in one round trip (plain GETs, then one script refreshes their TTLs and LRU order, unless
        touch is False: call touch_many later); for large values this also skips copying them through Lua.
        Large values come back as memoryviews (see BulkReplyParser)."""
        if not keys:
            return []
        try:
            with self.bulk.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(self.entry_key(key))
                if touch:
                    self._touch_script(keys, pipe)
                return pipe.execute()[:len(keys)]
        except TRANSIENT_ERRORS as exc:
            log.warning("attention cache get failed, treating as a miss: %s", exc)
            return [None] * len(keys)

    def touch_many(self, keys: list[str]) -> None:
        """Refresh the TTLs and LRU order of the entries among keys that exist."""
        try:
            self._touch_script(keys, self.client)
        except TRANSIENT_ERRORS as exc:
            log.warning("attention cache touch failed: %s", exc)

    def _touch_script(self, keys: list[str], client) -> None:
        self._touch(keys=[self.index_key], args=[self.ttl_s, self.capacity, self.index_ttl_s, self.entry_prefix, *keys],
                    client=client)

    def put(self, key, value):
        try:
            return int(
                self._put(
                    keys=[self.entry_key(key), self.index_key],
                    args=[key, value, self.ttl_s, self.capacity, self.index_ttl_s, self.entry_prefix],
                )
            )
        except TRANSIENT_ERRORS as exc:
            log.warning("attention cache put failed, entry dropped: %s", exc)
            return 0

    def delete(self, key):
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.entry_key(key))
                pipe.zrem(self.index_key, key)
                pipe.execute()
        except TRANSIENT_ERRORS as exc:
            log.warning("attention cache delete failed: %s", exc)

    def clear(self):
        """Remove every key of this namespace, including entries the index no longer knows about."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        batch = []
        for key in self.client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)

    def __len__(self):
        return int(self.client.zcard(self.index_key))

    def incr(self, counter, amount=1):
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hincrby(self.stats_key, counter, amount)
                pipe.expire(self.stats_key, self.index_ttl_s)
                pipe.execute()
        except TRANSIENT_ERRORS as exc:
            log.warning("attention cache counter %s not counted: %s", counter, exc)

    def counters(self):
        return {name.decode(): int(value) for name, value in self.client.hgetall(self.stats_key).items()}
