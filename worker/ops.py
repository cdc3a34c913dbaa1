"""The worker's /metrics and /healthz, served on METRICS_PORT by a small threaded HTTP server."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .metrics import CONTENT_TYPE, REGISTRY

log = logging.getLogger(__name__)

HealthCheck = Callable[[], dict[str, bool]]


def health_response(checks: dict[str, bool]) -> tuple[int, bytes]:
    """200 when every check passed, else 503; the body names each check."""
    healthy = all(checks.values())
    body = {"status": "ok" if healthy else "unhealthy", "checks": checks}
    return (200 if healthy else 503), json.dumps(body).encode()


class OpsHandler(BaseHTTPRequestHandler):
    health: HealthCheck = staticmethod(lambda: {})

    def do_GET(self):  # noqa: N802 - the http.server interface
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, REGISTRY.render().encode(), CONTENT_TYPE)
        elif path == "/healthz":
            try:
                checks = self.health()
            except Exception as exc:  # a failing check is an unhealthy answer, not a crashed server
                log.warning("health check failed: %s", exc)
                checks = {"health_check": False}
            self._send(*health_response(checks), "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):  # one log line per scrape would drown the worker's own
        pass


def serve(host: str, port: int, health: HealthCheck) -> ThreadingHTTPServer | None:
    """Serve /metrics and /healthz in a daemon thread; None (and a warning) when the port can't be bound."""
    handler = type("WorkerOpsHandler", (OpsHandler,), {"health": staticmethod(health)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        log.warning("no /metrics or /healthz: cannot listen on %s:%s (%s)", host, port, exc.strerror or exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pioneer-ops", daemon=True).start()
    log.info("serving /metrics and /healthz on %s:%s", host, server.server_address[1])
    return server
