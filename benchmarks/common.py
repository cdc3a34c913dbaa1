"""Shared helpers for the benchmarks: medians, percentiles and a small model checkpoint to serve."""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import worker  # noqa: E402,F401  before torch, as in a worker process: it sets OpenMP's spin-wait (GOMP_SPINCOUNT)

import torch  # noqa: E402


def percentile(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def median(values) -> float:
    return statistics.median(values)


def make_checkpoint(path: Path, preset: str = "small", seed: int = 0, **overrides) -> Path:
    """A random model of a preset (with config overrides) and a tokenizer trained on the ChatterBot corpus
    (special tokens muted, so greedy replies run to max_new_tokens). Built on a thread of its own, as the engine
    loads models: the benchmark's main thread keeps no OpenMP team to slow the engine's."""
    from pioneer_model.threads import on_own_thread

    return on_own_thread(_make_checkpoint, path, preset, seed, **overrides)


def _make_checkpoint(path: Path, preset: str, seed: int, **overrides) -> Path:
    from pioneer_model import PRESETS, AttentionModel, ModelConfig
    from pioneer_model.data import load_chatterbot_pairs
    from pioneer_model.tokenizer import Tokenizer

    if (path / "model.safetensors").exists():
        return path
    pairs = load_chatterbot_pairs()
    tokenizer = Tokenizer.train((t for p in pairs for t in (p.prompt, p.reply)), vocab_size=2048)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         **(PRESETS[preset] | {"dropout_rate": 0.0} | overrides))
    model = AttentionModel(config)
    with torch.no_grad():
        model.tok_emb.weight[sorted(tokenizer.special_ids)] = 0.0
    model.save_pretrained(path, tokenizer=tokenizer)
    return path
