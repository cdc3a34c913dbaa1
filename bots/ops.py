"""A front-end's metrics, and its /metrics and /healthz served by aiohttp on METRICS_PORT."""

import asyncio
import logging
import math

from aiohttp import web

from worker.metrics import CONTENT_TYPE, QUEUE_DEPTH, REGISTRY, Counter, Gauge, Histogram
from worker.ops import health_response

log = logging.getLogger(__name__)

MESSAGES = Counter("pioneer_frontend_messages_total",
                   "Messages handled by this front-end, by outcome (answered, refused, failed) and method.",
                   ("status", "method"))
REPLY_SECONDS = Histogram("pioneer_frontend_reply_seconds", "Time from enqueueing to the stored final reply.",
                          ("method",))
FIRST_TEXT_SECONDS = Histogram("pioneer_frontend_first_text_seconds", "Time from enqueueing to the first text.")
ERRORS = Counter("pioneer_frontend_errors_total", "Replies that failed, by reason (enqueue, timeout, worker).",
                 ("reason",))
IN_FLIGHT = Gauge("pioneer_frontend_in_flight", "Messages being answered now.")

for _method in ("local", "openai"):
    MESSAGES.labels("answered", _method)
    REPLY_SECONDS.labels(_method)


async def _check(call, timeout_s: float = 2.0) -> bool:
    try:
        return bool(await asyncio.wait_for(call(), timeout_s))
    except Exception:
        return False


async def start_ops_server(service, host: str, port: int) -> web.AppRunner | None:
    """Serve /metrics and /healthz (database and broker reachable); None when the port can't be bound."""

    async def metrics(_request):
        try:
            QUEUE_DEPTH.set(await asyncio.wait_for(service.dispatcher.queue_depth(), 2.0))
        except Exception:
            QUEUE_DEPTH.set(math.nan)
        return web.Response(body=REGISTRY.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_request):
        checks = {"database": await _check(service.memory.ping), "broker": await _check(service.broker_ping)}
        status, body = health_response(checks)
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        log.warning("no /metrics or /healthz: cannot listen on %s:%s (%s)", host, port, exc.strerror or exc)
        await runner.cleanup()
        return None
    log.info("serving /metrics and /healthz on %s:%s", host, port)
    return runner
