"""Redis and PostgreSQL restarting under load (servers of the test's own): the services reconnect by themselves;
every request is answered or told to try again; no memory row is lost or stored twice."""

import asyncio
import time

import pytest

from bots.app import build_service
from bots.core import Incoming
from bots.memory import Place
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.fakes.slack_server import FakeSlack
from tests.helpers import RecordingSink, eventually, make_settings
from tests.integration.test_slack import running_app
from tests.reliability.stack import check_clean_exit, pioneer_env, sql_rows, stop_all, wait_for_workers, worker
from tests.services import PostgresServer, RedisServer

STREAMED = Scenario.reply(None, chunks=8, delay_s=0.3)  # an echo in eight pieces, about 2.4 s
IN_FLIGHT, DURING = 8, 4  # requests streaming when the server goes down, and sent while it is down


def echo(text: str) -> str:
    return f"(fake OpenAI) You said: {text}"


async def ask(service, n: int):
    """Question n from user n; returns (n, outcome, sink)."""
    sink = RecordingSink()
    outcome = await service.core.answer(Incoming(Place("slack", "T1", f"C{n % 3}", ""), f"U{n}", f"question {n}"),
                                        sink, 2000, min_interval_s=0.1)
    return n, outcome, sink


def check_outcomes(results, label: str) -> dict:
    """Every request answered in full, or told plainly to try again; one message each."""
    counts = {"answered": 0, "try again": 0}
    for n, outcome, sink in results:
        assert [kind for kind, *_ in sink.calls].count("post") == 1 and sink.messages == [outcome.text]
        if outcome.status == "answered":
            assert outcome.text == echo(f"question {n}")
            counts["answered"] += 1
        else:
            assert outcome.status == "failed" and "try again" in outcome.text.lower(), outcome.text
            counts["try again"] += 1
    print(f"\nMETRICS {label}: {counts}")
    return counts


def check_rows(database_url: str, results) -> None:
    """Per request: its user message once, and its reply once, complete or failed as the user was told."""
    rows = sql_rows(database_url, "SELECT role, status, content, request_id FROM messages")
    assert len({request_id for *_, request_id in rows}) == len(rows)  # nothing stored twice
    by_key = {request_id: (role, status, content) for role, status, content, request_id in rows}
    for n, outcome, _ in results:
        if outcome.request_id is None:  # refused before anything was stored
            continue
        assert by_key[f"{outcome.request_id}:user"] == ("user", "complete", f"question {n}")
        role, status, content = by_key[outcome.request_id]
        assert role == "assistant" and status == ("complete" if outcome.status == "answered" else "failed")
        assert content == outcome.text
    assert len(rows) == 2 * sum(outcome.request_id is not None for _, outcome, _ in results)


async def test_redis_restarting_under_load(tmp_path, tiny_model_dir, database_url):
    with RedisServer(tmp_path, "--appendonly", "yes") as redis_server:  # as in docker-compose.yml
        async with FakeOpenAI(default=STREAMED) as openai:
            env = pioneer_env(tiny_model_dir, redis_server.url, tmp_path, attention_mode="openai",
                              openai_base_url=openai.base_url, openai_api_key="sk-test", openai_max_retries=0)
            workers = [worker(env, f"w{n}", tmp_path) for n in (1, 2)]
            service = None
            try:
                await asyncio.to_thread(wait_for_workers, redis_server.url, 2)
                settings = make_settings(tmp_path, tiny_model_dir, redis_url=redis_server.url,
                                         database_url=database_url, attention_mode="openai", reply_timeout_s=15)
                service = await build_service(settings)
                in_flight = [asyncio.create_task(ask(service, n)) for n in range(IN_FLIGHT)]
                await eventually(lambda: openai.chat_calls >= IN_FLIGHT // 2, timeout=30)
                await asyncio.sleep(0.5)  # replies are streaming

                started = time.monotonic()
                redis_server.stop()
                during = [asyncio.create_task(ask(service, n)) for n in range(IN_FLIGHT, IN_FLIGHT + DURING)]
                await asyncio.sleep(1.5)
                redis_server.start()
                down_s = time.monotonic() - started
                results = await asyncio.wait_for(asyncio.gather(*in_flight, *during), 90)
                after = await asyncio.wait_for(ask(service, 99), 30)  # the services came back by themselves
            finally:
                if service is not None:
                    await service.close()
                codes = await asyncio.to_thread(stop_all, workers)

    counts = check_outcomes(results, f"redis restart ({down_s:.1f} s down) under load")
    assert counts == {"answered": IN_FLIGHT + DURING, "try again": 0}  # enqueues and replies ride out a restart
    assert after[1].status == "answered" and after[1].text == echo("question 99")
    check_rows(database_url, [*results, after])
    check_clean_exit(workers, codes)


@pytest.fixture
def postgres_server():
    with PostgresServer() as server:
        yield server


async def test_postgres_restarting_under_load(tmp_path, tiny_model_dir, postgres_server):
    database_url = postgres_server.create_database("pioneer")
    async with FakeOpenAI(default=STREAMED) as openai:
        settings = make_settings(tmp_path, tiny_model_dir, database_url=database_url, attention_mode="openai",
                                 openai_base_url=openai.base_url, openai_api_key="sk-test", worker_concurrency=16)
        service = await build_service(settings)
        try:
            in_flight = [asyncio.create_task(ask(service, n)) for n in range(IN_FLIGHT)]
            await eventually(lambda: openai.chat_calls >= IN_FLIGHT, timeout=30)
            started = time.monotonic()
            postgres_server.stop("immediate")  # a crash: no checkpoint, WAL replay on start
            during = [asyncio.create_task(ask(service, n)) for n in range(IN_FLIGHT, IN_FLIGHT + DURING)]
            await asyncio.sleep(2.0)
            postgres_server.start()
            down_s = time.monotonic() - started
            results = await asyncio.wait_for(asyncio.gather(*in_flight, *during), 60)
        finally:
            await service.close()

    counts = check_outcomes(results, f"postgres crash and restart ({down_s:.1f} s down) under load")
    assert counts == {"answered": IN_FLIGHT + DURING, "try again": 0}  # the memory waits out a short outage
    check_rows(database_url, results)


async def test_postgres_down_for_long_gets_an_apology_then_recovers(tmp_path, tiny_model_dir, postgres_server):
    database_url = postgres_server.create_database("pioneer")
    fake = FakeSlack()
    async with running_app(tmp_path, tiny_model_dir, reply=Scenario.reply(None, chunks=1), fake=fake,
                           database_url=database_url) as world:
        world.service.memory.retry_s = 1.0  # an outage longer than the memory waits out
        postgres_server.stop()
        asked = await world.mention("C1", "anyone there?")
        [apology] = await eventually(lambda: [m for m in world.replies("C1", asked["ts"]) if m["edits"]], timeout=20)
        assert apology["text"] == "Sorry, something went wrong on my side. Please try again in a moment."

        postgres_server.start()
        again = await world.mention("C1", "and now?")
        history = await world.finished(Place("slack", "T1", "C1", again["ts"]), "U1")
        assert [m.content for m in history] == ["and now?", echo("and now?")]
    rows = sql_rows(database_url, "SELECT role, content FROM messages ORDER BY id")
    assert rows == [("user", "and now?"), ("assistant", echo("and now?"))]  # nothing half-stored from the outage
