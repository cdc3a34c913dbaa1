"""Prefix reuse: keys/values of prompt prefixes in fixed-size token chunks in a shared CacheStorage.

Chunk i of a prompt (its tokens i*C .. (i+1)*C) is stored under key_i = H(key_{i-1}, token ids of chunk i),
with key_{-1} = H(namespace, C), so one key names the whole prefix up to and including that chunk. Its value
is safetensors bytes {"ids", "k", "v"} (k, v: (layers, heads, C, head_dim)); a small marker entry holding
the value's length and CRC32 is written after it, so a reader never trusts a half-written or damaged chunk.
A missing, mismatched or undecodable chunk ends the prefix there (a miss), never an error.
Encoder-decoder models cache the encoder output of an exact source under H(namespace, "encoder", ids).
"""

import threading
import time
import zlib

import torch

from .cache import CacheStorage, cache_key, decode_tensors, encode_tensors

DEFAULT_CHUNK_TOKENS = 64


class PrefixCache:
    """Chunked prompt keys/values (decoder-only) or encoder outputs (encoder-decoder) of one model."""

    def __init__(self, storage: CacheStorage, namespace: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        self.storage, self.namespace, self.chunk_tokens = storage, namespace, chunk_tokens
        self.stats = {"chunk_hits": 0, "chunk_misses": 0, "chunks_damaged": 0, "chunks_written": 0,
                      "encoder_hits": 0, "encoder_misses": 0}
        self._lock = threading.Lock()

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.stats[name] += amount

    def chunk_keys(self, ids: list[int], limit: int | None = None) -> list[str]:
        """Chained keys of the full chunks among ids[:limit]."""
        c = self.chunk_tokens
        n = (len(ids) if limit is None else min(limit, len(ids))) // c
        keys, key = [], cache_key(self.namespace, "prefix", c)
        for i in range(n):
            key = cache_key(key, torch.tensor(ids[i * c:(i + 1) * c], dtype=torch.long))
            keys.append(key)
        return keys

    def lookup(self, ids: list[int], limit: int | None = None):
        """(k, v) of the longest cached chunk prefix of ids[:limit], each (layers, heads, P, head_dim), or None."""
        ks, vs, c = [], [], self.chunk_tokens
        keys = self.chunk_keys(ids, limit)
        for i, key in enumerate(keys):
            chunk = self._read(key, ids[i * c:(i + 1) * c])
            if chunk is None:
                break
            ks.append(chunk["k"])
            vs.append(chunk["v"])
        self.count("chunk_hits", len(ks))
        self.count("chunk_misses", len(keys) - len(ks))
        if not ks:
            return None
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def _read(self, key: str, chunk_ids: list[int]) -> dict[str, torch.Tensor] | None:
        marker = self.storage.get(f"prefix:{key}:ok")
        if marker is None:
            return None
        data = self.storage.get(f"prefix:{key}")
        if data is None:
            return None
        try:
            size, crc = (int(x) for x in marker.split(b":"))
            if len(data) != size or zlib.crc32(data) != crc:
                raise ValueError("length or checksum differs from the marker")
            chunk = decode_tensors(data)
            if chunk["ids"].tolist() != chunk_ids or chunk["k"].shape != chunk["v"].shape \
                    or chunk["k"].size(2) != len(chunk_ids):
                raise ValueError("chunk holds other tokens or shapes")
        except Exception:  # damaged: forget it, recompute from here
            self.count("chunks_damaged")
            self.storage.delete(f"prefix:{key}:ok")
            self.storage.delete(f"prefix:{key}")
            return None
        return chunk

    def store(self, ids: list[int], k: torch.Tensor, v: torch.Tensor, first_chunk: int = 0) -> int:
        """Write chunks first_chunk.. of ids, given k, v (layers, heads, T, head_dim) of positions
        first_chunk * C .. T; data before marker. Returns how many chunks were written."""
        c, written = self.chunk_tokens, 0
        keys = self.chunk_keys(ids, first_chunk * c + k.size(2))
        for i in range(first_chunk, len(keys)):
            lo, hi = (i - first_chunk) * c, (i - first_chunk + 1) * c
            data = encode_tensors({"ids": torch.tensor(ids[i * c:(i + 1) * c], dtype=torch.long),
                                   "k": k[:, :, lo:hi], "v": v[:, :, lo:hi]})
            self.storage.put(f"prefix:{keys[i]}", data)
            self.storage.put(f"prefix:{keys[i]}:ok", f"{len(data)}:{zlib.crc32(data)}".encode())
            written += 1
        self.count("chunks_written", written)
        return written

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
        cache.store(ids_list, kv, kv)
        fetch = time_ms(lambda: cache.lookup(ids_list), repeats)
        for key in cache.chunk_keys(ids_list):
            storage.delete(f"prefix:{key}")
            storage.delete(f"prefix:{key}:ok")
    else:
        compute = time_ms(lambda: model.encode(ids), repeats)
        cache.store_encoder(ids_list, torch.randn(1, ids.size(1), c.embedding_dim, dtype=dtype))
        fetch = time_ms(lambda: cache.lookup_encoder(ids_list), repeats)
        storage.delete(cache.encoder_key(ids_list))
    return {"use": fetch < compute, "chunk_tokens": chunk_tokens, "measured_tokens": ids.size(1),
            "fetch_ms": round(fetch, 3), "recompute_ms": round(compute, 3),
            "fetch_ms_per_chunk": round(fetch / chunks, 3), "recompute_ms_per_chunk": round(compute / chunks, 3)}
