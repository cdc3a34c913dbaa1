"""The conversation core every front-end uses: validate, remember, trim, enqueue, relay the stream, store."""

import asyncio
import logging
import re
import time
import unicodedata
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass

from worker.orchestrator import MODES
from worker.streams import ReplyAssembler, StreamTimeout

from . import ops
from .deliveries import Deliveries
from .edits import ReplyStreamer
from .memory import Memory, Place, UnknownRequest
from .rate_limit import RateLimiter
from .recovery import LocatedSink, Resume, locate, recover_replies
from .trimming import trim_history

log = logging.getLogger(__name__)

# C0 and C1 controls but tab and newlines, zero-width space, direction marks and overrides, BOM. Joiners (U+200C,
# U+200D) stay: emoji sequences and Persian text need them.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
SURROGATE = re.compile("[\ud800-\udfff]")
TIMEOUT_MESSAGE = "Sorry, I couldn't finish that reply in time. Please try again."
BUSY_MESSAGE = "Sorry, I'm having trouble reaching my workers right now. Please try again in a moment."
# Shown under a hybrid reply that the local model gave below the threshold because OpenAI could not answer.
GUESS_NOT_CONFIGURED = "A guess from my small local model: I'm not sure of this one, and no OpenAI backend is set up."
GUESS_UNAVAILABLE = ("A guess from my small local model: I'm not sure of this one, and the OpenAI backend is "
                     "unavailable right now.")
RESTARTING_MESSAGE = "I'm restarting right now. Please send that again in a minute."


@dataclass
class Incoming:
    """One chat message from any platform."""

    place: Place
    user_id: str
    text: str
    display_name: str | None = None
    is_admin: bool = False


@dataclass
class Outcome:
    request_id: str | None
    status: str  # "answered" | "refused" | "failed"
    text: str
    method: str | None = None
    confidence: float | None = None
    first_text_ms: float | None = None
    note: str = ""  # shown under the reply and not stored (see guess_note)

    @property
    def shown(self) -> str:
        return self.text + self.note


class InputRejected(ValueError):
    """The user's input can't be answered; the message says why, politely."""


def clean_input(text: str, max_chars: int) -> str:
    """Normalise a user's message; raise InputRejected with a polite reason when it can't be answered."""
    if not isinstance(text, str):
        raise InputRejected("I can only read text messages.")
    text = CONTROL.sub("", unicodedata.normalize("NFC", valid_unicode(text))).strip()
    text = limit_combining_marks(text)
    if not text:
        raise InputRejected("I didn't get any text there. Send me a message and I'll answer.")
    if len(text) > max_chars:
        raise InputRejected(f"That message is too long ({len(text):,} characters; the limit is {max_chars:,}). "
                            "Please shorten it or split it up.")
    return text


def clean_output(text: str) -> str:
    """Model output fit to store and show: valid Unicode without NUL, controls or direction overrides."""
    return CONTROL.sub("", valid_unicode(text))


def clean_name(name: str | None) -> str | None:
    """A platform display name fit to store (PostgreSQL text holds no NUL, nor lone surrogates)."""
    return None if name is None else clean_output(name).strip() or None


def valid_unicode(text: str) -> str:
    """Pair up surrogates (e.g. split across JSON escapes); a lone one, or surrogateescape'd byte, becomes U+FFFD."""
    if not SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def limit_combining_marks(text: str, keep: int = 3) -> str:
    """Drop combining marks beyond `keep` in a row ("Zalgo" floods)."""
    out, run = [], 0
    for char in text:
        run = run + 1 if unicodedata.combining(char) else 0
        if run <= keep:
            out.append(char)
    return "".join(out)


class ConversationCore:
    """Owns memory, trimming, enqueueing, relaying and the edit schedule; front-ends only do platform I/O."""

    def __init__(self, settings, memory: Memory, dispatcher, bus, count_tokens, *, history_budget: int,
                 info_source=None, deliveries: Deliveries | None = None, limiter: RateLimiter | None = None):
        self.settings = settings
        self.memory, self.dispatcher, self.bus = memory, dispatcher, bus
        self.count_tokens = count_tokens
        self.history_budget = history_budget
        self.mode = settings.attention_mode
        self.limiter = limiter or RateLimiter(settings.rate_limit_per_minute)
        self.info_source = info_source
        self.deliveries = deliveries or Deliveries()
        self.answered: dict[str, int] = defaultdict(int)
        self.latencies_ms: deque = deque(maxlen=1000)
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def is_admin(self, platform_user_id: str) -> bool:
        return str(platform_user_id) in self.settings.admin_user_ids

    async def answer(self, incoming: Incoming, sink, limit: int, *, budget=None, scope=None,
                     min_interval_s: float = 1.0) -> Outcome:
        """Answer one message into `sink` (a bots.edits.MessageSink), streaming by edits."""
        if self.draining:
            await sink.post(RESTARTING_MESSAGE)
            return Outcome(None, "refused", RESTARTING_MESSAGE)
        self._in_flight += 1
        self._idle.clear()
        ops.IN_FLIGHT.inc()
        try:
            outcome = await self._answer(incoming, sink, limit, budget, scope, min_interval_s)
        finally:
            self._in_flight -= 1
            ops.IN_FLIGHT.dec()
            if not self._in_flight:
                self._idle.set()
        ops.MESSAGES.labels(outcome.status, outcome.method or "none").inc()
        return outcome

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new messages and wait up to timeout_s for those in progress; False if some are still running."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            log.warning("shutting down with %d replies still in progress", self._in_flight)
            return False

    async def _answer(self, incoming: Incoming, sink, limit: int, budget, scope, min_interval_s: float) -> Outcome:
        try:
            text = clean_input(incoming.text, self.settings.max_input_chars)
        except InputRejected as reason:
            await sink.post(str(reason))
            return Outcome(None, "refused", str(reason))
        wait = await self.limiter.allow(f"{incoming.place.platform}:{incoming.user_id}")
        if wait:
            message = f"You're sending messages faster than I can answer. Please wait {int(wait) + 1} s."
            await sink.post(message)
            return Outcome(None, "refused", message)

        place, user = incoming.place, incoming.user_id
        history = await self.memory.history(place, user)
        conversation = await self.memory.settings(place, user)
        name = clean_name(incoming.display_name)
        request_id = uuid.uuid4().hex
        await self.memory.add_user_message(place, user, text, self.count_tokens(text), name, request_id=request_id)
        messages = trim_history(conversation.system_prompt or self.settings.system_prompt,
                                [(m.role, m.content) for m in history], text, self.history_budget,
                                self.count_tokens)
        location = locate(sink)
        await self.memory.begin_reply(place, user, request_id, location)
        payload = {"request_id": request_id, "mode": conversation.mode or self.mode,
                   "messages": [{"role": r, "content": c} for r, c in messages], "enqueued_at": time.time()}

        async def save_location(where: dict) -> None:
            await self.memory.set_reply_ref(request_id, where)

        streamer = ReplyStreamer(LocatedSink(sink, save_location, location), limit, min_interval_s=min_interval_s,
                                 budget=budget, scope=scope)
        started = time.perf_counter()
        try:
            await self.dispatcher.submit(payload)
        except Exception:
            log.exception("could not enqueue request %s", request_id)
            ops.ERRORS.labels("enqueue").inc()
            await streamer.fail(BUSY_MESSAGE)
            await self.memory.fail_reply(request_id, "failed", BUSY_MESSAGE)
            return Outcome(request_id, "failed", BUSY_MESSAGE)
        return await self._relay(request_id, streamer, started, place.platform, user)

    async def _relay(self, request_id: str, streamer: ReplyStreamer, started: float, platform: str,
                     user_id: str) -> Outcome:
        assembler, first_text_ms = ReplyAssembler(), None
        try:
            async for event in self.bus.read(request_id, timeout_s=self.settings.reply_timeout_s):
                if not assembler.add(event):
                    continue
                if event.kind == "chunk" and (shown := clean_output(assembler.text)).strip():
                    if first_text_ms is None:
                        first_text_ms = (time.perf_counter() - started) * 1000
                    await streamer.update(shown)
        except StreamTimeout:
            ops.ERRORS.labels("timeout").inc()
            await streamer.fail(TIMEOUT_MESSAGE)
            await self.memory.fail_reply(request_id, "failed", TIMEOUT_MESSAGE)
            return Outcome(request_id, "failed", TIMEOUT_MESSAGE)

        if assembler.error is not None:
            ops.ERRORS.labels("worker").inc()
            message = assembler.error
            await streamer.fail(message)
            await self.memory.fail_reply(request_id, "failed", message)
            return Outcome(request_id, "failed", message)

        reply, meta = clean_output(assembler.text).strip(), assembler.meta or {}
        if not reply:
            reply = "…I don't have an answer to that. Could you rephrase?"
        note = guess_note(meta)
        await streamer.finish(reply + note)  # the note is shown, not remembered
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            await self.memory.finish_reply(request_id, reply, self.count_tokens(reply), meta.get("method"),
                                           meta.get("confidence"), int(latency_ms))
            if usage := meta.get("usage"):
                await self.memory.record_usage(platform, user_id, request_id, meta.get("method") or "unknown",
                                               usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        except UnknownRequest:  # the user said /forget while this reply streamed: it is shown, and kept nowhere
            log.info("request %s finished after its user was forgotten; not stored", request_id)
        self.answered[meta.get("method") or "unknown"] += 1
        self.latencies_ms.append(latency_ms)
        ops.REPLY_SECONDS.labels(meta.get("method") or "unknown").observe(latency_ms / 1000)
        if first_text_ms is not None:
            ops.FIRST_TEXT_SECONDS.observe(first_text_ms / 1000)
        return Outcome(request_id, "answered", reply, meta.get("method"), meta.get("confidence"), first_text_ms,
                       note)

    async def recover(self, platform: str, resume: Resume | None = None, *, follow_s: float | None = None):
        """After a restart: finish each reply `platform` left pending from its stream (streams are replayable, and
        a worker may still be writing one), or mark it interrupted with a short note edited into its message.

        resume(pending) gives where the reply is shown (a bots.recovery.Resumed; None: nowhere, e.g. the console).
        follow_s: how long to wait on a silent stream (default REPLY_TIMEOUT_S; 0: read none, mark all
        interrupted). Returns a Counter of finished, failed and interrupted replies."""
        follow_s = self.settings.reply_timeout_s if follow_s is None else follow_s
        return await recover_replies(self, platform, resume, follow_s, clean_output)

    async def forget(self, platform: str, user_id: str) -> str:
        rows = await self.memory.forget(platform, str(user_id))
        return "Done: I've forgotten our conversations." if rows else "I had nothing stored about you."

    async def set_mode(self, user_id: str, mode: str, is_admin: bool = False) -> str:
        if not (is_admin or self.is_admin(user_id)):
            return "Sorry, only admins can change the mode."
        mode = mode.strip().lower()
        if mode not in MODES:
            return f"Unknown mode {mode!r}. Use one of: {', '.join(MODES)}."
        self.mode = mode
        return f"Mode set to {mode}."

    async def info(self, user_id: str, is_admin: bool = False) -> str:
        if not (is_admin or self.is_admin(user_id)):
            return "Sorry, /info is for admins only."
        data = await self.info_dict()
        lines = [f"{key}: {value}" for key, value in data.items()]
        return "\n".join(lines)

    async def info_dict(self) -> dict:
        worker = await self.info_source() if self.info_source else {}
        latencies = sorted(self.latencies_ms)
        cache = worker.get("cache", {})
        openai = worker.get("openai", {})
        return {
            "mode": self.mode,
            "model": worker.get("model_name", "unknown"),
            "parameters": f"{worker.get('model_parameters', 0):,}",
            "device": worker.get("device", "unknown"),
            "precision": worker.get("precision", "unknown"),
            "cache": f"{'on' if worker.get('cache_enabled') else 'off'}, hit rate {cache.get('hit_rate', 0):.0%}",
            "prefix cache": describe_prefix_cache(worker.get("prefix_cache") or {}),
            "batching": describe_batching(worker.get("batching") or {}),
            "queue depth": await self._safe(self.dispatcher.queue_depth),
            "workers online": await self._safe(self.dispatcher.workers_online),
            "hybrid threshold": describe_threshold(worker),
            "openai": "configured" if openai.get("configured") else "not configured",
            "openai model": openai.get("model", "-"),
            "answered": ", ".join(f"{k} {v}" for k, v in sorted(self.answered.items())) or "none yet",
            "median latency": f"{latencies[len(latencies) // 2]:.0f} ms" if latencies else "-",
        }

    @staticmethod
    async def _safe(call):
        try:
            return await asyncio.wait_for(call(), 2.0)
        except Exception:
            return "unknown"


def describe_threshold(info: dict) -> str:
    """HYBRID_MODE_THRESHOLD against the highest confidence a local reply can get, for /info."""
    threshold, highest = info.get("hybrid_mode_threshold"), info.get("highest_confidence")
    if threshold is None or highest is None:
        return "unknown"
    if threshold > highest:
        return f"{threshold}, above the highest confidence a local reply gets ({highest:.2f}): hybrid always asks OpenAI"
    return f"{threshold} (local replies score at most {highest:.2f})"


def describe_prefix_cache(info: dict) -> str:
    """The worker's prefix-reuse decision and the figures behind it, for /info."""
    if not info.get("enabled"):
        return "off"
    state = {True: "in use", False: "not used (recomputing is faster)", None: "not measured yet"}[info.get("in_use")]
    measured = info.get("measurement") or {}
    if "fetch_ms_per_chunk" in measured:
        state += (f", fetch {measured['fetch_ms_per_chunk']} ms vs recompute {measured['recompute_ms_per_chunk']} ms"
                  f" per {info.get('chunk_tokens')}-token chunk")
    return f"{state}, {info.get('reused_tokens', 0)} prompt tokens reused"


def describe_batching(info: dict) -> str:
    if not info:
        return "-"
    return (f"{info.get('active', 0)} decoding, {info.get('waiting', 0)} waiting, batch up to "
            f"{info.get('max_batch_size')} (mean {info.get('mean_batch', 0)})")


def guess_note(meta: dict) -> str:
    """An italic line under a reply the local model gave without confidence, or ""."""
    if not meta.get("doubtful"):
        return ""
    note = GUESS_NOT_CONFIGURED if meta.get("fallback") == "not_configured" else GUESS_UNAVAILABLE
    return f"\n\n_({note})_"
