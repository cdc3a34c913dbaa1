"""Scaled dot-product and multi-head attention, with a key/value cache for incremental decoding."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for one row on the CPU under torch.compile: a multiply-and-sum there, which inductor
    fuses into one bandwidth-bound loop about twice as fast as the BLAS matrix-vector product (decoding)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.size(-1):
        y = (x.reshape(1, -1) * weight).sum(-1)
        y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], weight.size(0))
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through `linear`, so that compiled single-token decoding gets the fast CPU loop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True = may attend, aligned bottom-right.

    Query i sits at absolute position k_len - q_len + i, so it sees keys 0..that position. This is what
    decoding with a cache needs; torch's `is_causal` aligns top-left and is only right when q_len == k_len.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def merge_masks(mask: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
    """Combine two attention masks (bool: True = may attend; float: added to the scores)."""
    if mask is None:
        return other
    if other is None:
        return mask
    if mask.dtype == torch.bool and other.dtype == torch.bool:
        return mask & other
    return as_float_mask(mask) + as_float_mask(other)


def as_float_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class ScaledDotProductAttention(nn.Module):
    """softmax(QK^T / sqrt(d_k)) V over (batch, heads, seq, d_k) tensors."""

    def __init__(self, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        self.dropout = dropout
        self.causal = causal

    def forward(self, q, k, v, mask=None, need_weights=False, causal=None):
        causal = self.causal if causal is None else causal
        dropout_p = self.dropout if self.training else 0.0
        q_len, k_len = q.size(-2), k.size(-2)
        if not need_weights:  # torch's fused kernels; one query (a decoding step) sees every key
            if mask is None and (not causal or q_len == 1 or q_len == k_len):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                      is_causal=causal and q_len > 1), None
            if causal and q_len > 1:
                mask = merge_masks(mask, causal_mask(q_len, k_len, q.device))
            if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None

        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if causal:
            mask = merge_masks(mask, causal_mask(q_len, k_len, q.device))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        return dropped @ v, weights


class KVCache(nn.Module):
    """Preallocated keys and values for one attention layer: `kv` is (2, batch, heads, max_len, head_dim)."""

    def __init__(self, batch_size, num_heads, max_len, head_dim, dtype=torch.float32, device=None):
        super().__init__()
        shape = (2, batch_size, num_heads, max_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0
        self.index: torch.Tensor | None = None  # fixed-shape mode (compiled decoding), see write_at

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    @property
    def max_len(self) -> int:
        return self.kv.size(3)

    def write_at(self, index: torch.Tensor | None):
        """Fixed-shape mode for torch.compile: append writes at the positions in `index` (updated in place by the
        caller) and returns the whole buffer, so attention needs a mask of the valid positions. None ends it."""
        self.index = index

    def append(self, kv_new: torch.Tensor):
        """Append (2, batch, heads, new, head_dim) keys and values; return all keys and values seen so far."""
        if self.index is not None:
            return self.kv.index_copy_(3, self.index, kv_new).unbind(0)
        start, end = self.length, self.length + kv_new.size(3)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > {self.max_len}")
        self.kv.narrow(3, start, end - start).copy_(kv_new)
        self.length = end
        return self.kv.narrow(3, 0, end).unbind(0)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Append new keys/values (batch, heads, new, head_dim); return all keys/values seen so far."""
        return self.append(torch.stack((k_new, v_new)))

    def set(self, k: torch.Tensor, v: torch.Tensor):
        """Fill the cache with a known prefix (prefix reuse); replaces what was there."""
        self.length = 0
        return self.update(k, v)

    def reset(self):
        self.length = 0


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with packed input projections (the layout of torch.nn.MultiheadAttention)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embedding dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.in_proj = Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.attention = ScaledDotProductAttention(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor):
        """Keys and values of a source sequence, computed once per generation for cross-attention."""
        d = self.embed_dim
        w, b = self.in_proj.weight[d:], None if self.in_proj.bias is None else self.in_proj.bias[d:]
        k, v = linear(memory, w, b).split(d, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
        kv_cache: KVCache | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Attend from `query` (batch, q_len, dim) to itself, or to `memory` when given (cross-attention).

        key_padding_mask: (batch, k_len), True = real token (torch's bool convention: True may attend).
        kv_cache: self-attention keys/values of earlier positions; new ones are appended.
        memory_kv: precomputed cross-attention keys/values (see project_kv).
        Returns (output, per-head weights (batch, heads, q_len, k_len) or None).
        """
        b, t, d = query.shape
        if memory is None and memory_kv is None:
            # (batch, t, 3 * dim) -> (3, batch, heads, t, head_dim): views only, no copies
            qkv = self.in_proj(query).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            if kv_cache is None:
                q, k, v = qkv.unbind(0)
            else:
                q, (k, v) = qkv[0], kv_cache.append(qkv[1:])
        else:
            w, bias = self.in_proj.weight[:d], None if self.in_proj.bias is None else self.in_proj.bias[:d]
            q = self._split_heads(linear(query, w, bias))
            k, v = memory_kv if memory_kv is not None else self.project_kv(memory)

        mask = attn_mask
        if key_padding_mask is not None:
            mask = merge_masks(mask, key_padding_mask[:, None, None, :].bool())
        out, weights = self.attention(q, k, v, mask=mask, need_weights=need_weights, causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, d))
        return (self.resid_dropout(out) if self.training else out), weights
