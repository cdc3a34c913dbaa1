"""plot_attention writes a PNG heatmap grid of one layer's heads."""

import struct
import sys

import pytest
import torch

from pioneer_model import AttentionModel, ModelConfig
from pioneer_model.tokenizer import Tokenizer as ProjectTokenizer
from pioneer_model.visualize import plot_attention, token_labels


class WordTokenizer:
    """A stand-in tokenizer: one id per word."""

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}
        self.words = list(words)

    def encode(self, text):
        return [self.vocab[w] for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("encoder_layers, heads", [(0, 4), (1, 3)])
def test_plot_attention_writes_png(tmp_path, encoder_layers, heads):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, attention_heads=heads, embedding_dim=12 * heads, sequence_length=32,
                         num_encoder_layers=encoder_layers, num_decoder_layers=2, dropout_rate=0.1)
    model = AttentionModel(config).train()
    tokenizer = WordTokenizer("the cat sat on a mat and looked at me".split())
    out = plot_attention(model, tokenizer, "the cat sat on the mat", tmp_path / "maps" / "attn.png", layer=-1)
    assert out == tmp_path / "maps" / "attn.png"
    width, height = png_size(out)
    assert 300 <= width <= 4000 and 300 <= height <= 4000
    assert model.training  # restored after plotting in eval mode


def test_plot_attention_rejects_empty_text(tmp_path):
    model = AttentionModel(ModelConfig(vocab_size=20, attention_heads=2, embedding_dim=8, num_encoder_layers=0,
                                       num_decoder_layers=1))
    with pytest.raises(ValueError, match="empty"):
        plot_attention(model, WordTokenizer(["a"]), "", tmp_path / "x.png")


def test_token_labels_show_whitespace():
    tokenizer = WordTokenizer(["a", " b", "\n"])
    assert token_labels(tokenizer, [0, 1, 2]) == ["a", "␣b", "\\n"]


def test_with_the_project_tokenizer(tmp_path):
    tokenizer = ProjectTokenizer.train(["hello world, hello attention"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = AttentionModel(ModelConfig(vocab_size=tokenizer.vocab_size, attention_heads=2, embedding_dim=16,
                                       sequence_length=32, num_encoder_layers=0, num_decoder_layers=1))
    width, height = png_size(plot_attention(model, tokenizer, "hello attention world", tmp_path / "a.png", layer=0))
    assert width >= 300 and height >= 150


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
