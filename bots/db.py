"""SQL schema of the conversation memory, and the async engine that talks to it."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool

ROLES = ("system", "user", "assistant")
STATUSES = ("complete", "pending", "interrupted", "failed")

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_POSTGRES_DRIVERS = {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2",
                     "postgresql+pg8000", "postgresql+asyncpg"}
_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("platform", "platform_user_id", name="uq_users_platform_user"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_user_id: Mapped[str] = mapped_column(String(100))
    display_name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp())


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("user_id", "platform", "workspace_id", "channel_id", "thread_id",
                         name="uq_conversations_place"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id", ondelete="CASCADE"))
    platform: Mapped[str] = mapped_column(String(32))
    workspace_id: Mapped[str] = mapped_column(String(100), default="", server_default="")
    channel_id: Mapped[str] = mapped_column(String(100))
    thread_id: Mapped[str] = mapped_column(String(100), default="", server_default="")
    system_prompt: Mapped[str | None] = mapped_column(Text)
    mode: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp())


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint("role IN ('system', 'user', 'assistant')", name="role"),
        CheckConstraint("status IN ('complete', 'pending', 'interrupted', 'failed')",
                        name="status"),
        Index(None, "conversation_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    method: Mapped[str | None] = mapped_column(String(32))
    confidence: Mapped[float | None] = mapped_column(Float)
    request_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    status: Mapped[str] = mapped_column(
        String(16), default="complete", server_default="complete", index=True)
    platform_message_ref: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp(),
        index=True)


class Usage(Base):
    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    request_id: Mapped[str | None] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp())


def async_url(database_url: str | URL) -> URL:
    """Return the URL with its async driver: aiosqlite for SQLite, asyncpg for PostgreSQL."""
    url = make_url(database_url)
    if url.drivername in _SQLITE_DRIVERS:
        return url.set(drivername="sqlite+aiosqlite")
    if url.drivername in _POSTGRES_DRIVERS:
        url = url.set(drivername="postgresql+asyncpg")
        if "sslmode" in url.query:  # libpq spelling; asyncpg calls it ssl
            url = url.update_query_dict({"ssl": url.query["sslmode"]}).difference_update_query(
                ["sslmode"])
        return url
    raise ValueError(f"unsupported database URL: {url.drivername}:// (use sqlite or postgresql)")


def is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def create_engine(database_url: str | URL, **engine_options) -> AsyncEngine:
    """Create an async engine; for SQLite also create the file's directory and set it up.

    SQLite connections get foreign keys on, WAL, a 30 s busy timeout and BEGIN IMMEDIATE
    transactions: a deferred transaction that reads and then writes fails at once with
    "database is locked" when another connection writes first, instead of waiting.
    """
    url = async_url(database_url)
    if url.get_backend_name() != "sqlite":
        engine_options.setdefault("pool_pre_ping", True)
        return create_async_engine(url, **engine_options)

    in_memory = is_sqlite_memory(url)
    if in_memory and "poolclass" not in engine_options:
        # One shared connection that callers queue for, so the database outlives each call.
        engine_options.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    elif not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine_options.setdefault("connect_args", {"timeout": 30})
    engine = create_async_engine(url, **engine_options)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure_sqlite(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN; "begin" below replaces it
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if not in_memory:
            _use_wal(cursor)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _use_wal(cursor, attempts: int = 200, pause_s: float = 0.05) -> None:
    """Switch the file to WAL (it stays so). Switching needs the file to itself and fails at once with "database
    is locked", busy timeout or not, while another process opens it too: try again for up to 10 s."""
    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the driver's OperationalError, wrapped by the async adapter
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(pause_s)
