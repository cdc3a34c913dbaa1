"""Build the conversation core from the settings: embedded (one process) or on Redis with Celery workers."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from pioneer_model.checkpoint import load_tokenizer

from .core import ConversationCore
from .deliveries import Deliveries
from .memory import Memory
from .rate_limit import RedisRateLimiter

log = logging.getLogger(__name__)


async def _embedded_broker() -> bool:
    return True


@dataclass
class Service:
    core: ConversationCore
    memory: Memory
    dispatcher: object
    bus: object
    broker_ping: Callable[[], Awaitable[bool]] = _embedded_broker
    ops: object = None  # the /metrics and /healthz server, when METRICS_PORT is set
    redis: object = None  # the front-end's own Redis client (worker registry, deliveries, health), when on Redis

    async def drain(self, timeout_s: float = 20.0) -> bool:
        """On shutdown: refuse new messages and wait for the replies in progress (and their edits) to finish.
        False when some were still running after timeout_s."""
        return await self.core.drain(timeout_s)

    async def close(self) -> None:
        if self.ops is not None:
            await self.ops.cleanup()
        await self.dispatcher.close()
        await self.memory.close()
        close = getattr(self.bus, "close", None)
        if close:
            close()
        if self.redis is not None:
            await self.redis.aclose()


def approximate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


async def build_service(settings, orchestrator=None) -> Service:
    """Embedded mode when REDIS_URL is unset: the model, queue, stream and cache live in this process."""
    memory = Memory(settings.resolved_database_url)
    await memory.start()
    if settings.embedded:
        from worker.dispatch import LocalDispatcher
        from worker.orchestrator import attention_orchestrator, get_attention_info
        from worker.runtime import build_orchestrator
        from worker.streams import MemoryStreamBus

        orchestrator = orchestrator or build_orchestrator(settings)
        attention_orchestrator.set(orchestrator)
        engine = orchestrator.engine
        bus = MemoryStreamBus()
        dispatcher = LocalDispatcher(orchestrator, bus, settings.worker_concurrency)
        count_tokens, positions = engine.count_tokens, engine.model.config.sequence_length

        async def info_source():
            return get_attention_info()
    else:
        import redis.asyncio

        from worker.dispatch import CeleryDispatcher
        from worker.registry import online
        from worker.streams import RedisStreamBus

        bus = RedisStreamBus(settings.redis_url)
        dispatcher = CeleryDispatcher(settings.redis_url, settings.task_expires_s)
        count_tokens, positions = front_end_tokenizer(settings)
        client = redis.asyncio.Redis.from_url(settings.redis_url)

        async def info_source():
            workers = await online(client)
            return workers[0] if workers else {}

    budget = settings.history_token_budget or max(64, positions - settings.max_new_tokens)
    shared = {} if settings.embedded else {  # with other front-ends on the same Redis
        "deliveries": Deliveries(client), "limiter": RedisRateLimiter(client, settings.rate_limit_per_minute)}
    core = ConversationCore(settings, memory, dispatcher, bus, count_tokens, history_budget=budget,
                            info_source=info_source, **shared)
    service = Service(core, memory, dispatcher, bus)
    if not settings.embedded:
        service.broker_ping, service.redis = client.ping, client
    if settings.metrics_port:
        from .ops import start_ops_server

        service.ops = await start_ops_server(service, settings.metrics_host, settings.metrics_port)
    return service


def front_end_tokenizer(settings):
    """The model's own tokenizer to count history tokens; an estimate when the model directory isn't here."""
    path = Path(settings.model_path) if settings.model_path else settings.default_model_dir
    tokenizer = load_tokenizer(path) if path.exists() else None
    if tokenizer is None:
        log.warning("no tokenizer.json in %s: history is trimmed with an estimate of 4 characters a token", path)
        return approximate_tokens, settings.sequence_length
    import json

    positions = json.loads((path / "config.json").read_text()).get("sequence_length", settings.sequence_length)
    return tokenizer.count_tokens, positions
