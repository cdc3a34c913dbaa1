"""A Hugging Face GPT-2 directory loads into AttentionModel with the same logits and the same greedy tokens."""

import json
import sys

import pytest
import torch
import transformers

from pioneer_model import AttentionModel, CheckpointError, load_pretrained
from pioneer_model.tokenizer import Tokenizer as ProjectTokenizer


EOS = 999


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
                                     bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.2)  # varied greedy output
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)  # model.safetensors + config.json
    return directory, model


@pytest.fixture(scope="module")
def ours(gpt2_dir):
    return AttentionModel.from_pretrained(gpt2_dir[0])


def prompt(batch, length, seed=0):
    return torch.randint(0, EOS, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_is_mapped(gpt2_dir, ours):
    c = ours.config
    assert (c.vocab_size, c.embedding_dim, c.attention_heads, c.num_decoder_layers, c.sequence_length) == (
        1000, 64, 4, 2, 128)
    assert c.decoder_only and c.positional_encoding_type == "learnable" and c.activation == "gelu_tanh"
    assert c.eos_token_id == EOS and not ours.training


def test_logits_match(gpt2_dir, ours):
    ids = prompt(2, 40)
    with torch.no_grad():
        expected = gpt2_dir[1](ids).logits
    torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)


def test_greedy_generate_matches_hf(gpt2_dir, ours):
    ids = prompt(1, 12, seed=1)
    expected = gpt2_dir[1].generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=EOS)
    out = ours.generate(ids, max_new_tokens=24)
    assert torch.equal(out, expected)
    assert out.shape == (1, 36) and len(set(out[0, 12:].tolist())) > 8


def test_left_padded_batch_matches_hf(gpt2_dir, ours):
    ids = prompt(2, 10, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = EOS, 0
    expected = gpt2_dir[1].generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=EOS)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, attention_mask=mask), expected)


def test_tokenizer_json_is_optional(gpt2_dir, tmp_path):
    assert load_pretrained(gpt2_dir[0])[1] is None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())  # GPT-2 style: byte-level BPE whose only special token is <|endoftext|>
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["hello world, hello there"] * 10, trainer=trainer)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((gpt2_dir[0] / name).read_bytes())
    backend.save(str(tmp_path / "tokenizer.json"))
    model, tokenizer = load_pretrained(tmp_path)
    assert isinstance(tokenizer, ProjectTokenizer)
    assert tokenizer.eos_id == tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert isinstance(model, AttentionModel)


def test_unsupported_gpt2_variants_are_refused(gpt2_dir, tmp_path):
    config = json.loads((gpt2_dir[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((gpt2_dir[0] / "model.safetensors").read_bytes())
    for change in ({"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False},
                   {"tie_word_embeddings": False}):
        (tmp_path / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(CheckpointError, match=next(iter(change))):
            load_pretrained(tmp_path)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
