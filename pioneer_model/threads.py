"""Torch work on a short-lived thread, so that a long-lived thread keeps no OpenMP thread team of its own."""

import threading


def on_own_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a new thread that ends with it; returns its result or raises its exception.

    Every thread that runs a parallel torch op gets its own OpenMP team, kept for that thread's life. With more
    team threads than cores, libgomp shortens its spin-waits, and small ops slow down: a 38-token prefill took
    about 1.5x as long on 2 cores. A process that decodes on one long-lived thread does its other torch work,
    such as loading the model, this way (the team ends with the thread).
    """
    outcome = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"pioneer-{getattr(fn, '__name__', 'work')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
