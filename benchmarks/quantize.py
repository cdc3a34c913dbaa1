"""MODEL_PRECISION on the CPU: held-out perplexity on the ChatterBot held-out split (the split the default model's
training kept out) and decoding speed (one request, and a batch of 16, through the batch decoder; a 200-token
prefill) for fp32, int8 (the CPU's int8 GEMM, the engine's choice), int8 weight-only (dequantized on the fly)
and bf16, interleaved. Prints one JSON object.
Usage: python benchmarks/quantize.py [--model-dir DIR (default: the default model, trained if missing)]
"""

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from pioneer_model import AttentionModel
from pioneer_model.batching import BatchDecoder, make_sequence
from pioneer_model.checkpoint import load_tokenizer
from pioneer_model.data import ChatDataset, split_held_out
from pioneer_model.quantize import quantize_int8
from pioneer_model.train import DEFAULT_TRAINING, default_training_pairs, ensure_default_model, evaluate


def step_ms(model, batch: int, steps: int = 16) -> float:
    decoder = BatchDecoder(model, batch)
    for i in range(batch):
        decoder.add(make_sequence(model.config, list(range(10, 50 + i)), steps + 1, eos_token_id=-1))
    started = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    return (time.perf_counter() - started) / steps * 1e3


@torch.inference_mode()
def prefill_ms(model, tokens: int = 200) -> float:
    ids = torch.randint(10, model.config.vocab_size, (1, tokens))
    started = time.perf_counter()
    model.decode(ids, kv_caches=model.new_kv_caches(1, tokens))
    return (time.perf_counter() - started) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--data-dir", default=str(Path.home() / ".local" / "share" / "pioneer"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model_dir) if args.model_dir else ensure_default_model(args.data_dir)
    base = AttentionModel.from_pretrained(path)
    models = {"fp32": base, "int8": quantize_int8(copy.deepcopy(base)),
              "int8_weight_only": quantize_int8(copy.deepcopy(base), "dequant"),
              "bf16": copy.deepcopy(base).to(torch.bfloat16)}

    _, held = split_held_out(default_training_pairs(), DEFAULT_TRAINING["held_out_fraction"], 0)
    dataset = ChatDataset(held, load_tokenizer(path), max_length=base.config.sequence_length - 1,
                          max_history_turns=DEFAULT_TRAINING["max_history_turns"])
    perplexity = {name: math.exp(evaluate(m, dataset, 32, torch.device("cpu"))) for name, m in models.items()}

    load_before = round(os.getloadavg()[0], 2)
    timings = {name: {"decode_1_ms": [], "decode_16_ms": [], "prefill_200_ms": []} for name in models}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        for name, model in models.items():
            timings[name]["decode_1_ms"].append(step_ms(model, 1))
            timings[name]["decode_16_ms"].append(step_ms(model, 16))
            timings[name]["prefill_200_ms"].append(prefill_ms(model))
    result = {"benchmark": "quantize", "held_out_examples": len(dataset), "precisions": {}}
    for name in models:
        row = {"held_out_perplexity": round(perplexity[name], 3),
               "perplexity_change": f"{(perplexity[name] / perplexity['fp32'] - 1) * 100:+.2f}%"}
        for key, samples in timings[name].items():
            row[key] = round(sorted(samples)[len(samples) // 2], 2)
        row["decode_16_tokens_per_s"] = round(16 * 1e3 / row["decode_16_ms"], 1)
        result["precisions"][name] = row
    result["int8_kernel"] = models["int8"].quantization
    result["settings"] = {"model": str(path), "parameters": base.num_parameters(), "repeats": args.repeats,
                          "statistic": "median", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "load_average_before": load_before,
                          "load_average_after": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
