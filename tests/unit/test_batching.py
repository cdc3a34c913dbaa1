"""Continuous batching: batched greedy tokens equal solo ones, joining mid-batch, back-pressure, sampling."""

import random
import threading
import time

import pytest
import torch

from pioneer_model import PRESETS, AttentionModel, ModelConfig, stream_generate
from pioneer_model.batching import BatchDecoder, make_sequence
from pioneer_model.threads import on_own_thread
from worker.engine import LocalEngine
from worker.settings import WorkerSettings

NO_EOS = -1  # run every reply to its full length


def random_model(encoder_layers=0, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=300, **(PRESETS["tiny"] | {"num_encoder_layers": encoder_layers}))
    return AttentionModel(config).eval()


def solo_tokens(model, prompt, max_new, eos=NO_EOS, **sampling):
    return [t for t, _ in stream_generate(model, prompt, max_new_tokens=max_new, eos_token_id=eos, **sampling)]


@pytest.mark.parametrize("encoder_layers", [0, 2])
def test_batch_decoder_matches_solo_with_rows_joining_and_leaving(encoder_layers):
    model = random_model(encoder_layers)
    rng = random.Random(encoder_layers)
    prompts = [[rng.randrange(7, 300) for _ in range(rng.randrange(2, 80))] for _ in range(10)]
    lengths = [rng.randrange(1, 30) for _ in prompts]
    decoder, seqs, step = BatchDecoder(model, max_batch_size=4), [], 0
    pending = list(zip(prompts, lengths))
    while pending or decoder.active:
        if pending and decoder.free and step % 2 == 0:  # a new row joins every other step while there is room
            prompt, n = pending.pop(0)
            seqs.append(make_sequence(model.config, prompt, n, eos_token_id=NO_EOS))
            decoder.add(seqs[-1])
        decoder.step()
        step += 1
    for seq, prompt, n in zip(seqs, prompts, lengths):
        assert seq.tokens == solo_tokens(model, prompt, n)


def test_prompts_prefilled_together_match_solo():
    """Rows prefilled in one padded pass (then joined by one prefilled alone) decode the solo tokens."""
    model = random_model()
    rng = random.Random(3)
    prompts = [[rng.randrange(7, 300) for _ in range(n)] for n in (5, 41, 1, 17, 23)]
    decoder = BatchDecoder(model, max_batch_size=6)
    seqs = [make_sequence(model.config, p, 12, eos_token_id=NO_EOS) for p in prompts]
    firsts = decoder.add_many(seqs[:4])
    decoder.step()
    firsts.append(decoder.add(seqs[4]))
    while decoder.active:
        decoder.step()
    assert [t for t, _ in firsts] == [s.tokens[0] for s in seqs]
    for seq, prompt in zip(seqs, prompts):
        assert seq.tokens == solo_tokens(model, prompt, 12)
    with pytest.raises(ValueError):
        decoder.add_many([make_sequence(model.config, prompts[0], 4, prefix=[(torch.zeros(2, 2, 1, 32),) * 2])])


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = LocalEngine.load(tiny_model_dir, max_new_tokens=20, max_batch_size=4)
    yield engine
    engine.close()


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": "tell me about robots " * (i % 5 + 1) + str(i)}]


def run_threads(fn, n):
    """fn(0..n-1) on n threads that start together; their results."""
    results, start = [None] * n, threading.Barrier(n)

    def run(i):
        start.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_engine_requests_match_solo(engine):
    solo = [solo_tokens(engine.model, engine.prompt_ids(conversation(i)), 20, engine.tokenizer.eos_id)
            for i in range(7)]
    replies = run_threads(lambda i: engine.reply(conversation(i)), 7)
    assert [r.token_ids for r in replies] == solo
    assert all(r.text for r in replies)
    assert engine.info()["batching"]["peak_batch"] > 1


def test_requests_waiting_together_are_prefilled_in_one_pass(engine):
    prompts = [engine.prompt_ids(conversation(i)) for i in range(4)]
    entered, release, before = threading.Event(), threading.Event(), engine.info()["batching"]
    busy = threading.Thread(target=engine.scheduler.call, args=(lambda: entered.set() or release.wait(10),))
    busy.start()  # holds the scheduler thread: the requests below queue up meanwhile
    assert entered.wait(10)
    replies = []
    threads = [threading.Thread(target=lambda p=p: replies.append((p, [t for t, _ in engine.generate(p, 20)])))
               for p in prompts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while engine.info()["batching"]["waiting"] < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    for t in threads + [busy]:
        t.join(30)
    after = engine.info()["batching"]
    assert (after["prefills"] - before["prefills"], after["prefill_passes"] - before["prefill_passes"]) == (4, 1)
    for prompt, tokens in replies:
        assert tokens == solo_tokens(engine.model, prompt, 20, engine.tokenizer.eos_id)


def test_request_joining_mid_batch(engine):
    first_prompt, second_prompt = engine.prompt_ids(conversation(1)), engine.prompt_ids(conversation(3))
    before = engine.info()["batching"]
    first = engine.generate(first_prompt, 60)
    head = [next(first) for _ in range(10)]  # decoding has started
    second = list(engine.generate(second_prompt, 30))
    rest = list(first)
    after = engine.info()["batching"]
    assert after["rows_stepped"] - before["rows_stepped"] > after["steps"] - before["steps"]  # they shared steps
    assert [t for t, _ in head + rest] == solo_tokens(engine.model, first_prompt, 60, engine.tokenizer.eos_id)
    assert [t for t, _ in second] == solo_tokens(engine.model, second_prompt, 30, engine.tokenizer.eos_id)


def test_failing_first_token_bookkeeping_does_not_fail_the_request(engine, monkeypatch, caplog):
    prompt = engine.prompt_ids(conversation(2))

    def broken(seq):
        raise RuntimeError("cache bookkeeping broke")

    monkeypatch.setattr(engine.scheduler, "on_first_token", broken)
    tokens = [t for t, _ in engine.generate(prompt, 20)]
    assert tokens == solo_tokens(engine.model, prompt, 20, engine.tokenizer.eos_id)
    assert "on_first_token failed" in caplog.text


@pytest.mark.parametrize("bound", ["rows", "tokens"])
def test_back_pressure_holds_the_bounds(tiny_model_dir, bound):
    engine = LocalEngine.load(tiny_model_dir, max_new_tokens=16)
    prompts = [engine.prompt_ids(conversation(i)) for i in range(8)]
    engine.close()
    reserved = sorted(len(p) + 16 for p in prompts)  # KV positions each request may hold
    tokens = reserved[-1] + reserved[0] - 1  # the largest fits alone, never with another; 4 never fit
    limits = dict(max_batch_size=2) if bound == "rows" else dict(max_batch_size=4, max_tokens_in_flight=tokens)
    engine = LocalEngine.load(tiny_model_dir, max_new_tokens=16, **limits)
    try:
        replies = run_threads(lambda i: [t for t, _ in engine.generate(prompts[i], 16)], 8)
        stats = engine.info()["batching"]
        assert replies == [solo_tokens(engine.model, p, 16, engine.tokenizer.eos_id) for p in prompts]
        assert stats["peak_batch"] <= (2 if bound == "rows" else 3)
        assert stats["peak_tokens_in_flight"] <= stats["max_tokens_in_flight"]
        assert stats["peak_waiting"] >= 1 and stats["active"] == stats["tokens_in_flight"] == stats["waiting"] == 0
    finally:
        engine.close()


def test_sampling_settings_per_request(engine):
    prompt = engine.prompt_ids(conversation(2))
    reference = solo_tokens(engine.model, prompt, 20, engine.tokenizer.eos_id, temperature=0.9, top_k=50,
                            generator=torch.Generator().manual_seed(7))
    sampled = run_threads(lambda i: [t for t, _ in engine.generate(prompt, 20, temperature=0.9, top_k=50, seed=7)]
                          if i else engine.reply(conversation(2)).token_ids, 3)
    assert sampled[1] == sampled[2] == reference
    assert sampled[0] == solo_tokens(engine.model, prompt, 20, engine.tokenizer.eos_id)


def test_abandoned_stream_frees_its_row(engine):
    gen = engine.stream(conversation(4), max_new_tokens=200)
    next(gen)
    gen.close()
    engine.reply(conversation(5))  # the scheduler drops the cancelled row at its next step
    assert engine.info()["batching"]["active"] == 0


def test_model_work_runs_on_the_scheduler_thread_between_steps(engine):
    """Model work of the engine (loading aside) runs on the thread that decodes, so a process keeps one OpenMP
    team; a call made while a request decodes runs between its steps."""
    prompt = engine.prompt_ids(conversation(2))
    stream = engine.generate(prompt, 40)
    first = next(stream)
    seen = []
    assert engine.scheduler.call(lambda x: seen.append(threading.current_thread().name) or x * 2, 21) == 42
    assert seen == ["pioneer-scheduler"]
    assert [t for t, _ in [first, *stream]] == solo_tokens(engine.model, prompt, 40, engine.tokenizer.eos_id)
    with pytest.raises(ZeroDivisionError):
        engine.scheduler.call(lambda: 1 / 0)
    assert engine.reply(conversation(1)).token_ids  # still serving


def test_on_own_thread_returns_or_raises():
    assert on_own_thread(lambda a, b=0: (threading.current_thread() is not threading.main_thread(), a + b), 1, b=2) \
        == (True, 3)
    with pytest.raises(KeyError):
        on_own_thread({}.__getitem__, "missing")


def test_serving_settings_names(monkeypatch):
    monkeypatch.setenv("MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("MAX_TOKENS_IN_FLIGHT", "4096")
    monkeypatch.setenv("PREFIX_CACHE_ENABLED", "false")
    settings = WorkerSettings(_env_file=None)
    assert (settings.max_batch_size, settings.max_tokens_in_flight, settings.prefix_cache_enabled) == (8, 4096, False)
    fields = WorkerSettings.model_fields
    assert (fields["max_batch_size"].default, fields["prefix_cache_enabled"].default) == (16, True)


def test_prompt_keeps_the_history_the_model_reads(tiny_model_dir):
    """max_history_messages cuts what the local model sees; None keeps the whole conversation."""
    chat = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        chat += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    chat.append({"role": "user", "content": "the last question"})
    engine = LocalEngine.load(tiny_model_dir)
    try:
        tok = engine.tokenizer
        assert engine.model.config.max_history_messages is None
        assert engine.prompt_ids(chat) == tok.encode_chat([(m["role"], m["content"]) for m in chat[1:]])
        engine.model.config.max_history_messages = 2
        assert engine.prompt_ids(chat) == tok.encode_chat([("user", "question 2"), ("assistant", "answer 2"),
                                                           ("user", "the last question")])
        engine.model.config.max_history_messages = 0
        assert engine.prompt_ids(chat) == tok.encode_chat([("user", "the last question")])
    finally:
        engine.close()


def test_small_preset_reads_no_history_and_saves_it(tmp_path):
    config = ModelConfig(vocab_size=64, **PRESETS["small"])
    assert config.max_history_messages == 0
    AttentionModel(config).save_pretrained(tmp_path)
    assert AttentionModel.from_pretrained(tmp_path).config.max_history_messages == 0


async def test_async_stream_matches_the_threaded_one_and_frees_an_abandoned_row(engine):
    """astream() reads tokens on the event loop (no thread per reply): same text and tokens as stream()."""
    expected = engine.reply(conversation(6), max_new_tokens=24)
    items = [item async for item in engine.astream(conversation(6), max_new_tokens=24)]
    *deltas, reply = items
    assert "".join(deltas) == reply.text == expected.text and reply.token_ids == expected.token_ids
    abandoned = engine.astream(conversation(7), max_new_tokens=200)
    await anext(abandoned)
    await abandoned.aclose()
    engine.reply(conversation(5))  # the scheduler drops the cancelled row at its next step
    assert engine.info()["batching"]["active"] == 0
