"""The engine's scheduler: one thread runs continuous batching for every request of this worker process."""

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future

import torch

from pioneer_model.batching import BatchDecoder, Sequence

log = logging.getLogger(__name__)
DONE = object()
PREFILL_BATCH_TOKENS = 4096  # padded prompt tokens prefilled in one forward pass, at most
_schedulers: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


class Ticket:
    """A submitted request: the caller reads (token, logprob) pairs until DONE (or an error), by iterating it
    on any thread or with `async for ... in ticket.aiter()` on an event loop."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.tokens: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.finished = False  # the reader got DONE: every token was read
        self.submitted = time.perf_counter()
        self._wake = None  # set by aiter(): wakes the reader's event loop

    def put(self, item) -> None:
        """Scheduler thread: hand the reader a token, DONE or an error."""
        self.tokens.put(item)
        wake = self._wake
        if wake is not None:
            wake()

    def _take(self, item):
        if item is DONE:
            self.finished = True
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self):
        while (item := self._take(self.tokens.get())) is not None:
            yield item

    async def aiter(self):
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the reader's loop has closed
                pass

        self._wake = wake
        while True:
            ready.clear()  # before looking, so a put between the look and the wait still wakes us
            try:
                item = self.tokens.get_nowait()
            except queue.Empty:
                await ready.wait()
                continue
            if (item := self._take(item)) is None:
                return
            yield item

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Admits waiting requests into the batch while it has a free row and the KV positions they reserve fit
    under max_tokens_in_flight (first come, first served; the rest wait: back-pressure), prefills them (in one
    pass where it can), then runs one decoding step for all active requests, streaming each token to its caller.
    Other model work of the engine runs on the same thread between steps (call), so that the process has one
    OpenMP team (see pioneer_model.threads)."""

    def __init__(self, model, *, max_batch_size: int = 16, max_tokens_in_flight: int | None = None,
                 on_prefill=None, on_first_token=None, on_done=None):
        self.decoder = BatchDecoder(model, max_batch_size, _quietly("on_prefill", on_prefill),
                                    _quietly("on_done", on_done))
        self.on_first_token = on_first_token  # called with each sequence once its first token is handed out
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight or max_batch_size * model.config.sequence_length
        self.waiting: deque[Ticket] = deque()
        self.calls: deque[tuple[Future, object]] = deque()
        self.tickets: dict[int, Ticket] = {}  # id(seq) -> ticket, for the active rows
        self.in_flight = 0  # KV positions reserved by the active requests
        self.stats = {"steps": 0, "rows_stepped": 0, "prefills": 0, "prefill_passes": 0, "peak_batch": 0,
                      "peak_tokens_in_flight": 0, "peak_waiting": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, seq: Sequence) -> Ticket:
        ticket = Ticket(seq)
        with self._cond:
            self._check_open()
            self.waiting.append(ticket)
            self.stats["peak_waiting"] = max(self.stats["peak_waiting"], len(self.waiting))
            self._wake()
        return ticket

    def call(self, fn, *args):
        """fn(*args) on the scheduler thread, between decoding steps; its result (or exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        future: Future = Future()
        with self._cond:
            self._check_open()
            self.calls.append((future, lambda: fn(*args)))
            self._wake()
        return future.result()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")

    def _wake(self) -> None:
        """Start the thread on first use, and wake it (called with the lock held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pioneer-scheduler", daemon=True)
            self._thread.start()
            _schedulers.add(self)
        self._cond.notify()

    def close(self, timeout: float | None = 10.0, cancel: bool = False) -> None:
        """Stop after the requests in progress (cancel: drop them at the next step instead)."""
        with self._cond:
            self._closed = True
            if cancel:
                for ticket in [*self.waiting, *self.tickets.values()]:
                    ticket.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict:
        with self._cond:
            steps = self.stats["steps"]
            return {"max_batch_size": self.max_batch_size, "max_tokens_in_flight": self.max_tokens_in_flight,
                    "active": len(self.decoder.active), "waiting": len(self.waiting),
                    "tokens_in_flight": self.in_flight, "kv_cache_mb": round(self.decoder.kv_bytes / 2**20, 1),
                    "mean_batch": round(self.stats["rows_stepped"] / steps, 2) if steps else 0.0} | self.stats

    def _admit(self) -> list[Ticket]:
        """Waiting tickets that fit now (called with the lock held)."""
        admitted = []
        while self.waiting and len(self.decoder.active) + len(admitted) < self.max_batch_size:
            ticket = self.waiting[0]
            if ticket.cancelled:
                self.waiting.popleft()
                ticket.put(DONE)
                continue
            need = ticket.seq.reserved
            busy = self.decoder.active or admitted
            if busy and self.in_flight + need > self.max_tokens_in_flight:
                break
            self.waiting.popleft()
            self.in_flight += need
            self.tickets[id(ticket.seq)] = ticket
            admitted.append(ticket)
        return admitted

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self.waiting and not self.decoder.active and not self.calls:
                        self._cond.wait()
                    calls, self.calls = self.calls, deque()
                    if self._closed and not self.decoder.active and not self.waiting and not calls:
                        return
                    admitted = self._admit()
                for future, fn in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as exc:
                            future.set_exception(exc)
                try:
                    for group in self._prefill_groups(admitted):
                        self._prefill(group)
                    self._step()
                except Exception as exc:  # fail the requests in the batch, keep serving the next ones
                    log.exception("batched decoding failed")
                    self._fail_all(exc)

    def _prefill_groups(self, tickets: list[Ticket]) -> list[list[Ticket]]:
        """Admitted requests in the groups prefilled together: a decoder-only model's requests with nothing
        cached, up to PREFILL_BATCH_TOKENS padded tokens a group; the others alone."""
        groups, batch = [], []
        for ticket in tickets:
            if ticket.seq.prefix or not self.decoder.model.config.decoder_only:
                groups.append([ticket])
                continue
            longest = max(len(t.seq.prompt) for t in [*batch, ticket])
            if batch and longest * (len(batch) + 1) > PREFILL_BATCH_TOKENS:
                groups.append(batch)
                batch = []
            batch.append(ticket)
        return groups + ([batch] if batch else [])

    def _prefill(self, tickets: list[Ticket]) -> None:
        live = [t for t in tickets if not t.cancelled]
        for ticket in tickets:
            if ticket.cancelled:
                self._finish(ticket)
        if not live:
            return
        try:
            seqs = [t.seq for t in live]
            firsts = self.decoder.add_many(seqs) if len(seqs) > 1 else [self.decoder.add(seqs[0])]
            self.stats["prefill_passes"] += 1
        except Exception as exc:
            if len(live) > 1:  # one of them: prefill each alone, to fail that one only
                log.warning("prefilling %d requests together failed, one by one now: %s", len(live), exc)
                for ticket in live:
                    self.decoder.remove(ticket.seq)  # rows it may have taken
                for ticket in live:
                    self._prefill([ticket])
                return
            log.exception("prefill failed")  # this request only (e.g. a bad prefix): the batch carries on
            self.decoder.remove(live[0].seq)
            self._release(live[0])
            live[0].put(RuntimeError(f"generation failed: {exc}"))
            return
        for ticket, first in zip(live, firsts):
            self.stats["prefills"] += 1
            ticket.put(first)
            if self.on_first_token is not None:
                _quietly("on_first_token", self.on_first_token)(ticket.seq)
            if ticket.seq.done:
                self._finish(ticket)

    def _step(self) -> None:
        for seq in list(self.decoder.active):
            ticket = self.tickets[id(seq)]
            if ticket.cancelled:
                self.decoder.remove(seq)
                self._finish(ticket)
        n = len(self.decoder.active)
        if not n:
            return
        with self._cond:
            self.stats["steps"] += 1
            self.stats["rows_stepped"] += n
            self.stats["peak_batch"] = max(self.stats["peak_batch"], n)
            self.stats["peak_tokens_in_flight"] = max(self.stats["peak_tokens_in_flight"], self.in_flight)
        for seq, token, logprob in self.decoder.step():
            ticket = self.tickets[id(seq)]
            ticket.put((token, logprob))
            if seq.done:
                self._finish(ticket)

    def _finish(self, ticket: Ticket) -> None:
        self._release(ticket)
        ticket.put(DONE)

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if self.tickets.pop(id(ticket.seq), None) is not None:
                self.in_flight -= ticket.seq.reserved

    def _fail_all(self, exc: Exception) -> None:
        for seq in list(self.decoder.active):
            self.decoder.remove(seq)
        with self._cond:
            tickets = list(self.tickets.values())
        for ticket in tickets:
            self._release(ticket)
            ticket.put(RuntimeError(f"generation failed: {exc}"))


def _quietly(name: str, hook):
    """hook(seq), logging an exception instead of raising it: the server's bookkeeping around a sequence (caching
    its keys/values) failing must not fail the batch."""
    if hook is None:
        return None

    def run(seq) -> None:
        try:
            hook(seq)
        except Exception:
            log.exception("%s failed", name)

    return run


@atexit.register
def _stop_all() -> None:
    """A daemon thread still inside torch when the interpreter exits aborts the process: stop them first."""
    for scheduler in list(_schedulers):
        scheduler.close(timeout=5.0, cancel=True)
