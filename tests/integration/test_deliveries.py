"""The record of platform deliveries: shared by front-ends on one Redis, kept per process when Redis is away."""

import logging
import signal
import time
import uuid

import redis.asyncio

from bots.deliveries import PREFIX, Deliveries
from tests.services import RedisServer


async def test_front_ends_on_one_redis_answer_a_delivery_once(redis_url):
    one, other = redis.asyncio.Redis.from_url(redis_url), redis.asyncio.Redis.from_url(redis_url)
    key = f"slack:T1:event:Ev{uuid.uuid4().hex}"
    try:
        assert await Deliveries(one).first(key) is True
        assert await Deliveries(other).first(key) is False  # another front-end, or this one after a restart
        assert await Deliveries(one).first(key + "-2") is True
        assert 3500 < await one.ttl(PREFIX + key) <= 3600
    finally:
        await one.aclose()
        await other.aclose()


async def test_without_redis_each_process_remembers_for_itself(tmp_path, caplog):
    with RedisServer(tmp_path) as server:
        client = redis.asyncio.Redis.from_url(server.url)
        deliveries = Deliveries(client, timeout_s=0.5)
        assert await deliveries.first("a") is True
        server.process.send_signal(signal.SIGSTOP)  # hung: every call waits
        try:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="bots.deliveries"):
                assert await deliveries.first("b") is True
                assert await deliveries.first("b") is False
            assert time.monotonic() - started < 2.0  # within the bound, well inside Slack's 3 s for the ack
        finally:
            server.process.send_signal(signal.SIGCONT)
        server.stop()  # down: refused at once
        assert await deliveries.first("c") is True and await deliveries.first("c") is False
        assert sum("could not record delivery" in r.getMessage() for r in caplog.records) >= 2
        await client.aclose()


def test_the_local_record_forgets_after_the_ttl_and_holds_at_most_capacity():
    now = [0.0]
    deliveries = Deliveries(ttl_s=60, capacity=3, clock=lambda: now[0])
    assert [deliveries._first_here(k) for k in "abca"] == [True, True, True, False]
    now[0] = 61
    assert deliveries._first_here("a") is True  # forgotten after the ttl
    assert [deliveries._first_here(k) for k in "bcde"] == [True, True, True, True]
    assert len(deliveries._seen) == 3
