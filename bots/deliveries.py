"""Platform deliveries seen in the last hour, so that one redelivered or replayed is handled once."""

import asyncio
import logging
import time
from collections import OrderedDict

log = logging.getLogger(__name__)
PREFIX = "pioneer:delivery:"


class Deliveries:
    """first(key) is True once per key within ttl_s. With a Redis client the record is shared by every front-end
    on that Redis and outlives a restart; without one (embedded mode), or while Redis is away, this process keeps
    the last `capacity` keys."""

    def __init__(self, redis_client=None, *, ttl_s: float = 3600, capacity: int = 10_000, timeout_s: float = 1.0,
                 clock=time.monotonic):
        self.client, self.ttl_s, self.capacity, self.clock = redis_client, ttl_s, capacity, clock
        self.timeout_s = timeout_s  # Slack wants its ack within 3 s
        self._seen: OrderedDict[str, float] = OrderedDict()

    async def first(self, key: str) -> bool:
        if self.client is not None:
            try:
                recorded = self.client.set(PREFIX + key, 1, nx=True, ex=int(self.ttl_s))
                return bool(await asyncio.wait_for(recorded, self.timeout_s))
            except Exception as exc:  # an unrecorded repeat may be answered twice; a dropped message is worse
                log.warning("could not record delivery %s in Redis (%s); remembering it in this process", key, exc)
        return self._first_here(key)

    def _first_here(self, key: str) -> bool:
        now = self.clock()
        while self._seen and now - next(iter(self._seen.values())) >= self.ttl_s:
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            self._seen.popitem(last=False)
        self._seen[key] = now
        return True
