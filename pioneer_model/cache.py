"""An LRU cache of attention computations over a small storage interface; tensors stored as safetensors bytes."""

import contextlib
import functools
import hashlib
import json
import math
import struct
import threading
import warnings
from collections import OrderedDict
from typing import Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class CacheStorage(Protocol):
    """Where cached entries live: in this process, or shared (the worker backs it with Redis)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> int:
        """Store a value, evicting least recently used entries beyond capacity; returns how many were evicted."""

    def delete(self, key: str) -> None: ...

    def clear(self) -> None: ...

    def __len__(self) -> int: ...

    def incr(self, counter: str, amount: int = 1) -> None: ...

    def counters(self) -> dict[str, int]: ...


class MemoryLRUStorage:
    """In-process LRU storage, thread-safe."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key, value):
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            evicted = 0
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
                evicted += 1
            return evicted

    def delete(self, key):
        with self._lock:
            self._data.pop(key, None)

    def clear(self):
        with self._lock:
            self._data.clear()
            self._counters.clear()

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._data)

    def __len__(self):
        return len(self._data)

    def incr(self, counter, amount=1):
        with self._lock:
            self._counters[counter] = self._counters.get(counter, 0) + amount

    def counters(self):
        with self._lock:
            return dict(self._counters)


def cache_key(*parts) -> str:
    """A stable key for any mix of strings, numbers and tensors (hashes tensor bytes, dtype and shape)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().contiguous().cpu()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(repr(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    return load_tensors(data)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def view_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Safetensors bytes read without copying: tensors over `data` (copy them before writing), for megabytes of
    cached keys and values that are copied into a KV cache anyway. Raises ValueError when the bytes are not a
    well-formed safetensors file."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors header")
    (size,) = struct.unpack_from("<Q", data)
    if 8 + size > len(data):
        raise ValueError("header runs past the data")
    layout, base, tensors = _layout(bytes(data[8:8 + size])), 8 + size, {}
    # torch warns that a read-only buffer (bytes) is not writable: these tensors are only read. catch_warnings()
    # changes process-wide state, so it is kept to those buffers (prefix chunks come in writable ones).
    readonly = memoryview(data).readonly
    with warnings.catch_warnings() if readonly else contextlib.nullcontext():
        if readonly:
            warnings.simplefilter("ignore", UserWarning)
        for name, dtype, shape, start, end in layout:
            if end > len(data) - base:
                raise ValueError(f"tensor {name!r} runs past the data")
            tensors[name] = (torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize,
                                              offset=base + start) if end > start
                             else torch.empty(0, dtype=dtype)).view(shape)
    return tensors


@functools.lru_cache(maxsize=256)
def _layout(header: bytes) -> tuple:
    """(name, dtype, shape, start, end) of each tensor in a safetensors header. Cached: a model's full prefix
    chunks all have the same header, and parsing it was most of the time of reading one."""
    try:
        entries = json.loads(header)
        layout = []
        for name, info in entries.items():
            if name == "__metadata__":
                continue
            dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            if not 0 <= start <= end or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r} does not match its data")
            layout.append((name, dtype, shape, start, end))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed safetensors header: {exc!r}") from exc
    return tuple(layout)


class AttentionCache:
    """LRU of attention computations with CACHE_SIZE entries and hit/miss/eviction counters."""

    def __init__(self, capacity: int = 1000, storage: CacheStorage | None = None, enabled: bool = True):
        self.storage = storage if storage is not None else MemoryLRUStorage(capacity)
        self.enabled = enabled

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if not self.enabled:
            return None
        data = self.storage.get(key)
        if data is not None:
            try:
                tensors = decode_tensors(data)
            except Exception:  # a damaged entry is a miss, never an error
                self.storage.delete(key)
                data = None
        self.storage.incr("hits" if data is not None else "misses")
        return tensors if data is not None else None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        evicted = self.storage.put(key, encode_tensors(tensors))
        if evicted:
            self.storage.incr("evictions", evicted)

    def clear(self) -> None:
        self.storage.clear()

    def stats(self) -> dict:
        counters = self.storage.counters()
        hits, misses = counters.get("hits", 0), counters.get("misses", 0)
        return {
            "enabled": self.enabled,
            "entries": len(self.storage),
            "hits": hits,
            "misses": misses,
            "evictions": counters.get("evictions", 0),
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        }
