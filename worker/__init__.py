"""The worker: the Celery app and processes that host the model, the orchestrator and the shared caches.

Importing it first sets up the process for serving: OpenMP's spin-wait (before torch loads) and glibc's malloc.
"""

import ctypes
import os
import sys

# How long OpenMP threads spin for work before they sleep; libgomp reads it once, when torch loads it. Its
# default (300,000 spins, milliseconds) kept a core busy after every model step, away from the threads that hand
# tokens on: first-chunk p99 45-52 ms against 20-22 ms at 20,000 (benchmarks/pipeline.py, 2 cores).
os.environ.setdefault("GOMP_SPINCOUNT", "20000")


def _keep_freed_memory_for_reuse() -> None:
    """glibc returns large freed blocks (a prefill's activations, fetched cache chunks: megabytes) to the kernel,
    and the next request faults the pages in again. Kept for reuse instead (blocks under 32 MB come from the heap,
    which is trimmed only past 64 MB free), a 949-token prefill took 69-77 ms against 87-93 (2 cores). Skipped
    where glibc's MALLOC_ variables are set."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


_keep_freed_memory_for_reuse()
