"""The Celery task that answers one chat message into its reply stream."""

import logging

from celery import signals

from .celery_app import TASK_NAME, app
from .runtime import LoopThread, answer_request, build_orchestrator
from .settings import get_worker_settings
from .streams import make_stream_bus

log = logging.getLogger(__name__)


class WorkerRuntime:
    """What one worker process holds: the model (loaded once), the orchestrator, the stream, an event loop."""

    def __init__(self):
        settings = get_worker_settings()
        self.bus = make_stream_bus(settings.redis_url)
        self.orchestrator = build_orchestrator(settings)
        self.loop = LoopThread()

    def warm_up(self) -> None:
        """Load the model now rather than on the first message, then announce this worker every 10 s."""
        self.orchestrator.engine  # noqa: B018
        settings = get_worker_settings()
        if settings.redis_url:
            self.loop.loop.call_soon_threadsafe(self.loop.loop.create_task, self._announce(settings.redis_url))

    async def _announce(self, redis_url: str) -> None:
        import asyncio

        import redis

        from .orchestrator import get_attention_info, attention_orchestrator
        from .registry import announce

        attention_orchestrator.set(self.orchestrator)
        client = redis.Redis.from_url(redis_url)
        while True:
            try:
                await asyncio.to_thread(announce, client, get_attention_info())
            except Exception as exc:  # Redis restarting: try again next round
                log.warning("could not announce worker: %s", exc)
            await asyncio.sleep(10)


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime()
    return _runtime


@signals.worker_ready.connect
def _load_model(**_):
    runtime().warm_up()


@app.task(name=TASK_NAME)
def answer(payload: dict) -> str:
    rt = runtime()
    return rt.loop.run(answer_request(payload, rt.orchestrator, rt.bus))
