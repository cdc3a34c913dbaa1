"""What the queue and the stream add to a reply (enqueue -> first chunk over real Redis and a real worker
process, against the model's own time to first token), and the speed-up of a repeated request from the cache.

Prints one JSON object. Usage: python benchmarks/pipeline.py [--requests 40] [--redis redis://127.0.0.1:6379/0]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_checkpoint, median, percentile  # noqa: E402

from pioneer_model import AttentionCache  # noqa: E402
from worker.engine import LocalEngine  # noqa: E402
from worker.redis_cache import RedisLRUStorage  # noqa: E402
from worker.streams import RedisStreamBus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hello there", "good morning", "how are you today?", "what's your name?", "do you like music?",
           "tell me something nice", "thank you", "what do you do for fun?"]


def model_first_token_ms(engine: LocalEngine, messages, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        gen = engine.stream(messages)
        next(gen)
        times.append((time.perf_counter() - started) * 1000)
        for _ in gen:  # finish the reply, so the next measurement starts on an idle machine
            pass
    return times


async def measure(redis_url: str, engine: LocalEngine, messages, requests: int) -> tuple[list[float], list[float]]:
    """Interleave the model's own time to first token and enqueue -> first chunk through a real worker, so both
    see the same machine load. One dispatcher and stream reader for the run, as a front-end process keeps them.
    Each reply is read to its end before the next request, as the model's own measurement finishes its reply."""
    from worker.dispatch import CeleryDispatcher

    bus, dispatcher = RedisStreamBus(redis_url), CeleryDispatcher(redis_url)
    model_ms, pipeline_ms, split_ms = [], [], []
    try:
        for i in range(requests + 3):  # the first 3 warm up connections and the worker
            model = await asyncio.to_thread(model_first_token_ms, engine, messages, 1)
            request_id = uuid.uuid4().hex
            started, wall = time.perf_counter(), time.time()
            await dispatcher.submit({"request_id": request_id, "mode": "local", "messages": messages,
                                     "enqueued_at": wall})
            first = True
            async for event in bus.read(request_id, timeout_s=60):
                if event.kind == "chunk" and first:
                    first = False
                    if i >= 3:
                        pipeline_ms.append((time.perf_counter() - started) * 1000)
                        model_ms += model
                        # Redis stamps each entry with its clock in ms: submit -> entry is the worker's share
                        written_ms = int(event.stream_id.split("-")[0])
                        split_ms.append((written_ms - wall * 1000, time.time() * 1000 - written_ms))
                if event.kind == "error":
                    raise RuntimeError(event.text)
    finally:
        bus.close()
        await dispatcher.close()
    return model_ms, pipeline_ms, split_ms


def cache_speedup(engine: LocalEngine, redis_url: str, repeats: int) -> dict:
    engine.cache = AttentionCache(storage=RedisLRUStorage(redis_url, namespace=f"bench-{uuid.uuid4().hex[:8]}"))
    cold, warm = [], []
    for prompt in PROMPTS[:repeats]:
        messages = [{"role": "user", "content": prompt}]
        started = time.perf_counter()
        first = engine.reply(messages)
        cold.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        second = engine.reply(messages)
        warm.append((time.perf_counter() - started) * 1000)
        assert second.cached and second.text == first.text
    engine.cache.clear()
    engine.cache = None
    return {"cold_ms_p50": round(median(cold), 2), "hit_ms_p50": round(median(warm), 2),
            "cache_hit_speedup": round(median(cold) / median(warm), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    redis.Redis.from_url(args.redis).ping()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(Path(tmp) / "small")
        env = os.environ | {"REDIS_URL": args.redis, "MODEL_PATH": str(model_dir), "PIONEER_DATA_DIR": tmp,
                            "ATTENTION_CACHE_ENABLED": "false", "MAX_NEW_TOKENS": str(args.max_new_tokens),
                            "LOG_LEVEL": "WARNING"}
        worker = subprocess.Popen([sys.executable, "-m", "bots.cli", "worker", "--concurrency", "4", "--name",
                                   f"bench-{os.getpid()}@%h"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            engine = LocalEngine.load(model_dir, max_new_tokens=args.max_new_tokens)
            messages = [{"role": "system", "content": "You are Pioneer."}, {"role": "user", "content": PROMPTS[0]}]
            client = redis.Redis.from_url(args.redis)
            deadline = time.monotonic() + 120
            while not list(client.scan_iter(match="pioneer:workers:*")) and time.monotonic() < deadline:
                time.sleep(0.2)
            model_ms, pipeline_ms, split_ms = asyncio.run(measure(args.redis, engine, messages, args.requests))
            cache = cache_speedup(engine, args.redis, len(PROMPTS))
        finally:
            worker.terminate()
            worker.wait(30)

    model_p50 = median(model_ms)
    print(json.dumps({
        "requests": args.requests,
        "first_chunk_ms_p50": round(percentile(pipeline_ms, 50), 2),
        "first_chunk_ms_p99": round(percentile(pipeline_ms, 99), 2),
        "model_first_token_ms_p50": round(model_p50, 2),
        "queue_overhead_ms_p50": round(percentile(pipeline_ms, 50) - model_p50, 2),
        "queue_overhead_goal_ms": 5.0,
        "submit_to_chunk_written_ms_p50": round(median([a for a, _ in split_ms]), 1),
        "chunk_written_to_read_ms_p50": round(median([b for _, b in split_ms]), 1),
        **cache,
    }, indent=2))


if __name__ == "__main__":
    main()
