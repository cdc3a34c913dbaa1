"""The compose topology without Docker: migrate, two workers and a front-end as separate OS processes on the
real Redis and PostgreSQL; messages answered end to end, /metrics and /healthz scraped, SIGTERM, nothing lost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
import redis

from tests.services import asyncpg_url, fresh_database
from worker.metrics import parse_samples

REPO = Path(__file__).resolve().parents[2]
REDIS_DB = 13  # a database of its own: other tests' workers on db 0 must not take these tasks
MESSAGES = ["hello there", "how are you?", "what is your name", "tell me a joke", "good night"]
PIONEER = Path(sys.executable).with_name("pioneer")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pioneer(*args) -> list[str]:
    """The installed `pioneer` command (as in the image), else the module."""
    return [str(PIONEER), *args] if PIONEER.exists() else [sys.executable, "-m", "bots.cli", *args]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s")


def metric(text: str, name: str) -> float:
    return parse_samples(text).get(name, 0.0)


@pytest.fixture
def environment(tmp_path, tiny_model_dir):
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    with fresh_database("pioneer_topology") as database:  # empty, whatever other tests stored
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OPENAI_", "ATTENTION_", "DATABASE_", "REDIS_", "METRICS_", "LOG_"))}
        env |= {"REDIS_URL": url, "DATABASE_URL": asyncpg_url(database), "MODEL_PATH": str(tiny_model_dir),
                "PIONEER_DATA_DIR": str(tmp_path), "ATTENTION_MODE": "local", "MAX_NEW_TOKENS": "16",
                "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        yield env
    redis.Redis.from_url(url).flushdb()


def test_migrate_two_workers_and_a_front_end_answer_everything_and_stop_cleanly(environment, tmp_path):
    env = environment
    migrate = subprocess.run(pioneer("migrate"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert migrate.returncode == 0 and "database is up to date" in migrate.stdout, migrate.stderr
    sql_url = env["DATABASE_URL"].replace("+asyncpg", "")
    with psycopg.connect(sql_url) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # the schema is there, empty

    ports = [free_port() for _ in range(3)]
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("w1", "w2", "chat")}
    workers = [subprocess.Popen(pioneer("worker", "--concurrency", "2", "--name", f"{name}@topology"), cwd=tmp_path,
                                env=env | {"METRICS_PORT": str(port)}, stdout=logs[name], stderr=subprocess.STDOUT)
               for name, port in zip(("w1", "w2"), ports)]
    chat = None
    try:
        for port in ports[:2]:
            wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 60, "a worker did not get healthy")
        chat = subprocess.Popen(pioneer("chat", "--user", "topology"), cwd=tmp_path,
                                env=env | {"METRICS_PORT": str(ports[2])}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=logs["chat"], text=True)
        chat.stdin.write("".join(m + "\n" for m in MESSAGES))
        chat.stdin.flush()  # stdin stays open: the front-end keeps running until SIGTERM

        def answered():
            with psycopg.connect(sql_url) as db:
                return db.execute("SELECT count(*) FROM messages WHERE role = 'assistant' AND status = 'complete'"
                                  ).fetchone()[0] == len(MESSAGES)

        wait_until(answered, 30, "not every message was answered")

        for port in ports[:2]:
            status, body = get(f"http://127.0.0.1:{port}/healthz")
            assert status == 200 and json.loads(body)["checks"] == {"model_loaded": True, "broker": True}
        pages = [get(f"http://127.0.0.1:{port}/metrics") for port in ports[:2]]
        assert all(status == 200 for status, _ in pages)
        worker_pages = [page for _, page in pages]
        total = lambda name: sum(metric(page, name) for page in worker_pages)  # noqa: E731
        assert total('pioneer_messages_total{method="local"}') == len(MESSAGES)
        assert total('pioneer_reply_seconds_count{method="local"}') == len(MESSAGES)
        assert total("pioneer_cache_hits_total") + total("pioneer_cache_misses_total") == len(MESSAGES)
        assert total("pioneer_queue_wait_seconds_count") == len(MESSAGES)
        assert total("pioneer_requests_in_progress") == 0 and metric(worker_pages[0], "pioneer_queue_depth") == 0
        assert "# TYPE pioneer_reply_seconds histogram" in worker_pages[0]

        status, body = get(f"http://127.0.0.1:{ports[2]}/healthz")
        assert status == 200 and json.loads(body)["checks"] == {"database": True, "broker": True}
        _, front = get(f"http://127.0.0.1:{ports[2]}/metrics")
        assert metric(front, 'pioneer_frontend_messages_total{status="answered",method="local"}') == len(MESSAGES)
        assert metric(front, 'pioneer_frontend_reply_seconds_count{method="local"}') == len(MESSAGES)

        chat.send_signal(signal.SIGTERM)
        out, _ = chat.communicate(timeout=20)
        assert chat.returncode == 0
        for process in workers:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in workers]
        assert codes == [0, 0]
    finally:
        for process in [*workers, chat]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    assert not list(redis.Redis.from_url(env["REDIS_URL"]).scan_iter(match="pioneer:workers:*"))  # withdrawn
    with psycopg.connect(sql_url) as db:
        rows = db.execute("SELECT role, status, content, request_id FROM messages ORDER BY id").fetchall()
    assert [(role, content) for role, _, content, _ in rows[::2]] == [("user", m) for m in MESSAGES]
    replies = rows[1::2]
    assert len(replies) == len(MESSAGES) and all(role == "assistant" and status == "complete"
                                                 for role, status, _, _ in replies)
    assert len({request_id for *_, request_id in replies}) == len(MESSAGES)  # exactly one reply each
    for *_, content, _ in replies:
        assert content in out  # the front-end printed every stored reply

    for name, log in logs.items():
        log.seek(0)
        text = log.read()
        log.close()
        assert "Traceback" not in text, f"{name}:\n{text}"
        for line in filter(None, text.splitlines()):
            json.loads(line)  # every line is one JSON log event
