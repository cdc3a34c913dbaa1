"""Shared fixtures: a tiny model checkpoint, the real Redis, a fresh PostgreSQL database, worker settings."""

import os

import pytest
import redis
import torch

from tests.services import asyncpg_url, fresh_database

REDIS_URL = os.environ.get("PIONEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny decoder-only model with a tokenizer trained on part of the ChatterBot corpus.

    Its special tokens' embeddings are zeroed, so greedy replies are visible text that runs to MAX_NEW_TOKENS.
    """
    from pioneer_model import PRESETS, AttentionModel, ModelConfig
    from pioneer_model.data import load_chatterbot_pairs
    from pioneer_model.tokenizer import Tokenizer

    pairs = load_chatterbot_pairs()[:600]
    tokenizer = Tokenizer.train((t for p in pairs for t in (p.prompt, p.reply)), vocab_size=400)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **PRESETS["tiny"])
    path = tmp_path_factory.mktemp("model") / "tiny"
    model = AttentionModel(config)
    with torch.no_grad():
        model.tok_emb.weight[sorted(tokenizer.special_ids)] = 0.0
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="session")
def redis_url():
    """The real Redis; CI starts it. A missing Redis fails the test, it is never skipped."""
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url():
    """A database of our own on the real PostgreSQL, dropped at the end of the session."""
    with fresh_database("pioneer_test") as url:
        yield asyncpg_url(url)


@pytest.fixture
def worker_env(tmp_path, tiny_model_dir, redis_url):
    """The environment for a `pioneer worker` process on the real Redis, with its keys cleared."""
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match="pioneer:workers:*"):
        client.delete(key)
    for pattern in ("pioneer:cache:*", "pioneer:ratelimit:*"):  # a test's users start with a fresh rate limit
        for key in client.scan_iter(match=pattern):
            client.delete(key)
    client.delete("pioneer")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ATTENTION_", "DATABASE_"))}
    env |= {"REDIS_URL": redis_url, "MODEL_PATH": str(tiny_model_dir), "PIONEER_DATA_DIR": str(tmp_path),
            "MAX_NEW_TOKENS": "24", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "METRICS_PORT": "0"}
    return env
