"""The hybrid orchestrator: answer with the local model when it is confident, else with OpenAI.

Also the spec's in-process Python API (ChatMessage, attention_orchestrator, handle_*_message,
get_attention_info) for people who use Pioneer as a library, without the queue.
"""

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Callable

from .engine import LocalEngine, LocalReply
from .openai_backend import BackendError, OpenAIBackend
from .routing import Calibration, looks_complex

log = logging.getLogger(__name__)
MODES = ("local", "openai", "hybrid")
CHUNK_CHARS = 24  # a cached or pre-generated local reply is streamed in pieces of about this size


@dataclass
class ChatMessage:
    role: str
    content: str


@dataclass
class ReplyMeta:
    method: str  # "local" | "openai"
    confidence: float | None
    raw_confidence: float | None = None
    usage: dict = field(default_factory=dict)
    route: str = ""  # why this method was chosen
    fallback: str | None = None  # set when the preferred method failed and another answered
    doubtful: bool = False  # a fallback local reply below the threshold: front-ends say it is a guess
    cached: bool = False
    latency_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OrchestratorResult:
    content: str
    method: str
    confidence: float | None
    meta: ReplyMeta


class Retract:
    """Yielded by Orchestrator.stream(retract=True): the text so far is withdrawn; what follows replaces it."""

    def __repr__(self) -> str:
        return "RETRACT"


RETRACT = Retract()


class ReplyError(Exception):
    """A failure to show the user as is: short, polite, no internals."""

    def __init__(self, kind: str, user_message: str):
        super().__init__(user_message)
        self.kind, self.user_message = kind, user_message


def as_dicts(messages) -> list[dict]:
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": m["role"], "content": m["content"]})
        elif isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": m.content})
        else:
            role, content = m
            out.append({"role": role, "content": content})
    return out


def pieces(text: str, size: int = CHUNK_CHARS):
    """Split text into chunks at word boundaries, for streaming a reply that already exists."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        space = text.rfind(" ", start + 1, end) if end < len(text) else -1
        end = space if space > start else end
        yield text[start:end]
        start = end


class Orchestrator:
    """Routes one conversation to the local model or the OpenAI backend and streams the reply."""

    def __init__(self, engine: LocalEngine | Callable[[], LocalEngine], backend: OpenAIBackend | None, *,
                 mode: str = "hybrid", threshold: float = 0.8, calibration: Calibration | None = None):
        self._engine = engine
        self.backend = backend
        self.mode = mode
        self.threshold = threshold
        self.calibration = calibration
        self.counts: dict[str, int] = defaultdict(int)
        self._loading = threading.Lock()
        if threshold > self.highest_confidence:
            log.warning("HYBRID_MODE_THRESHOLD %.2f is above the highest confidence the calibrated model gives "
                        "(%.2f): in hybrid mode every reply that OpenAI can answer goes to OpenAI",
                        threshold, self.highest_confidence)

    @property
    def highest_confidence(self) -> float:
        """The calibrated confidence of a reply whose every token had probability 1: no reply scores higher."""
        return self.calibrated(1.0)

    @property
    def engine_loaded(self) -> bool:
        return isinstance(self._engine, LocalEngine)

    @property
    def engine(self) -> LocalEngine:
        with self._loading:
            if not isinstance(self._engine, LocalEngine):
                self._engine = self._engine()
        return self._engine

    async def loaded_engine(self) -> LocalEngine:
        """The engine, loading it in a thread the first time (seconds), never on the event loop."""
        return self._engine if self.engine_loaded else await asyncio.to_thread(lambda: self.engine)

    async def _local_reply(self, messages) -> LocalReply:
        """The whole local reply (to decide on before any of it is shown). Its keys/values reach the prefix cache
        only if _replay() sends it: a reply routed to OpenAI is not the conversation's next turn."""
        engine = await self.loaded_engine()
        async for item in engine.astream(messages, hold_reply_cache=True):
            if isinstance(item, LocalReply):
                return item
        raise RuntimeError("the engine ended a reply without its result")

    def calibrated(self, raw: float) -> float:
        return self.calibration(raw) if self.calibration is not None else raw

    async def stream(self, messages, mode: str | None = None, *,
                     retract: bool = False) -> AsyncIterator[str | ReplyMeta | Retract]:
        """Yield text deltas, then one ReplyMeta. Raises ReplyError when no answer can be given.

        retract=True: when OpenAI fails after some text in hybrid mode, yield RETRACT and then the local model's
        reply (the caller can take text back); otherwise that failure is a ReplyError."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ReplyError("bad_mode", f"Unknown mode {mode!r}: use local, openai or hybrid.")
        messages = as_dicts(messages)
        started = time.perf_counter()
        openai_ready = self.backend is not None and self.backend.configured
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")

        if mode == "local":
            meta = None
            async for item in self._stream_local(messages, route="mode=local"):
                if isinstance(item, ReplyMeta):
                    meta = item
                else:
                    yield item
            yield self._done(meta, started)
            return

        if mode == "openai":
            if not openai_ready:
                raise ReplyError("not_configured", "The OpenAI backend is not configured on this bot, so I "
                                                   "can't answer in openai mode. Ask an admin to switch modes.")
            try:
                async for item in self._stream_openai(messages, route="mode=openai"):
                    yield item if isinstance(item, str) else self._done(item, started)
            except BackendError as error:
                raise ReplyError(error.kind, error.user_message) from None
            return

        # hybrid: decide before streaming, so the user never sees local text that is then thrown away.
        reason = looks_complex(query)
        local: LocalReply | None = None
        if reason is None or not openai_ready:
            local = await self._local_reply(messages)
            score = self.calibrated(local.raw_confidence)
            if score >= self.threshold or not openai_ready:
                route = f"confidence {score:.2f} >= {self.threshold}" if score >= self.threshold else "openai not configured"
                async for item in self._replay(local, score, route, fallback=None if openai_ready else "not_configured"):
                    yield item if isinstance(item, str) else self._done(item, started)
                return
            route = f"confidence {score:.2f} < {self.threshold}"
        else:
            route = f"skipped local: {reason}"

        sent_any = False
        try:
            async for item in self._stream_openai(messages, route=route):
                if isinstance(item, str):
                    sent_any = True
                    yield item
                else:
                    yield self._done(item, started)
            return
        except BackendError as error:
            log.warning("openai failed (%s); hybrid falls back to the local model", error.kind)
            if sent_any and not retract:
                raise ReplyError(error.kind, error.user_message) from None
            if sent_any:
                yield RETRACT
            fallback = error.kind
        if local is None:
            local = await self._local_reply(messages)
        async for item in self._replay(local, self.calibrated(local.raw_confidence), route, fallback=fallback):
            yield item if isinstance(item, str) else self._done(item, started)

    def _done(self, meta: ReplyMeta, started: float) -> ReplyMeta:
        meta.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        self.counts[meta.method] += 1
        return meta

    async def _stream_local(self, messages, route: str):
        """Stream tokens as the model makes them (mode=local: nothing to decide first)."""
        engine = await self.loaded_engine()
        async for item in engine.astream(messages):
            if isinstance(item, LocalReply):
                reply = item
            else:
                yield item
        score = self.calibrated(reply.raw_confidence)
        yield ReplyMeta("local", round(score, 4), round(reply.raw_confidence, 4), reply.usage, route,
                        cached=reply.cached)

    async def _replay(self, reply: LocalReply, score: float, route: str, fallback: str | None):
        reply.keep()
        for piece in pieces(reply.text):
            yield piece
        yield ReplyMeta("local", round(score, 4), round(reply.raw_confidence, 4), reply.usage, route,
                        fallback=fallback, cached=reply.cached,
                        doubtful=fallback is not None and score < self.threshold)

    async def _stream_openai(self, messages, route: str):
        async with self.backend.stream(messages) as reply:
            async for delta in reply:
                if delta:
                    yield delta
        usage = {} if reply.usage is None else {"prompt_tokens": reply.usage.prompt_tokens,
                                                 "completion_tokens": reply.usage.completion_tokens}
        yield ReplyMeta("openai", None, None, usage, route)

    async def complete(self, messages, mode: str | None = None) -> OrchestratorResult:
        parts, meta = [], None
        async for item in self.stream(messages, mode, retract=True):
            if isinstance(item, ReplyMeta):
                meta = item
            elif item is RETRACT:
                parts.clear()
            else:
                parts.append(item)
        text = "".join(parts).strip()
        return OrchestratorResult(text, meta.method, meta.confidence, meta)

    async def process_messages(self, messages) -> OrchestratorResult:
        return await self.complete(messages)

    def info(self) -> dict:
        info = {"attention_mode": self.mode, "hybrid_mode_threshold": self.threshold,
                "calibrated": self.calibration is not None, "highest_confidence": round(self.highest_confidence, 3),
                "answered": dict(self.counts)}
        info["openai"] = self.backend.describe() if self.backend is not None else {"configured": False}
        return info


# ---- The spec's in-process API -------------------------------------------------------------------------------

class _LazyOrchestrator:
    """Builds the process-wide orchestrator from the settings on first use."""

    def __init__(self):
        self._instance: Orchestrator | None = None
        self.histories: dict[str, deque] = defaultdict(lambda: deque(maxlen=20))

    def get(self) -> Orchestrator:
        if self._instance is None:
            from .runtime import build_orchestrator

            self._instance = build_orchestrator()
        return self._instance

    def set(self, orchestrator: Orchestrator) -> None:
        self._instance = orchestrator

    def __getattr__(self, name):
        return getattr(self.get(), name)


attention_orchestrator = _LazyOrchestrator()


async def _answer(user_id, text: str, mode: str) -> dict:
    history = attention_orchestrator.histories[str(user_id)]
    messages = [*history, {"role": "user", "content": text}]
    result = await attention_orchestrator.get().complete(messages, mode)
    history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": result.content}])
    return {"reply": result.content, "meta": result.meta.to_dict()}


async def handle_attention_message(user_id, text: str) -> dict:
    """Answer with the local attention model only."""
    return await _answer(user_id, text, "local")


async def handle_hybrid_message(user_id, text: str) -> dict:
    """Answer in hybrid mode: local when confident, else OpenAI."""
    return await _answer(user_id, text, "hybrid")


async def handle_stream_attention_message(user_id, text: str, mode: str | None = None) -> AsyncIterator[str]:
    """Yield the reply's text as it is generated."""
    history = attention_orchestrator.histories[str(user_id)]
    messages = [*history, {"role": "user", "content": text}]
    parts = []
    async for item in attention_orchestrator.get().stream(messages, mode):
        if isinstance(item, str):
            parts.append(item)
            yield item
    history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": "".join(parts).strip()}])


def get_attention_info() -> dict:
    """Mode, model, cache statistics and OpenAI configuration (never the key)."""
    orchestrator = attention_orchestrator.get()
    engine = orchestrator.engine
    info = orchestrator.info() | engine.info()
    info["cache_enabled"] = engine.cache is not None and engine.cache.enabled
    info["cache"] = engine.cache.stats() if engine.cache is not None else {"enabled": False}
    return info
