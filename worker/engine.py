"""The local inference engine: one model per worker process, serving concurrent requests."""

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from pioneer_model import AttentionCache, cache_key, confidence, stream_generate
from pioneer_model.checkpoint import load_pretrained

log = logging.getLogger(__name__)


@dataclass
class LocalReply:
    """A finished (or cached) local generation."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    cached: bool = False
    seconds: float = 0.0

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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class LocalEngine:
    """Streams replies from the local model. Thread-safe: each request has its own KV cache and the
    weights are only read, so a threads pool can run several requests at once on one copy of the model."""

    def __init__(self, model, tokenizer, *, cache: AttentionCache | None = None, max_new_tokens: int = 96,
                 name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        self.name = name or model.config.name
        self.model_id = cache_key(self.name, model.config.to_dict(), model.tok_emb.weight.float())[:16]
        self.stats = EngineStats()

    @classmethod
    def load(cls, path, *, device: str = "auto", cache: AttentionCache | None = None, max_new_tokens: int = 96):
        device = resolve_device(device)
        dtype = torch.bfloat16 if device.startswith("cuda") else None
        model, tokenizer = load_pretrained(path, device=device, dtype=dtype)
        if tokenizer is None:
            raise ValueError(f"{path} has no tokenizer.json")
        return cls(model, tokenizer, cache=cache, max_new_tokens=max_new_tokens, name=Path(path).name)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat([(m["role"], m["content"]) for m in messages])

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count_tokens(text)

    def stream(self, messages: list[dict], max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield text deltas of a greedy reply; the generator's return value is the LocalReply."""
        started = time.perf_counter()
        max_new = max_new_tokens or self.max_new_tokens
        ids = self.prompt_ids(messages)
        key = cache_key(self.model_id, "reply", max_new, torch.tensor(ids))
        cached = self.cache.get(key) if self.cache is not None else None
        decoder = self.tokenizer.stream_decoder()
        token_ids, logprobs, parts = [], [], []
        with self.stats.lock:
            self.stats.requests += 1
            self.stats.busy += 1
        try:
            if cached is not None:
                steps = zip(cached["tokens"].tolist(), cached["logprobs"].tolist())
            else:
                steps = stream_generate(self.model, ids, max_new_tokens=max_new, eos_token_id=self.tokenizer.eos_id)
            for token_id, logprob in steps:
                token_ids.append(token_id)
                logprobs.append(logprob)
                delta = decoder.add(token_id)
                if delta:
                    parts.append(delta)
                    yield delta
            tail = decoder.flush()
            if tail:
                parts.append(tail)
                yield tail
        finally:
            with self.stats.lock:
                self.stats.busy -= 1
                self.stats.generated_tokens += 0 if cached is not None else len(token_ids)
                self.stats.cache_hits += cached is not None
        if cached is None and self.cache is not None and token_ids:
            self.cache.put(key, {"tokens": torch.tensor(token_ids), "logprobs": torch.tensor(logprobs)})
        return LocalReply("".join(parts), token_ids, logprobs, len(ids), cached is not None, time.perf_counter() - started)

    def reply(self, messages: list[dict], max_new_tokens: int | None = None) -> LocalReply:
        """Generate a whole reply (used to decide before streaming whether to keep it)."""
        gen = self.stream(messages, max_new_tokens)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def info(self) -> dict:
        return {
            "model_name": self.name,
            "model_parameters": self.model.num_parameters(),
            "device": str(self.model.device),
            "dtype": str(self.model.tok_emb.weight.dtype).removeprefix("torch."),
            "architecture": "decoder-only" if self.model.config.decoder_only else "encoder-decoder",
            "requests": self.stats.requests,
            "generated_tokens": self.stats.generated_tokens,
        }


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
