"""Prefix reuse: keys/values of prompt prefixes in fixed-size token chunks in a shared CacheStorage.

Chunk i of a prompt (its tokens i*C .. (i+1)*C) is stored under key_i = sha256(key_{i-1}, token ids of chunk i),
with key_{-1} = H(namespace, C), so one key names the whole prefix up to and including that chunk. Its value
is safetensors bytes {"ids", "k", "v"} (k, v: (layers, heads, C, head_dim)); a small marker entry holding
the value's length and xxh3 checksum is written after it, so a reader never trusts a half-written or damaged chunk.
The prompt's last, partial chunk is stored too, under "tail" of the chain key before it: a follow-up whose
tokens continue with it reuses it, so only the new turn is prefilled, not up to C - 1 tokens more. A server
stores a finished reply's tokens the same way, continuing its prompt's chain (the next turn's prompt holds them).
A missing, mismatched or undecodable chunk ends the prefix there (a miss), never an error.
Encoder-decoder models cache the encoder output of an exact source under H(namespace, "encoder", ids).
"""

import hashlib
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import xxhash

from .cache import CacheStorage, cache_key, decode_tensors, encode_tensors, view_tensors

DEFAULT_CHUNK_TOKENS = 64
# Chunks are fetched in this many groups at once (the caller's thread and helpers). On 2 cores, 7.5 MB took
# 6.1-7.0 ms in 2 groups, 8.4-8.9 in 1 and 7.1-7.4 in 4.
FETCH_THREADS = 2


class PrefixCache:
    """Chunked prompt keys/values (decoder-only) or encoder outputs (encoder-decoder) of one model."""

    def __init__(self, storage: CacheStorage, namespace: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        self.storage, self.namespace, self.chunk_tokens = storage, namespace, chunk_tokens
        self.root = cache_key(namespace, "prefix", chunk_tokens)
        self.stats = {"chunk_hits": 0, "chunk_misses": 0, "tail_hits": 0, "chunks_damaged": 0,
                      "chunks_written": 0, "encoder_hits": 0, "encoder_misses": 0}
        self._lock = threading.Lock()
        self._fetcher: ThreadPoolExecutor | None = None
        self._touches: set = set()

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.stats[name] = self.stats.get(name, 0) + amount

    def chunk_keys(self, ids: list[int], limit: int | None = None) -> list[str]:
        """Chained keys of the full chunks among ids[:limit]: sha256 of the key before and the chunk's ids as
        little-endian int64."""
        c = self.chunk_tokens
        n = (len(ids) if limit is None else min(limit, len(ids))) // c
        keys, key, layout = [], self.root, struct.Struct(f"<{c}q")
        for i in range(n):
            key = hashlib.sha256(key.encode() + layout.pack(*ids[i * c:(i + 1) * c])).hexdigest()
            keys.append(key)
        return keys

    def entry_names(self, ids: list[int]) -> list[str]:
        """Every storage key (data and marker) that chunks of this prompt may occupy."""
        chains = [self.root, *self.chunk_keys(ids)]
        return [f"prefix:{k}{part}" for k in chains[1:] for part in ("", ":ok")] + \
               [f"prefix:{k}:tail{part}" for k in chains for part in ("", ":ok")]

    def lookup(self, ids: list[int], limit: int | None = None,
               touch: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The longest cached prefix of ids[:limit]: (k, v) pieces, each (layers, heads, tokens, head_dim): full
        chunks, then maybe a partial one; empty on a miss. The entries used are then refreshed in the storage's
        LRU order on a fetch thread; touch=False leaves that to the caller (touch_later())."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        keys, c = self.chunk_keys(ids, limit), self.chunk_tokens
        chains = [self.root, *keys]  # chains[i]: the key of the prefix before chunk i, which its tail hangs on
        # A few groups of chunks at once, each fetched with its markers in one round trip on its own connection and
        # checked on its own thread: reading and checking megabytes is CPU-bound in the client. The partial chunk
        # after the last full one comes with the last group.
        size = max(1, -(-len(keys) // FETCH_THREADS))
        groups = [range(i, min(len(keys), i + size)) for i in range(0, len(keys), size)] or [range(0)]
        jobs = [(ids, chains, group, n == len(groups) - 1 and len(keys) * c < limit, limit)
                for n, group in enumerate(groups)]
        helpers = [self._fetch_pool().submit(self._fetch_group, *job) for job in jobs[1:]]
        pieces, tail = [], None
        try:
            for n, job in enumerate(jobs):
                chunks, tail = self._fetch_group(*job) if n == 0 else helpers[n - 1].result()
                pieces += chunks
                if len(chunks) < len(job[2]):
                    break
        finally:
            for helper in helpers:
                helper.cancel()
        present = len(pieces)
        if present < len(keys) and present * c < limit:  # the chain ended early: the partial chunk hanging there
            name = f"prefix:{chains[present]}:tail"
            tail = self._tail(name, *self._get_many([name + ":ok", name]), ids[present * c:limit])
        self.count("chunk_hits", present)
        self.count("chunk_misses", len(keys) - present)
        if touch:
            self.touch_later(ids, present * c + (tail[0].size(2) if tail else 0))
        if tail is not None:
            pieces.append(tail)
            self.count("tail_hits")
        return pieces

    def _fetch_group(self, ids, chains, group: range, with_tail: bool, limit: int):
        """Chunks `group` and their markers in one round trip, checked: (the chunks that hit, up to the first
        that does not; with_tail: the partial chunk after the group's last, if every chunk hit, else None)."""
        c = self.chunk_tokens
        names = [f"prefix:{chains[i + 1]}" for i in group]
        if with_tail:
            names.append(f"prefix:{chains[group.stop]}:tail")
        found = self._get_many([name + ":ok" for name in names] + names)
        markers, values = found[:len(names)], found[len(names):]
        chunks = []
        for i, name, marker, data in zip(group, names, markers, values):
            entry = self._check(name, marker, data, lambda got, i=i: got == ids[i * c:(i + 1) * c])
            if entry is None:
                return chunks, None
            chunks.append((entry["k"], entry["v"]))
        tail = self._tail(names[-1], markers[-1], values[-1], ids[group.stop * c:limit]) if with_tail else None
        return chunks, tail

    def _tail(self, name: str, marker, data, wanted: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A partial chunk's keys/values for the start its tokens share with `wanted`, or None."""
        entry = self._check(name, marker, data, lambda got: True)
        shared = 0 if entry is None else common_prefix(entry["ids"].tolist(), wanted)
        # Keys/values of a position depend only on the tokens up to it: any shared start is valid.
        return (entry["k"][:, :, :shared], entry["v"][:, :, :shared]) if shared else None

    def _fetch_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(max(1, FETCH_THREADS - 1), thread_name_prefix="pioneer-prefix-fetch")
            return self._fetcher

    def close(self) -> None:
        """Stop the fetching threads (lookups after this start them again)."""
        with self._lock:
            fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            fetcher.shutdown(wait=True)

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        """Values of keys: one round trip where the storage offers get_many, leaving their LRU order to touch()
        where the storage offers touch_many."""
        get_many = getattr(self.storage, "get_many", None)
        if get_many is None:
            return [self.storage.get(k) for k in keys]
        return get_many(keys, touch=False) if hasattr(self.storage, "touch_many") else get_many(keys)

    def touch_later(self, ids: list[int], reused: int) -> None:
        """touch() on a fetch thread (flush() waits for it)."""
        if reused > 0 and hasattr(self.storage, "touch_many"):
            future = self._fetch_pool().submit(self.touch, ids, reused)
            with self._lock:
                self._touches.add(future)
            future.add_done_callback(self._touched)

    def _touched(self, future) -> None:
        with self._lock:
            self._touches.discard(future)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait for the LRU refreshes queued by touch_later()."""
        with self._lock:
            pending = list(self._touches)
        wait(pending, timeout)

    def touch(self, ids: list[int], reused: int) -> None:
        """Refresh, where the storage keeps an LRU order (touch_many), the entries that held ids[:reused]."""
        touch_many = getattr(self.storage, "touch_many", None)
        if touch_many is None or reused <= 0:
            return
        keys, c = self.chunk_keys(ids, reused), self.chunk_tokens
        names = [f"prefix:{key}" for key in keys]
        if reused > len(keys) * c:
            names.append(f"prefix:{keys[-1] if keys else self.root}:tail")
        touch_many([name + part for name in names for part in ("", ":ok")])

    def _check(self, name: str, marker: bytes, data: bytes | None, accept) -> dict | None:
        """The entry if its data matches its marker and `accept` takes its token ids; damaged ones are deleted.
        Data without a marker is a miss (its marker may not be written yet)."""
        if data is None or marker is None:
            return None
        try:
            if marker != chunk_marker(data):
                raise ValueError("length or checksum differs from the marker")
            entry = view_tensors(data)  # read-only views: copied into the KV cache by the decoder
            if entry["k"].shape != entry["v"].shape or entry["k"].size(2) != entry["ids"].numel():
                raise ValueError("malformed entry")
        except Exception:  # damaged: forget it, recompute from here
            self.count("chunks_damaged")
            self.storage.delete(name + ":ok")
            self.storage.delete(name)
            return None
        return entry if accept(entry["ids"].tolist()) else None

    def pieces(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Contiguous copies of k, v (layers, heads, T, head_dim) cut every C positions, ready for store()."""
        c = self.chunk_tokens
        return [(k[:, :, i:i + c].contiguous(), v[:, :, i:i + c].contiguous()) for i in range(0, k.size(2), c)]

    def store(self, ids: list[int], pieces: list[tuple[torch.Tensor, torch.Tensor]], first_chunk: int = 0) -> int:
        """Write chunks first_chunk.. of ids, given pieces() of the keys/values from position first_chunk * C on:
        full chunks, and the partial chunk at the end; data before marker. Returns chunks written."""
        c, written = self.chunk_tokens, 0
        end = first_chunk * c + sum(k.size(2) for k, _ in pieces)
        keys = self.chunk_keys(ids, end)
        for i, (k, v) in enumerate(pieces, first_chunk):
            if i < len(keys):
                self._put(f"prefix:{keys[i]}", ids[i * c:(i + 1) * c], k, v)
                written += 1
            else:
                self._put(f"prefix:{keys[-1] if keys else self.root}:tail", ids[i * c:end], k, v)
        self.count("chunks_written", written)
        return written

    def _put(self, name: str, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        data = encode_tensors({"ids": torch.tensor(ids, dtype=torch.long), "k": k, "v": v})
        self.storage.put(name, data)
        self.storage.put(name + ":ok", chunk_marker(data))

    def encoder_key(self, src_ids: list[int]) -> str:
        return "encoder:" + cache_key(self.namespace, "encoder", torch.tensor(src_ids, dtype=torch.long))

    def lookup_encoder(self, src_ids: list[int]) -> torch.Tensor | None:
        """The cached encoder output (1, S, dim) of exactly these source ids, or None."""
        key = self.encoder_key(src_ids)
        data = self.storage.get(key)
        memory = None
        if data is not None:
            try:
                entry = decode_tensors(data)
                if entry["ids"].tolist() == list(src_ids) and entry["memory"].size(1) == len(src_ids):
                    memory = entry["memory"]
            except Exception:
                pass
            if memory is None:
                self.count("chunks_damaged")
                self.storage.delete(key)
        self.count("encoder_hits" if memory is not None else "encoder_misses")
        return memory

    def store_encoder(self, src_ids: list[int], memory: torch.Tensor) -> None:
        self.storage.put(self.encoder_key(src_ids),
                         encode_tensors({"ids": torch.tensor(src_ids, dtype=torch.long), "memory": memory}))


def chunk_marker(data: bytes) -> bytes:
    """What a chunk's marker holds: the checksum kind, the value's length and its checksum."""
    return b"xxh3:%d:%016x" % (len(data), xxhash.xxh3_64_intdigest(data))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def time_ms(fn, repeats: int = 5) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


@torch.inference_mode()
def measure(model, storage: CacheStorage, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chunks: int = 4,
            repeats: int = 5) -> dict:
    """Time recomputing `chunks` chunks of prompt (a prefill, or an encoder pass) against fetching them from
    storage (a round trip of random tensors of the real size). Returns the figures and the decision."""
    c, dev = model.config, model.device
    tokens = min(chunks * chunk_tokens, c.sequence_length)
    chunks = max(1, tokens // chunk_tokens)
    ids = torch.randint(c.vocab_size, (1, chunks * chunk_tokens), device=dev)
    dtype = model.tok_emb.weight.dtype
    cache = PrefixCache(storage, cache_key("prefix-measure", time.time_ns()), chunk_tokens)
    ids_list = ids[0].tolist()
    if c.decoder_only:
        compute = time_ms(lambda: model.decode(ids, kv_caches=model.new_kv_caches(1, ids.size(1))), repeats)
        kv = torch.randn(c.num_decoder_layers, c.attention_heads, ids.size(1), c.head_dim, dtype=dtype)
        cache.store(ids_list, cache.pieces(kv, kv.clone()))
        fetch = time_ms(lambda: cache.lookup(ids_list), repeats)
        for name in cache.entry_names(ids_list):
            storage.delete(name)
    else:
        compute = time_ms(lambda: model.encode(ids), repeats)
        cache.store_encoder(ids_list, torch.randn(1, ids.size(1), c.embedding_dim, dtype=dtype))
        fetch = time_ms(lambda: cache.lookup_encoder(ids_list), repeats)
        storage.delete(cache.encoder_key(ids_list))
    return {"use": fetch < compute, "chunk_tokens": chunk_tokens, "measured_tokens": ids.size(1),
            "fetch_ms": round(fetch, 3), "recompute_ms": round(compute, 3),
            "fetch_ms_per_chunk": round(fetch / chunks, 3), "recompute_ms_per_chunk": round(compute / chunks, 3)}
