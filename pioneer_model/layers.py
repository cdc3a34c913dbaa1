"""Embeddings, positional encodings, feed-forward blocks and the encoder/decoder stacks."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, Linear, MultiHeadAttention


class TokenEmbedding(nn.Module):
    """Token embeddings, scaled by sqrt(dim) as in "Attention Is All You Need" when `scale` is set."""

    def __init__(self, vocab_size: int, dim: int, scale: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.scale = math.sqrt(dim) if scale else 1.0
        nn.init.normal_(self.embedding.weight, std=dim**-0.5 if scale else 0.02)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        return x * self.scale if self.scale != 1.0 else x

    def load_pretrained(self, path: str, vocab: dict[str, int], freeze: bool = False) -> int:
        """Copy pre-trained vectors onto this vocabulary; returns how many rows were found."""
        from .embeddings import load_pretrained_vectors

        matrix, found = load_pretrained_vectors(path, vocab, self.weight.size(1), self.weight.size(0))
        with torch.no_grad():
            rows = torch.tensor(sorted(found), dtype=torch.long)
            if len(rows):
                self.weight[rows] = matrix[rows].to(self.weight.dtype) / self.scale
        self.weight.requires_grad_(not freeze)
        return len(found)


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: dim // 2])
    return table


class PositionalEncoding(nn.Module):
    """Adds "fixed" (sinusoidal) or "learnable" position vectors to token embeddings."""

    def __init__(self, kind: str, max_len: int, dim: int):
        super().__init__()
        if kind not in ("fixed", "learnable"):
            raise ValueError(f"positional encoding must be 'fixed' or 'learnable', not {kind!r}")
        self.kind, self.max_len = kind, max_len
        if kind == "fixed":
            self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)
        else:
            self.embedding = nn.Embedding(max_len, dim)
            nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """x: (batch, seq, dim). positions: (seq,) or (batch, seq) absolute positions; default start..start+seq."""
        if positions is None:
            if start + x.size(1) > self.max_len:
                raise ValueError(f"sequence of {start + x.size(1)} tokens exceeds SEQUENCE_LENGTH {self.max_len}")
            table = self.table if self.kind == "fixed" else self.embedding.weight
            return x + table[start : start + x.size(1)]
        if self.kind == "fixed":
            return x + self.table[positions]
        return x + self.embedding(positions)


class FeedForward(nn.Module):
    """Position-wise two-layer MLP."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.fc2 = Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        h = self.fc2(h)
        return self.dropout(h) if self.training else h


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + feed-forward block over a whole source sequence."""

    def __init__(self, dim, heads, ffn_dim, dropout=0.0, activation="gelu", eps=1e-5, bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = MultiHeadAttention(dim, heads, dropout, bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation, bias)

    def forward(self, x, padding_mask=None, need_weights=False):
        h, weights = self.self_attn(self.norm1(x), key_padding_mask=padding_mask, need_weights=need_weights)
        x = x + h
        return x + self.ffn(self.norm2(x)), weights


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, optional cross-attention to an encoder, and feed-forward."""

    def __init__(self, dim, heads, ffn_dim, dropout=0.0, activation="gelu", eps=1e-5, bias=True, cross=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = MultiHeadAttention(dim, heads, dropout, bias)
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross else None
        self.cross_attn = MultiHeadAttention(dim, heads, dropout, bias) if cross else None
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation, bias)

    def forward(self, x, *, memory=None, memory_kv=None, memory_padding_mask=None, attn_mask=None,
                kv_cache: KVCache | None = None, need_weights=False):
        h, weights = self.self_attn(self.norm1(x), attn_mask=attn_mask, causal=True, kv_cache=kv_cache,
                                    need_weights=need_weights)
        x = x + h
        if self.cross_attn is not None:
            h, _ = self.cross_attn(self.norm_cross(x), memory, memory_kv=memory_kv,
                                   key_padding_mask=memory_padding_mask)
            x = x + h
        return x + self.ffn(self.norm2(x)), weights


class TransformerEncoder(nn.Module):
    """A stack of encoder layers with a final layer norm."""

    def __init__(self, num_layers, dim, heads, ffn_dim, dropout=0.0, activation="gelu", eps=1e-5, bias=True):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, heads, ffn_dim, dropout, activation, eps, bias) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, padding_mask=None, need_weights=False):
        maps = []
        for layer in self.layers:
            x, weights = layer(x, padding_mask, need_weights)
            maps.append(weights)
        return self.norm(x), maps


class TransformerDecoder(nn.Module):
    """A stack of decoder layers (cross-attending when `cross`) with a final layer norm."""

    def __init__(self, num_layers, dim, heads, ffn_dim, dropout=0.0, activation="gelu", eps=1e-5, bias=True,
                 cross=False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, heads, ffn_dim, dropout, activation, eps, bias, cross) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, *, memory=None, memory_kv=None, memory_padding_mask=None, attn_mask=None,
                kv_caches=None, need_weights=False):
        maps = []
        for i, layer in enumerate(self.layers):
            x, weights = layer(
                x,
                memory=memory,
                memory_kv=None if memory_kv is None else memory_kv[i],
                memory_padding_mask=memory_padding_mask,
                attn_mask=attn_mask,
                kv_cache=None if kv_caches is None else kv_caches[i],
                need_weights=need_weights,
            )
            maps.append(weights)
        return self.norm(x), maps
