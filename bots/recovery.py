"""After a front-end restart: finish the replies it left half-written, or mark them interrupted with a note."""

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from worker.streams import ReplyAssembler, StreamTimeout

from .edits import RateBudget, ReplyStreamer
from .memory import PendingReply

log = logging.getLogger(__name__)

NO_ANSWER = "…I don't have an answer to that. Could you rephrase?"
INTERRUPTED_NOTE = "⚠️ I restarted before I could finish this reply. Please ask again."
CONCURRENCY = 20  # replies recovered at once


@dataclass
class Resumed:
    """Where a restarted front-end continues a reply: a sink, the messages it already shows, its limits."""

    sink: Any  # a bots.edits.MessageSink
    refs: list
    limit: int
    budget: RateBudget | None = None
    scope: Hashable = None
    min_interval_s: float = 1.0


Resume = Callable[[PendingReply], Awaitable[Resumed | None]]


def locate(sink) -> dict | None:
    """The sink's JSON-able address of the messages it has shown, if it keeps one (sink.locate())."""
    where = getattr(sink, "locate", None)
    return where() if where is not None else None


class LocatedSink:
    """Passes calls through to a sink and saves its address after each new message, so that a restarted
    front-end can find the reply's messages again."""

    def __init__(self, sink, save: Callable[[dict], Awaitable[Any]], saved: dict | None = None):
        self.sink, self._save, self._saved = sink, save, saved

    async def post(self, text: str):
        ref = await self.sink.post(text)
        location = locate(self.sink)
        if location is not None and location != self._saved:
            self._saved = location
            try:
                await self._save(location)
            except Exception as exc:  # the reply matters more than its bookmark
                log.warning("could not record where a reply is shown: %s", exc)
        return ref

    async def edit(self, ref, text: str) -> None:
        await self.sink.edit(ref, text)


async def recover_replies(core, platform: str, resume: Resume | None, follow_s: float,
                          clean: Callable[[str], str] = str) -> Counter:
    """Finish or mark every reply `platform` left pending; see ConversationCore.recover."""
    try:
        pending = await core.memory.pending_replies(platform)
    except Exception:
        log.exception("could not list the %s replies left pending", platform)
        return Counter()
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(reply: PendingReply) -> str:
        async with slots:
            try:
                return await _recover_one(core, reply, resume, follow_s, clean)
            except Exception:
                log.exception("could not recover reply %s", reply.request_id)
                return "error"

    counts = Counter(await asyncio.gather(*(one(reply) for reply in pending)))
    if pending:
        log.info("%d %s replies were left pending at the last stop: %s", len(pending), platform, dict(counts))
    return counts


async def _recover_one(core, pending: PendingReply, resume: Resume | None, follow_s: float, clean) -> str:
    age_s = (datetime.now(timezone.utc) - pending.created_at).total_seconds()
    if age_s > core.settings.task_expires_s + follow_s:
        follow_s = min(follow_s, 1.0)  # no worker starts it any more: replay what exists, wait no longer
    assembler = ReplyAssembler()
    if follow_s > 0:
        try:
            async for event in core.bus.read(pending.request_id, timeout_s=follow_s):
                assembler.add(event)
        except StreamTimeout:
            pass

    streamer = None
    target = await resume(pending) if resume is not None else None
    if target is not None:
        streamer = ReplyStreamer(target.sink, target.limit, min_interval_s=target.min_interval_s,
                                 budget=target.budget, scope=target.scope)
        streamer.adopt(target.refs)

    request_id, text = pending.request_id, clean(assembler.text).strip()
    if assembler.done and assembler.error is None:
        reply, meta = text or NO_ANSWER, assembler.meta
        if streamer is not None:
            await streamer.finish(reply)
        await core.memory.finish_reply(request_id, reply, core.count_tokens(reply), meta.get("method"),
                                       meta.get("confidence"), None)
        return "finished"
    if assembler.error is not None:
        if streamer is not None:
            await streamer.fail(assembler.error)
        await core.memory.fail_reply(request_id, "failed", assembler.error)
        return "failed"
    if streamer is not None:
        if text:
            await streamer.finish(text, footer=INTERRUPTED_NOTE)
        else:
            await streamer.fail(INTERRUPTED_NOTE)
    await core.memory.fail_reply(request_id, "interrupted", text)
    return "interrupted"
