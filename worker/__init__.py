"""The worker: the Celery app and processes that host the model, the orchestrator and the shared caches."""

import os

# How long OpenMP threads spin for work before they sleep; libgomp reads it once, when torch loads it. Its
# default (300,000 spins, milliseconds) kept a core busy after every model step, away from the threads that hand
# tokens on: first-chunk p99 45-52 ms against 20-22 ms at 20,000 (benchmarks/pipeline.py, 2 cores).
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
