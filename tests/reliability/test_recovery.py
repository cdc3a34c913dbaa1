"""A restarted front-end finishes the replies it left half-written, or marks them interrupted with a note."""

import asyncio
import sqlite3

from bots.core import ConversationCore, Incoming
from bots.memory import Memory, Place
from bots.recovery import INTERRUPTED_NOTE, Resumed
from tests.helpers import RecordingSink, eventually, make_settings
from worker.streams import MemoryStreamBus

PLACE = Place("slack", "T1", "C1", "1700000000.000100")


class PlatformSink(RecordingSink):
    """A RecordingSink that says where its messages are, as the Slack and Discord sinks do."""

    def locate(self):
        return {"refs": list(range(len(self.messages)))} if self.messages else None


class Worker:
    """Plays the dispatcher and the worker: keeps the payloads; the test writes their streams."""

    def __init__(self, bus: MemoryStreamBus):
        self.bus, self.payloads = bus, []

    async def submit(self, payload):
        self.payloads.append(payload)

    def chunk(self, seq, text, attempt="a1"):
        self.bus.chunk(self.payloads[-1]["request_id"], attempt, seq, text)

    def final(self, attempt="a1"):
        self.bus.final(self.payloads[-1]["request_id"], attempt, {"method": "local", "confidence": 0.9})


def make_core(settings, memory, bus) -> ConversationCore:
    return ConversationCore(settings, memory, Worker(bus), bus, lambda text: len(text.split()), history_budget=500)


def rows(tmp_path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "pioneer.db") as db:
        return db.execute("SELECT role, status, content, platform_message_ref IS NOT NULL FROM messages "
                          "ORDER BY id").fetchall()


async def crash_mid_reply(core: ConversationCore, sink: PlatformSink, text: str = "hello") -> Worker:
    """Answer until the first words are shown and their place is saved, then stop the front-end's coroutine dead,
    as a SIGKILL would."""
    answering = asyncio.create_task(core.answer(Incoming(PLACE, "U1", text), sink, 2000, min_interval_s=0.01))
    worker = core.dispatcher
    await eventually(lambda: worker.payloads)
    worker.chunk(1, "Half of ")
    await eventually(lambda: sink.messages and "Half of" in sink.messages[0])
    await eventually(lambda: pending_location(core.memory))
    answering.cancel()
    await asyncio.gather(answering, return_exceptions=True)
    return worker


async def pending_location(memory: Memory) -> dict | None:
    [pending] = await memory.pending_replies("slack")
    return pending.platform_message_ref


def resume_into(sink: PlatformSink):
    async def resume(pending):
        return Resumed(sink, (pending.platform_message_ref or {}).get("refs", []), 2000, min_interval_s=0.01)

    return resume


async def test_a_reply_the_worker_finished_is_finished_in_the_same_message(tmp_path):
    settings = make_settings(tmp_path, tmp_path)
    async with Memory(settings.resolved_database_url) as memory:
        bus, sink = MemoryStreamBus(), PlatformSink()
        worker = await crash_mid_reply(make_core(settings, memory, bus), sink)
        assert rows(tmp_path) == [("user", "complete", "hello", 0), ("assistant", "pending", "", 1)]
        worker.chunk(2, "the reply, and the rest.")  # the worker goes on while the front-end is down
        worker.final()

        restarted = make_core(settings, memory, bus)
        assert await restarted.recover("slack", resume_into(sink), follow_s=2) == {"finished": 1}
        assert sink.messages == ["Half of the reply, and the rest."]  # the same message, finished
        assert [call[0] for call in sink.calls].count("post") == 1
        assert rows(tmp_path)[1][:3] == ("assistant", "complete", "Half of the reply, and the rest.")
        assert await restarted.recover("slack", resume_into(sink), follow_s=2) == {}  # nothing left pending


async def test_a_reply_still_streaming_is_followed_to_its_end(tmp_path):
    settings = make_settings(tmp_path, tmp_path)
    async with Memory(settings.resolved_database_url) as memory:
        bus, sink = MemoryStreamBus(), PlatformSink()
        worker = await crash_mid_reply(make_core(settings, memory, bus), sink)
        recovering = asyncio.create_task(make_core(settings, memory, bus).recover("slack", resume_into(sink)))
        await asyncio.sleep(0.2)
        assert not recovering.done()  # a live stream is followed, not given up on
        worker.chunk(2, "a slow reply.")
        worker.final()
        assert await asyncio.wait_for(recovering, 5) == {"finished": 1}
        assert sink.messages == ["Half of a slow reply."]


async def test_a_reply_nobody_finishes_is_marked_interrupted_with_a_note(tmp_path):
    settings = make_settings(tmp_path, tmp_path)
    async with Memory(settings.resolved_database_url) as memory:
        bus, sink = MemoryStreamBus(), PlatformSink()
        await crash_mid_reply(make_core(settings, memory, bus), sink)

        counts = await make_core(settings, memory, bus).recover("slack", resume_into(sink), follow_s=0.3)
        assert counts == {"interrupted": 1}
        assert sink.messages == [f"Half of\n{INTERRUPTED_NOTE}"]  # the words shown, then why they stop there
        assert rows(tmp_path)[1][:3] == ("assistant", "interrupted", "Half of")
        assert [m.role for m in await memory.history(PLACE, "U1")] == ["user"]  # no half reply in the prompt


async def test_a_worker_error_replaces_the_half_reply(tmp_path):
    settings = make_settings(tmp_path, tmp_path)
    async with Memory(settings.resolved_database_url) as memory:
        bus, sink = MemoryStreamBus(), PlatformSink()
        worker = await crash_mid_reply(make_core(settings, memory, bus), sink)
        bus.error(worker.payloads[-1]["request_id"], "a1", "Sorry, that took too long. Please try again.", "timeout")

        assert await make_core(settings, memory, bus).recover("slack", resume_into(sink), follow_s=2) == {"failed": 1}
        assert sink.messages == ["Sorry, that took too long. Please try again."]
        assert rows(tmp_path)[1][:2] == ("assistant", "failed")


async def test_a_reply_cut_off_before_its_first_message_gets_a_new_one(tmp_path):
    settings = make_settings(tmp_path, tmp_path)
    async with Memory(settings.resolved_database_url) as memory:
        bus = MemoryStreamBus()
        core = make_core(settings, memory, bus)
        answering = asyncio.create_task(core.answer(Incoming(PLACE, "U1", "hi"), PlatformSink(), 2000))
        await eventually(lambda: core.dispatcher.payloads)
        answering.cancel()  # nothing was shown yet: no message to find
        await asyncio.gather(answering, return_exceptions=True)
        core.dispatcher.chunk(1, "A whole reply.")
        core.dispatcher.final()

        fresh = PlatformSink()
        assert await make_core(settings, memory, bus).recover("slack", resume_into(fresh), follow_s=2) == {
            "finished": 1}
        assert fresh.messages == ["A whole reply."]


async def test_the_console_marks_its_cut_off_replies_interrupted_without_waiting(tmp_path):
    settings = make_settings(tmp_path, tmp_path)
    async with Memory(settings.resolved_database_url) as memory:
        bus = MemoryStreamBus()
        core = make_core(settings, memory, bus)
        console = Place("console", "", "terminal", "")
        answering = asyncio.create_task(core.answer(Incoming(console, "me", "hi"), RecordingSink(), 10_000))
        await eventually(lambda: core.dispatcher.payloads)
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)

        assert await make_core(settings, memory, bus).recover("slack", follow_s=0) == {}  # other platforms' only
        assert await make_core(settings, memory, bus).recover("console", follow_s=0) == {"interrupted": 1}
        assert rows(tmp_path)[1][:2] == ("assistant", "interrupted")


async def test_a_rewritten_long_reply_is_laid_out_again_in_the_same_messages():
    # A redelivered task or a fallback starts the reply over; parts already finished are rewritten, not refused.
    from bots.edits import ReplyStreamer
    from bots.splitting import join_parts

    sink = RecordingSink()
    streamer = ReplyStreamer(sink, limit=120, min_interval_s=0.0)
    first = " ".join(f"first-attempt-word-{n}" for n in range(20))  # spans several messages
    await streamer.update(first)
    await eventually(lambda: len(sink.messages) >= 3)
    second = " ".join(f"second-{n}" for n in range(30))
    await streamer.update(second[:60])
    await streamer.update(second)
    await streamer.finish(second)
    parts = [text for text in sink.messages if "second" in text]
    assert join_parts(parts) == second and all("first-attempt" not in part for part in sink.messages[:len(parts)])


async def test_discord_finishes_and_marks_its_replies_through_the_real_client(tmp_path, tiny_model_dir):
    from tests.integration.test_discord import running_bot

    async with running_bot(tmp_path, tiny_model_dir, reply_timeout_s=0.5) as world:
        fake, memory, bus = world.fake, world.service.memory, world.service.bus
        place, user = world.place(fake.channel_id), fake.user["id"]
        half = await world.bot.get_partial_messageable(int(fake.channel_id)).send("Half of ▌")
        for request_id, location in (("shown", {"channel_id": fake.channel_id, "message_ids": [str(half.id)]}),
                                     ("not-shown", None)):
            await memory.add_user_message(place, user, f"question {request_id}", 2, request_id=request_id)
            await memory.begin_reply(place, user, request_id, location)
        bus.chunk("shown", "a1", 1, "Half of the reply, finished after the restart.")
        bus.final("shown", "a1", {"method": "local", "confidence": 0.5})
        bus.chunk("not-shown", "a1", 1, "Cut off")  # and its worker died

        await world.bot.recover_replies()

        assert fake.message(half.id)["content"] == "Half of the reply, finished after the restart."
        [_, new] = world.replies(fake.channel_id)
        assert new["content"] == f"Cut off\n{INTERRUPTED_NOTE}" and new["allowed_mentions"] == {"parse": []}
        assert await memory.pending_replies("discord") == []
        assert [m.content for m in await memory.history(place, user) if m.role == "assistant"] == [
            "Half of the reply, finished after the restart."]
