"""Save and load checkpoints (config.json, model.safetensors, tokenizer.json), including GPT-2 directories."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import AttentionModel, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with a message naming the file."""


def save_pretrained(model: AttentionModel, directory, tokenizer=None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() | {"model_type": "pioneer"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))


def read_config(directory) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {directory}: {path.name} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def load_pretrained(directory, device=None, dtype=None):
    """Returns (model in eval mode, tokenizer or None)."""
    directory = Path(directory)
    raw = read_config(directory)
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"no weights in {directory}: model.safetensors is missing")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"cannot read {weights}: {exc}") from None

    if raw.get("model_type") == "gpt2":
        config, state = gpt2_to_pioneer(raw, state)
    else:
        config = ModelConfig.from_dict({**raw, "pre_trained_embeddings": None})
    model = AttentionModel(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{weights} does not match config.json: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config.json: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(directory)


def load_tokenizer(directory):
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_file(str(path))


def gpt2_to_pioneer(raw: dict, state: dict[str, torch.Tensor]):
    """Map a Hugging Face GPT-2 config and state dict onto AttentionModel's layout."""
    unsupported = {"scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False, "tie_word_embeddings": False,
                   "add_cross_attention": True}
    for key, value in unsupported.items():
        if raw.get(key, not value) == value:
            raise CheckpointError(f"GPT-2 checkpoints with {key}={value} are not supported")
    config = ModelConfig(
        vocab_size=raw["vocab_size"],
        attention_heads=raw["n_head"],
        embedding_dim=raw["n_embd"],
        sequence_length=raw["n_positions"],
        dropout_rate=raw.get("resid_pdrop", 0.1),
        num_encoder_layers=0,
        num_decoder_layers=raw["n_layer"],
        positional_encoding_type="learnable",
        ffn_dim=raw.get("n_inner") or 4 * raw["n_embd"],
        activation={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                    "relu": "relu"}.get(raw.get("activation_function", "gelu_new"), "gelu_tanh"),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        scale_embeddings=False,
        pad_token_id=raw.get("pad_token_id") or raw.get("eos_token_id", 50256),
        bos_token_id=raw.get("bos_token_id", 50256),
        eos_token_id=raw.get("eos_token_id", 50256),
        name=raw.get("_name_or_path") or "gpt2",
    )
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    out = {"tok_emb.embedding.weight": state["wte.weight"], "pos.embedding.weight": state["wpe.weight"],
           "decoder.norm.weight": state["ln_f.weight"], "decoder.norm.bias": state["ln_f.bias"]}
    conv1d = {"attn.c_attn": "self_attn.in_proj", "attn.c_proj": "self_attn.out_proj",
              "mlp.c_fc": "ffn.fc1", "mlp.c_proj": "ffn.fc2"}
    norms = {"ln_1": "norm1", "ln_2": "norm2"}
    for i in range(config.num_decoder_layers):
        for src, dst in conv1d.items():
            out[f"decoder.layers.{i}.{dst}.weight"] = state[f"h.{i}.{src}.weight"].t().contiguous()
            out[f"decoder.layers.{i}.{dst}.bias"] = state[f"h.{i}.{src}.bias"]
        for src, dst in norms.items():
            for part in ("weight", "bias"):
                out[f"decoder.layers.{i}.{dst}.{part}"] = state[f"h.{i}.{src}.{part}"]
    return config, out
