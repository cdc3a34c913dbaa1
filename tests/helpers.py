"""Helpers shared by the integration tests: settings for a tiny model, a recording sink, worker processes."""

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from bots.core import guess_note
from bots.settings import Settings

REPO = Path(__file__).resolve().parents[1]


class RecordingSink:
    """A MessageSink that keeps every post and edit."""

    def __init__(self):
        self.messages: list[str] = []
        self.calls: list[tuple[str, int, str]] = []

    async def post(self, text):
        self.messages.append(text)
        self.calls.append(("post", len(self.messages) - 1, text))
        return len(self.messages) - 1

    async def edit(self, ref, text):
        self.messages[ref] = text
        self.calls.append(("edit", ref, text))


def shown(stored, threshold: float = 0.8) -> str:
    """What a chat shows for a stored hybrid reply when no OpenAI backend is set up: the reply, and the guess
    note when its confidence is below the threshold."""
    return stored.content + guess_note({"doubtful": stored.confidence < threshold, "fallback": "not_configured"})


def make_settings(tmp_path, model_dir, **overrides) -> Settings:
    values = dict(model_path=str(model_dir), database_url=f"sqlite+aiosqlite:///{tmp_path}/pioneer.db",
                  redis_url=None, pioneer_data_dir=tmp_path, openai_api_key=None, openai_base_url=None,
                  max_new_tokens=24, attention_mode="local", rate_limit_per_minute=1000)
    return Settings(**(values | overrides))


async def eventually(check, timeout: float = 10.0, interval: float = 0.02):
    """Await `check()` (sync or async) until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def start_worker(env: dict, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bots.cli", "worker", "--concurrency", "2", "--name", name],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def start_front_end(env: dict, platform: str) -> subprocess.Popen:
    """`pioneer discord` or `pioneer slack` as its own process."""
    return subprocess.Popen([sys.executable, "-m", "bots.cli", platform], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_workers(redis_url: str, count: int, timeout: float = 60.0) -> None:
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(client.scan_iter(match="pioneer:workers:*"))) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} workers did not come up in {timeout} s")


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out
