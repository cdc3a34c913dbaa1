"""kill -USR1 on a `pioneer` process writes every thread's stack, for a process that seems stuck, and changes nothing."""

import os
import signal
import subprocess
import sys
import time

from tests.helpers import REPO


def test_usr1_writes_every_threads_stack_and_the_console_carries_on(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ATTENTION_", "DATABASE_", "REDIS_"))}
    env |= {"MODEL_PATH": str(tiny_model_dir), "PIONEER_DATA_DIR": str(tmp_path), "MAX_NEW_TOKENS": "8",
            "ATTENTION_MODE": "local", "METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"}
    stderr = open(tmp_path / "chat.err", "w+")
    chat = subprocess.Popen([sys.executable, "-m", "bots.cli", "chat"], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        chat.stdin.write("hello\n")
        chat.stdin.flush()
        assert chat.stdout.readline().strip()  # answered: the console is up
        chat.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "Thread 0x" not in (tmp_path / "chat.err").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        stacks = (tmp_path / "chat.err").read_text()
        assert "Thread 0x" in stacks and "most recent call first" in stacks and chat.poll() is None
        chat.stdin.write("still there?\n")
        chat.stdin.close()
        assert chat.stdout.readline().strip() and chat.wait(30) == 0  # it answered again, then ended normally
    finally:
        if chat.poll() is None:
            chat.kill()
        stderr.close()
