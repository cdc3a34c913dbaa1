"""The reply stream from worker to front-end: Redis Streams in production, in process memory in embedded mode."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Literal

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

log = logging.getLogger(__name__)

EventKind = Literal["chunk", "final", "error"]
TERMINAL_KINDS = ("final", "error")


class StreamTimeout(TimeoutError):
    """Nothing arrived on a reply stream for the reader's timeout."""


@dataclass(frozen=True)
class StreamEvent:
    """One record of a reply stream; `stream_id` is filled in by the reader and never encoded."""

    kind: EventKind
    seq: int
    attempt: str
    text: str = ""
    meta: dict = field(default_factory=dict)
    stream_id: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS

    def to_fields(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "seq": str(self.seq),
            "attempt": self.attempt,
            "text": self.text,
            "meta": json.dumps(self.meta, separators=(",", ":")),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str], stream_id: str = "") -> StreamEvent:
        kind = fields["kind"]
        if kind not in ("chunk", *TERMINAL_KINDS):
            raise ValueError(f"unknown stream event kind {kind!r}")
        meta = json.loads(fields.get("meta") or "{}")
        if not isinstance(meta, dict):
            raise ValueError("stream event meta is not an object")
        return cls(
            kind=kind,
            seq=int(fields.get("seq") or 0),
            attempt=fields.get("attempt", ""),
            text=fields.get("text", ""),
            meta=meta,
            stream_id=stream_id,
        )


class StreamPublisher(ABC):
    """The worker's side of a reply stream; synchronous and safe to share between threads."""

    @abstractmethod
    def publish(self, request_id: str, event: StreamEvent) -> None: ...

    @abstractmethod
    def is_finished(self, request_id: str) -> bool:
        """Whether a final or error record exists, so a redelivered task can skip finished work."""

    def chunk(self, request_id: str, attempt: str, seq: int, text: str) -> None:
        self.publish(request_id, StreamEvent("chunk", seq, attempt, text))

    def final(self, request_id: str, attempt: str, meta: dict) -> None:
        self.publish(request_id, StreamEvent("final", 0, attempt, "", dict(meta)))

    def error(self, request_id: str, attempt: str, message: str, kind: str) -> None:
        self.publish(request_id, StreamEvent("error", 0, attempt, message, {"kind": kind}))

    remote = False  # whether publishing and claiming make round trips to a server

    def claim(self, request_id: str, attempt: str, ttl_s: float) -> bool:
        """Take the lease on answering request_id; False while another live attempt holds it. The default
        (one process, no redelivery) always grants it."""
        return True

    def begin(self, request_id: str, attempt: str, ttl_s: float) -> str:
        """"duplicate" when the request is answered already, "busy" while another live attempt holds its lease,
        else "claimed": the lease is this attempt's."""
        if self.is_finished(request_id):
            return "duplicate"
        if not self.claim(request_id, attempt, ttl_s):
            return "busy"
        return "duplicate" if self.is_finished(request_id) else "claimed"

    def renew(self, request_id: str, attempt: str, ttl_s: float) -> bool:
        return True

    def release(self, request_id: str, attempt: str) -> None:
        """Give the lease back (only if this attempt still holds it)."""

    def close(self) -> None:
        """Release connections; the default has none."""


class StreamBus(StreamPublisher):
    """Both sides of the reply stream: the synchronous publisher and the asynchronous reader."""

    @abstractmethod
    def read(self, request_id: str, *, timeout_s: float, last_id: str = "0") -> AsyncIterator[StreamEvent]:
        """Replay from `last_id` ("0" = the start), then follow; ends after final or error.

        Raises StreamTimeout when nothing arrives for `timeout_s` seconds.
        """


class ReplyAssembler:
    """Folds stream events into the current full reply; a new attempt replaces the text of the old one."""

    def __init__(self):
        self.attempt: str | None = None
        self.done = False
        self.meta: dict = {}
        self.error: str | None = None
        self._chunks: dict[int, str] = {}
        self._old_attempts: set[str] = set()

    @property
    def text(self) -> str:
        return "".join(self._chunks[seq] for seq in sorted(self._chunks))

    def add(self, event: StreamEvent) -> bool:
        """Apply one event; returns whether anything changed."""
        if self.done or event.attempt in self._old_attempts:
            return False
        if event.attempt != self.attempt:
            if self.attempt is not None:
                self._old_attempts.add(self.attempt)
            self.attempt = event.attempt
            self._chunks = {}
        if event.kind == "chunk":
            if event.seq in self._chunks:
                return False
            self._chunks[event.seq] = event.text
        elif event.kind == "final":
            self.done, self.meta = True, dict(event.meta)
        else:
            self.done, self.meta, self.error = True, dict(event.meta), event.text
        return True


class RedisStreamBus(StreamBus):
    """Reply streams as Redis Streams: XADD with MAXLEN ~; XREAD BLOCK to follow.

    A stream gets its TTL with its final (or error) record, or when a reader gives up on it: under memory pressure
    Redis (maxmemory-policy volatile-lru) evicts keys that carry a TTL, and a reply in progress must not be one."""

    remote = True

    def __init__(
        self,
        url: str,
        *,
        maxlen: int = 2000,
        ttl_s: int = 3600,
        key_prefix: str = "pioneer:reply:",
        block_slice_s: float = 1.0,
        publish_retries: int = 12,
        client_name: str = "pioneer-reply",
    ):
        self.url = url
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self.block_slice_s = block_slice_s
        self.client_name = client_name
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
            # about 10 s of retries: a reply in progress rides out a Redis restart
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), publish_retries),
            client_name=f"{client_name}-publisher",
        )
        self._reader_pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> pool
        self._begin_script = self._client.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 1 then return 'duplicate' end "
            "if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'claimed' end "
            "return 'busy'")

    def key(self, request_id: str) -> str:
        return f"{self.key_prefix}{request_id}"

    def done_key(self, request_id: str) -> str:
        return f"{self.key_prefix}{request_id}:done"

    def publish(self, request_id, event):
        # A retried XADD may land twice; readers drop duplicate (attempt, seq) pairs.
        key = self.key(request_id)
        if not event.is_terminal:  # one command, not a MULTI/EXEC pipeline: less to do before the first chunk
            self._client.xadd(key, event.to_fields(), maxlen=self.maxlen, approximate=True)
            return
        with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(key, event.to_fields(), maxlen=self.maxlen, approximate=True)
            pipe.expire(key, self.ttl_s)
            pipe.set(self.done_key(request_id), event.kind, ex=self.ttl_s)
            pipe.execute()

    def is_finished(self, request_id):
        return bool(self._client.exists(self.done_key(request_id)))

    def lease_key(self, request_id: str) -> str:
        return f"{self.key_prefix}{request_id}:lease"

    def claim(self, request_id, attempt, ttl_s):
        return bool(self._client.set(self.lease_key(request_id), attempt, nx=True, px=int(ttl_s * 1000)))

    def begin(self, request_id, attempt, ttl_s):
        # One round trip before the first token, and no gap between the check and the claim.
        return self._begin_script(keys=[self.done_key(request_id), self.lease_key(request_id)],
                                  args=[attempt, int(ttl_s * 1000)])

    def renew(self, request_id, attempt, ttl_s):
        return bool(self._if_holder(keys=[self.lease_key(request_id)], args=[attempt, int(ttl_s * 1000)]))

    def release(self, request_id, attempt):
        self._if_holder(keys=[self.lease_key(request_id)], args=[attempt, 0])

    @property
    def _if_holder(self):
        if not hasattr(self, "_if_holder_script"):
            self._if_holder_script = self._client.register_script(
                "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end "
                "if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end "
                "return redis.call('DEL', KEYS[1])")
        return self._if_holder_script

    def close(self):
        self._client.close()

    def _reader_client(self) -> redis.asyncio.Redis:
        """A client on this event loop's pool of reader connections: a reply is read on a connection that an
        earlier reply used, without connecting again. Reconnecting is done by read() against its own deadline,
        so the client itself never retries."""
        loop = asyncio.get_running_loop()
        pool = self._reader_pools.get(loop)
        if pool is None:
            pool = redis.asyncio.ConnectionPool.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=self.block_slice_s + 5,
                socket_connect_timeout=2,
                retry=AsyncRetry(NoBackoff(), 0),
                client_name=f"{self.client_name}-reader",
            )
            self._reader_pools[loop] = pool
        return redis.asyncio.Redis(connection_pool=pool)

    async def read(self, request_id, *, timeout_s, last_id="0"):
        key = self.key(request_id)
        client = self._reader_client()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        backoff_s = 0.05
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    await self._abandon(client, key)
                    raise StreamTimeout(f"no reply on {key} for {timeout_s} s")
                block_ms = max(1, int(min(remaining, self.block_slice_s) * 1000))
                try:
                    response = await client.xread({key: last_id}, count=100, block=block_ms)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    log.warning("reply stream %s: %s; reconnecting in %.2f s", key, exc, backoff_s)
                    await asyncio.sleep(min(backoff_s, max(0.0, deadline - loop.time())))
                    backoff_s = min(backoff_s * 2, 1.0)
                    continue
                backoff_s = 0.05
                for _key, entries in response or ():
                    for entry_id, fields in entries:
                        last_id = entry_id
                        try:
                            event = StreamEvent.from_fields(fields, stream_id=entry_id)
                        except (KeyError, ValueError) as exc:
                            log.warning("reply stream %s: skipping bad record %s: %s", key, entry_id, exc)
                            continue
                        deadline = loop.time() + timeout_s
                        yield event
                        if event.is_terminal:
                            return
        finally:
            await client.aclose()

    async def _abandon(self, client: redis.asyncio.Redis, key: str) -> None:
        """A stream nobody finished (its worker died, its task expired) expires like a finished one."""
        try:
            await client.expire(key, self.ttl_s, nx=True)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass


class _MemoryStream:
    """One request's events plus the asyncio readers waiting for more."""

    def __init__(self, now: float):
        self.events: list[StreamEvent] = []
        self.first_number = 1  # stream number of events[0]; grows as maxlen trims the front
        self.finished = False
        self.updated_at = now
        self.waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()


class MemoryStreamBus(StreamBus):
    """Reply streams inside one process (embedded mode): same semantics as RedisStreamBus, thread-safe."""

    def __init__(self, *, maxlen: int = 2000, ttl_s: float = 3600, clock=time.monotonic):
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self._clock = clock
        self._streams: OrderedDict[str, _MemoryStream] = OrderedDict()  # least recently written first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired()
            return len(self._streams)

    def _stream(self, request_id: str) -> _MemoryStream:
        stream = self._streams.get(request_id)
        if stream is None:
            stream = self._streams[request_id] = _MemoryStream(self._clock())
        return stream

    def _drop_expired(self) -> None:
        now = self._clock()
        while self._streams:
            request_id, stream = next(iter(self._streams.items()))
            if now - stream.updated_at < self.ttl_s:
                break
            if stream.waiters:  # someone still follows it: keep it as if just written
                stream.updated_at = now
                self._streams.move_to_end(request_id)
                continue
            del self._streams[request_id]

    def publish(self, request_id, event):
        with self._lock:
            self._drop_expired()
            stream = self._stream(request_id)
            number = stream.first_number + len(stream.events)
            stream.events.append(replace(event, stream_id=f"0-{number}"))
            if len(stream.events) > self.maxlen:
                trimmed = len(stream.events) - self.maxlen
                del stream.events[:trimmed]
                stream.first_number += trimmed
            stream.finished = stream.finished or event.is_terminal
            stream.updated_at = self._clock()
            self._streams.move_to_end(request_id)
            waiters = list(stream.waiters)
        for loop, wakeup in waiters:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # that reader's loop is closed
                pass

    def is_finished(self, request_id):
        with self._lock:
            stream = self._streams.get(request_id)
            return stream is not None and stream.finished

    async def read(self, request_id, *, timeout_s, last_id="0"):
        loop = asyncio.get_running_loop()
        next_number = _stream_number(last_id) + 1
        while True:
            wakeup = asyncio.Event()
            with self._lock:
                stream = self._stream(request_id)
                start = max(0, next_number - stream.first_number)
                pending = stream.events[start:]
                if not pending:
                    stream.waiters.add((loop, wakeup))
            if pending:
                for event in pending:
                    next_number = _stream_number(event.stream_id) + 1
                    yield event
                    if event.is_terminal:
                        return
                continue
            try:
                await asyncio.wait_for(wakeup.wait(), timeout_s)
            except TimeoutError:
                raise StreamTimeout(f"no reply for request {request_id} for {timeout_s} s") from None
            finally:
                with self._lock:
                    stream.waiters.discard((loop, wakeup))


def _stream_number(stream_id: str) -> int:
    """The sequence part of an id: "0" -> 0, "0-7" -> 7."""
    return int(stream_id.rpartition("-")[2] or 0)


def make_stream_bus(redis_url: str | None, **options) -> StreamBus:
    """A Redis-backed bus for a redis:// URL; an in-memory one (embedded mode) for None, "" or "memory://"."""
    if not redis_url or redis_url.startswith("memory://"):
        return MemoryStreamBus(**options)
    return RedisStreamBus(redis_url, **options)
