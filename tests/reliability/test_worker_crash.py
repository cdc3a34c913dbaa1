"""A worker SIGKILLed mid-reply (real processes): the task goes to another worker; the user sees one whole reply."""

import asyncio
import time

from bots.app import build_service
from bots.core import Incoming
from bots.memory import Place
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.helpers import RecordingSink, eventually, make_settings
from tests.reliability.stack import (check_clean_exit, pioneer_env, sql_rows, stop_all, stream_attempts,
                                     wait_for_workers, worker)
from worker import runtime
from worker.orchestrator import ReplyMeta
from worker.streams import RedisStreamBus

REPLY = "Redelivered replies replace the half they interrupted, so every user sees one whole answer in one message."
SLOW = Scenario.reply(REPLY, chunks=12, delay_s=0.4)  # about five seconds: time to kill something mid-reply
MARKER = " ▌"


async def test_a_worker_killed_mid_reply_is_replaced_and_the_user_sees_one_whole_reply(
        tmp_path, tiny_model_dir, redis_server, database_url):
    async with FakeOpenAI(default=SLOW) as openai:
        env = pioneer_env(tiny_model_dir, redis_server.url, tmp_path, attention_mode="openai",
                          openai_base_url=openai.base_url, openai_api_key="sk-test", openai_max_retries=0)
        workers = {name: worker(env, name, tmp_path) for name in ("w1", "w2")}
        service = None
        try:
            await asyncio.to_thread(wait_for_workers, redis_server.url, 2)
            settings = make_settings(tmp_path, tiny_model_dir, redis_url=redis_server.url, database_url=database_url,
                                     attention_mode="openai", reply_timeout_s=60)
            service = await build_service(settings)
            place, sink = Place("slack", "T1", "C-crash", ""), RecordingSink()
            answering = asyncio.create_task(service.core.answer(Incoming(place, "U1", "tell me"), sink, 2000,
                                                                min_interval_s=0.2))
            await eventually(lambda: sink.messages and sink.messages[0].endswith(MARKER), timeout=30)
            delivered_at = time.time()

            holder = await eventually(lambda: asyncio.to_thread(busy_worker, service.dispatcher.app), timeout=10)
            killed_at = workers[holder].kill()
            outcome = await asyncio.wait_for(answering, 60)
        finally:
            if service is not None:
                await service.close()
            codes = dict(zip(workers, await asyncio.to_thread(stop_all, list(workers.values()))))

    assert outcome.status == "answered" and outcome.text == REPLY and outcome.method == "openai"
    assert [kind for kind, *_ in sink.calls].count("post") == 1 and sink.messages == [REPLY]  # one message
    shown = [text.removesuffix(MARKER) for kind, _, text in sink.calls]
    assert all(REPLY.startswith(text) for text in shown)  # never a doubled or mixed-up text along the way
    assert sql_rows(database_url, "SELECT role, status, content FROM messages ORDER BY id") == [
        ("user", "complete", "tell me"), ("assistant", "complete", REPLY)]

    first, second = stream_attempts(redis_server.client(), outcome.request_id)
    redelivery_s = second[1] - killed_at
    print(f"\nMETRICS worker SIGKILL: redelivered {redelivery_s:.1f} s after the kill "
          f"({second[1] - delivered_at:.1f} s after the first words), attempts {first[2]} + {second[2]} records")
    assert redelivery_s < 15
    assert openai.chat_calls == 2  # the dead attempt and its replacement, no third
    client = redis_server.client()
    assert client.llen("pioneer") == 0 and client.hlen("unacked") == 0  # nothing left to redeliver again
    survivor = next(name for name in workers if name != holder)
    check_clean_exit([workers[survivor]], [codes[survivor]])


def busy_worker(app) -> str | None:
    """The worker (w1 or w2) answering a task right now."""
    active = app.control.inspect(timeout=1.0).active() or {}
    return next((node.split("@")[0] for node, tasks in active.items() if tasks), None)


class SlowOrchestrator:
    """Streams three words over `seconds`, like a model."""

    def __init__(self, seconds: float):
        self.seconds, self.calls, self.finished = seconds, 0, 0

    async def stream(self, messages, mode=None, *, retract=False):
        self.calls += 1
        for word in ("one ", "two ", "three"):
            await asyncio.sleep(self.seconds / 3)
            yield word
        self.finished += 1
        yield ReplyMeta("local", 0.9)


async def test_a_redelivered_copy_of_a_running_task_waits_and_never_answers_twice(redis_server, monkeypatch):
    monkeypatch.setattr(runtime, "LEASE_S", 0.6)  # renewed every 0.2 s; lapses 0.6 s after its holder dies
    bus, orchestrator = RedisStreamBus(redis_server.url), SlowOrchestrator(seconds=1.5)
    payload = {"request_id": "leased", "mode": "local", "messages": [{"role": "user", "content": "hi"}]}
    try:
        first = asyncio.create_task(runtime.answer_request(payload, orchestrator, bus))
        await asyncio.sleep(1.0)  # past the first lease's TTL: only renewals keep it
        assert await runtime.answer_request(payload, orchestrator, bus) == "busy"
        assert await first == "final"
        assert await runtime.answer_request(payload, orchestrator, bus) == "duplicate"
    finally:
        bus.close()
    # Local mode starts the model while the claim is checked: the refused copies were started, then stopped
    # before their first word; only one attempt ran to the end and wrote to the stream.
    assert orchestrator.calls == 3 and orchestrator.finished == 1
    assert len(stream_attempts(redis_server.client(), "leased")) == 1


async def test_local_mode_starts_the_model_before_the_claim_but_a_refused_copy_publishes_nothing(
        redis_server, tiny_model_dir):
    """Local mode prefills while the claim makes its round trip; a duplicate delivery is stopped before its first
    token is published, and its row in the batch is freed."""
    from worker.engine import LocalEngine
    from worker.orchestrator import Orchestrator

    engine = LocalEngine.load(tiny_model_dir, max_new_tokens=40)
    orchestrator, bus = Orchestrator(engine, None, mode="local"), RedisStreamBus(redis_server.url)
    payload = {"request_id": "twice", "mode": None, "messages": [{"role": "user", "content": "hello there"}]}
    try:
        assert await runtime.answer_request(payload, orchestrator, bus) == "final"
        records = stream_attempts(redis_server.client(), "twice")
        assert await runtime.answer_request(payload, orchestrator, bus) == "duplicate"
        assert stream_attempts(redis_server.client(), "twice") == records  # nothing more was written
        assert engine.stats.requests == 2 and engine.stats.busy == 0
        engine.reply(payload["messages"])  # the scheduler drops a cancelled row at its next step
        assert engine.info()["batching"]["active"] == 0
    finally:
        bus.close()
        engine.close()
