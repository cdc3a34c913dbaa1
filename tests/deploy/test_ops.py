"""The metrics module, the worker's /metrics and /healthz server, and a front-end's drain on shutdown."""

import asyncio
import json
import math
import threading
import urllib.error
import urllib.request

import pytest

from bots.app import build_service
from bots.core import RESTARTING_MESSAGE, Incoming
from bots.memory import Place
from tests.helpers import RecordingSink, make_settings
from worker.metrics import Counter, Gauge, Histogram, Registry, parse_samples
from worker.ops import serve


def test_rendering_follows_the_text_exposition_format():
    registry = Registry()
    hits = Counter("t_hits_total", "Hits.", registry=registry)
    replies = Counter("t_replies_total", 'Replies "by" method.', ("method",), registry=registry)
    depth = Gauge("t_depth", "Depth.", registry=registry)
    latency = Histogram("t_seconds", "Latency.", ("method",), buckets=(0.1, 1.0), registry=registry)
    hits.inc()
    replies.labels('lo"cal\n').inc(2)
    depth.set(3)
    depth.dec()
    for value in (0.05, 0.5, 5.0):
        latency.labels("local").observe(value)
    text = registry.render()
    assert "# TYPE t_hits_total counter\nt_hits_total 1\n" in text
    assert 't_replies_total{method="lo\\"cal\\n"} 2\n' in text
    assert "# HELP t_replies_total Replies \"by\" method.\n" in text
    assert "t_depth 2\n" in text
    samples = parse_samples(text)
    assert [samples[f't_seconds_bucket{{method="local",le="{le}"}}'] for le in ("0.1", "1", "+Inf")] == [1, 2, 3]
    assert samples['t_seconds_count{method="local"}'] == 3 and samples['t_seconds_sum{method="local"}'] == 5.55
    with pytest.raises(ValueError):
        hits.inc(-1)
    with pytest.raises(ValueError):
        replies.labels("a", "b")
    with pytest.raises(ValueError):
        Counter("t_hits_total", "Again.", registry=registry)


def test_counts_are_exact_under_threads_and_a_failing_gauge_function_is_nan():
    registry = Registry()
    counter = Counter("t_total", "Total.", ("kind",), registry=registry)
    threads = [threading.Thread(target=lambda: [counter.labels("x").inc() for _ in range(2000)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.labels("x").value() == 16000
    gauge = Gauge("t_gauge", "Gauge.", registry=registry)
    gauge.set_function(lambda: 1 / 0)
    assert math.isnan(parse_samples(registry.render())["t_gauge"])


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_worker_server_serves_metrics_and_health_and_survives_a_taken_port():
    healthy = {"model_loaded": True, "broker": True}
    server = serve("127.0.0.1", 0, lambda: dict(healthy))
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        status, content_type, body = fetch(base + "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert "# TYPE pioneer_messages_total counter" in body
        assert fetch(base + "/healthz")[0] == 200
        healthy["broker"] = False
        status, _, body = fetch(base + "/healthz")
        assert status == 503 and json.loads(body) == {"status": "unhealthy",
                                                      "checks": {"model_loaded": True, "broker": False}}
        assert fetch(base + "/nothing")[0] == 404
        assert serve("127.0.0.1", server.server_address[1], dict) is None  # the port is taken: a warning, no crash
    finally:
        server.shutdown()
        server.server_close()


async def test_drain_waits_for_replies_in_progress_then_refuses_new_ones(tmp_path, tiny_model_dir):
    service = await build_service(make_settings(tmp_path, tiny_model_dir))
    place = Place("console", "", "terminal", "")
    try:
        sink = RecordingSink()
        answering = asyncio.create_task(service.core.answer(Incoming(place, "u1", "hello"), sink, limit=2000,
                                                            min_interval_s=0.01))
        await asyncio.sleep(0)  # the answer has started
        assert await service.drain(timeout_s=30) is True
        assert answering.done() and answering.result().status == "answered"
        assert sink.messages[-1] == answering.result().text
        late = RecordingSink()
        outcome = await service.core.answer(Incoming(place, "u2", "anyone there?"), late, limit=2000)
        assert outcome.status == "refused" and late.messages == [RESTARTING_MESSAGE]
        history = await service.memory.history(place, "u1")
        assert [m.role for m in history] == ["user", "assistant"]
    finally:
        await service.close()
