"""The Celery task that answers one chat message into its reply stream."""

import asyncio
import contextlib
import faulthandler
import logging
import sys

from celery import signals

from .celery_app import QUEUE, TASK_NAME, app, hidden_args
from .runtime import LEASE_S, LoopThread, answer_request, build_orchestrator
from .settings import get_worker_settings
from .streams import make_stream_bus

log = logging.getLogger(__name__)
GIL_SWITCH_INTERVAL_S = 0.0001
STUCK_SHUTDOWN_S = 90.0  # then a warm shutdown is likely stuck (docker-compose.yml kills at 120 s)


class WorkerRuntime:
    """What one worker process holds: the model (loaded once), the orchestrator, the stream, an event loop."""

    def __init__(self):
        # The scheduler thread decodes while Celery's and the stream's threads hand work on: with CPython's
        # default 5 ms GIL switch interval each hand-off could wait that long (it was 1-2 ms of the first chunk).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        settings = get_worker_settings()
        self.bus = make_stream_bus(settings.redis_url)
        self.orchestrator = build_orchestrator(settings)
        self.loop = LoopThread(max(32, settings.worker_concurrency))
        self.announcer: asyncio.Future | None = None

    def warm_up(self) -> None:
        """Load the model now rather than on the first message, then announce this worker every 10 s."""
        self.orchestrator.engine  # noqa: B018
        settings = get_worker_settings()
        if settings.redis_url:
            self.announcer = asyncio.run_coroutine_threadsafe(self._announce(), self.loop.loop)

    def stop_announcing(self) -> None:
        """Stop the announcements (safe from a signal handler: nothing blocks); withdraw() removes the entry."""
        if self.announcer is not None:
            self.loop.loop.call_soon_threadsafe(self.announcer.cancel)

    async def _announce(self) -> None:
        from .orchestrator import attention_orchestrator, get_attention_info
        from .registry import announce

        attention_orchestrator.set(self.orchestrator)
        client = broker_client()  # with timeouts: a call stuck on a dead connection would hold up the exit
        while True:
            try:
                await asyncio.to_thread(announce, client, get_attention_info())
            except Exception as exc:  # Redis restarting: try again next round
                log.warning("could not announce worker: %s", exc)
            await asyncio.sleep(10)


_runtime: WorkerRuntime | None = None
_ops_server = None


def runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime()
    return _runtime


def broker_client():
    import redis

    return redis.Redis.from_url(get_worker_settings().redis_url, socket_timeout=2, socket_connect_timeout=2)


@signals.worker_init.connect
def _serve_metrics(**_):
    """/metrics and /healthz from the start, so /healthz says 503 while the model loads."""
    global _ops_server
    settings = get_worker_settings()
    if not settings.metrics_port or not settings.redis_url:
        return
    from . import metrics
    from .ops import serve

    client = broker_client()

    def health() -> dict[str, bool]:
        try:
            broker = bool(client.ping())
        except Exception:
            broker = False
        return {"model_loaded": _runtime is not None and _runtime.orchestrator.engine_loaded, "broker": broker}

    metrics.QUEUE_DEPTH.set_function(lambda: client.llen(QUEUE))
    _ops_server = serve(settings.metrics_host, settings.metrics_port, health)


@signals.worker_ready.connect
def _load_model(sender=None, **_):
    quiet_warm_shutdown(getattr(sender, "controller", None))
    runtime().warm_up()


@signals.worker_shutting_down.connect
def _leaving(**_):
    # Runs inside the SIGTERM handler: only flag and schedule here; Celery then finishes the tasks in progress.
    log.info("warm shutdown: finishing the tasks in progress, taking no new ones")
    # If it is still running then, every thread's stack goes to the log (written from C: works even when stuck).
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no stderr (a daemonised worker)
        faulthandler.dump_traceback_later(STUCK_SHUTDOWN_S, file=sys.__stderr__)
    if _runtime is not None:
        _runtime.stop_announcing()


@signals.worker_shutdown.connect
def _withdraw(**_):
    """After the last task: leave the registry of online workers and stop serving /metrics."""
    from .registry import withdraw

    faulthandler.cancel_dump_traceback_later()

    if _runtime is not None and get_worker_settings().redis_url:
        _runtime.stop_announcing()
        try:
            withdraw(broker_client())
        except Exception as exc:
            log.warning("could not withdraw from the worker registry: %s", exc)
    if _ops_server is not None:
        _ops_server.shutdown()
    log.info("worker stopped")


def quiet_warm_shutdown(worker) -> None:
    """Celery prints 'worker: Warm shutdown' straight to stdout; reinstall its SIGTERM handler without it, so
    every line goes through logging (JSON with LOG_FORMAT=json). Its behaviour is otherwise unchanged."""
    if worker is None:
        return
    try:
        from celery.apps.worker import install_worker_term_handler
    except ImportError:
        return
    install_worker_term_handler(worker, verbose=False)


@app.task(name=TASK_NAME)
def answer(payload: dict) -> str:
    rt = runtime()
    outcome = rt.loop.run(answer_request(payload, rt.orchestrator, rt.bus))
    if outcome == "busy":
        # The broker redelivered a task that another worker is still answering (it outlived the visibility
        # timeout). Check again later: if that worker dies, its lease lapses and this copy takes over.
        answer.apply_async(args=[payload], countdown=LEASE_S, expires=remaining_s(payload), **hidden_args(payload))
    return outcome


def remaining_s(payload: dict) -> float | None:
    import time

    enqueued = payload.get("enqueued_at")
    if not enqueued:
        return None
    return max(1.0, get_worker_settings().task_expires_s - (time.time() - enqueued))
