"""Relay a growing reply into chat messages by posting once and editing, within platform rate limits."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from bots.splitting import MAX_FENCE_RUN, next_cut, render_part, split_message, unclosed_fence

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]


class RateLimited(Exception):
    """Raised by a sink when the platform refuses a call for now (HTTP 429)."""

    def __init__(self, retry_after: float):
        self.retry_after = max(0.0, float(retry_after))
        super().__init__(f"rate limited; retry after {self.retry_after:.3g} s")


class DeliveryFailed(RuntimeError):
    """The platform kept refusing a message that had to land (the final text or an error notice)."""


class MessageSink(Protocol):
    """One conversation's destination on a platform; front-ends implement it."""

    async def post(self, text: str) -> Any:
        """Create a message and return an opaque reference to it."""

    async def edit(self, ref: Any, text: str) -> None:
        """Replace the text of a message created by post()."""


class RateBudget:
    """At most `calls` platform calls per `per_s` seconds in each scope (a channel, a workspace),
    shared by every streamer. Counted over a sliding window, so no window of per_s seconds ever
    holds more than `calls`; blocking acquirers are served first come, first served."""

    def __init__(self, calls: int, per_s: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        if calls < 1 or per_s <= 0:
            raise ValueError("a budget needs calls >= 1 and per_s > 0")
        self.calls, self.per_s = calls, per_s
        self._clock, self._sleep = clock, sleep
        self._granted: dict[Hashable, deque[float]] = defaultdict(deque)
        self._paused_until: dict[Hashable, float] = {}
        self._queues: dict[Hashable, asyncio.Lock] = defaultdict(asyncio.Lock)

    def wait_time(self, scope: Hashable) -> float:
        """Seconds until a call in scope would be allowed (0.0 when one is allowed now)."""
        now = self._clock()
        granted = self._granted[scope]
        while granted and granted[0] + self.per_s <= now:
            granted.popleft()
        wait = self._paused_until.get(scope, now) - now
        if len(granted) >= self.calls:
            wait = max(wait, granted[0] + self.per_s - now)
        return max(0.0, wait)

    def try_acquire(self, scope: Hashable) -> bool:
        """Take a slot if one is free now and nobody is queued for it."""
        if self._queues[scope].locked() or self.wait_time(scope) > 0:
            return False
        self._granted[scope].append(self._clock())
        return True

    async def acquire(self, scope: Hashable) -> None:
        """Wait for a slot in scope, then take it."""
        async with self._queues[scope]:
            while (wait := self.wait_time(scope)) > 0:
                await self._sleep(wait)
            self._granted[scope].append(self._clock())

    def note_retry_after(self, scope: Hashable, seconds: float) -> None:
        """Hold every call in scope for `seconds` after the platform answered 429."""
        until = self._clock() + max(0.0, seconds)
        self._paused_until[scope] = max(self._paused_until.get(scope, until), until)


@dataclass
class StreamMetrics:
    posts: int = 0
    edits: int = 0
    rate_limited: int = 0
    skipped: int = 0  # intermediate updates not sent because the shared budget was saturated
    first_text_s: float | None = None  # from the streamer's creation until reply text was visible


@dataclass
class _Message:
    ref: Any
    shown: str | None  # None: unknown (adopted after a restart)
    last_call: float


class ReplyStreamer:
    """Shows a reply as it grows: posts a message, edits it at most once per min_interval_s, moves
    on to a new message when the text outgrows `limit`, and always lands the final text."""

    def __init__(
        self,
        sink: MessageSink,
        limit: int,
        min_interval_s: float = 1.0,
        typing_marker: str = " ▌",
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        *,
        budget: RateBudget | None = None,
        scope: Hashable = None,
        max_attempts: int = 5,
    ):
        if len(typing_marker) + 1 + MAX_FENCE_RUN > limit // 2:
            raise ValueError("typing_marker is too long for this limit")
        self._sink, self._limit, self._min_interval = sink, limit, min_interval_s
        self._marker, self._clock, self._sleep = typing_marker, clock, sleep
        self._budget, self._scope, self._max_attempts = budget, scope, max_attempts
        self.metrics = StreamMetrics()
        self._created_at = clock()
        self._text = ""
        self._frozen: list[str] = []  # final contents of the messages the reply has outgrown
        self._frozen_upto = 0  # where the live message's share of the reply begins
        self._messages: list[_Message] = []
        self._placeholder: str | None = None
        self._paused_until = float("-inf")
        self._wake = asyncio.Event()
        self._io = asyncio.Lock()  # held around platform calls, so finish() never interrupts one
        self._pump_task: asyncio.Task | None = None
        self._error: Exception | None = None
        self._closed = self._done = False

    def adopt(self, refs: list[Any]) -> None:
        """Continue messages posted before a restart (oldest first). Their text is unknown here, so each
        is rewritten by the next finish() or fail()."""
        self._check_open()
        if self._messages:
            raise RuntimeError("adopt() comes before anything is posted")
        self._messages = [_Message(ref, None, float("-inf")) for ref in refs]

    async def start(self, placeholder: str = "…") -> None:
        """Post a placeholder now, before any text arrives."""
        self._check_open()
        self._placeholder = placeholder
        async with self._io:
            if not self._messages:
                await self._land(0, placeholder)

    async def update(self, full_text_so_far: str) -> None:
        """Note the reply so far; returns at once and the background relay catches up. Leading
        whitespace is dropped, as the platforms do."""
        self._check_open()
        if self._error:
            raise self._error
        text = full_text_so_far.lstrip()
        if not text or text == self._text:
            return
        if not text.startswith(self._text[: self._frozen_upto]):
            self._unfreeze()
        self._text = text
        self._wake.set()
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.create_task(self._pump())

    async def finish(self, final_text: str, footer: str | None = None) -> None:
        """Show the final text (and footer) without the typing marker, waiting out rate limits. final_text
        normally extends the streamed text; one that does not (a rewritten reply) is laid out afresh."""
        self._check_open()
        final_text = final_text.lstrip()
        async with self._io:
            await self._stop_pump()
            if self._error:
                raise self._error
            if not final_text.startswith(self._text[: self._frozen_upto]):
                self._unfreeze()
            if not final_text[self._frozen_upto :].strip():
                raise ValueError("final_text is empty")
            self._closed = True
            contents = self._final_contents(final_text, footer)
            for index, content in enumerate(contents):
                await self._land(index, content)
        self._done = True

    async def fail(self, user_message: str) -> None:
        """Replace the in-progress text with a short error for the user; finished parts stay."""
        if self._done:
            raise RuntimeError("the reply is already finished")
        self._closed = True
        async with self._io:
            await self._stop_pump()
            for index, content in enumerate([*self._frozen, user_message]):
                await self._land(index, content, is_reply_text=False)
        self._done = True

    def _unfreeze(self) -> None:
        """The reply was rewritten (a redelivered task, a fallback to another model): finished messages are
        laid out again from the new text, in the same messages."""
        self._frozen, self._frozen_upto = [], 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the reply is already finished")

    async def _stop_pump(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.wait([self._pump_task])

    async def _pump(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                async with self._io:
                    if self._closed:
                        return
                    retry_in = await self._relay()
                if retry_in is not None:
                    await self._sleep(retry_in)
                    self._wake.set()
        except Exception as exc:  # a real failure: raised by the next update() or finish()
            self._error = exc

    async def _relay(self) -> float | None:
        """Bring the messages toward the latest text without waiting on the budget; returns how
        long to wait before trying again, or None when everything is shown."""
        retry_in: float | None = None
        for index, content in enumerate(self._live_contents()):
            message = self._messages[index] if index < len(self._messages) else None
            if message is not None and message.shown == content:
                continue
            wait = self._wait_before_call(message)
            if wait > 0:
                retry_in = wait if retry_in is None else min(retry_in, wait)
                if message is None:
                    break  # messages must be posted in order
                continue
            if self._budget and not self._budget.try_acquire(self._scope):
                self.metrics.skipped += 1
                return max(self._budget.wait_time(self._scope), self._min_interval, 0.01)
            try:
                await self._call(index, content)
            except RateLimited as exc:
                self._note_rate_limited(exc)
                return max(exc.retry_after, 0.01)
        return retry_in

    def _live_contents(self) -> list[str]:
        """Contents wanted now: finished parts, then the live part with the typing marker. Parts the
        text outgrows are frozen here for good."""
        text = self._text
        if not text:
            return []
        while True:
            live = render_part(text, self._frozen_upto, len(text))
            if (shown := self._decorate(live)) is not None:
                return [*self._frozen, shown]
            cut = next_cut(text, self._frozen_upto, self._limit, growing=True)
            if cut is None or not text[cut:].strip():  # keep some text live, so that strip() is safe
                return [*self._frozen, self._decorate(live, truncate=True)]
            self._frozen.append(render_part(text, self._frozen_upto, cut))
            self._frozen_upto = cut

    def _decorate(self, live: str, truncate: bool = False) -> str | None:
        """The live part with the marker, and a display-only closing fence for an open code block."""
        fence = unclosed_fence(live)
        tail = self._marker + (fence.closing if fence else "")
        if len(live) + len(tail) <= self._limit:
            return live + tail
        if not truncate:
            return None
        live = live[: self._limit - len(self._marker) - 1 - MAX_FENCE_RUN]
        fence = unclosed_fence(live)
        return live + self._marker + (fence.closing if fence else "")

    def _final_contents(self, final_text: str, footer: str | None) -> list[str]:
        contents = [*self._frozen, *split_message(final_text, self._limit, start=self._frozen_upto)]
        if footer:
            if len(contents[-1]) + 1 + len(footer) <= self._limit:
                contents[-1] += "\n" + footer
            else:
                contents.append(footer[: self._limit])
        return contents

    def _wait_before_call(self, message: _Message | None) -> float:
        now = self._clock()
        wait = self._paused_until - now
        if message is not None:
            wait = max(wait, message.last_call + self._min_interval - now)
        return max(0.0, wait)

    def _note_rate_limited(self, exc: RateLimited) -> None:
        self.metrics.rate_limited += 1
        self._paused_until = max(self._paused_until, self._clock() + exc.retry_after)
        if self._budget:
            self._budget.note_retry_after(self._scope, exc.retry_after)

    async def _land(self, index: int, content: str, is_reply_text: bool = True) -> None:
        """Make message `index` show content, waiting for its turn and retrying after 429s."""
        for _ in range(self._max_attempts):
            message = self._messages[index] if index < len(self._messages) else None
            if message is not None and message.shown == content:
                return
            if (wait := self._wait_before_call(message)) > 0:
                await self._sleep(wait)
            if self._budget:
                await self._budget.acquire(self._scope)
            try:
                await self._call(index, content, is_reply_text)
                return
            except RateLimited as exc:
                self._note_rate_limited(exc)
        raise DeliveryFailed(f"the platform refused message {index + 1} {self._max_attempts} times")

    async def _call(self, index: int, content: str, is_reply_text: bool = True) -> None:
        if index < len(self._messages):
            message = self._messages[index]
            message.last_call = self._clock()
            await self._sink.edit(message.ref, content)
            message.shown = content
            self.metrics.edits += 1
        else:
            posted_at = self._clock()
            ref = await self._sink.post(content)
            self._messages.append(_Message(ref, content, posted_at))
            self.metrics.posts += 1
        if is_reply_text and content != self._placeholder and self.metrics.first_text_s is None:
            self.metrics.first_text_s = self._clock() - self._created_at
