"""Prefix reuse: a follow-up prompt on another engine (in memory or through the real Redis) reuses cached
chunks of its prefix and gives the cold start's tokens; damaged or missing chunks are recomputed."""

import uuid

import pytest
import torch

from pioneer_model import AttentionCache, AttentionModel, MemoryLRUStorage, ModelConfig, PRESETS, stream_generate
from pioneer_model.checkpoint import load_tokenizer
from pioneer_model.prefix import common_prefix
from worker.engine import LocalEngine
from worker.redis_cache import RedisLRUStorage

CHUNK = 16
NEW = 12


def make_engine(model_dir, storage, policy="on"):
    return LocalEngine.load(model_dir, cache=AttentionCache(storage=storage), max_new_tokens=NEW,
                            prefix_cache=policy, prefix_chunk_tokens=CHUNK)


def history(turns: int) -> list[dict]:
    messages = []
    for i in range(turns):
        messages += [{"role": "user", "content": f"what about robots, part {i}?"},
                     {"role": "assistant", "content": f"robots are machines {i}"}]
    return messages


def cold(engine, ids):
    return [t for t, _ in stream_generate(engine.model, ids, max_new_tokens=NEW, eos_token_id=engine.tokenizer.eos_id)]


def tokens(engine, ids):
    return [t for t, _ in engine.generate(ids, NEW)]


@pytest.fixture
def redis_storages(redis_url):
    namespace = f"test-prefix-{uuid.uuid4().hex[:8]}"
    storages = [RedisLRUStorage(redis_url, namespace=namespace, capacity=10_000) for _ in range(2)]
    yield storages
    storages[0].clear()


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_follow_up_on_another_engine_reuses_the_prefix(tiny_model_dir, where, request):
    if where == "redis":
        storage_a, storage_b = request.getfixturevalue("redis_storages")
    else:
        storage_a = storage_b = MemoryLRUStorage(10_000)
    writer, reader = make_engine(tiny_model_dir, storage_a), make_engine(tiny_model_dir, storage_b)
    try:
        first = history(2) + [{"role": "user", "content": "and music?"}]
        reply = writer.reply(first)
        writer.flush()
        follow_up = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "thanks!"}]
        ids = reader.prompt_ids(follow_up)
        first_chunk = f"prefix:{writer.prefix.chunk_keys(ids)[0]}"
        if where == "redis":
            scores = lambda: [storage_a.client.zscore(storage_a.index_key, first_chunk + p) for p in ("", ":ok")]  # noqa
            written_at = scores()
        assert reader.reply(follow_up).token_ids == cold(reader, ids)
        reader.flush()
        if where == "redis":  # the reader refreshed the LRU order of what it reused
            assert all(after > before for after, before in zip(scores(), written_at))
        stats = reader.info()["prefix_cache"]
        # The writer cached its prompt, then its reply's tokens too (all but the last, never fed back): the follow-up
        # reuses them as far as its own tokens agree, and prefills the rest.
        written = writer.prompt_ids(first) + reply.token_ids[:-1]
        reused = common_prefix(written, ids)
        assert len(writer.prompt_ids(first)) < reused < len(ids) and stats["reused_tokens"] == reused
        assert stats["chunk_hits"] == reused // CHUNK >= 2
        assert stats["tail_hits"] == (reused % CHUNK > 0)  # the last, partial chunk too
    finally:
        writer.close()
        reader.close()


def test_damaged_or_missing_chunks_are_recomputed(tiny_model_dir):
    storage = MemoryLRUStorage(10_000)
    writer, reader = make_engine(tiny_model_dir, storage), make_engine(tiny_model_dir, storage)
    try:
        ids = writer.prompt_ids(history(3))
        expected = tokens(writer, ids)
        writer.flush()
        keys = writer.prefix.chunk_keys(ids)
        assert len(keys) >= 3 and all(storage.get(f"prefix:{k}:ok") for k in keys)

        data = storage.get(f"prefix:{keys[1]}")
        storage.put(f"prefix:{keys[1]}", data[:-8] + bytes(8))  # same length, other bytes: checksum fails
        storage.delete(f"prefix:{keys[2]}:ok")  # data without its marker: never read
        assert tokens(reader, ids) == expected == cold(reader, ids)
        stats = reader.info()["prefix_cache"]
        assert (stats["chunk_hits"], stats["chunks_damaged"], stats["reused_tokens"]) == (1, 1, CHUNK)

        reader.flush()  # the reader rewrote the chunks it recomputed
        storage.put(f"prefix:{keys[0]}", b"not safetensors")
        storage.put(f"prefix:{keys[0]}:ok", b"15:0")
        assert tokens(reader, ids) == expected
        assert reader.info()["prefix_cache"]["chunks_damaged"] == 2
        reader.flush()
        assert tokens(reader, ids) == expected
        assert reader.info()["prefix_cache"]["chunk_hits"] == 1 + len(reader.prefix.chunk_keys(ids, len(ids) - 1))
    finally:
        writer.close()
        reader.close()


def test_a_broken_cache_is_a_miss(tiny_model_dir):
    class Broken(MemoryLRUStorage):
        def get(self, key):
            raise ConnectionError("cache down")

    engine = make_engine(tiny_model_dir, Broken())
    try:
        ids = engine.prompt_ids(history(3))
        assert tokens(engine, ids) == cold(engine, ids)
    finally:
        engine.close()


def test_auto_policy_measures_and_reports(tiny_model_dir):
    engine = make_engine(tiny_model_dir, MemoryLRUStorage(10_000), policy="auto")
    try:
        assert engine.info()["prefix_cache"]["in_use"] is None  # not measured yet
        engine.reply(history(3))
        info = engine.info()["prefix_cache"]
        measured = info["measurement"]
        assert measured["fetch_ms"] > 0 and measured["recompute_ms"] > 0 and measured["chunk_tokens"] == CHUNK
        assert info["in_use"] == (measured["fetch_ms"] < measured["recompute_ms"])
    finally:
        engine.close()


def test_encoder_output_reused_for_the_same_source(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(1)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, **(PRESETS["tiny"] | {"num_encoder_layers": 2}))
    AttentionModel(config).save_pretrained(tmp_path / "encdec", tokenizer=tokenizer)
    storage = MemoryLRUStorage(100)
    writer, reader = make_engine(tmp_path / "encdec", storage), make_engine(tmp_path / "encdec", storage)
    try:
        ids = writer.prompt_ids(history(1))
        assert tokens(writer, ids) == cold(writer, ids)
        writer.flush()
        assert tokens(reader, ids) == cold(writer, ids)
        assert reader.info()["prefix_cache"]["encoder_hits"] == 1
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize("reads_history", [True, False])
def test_a_reply_is_cached_only_for_models_that_read_history(tiny_model_dir, reads_history):
    engine = make_engine(tiny_model_dir, MemoryLRUStorage(10_000))
    engine.model.config.max_history_messages = None if reads_history else 0
    try:
        messages = [{"role": "user", "content": "tell me about robots and music " * 4}]
        reply = engine.reply(messages, max_new_tokens=40)
        engine.flush()
        prompt = engine.prompt_ids(messages)
        cached = len(prompt) + len(reply.token_ids) - 1 if reads_history else len(prompt)
        assert (len(prompt) + len(reply.token_ids) - 1) // CHUNK > len(prompt) // CHUNK >= 1  # the reply fills one
        assert engine.info()["prefix_cache"]["chunks_written"] == cached // CHUNK
    finally:
        engine.close()


def test_a_held_reply_reaches_the_cache_only_when_kept(tiny_model_dir):
    engine = make_engine(tiny_model_dir, MemoryLRUStorage(10_000))
    try:
        messages = history(1) + [{"role": "user", "content": "hello there"}]
        prompt = engine.prompt_ids(messages)
        reply = engine.reply(messages, max_new_tokens=20, hold_reply_cache=True)
        with_reply = len(prompt) + len(reply.token_ids) - 1  # tokens whose keys/values the reply's turn holds
        assert with_reply // CHUNK > len(prompt) // CHUNK >= 1  # the reply fills a chunk of its own
        engine.flush()
        assert engine.info()["prefix_cache"]["chunks_written"] == len(prompt) // CHUNK  # the prompt's only
        reply.keep()
        reply.keep()  # once is enough
        engine.flush()
        assert engine.info()["prefix_cache"]["chunks_written"] == with_reply // CHUNK
        late = engine.reply(messages + [{"role": "assistant", "content": reply.text}], max_new_tokens=20,
                            hold_reply_cache=True)
    finally:
        engine.close()
    late.keep()  # kept after the engine closed (a reply sent while the worker shuts down): skipped, no error
    assert engine.info()["prefix_cache"]["writes_skipped"] == 1


@pytest.mark.parametrize("threshold, method", [(1.0, "openai"), (0.0, "local")])
async def test_hybrid_caches_a_local_reply_only_when_it_is_the_answer(tiny_model_dir, threshold, method):
    """A local reply routed to OpenAI is not the conversation's next turn: its keys/values stay out of the cache."""
    from tests.fakes.openai_server import FakeOpenAI, Scenario
    from worker.openai_backend import OpenAIBackend
    from worker.orchestrator import Orchestrator

    engine = make_engine(tiny_model_dir, MemoryLRUStorage(10_000))
    async with FakeOpenAI() as fake:
        backend = OpenAIBackend("sk-test", fake.base_url, "fake-model", max_retries=0)
        fake.script(Scenario.reply("From the API."))
        try:
            messages = history(1) + [{"role": "user", "content": "hello there"}]
            prompt = engine.prompt_ids(messages)
            result = await Orchestrator(engine, backend, mode="hybrid", threshold=threshold).complete(messages)
            assert result.method == method
            engine.flush()
            with_reply = len(prompt) + engine.stats.generated_tokens - 1
            assert with_reply // CHUNK > len(prompt) // CHUNK >= 1  # the local reply filled a chunk of its own
            written = engine.info()["prefix_cache"]["chunks_written"]
            assert written == (len(prompt) if method == "openai" else with_reply) // CHUNK
        finally:
            await backend.aclose()
            engine.close()
