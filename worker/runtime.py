"""Per-process wiring: build the engine, orchestrator and cache from the settings, and answer one request."""

import asyncio
import logging
import threading
import uuid
from pathlib import Path

from pioneer_model import AttentionCache

from .engine import LocalEngine
from .openai_backend import OpenAIBackend
from .orchestrator import Orchestrator, ReplyError, ReplyMeta
from .routing import Calibration
from .settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.json"
INTERNAL_ERROR = "Sorry, something went wrong on my side while answering. Please try again in a moment."


def resolve_model_path(settings: WorkerSettings) -> Path:
    if settings.model_path:
        return Path(settings.model_path)
    from pioneer_model.train import ensure_default_model

    return ensure_default_model(settings.pioneer_data_dir)


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
    engine = LocalEngine.load(path, device=settings.device, cache=cache, max_new_tokens=settings.max_new_tokens)
    log.info("model %s loaded: %s parameters on %s", engine.name, engine.model.num_parameters(), engine.model.device)
    return engine


def build_orchestrator(settings: WorkerSettings | None = None, engine: LocalEngine | None = None) -> Orchestrator:
    settings = settings or get_worker_settings()
    calibration = None
    if engine is None:
        path = resolve_model_path(settings)
        calibration = Calibration.load(path / CALIBRATION_FILE)
        engine_source = engine or (lambda: build_engine(settings, build_cache(settings)))
    else:
        engine_source = engine
    return Orchestrator(engine_source, build_backend(settings), mode=settings.attention_mode,
                        threshold=settings.hybrid_mode_threshold, calibration=calibration)


async def answer_request(payload: dict, orchestrator: Orchestrator, publisher) -> str:
    """Answer one queued request into its reply stream. Returns how it ended: final, error or duplicate."""
    request_id = payload["request_id"]
    if publisher.is_finished(request_id):
        return "duplicate"
    attempt = uuid.uuid4().hex[:12]
    seq, meta = 0, None
    try:
        async for item in orchestrator.stream(payload["messages"], payload.get("mode")):
            if isinstance(item, ReplyMeta):
                meta = item
            else:
                seq += 1
                publisher.chunk(request_id, attempt, seq, item)
        publisher.final(request_id, attempt, meta.to_dict())
        return "final"
    except ReplyError as error:
        publisher.error(request_id, attempt, error.user_message, error.kind)
    except Exception:
        log.exception("request %s failed", request_id)
        publisher.error(request_id, attempt, INTERNAL_ERROR, "internal")
    return "error"


class LoopThread:
    """An asyncio loop in a daemon thread, so synchronous Celery task threads can run coroutines on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pioneer-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)
