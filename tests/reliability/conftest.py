"""Fixtures of the reliability tests: a Redis server and a database of each test's own."""

import uuid

import psycopg
import pytest

from tests.conftest import POSTGRES_SERVER
from tests.services import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own (the shared one is never restarted or filled)."""
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def database_url():
    """A fresh database on the shared PostgreSQL, dropped after the test."""
    name = f"pioneer_rel_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
