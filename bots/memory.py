"""Per-user conversation memory in SQL (SQLite or PostgreSQL), async, one session per call."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from alembic import command
from sqlalchemy import delete, func, select, update
from sqlalchemy import exc as sql_errors
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bots.db import (
    Base,
    Conversation,
    Message,
    Usage,
    User,
    async_url,
    create_engine,
    is_sqlite_memory,
    utcnow,
)
from migrations import alembic_config

FAILURE_STATUSES = ("interrupted", "failed")
DISPLAY_NAME_MAX = 200
RETRY_S = 15.0  # how long a call waits out an unreachable or restarting database before it fails

log = logging.getLogger(__name__)

# Alembic keeps its running context in module globals: one upgrade at a time per process.
_migration_lock = threading.Lock()


class UnknownRequest(LookupError):
    """No reply was begun for this request id."""


@dataclass(frozen=True)
class Place:
    """Where a conversation happens: workspace is a guild or Slack team, '' for DMs and console."""

    platform: str
    workspace_id: str = ""
    channel_id: str = ""
    thread_id: str = ""


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str
    token_count: int
    method: str | None
    confidence: float | None
    created_at: datetime


@dataclass(frozen=True)
class PendingReply:
    """An assistant reply that was begun and never finished: to finish or mark after a restart."""

    request_id: str
    place: Place
    user_id: str
    content: str
    platform_message_ref: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class ConversationSettings:
    system_prompt: str | None
    mode: str | None


def run_migrations(database_url: str | URL) -> None:
    """Upgrade the database to the newest schema (creates a SQLite file and its directory)."""
    with _migration_lock:
        command.upgrade(alembic_config(async_url(database_url)), "head")


async def migrate(database_url: str | URL) -> None:
    """run_migrations for callers inside an event loop (Alembic's env.py runs its own loop)."""
    await asyncio.to_thread(run_migrations, database_url)


def user_message_key(request_id: str) -> str:
    """The request_id column of a user's message: derived from its reply's, which is unique too."""
    return f"{request_id}:user"


def is_transient(error: BaseException) -> bool:
    """A failure that a later try may not meet: the database unreachable, restarting, or its connection lost."""
    if isinstance(error, (OSError, TimeoutError)):
        return True
    if isinstance(error, sql_errors.DBAPIError):
        return error.connection_invalidated or isinstance(error, (sql_errors.OperationalError,
                                                                  sql_errors.InterfaceError))
    return False


def retried(method):
    """Run an idempotent Memory call again while the database is briefly away (a restart), for up to retry_s."""

    @functools.wraps(method)
    async def call(self, *args, **kwargs):
        deadline, pause = time.monotonic() + self.retry_s, 0.1
        while True:
            try:
                return await method(self, *args, **kwargs)
            except Exception as error:
                if not is_transient(error) or time.monotonic() + pause > deadline:
                    raise
                log.warning("database unavailable (%s: %s); trying %s again in %.1f s",
                            type(error).__name__, str(error)[:200], method.__name__, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    return call


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Memory:
    """Async store of users, conversations, messages and usage."""

    def __init__(self, database_url: str | URL, *, auto_migrate: bool = True, retry_s: float = RETRY_S) -> None:
        self.url = async_url(database_url)
        self.auto_migrate = auto_migrate
        self.retry_s = retry_s  # the reply path's calls ride out a database restart this long
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    async def start(self) -> None:
        """Connect, and bring the schema up to date unless auto_migrate is off."""
        if self._engine is not None:
            return
        self._engine = create_engine(self.url)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        if not self.auto_migrate:
            return
        if is_sqlite_memory(self.url):
            async with self._engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
        else:
            await migrate(self.url)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = self._sessions = None

    async def ping(self) -> bool:
        """True when the database answers (for /healthz)."""
        async with self._session() as session:
            await session.execute(select(1))
        return True

    async def __aenter__(self) -> Memory:
        await self.start()
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    def _session(self) -> AsyncSession:
        if self._sessions is None:
            raise RuntimeError("Memory.start() has not been awaited")
        return self._sessions()

    def _insert(self, model):
        dialect = postgresql if self.url.get_backend_name() == "postgresql" else sqlite
        return dialect.insert(model)

    async def _user_id(self, session: AsyncSession, platform: str, platform_user_id: str,
                       display_name: str | None = None) -> int:
        """Get or create the user; a concurrent creator makes the INSERT a no-op, not an error."""
        if display_name is not None:
            display_name = display_name[:DISPLAY_NAME_MAX]
        inserted = await session.scalar(
            self._insert(User)
            .values(platform=platform, platform_user_id=platform_user_id,
                    display_name=display_name, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["platform", "platform_user_id"])
            .returning(User.id))
        if inserted is not None:
            return inserted
        row = (await session.execute(
            select(User.id, User.display_name)
            .where(User.platform == platform, User.platform_user_id == platform_user_id))).one()
        if display_name is not None and display_name != row.display_name:
            await session.execute(
                update(User).where(User.id == row.id).values(display_name=display_name)
                .execution_options(synchronize_session=False))
        return row.id

    async def _conversation_id(self, session: AsyncSession, place: Place, user_id: str,
                               display_name: str | None = None) -> int:
        user_pk = await self._user_id(session, place.platform, str(user_id), display_name)
        key = dict(user_id=user_pk, platform=place.platform, workspace_id=place.workspace_id,
                   channel_id=place.channel_id, thread_id=place.thread_id)
        now = utcnow()
        inserted = await session.scalar(
            self._insert(Conversation).values(**key, created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=list(key))
            .returning(Conversation.id))
        if inserted is not None:
            return inserted
        return await session.scalar(select(Conversation.id).filter_by(**key))

    async def _find_conversation_id(self, session: AsyncSession, place: Place,
                                    user_id: str) -> int | None:
        return await session.scalar(
            select(Conversation.id).join(User, User.id == Conversation.user_id).where(
                User.platform == place.platform, User.platform_user_id == str(user_id),
                Conversation.platform == place.platform,
                Conversation.workspace_id == place.workspace_id,
                Conversation.channel_id == place.channel_id,
                Conversation.thread_id == place.thread_id))

    async def _touch(self, session: AsyncSession, conversation_id: int) -> None:
        await session.execute(
            update(Conversation).where(Conversation.id == conversation_id)
            .values(updated_at=utcnow()).execution_options(synchronize_session=False))

    @retried
    async def add_user_message(self, place: Place, user_id: str, text: str, token_count: int,
                               display_name: str | None = None, request_id: str | None = None) -> int:
        """Store what the user said; returns the message id. With the request_id of its reply, storing it
        again (a retry after a lost connection) keeps one row."""
        key = None if request_id is None else user_message_key(request_id)
        async with self._session() as session, session.begin():
            conversation_id = await self._conversation_id(session, place, user_id, display_name)
            message_id = await session.scalar(
                self._insert(Message).values(
                    conversation_id=conversation_id, role="user", content=text, request_id=key,
                    token_count=token_count, status="complete", created_at=utcnow())
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(Message.id))
            if message_id is None:
                return await session.scalar(select(Message.id).where(Message.request_id == key))
            await self._touch(session, conversation_id)
            return message_id

    @retried
    async def begin_reply(self, place: Place, user_id: str, request_id: str,
                          platform_message_ref: dict[str, Any] | None = None) -> int:
        """Create the pending assistant row of request_id (or return the existing one's id)."""
        ref = None if platform_message_ref is None else json.dumps(platform_message_ref)
        async with self._session() as session, session.begin():
            conversation_id = await self._conversation_id(session, place, user_id)
            inserted = await session.scalar(
                self._insert(Message).values(
                    conversation_id=conversation_id, role="assistant", content="", token_count=0,
                    request_id=request_id, status="pending", platform_message_ref=ref,
                    created_at=utcnow())
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(Message.id))
            if inserted is not None:
                return inserted
            return await session.scalar(select(Message.id).where(Message.request_id == request_id))

    async def set_reply_ref(self, request_id: str, platform_message_ref: dict[str, Any]) -> bool:
        """Record where the reply of request_id is shown; returns whether that reply exists."""
        async with self._session() as session, session.begin():
            result = await session.execute(
                update(Message).where(Message.request_id == request_id)
                .values(platform_message_ref=json.dumps(platform_message_ref))
                .execution_options(synchronize_session=False))
            return result.rowcount > 0

    @retried
    async def finish_reply(self, request_id: str, content: str, token_count: int,
                           method: str | None, confidence: float | None,
                           latency_ms: int | None) -> int:
        """Complete the reply of request_id; a reply completes once, later calls change nothing.

        A pending, interrupted or failed reply can be completed (the final text arrived after
        all). Returns the message id; raises UnknownRequest if begin_reply never ran for it.
        """
        async with self._session() as session, session.begin():
            completed = await session.execute(
                update(Message)
                .where(Message.request_id == request_id, Message.status != "complete")
                .values(content=content, token_count=token_count, method=method,
                        confidence=confidence, latency_ms=latency_ms, status="complete")
                .returning(Message.id, Message.conversation_id)
                .execution_options(synchronize_session=False))
            row = completed.one_or_none()
            if row is not None:
                await self._touch(session, row.conversation_id)
                return row.id
            message_id = await session.scalar(
                select(Message.id).where(Message.request_id == request_id))
            if message_id is None:
                raise UnknownRequest(request_id)
            return message_id

    @retried
    async def fail_reply(self, request_id: str, status: str, content: str = "") -> bool:
        """Mark an unfinished reply 'interrupted' or 'failed', keeping any partial content.

        A completed reply stays complete; returns whether a row changed.
        """
        if status not in FAILURE_STATUSES:
            raise ValueError(f"status must be one of {FAILURE_STATUSES}, not {status!r}")
        async with self._session() as session, session.begin():
            result = await session.execute(
                update(Message)
                .where(Message.request_id == request_id, Message.status != "complete")
                .values(status=status, content=content)
                .execution_options(synchronize_session=False))
            return result.rowcount > 0

    @retried
    async def pending_replies(self, platform: str) -> list[PendingReply]:
        """Replies on this platform still pending, oldest first, for a restarted front-end."""
        async with self._session() as session:
            rows = await session.execute(
                select(Message.request_id, Message.content, Message.platform_message_ref,
                       Message.created_at, Conversation.platform, Conversation.workspace_id,
                       Conversation.channel_id, Conversation.thread_id, User.platform_user_id)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .join(User, User.id == Conversation.user_id)
                .where(Message.status == "pending", Conversation.platform == platform)
                .order_by(Message.id))
            return [
                PendingReply(
                    request_id=row.request_id,
                    place=Place(row.platform, row.workspace_id, row.channel_id, row.thread_id),
                    user_id=row.platform_user_id,
                    content=row.content,
                    platform_message_ref=(None if row.platform_message_ref is None
                                          else json.loads(row.platform_message_ref)),
                    created_at=_aware(row.created_at))
                for row in rows]

    @retried
    async def history(self, place: Place, user_id: str, limit: int = 200) -> list[StoredMessage]:
        """The last `limit` complete messages of this user in this place, oldest first."""
        async with self._session() as session:
            conversation_id = await self._find_conversation_id(session, place, user_id)
            if conversation_id is None:
                return []
            rows = (await session.execute(
                select(Message.role, Message.content, Message.token_count, Message.method,
                       Message.confidence, Message.created_at)
                .where(Message.conversation_id == conversation_id, Message.status == "complete")
                .order_by(Message.id.desc())
                .limit(limit))).all()
        return [StoredMessage(row.role, row.content, row.token_count, row.method,
                              row.confidence, _aware(row.created_at))
                for row in reversed(rows)]

    @retried
    async def settings(self, place: Place, user_id: str) -> ConversationSettings:
        async with self._session() as session:
            conversation_id = await self._find_conversation_id(session, place, user_id)
            if conversation_id is None:
                return ConversationSettings(None, None)
            row = (await session.execute(
                select(Conversation.system_prompt, Conversation.mode)
                .where(Conversation.id == conversation_id))).one()
            return ConversationSettings(row.system_prompt, row.mode)

    async def set_system_prompt(self, place: Place, user_id: str, text: str | None) -> None:
        """Set (or with None clear) the system prompt of this user's conversation here."""
        await self._set_conversation(place, user_id, system_prompt=text)

    async def set_mode(self, place: Place, user_id: str, mode: str | None) -> None:
        await self._set_conversation(place, user_id, mode=mode)

    async def _set_conversation(self, place: Place, user_id: str, **values) -> None:
        async with self._session() as session, session.begin():
            conversation_id = await self._conversation_id(session, place, user_id)
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id)
                .values(**values, updated_at=utcnow())
                .execution_options(synchronize_session=False))

    async def clear_history(self, place: Place, user_id: str) -> int:
        """Delete this user's messages in this place (settings stay); returns how many."""
        async with self._session() as session, session.begin():
            conversation_id = await self._find_conversation_id(session, place, user_id)
            if conversation_id is None:
                return 0
            result = await session.execute(
                delete(Message).where(Message.conversation_id == conversation_id)
                .execution_options(synchronize_session=False))
            return result.rowcount

    async def forget(self, platform: str, user_id: str) -> int:
        """Delete the user and every row that is theirs; returns the number of rows deleted."""
        async with self._session() as session, session.begin():
            user_pk = await session.scalar(select(User.id).where(
                User.platform == platform, User.platform_user_id == str(user_id)))
            if user_pk is None:
                return 0
            their_conversations = select(Conversation.id).where(Conversation.user_id == user_pk)
            deleted = 0
            for statement in (
                delete(Message).where(Message.conversation_id.in_(their_conversations)),
                delete(Conversation).where(Conversation.user_id == user_pk),
                delete(Usage).where(Usage.user_id == user_pk),
                delete(User).where(User.id == user_pk),
            ):
                result = await session.execute(
                    statement.execution_options(synchronize_session=False))
                deleted += result.rowcount
            return deleted

    async def record_usage(self, platform: str, user_id: str, request_id: str | None,
                           method: str, prompt_tokens: int, completion_tokens: int) -> None:
        async with self._session() as session, session.begin():
            user_pk = await self._user_id(session, platform, str(user_id))
            await session.execute(
                self._insert(Usage).values(
                    user_id=user_pk, request_id=request_id, method=method,
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    created_at=utcnow()))

    async def usage_of(self, platform: str, user_id: str) -> list[dict[str, Any]]:
        """The user's recorded token usage, oldest first."""
        async with self._session() as session:
            rows = await session.execute(
                select(Usage.request_id, Usage.method, Usage.prompt_tokens, Usage.completion_tokens)
                .join(User, User.id == Usage.user_id)
                .where(User.platform == platform, User.platform_user_id == str(user_id)).order_by(Usage.id))
            return [dict(row._mapping) for row in rows]

    async def stats(self) -> dict[str, Any]:
        """{'users': n, 'answered_by_method': {method: n}, 'median_latency_ms': ms or None}."""
        answered = (Message.role == "assistant", Message.status == "complete")
        async with self._session() as session:
            users = await session.scalar(select(func.count()).select_from(User))
            by_method = (await session.execute(
                select(Message.method, func.count()).where(*answered)
                .group_by(Message.method))).all()
            timed = (*answered, Message.latency_ms.is_not(None))
            timed_count = await session.scalar(
                select(func.count()).select_from(Message).where(*timed))
            median = None
            if timed_count:
                # Portable median: the middle one or two values in sorted order.
                middle = (await session.scalars(
                    select(Message.latency_ms).where(*timed).order_by(Message.latency_ms)
                    .offset((timed_count - 1) // 2).limit(2 - timed_count % 2))).all()
                median = sum(middle) / len(middle)
        return {
            "users": users,
            "answered_by_method": {method or "unknown": count for method, count in by_method},
            "median_latency_ms": median,
        }
