"""Fixtures of the reliability tests: a Redis server and a database of each test's own."""

import pytest

from tests.services import RedisServer, asyncpg_url, fresh_database


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own (the shared one is never restarted or filled)."""
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def database_url():
    """A fresh database on the shared PostgreSQL, dropped after the test."""
    with fresh_database("pioneer_rel") as url:
        yield asyncpg_url(url)
