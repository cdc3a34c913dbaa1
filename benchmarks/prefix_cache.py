"""Prefix reuse across workers: time to first token of a conversation's 10th turn (~900-token prompt) with the
cached keys/values of its prefix fetched from the real Redis, against recomputing the whole prompt. Turns 1-9
are answered by another process (the writer), so every chunk the reader reuses crossed processes through Redis.
Random decoder-only model with 1024 positions (`small` preset, or `base`). Prints one JSON object.
Usage: python benchmarks/prefix_cache.py [--preset small|base] [--repeats 9] [--redis URL] [--threads N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_checkpoint, median  # noqa: E402  (first: it sets up torch as a worker process does)

import torch  # noqa: E402

from pioneer_model import AttentionCache  # noqa: E402
from worker.engine import LocalEngine  # noqa: E402
from worker.redis_cache import RedisLRUStorage  # noqa: E402

TURNS = 10
REPLY_TOKENS = 24
TOPICS = ["robots", "the sea", "music", "old castles", "rainy days", "chess", "gardens", "trains", "the moon",
          "bread"]


def user_message(turn: int) -> str:
    if turn == TURNS - 1:  # the measured turn: a short follow-up, as chat users type
        return f"Thanks! And what about {TOPICS[turn]}?"
    return f"Turn {turn}: tell me everything you know about {TOPICS[turn]}, " + "and then some more, " * 11


def engine_for(model_dir, redis_url, namespace, policy="on") -> LocalEngine:
    storage = RedisLRUStorage(redis_url, namespace=namespace, capacity=100_000)
    return LocalEngine.load(model_dir, cache=AttentionCache(storage=storage), max_new_tokens=REPLY_TOKENS,
                            prefix_cache=policy)


def write_turns(model_dir, redis_url, namespace) -> dict:
    """The writer process: answer turns 1-9 (each prompt's chunks go to Redis), return the conversation."""
    engine = engine_for(model_dir, redis_url, namespace)
    messages = []
    for turn in range(TURNS - 1):
        messages.append({"role": "user", "content": user_message(turn)})
        messages.append({"role": "assistant", "content": engine.reply(messages).text})
    engine.flush()
    engine.close()
    return {"messages": messages, "pid": os.getpid(), "chunks_written": engine.prefix.stats["chunks_written"]}


def first_token_ms(engine: LocalEngine, ids) -> tuple[float, int]:
    """Time to first token of a request that finds the engine idle: the last request's row has left the batch
    (stopped after its first token, it would otherwise decode one more step while this one is looked up)."""
    while engine.scheduler.snapshot()["active"]:
        time.sleep(0.0002)
    started = time.perf_counter()
    gen = engine.generate(ids, REPLY_TOKENS)
    token, _ = next(gen)
    elapsed = (time.perf_counter() - started) * 1e3
    gen.close()
    return elapsed, token


@contextmanager
def recomputing(engine: LocalEngine):
    """The same engine without its prefix cache: it prefills the whole prompt and writes nothing. One engine (one
    scheduler thread) for both measurements, as a worker process has."""
    engine.scheduler.call(lambda: None)  # the scheduler is past the last request's first-token bookkeeping
    engine.flush()
    prefix, engine.prefix = engine.prefix, None
    try:
        yield engine
    finally:
        engine.prefix = prefix


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--redis", default=os.environ.get("PIONEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--preset", default="small", choices=["small", "base"],
                        help="random model: small, or base (512 dims, 6 decoder layers); 1024 positions")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--write", metavar="NAMESPACE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / f"pioneer-bench-{args.preset}-1k")
    # The whole conversation goes into each prompt (the small preset's own default reads no history).
    make_checkpoint(model_dir, args.preset, sequence_length=1024, num_encoder_layers=0, max_history_messages=None)
    if args.write:
        print(json.dumps(write_turns(model_dir, args.redis, args.write)))
        return

    load_before = round(os.getloadavg()[0], 2)
    namespace = f"bench-prefix-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, __file__, "--write", namespace, "--model-dir", str(model_dir), "--redis", args.redis,
               "--preset", args.preset]
    writer = json.loads(subprocess.run(command + (["--threads", str(args.threads)] if args.threads else []),
                                       capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    reuse = engine_for(model_dir, args.redis, namespace)
    messages = writer["messages"] + [{"role": "user", "content": user_message(TURNS - 1)}]
    ids = reuse.prompt_ids(messages)
    assert len(ids) <= reuse.model.config.sequence_length - REPLY_TOKENS, "the prompt would be cut: shorten it"
    storage = reuse.prefix.storage
    left_by_writer = {name: storage.get(name) for name in reuse.prefix.entry_names(ids)}  # data before marker

    def forget_own_writes():  # keep the cache as the writer left it: every repeat reuses turns 1-9 only
        reuse.flush()
        for name, value in left_by_writer.items():
            if value is None:
                storage.delete(name)
            else:
                storage.put(name, value)

    first_token_ms(reuse, ids)  # warm up
    with recomputing(reuse):
        first_token_ms(reuse, ids)
    forget_own_writes()
    before = reuse.stats.reused_tokens
    first_token_ms(reuse, ids)
    reused = reuse.stats.reused_tokens - before
    forget_own_writes()
    samples = {"reuse": [], "cold": []}
    first_tokens = set()
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        ms, token = first_token_ms(reuse, ids)
        samples["reuse"].append(ms)
        first_tokens.add(token)
        forget_own_writes()
        with recomputing(reuse):
            ms, token = first_token_ms(reuse, ids)
        samples["cold"].append(ms)
        first_tokens.add(token)
    with recomputing(reuse):
        cold_tokens = [t for t, _ in reuse.generate(ids, REPLY_TOKENS)]
    same = [t for t, _ in reuse.generate(ids, REPLY_TOKENS)] == cold_tokens
    forget_own_writes()
    measured = reuse.measure_prefix_cache()
    result = {
        "benchmark": "prefix_cache",
        "ttft_ms_with_reuse": round(median(samples["reuse"]), 1),
        "ttft_ms_without_reuse": round(median(samples["cold"]), 1),
        "speedup": round(median([c / r for c, r in zip(samples["cold"], samples["reuse"])]), 2),
        "goal_5x": median([c / r for c, r in zip(samples["cold"], samples["reuse"])]) >= 5.0,
        "same_tokens": same and len(first_tokens) == 1,
        "prompt_tokens": len(ids),
        "reused_tokens": reused,
        "chunk_tokens": reuse.prefix.chunk_tokens,
        "chunks_written_by_other_process": writer["chunks_written"],
        "writer_pid": writer["pid"], "reader_pid": os.getpid(),
        "auto_decision": measured,
        "settings": {"model": f"{args.preset} (random, decoder-only), SEQUENCE_LENGTH 1024",
                     "parameters": reuse.model.num_parameters(),
                     "cache": "real Redis", "repeats": args.repeats, "statistic": "median",
                     "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                     "load_average_before": load_before, "load_average_after": round(os.getloadavg()[0], 2)},
    }
    reuse.prefix.storage.clear()
    reuse.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
