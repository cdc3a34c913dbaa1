"""Hand a request to a worker: through Celery on Redis, or to an in-process worker in embedded mode."""

import asyncio
import logging

from .runtime import answer_request
from .streams import MemoryStreamBus

log = logging.getLogger(__name__)
# Enqueueing retries for about 9 s, so a message sent while Redis restarts is answered rather than refused.
PUBLISH_RETRY = {"max_retries": 10, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 1.0}


class CeleryDispatcher:
    """Enqueue on the Redis broker; `pioneer worker` processes answer."""

    def __init__(self, redis_url: str, task_expires_s: int = 300):
        from .celery_app import QUEUE, TASK_NAME, hidden_args, make_celery
        from .settings import get_worker_settings

        settings = get_worker_settings()
        self.app = make_celery(redis_url, settings.visibility_timeout_s, task_expires_s)
        self.task_name, self.queue = TASK_NAME, QUEUE
        self.task_expires_s = task_expires_s
        self.hidden_args = hidden_args

    async def submit(self, payload: dict) -> None:
        await asyncio.to_thread(
            self.app.send_task, self.task_name, args=[payload], task_id=payload["request_id"], queue=self.queue,
            expires=self.task_expires_s, retry=True, retry_policy=PUBLISH_RETRY, **self.hidden_args(payload),
        )

    async def queue_depth(self) -> int:
        def depth():
            with self.app.connection_for_write() as conn:
                return conn.default_channel.client.llen(self.queue)

        return await asyncio.to_thread(depth)

    async def workers_online(self) -> int:
        replies = await asyncio.to_thread(self.app.control.ping, timeout=0.5)
        return len(replies or [])

    async def close(self) -> None:
        await asyncio.to_thread(self.app.close)


class LocalDispatcher:
    """Embedded mode: the same answer_request, run as a task of this process's event loop."""

    def __init__(self, orchestrator, bus: MemoryStreamBus, concurrency: int = 4):
        self.orchestrator, self.bus = orchestrator, bus
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._waiting = 0

    async def submit(self, payload: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._run(payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, payload: dict) -> None:
        self._waiting += 1
        async with self._slots:
            self._waiting -= 1
            await answer_request(payload, self.orchestrator, self.bus)

    async def queue_depth(self) -> int:
        return self._waiting

    async def workers_online(self) -> int:
        return 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
