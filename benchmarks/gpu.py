"""Decode speed on whatever device is present: single-stream and batched tokens/s and time to first token.

Prints one JSON object (and writes it to $OUT/gpu.json when OUT is set). Runs in well under 5 minutes on one
H200 with the `base` preset: bf16 on CUDA, fp32 on the CPU. Sections that would overrun --budget-s are skipped.
Usage: python benchmarks/gpu.py [--preset base] [--budget-s 150]
"""

import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pioneer_model import PRESETS, AttentionModel, ModelConfig  # noqa: E402
generation = importlib.import_module("pioneer_model.generate")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device, fn) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="base")
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--sections", default="ttft,single_eager,batched,compiled_reduce_overhead,compiled_default")
    args = parser.parse_args()
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = ModelConfig(vocab_size=32000, **(PRESETS[args.preset] | {"dropout_rate": 0.0}))
    model = AttentionModel(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(10, config.vocab_size, (1, args.prompt_tokens), device=device)
    new = args.new_tokens
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype)[6:],
           "preset": args.preset, "parameters": model.num_parameters(),
           "architecture": "decoder-only" if config.decoder_only else "encoder-decoder",
           "prompt_tokens": args.prompt_tokens, "new_tokens": new, "torch": torch.__version__, "skipped": []}

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def section(name, fn, needs_s):
        if name not in args.sections.split(","):
            return
        if left() < needs_s:
            out["skipped"].append(name)
            return
        try:
            fn()
        except Exception as exc:  # one failing section must not lose the others' figures
            out[name + "_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"

    def generate(ids, n, compile=False):
        return model.generate(ids, max_new_tokens=n, eos_token_id=-1, compile=compile)

    def ttft():
        generate(prompt, 1)
        times = [timed(device, lambda: generate(prompt, 1)) for _ in range(10)]
        out["ttft_ms_p50"] = round(statistics.median(times) * 1000, 3)

    def single_eager():
        generate(prompt, 8)
        seconds = min(timed(device, lambda: generate(prompt, new)) for _ in range(2))
        out["single_stream_eager_tokens_per_s"] = round(new / seconds, 1)

    def batched():
        rates = {}
        for batch in (16, 64, 256, 1024):
            if left() < 15:
                out["skipped"].append(f"batch_{batch}")
                break
            ids = prompt.expand(batch, -1).contiguous()
            generate(ids, 4)
            seconds = timed(device, lambda: generate(ids, 128))
            rates[batch] = round(batch * 128 / seconds, 1)
        out["batched_eager_tokens_per_s"] = rates
        out["aggregate_tokens_per_s_best"] = max(rates.values()) if rates else None

    def single_compiled(mode):
        def run():
            step = functools.cache(lambda: torch.compile(generation.decode_step, mode=mode, dynamic=False))
            original = generation.compiled_decode_step
            generation.compiled_decode_step = step
            try:
                compile_s = timed(device, lambda: generate(prompt, 16, compile=True))
                generate(prompt, 16, compile=True)
                seconds = min(timed(device, lambda: generate(prompt, new, compile=True)) for _ in range(2))
            finally:
                generation.compiled_decode_step = original
            key = "default" if mode is None else mode.replace("-", "_")
            out[f"single_stream_compiled_{key}_tokens_per_s"] = round(new / seconds, 1)
            out[f"compile_{key}_s"] = round(compile_s, 1)
        return run

    section("ttft", ttft, 10)
    section("single_eager", single_eager, 10)
    section("batched", batched, 20)
    if device == "cuda":
        section("compiled_reduce_overhead", single_compiled("reduce-overhead"), 60)
        section("compiled_default", single_compiled(None), 50)
    best = max([v for k, v in out.items() if k.startswith("single_stream_") and isinstance(v, float)], default=None)
    out["single_stream_tokens_per_s_best"] = best
    out["goals"] = {"single_stream_tokens_per_s": 5000, "aggregate_tokens_per_s": 100000}
    out["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(text)


if __name__ == "__main__":
    main()
