"""Pioneer's processes for the reliability tests: workers and front-ends on a Redis of the test's own, logging to
files (a full pipe would stall a busy process), killed or stopped by their own ids."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import redis

from tests.helpers import REPO

CLEARED = ("OPENAI_", "ATTENTION_", "DATABASE_", "REDIS_", "METRICS_", "SLACK_", "DISCORD_", "REPLY_", "LOG_",
           "MAX_NEW_TOKENS", "RATE_LIMIT", "VISIBILITY_", "TASK_EXPIRES")


def pioneer_env(model_dir, redis_url: str, data_dir, **settings) -> dict:
    """The environment of a `pioneer` process: the tiny model, our Redis, no metrics server, plus `settings`
    (name=value, upper-cased); nothing of these inherited from the test's own environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED)}
    env |= {"REDIS_URL": redis_url, "MODEL_PATH": str(model_dir), "PIONEER_DATA_DIR": str(data_dir),
            "MAX_NEW_TOKENS": "24", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "METRICS_PORT": "0"}
    return env | {name.upper(): str(value) for name, value in settings.items()}


class Process:
    """One `pioneer …` process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path):
        self.name, self.args, self.env = name, args, env
        self.log_path = Path(log_dir) / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        with open(self.log_path, "a") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "bots.cli", *self.args], cwd=REPO, env=self.env,
                                          stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> float:
        """SIGKILL, as a crash or the OOM killer would; returns when (time.time())."""
        killed_at = time.time()
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)
        return killed_at

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code (see stop_all)."""
        return stop_all([self], timeout)[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stop_all(processes: list[Process], timeout: float = 30) -> list[int]:
    """SIGTERM every process, then wait for each; returns their exit codes. One that does not exit in time gets a
    SIGUSR1 (every `pioneer` process then writes each thread's stack, so its log shows where it hung) and is then
    killed. Async tests call this in a thread: a fake server on their event loop must go on answering while workers
    finish."""
    running = [p for p in processes if p.running]
    for process in running:
        process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.popen.send_signal(signal.SIGUSR1)
            time.sleep(2)
            process.popen.kill()
            process.popen.wait(10)
    return [p.popen.returncode if p.popen else 0 for p in processes]


def check_clean_exit(processes: list[Process], codes: list[int]) -> None:
    """Each process exited 0 with no traceback in its log; a failure shows the end of the log of the one that did
    not (with the stacks stop_all had it write)."""
    for process, code in zip(processes, codes):
        log = process.log()
        assert code == 0 and "Traceback" not in log, f"{process.name} exited {code}; its log ends:\n{log[-20000:]}"


def worker(env: dict, name: str, log_dir: Path, concurrency: int = 2) -> Process:
    return Process(name, ["worker", "--concurrency", str(concurrency), "--name", f"{name}@test"], env, log_dir).start()


def front_end(env: dict, platform: str, log_dir: Path, name: str | None = None) -> Process:
    return Process(name or platform, [platform], env, log_dir).start()


def wait_for_workers(redis_url: str, count: int, timeout: float = 90.0) -> None:
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while len(list(client.scan_iter(match="pioneer:workers:*"))) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} workers did not come up in {timeout} s")
        time.sleep(0.1)


def sql_rows(database_url: str, query: str, *params) -> list[tuple]:
    with psycopg.connect(database_url.replace("+asyncpg", "")) as db:
        return db.execute(query, params).fetchall()


def stream_attempts(client: redis.Redis, request_id: str) -> list[tuple[str, float, int]]:
    """(attempt, when its first record was written (s since the epoch, from the stream id), records) per attempt
    on a reply stream, in order."""
    attempts: dict[str, list] = {}
    for entry_id, fields in client.xrange(f"pioneer:reply:{request_id}"):
        attempt = fields[b"attempt"].decode()
        first_ms = int(entry_id.decode().split("-")[0])
        attempts.setdefault(attempt, [attempt, first_ms / 1000, 0])[2] += 1
    return [tuple(a) for a in attempts.values()]
