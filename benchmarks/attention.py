"""ScaledDotProductAttention (no weights) vs torch's fused F.scaled_dot_product_attention vs naive matmul-softmax.

Prints one JSON object: per-length median milliseconds of each, measured interleaved in one run.
Usage: python benchmarks/attention.py [--repeats 15] [--lengths 128 256 512 1024] [--causal]
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from pioneer_model import ScaledDotProductAttention


def naive(q, k, v, causal):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        t = q.size(-2)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def time_once(fn, inner):
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def bench_length(length, args):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, length, args.d_k) for _ in range(3))
    ours = ScaledDotProductAttention(causal=args.causal).eval()
    impls = {
        "pioneer": lambda: ours(q, k, v),
        "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
        "naive": lambda: naive(q, k, v, args.causal),
    }
    torch.testing.assert_close(impls["pioneer"]()[0], impls["torch_sdpa"](), atol=1e-4, rtol=0)
    torch.testing.assert_close(impls["naive"](), impls["torch_sdpa"](), atol=1e-4, rtol=0)
    inner = max(1, 2048 // length)  # keep each timed sample around a few milliseconds
    for fn in impls.values():
        for _ in range(args.warmup):
            fn()
    samples = {name: [] for name in impls}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all three alike
        for name, fn in impls.items():
            samples[name].append(time_once(fn, inner))
    ms = {name: statistics.median(s) for name, s in samples.items()}
    paired = statistics.median(a / b for a, b in zip(samples["pioneer"], samples["torch_sdpa"]))
    return {f"{name}_ms": round(m, 4) for name, m in ms.items()} | {"ratio_vs_torch_sdpa": round(paired, 3)}


def wrapper_overhead_us(args):
    """Microseconds ScaledDotProductAttention adds per call: timed on inputs so small the kernel is negligible."""
    q = k = v = torch.randn(1, args.heads, 4, args.d_k)
    ours = ScaledDotProductAttention(causal=args.causal).eval()
    pairs = []
    for _ in range(args.repeats):
        a = time_once(lambda: ours(q, k, v), 2000)
        b = time_once(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal), 2000)
        pairs.append((a - b) * 1e3)
    return statistics.median(pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 2)  # other processes on the machine skew every timing
    if args.threads:
        torch.set_num_threads(args.threads)

    with torch.inference_mode():
        per_length = {str(n): bench_length(n, args) for n in args.lengths}
        overhead = wrapper_overhead_us(args)
    longest = per_length[str(max(args.lengths))]
    print(json.dumps({
        "benchmark": "attention",
        "settings": {"batch": 1, "heads": args.heads, "d_k": args.d_k, "dtype": "float32", "causal": args.causal,
                     "repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "machine": platform.machine(),
                     "loadavg_1min_before_after": [load_before, round(os.getloadavg()[0], 2)]},
        "per_length": per_length,
        "ratio_vs_torch_sdpa": longest["ratio_vs_torch_sdpa"],
        "ratio_vs_torch_sdpa_length": max(args.lengths),
        "ratio_of_medians": round(longest["pioneer_ms"] / longest["torch_sdpa_ms"], 3),
        "wrapper_overhead_us": round(overhead, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
