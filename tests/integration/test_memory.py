"""Conversation memory and migrations against real SQLite files and a real PostgreSQL."""

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from bots.db import Base, async_url, create_engine
from bots.memory import Memory, Place, UnknownRequest, migrate, run_migrations
from tests.services import fresh_database

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = ("users", "conversations", "messages", "usage")

GUILD_CHANNEL = Place("discord", workspace_id="guild-1", channel_id="general")


@pytest.fixture(scope="session")
def postgres_database():
    """A database of our own on the shared server, dropped at the end of the session."""
    with fresh_database("pioneer_memory_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database, not yet migrated."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/not-yet-created/memory.db"
    url = request.getfixturevalue("postgres_database")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE")
        connection.execute("CREATE SCHEMA public")
    return url


@pytest.fixture
async def memory(database_url):
    async with Memory(database_url) as memory:
        yield memory


async def counts(database_url, queries: dict[str, str], **params) -> dict[str, int]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return {name: await connection.scalar(text(sql), params)
                    for name, sql in queries.items()}
    finally:
        await engine.dispose()


async def scalar(database_url, sql):
    return (await counts(database_url, {"only": sql}))["only"]


async def table_counts(database_url) -> dict[str, int]:
    return await counts(database_url, {table: f"SELECT count(*) FROM {table}" for table in TABLES})


async def rows_of(database_url, platform, user_id) -> dict[str, int]:
    """How many rows of each table belong to one user."""
    user = "u.platform = :platform AND u.platform_user_id = :user_id"
    return await counts(database_url, {
        "users": f"SELECT count(*) FROM users u WHERE {user}",
        "conversations": "SELECT count(*) FROM conversations c JOIN users u ON u.id = c.user_id"
                         f" WHERE {user}",
        "messages": "SELECT count(*) FROM messages m JOIN conversations c"
                    f" ON c.id = m.conversation_id JOIN users u ON u.id = c.user_id WHERE {user}",
        "usage": f"SELECT count(*) FROM usage g JOIN users u ON u.id = g.user_id WHERE {user}",
    }, platform=platform, user_id=user_id)


async def converse(memory, place, user_id, request_id, question, answer, method="local"):
    await memory.add_user_message(place, user_id, question, len(question.split()))
    await memory.begin_reply(place, user_id, request_id)
    await memory.finish_reply(request_id, answer, len(answer.split()), method, 0.8, 100)


def test_run_migrations_from_scratch_twice(database_url):
    run_migrations(database_url)
    run_migrations(database_url)

    async def check():
        assert await scalar(database_url, "SELECT version_num FROM alembic_version") == "0001"
        assert await table_counts(database_url) == dict.fromkeys(TABLES, 0)

    asyncio.run(check())


async def test_migrate_from_a_running_loop_matches_the_models(database_url):
    await migrate(database_url)
    await migrate(database_url)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
    finally:
        await engine.dispose()
    assert differences == []


async def test_messages_round_trip(memory):
    await memory.add_user_message(GUILD_CHANNEL, "alice", "hello there", 2, display_name="Alice")
    await memory.begin_reply(GUILD_CHANNEL, "alice", "req-1", {"channel_id": 7, "message_id": 9})
    assert [m.role for m in await memory.history(GUILD_CHANNEL, "alice")] == ["user"], \
        "a pending reply is not history yet"
    await memory.finish_reply("req-1", "hi Alice", 2, "openai", 0.42, 850)
    await memory.add_user_message(GUILD_CHANNEL, "alice", "how are you?", 3)
    await memory.begin_reply(GUILD_CHANNEL, "alice", "req-2")
    await memory.fail_reply("req-2", "failed", "partial")

    history = await memory.history(GUILD_CHANNEL, "alice")
    assert [(m.role, m.content) for m in history] == [
        ("user", "hello there"), ("assistant", "hi Alice"), ("user", "how are you?")]
    reply = history[1]
    assert (reply.token_count, reply.method, reply.confidence) == (2, "openai", 0.42)
    assert history[0].created_at.tzinfo is not None
    assert history[0].created_at <= history[1].created_at <= history[2].created_at
    assert [m.content for m in await memory.history(GUILD_CHANNEL, "alice", limit=2)] == [
        "hi Alice", "how are you?"]


async def test_history_is_isolated_between_users_and_places(memory):
    thread = Place("discord", "guild-1", "general", thread_id="thread-5")
    direct = Place("discord", channel_id="dm-alice")
    slack = Place("slack", "T1", "general")
    await memory.add_user_message(GUILD_CHANNEL, "alice", "alice in general", 3)
    await memory.add_user_message(GUILD_CHANNEL, "bob", "bob in general", 3)
    await memory.add_user_message(thread, "alice", "alice in a thread", 4)
    await memory.add_user_message(direct, "alice", "alice in a DM", 4)
    await memory.add_user_message(slack, "alice", "a slack user also called alice", 6)

    async def contents(place, user_id):
        return [m.content for m in await memory.history(place, user_id)]

    assert await contents(GUILD_CHANNEL, "alice") == ["alice in general"]
    assert await contents(GUILD_CHANNEL, "bob") == ["bob in general"]
    assert await contents(thread, "alice") == ["alice in a thread"]
    assert await contents(thread, "bob") == []
    assert await contents(direct, "alice") == ["alice in a DM"]
    assert await contents(slack, "alice") == ["a slack user also called alice"]
    assert await contents(Place("discord", "guild-2", "general"), "alice") == []


async def test_forget_deletes_every_row_of_the_user_and_no_other(memory, database_url):
    other_place = Place("discord", "guild-1", "random")
    for user_id in ("alice", "bob"):
        await converse(memory, GUILD_CHANNEL, user_id, f"{user_id}-1", "hi", "hello")
        await converse(memory, other_place, user_id, f"{user_id}-2", "again", "yes")
        await memory.record_usage("discord", user_id, f"{user_id}-1", "local", 10, 5)
        await memory.set_system_prompt(other_place, user_id, "be brief")
    await memory.record_usage("discord", "carol", None, "openai", 1, 1)

    alice_before = await rows_of(database_url, "discord", "alice")
    bob_before = await rows_of(database_url, "discord", "bob")
    totals_before = await table_counts(database_url)
    assert alice_before == {"users": 1, "conversations": 2, "messages": 4, "usage": 1}

    deleted = await memory.forget("discord", "alice")

    assert deleted == sum(alice_before.values())
    assert await rows_of(database_url, "discord", "alice") == dict.fromkeys(TABLES, 0)
    assert await rows_of(database_url, "discord", "bob") == bob_before
    assert await table_counts(database_url) == {
        table: totals_before[table] - alice_before[table] for table in TABLES}
    assert await memory.history(GUILD_CHANNEL, "alice") == []
    assert len(await memory.history(GUILD_CHANNEL, "bob")) == 2
    assert await memory.forget("discord", "alice") == 0


async def test_finish_reply_stores_a_reply_once(memory, database_url):
    await memory.add_user_message(GUILD_CHANNEL, "alice", "hi", 1)
    first = await memory.begin_reply(GUILD_CHANNEL, "alice", "req-1")
    assert await memory.begin_reply(GUILD_CHANNEL, "alice", "req-1") == first

    ids = await asyncio.gather(
        memory.finish_reply("req-1", "hello", 1, "local", 0.9, 40),
        memory.finish_reply("req-1", "hello again", 2, "openai", 0.5, 900))
    assert ids == [first, first]
    assert await memory.finish_reply("req-1", "third time", 2, "cache", 1.0, 1) == first

    replies = [m for m in await memory.history(GUILD_CHANNEL, "alice") if m.role == "assistant"]
    assert len(replies) == 1
    assert replies[0].content in ("hello", "hello again")
    stored = await scalar(database_url, "SELECT count(*) FROM messages WHERE request_id = 'req-1'")
    assert stored == 1
    assert await memory.fail_reply("req-1", "interrupted") is False, "complete stays complete"
    await memory.begin_reply(GUILD_CHANNEL, "alice", "late")
    await memory.fail_reply("late", "interrupted", "half")
    await memory.finish_reply("late", "the whole reply", 3, "local", 0.7, 5000)
    assert (await memory.history(GUILD_CHANNEL, "alice"))[-1].content == "the whole reply"
    with pytest.raises(UnknownRequest):
        await memory.finish_reply("never-begun", "x", 1, "local", 0.9, 1)


async def test_concurrent_first_messages_make_one_user(memory, database_url):
    async with Memory(database_url, auto_migrate=False) as second_engine:
        await asyncio.gather(*(
            (memory if i % 2 else second_engine).add_user_message(
                GUILD_CHANNEL, "newcomer", f"message {i}", 2, display_name="New")
            for i in range(20)))
    assert await rows_of(database_url, "discord", "newcomer") == {
        "users": 1, "conversations": 1, "messages": 20, "usage": 0}
    assert len(await memory.history(GUILD_CHANNEL, "newcomer")) == 20


async def test_two_processes_start_and_write_at_once(database_url):
    script = textwrap.dedent(f"""
        import asyncio
        from bots.memory import Memory, Place

        async def main():
            async with Memory({database_url!r}) as memory:
                place = Place("slack", "T1", "C1")
                await asyncio.gather(*(memory.add_user_message(place, "U1", "hi", 1)
                                       for _ in range(10)))

        asyncio.run(main())
    """)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=environment, stderr=asyncio.subprocess.PIPE)
        for _ in range(2)]
    for process in processes:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, stderr.decode()
    assert await rows_of(database_url, "slack", "U1") == {
        "users": 1, "conversations": 1, "messages": 20, "usage": 0}


async def test_pending_replies_for_recovery(memory):
    slack = Place("slack", "T1", "C1", thread_id="1712345678.000100")
    await memory.begin_reply(GUILD_CHANNEL, "alice", "done", {"message_id": 1})
    await memory.finish_reply("done", "ok", 1, "local", 0.9, 10)
    await memory.begin_reply(GUILD_CHANNEL, "alice", "stuck", {"message_id": 2})
    await memory.begin_reply(GUILD_CHANNEL, "bob", "broken")
    await memory.fail_reply("broken", "failed")
    await memory.begin_reply(slack, "U1", "slack-stuck")
    assert await memory.set_reply_ref("slack-stuck", {"channel": "C1", "ts": "1712345679.000200"})
    assert not await memory.set_reply_ref("no-such-request", {"ts": "1"})

    [pending] = await memory.pending_replies("discord")
    assert (pending.request_id, pending.place, pending.user_id) == ("stuck", GUILD_CHANNEL,
                                                                    "alice")
    assert pending.platform_message_ref == {"message_id": 2}
    [slack_pending] = await memory.pending_replies("slack")
    assert slack_pending.place == slack
    assert slack_pending.platform_message_ref == {"channel": "C1", "ts": "1712345679.000200"}

    assert await memory.fail_reply("stuck", "interrupted", "half a rep") is True
    assert await memory.pending_replies("discord") == []
    with pytest.raises(ValueError):
        await memory.fail_reply("slack-stuck", "complete")


async def test_stats(memory):
    assert await memory.stats() == {
        "users": 0, "answered_by_method": {}, "median_latency_ms": None}
    for i, (method, latency) in enumerate([("local", 100), ("local", 300), ("openai", 2000)]):
        await memory.add_user_message(GUILD_CHANNEL, f"user-{i}", "hi", 1)
        await memory.begin_reply(GUILD_CHANNEL, f"user-{i}", f"req-{i}")
        await memory.finish_reply(f"req-{i}", "hello", 1, method, 0.5, latency)
    await memory.begin_reply(GUILD_CHANNEL, "user-0", "pending")
    assert await memory.stats() == {
        "users": 3, "answered_by_method": {"local": 2, "openai": 1}, "median_latency_ms": 300}
    await memory.begin_reply(GUILD_CHANNEL, "user-0", "cached")
    await memory.finish_reply("cached", "hello", 1, "cache", 1.0, 1)
    assert (await memory.stats())["median_latency_ms"] == 200


async def test_system_prompt_and_mode_per_place(memory):
    await memory.set_system_prompt(GUILD_CHANNEL, "alice", "You are a pirate.")
    await memory.set_mode(GUILD_CHANNEL, "alice", "local")
    settings = await memory.settings(GUILD_CHANNEL, "alice")
    assert (settings.system_prompt, settings.mode) == ("You are a pirate.", "local")
    assert (await memory.settings(GUILD_CHANNEL, "bob")).system_prompt is None
    await memory.set_system_prompt(GUILD_CHANNEL, "alice", None)
    assert (await memory.settings(GUILD_CHANNEL, "alice")).system_prompt is None


async def test_clear_history_keeps_settings(memory):
    await memory.set_system_prompt(GUILD_CHANNEL, "alice", "terse")
    await converse(memory, GUILD_CHANNEL, "alice", "r1", "hi", "hello")
    assert await memory.clear_history(GUILD_CHANNEL, "alice") == 2
    assert await memory.history(GUILD_CHANNEL, "alice") == []
    assert (await memory.settings(GUILD_CHANNEL, "alice")).system_prompt == "terse"


async def test_in_memory_sqlite_serves_concurrent_calls():
    async with Memory("sqlite://") as memory:
        await asyncio.gather(*(memory.add_user_message(GUILD_CHANNEL, "alice", f"m{i}", 1)
                               for i in range(20)))
        assert len(await memory.history(GUILD_CHANNEL, "alice")) == 20


@pytest.mark.parametrize("given, expected", [
    ("sqlite:///data/pioneer.db", "sqlite+aiosqlite:///data/pioneer.db"),
    ("sqlite+aiosqlite:///data/pioneer.db", "sqlite+aiosqlite:///data/pioneer.db"),
    ("postgresql://bot:s%40cret@db/pioneer", "postgresql+asyncpg://bot:s%40cret@db/pioneer"),
    ("postgres://bot@db/pioneer?sslmode=require",
     "postgresql+asyncpg://bot@db/pioneer?ssl=require"),
    ("postgresql+psycopg://bot@db/pioneer", "postgresql+asyncpg://bot@db/pioneer"),
])
def test_database_urls_get_async_drivers(given, expected):
    assert async_url(given).render_as_string(hide_password=False) == expected


def test_unsupported_database_url_is_refused():
    with pytest.raises(ValueError, match="unsupported"):
        async_url("mysql://bot@db/pioneer")
