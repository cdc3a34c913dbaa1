"""Continuous batching on the CPU: aggregate tokens/s of 1, 4, 8 and 16 concurrent requests through the engine,
against the same requests one after another (stream_generate, the engine's former path, on the engine's thread so
that the process keeps one OpenMP team for both) and against one thread per request each decoding alone (the
former engine under a threads pool), interleaved; p50 time to first token;
peak resident memory of a process serving 16 concurrent requests. Random `small` model; the baselines run the
same model (same MODEL_PRECISION). Prints one JSON object.
Usage: python benchmarks/batching.py [--new-tokens 64] [--repeats 3] [--threads N] [--precision auto|fp32|bf16|int8]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_checkpoint, median  # noqa: E402  (first: it sets up torch as a worker process does)

import torch  # noqa: E402

from pioneer_model import stream_generate  # noqa: E402
from worker.engine import LocalEngine  # noqa: E402

LEVELS = (1, 4, 8, 16)


def prompts(engine: LocalEngine, n: int) -> list[list[int]]:
    topics = ["the weather", "music", "robots", "history", "cooking", "space", "football", "painting"]
    return [engine.prompt_ids([{"role": "user", "content": f"tell me about {topics[i % 8]} ({i}) " * (1 + i % 3)}])
            for i in range(n)]


def batched(engine: LocalEngine, batch: list[list[int]], new_tokens: int) -> dict:
    """All requests at once, each on its own thread (as the Celery threads pool calls the engine)."""
    first, counts = [0.0] * len(batch), [0] * len(batch)

    def run(i):
        started = time.perf_counter()
        for n, _ in enumerate(engine.generate(batch[i], new_tokens), 1):
            if n == 1:
                first[i] = time.perf_counter() - started
            counts[i] = n

    return timed_threads(run, len(batch), counts, first)


def one_thread_each(engine: LocalEngine, batch, new_tokens) -> dict:
    """The former engine: every thread runs its own batch-1 generation concurrently."""
    first, counts = [0.0] * len(batch), [0] * len(batch)

    def run(i):
        started = time.perf_counter()
        for n, _ in enumerate(stream_generate(engine.model, batch[i], new_tokens, eos_token_id=-1), 1):
            if n == 1:
                first[i] = time.perf_counter() - started
            counts[i] = n

    return timed_threads(run, len(batch), counts, first)


def timed_threads(run, n, counts, first) -> dict:
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": sum(counts) / seconds, "ttft_ms": median(first) * 1e3, "tokens": sum(counts)}


def sequential(engine: LocalEngine, batch, new_tokens) -> dict:
    """One request after another (stream_generate), on the engine's scheduler thread between its steps: the
    process keeps one OpenMP team, as a worker does, for the baseline too."""
    return engine.scheduler.call(one_after_another, engine, batch, new_tokens)


def one_after_another(engine: LocalEngine, batch, new_tokens) -> dict:
    started, tokens, first = time.perf_counter(), 0, []
    for ids in batch:
        for n, _ in enumerate(stream_generate(engine.model, ids, new_tokens, eos_token_id=-1), 1):
            if n == 1:
                first.append(time.perf_counter() - started)  # all arrived at once: it waits for those before it
            tokens += 1
    return {"tokens_per_s": tokens / (time.perf_counter() - started), "ttft_ms": median(first) * 1e3,
            "tokens": tokens}


def peak_rss_mb() -> float:
    """Peak resident set of this process (VmHWM from /proc, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve_16(model_dir: str, new_tokens: int, precision: str) -> dict:
    """Child process: load the engine, serve 16 concurrent requests, report peak memory."""
    engine = LocalEngine.load(model_dir, max_new_tokens=new_tokens, precision=precision)
    batch = prompts(engine, 16)
    engine.tokenizer.eos_id = -1
    loaded = peak_rss_mb()
    batched(engine, batch, new_tokens)
    info = engine.info()["batching"]
    engine.close()
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_load_mb": round(loaded, 1),
            "kv_cache_mb": info["kv_cache_mb"], "peak_batch": info["peak_batch"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--serve-16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / "pioneer-bench-small")
    make_checkpoint(model_dir, "small")
    if args.serve_16:
        print(json.dumps(serve_16(str(model_dir), args.new_tokens, args.precision)))
        return

    load_before = round(os.getloadavg()[0], 2)
    engine = LocalEngine.load(model_dir, max_new_tokens=args.new_tokens, precision=args.precision)
    all_prompts = prompts(engine, max(LEVELS))
    engine.tokenizer.eos_id = -1  # every reply runs to --new-tokens, as in the baselines
    batched(engine, all_prompts[:4], 4)  # warm up
    ways = {"batched": batched, "sequential": sequential, "thread_per_request": one_thread_each}
    samples = {level: {way: [] for way in ways} for level in LEVELS}
    for _ in range(args.repeats):
        for level in LEVELS:
            for way, fn in ways.items():  # interleaved: machine noise hits all alike
                samples[level][way].append(fn(engine, all_prompts[:level], args.new_tokens))
    result = {"benchmark": "batching", "levels": {}}
    for level in LEVELS:
        row = {way: {k: round(median([s[k] for s in samples[level][way]]), 1) for k in ("tokens_per_s", "ttft_ms")}
               for way in ways}
        row["speedup_vs_sequential"] = round(median(
            [b["tokens_per_s"] / s["tokens_per_s"] for b, s in zip(samples[level]["batched"],
                                                                      samples[level]["sequential"])]), 2)
        row["speedup_vs_thread_per_request"] = round(median(
            [b["tokens_per_s"] / s["tokens_per_s"] for b, s in zip(samples[level]["batched"],
                                                                      samples[level]["thread_per_request"])]), 2)
        result["levels"][str(level)] = row
    result["goal_4x_at_8"] = result["levels"]["8"]["speedup_vs_sequential"] >= 4.0
    engine.close()
    command = [sys.executable, __file__, "--serve-16", "--model-dir", str(model_dir), "--new-tokens",
               str(args.new_tokens), "--precision", args.precision]
    if args.threads:
        command += ["--threads", str(args.threads)]
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    result["memory_serving_16"] = json.loads(child.stdout.strip().splitlines()[-1])
    result["settings"] = {"model": "small (random)", "parameters": engine.model.num_parameters(),
                          "precision": engine.precision,
                          "new_tokens": args.new_tokens, "repeats": args.repeats, "statistic": "median",
                          "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "load_average_before": load_before, "load_average_after": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
