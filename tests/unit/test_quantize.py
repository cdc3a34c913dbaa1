"""int8 weights: layers match float ones closely, a trained model's held-out perplexity barely moves."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from pioneer_model import PRESETS, ModelConfig
from pioneer_model.checkpoint import load_tokenizer
from pioneer_model.data import ChatDataset, load_chatterbot_pairs, split_held_out
from pioneer_model.quantize import Int8Linear, kernel_works, quantize_int8
from pioneer_model.train import evaluate, train
from worker.engine import LocalEngine, resolve_precision

MAX_PERPLEXITY_LOSS = 0.05  # relative


@pytest.mark.parametrize("kernel", ["dequant", "dynamic", "int8mm"])
def test_int8_linear_is_close_to_the_float_layer(kernel):
    assert kernel_works(kernel, "cpu", torch.float32)
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    layer = Int8Linear(linear.weight, linear.bias, kernel)
    x = torch.randn(3, 5, 128)
    expected, got = linear(x), layer(x)
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 0.02


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """The tiny preset trained briefly on part of the ChatterBot corpus, and its held-out split."""
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = load_chatterbot_pairs()[:600]
    config = ModelConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **PRESETS["tiny"])
    out = tmp_path_factory.mktemp("trained") / "tiny"
    train(config, pairs, tokenizer, out, steps=60, batch_size=16, held_out_fraction=0.1, progress=False,
          num_threads=1)
    held = ChatDataset(split_held_out(pairs, 0.1, 0)[1], tokenizer, max_length=config.sequence_length - 1)
    return out, held


def test_int8_held_out_perplexity_within_bound(trained):
    path, held = trained
    model = LocalEngine.load(path, precision="fp32").model
    base = math.exp(evaluate(model, held, 32, torch.device("cpu")))
    assert base < 0.5 * model.config.vocab_size  # it learned something: the check below means something
    for kernel in ("dynamic", "dequant"):
        quantized = quantize_int8(copy.deepcopy(model), kernel)
        assert isinstance(quantized.decoder.layers[0].ffn.fc1, Int8Linear)
        perplexity = math.exp(evaluate(quantized, held, 32, torch.device("cpu")))
        assert abs(perplexity - base) / base < MAX_PERPLEXITY_LOSS, (kernel, base, perplexity)


def test_int8_engine_generates_and_reports(trained):
    path, _ = trained
    engine = LocalEngine.load(path, precision="int8", max_new_tokens=12)
    try:
        reply = engine.reply([{"role": "user", "content": "hello"}])
        info = engine.info()
        assert reply.token_ids and info["precision"].startswith("int8")
        assert info["model_parameters"] == LocalEngine.load(path, precision="fp32").model.num_parameters()
    finally:
        engine.close()


def test_precision_setting():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError):
        resolve_precision("fp8", "cpu")
