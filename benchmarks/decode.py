"""Batch-1 greedy decoding on CPU: AttentionModel against Hugging Face GPT-2 of the same size, side by side.

Both models get the same random weights (the GPT-2 directory is loaded with AttentionModel.from_pretrained),
so their greedy tokens must agree. Pioneer's figure is its fast path, generate(compile=True): one compiled
step over fixed-shape caches, whose one-row projections inductor turns into bandwidth-bound loops; the eager
path is printed beside it. Prints one JSON object with median tokens/s of each, the ratios, the machine's
streaming bandwidth and the token rate that bandwidth allows.
Usage: python benchmarks/decode.py [--new-tokens 128] [--repeats 7] [--native] [--threads N]
Decoding streams every weight once per token, so it is bound by memory bandwidth; on a shared machine, two
OpenMP threads that spin-wait for a busy core can be several times slower than one (OMP_WAIT_POLICY=PASSIVE helps).
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from pioneer_model import AttentionModel, ModelConfig


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bandwidth(model, repeats):
    """GB/s of reading a tensor as large as all the model's weights (the machine's streaming limit), and of
    BLAS vector-matrix products over the model's own weight matrices in order (the eager decoding step)."""
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model.tok_emb.weight]
    total = sum(w.numel() for w in mats)
    big = torch.randn(total)
    big_gbs = big.numel() * 4 / median_ms(big.sum, repeats) / 1e6
    vectors = [torch.randn(1, w.size(1)) for w in mats]
    model_gbs = total * 4 / median_ms(lambda: [F.linear(v, w) for v, w in zip(vectors, mats)], repeats) / 1e6
    return big_gbs, model_gbs


def bytes_per_token(model, context):
    """Weights read per decoding step (every parameter once, the position table only a row) plus the KV cache."""
    c = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pos."))
    kv = 2 * c.num_decoder_layers * c.embedding_dim * context
    return 4 * (params + kv)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--native", action="store_true", help="also time Pioneer's own default layout "
                        "(sinusoidal positions, exact GELU) with the same sizes")
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 2)  # other processes on the machine skew every timing
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.dim, n_head=args.heads,
                                        vocab_size=args.vocab, n_positions=1024, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = AttentionModel.from_pretrained(directory)
    prompt = torch.randint(1, args.vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    no_eos = -1  # run every generation to its full length

    def run_ours(model=ours, compile=False):
        return model.generate(prompt, max_new_tokens=n, eos_token_id=no_eos, compile=compile)

    def run_hf():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=0)

    start = time.perf_counter()
    compiled_tokens = run_ours(compile=True)
    compile_s = time.perf_counter() - start
    eager_tokens = run_ours()
    same_tokens = torch.equal(compiled_tokens[0, -n:], run_hf()[0, -n:])
    contenders = {"pioneer": lambda: run_ours(compile=True), "eager": run_ours, "hf": run_hf}
    if args.native:
        torch.manual_seed(0)
        native = AttentionModel(ModelConfig(vocab_size=args.vocab, embedding_dim=args.dim, attention_heads=args.heads,
                                            num_encoder_layers=0, num_decoder_layers=args.layers,
                                            dropout_rate=0.0)).eval()
        contenders["native"] = lambda: run_ours(native, compile=True)
    for fn in contenders.values():
        fn()
    samples = {name: [] for name in contenders}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(n / (time.perf_counter() - start))
    rate = {name: statistics.median(s) for name, s in samples.items()}

    with torch.inference_mode():
        big_gbs, model_gbs = bandwidth(ours, max(5, args.repeats))
    per_token = bytes_per_token(ours, args.prompt_tokens + n // 2)
    result = {
        "benchmark": "decode",
        "tokens_per_s": round(rate["pioneer"], 1),
        "hf_tokens_per_s": round(rate["hf"], 1),
        "ratio_vs_hf": round(rate["pioneer"] / rate["hf"], 2),
        "paired_ratio_vs_hf": round(statistics.median(a / b for a, b in zip(samples["pioneer"], samples["hf"])), 2),
        "same_tokens_as_hf": same_tokens,
        "eager_tokens_per_s": round(rate["eager"], 1),
        "eager_ratio_vs_hf": round(rate["eager"] / rate["hf"], 2),
        "eager_same_tokens_as_compiled": torch.equal(eager_tokens, compiled_tokens),
        "compile_and_first_run_s": round(compile_s, 1),
        "bandwidth_gb_s": round(big_gbs, 1),
        "model_weights_bandwidth_gb_s": round(model_gbs, 1),
        "mb_per_token": round(per_token / 1e6, 1),
        "bandwidth_limit_tokens_per_s": round(big_gbs * 1e9 / per_token, 1),
        "model_weights_limit_tokens_per_s": round(model_gbs * 1e9 / per_token, 1),
        "settings": {"layers": args.layers, "dim": args.dim, "heads": args.heads, "vocab": args.vocab,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": n, "batch": 1, "dtype": "float32",
                     "greedy": True, "repeats": args.repeats, "statistic": "median", "torch": torch.__version__,
                     "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "machine": platform.machine(),
                     "parameters": ours.num_parameters(),
                     "loadavg_1min_before_after": [load_before, round(os.getloadavg()[0], 2)]},
    }
    if args.native:
        result["native_layout_tokens_per_s"] = round(rate["native"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
