"""The edit scheduler: merged edits, rate limits, long replies over several messages."""

import asyncio
import itertools
import time
from dataclasses import dataclass

import pytest

from bots.edits import DeliveryFailed, RateBudget, RateLimited, ReplyStreamer
from bots.splitting import join_parts

MARKER = " ▌"


@dataclass
class Call:
    at: float
    kind: str
    ref: int
    text: str
    refused: bool = False


class FakeSink:
    """An in-memory chat channel that records every call and can answer some with 429."""

    _ids = itertools.count(1)

    def __init__(self, limit: int = 2000, log: list[Call] | None = None, delay: float = 0.0):
        self.limit, self.delay = limit, delay
        self.calls: list[Call] = []
        self.log = self.calls if log is None else log
        self.messages: dict[int, str] = {}
        self.repeated_edits = 0
        self._refusals: list[list] = []
        self.fail_edits_with: Exception | None = None

    def refuse(self, times: int, retry_after: float, when=lambda kind, text: True) -> None:
        self._refusals.append([when, times, retry_after])

    async def _record(self, kind: str, ref: int, text: str) -> None:
        assert 0 < len(text) <= self.limit, len(text)
        call = Call(time.monotonic(), kind, ref, text)
        self.calls.append(call)
        if self.log is not self.calls:
            self.log.append(call)
        for rule in self._refusals:
            when, left, retry_after = rule
            if left and when(kind, text):
                rule[1] -= 1
                call.refused = True
                raise RateLimited(retry_after)
        if self.delay:
            await asyncio.sleep(self.delay)

    async def post(self, text: str) -> int:
        ref = next(self._ids)
        await self._record("post", ref, text)
        self.messages[ref] = text
        return ref

    async def edit(self, ref: int, text: str) -> None:
        assert ref in self.messages
        if self.fail_edits_with:
            raise self.fail_edits_with
        await self._record("edit", ref, text)
        self.repeated_edits += text == self.messages[ref]
        self.messages[ref] = text

    def contents(self) -> list[str]:
        return [self.messages[ref] for ref in sorted(self.messages)]

    def accepted(self, kind: str | None = None) -> list[Call]:
        return [c for c in self.calls if not c.refused and (kind is None or c.kind == kind)]


def reply_text(chars: int) -> str:
    words = "the streamed reply grows word by word while the bot edits its message".split()
    code = "```python\n" + "\n".join(f"total += item_{i} * {i}" for i in range(40)) + "\n```"
    pieces, size = [], 0
    for i in itertools.count():
        piece = code if i % 7 == 6 else " ".join(words[(i + j) % len(words)] for j in range(30))
        pieces.append(piece)
        size += len(piece) + 2
        if size >= chars:
            return "\n\n".join(pieces)[:chars]


async def stream(streamer: ReplyStreamer, text: str, chunks: int, pause: float) -> None:
    step = max(1, len(text) // chunks)
    for end in range(step, len(text) + step, step):
        await streamer.update(text[:end])
        await asyncio.sleep(pause)


def assert_spacing_per_message(sink: FakeSink, min_interval: float) -> None:
    for ref in sink.messages:
        times = [c.at for c in sink.calls if c.ref == ref and not c.refused]
        assert all(b - a >= min_interval * 0.95 for a, b in itertools.pairwise(times)), times


async def test_rapid_updates_are_merged_into_a_few_edits():
    sink = FakeSink()
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.25)
    text = reply_text(1500)
    await stream(streamer, text, chunks=100, pause=0.005)  # ~0.5 s, i.e. two intervals
    await streamer.finish(text)
    assert sink.contents() == [text]
    assert streamer.metrics.posts == 1 and streamer.metrics.edits <= 3
    assert streamer.metrics.first_text_s is not None and streamer.metrics.first_text_s < 0.1
    assert_spacing_per_message(sink, 0.25)
    assert sink.repeated_edits == 0


async def test_update_never_waits_for_the_platform():
    sink = FakeSink(delay=0.3)
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.05)
    started = time.monotonic()
    for i in range(1, 30):
        await streamer.update("word " * i)
    assert time.monotonic() - started < 0.05
    await streamer.finish("word " * 30)
    assert sink.contents() == ["word " * 30]


async def test_the_same_text_is_never_sent_twice():
    sink = FakeSink()
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.02)
    for text in ["Hello", "Hello", "Hello", "Hello there", "Hello there"]:
        await streamer.update(text)
        await asyncio.sleep(0.03)
    await streamer.finish("Hello there")
    shown = [c.text for c in sink.accepted()]
    assert shown == ["Hello" + MARKER, "Hello there" + MARKER, "Hello there"]
    assert sink.repeated_edits == 0


async def test_the_final_text_lands_after_two_rate_limits_in_a_row():
    sink = FakeSink()
    sink.refuse(2, retry_after=0.05, when=lambda kind, text: MARKER not in text)
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.02)
    await stream(streamer, "a fairly short reply", chunks=4, pause=0.01)
    await streamer.finish("a fairly short reply")
    assert sink.contents() == ["a fairly short reply"]
    assert streamer.metrics.rate_limited == 2
    refused = [c for c in sink.calls if c.refused]
    assert len(refused) == 2 and refused[1].at - refused[0].at >= 0.05 * 0.95


async def test_a_platform_that_keeps_refusing_gives_a_clear_error():
    sink = FakeSink()
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.01, max_attempts=3)
    await streamer.start()
    sink.refuse(99, retry_after=0.01)
    with pytest.raises(DeliveryFailed, match="refused message 1 3 times"):
        await streamer.finish("never shown")
    assert sink.contents() == ["…"] and streamer.metrics.rate_limited == 3


async def test_intermediate_rate_limits_back_off_and_the_stream_recovers():
    sink = FakeSink()
    sink.refuse(1, retry_after=0.1, when=lambda kind, text: kind == "edit")
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.02)
    text = reply_text(400)
    await stream(streamer, text, chunks=20, pause=0.01)
    await streamer.finish(text)
    assert sink.contents() == [text] and streamer.metrics.rate_limited == 1
    refused = next(c for c in sink.calls if c.refused)
    assert all(c.at - refused.at >= 0.1 * 0.95 for c in sink.calls if c.at > refused.at)


async def test_a_long_reply_continues_in_new_messages_that_join_back():
    sink = FakeSink(limit=2000)
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.02)
    text = reply_text(6000)
    await stream(streamer, text, chunks=150, pause=0.001)
    await streamer.finish(text)
    parts = sink.contents()
    assert len(parts) >= 3 and all(len(p) <= 2000 for p in parts)
    assert not any(MARKER in p for p in parts)
    assert join_parts(parts) == text
    assert streamer.metrics.posts == len(parts) and sink.repeated_edits == 0
    assert_spacing_per_message(sink, 0.02)


async def test_a_stripped_final_text_still_lines_up_with_finished_messages():
    sink = FakeSink(limit=500)
    streamer = ReplyStreamer(sink, limit=500, min_interval_s=0.01)
    text = "\n  " + reply_text(1400) + "\n\n   \n"
    await stream(streamer, text, chunks=40, pause=0.002)
    await streamer.finish(text.strip())
    assert join_parts(sink.contents()) == text.strip() and len(sink.messages) >= 3


async def test_a_burst_larger_than_several_messages_is_split_at_once():
    sink = FakeSink(limit=500)
    streamer = ReplyStreamer(sink, limit=500, min_interval_s=0.02)
    text = reply_text(3000)
    await streamer.update(text[:2900])
    await asyncio.sleep(0.05)
    assert len(sink.messages) >= 6
    await streamer.finish(text)
    assert join_parts(sink.contents()) == text


async def test_twenty_streamers_share_one_channel_budget():
    window, log = 0.25, []
    budget = RateBudget(5, window)
    sinks = [FakeSink(log=log) for _ in range(20)]
    streamers = [ReplyStreamer(s, 2000, min_interval_s=0.05, budget=budget, scope="channel-1") for s in sinks]
    texts = [reply_text(300 + 20 * i) for i in range(20)]

    async def run(streamer, text):
        await stream(streamer, text, chunks=15, pause=0.02)
        await streamer.finish(text)

    await asyncio.gather(*(run(s, t) for s, t in zip(streamers, texts)))
    for sink, text in zip(sinks, texts):
        assert sink.contents() == [text]
    times = sorted(c.at for c in log)
    for i, start in enumerate(times):
        assert sum(1 for t in times[i:] if t < start + window - 0.002) <= 5
    assert sum(s.metrics.skipped for s in streamers) > 0  # saturated: intermediate edits were dropped
    assert all(s.repeated_edits == 0 for s in sinks)


async def test_fail_replaces_the_text_in_progress():
    sink = FakeSink()
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.02)
    await stream(streamer, "Let me think about that. First,", chunks=5, pause=0.01)
    await streamer.fail("Sorry, something went wrong while answering.")
    assert sink.contents() == ["Sorry, something went wrong while answering."]
    with pytest.raises(RuntimeError):
        await streamer.update("more")


async def test_fail_keeps_finished_messages_and_replaces_only_the_live_one():
    sink = FakeSink(limit=500)
    streamer = ReplyStreamer(sink, limit=500, min_interval_s=0.02)
    text = reply_text(1200)
    await stream(streamer, text, chunks=30, pause=0.003)
    await streamer.fail("Sorry, the model stopped answering.")
    contents = sink.contents()
    assert contents[-1] == "Sorry, the model stopped answering." and len(contents) >= 2
    assert not any(MARKER in c for c in contents)
    assert text.startswith(contents[0])


async def test_start_posts_a_placeholder_then_edits_it():
    sink = FakeSink()
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.02)
    await streamer.start("…")
    assert sink.contents() == ["…"] and streamer.metrics.first_text_s is None
    await stream(streamer, "Hello there, friend.", chunks=3, pause=0.03)
    await streamer.finish("Hello there, friend.", footer="-# local model · confidence 0.82")
    assert sink.contents() == ["Hello there, friend.\n-# local model · confidence 0.82"]
    assert streamer.metrics.posts == 1 and streamer.metrics.first_text_s is not None


async def test_a_footer_that_does_not_fit_gets_its_own_message():
    sink = FakeSink(limit=100)
    streamer = ReplyStreamer(sink, limit=100, min_interval_s=0.01)
    await streamer.finish("x" * 95, footer="-# via openai")
    assert sink.contents() == ["x" * 95, "-# via openai"]


async def test_a_real_platform_failure_surfaces_to_the_caller():
    sink = FakeSink()
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.01)
    await streamer.update("first")
    await asyncio.sleep(0.02)
    sink.fail_edits_with = ConnectionError("gone")
    await streamer.update("first and second")
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectionError):
        await streamer.update("first, second and third")
    with pytest.raises(ConnectionError):
        await streamer.finish("first, second and third")
    sink.fail_edits_with = None
    await streamer.fail("Sorry, I lost the connection.")
    assert sink.contents() == ["Sorry, I lost the connection."]


async def test_an_open_code_block_is_closed_while_streaming():
    sink = FakeSink()
    streamer = ReplyStreamer(sink, limit=2000, min_interval_s=0.01)
    await streamer.update("Here:\n```python\nprint(1)")
    await asyncio.sleep(0.02)
    assert sink.contents() == ["Here:\n```python\nprint(1)" + MARKER + "\n```"]
    await streamer.finish("Here:\n```python\nprint(1)\n```")
    assert sink.contents() == ["Here:\n```python\nprint(1)\n```"]


async def test_budget_allows_a_burst_then_spaces_calls_over_the_window():
    budget = RateBudget(3, 0.1)
    assert all(budget.try_acquire("c") for _ in range(3))
    assert not budget.try_acquire("c") and budget.try_acquire("other")
    assert 0.05 < budget.wait_time("c") <= 0.1
    started = time.monotonic()
    await budget.acquire("c")
    assert time.monotonic() - started >= 0.095


async def test_budget_pauses_a_scope_after_retry_after():
    budget = RateBudget(50, 60)
    budget.note_retry_after("workspace", 0.1)
    assert not budget.try_acquire("workspace")
    started = time.monotonic()
    await budget.acquire("workspace")
    assert time.monotonic() - started >= 0.095
    assert budget.try_acquire("workspace")


async def test_queued_callers_go_before_opportunistic_ones():
    now, gate = [0.0], asyncio.Event()

    async def sleep(seconds):
        await gate.wait()

    budget = RateBudget(1, 1.0, clock=lambda: now[0], sleep=sleep)
    assert budget.try_acquire("c")
    waiter = asyncio.create_task(budget.acquire("c"))
    await asyncio.sleep(0)  # the waiter is queued, sleeping until the window moves on
    now[0] = 5.0
    assert not budget.try_acquire("c")  # a free slot, but it belongs to the queued caller
    gate.set()
    await waiter
    assert not budget.try_acquire("c") and budget.wait_time("c") == pytest.approx(1.0)


def test_limits_and_markers_are_checked():
    with pytest.raises(ValueError):
        RateBudget(0, 1)
    with pytest.raises(ValueError):
        ReplyStreamer(FakeSink(), limit=50, typing_marker=" " * 30)
