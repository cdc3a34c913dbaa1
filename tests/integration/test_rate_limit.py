"""The per-user rate limit: one window per user in Redis, however many front-ends share it."""

import asyncio
import logging
import uuid

import redis.asyncio

from bots.rate_limit import PREFIX, RateLimiter, RedisRateLimiter
from tests.services import RedisServer


async def test_front_ends_on_one_redis_share_each_users_limit(redis_url):
    one, other = redis.asyncio.Redis.from_url(redis_url), redis.asyncio.Redis.from_url(redis_url)
    user, neighbour = f"slack:U-{uuid.uuid4().hex}", f"slack:U-{uuid.uuid4().hex}"
    try:
        fronts = [RedisRateLimiter(one, 5), RedisRateLimiter(other, 5)]
        waits = await asyncio.gather(*(fronts[n % 2].allow(user) for n in range(50)))
        assert waits.count(0) == 5  # not 5 per front-end
        assert all(0 < wait <= 60 for wait in waits if wait)
        assert await fronts[1].allow(neighbour) == 0  # per user
        assert await one.zcard(PREFIX + user) == 5 and 0 < await one.pttl(PREFIX + user) <= 60_000
    finally:
        await one.aclose()
        await other.aclose()


async def test_a_slot_frees_when_the_oldest_message_leaves_the_window(redis_url):
    client = redis.asyncio.Redis.from_url(redis_url)
    user = f"discord:{uuid.uuid4().hex}"
    try:
        limiter = RedisRateLimiter(client, 2)
        waits = [await limiter.allow(user) for _ in range(3)]
        assert waits[:2] == [0, 0] and 59 < waits[2] <= 60
        oldest = await client.zrange(PREFIX + user, 0, 0)
        await client.zincrby(PREFIX + user, -59_000, oldest[0])  # as if it came 59 s earlier
        wait = await limiter.allow(user)
        assert 0 < wait <= 1.0
        await client.zincrby(PREFIX + user, -1_000, oldest[0])  # and now a minute ago
        assert await limiter.allow(user) == 0
    finally:
        await client.aclose()


async def test_with_redis_away_each_front_end_limits_on_its_own(tmp_path, caplog):
    with RedisServer(tmp_path) as server:
        client = redis.asyncio.Redis.from_url(server.url)
        limiter = RedisRateLimiter(client, 3)
        assert await limiter.allow("slack:U1") == 0
        server.stop()
        with caplog.at_level(logging.WARNING, logger="bots.rate_limit"):
            waits = [await limiter.allow("slack:U1") for _ in range(4)]
        assert waits[:3] == [0, 0, 0] and 59 < waits[3] <= 60
        assert any("rate limit not checked in Redis" in r.getMessage() for r in caplog.records)
        await client.aclose()


async def test_the_in_process_window_counts_the_last_sixty_seconds():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert [await limiter.allow("u") for _ in range(3)] == [0, 0, 60]
    now[0] = 59.5
    assert await limiter.allow("u") == 0.5
    now[0] = 60
    assert await limiter.allow("u") == 0
