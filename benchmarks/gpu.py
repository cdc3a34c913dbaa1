"""Decode speed on whatever device is present: single-stream and batched tokens/s and time to first token.

On CUDA also: greedy decoding replayed from CUDA graphs (compiled and not), cuDNN attention's cost in eager
decoding, and the kernels of one eager step. Prints one JSON object (and writes it to $OUT/gpu.json when OUT is
set). Runs in under 5 minutes on one H200 with the `base` preset: bf16 on CUDA, fp32 on the CPU. Sections that
would overrun --budget-s are skipped.
Usage: python benchmarks/gpu.py [--preset base] [--budget-s 240]
"""

import argparse
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
from pioneer_model import graphs  # noqa: E402
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
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--sections", default=None, help="comma-separated; default: all of them on CUDA, "
                        "ttft,single_eager,batched elsewhere (the others run anywhere, but measure CUDA's ways)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sections = (args.sections or ("ttft,single_eager,cudnn_attention,batched,single_graphed,single_graphed_uncompiled,"
                                  "batched_graphed,kernels" if device == "cuda" else "ttft,single_eager,batched"))
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
    if device == "cuda":
        out["cudnn_attention_enabled_at_start"] = torch.backends.cuda.cudnn_sdp_enabled()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def section(name, fn, needs_s):
        if name not in sections.split(","):
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

    def rate(ids, n, compile=False, repeats=2) -> float:
        """Tokens/s of the best of `repeats` timed runs, after one untimed run (compilation, capture)."""
        generate(ids, n, compile)
        seconds = min(timed(device, lambda: generate(ids, n, compile)) for _ in range(repeats))
        return round(ids.size(0) * n / seconds, 1)

    def ttft():
        generate(prompt, 1)
        times = [timed(device, lambda: generate(prompt, 1)) for _ in range(10)]
        out["ttft_ms_p50"] = round(statistics.median(times) * 1000, 3)

    def single_eager():
        out["single_stream_eager_tokens_per_s"] = rate(prompt, new)

    def cudnn_attention():
        """Why eager decoding avoids cuDNN's attention: ms per step at batch 64 with it allowed, and without."""
        ids, steps, allowed = prompt.expand(64, -1).contiguous(), 16, {}
        original = generation.avoid_cudnn_attention
        try:
            generation.avoid_cudnn_attention = lambda device: None
            for enabled in (True, False):
                torch.backends.cuda.enable_cudnn_sdp(enabled)
                generate(ids, 2)
                allowed[str(enabled).lower()] = round(timed(device, lambda: generate(ids, steps)) / steps * 1e3, 3)
        finally:
            generation.avoid_cudnn_attention = original
            torch.backends.cuda.enable_cudnn_sdp(False)
        out["eager_step_ms_batch_64_by_cudnn_attention"] = allowed

    def batched():
        rates = {}
        for batch in (16, 64, 256, 1024):
            if left() < 15:
                out["skipped"].append(f"batch_{batch}")
                break
            rates[batch] = rate(prompt.expand(batch, -1).contiguous(), 128, repeats=1)
        out["batched_eager_tokens_per_s"] = rates

    def single_graphed():
        compile_s = timed(device, lambda: generate(prompt, 16, compile=True))
        out["single_stream_graphed_tokens_per_s"] = rate(prompt, new, compile=True)
        out["compile_s"] = round(compile_s, 1)

    def single_graphed_uncompiled():
        """The same CUDA graph over the eager kernels: what compiling adds."""
        original = generation.compiled_decode_step
        generation.compiled_decode_step = lambda: generation.decode_step
        try:
            out["single_stream_graphed_uncompiled_tokens_per_s"] = rate(prompt, new, compile=True)
        finally:
            generation.compiled_decode_step = original

    def batched_graphed():
        rates = {}
        for batch in (64, 256, 1024):
            if left() < 30:
                out["skipped"].append(f"graphed_batch_{batch}")
                break
            rates[batch] = rate(prompt.expand(batch, -1).contiguous(), 128, compile=True, repeats=1)
        out["batched_graphed_tokens_per_s"] = rates

    def kernels():
        """GPU kernels of one eager decoding step at batch 1 (17 tokens' less 1 token's): how many, and which take
        the time."""
        from torch.profiler import ProfilerActivity, profile

        def cuda_events(n):
            generate(prompt, n)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                generate(prompt, n)
                sync(device)
            return {e.key: e for e in prof.key_averages() if e.device_type.name == "CUDA"}

        one, many = cuda_events(1), cuda_events(17)
        per_step = {key: ((e.count - (one[key].count if key in one else 0)) / 16,
                          (e.device_time_total - (one[key].device_time_total if key in one else 0)) / 16)
                    for key, e in many.items()}
        out["eager_kernels_per_step"] = round(sum(count for count, _ in per_step.values()), 1)
        out["eager_gpu_us_per_step"] = round(sum(us for _, us in per_step.values()), 1)
        top = sorted(per_step.items(), key=lambda item: -item[1][1])[:8]
        out["eager_top_kernels_us_per_step"] = {key[:80]: round(us, 1) for key, (_, us) in top}

    section("ttft", ttft, 10)
    section("single_eager", single_eager, 10)
    section("cudnn_attention", cudnn_attention, 20)
    section("batched", batched, 20)
    section("single_graphed", single_graphed, 40)
    section("single_graphed_uncompiled", single_graphed_uncompiled, 15)
    section("batched_graphed", batched_graphed, 40)
    section("kernels", kernels, 10)
    singles = [v for k, v in out.items() if k.startswith("single_stream_") and isinstance(v, float)]
    aggregates = [v for k in ("batched_eager_tokens_per_s", "batched_graphed_tokens_per_s")
                  for v in out.get(k, {}).values()]
    out["cuda_graphs"] = dict(graphs.stats)  # captured, or failed and decoded without one
    out["single_stream_tokens_per_s_best"] = max(singles, default=None)
    out["aggregate_tokens_per_s_best"] = max(aggregates, default=None)
    out["goals"] = {"single_stream_tokens_per_s": 5000, "aggregate_tokens_per_s": 100000}
    out["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(text)


if __name__ == "__main__":
    main()
