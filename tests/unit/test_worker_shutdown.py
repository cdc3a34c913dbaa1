"""A worker's warm shutdown that gets stuck writes every thread's stack to its log; one that ends writes nothing."""

import threading
import time

from worker import tasks


def test_a_stuck_warm_shutdown_writes_every_threads_stack(monkeypatch, capfd):
    monkeypatch.setattr(tasks, "STUCK_SHUTDOWN_S", 0.2)
    stuck = threading.Event()
    holder = threading.Thread(target=stuck.wait, name="stuck-task", daemon=True)
    holder.start()
    try:
        tasks._leaving()
        time.sleep(0.6)
    finally:
        stuck.set()
        tasks._withdraw()
    err = capfd.readouterr().err
    assert "Thread 0x" in err and "in wait" in err and "test_a_stuck_warm_shutdown" in err


def test_a_warm_shutdown_that_ends_in_time_writes_no_stacks(monkeypatch, capfd):
    monkeypatch.setattr(tasks, "STUCK_SHUTDOWN_S", 0.3)
    tasks._leaving()
    tasks._withdraw()
    time.sleep(0.6)
    assert "Thread 0x" not in capfd.readouterr().err
