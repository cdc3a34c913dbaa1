"""Per-process wiring: build the engine, orchestrator and cache from the settings, and answer one request."""

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pioneer_model import AttentionCache

from . import metrics
from .engine import LocalEngine
from .openai_backend import OpenAIBackend
from .orchestrator import RETRACT, Orchestrator, ReplyError, ReplyMeta
from .routing import Calibration
from .settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.json"
LEASE_S = 6.0  # a live attempt renews its lease every LEASE_S / 3; a dead one loses it within LEASE_S
INTERNAL_ERROR = "Sorry, something went wrong on my side while answering. Please try again in a moment."


def resolve_model_path(settings: WorkerSettings) -> Path:
    if settings.model_path:
        return Path(settings.model_path)
    from pioneer_model.threads import on_own_thread
    from pioneer_model.train import ensure_default_model

    return on_own_thread(ensure_default_model, settings.pioneer_data_dir)  # trains on first use: see on_own_thread


def build_cache(settings: WorkerSettings) -> AttentionCache | None:
    if not settings.attention_cache_enabled:
        return None
    if settings.redis_url:
        from .redis_cache import RedisLRUStorage

        return AttentionCache(storage=RedisLRUStorage(settings.redis_url, capacity=settings.cache_size))
    return AttentionCache(capacity=settings.cache_size)


def build_backend(settings: WorkerSettings) -> OpenAIBackend:
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return OpenAIBackend(key, settings.openai_base_url, settings.openai_model, timeout_s=settings.openai_timeout_s,
                         max_retries=settings.openai_max_retries, first_token_timeout_s=settings.openai_timeout_s)


def build_engine(settings: WorkerSettings, cache: AttentionCache | None = None) -> LocalEngine:
    path = resolve_model_path(settings)
    engine = LocalEngine.load(path, device=settings.device, cache=cache, max_new_tokens=settings.max_new_tokens,
                              precision=settings.model_precision, max_batch_size=settings.max_batch_size,
                              max_tokens_in_flight=settings.max_tokens_in_flight,
                              prefix_cache="auto" if settings.prefix_cache_enabled else "off")
    log.info("model %s loaded: %s parameters on %s", engine.name, engine.model.num_parameters(), engine.model.device)
    return engine


def build_orchestrator(settings: WorkerSettings | None = None) -> Orchestrator:
    """The orchestrator over this process's model, which is loaded on first use. A freshly trained default model
    is calibrated once first, with that same engine."""
    settings = settings or get_worker_settings()
    path = resolve_model_path(settings)
    calibration = Calibration.load(path / CALIBRATION_FILE)
    engine = None
    if calibration is None and path == settings.default_model_dir:
        from .calibrate import calibrate_and_save

        engine = build_engine(settings, build_cache(settings))
        calibration = calibrate_and_save(engine, path / CALIBRATION_FILE)
    return Orchestrator(engine or (lambda: build_engine(settings, build_cache(settings))), build_backend(settings),
                        mode=settings.attention_mode, threshold=settings.hybrid_mode_threshold,
                        calibration=calibration)


async def answer_request(payload: dict, orchestrator: Orchestrator, publisher) -> str:
    """Answer one queued request into its reply stream. Returns how it ended: final, error, duplicate (answered
    already), or busy (a live attempt elsewhere holds the request's lease: a redelivered copy of a running task)."""
    request_id = payload["request_id"]
    attempt = uuid.uuid4().hex[:12]
    replies = orchestrator.stream(payload["messages"], payload.get("mode"), retract=True)
    first = None
    if publisher.remote and (payload.get("mode") or orchestrator.mode) == "local":
        # The local model prefills while the claim makes its round trip to Redis; nothing is published before the
        # claim is ours. Other modes claim first: they may call the OpenAI API, which costs money.
        first = asyncio.ensure_future(anext(replies, None))
        outcome = await asyncio.to_thread(publisher.begin, request_id, attempt, LEASE_S)
    else:
        outcome = publisher.begin(request_id, attempt, LEASE_S)
    if outcome != "claimed":
        await _discard(first, replies)
        return outcome
    lease = asyncio.create_task(keep_lease(publisher, request_id, attempt))
    try:
        return await _answer(payload, _after(first, replies), publisher, attempt)
    finally:
        lease.cancel()
        try:
            publisher.release(request_id, attempt)
        except Exception as exc:  # Redis away: the lease lapses by itself within LEASE_S
            log.warning("could not release the lease on %s: %s", request_id, exc)


async def _after(first: asyncio.Future | None, replies):
    """The replies, starting with the item already being fetched."""
    if first is not None:
        item = await first
        if item is None:
            return
        yield item
    async for item in replies:
        yield item


async def _discard(first: asyncio.Future | None, replies) -> None:
    """Stop a reply started before its claim was refused (the model frees its row)."""
    if first is not None:
        first.cancel()
        try:
            await first
        except BaseException:  # noqa: BLE001 - cancelled, or failed: either way nothing is published
            pass
    await replies.aclose()


async def keep_lease(publisher, request_id: str, attempt: str) -> None:
    """Renew the lease every LEASE_S / 3 while the attempt runs (off the event loop: Redis may be slow)."""
    while True:
        await asyncio.sleep(LEASE_S / 3)
        try:
            if not await asyncio.to_thread(publisher.renew, request_id, attempt, LEASE_S):
                log.warning("lost the lease on request %s: another attempt may answer it too", request_id)
                return
        except Exception as exc:
            log.warning("could not renew the lease on request %s: %s", request_id, exc)


async def _answer(payload: dict, replies, publisher, attempt: str) -> str:
    request_id = payload["request_id"]
    seq, meta, started, retracted, writing = 0, None, time.perf_counter(), 0, attempt
    if payload.get("enqueued_at"):
        metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - payload["enqueued_at"]))
    metrics.IN_PROGRESS.inc()
    try:
        async for item in replies:
            if isinstance(item, ReplyMeta):
                meta = item
            elif item is RETRACT:  # a new attempt on the stream: readers drop the text of the old one
                retracted += 1
                writing, seq = f"{attempt}.{retracted}", 0
            else:
                seq += 1
                publisher.chunk(request_id, writing, seq, item)
        publisher.final(request_id, writing, meta.to_dict())
        count_reply(meta, time.perf_counter() - started)
        return "final"
    except ReplyError as error:
        publisher.error(request_id, writing, error.user_message, error.kind)
        metrics.ERRORS.labels(error.kind).inc()
    except Exception:
        log.exception("request %s failed", request_id)
        publisher.error(request_id, writing, INTERNAL_ERROR, "internal")
        metrics.ERRORS.labels("internal").inc()
    finally:
        metrics.IN_PROGRESS.dec()
    return "error"


def count_reply(meta: ReplyMeta, seconds: float) -> None:
    metrics.MESSAGES.labels(meta.method).inc()
    metrics.REPLY_SECONDS.labels(meta.method).observe(seconds)
    if meta.method == "openai":
        for kind in ("prompt", "completion"):
            metrics.OPENAI_TOKENS.labels(kind).inc(meta.usage.get(f"{kind}_tokens") or 0)


class LoopThread:
    """An asyncio loop in a daemon thread, so synchronous Celery task threads can run coroutines on it."""

    def __init__(self, workers: int = 32):
        self.loop = asyncio.new_event_loop()
        # engine calls wait in these threads while the engine batches them: as many as requests in flight
        self.loop.set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix="pioneer-call"))
        self.thread = threading.Thread(target=self.loop.run_forever, name="pioneer-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)
