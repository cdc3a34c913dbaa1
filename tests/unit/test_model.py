"""AttentionModel: shapes, config checks, generation (KV cache vs recompute), checkpoints, pre-trained embeddings."""

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from pioneer_model import (
    PRESETS,
    AttentionModel,
    CheckpointError,
    EmbeddingLoadError,
    ModelConfig,
    TokenEmbedding,
    confidence,
    load_pretrained,
    load_pretrained_vectors,
    sample_next,
)

generate_module = importlib.import_module("pioneer_model.generate")  # the package's `generate` is the function
VOCAB = 97
NO_EOS = -1  # an id the model never produces, so every generation runs its full length


def tiny_config(encoder_layers=0, **overrides):
    settings = dict(vocab_size=VOCAB, attention_heads=4, embedding_dim=32, sequence_length=48, dropout_rate=0.0,
                    num_encoder_layers=encoder_layers, num_decoder_layers=2, ffn_dim=64)
    return ModelConfig(**(settings | overrides))


def tiny_model(encoder_layers=0, seed=0, **overrides):
    torch.manual_seed(seed)
    return AttentionModel(tiny_config(encoder_layers, **overrides)).eval()


@pytest.fixture(scope="module")
def decoder_only():
    return tiny_model()


@pytest.fixture(scope="module")
def encoder_decoder():
    return tiny_model(encoder_layers=2, seed=1)


@pytest.fixture(params=["decoder_only", "encoder_decoder"])
def model(request):
    return request.getfixturevalue(request.param)


def ids(*shape, seed=0, low=3):
    return torch.randint(low, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def greedy_by_recompute(model, prompt, steps):
    """Greedy decoding that recomputes the whole sequence every step: the reference for the KV cache."""
    if model.config.decoder_only:
        out = prompt
        for _ in range(steps):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
    out = prompt.new_full((prompt.size(0), 1), model.config.bos_token_id)
    for _ in range(steps):
        out = torch.cat([out, model(prompt, out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


# ---------------------------------------------------------------- shapes and config


def test_decoder_only_forward_shape(decoder_only):
    assert decoder_only(ids(2, 7)).shape == (2, 7, VOCAB)


def test_encoder_decoder_forward_shape(encoder_decoder):
    src, tgt = ids(2, 9), ids(2, 5, seed=1)
    assert encoder_decoder(src, tgt).shape == (2, 5, VOCAB)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    assert encoder_decoder(src, tgt, src_padding_mask=mask).shape == (2, 5, VOCAB)
    with pytest.raises(ValueError, match="decoder_input_ids"):
        encoder_decoder(src)


def test_attention_maps(model):
    maps = model.attention_maps(ids(1, 6))
    assert len(maps) == 2 and maps[0].shape == (1, 4, 6, 6)
    torch.testing.assert_close(maps[-1].sum(-1), torch.ones(1, 4, 6))


def test_presets_build():
    for name, preset in PRESETS.items():
        config = ModelConfig(**preset)
        assert config.embedding_dim % config.attention_heads == 0, name
    assert AttentionModel(ModelConfig(**PRESETS["tiny"], vocab_size=50)).num_parameters() > 0


@pytest.mark.parametrize("overrides, message", [
    (dict(embedding_dim=30, attention_heads=4), "EMBEDDING_DIM 30 must be divisible by ATTENTION_HEADS 4"),
    (dict(vocab_size=0), "VOCAB_SIZE must be at least 1"),
    (dict(num_decoder_layers=0), "NUM_DECODER_LAYERS must be at least 1"),
    (dict(num_encoder_layers=-1), "NUM_ENCODER_LAYERS must be 0 or more"),
    (dict(dropout_rate=1.0), r"DROPOUT_RATE must be in \[0, 1\)"),
    (dict(positional_encoding_type="rotary"), "POSITIONAL_ENCODING_TYPE must be 'fixed' or 'learnable'"),
    (dict(activation="swish"), "activation must be one of"),
])
def test_config_errors_are_clear(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_config_dict_round_trip():
    config = tiny_config(positional_encoding_type="learnable")
    assert ModelConfig.from_dict(config.to_dict() | {"model_type": "pioneer", "unknown": 1}) == config


# ---------------------------------------------------------------- generation


def test_kv_cache_hidden_states_equal_full_recompute(decoder_only):
    seq = ids(2, 12)
    full = decoder_only.decode(seq)
    caches = decoder_only.new_kv_caches(2, 12)
    parts = [decoder_only.decode(seq[:, :5], kv_caches=caches)]
    parts += [decoder_only.decode(seq[:, t : t + 1], kv_caches=caches) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positional", ["fixed", "learnable"])
def test_generate_with_kv_cache_equals_greedy_recompute(model, positional):
    if positional == "learnable":
        model = tiny_model(model.config.num_encoder_layers, seed=2, positional_encoding_type="learnable")
    prompt = ids(2, 6)
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=NO_EOS)
    assert torch.equal(out, greedy_by_recompute(model, prompt, 10))


def test_generate_stops_at_eos(decoder_only):
    prompt = ids(1, 5)
    free = decoder_only.generate(prompt, max_new_tokens=8, eos_token_id=NO_EOS)
    eos = free[0, 7].item()  # the third new token
    out = decoder_only.generate(prompt, max_new_tokens=8, eos_token_id=eos)
    first = (free[0, 5:] == eos).nonzero()[0].item()
    assert torch.equal(out[0], free[0, : 5 + first + 1])


def test_stream_generate_equals_generate(model):
    prompt = ids(1, 6, seed=3)
    steps = list(model.stream_generate(prompt, max_new_tokens=9, eos_token_id=NO_EOS))
    out = model.generate(prompt, max_new_tokens=9, eos_token_id=NO_EOS)
    new = out[0, prompt.size(1):] if model.config.decoder_only else out[0, 1:]
    assert [t for t, _ in steps] == new.tolist()
    logits = model(out[:, :-1]) if model.config.decoder_only else model(prompt, out[:, :-1])
    expected = logits[0, -9:].log_softmax(-1).gather(-1, new[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([lp for _, lp in steps]), expected, atol=1e-4, rtol=0)
    assert 0.0 < confidence([lp for _, lp in steps]) <= 1.0


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return batch, mask


def test_left_padded_batch_equals_per_row_generate(model):
    rows = [ids(1, n, seed=n)[0] for n in (3, 7, 5)]
    batch, mask = left_pad(rows)
    out = model.generate(batch, max_new_tokens=8, attention_mask=mask, eos_token_id=NO_EOS)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=8, eos_token_id=NO_EOS)
        new = alone[0, len(row):] if model.config.decoder_only else alone[0]
        assert torch.equal(out[i, -new.numel():], new), f"row {i}"


@pytest.fixture
def fixed_shapes_in_eager(monkeypatch):
    """compile=True's fixed-shape caches and masks, run without compiling (fast)."""
    monkeypatch.setattr(generate_module, "compiled_decode_step", lambda: generate_module.decode_step)


def test_fixed_shape_decoding_equals_eager(model, fixed_shapes_in_eager):
    rows = [ids(1, n, seed=n)[0] for n in (3, 7)]
    batch, mask = left_pad(rows)
    for kwargs in ({}, {"attention_mask": mask}):
        expected = model.generate(batch, max_new_tokens=9, eos_token_id=NO_EOS, **kwargs)
        assert torch.equal(model.generate(batch, max_new_tokens=9, eos_token_id=NO_EOS, compile=True, **kwargs),
                           expected)
    streamed = list(model.stream_generate(rows[1], max_new_tokens=6, eos_token_id=NO_EOS, compile=True))
    assert [t for t, _ in streamed] == [t for t, _ in model.stream_generate(rows[1], 6, eos_token_id=NO_EOS)]


def test_device_side_greedy_loop_makes_eager_tokens(model, fixed_shapes_in_eager):
    """The loop CUDA graphs replay, run here without a graph."""
    from pioneer_model.graphs import greedy_tokens

    batch, mask = left_pad([ids(1, n, seed=n)[0] for n in (3, 7)])
    expected = model.generate(batch, max_new_tokens=45, eos_token_id=NO_EOS, attention_mask=mask)
    prompt, n, logits, step = generate_module.start_decoding(model, batch, mask.bool(), 45, compile=True)
    assert torch.equal(torch.cat([prompt, greedy_tokens(step, logits, n, None, graphed=False)], 1), expected)


def scripted_model(finish_at, steps=45, eos=4):
    """A stand-in for a decoding step: it wants token 5 at each step, except eos (4) at a row's finish_at, then
    other tokens (which the loop must mask). Returns (step, first logits)."""
    script = torch.full((len(finish_at), steps), 5)
    for row, at in enumerate(finish_at):
        if at is not None:
            script[row, at:] = torch.tensor([eos, 6, 7]).repeat(steps)[:steps - at]
    made = [1]

    def step(token):
        made[0] += 1
        return torch.nn.functional.one_hot(script[:, made[0] - 1], VOCAB).float()

    return step, torch.nn.functional.one_hot(script[:, 0], VOCAB).float()


@pytest.fixture
def stand_in_capture(monkeypatch):
    """CUDA's side stream and graph capture stood in for: capturing records a step without running it."""
    import contextlib

    from pioneer_model import graphs

    captured = []
    monkeypatch.setattr(graphs, "side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "capture", lambda fn, stream: captured.append(fn) or fn)
    return captured


@pytest.mark.parametrize("graphed", [False, True])
@pytest.mark.parametrize("finish_at", [(0, 0), (2, 2), (3, 40), (3, None), (None, None), (33, 31)])
def test_device_side_greedy_loop_stops_where_eager_decoding_stops(finish_at, graphed, stand_in_capture):
    """Rows that finished repeat eos, and the tokens end once every row has, though the loop checks only every
    CHECK_EVERY tokens."""
    from pioneer_model.graphs import greedy_tokens

    step, first = scripted_model(finish_at)
    got = greedy_tokens(step, first, 45, 4, graphed=graphed)
    ends = [45 if at is None else at + 1 for at in finish_at]
    assert got.size(1) == max(ends)
    assert len(stand_in_capture) == (graphed and max(ends) > 1)  # all but a stop at the first check capture a step
    for row, at in enumerate(finish_at):  # 5s, then eos from the row's finish on (its 6s and 7s masked)
        assert got[row].tolist() == ([5] * got.size(1) if at is None else [5] * at + [4] * (got.size(1) - at))


def test_a_failed_capture_decodes_on_without_a_graph(stand_in_capture, monkeypatch):
    from pioneer_model import graphs

    def refuse(fn, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    expected = graphs.greedy_tokens(*scripted_model((3, 40)), 45, 4, graphed=False)
    monkeypatch.setattr(graphs, "capture", refuse)
    failed = graphs.stats["capture_failed"]
    with pytest.warns(RuntimeWarning, match="capture failed"):
        assert torch.equal(graphs.greedy_tokens(*scripted_model((3, 40)), 45, 4, graphed=True), expected)
    assert graphs.stats["capture_failed"] == failed + 1


def test_compiled_generate_equals_eager(decoder_only):
    batch, mask = left_pad([ids(1, n, seed=n)[0] for n in (4, 6)])
    for kwargs in ({}, {"attention_mask": mask}):  # one compilation serves both: same shapes
        expected = decoder_only.generate(batch, max_new_tokens=8, eos_token_id=NO_EOS, **kwargs)
        out = decoder_only.generate(batch, max_new_tokens=8, eos_token_id=NO_EOS, compile=True, **kwargs)
        assert torch.equal(out, expected)


def test_compiled_single_sequence_equals_eager(decoder_only):
    """Batch 1 is where compiled one-row projections become multiply-and-sum loops (pioneer_model.attention.linear)."""
    prompt = ids(1, 5, seed=3)
    expected = decoder_only.generate(prompt, max_new_tokens=8, eos_token_id=NO_EOS)
    assert torch.equal(decoder_only.generate(prompt, max_new_tokens=8, eos_token_id=NO_EOS, compile=True), expected)


@pytest.mark.parametrize("shape, bias", [((1, 16), True), ((1, 1, 16), False), ((3, 16), True)])
def test_compiled_linear_matches_f_linear(shape, bias):
    from pioneer_model.attention import linear

    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(40, 16)
    b = torch.randn(40) if bias else None
    compiled = torch.compile(linear, dynamic=False)
    out = compiled(x, weight, b)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_generate_trims_long_prompts(decoder_only):
    out = decoder_only.generate(ids(1, 60), max_new_tokens=10, eos_token_id=NO_EOS)
    assert out.shape == (1, 48)  # prompt cut to SEQUENCE_LENGTH - max_new_tokens


LOGITS = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]).expand(2000, 5)  # softmax: .64 .23 .09 .03 .01


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (2, None, {0, 1}),
    (None, 0.5, {0}),
    (None, 0.8, {0, 1}),
    (None, 0.9, {0, 1, 2}),
    (3, 0.8, {0, 1}),
    (None, None, {0, 1, 2, 3, 4}),
])
def test_sampling_respects_top_k_and_top_p(top_k, top_p, allowed):
    tokens = sample_next(LOGITS, temperature=1.0, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == allowed


def test_greedy_and_seeded_sampling_reproduce(decoder_only):
    assert torch.equal(sample_next(LOGITS[:3]), torch.zeros(3, dtype=torch.long))
    draw = lambda seed: sample_next(LOGITS, 0.7, top_k=4, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))

    prompt = ids(2, 4)
    sample = lambda seed: decoder_only.generate(  # noqa: E731
        prompt, 12, temperature=1.5, top_p=0.95, eos_token_id=NO_EOS, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(7), sample(7)) and not torch.equal(sample(7), sample(8))


def test_confidence_range():
    assert confidence([]) == 0.0
    assert confidence([0.0, 0.0]) == 1.0
    assert confidence([-1000.0]) == pytest.approx(0.0)
    assert confidence([-0.5, -1.5]) == pytest.approx(np.exp(-1.0))


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("positional", ["fixed", "learnable"])
def test_save_and_load_round_trip(model, positional, tmp_path):
    if positional == "learnable":
        model = tiny_model(model.config.num_encoder_layers, seed=3, positional_encoding_type="learnable")
    model.save_pretrained(tmp_path)
    loaded = AttentionModel.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    x, y = ids(2, 7), ids(2, 4, seed=1)
    args = (x,) if model.config.decoder_only else (x, y)
    assert torch.equal(loaded(*args), model(*args))
    assert load_pretrained(tmp_path)[1] is None  # no tokenizer.json saved


def test_load_with_dtype(decoder_only, tmp_path):
    decoder_only.save_pretrained(tmp_path)
    assert AttentionModel.from_pretrained(tmp_path, dtype=torch.float64).tok_emb.weight.dtype == torch.float64


def test_damaged_checkpoints_raise_clear_errors(decoder_only, tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        AttentionModel.from_pretrained(tmp_path / "nowhere")
    decoder_only.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AttentionModel.from_pretrained(tmp_path)

    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        AttentionModel.from_pretrained(tmp_path)

    weights.write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"embedding_dim": 64}))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        AttentionModel.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config | {"num_decoder_layers": 3}))
    with pytest.raises(CheckpointError, match="missing"):
        AttentionModel.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        AttentionModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------- pre-trained embeddings

VECTORS = {"hello": [0.1, 0.2, 0.3, 0.4], "world": [1.0, 2.0, 3.0, 4.0], "cat": [-1.0, 0.0, 1.0, 2.0]}
TOKENS = {"<pad>": 0, "hello": 1, "Ġworld": 2, "Cat": 3, "unknown": 4}


def write_text_vectors(path, header):
    lines = [f"{len(VECTORS)} 4"] if header else []
    lines += [word + " " + " ".join(map(str, vec)) for word, vec in VECTORS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("header", [True, False], ids=["word2vec", "glove"])
def test_text_vectors(tmp_path, header):
    path = write_text_vectors(tmp_path / "vectors.txt", header)
    matrix, found = load_pretrained_vectors(path, TOKENS, dim=4, vocab_size=6)
    assert matrix.shape == (6, 4) and found == {1, 2, 3}  # "Ġworld" -> world, "Cat" -> cat
    for token, word in (("hello", "hello"), ("Ġworld", "world"), ("Cat", "cat")):
        assert matrix[TOKENS[token]].tolist() == pytest.approx(VECTORS[word])
    assert torch.all(matrix[[0, 4, 5]] == 0)


def test_matrix_files(tmp_path):
    matrix = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.save(tmp_path / "vectors.npy", matrix)
    save_numpy({"embeddings": matrix, "other": matrix[:2]}, str(tmp_path / "named.safetensors"))
    save_file({"anything": torch.from_numpy(matrix)}, str(tmp_path / "single.safetensors"))
    for name in ("vectors.npy", "named.safetensors", "single.safetensors"):
        loaded, found = load_pretrained_vectors(tmp_path / name, TOKENS, dim=4, vocab_size=5)
        assert np.array_equal(loaded.numpy(), matrix[:5]) and found == set(range(5)), name
    save_numpy({"a": matrix, "b": matrix}, str(tmp_path / "ambiguous.safetensors"))
    with pytest.raises(EmbeddingLoadError, match="ambiguous.safetensors"):
        load_pretrained_vectors(tmp_path / "ambiguous.safetensors", TOKENS, 4, 5)


@pytest.mark.parametrize("freeze", [True, False])
def test_token_embedding_load_pretrained(tmp_path, freeze):
    path = write_text_vectors(tmp_path / "glove.txt", header=False)
    emb = TokenEmbedding(6, 4, scale=True)
    before = emb.weight.detach().clone()
    assert emb.load_pretrained(str(path), TOKENS, freeze=freeze) == 3
    assert emb.weight.requires_grad is not freeze
    torch.testing.assert_close(emb(torch.tensor([1, 2])), torch.tensor([VECTORS["hello"], VECTORS["world"]]))
    assert torch.equal(emb.weight[[0, 4, 5]], before[[0, 4, 5]])  # tokens without a vector keep their init


def test_embedding_errors_name_the_file(tmp_path):
    with pytest.raises(EmbeddingLoadError, match="not found: .*missing.txt"):
        load_pretrained_vectors(tmp_path / "missing.txt", TOKENS, 4, 5)
    path = write_text_vectors(tmp_path / "vectors.txt", header=True)
    with pytest.raises(EmbeddingLoadError, match=r"vectors.txt:2: vectors have 4 dimensions, EMBEDDING_DIM is 8"):
        load_pretrained_vectors(path, TOKENS, 8, 5)
    np.save(tmp_path / "wide.npy", np.zeros((5, 3), dtype=np.float32))
    with pytest.raises(EmbeddingLoadError, match=r"wide.npy: matrix shape \(5, 3\), expected \(rows, 4\)"):
        load_pretrained_vectors(tmp_path / "wide.npy", TOKENS, 4, 5)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(EmbeddingLoadError, match="cannot read .*broken.npy"):
        load_pretrained_vectors(tmp_path / "broken.npy", TOKENS, 4, 5)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(EmbeddingLoadError, match="cannot read .*broken.safetensors"):
        load_pretrained_vectors(tmp_path / "broken.safetensors", TOKENS, 4, 5)
    (tmp_path / "words.txt").write_text("hello a b c d\n")
    with pytest.raises(EmbeddingLoadError, match="words.txt:1: not a word followed by numbers"):
        load_pretrained_vectors(tmp_path / "words.txt", TOKENS, 4, 5)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EmbeddingLoadError, match="empty.txt holds no vectors"):
        load_pretrained_vectors(tmp_path / "empty.txt", TOKENS, 4, 5)
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(EmbeddingLoadError, match="cannot read .*folder.txt"):
        load_pretrained_vectors(tmp_path / "folder.txt", TOKENS, 4, 5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
