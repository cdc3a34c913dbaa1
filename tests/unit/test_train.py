"""A tiny training run: held-out loss goes down, checkpoints load, and resuming continues from the saved step."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pioneer_model.data import Pair, load_chatterbot_pairs
from pioneer_model.model import AttentionModel, ModelConfig
from pioneer_model.tokenizer import Tokenizer
import pioneer_model.train as train_module
from pioneer_model.train import STATE_FILE, ThreadChooser, epoch_batches, learning_rate_at, train

TINY = dict(attention_heads=2, embedding_dim=64, sequence_length=64, dropout_rate=0.0, num_encoder_layers=0,
            num_decoder_layers=2, ffn_dim=128, learning_rate=3e-3)


@pytest.fixture(scope="module")
def pairs():
    # Conversational files only, so held-out replies resemble training replies.
    pairs = [p for p in load_chatterbot_pairs() if len(p.prompt) + len(p.reply) < 120]
    return pairs[::3][:400]


@pytest.fixture(scope="module")
def tok(pairs):
    return Tokenizer.train((t for p in pairs for t in (p.prompt, p.reply)), vocab_size=512)


def tiny_config(tok, **overrides):
    return ModelConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                       eos_token_id=tok.eos_id, **{**TINY, **overrides})


def test_held_out_loss_goes_down_and_checkpoint_loads(pairs, tok, tmp_path):
    result = train(tiny_config(tok), pairs, tok, tmp_path, steps=60, batch_size=16, progress=False,
                   eval_every=30, num_threads=1)
    losses = [e["held_out_loss"] for e in result.evals]
    assert result.steps == 60 and [e["step"] for e in result.evals] == [0, 30, 60]
    assert losses[-1] < losses[0] - 0.3
    assert losses[-1] < math.log(tok.vocab_size)  # better than guessing uniformly
    assert result.held_out_perplexity == pytest.approx(math.exp(result.held_out_loss))
    assert result.tokens_per_s > 0

    model = AttentionModel.from_pretrained(tmp_path)
    loaded_tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded_tok.encode("Hello") == tok.encode("Hello")
    prompt = torch.tensor([tok.encode_chat([("user", "Hello")])])
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=tok.eos_id)
    assert out.shape[1] <= prompt.shape[1] + 5


def test_resume_continues_from_saved_step(pairs, tok, tmp_path, monkeypatch):
    config = tiny_config(tok)
    settings = dict(steps=20, batch_size=16, progress=False, eval_every=100, save_every=10, num_threads=1)
    fresh = train(config, pairs, tok, tmp_path / "fresh", **settings)

    real_clip, calls = train_module.torch.nn.utils.clip_grad_norm_, []

    def crash_on_step_11(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(train_module.torch.nn.utils, "clip_grad_norm_", crash_on_step_11)
    with pytest.raises(KeyboardInterrupt):
        train(config, pairs, tok, tmp_path / "run", **settings)
    monkeypatch.undo()
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert state["step"] == 10 and state["total_steps"] == 20 and state["optimizer"]["state"]

    resumed = train(config, pairs, tok, tmp_path / "run", **settings)
    assert resumed.steps == 20
    assert [e["step"] for e in resumed.evals] == [0, 20]
    assert resumed.held_out_loss == pytest.approx(fresh.held_out_loss, abs=1e-3)  # same batches and schedule

    again = train(config, pairs, tok, tmp_path / "run", **settings)
    assert again.steps == 20 and again.held_out_loss == pytest.approx(resumed.held_out_loss)  # nothing left


def test_fine_tune_from_checkpoint_keeps_its_tokenizer(pairs, tok, tmp_path):
    base = tmp_path / "base"
    train(tiny_config(tok), pairs, tok, base, steps=5, batch_size=16, progress=False, num_threads=1)
    other_tok = Tokenizer.train(["completely different text"] * 5, vocab_size=300)
    extra = [Pair("What is Pioneer?", "A chat bot.")] * 20
    result = train(None, extra, other_tok, tmp_path / "tuned", steps=5, batch_size=8, from_dir=base,
                   progress=False, held_out_fraction=0.0, num_threads=1)
    assert result.steps == 5
    assert Tokenizer.from_file(tmp_path / "tuned" / "tokenizer.json").vocab_size == tok.vocab_size


def test_schedule_and_batches():
    assert learning_rate_at(0.0, 1.0, 0.1) < 0.05
    assert learning_rate_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert learning_rate_at(1.0, 1.0, 0.1) == pytest.approx(0.1)
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = epoch_batches(lengths, 2, seed=0, epoch=0)
    assert batches == epoch_batches(lengths, 2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) < 10 for b in batches)  # similar lengths share a batch


def test_thread_chooser_keeps_the_faster_choice():
    chooser = ThreadChooser([2, 1], period=20, trial=2)
    used = []
    for step in range(40):
        threads = chooser.threads_for(step)
        used.append(threads)
        slow = threads == 2 if step < 20 else threads == 1  # the machine gets busy, then quiet again
        chooser.record(step, threads, 5.0 if slow else 1.0)
    assert used[:4] == [2, 2, 1, 1] and set(used[4:20]) == {1}
    assert used[20:24] == [2, 2, 1, 1] and set(used[24:]) == {2}
    assert {ThreadChooser([3]).threads_for(s) for s in range(10)} == {3}


def test_encoder_decoder_training_runs(pairs, tok, tmp_path):
    config = tiny_config(tok, num_encoder_layers=1, num_decoder_layers=1)
    result = train(config, pairs[:200], tok, tmp_path, steps=30, batch_size=16, progress=False, eval_every=15,
                   num_threads=1)
    losses = [e["held_out_loss"] for e in result.evals]
    assert result.steps == 30 and losses[-1] < losses[0]
    assert not AttentionModel.from_pretrained(tmp_path).config.decoder_only


def test_ensure_default_model_trains_once(pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "default_training_pairs", lambda: pairs[:100])
    monkeypatch.setattr(train_module, "DEFAULT_TRAINING", dict(steps=2, batch_size=8, held_out_fraction=0.1))
    path = train_module.ensure_default_model(tmp_path, progress=False)
    assert path == tmp_path / "models" / "default"
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert not (path / STATE_FILE).exists() and not (tmp_path / "models" / "default.partial").exists()
    assert len(capsys.readouterr().out.strip().splitlines()) == 1

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained again"))
    assert train_module.ensure_default_model(tmp_path) == path


def test_pioneer_train_command_passes_its_options_through(tmp_path):
    """`pioneer train --data F --out D ...` as a user types it: a real process, options reach train's parser."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"hello {i}", "reply": f"hi there {i}"}) for i in range(40)))
    pioneer = Path(sys.executable).parent / "pioneer"
    done = subprocess.run([pioneer, "train", "--data", data, "--out", tmp_path / "model", "--preset", "tiny",
                           "--steps", "2", "--vocab-size", "300", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").exists()
    bogus = subprocess.run([pioneer, "worker", "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert bogus.returncode == 2 and "unrecognized arguments: --no-such-option" in bogus.stderr
