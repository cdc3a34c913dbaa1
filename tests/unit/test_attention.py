"""Attention, KV cache, positional encodings and the attention cache, checked against PyTorch's own."""

import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pioneer_model import (
    AttentionCache,
    KVCache,
    MemoryLRUStorage,
    MultiHeadAttention,
    PositionalEncoding,
    ScaledDotProductAttention,
    cache_key,
    causal_mask,
    decode_tensors,
    encode_tensors,
)

ATOL = 1e-5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(batch=2, heads=4, q_len=5, k_len=5, d_k=8):
    q = rand(batch, heads, q_len, d_k, seed=1)
    return q, rand(batch, heads, k_len, d_k, seed=2), rand(batch, heads, k_len, d_k, seed=3)


def random_bool_mask(q_len, k_len, seed=0):
    mask = torch.rand(q_len, k_len, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[:, 0] = True  # every query keeps at least one key
    return mask


# ---------------------------------------------------------------- ScaledDotProductAttention


@pytest.mark.parametrize("need_weights", [False, True])
class TestScaledDotProductAttention:
    def test_no_mask(self, need_weights):
        q, k, v = qkv(q_len=4, k_len=6)
        out, weights = ScaledDotProductAttention()(q, k, v, need_weights=need_weights)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=0)
        assert (weights is not None) == need_weights

    def test_bool_mask(self, need_weights):
        q, k, v = qkv(q_len=4, k_len=6)
        mask = random_bool_mask(4, 6)
        out, _ = ScaledDotProductAttention()(q, k, v, mask=mask, need_weights=need_weights)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=0)

    def test_float_mask(self, need_weights):
        q, k, v = qkv(q_len=4, k_len=6)
        mask = rand(2, 1, 4, 6, seed=7)  # additive, broadcast over heads
        out, _ = ScaledDotProductAttention()(q, k, v, mask=mask, need_weights=need_weights)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=0)

    def test_causal(self, need_weights):
        q, k, v = qkv(q_len=6, k_len=6)
        out, weights = ScaledDotProductAttention(causal=True)(q, k, v, need_weights=need_weights)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=0)
        if need_weights:
            assert torch.all(weights.triu(diagonal=1) == 0)

    def test_causal_query_shorter_than_keys_is_bottom_right(self, need_weights):
        q, k, v = qkv(q_len=3, k_len=7)
        explicit = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)  # query i sits at position 4 + i
        out, _ = ScaledDotProductAttention()(q, k, v, causal=True, need_weights=need_weights)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=explicit)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
        top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # torch's alignment differs here
        assert not torch.allclose(out, top_left, atol=1e-3)

    def test_causal_combined_with_mask(self, need_weights):
        q, k, v = qkv(q_len=5, k_len=5)
        mask = random_bool_mask(5, 5, seed=3)
        out, _ = ScaledDotProductAttention()(q, k, v, mask=mask, causal=True, need_weights=need_weights)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal_mask(5, 5))
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_causal_mask_shape_and_alignment():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(causal_mask(1, 5), torch.ones(1, 5, dtype=torch.bool))
    assert torch.equal(causal_mask(2, 4), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


def test_weights_path_matches_fused_path_and_rows_sum_to_one():
    q, k, v = qkv(q_len=5, k_len=9)
    sdpa = ScaledDotProductAttention()
    mask = random_bool_mask(5, 9, seed=5)
    fused, none = sdpa(q, k, v, mask=mask)
    explicit, weights = sdpa(q, k, v, mask=mask, need_weights=True)
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=ATOL, rtol=0)
    assert weights.shape == (2, 4, 5, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert torch.all(weights[..., ~mask] == 0)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    torch.testing.assert_close(weights, scores.masked_fill(~mask, float("-inf")).softmax(-1))


def test_dropout_only_in_training():
    q, k, v = qkv(q_len=6, k_len=6)
    sdpa = ScaledDotProductAttention(dropout=0.5).eval()
    reference = F.scaled_dot_product_attention(q, k, v)
    for need_weights in (False, True):
        first, _ = sdpa(q, k, v, need_weights=need_weights)
        second, _ = sdpa(q, k, v, need_weights=need_weights)
        assert torch.equal(first, second)
        torch.testing.assert_close(first, reference, atol=ATOL, rtol=0)

    sdpa.train()
    torch.manual_seed(0)
    a, _ = sdpa(q, k, v)
    b, weights = sdpa(q, k, v, need_weights=True)
    assert not torch.allclose(a, reference, atol=1e-3) and not torch.allclose(a, b, atol=1e-3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))  # weights are reported before dropout


# ---------------------------------------------------------------- MultiHeadAttention vs nn.MultiheadAttention


def attention_pair(embed_dim=32, heads=4, seed=0):
    torch.manual_seed(seed)
    ours = MultiHeadAttention(embed_dim, heads).eval()
    ref = nn.MultiheadAttention(embed_dim, heads, batch_first=True).eval()
    with torch.no_grad():
        nn.init.normal_(ours.in_proj.bias)
        nn.init.normal_(ours.out_proj.bias)
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, ref


@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_matches_torch(need_weights):
    ours, ref = attention_pair()
    x = rand(2, 7, 32)
    out, weights = ours(x, need_weights=need_weights)
    expected, expected_weights = ref(x, x, x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(weights.mean(1), expected_weights, atol=ATOL, rtol=0)


def test_cross_attention_matches_torch():
    ours, ref = attention_pair()
    query, memory = rand(2, 3, 32, seed=1), rand(2, 6, 32, seed=2)
    out, _ = ours(query, memory)
    torch.testing.assert_close(out, ref(query, memory, memory)[0], atol=ATOL, rtol=0)
    out_kv, _ = ours(query, memory_kv=ours.project_kv(memory))
    torch.testing.assert_close(out_kv, out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cross", [False, True])
def test_key_padding_mask_uses_true_for_real_tokens(cross):
    ours, ref = attention_pair()
    query, memory = rand(2, 5, 32, seed=1), rand(2, 5, 32, seed=2)
    keys = memory if cross else query
    real = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, weights = ours(query, memory if cross else None, key_padding_mask=real, need_weights=True)
    expected, _ = ref(query, keys, keys, key_padding_mask=~real)  # torch: True = ignore
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert torch.all(weights[1, :, :, 3:] == 0)


def test_causal_attn_mask_matches_torch():
    ours, ref = attention_pair()
    x = rand(2, 6, 32)
    blocked = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)  # torch: True = may not attend
    expected, _ = ref(x, x, x, attn_mask=blocked)
    torch.testing.assert_close(ours(x, causal=True)[0], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x, attn_mask=~blocked)[0], expected, atol=ATOL, rtol=0)
    additive = torch.zeros(6, 6).masked_fill(blocked, float("-inf"))
    torch.testing.assert_close(ours(x, attn_mask=additive)[0], expected, atol=ATOL, rtol=0)


def test_per_head_weights_match_torch():
    ours, ref = attention_pair()
    x = rand(2, 6, 32)
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    _, weights = ours(x, key_padding_mask=real, causal=True, need_weights=True)
    blocked = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)
    _, expected = ref(x, x, x, key_padding_mask=~real, attn_mask=blocked, average_attn_weights=False)
    assert weights.shape == expected.shape == (2, 4, 6, 6)
    torch.testing.assert_close(weights, expected, atol=ATOL, rtol=0)


def test_embed_dim_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)


# ---------------------------------------------------------------- KV cache


def test_kv_cache_incremental_decoding_equals_full_recompute():
    ours, _ = attention_pair()
    x = rand(2, 9, 32)
    full, _ = ours(x, causal=True)
    cache = KVCache(2, 4, 12, 8)
    steps = [ours(x[:, :4], causal=True, kv_cache=cache)[0]]  # prefill, then one token at a time
    steps += [ours(x[:, t : t + 1], causal=True, kv_cache=cache)[0] for t in range(4, 7)]
    steps.append(ours(x[:, 7:9], causal=True, kv_cache=cache)[0])  # a chunk of 2 after the prefix
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_kv_cache_overflow_set_and_reset():
    cache = KVCache(1, 2, 4, 3)
    k = rand(1, 2, 3, 3)
    keys, values = cache.update(k, -k)
    assert torch.equal(keys, k) and torch.equal(values, -k) and cache.length == 3
    with pytest.raises(ValueError, match="overflow"):
        cache.update(rand(1, 2, 2, 3), rand(1, 2, 2, 3))
    keys, _ = cache.set(k[:, :, :1], k[:, :, :1])
    assert cache.length == 1 and keys.shape == (1, 2, 1, 3)
    cache.reset()
    assert cache.length == 0 and cache.max_len == 4


# ---------------------------------------------------------------- positional encodings


def test_sinusoidal_values():
    enc = PositionalEncoding("fixed", max_len=50, dim=16)
    x = torch.zeros(1, 50, 16)
    out = enc(x)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert out[0, pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert out[0, pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert not list(enc.parameters()) and "table" not in enc.state_dict()


def test_learnable_positions_are_trained():
    enc = PositionalEncoding("learnable", max_len=10, dim=4)
    (param,) = enc.parameters()
    assert param.requires_grad and param.shape == (10, 4)
    enc(torch.zeros(2, 3, 4)).sum().backward()
    assert param.grad[:3].abs().sum() > 0 and torch.all(param.grad[3:] == 0)


@pytest.mark.parametrize("kind", ["fixed", "learnable"])
def test_position_offsets(kind):
    enc = PositionalEncoding(kind, max_len=20, dim=8)
    x = rand(2, 4, 8)
    table = enc(torch.zeros(1, 20, 8))[0]
    torch.testing.assert_close(enc(x, start=5), x + table[5:9])
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])  # per-row, e.g. after left padding
    torch.testing.assert_close(enc(x, positions=positions), x + table[positions])
    with pytest.raises(ValueError, match="exceeds"):
        enc(x, start=17)


def test_positional_encoding_kind_is_checked():
    with pytest.raises(ValueError, match="'fixed' or 'learnable'"):
        PositionalEncoding("rotary", 8, 4)


# ---------------------------------------------------------------- AttentionCache


def entry(value):
    return {"out": torch.full((2, 3), float(value))}


def test_lru_eviction_order_and_counters():
    storage = MemoryLRUStorage(capacity=2)
    cache = AttentionCache(storage=storage)
    cache.put("a", entry(1))
    cache.put("b", entry(2))
    assert torch.equal(cache.get("a")["out"], entry(1)["out"])  # "a" becomes most recently used
    cache.put("c", entry(3))  # evicts "b", the least recently used
    assert storage.keys() == ["a", "c"]
    assert cache.get("b") is None
    cache.put("d", entry(4))  # evicts "a"
    assert storage.keys() == ["c", "d"]
    stats = cache.stats()
    assert stats == {"enabled": True, "entries": 2, "hits": 1, "misses": 1, "evictions": 2, "hit_rate": 0.5}


def test_put_existing_key_refreshes_without_eviction():
    storage = MemoryLRUStorage(capacity=2)
    cache = AttentionCache(storage=storage)
    cache.put("a", entry(1))
    cache.put("b", entry(2))
    cache.put("a", entry(5))
    assert storage.keys() == ["b", "a"] and cache.stats()["evictions"] == 0
    assert cache.get("a")["out"][0, 0].item() == 5


@pytest.mark.parametrize("damage", [b"not safetensors", b"", "truncated"])
def test_damaged_bytes_are_a_miss(damage):
    storage = MemoryLRUStorage(capacity=4)
    cache = AttentionCache(storage=storage)
    good = encode_tensors(entry(1))
    storage.put("k", good[: len(good) // 2] if damage == "truncated" else damage)
    assert cache.get("k") is None
    assert "k" not in storage.keys()
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 0


def test_tensor_round_trip_keeps_dtype_and_values():
    tensors = {"w": rand(3, 4).to(torch.bfloat16), "ids": torch.arange(5), "m": torch.tensor([True, False])}
    back = decode_tensors(encode_tensors(tensors))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_disabled_cache_and_clear():
    cache = AttentionCache(capacity=2, enabled=False)
    cache.put("a", entry(1))
    assert cache.get("a") is None and cache.stats()["entries"] == 0 and cache.stats()["misses"] == 0
    cache = AttentionCache(capacity=2)
    cache.put("a", entry(1))
    cache.get("a")
    cache.clear()
    assert cache.stats() == {"enabled": True, "entries": 0, "hits": 0, "misses": 0, "evictions": 0, "hit_rate": 0.0}


def test_cache_key_is_stable():
    ids = torch.arange(4, dtype=torch.int32)
    # A fixed digest: workers sharing a Redis cache must agree on keys across processes and releases.
    assert cache_key("hello", 3, ids) == "6c33ff72071682c0c887cb9e8a285df100fdb0c255ea5e8c52feb420d980506e"
    assert cache_key("hello", 3, ids) == cache_key("hello", 3, ids.clone())
    strided = torch.arange(8, dtype=torch.int32)[::2]
    assert cache_key(strided) == cache_key(torch.tensor([0, 2, 4, 6], dtype=torch.int32))
    different = [
        cache_key("hello", 3, ids.long()),  # dtype
        cache_key("hello", 3, ids.view(2, 2)),  # shape
        cache_key("hello", 3, ids + 1),  # values
        cache_key(3, "hello", ids),  # order
        cache_key("hello", "3", ids),  # type
    ]
    assert len(set(different + [cache_key("hello", 3, ids)])) == 6
    assert cache_key(torch.tensor(1.5)) != cache_key(torch.tensor([1.5]))  # 0-dim tensors work
    assert cache_key(torch.zeros(0)) == cache_key(torch.zeros(0))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_view_tensors_reads_safetensors_without_copying_and_refuses_damage():
    from pioneer_model.cache import view_tensors

    tensors = {"ids": torch.arange(5), "k": torch.randn(2, 3, 5, 4), "v": torch.randn(2, 3, 5, 4).bfloat16(),
               "empty": torch.zeros(0, 4)}
    data = encode_tensors(tensors)
    views = view_tensors(data)
    assert set(views) == set(tensors)
    assert all(torch.equal(views[name], tensors[name]) and views[name].dtype == tensors[name].dtype
               for name in tensors)
    assert views["k"].untyped_storage().data_ptr() != tensors["k"].untyped_storage().data_ptr()
    for damaged in (data[:4], data[:-8], b"\xff" * 8 + data[8:], data[:8] + b"[" + data[9:]):
        with pytest.raises((ValueError, KeyError)):
            view_tensors(damaged)
