"""Alembic environment: migrates through the bot's own async engine, one locked transaction."""

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from bots.db import Base, async_url, create_engine

# Any constant works; it only has to be the same in every process that migrates.
POSTGRES_MIGRATION_LOCK = 7_031_996_110

config = context.config


def database_url():
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: use migrations.alembic_config(database_url)")
    return async_url(url)


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    if not is_sqlite:
        # Processes that start together upgrade one after the other, not into each other.
        connection.execute(text(f"SELECT pg_advisory_xact_lock({POSTGRES_MIGRATION_LOCK})"))
    context.configure(
        connection=connection, target_metadata=Base.metadata, render_as_batch=is_sqlite)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    # engine.begin() wraps every migration in one transaction, on SQLite too (BEGIN IMMEDIATE).
    engine = create_engine(database_url(), poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
