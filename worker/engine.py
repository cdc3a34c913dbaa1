"""The local inference engine: one model per worker process, serving concurrent requests."""

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import torch

from pioneer_model import AttentionCache, cache_key, confidence
from pioneer_model.batching import make_sequence
from pioneer_model.checkpoint import load_pretrained
from pioneer_model.prefix import DEFAULT_CHUNK_TOKENS, PrefixCache
from pioneer_model.prefix import measure as measure_prefix
from pioneer_model.quantize import quantize_int8
from pioneer_model.threads import on_own_thread

from . import metrics
from .scheduler import Scheduler, Ticket

log = logging.getLogger(__name__)
MAX_PENDING_WRITES = 8  # prefix-cache writes queued at most; more are skipped


@dataclass
class LocalReply:
    """A finished (or cached) local generation."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    cached: bool = False
    seconds: float = 0.0
    cache_keys_values: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def keep(self) -> None:
        """This reply is the answer: cache its keys/values for the next turn, where the engine held them back
        (hold_reply_cache=True). A reply that is not kept (routed elsewhere) leaves nothing in the cache."""
        write, self.cache_keys_values = self.cache_keys_values, None
        if write is not None:
            write()

    @property
    def raw_confidence(self) -> float:
        return confidence(self.logprobs)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)}


@dataclass
class EngineStats:
    requests: int = 0
    generated_tokens: int = 0
    cache_hits: int = 0
    busy: int = 0
    reused_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class LocalEngine:
    """Streams replies from the local model. Thread-safe: callers on any thread submit requests to one scheduler
    thread, which decodes all of them together (continuous batching) on one copy of the model, and reuses
    cached prompt prefixes from the shared cache when fetching them is faster than recomputing."""

    def __init__(self, model, tokenizer, *, cache: AttentionCache | None = None, max_new_tokens: int = 96,
                 name: str | None = None, precision: str | None = None, max_batch_size: int = 16,
                 max_tokens_in_flight: int | None = None, prefix_cache: str = "auto",
                 prefix_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self.name = name or model.config.name
        self.precision = getattr(model, "quantization", None) or precision or dtype_name(model.tok_emb.weight.dtype)
        self.model_id = cache_key(self.name, model.config.to_dict(), model.tok_emb.weight.float(), self.precision)[:16]
        self.stats = EngineStats()
        self.scheduler = Scheduler(model, max_batch_size=max_batch_size, max_tokens_in_flight=max_tokens_in_flight,
                                   on_prefill=self._on_prefill, on_first_token=self._on_first_token,
                                   on_done=self._on_done)
        if prefix_cache not in ("auto", "on", "off"):
            raise ValueError(f"prefix_cache must be auto, on or off, not {prefix_cache!r}")
        self.prefix_policy = prefix_cache
        self.prefix = None
        if prefix_cache != "off" and cache is not None and cache.enabled:
            self.prefix = PrefixCache(cache.storage, self.model_id, prefix_chunk_tokens)
        self.prefix_measurement: dict | None = None
        self._measure_lock, self._writes_lock = threading.Lock(), threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pioneer-prefix-writer")
        self._writes: set = set()

    @classmethod
    def load(cls, path, *, device: str = "auto", cache: AttentionCache | None = None, max_new_tokens: int = 96,
             precision: str = "auto", **options):
        """Load a model directory. The work runs on a thread of its own, so the caller's thread is left without an
        OpenMP team: only the scheduler thread computes from then on."""
        return on_own_thread(cls._load, path, device=device, cache=cache, max_new_tokens=max_new_tokens,
                             precision=precision, **options)

    @classmethod
    def _load(cls, path, *, device, cache, max_new_tokens, precision, **options):
        device = resolve_device(device)
        precision = resolve_precision(precision, device)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model, tokenizer = load_pretrained(path, device=device, dtype=dtype)
        if tokenizer is None:
            raise ValueError(f"{path} has no tokenizer.json")
        if precision == "int8":
            quantize_int8(model)
        return cls(model, tokenizer, cache=cache, max_new_tokens=max_new_tokens, name=Path(path).name,
                   precision=precision, **options)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat prompt. System messages are left out: Pioneer's small models are trained on conversations
        without one, and an unfamiliar preamble derails them. History is cut to the model's
        max_history_messages before the last message (the OpenAI backend still gets all of it)."""
        chat = [(m["role"], m["content"]) for m in messages if m["role"] != "system"]
        keep = self.model.config.max_history_messages
        if keep is not None:
            chat = chat[-(keep + 1):]
        return self.tokenizer.encode_chat(chat)

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count_tokens(text)

    def stream(self, messages: list[dict], max_new_tokens: int | None = None, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               hold_reply_cache: bool = False) -> Iterator[str]:
        """Yield text deltas of a reply (greedy unless temperature > 0); the generator's return value is the
        LocalReply. Greedy replies are cached whole. hold_reply_cache: the reply's keys/values go to the prefix
        cache only once LocalReply.keep() is called (for a reply that may be thrown away)."""
        reply = self._begin(messages, max_new_tokens, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                           seed=seed), hold_reply_cache)
        try:
            reply.submit()
            for token_id, logprob in reply.steps:
                delta = reply.add(token_id, logprob)
                if delta:
                    yield delta
            tail = reply.flush()
            if tail:
                yield tail
        finally:
            reply.close()
        return reply.result()

    async def astream(self, messages: list[dict], max_new_tokens: int | None = None, *,
                      hold_reply_cache: bool = False, **sampling) -> AsyncIterator[str | LocalReply]:
        """stream() for an event loop, without a thread per reply: tokens come from the scheduler thread straight
        to the loop. Yields text deltas, then the LocalReply. Fetching cached prefixes runs in a thread."""
        reply = self._begin(messages, max_new_tokens, sampling, hold_reply_cache)
        try:
            if reply.cached is None and self._may_reuse_prefix(len(reply.ids)):
                await asyncio.to_thread(reply.submit)
            else:
                reply.submit()
            steps = reply.steps if reply.ticket is None else reply.ticket.aiter()
            async for token_id, logprob in _as_async(steps):
                delta = reply.add(token_id, logprob)
                if delta:
                    yield delta
            tail = reply.flush()
            if tail:
                yield tail
        finally:
            reply.close()
        yield reply.result()

    def _begin(self, messages: list[dict], max_new_tokens: int | None, sampling: dict,
               hold_reply_cache: bool = False) -> "_Reply":
        ids = self.prompt_ids(messages)
        reply = _Reply(self, ids, max_new_tokens or self.max_new_tokens, sampling, hold_reply_cache)
        with self.stats.lock:
            self.stats.requests += 1
            self.stats.busy += 1
        return reply

    def generate(self, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> Iterator[tuple[int, float]]:
        """Yield (token id, log-probability) of one request, decoded in the shared batch."""
        ticket = self.submit(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        try:
            yield from ticket
        finally:
            ticket.cancel()  # the caller stopped reading: free its row (no-op once finished)

    def submit(self, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, hold_reply_cache: bool = False) -> Ticket:
        """Queue one request in the shared batch (after looking up its cached prefix); read tokens from the
        ticket, and cancel it to stop early. hold_reply_cache: a finished reply's keys/values wait in
        ticket.seq.prefix_write for the caller to write (see LocalReply.keep)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        seq = make_sequence(self.model.config, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_token_id=self.tokenizer.eos_id, generator=generator,
                            hold_reply_write=hold_reply_cache)
        self._attach_prefix(seq)
        return self.scheduler.submit(seq)

    def reply(self, messages: list[dict], max_new_tokens: int | None = None, **sampling) -> LocalReply:
        """Generate a whole reply (used to decide before streaming whether to keep it)."""
        gen = self.stream(messages, max_new_tokens, **sampling)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    # ---- prefix reuse ----------------------------------------------------------------------------------------

    def prefix_in_use(self, measure: bool = True) -> bool:
        """Whether prompts reuse cached prefixes: policy "on", or "auto" once fetching measured faster
        (measured on first use)."""
        if self.prefix is None:
            return False
        if self.prefix_policy == "on":
            return True
        if self.prefix_measurement is None:
            if not measure:
                return False
            self.measure_prefix_cache(again=False)
        return self.prefix_measurement["use"]

    def measure_prefix_cache(self, again: bool = True) -> dict:
        """Time fetching cached chunks against recomputing them (on the scheduler thread, between steps)."""
        with self._measure_lock:
            if self.prefix_measurement is not None and not again:
                return self.prefix_measurement
            try:
                self.prefix_measurement = self.scheduler.call(measure_prefix, self.model, self.prefix.storage,
                                                              self.prefix.chunk_tokens)
            except Exception as exc:  # the cache is unreachable: recompute
                log.warning("prefix cache measurement failed, not reusing prefixes: %s", exc)
                self.prefix_measurement = {"use": False, "error": str(exc)}
            log.info("prefix cache: %s", self.prefix_measurement)
            return self.prefix_measurement

    def _may_reuse_prefix(self, prompt_tokens: int) -> bool:
        """Whether a prompt this long may look up a cached prefix (which fetches from the cache)."""
        c = self.model.config
        if self.prefix is None or (c.decoder_only and prompt_tokens <= self.prefix.chunk_tokens):
            return False
        return self.prefix_measurement is None or self.prefix_in_use(measure=False)  # unmeasured: it may be

    def _attach_prefix(self, seq) -> None:
        if not self._may_reuse_prefix(len(seq.prompt)) or not self.prefix_in_use():
            return
        c = self.model.config
        try:
            if c.decoder_only:
                # Keep a token to prefill; refresh the entries' LRU order once the first token is out.
                seq.prefix = self.prefix.lookup(seq.prompt, limit=len(seq.prompt) - 1, touch=False)
                seq.reused = seq.prefix_len
            else:
                seq.memory = self.prefix.lookup_encoder(seq.prompt)
                seq.reused = len(seq.prompt) if seq.memory is not None else 0
        except Exception as exc:  # the cache failing is a miss
            log.warning("prefix lookup failed, recomputing: %s", exc)
            seq.prefix, seq.memory, seq.reused = None, None, 0
        with self.stats.lock:
            self.stats.reused_tokens += seq.reused

    def _on_prefill(self, seq) -> None:
        """Scheduler thread, right after a prefill, while the row is set: copy the new chunks (or the encoder
        output) to write once the first token is out (_on_first_token). The copies are made here, so that the
        writing thread runs no torch op of its own."""
        if self.prefix is None or not self.prefix_in_use(measure=False):
            return
        if self.model.config.decoder_only:
            chunk = self.prefix.chunk_tokens
            # New chunks and the partial one at the end; prompts shorter than a chunk are not worth it.
            if len(seq.prompt) >= chunk and seq.reused < len(seq.prompt) - 1:
                seq.prefix_write = self._chunks_to_store(seq, seq.prompt, seq.reused // chunk)
        elif not seq.reused:
            seq.prefix_write = (self.prefix.store_encoder, seq.prompt, seq.memory.clone())

    def _on_done(self, seq) -> None:
        """Scheduler thread, when a reply is complete: cache the keys/values of its tokens too (all but the last,
        which was never fed back), from the prompt's last full chunk on. The conversation's next prompt continues
        with them, so a follow-up prefills only what came after the reply."""
        c = self.model.config
        if self.prefix is None or not c.decoder_only or c.max_history_messages == 0 or not self.prefix_in_use(False):
            return  # (a model that reads no history never sees this reply again)
        ids = seq.prompt + seq.tokens[:-1]
        if len(seq.tokens) > 1 and len(ids) >= self.prefix.chunk_tokens:  # (the prompt's write is queued already)
            write = self._chunks_to_store(seq, ids, len(seq.prompt) // self.prefix.chunk_tokens)
            if seq.hold_reply_write:
                seq.prefix_write = write  # LocalReply.keep() writes it
            else:
                self._write(*write)

    def _chunks_to_store(self, seq, ids: list[int], first: int) -> tuple:
        """A write of ids' chunks first.. from the sequence's row: copies, made here on the scheduler thread."""
        k, v = self.scheduler.decoder.cache.read(seq.row, first * self.prefix.chunk_tokens, len(ids))
        return self.prefix.store, ids, self.prefix.pieces(k, v), first

    def _on_first_token(self, seq) -> None:
        """Scheduler thread, once the first token is handed to the reader: queue the copied chunks for writing,
        and refresh the LRU order of the reused ones (work started earlier competed with handing out that token)."""
        pending, seq.prefix_write, prefix = seq.prefix_write, None, self.prefix
        if pending is not None:
            self._write(*pending)
        if seq.reused and prefix is not None and self.model.config.decoder_only:
            prefix.touch_later(seq.prompt, seq.reused)

    def _write(self, fn, *args) -> None:
        with self._writes_lock:
            if len(self._writes) >= MAX_PENDING_WRITES:  # the cache is slow: skip rather than pile up memory
                self.prefix.count("writes_skipped")
                return
            try:
                future = self._writer.submit(fn, *args)
            except RuntimeError:  # closed (shutting down): the cache can do without it
                self.prefix.count("writes_skipped")
                return
            self._writes.add(future)
        future.add_done_callback(self._written)

    def _written(self, future) -> None:
        with self._writes_lock:
            self._writes.discard(future)
        if future.exception() is not None:
            log.warning("prefix cache write failed: %s", future.exception())

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait for the queued prefix-cache writes (and LRU refreshes)."""
        with self._writes_lock:
            pending = list(self._writes)
        wait(pending, timeout)
        if self.prefix is not None:
            self.prefix.flush(timeout)

    def close(self) -> None:
        self.flush()
        self.scheduler.close()
        self._writer.shutdown(wait=True)
        if self.prefix is not None:
            self.prefix.close()

    def info(self) -> dict:
        prefix: dict = {"enabled": self.prefix is not None, "policy": self.prefix_policy}
        if self.prefix is not None:
            measured = self.prefix_measurement
            prefix |= {"chunk_tokens": self.prefix.chunk_tokens,
                       "in_use": True if self.prefix_policy == "on" else None if measured is None else measured["use"],
                       "measurement": measured, "reused_tokens": self.stats.reused_tokens} | self.prefix.stats
        return {
            "model_name": self.name,
            "model_parameters": self.model.num_parameters(),
            "device": str(self.model.device),
            "dtype": str(self.model.tok_emb.weight.dtype).removeprefix("torch."),
            "precision": self.precision,
            "architecture": "decoder-only" if self.model.config.decoder_only else "encoder-decoder",
            "requests": self.stats.requests,
            "generated_tokens": self.stats.generated_tokens,
            "batching": self.scheduler.snapshot(),
            "prefix_cache": prefix,
        }


class _Reply:
    """The bookkeeping of one reply: reply-cache lookup, the request in the batch, text decoding, statistics."""

    def __init__(self, engine: LocalEngine, ids: list[int], max_new_tokens: int, sampling: dict,
                 hold_reply_cache: bool = False):
        self.engine, self.ids, self.max_new_tokens, self.sampling = engine, ids, max_new_tokens, sampling
        self.hold_reply_cache = hold_reply_cache
        self.started = time.perf_counter()
        temperature = sampling.get("temperature")
        self.use_cache = engine.cache is not None and (temperature is None or temperature <= 0)
        self.key = cache_key(engine.model_id, "reply", max_new_tokens, torch.tensor(ids)) if self.use_cache else None
        self.cached = engine.cache.get(self.key) if self.use_cache else None
        self.decoder = engine.tokenizer.stream_decoder()
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.parts: list[str] = []
        self.ticket: Ticket | None = None
        self.steps = zip(self.cached["tokens"].tolist(), self.cached["logprobs"].tolist()) if self.cached else ()
        self.closed = False

    def submit(self) -> None:
        if self.cached is None:
            sampling = {k: v for k, v in self.sampling.items() if v is not None}
            self.ticket = self.engine.submit(self.ids, self.max_new_tokens, hold_reply_cache=self.hold_reply_cache,
                                             **sampling)
            self.steps = self.ticket

    def add(self, token_id: int, logprob: float) -> str:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        delta = self.decoder.add(token_id)
        if delta:
            self.parts.append(delta)
        return delta

    def flush(self) -> str:
        tail = self.decoder.flush()
        if tail:
            self.parts.append(tail)
        return tail

    def close(self) -> None:
        """Once, however the reply ended: free its row, count it, and cache a finished greedy reply."""
        if self.closed:
            return
        self.closed = True
        engine, hit = self.engine, self.cached is not None
        finished = self.ticket is None or self.ticket.finished
        if self.ticket is not None:
            self.ticket.cancel()  # the reader stopped early: free its row (no-op once finished)
        with engine.stats.lock:
            engine.stats.busy -= 1
            engine.stats.generated_tokens += 0 if hit else len(self.token_ids)
            engine.stats.cache_hits += hit
        if self.use_cache and engine.cache.enabled:
            (metrics.CACHE_HITS if hit else metrics.CACHE_MISSES).inc()
        if not hit and self.use_cache and self.token_ids and finished:
            engine.cache.put(self.key, {"tokens": torch.tensor(self.token_ids), "logprobs": torch.tensor(self.logprobs)})

    def result(self) -> LocalReply:
        held = None if self.ticket is None or not self.ticket.finished else self.ticket.seq.prefix_write
        return LocalReply("".join(self.parts), self.token_ids, self.logprobs, len(self.ids), self.cached is not None,
                          time.perf_counter() - self.started,
                          cache_keys_values=None if held is None else functools.partial(self.engine._write, *held))


async def _as_async(steps):
    if hasattr(steps, "__anext__"):
        async for step in steps:
            yield step
    else:
        for step in steps:
            yield step


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def resolve_precision(precision: str, device: str) -> str:
    """MODEL_PRECISION: auto is bf16 on a GPU and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16", "int8"):
        raise ValueError(f"MODEL_PRECISION must be auto, fp32, bf16 or int8, not {precision!r}")
    return precision


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
