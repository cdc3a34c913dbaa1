"""Per-user sliding window of RATE_LIMIT_PER_MINUTE messages: in the process, or in Redis shared by front-ends."""

import asyncio
import logging
import time
import uuid
from collections import defaultdict, deque

log = logging.getLogger(__name__)
PREFIX = "pioneer:ratelimit:"
WINDOW_S = 60

# One atomic step on Redis's clock: drop what left the window, then count this message or say how long to wait (ms).
SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return window - (now - tonumber(oldest[2]))
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""


class RateLimiter:
    """The window kept in this process: exact for one front-end per platform (the usual set-up)."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute, self.clock = per_minute, clock
        self._seen: dict[str, deque] = defaultdict(deque)

    async def allow(self, key: str) -> float:
        """0 when allowed (and counted); otherwise seconds until the next message is allowed."""
        return self.allow_here(key)

    def allow_here(self, key: str) -> float:
        now, seen = self.clock(), self._seen[key]
        while seen and now - seen[0] >= WINDOW_S:
            seen.popleft()
        if len(seen) >= self.per_minute:
            return WINDOW_S - (now - seen[0])
        seen.append(now)
        return 0.0


class RedisRateLimiter(RateLimiter):
    """The window kept in Redis, so several front-end processes share one limit per user. While Redis is away,
    each process limits on its own."""

    def __init__(self, client, per_minute: int, *, timeout_s: float = 1.0, clock=time.monotonic):
        super().__init__(per_minute, clock)
        self.client, self.timeout_s = client, timeout_s
        self._script = client.register_script(SLIDING_WINDOW)

    async def allow(self, key: str) -> float:
        try:
            counted = self._script(keys=[PREFIX + key], args=[self.per_minute, WINDOW_S * 1000, uuid.uuid4().hex])
            return int(await asyncio.wait_for(counted, self.timeout_s)) / 1000
        except Exception as exc:
            log.warning("rate limit not checked in Redis (%s); limiting in this process", exc)
            return self.allow_here(key)
