"""Shared helpers for the benchmarks: medians, percentiles and a small model checkpoint to serve."""

import statistics
from pathlib import Path

import torch


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
    (special tokens muted, so greedy replies run to max_new_tokens)."""
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
