"""The Slack front-end end to end: the real slack-bolt app and slack-sdk client against the fake Slack."""

import asyncio
import contextlib
import statistics
import time
import uuid
from dataclasses import dataclass

from bots.app import Service, build_service
from bots.memory import Memory, Place
from bots.slack_bot import build_app, serve_http
from bots.slack_io import neutralise
from bots.splitting import join_parts, unclosed_fence
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.fakes.slack_server import FakeSlack, post_event, post_slash_command
from tests.helpers import (eventually, free_port, make_settings, shown, start_front_end, start_worker, stop,
                           wait_for_workers)

SECRET = "test-signing-secret"
MARKER = "▌"
QUICK = Scenario.reply(None, chunks=1)  # an echo, for tests about where and whether the bot answers
LIVE = ("<!channel>", "<!here>", "<!everyone>", "<!subteam", "<@")


@dataclass
class World:
    fake: FakeSlack
    service: Service
    url: str
    openai: FakeOpenAI | None

    async def mention(self, channel: str, text: str, user: str = "U1", thread_ts: str | None = None) -> dict:
        asked = self.fake.record_user_message(channel, f"<@{self.fake.bot_user_id}> {text}", user=user,
                                              thread_ts=thread_ts)
        event = {"type": "app_mention", "user": user, "text": asked["text"], "ts": asked["ts"], "channel": channel,
                 "event_ts": asked["ts"], **({"thread_ts": thread_ts} if thread_ts else {})}
        reply = await self.fake.post_event(self.url, SECRET, event)
        assert reply.status == 200 and not reply.too_slow
        return asked

    async def message(self, channel: str, text: str, user: str = "U1", thread_ts: str | None = None,
                      channel_type: str = "channel") -> dict:
        said = self.fake.record_user_message(channel, text, user=user, thread_ts=thread_ts)
        event = {"type": "message", "user": user, "text": text, "ts": said["ts"], "channel": channel,
                 "event_ts": said["ts"], "channel_type": channel_type}
        if thread_ts:
            parent = self.fake.message(channel, thread_ts)
            event |= {"thread_ts": thread_ts, "parent_user_id": parent["user"] if parent else user}
        assert (await self.fake.post_event(self.url, SECRET, event)).status == 200
        return said

    async def command(self, command: str, text: str = "", user: str = "U1", channel: str = "C1"):
        reply = await self.fake.post_slash_command(self.url, SECRET, command, text, user, channel)
        assert reply.status == 200 and not reply.too_slow
        return reply

    def replies(self, channel: str, thread_ts: str | None = None) -> list[dict]:
        return [m for m in self.fake.messages_in(channel)
                if m["user"] == self.fake.bot_user_id and m["thread_ts"] == thread_ts]

    async def finished(self, place: Place, user: str, answers: int = 1):
        """Wait until `answers` replies to `user` are stored in memory (they are stored after the final update)."""

        async def stored():
            history = await self.service.memory.history(place, user)
            return history if sum(m.role == "assistant" for m in history) >= answers else None

        return await eventually(stored, timeout=20, interval=0.05)


@contextlib.asynccontextmanager
async def running_app(tmp_path, model_dir, *, reply: Scenario | None = None, fake: FakeSlack | None = None,
                      **overrides):
    """Fake Slack (and a fake OpenAI when `reply` is given), the embedded service, and the bolt app on HTTP."""
    async with contextlib.AsyncExitStack() as stack:
        fake = await stack.enter_async_context(fake or FakeSlack())
        openai = None
        if reply is not None:
            openai = await stack.enter_async_context(FakeOpenAI(default=reply))
            overrides |= dict(attention_mode="openai", openai_base_url=openai.base_url, openai_api_key="sk-test-key")
        settings = make_settings(tmp_path, model_dir, slack_bot_token=fake.token, slack_signing_secret=SECRET,
                                 slack_api_url=fake.api_url, **overrides)
        service = await build_service(settings)
        stack.push_async_callback(service.close)
        runner, port = await serve_http(build_app(service.core, settings), "127.0.0.1", 0)
        stack.push_async_callback(runner.cleanup)
        yield World(fake, service, f"http://127.0.0.1:{port}/slack/events", openai)


def report(name: str, world: World, asked: list[dict]) -> dict:
    """Updates per message, 429s, and latency from each user message to the placeholder and to the first reply text."""
    fake = world.fake
    bot_messages = [m for msgs in fake.messages.values() for m in msgs if m["user"] == fake.bot_user_id]
    to_placeholder, to_text = [], []
    for message in asked:
        [first] = [m for m in world.replies(message["channel"], message["ts"])][:1] or [None]
        if first is None:
            continue
        to_placeholder.append((first["time"] - message["time"]) * 1000)
        shown = first["edits"][0]["time"] if first["edits"] else first["time"]  # the placeholder's first update
        to_text.append((shown - message["time"]) * 1000)
    figures = {
        "messages": len(bot_messages),
        "updates_per_message": statistics.mean(len(m["edits"]) for m in bot_messages),
        "max_updates": max(len(m["edits"]) for m in bot_messages),
        "429s": fake.rate_limited_count,
        "placeholder_ms_median": statistics.median(to_placeholder) if to_placeholder else None,
        "first_text_ms_median": statistics.median(to_text) if to_text else None,
        "first_text_ms_max": max(to_text) if to_text else None,
    }
    print(f"\nMETRICS slack {name}: {figures}")
    return figures


def api_texts(fake: FakeSlack) -> list[str]:
    return [r["params"].get("text", "") for r in fake.requests if r["method"] in ("chat.postMessage", "chat.update")]


async def test_mention_streams_a_reply_by_updating_and_remembers_it(tmp_path, tiny_model_dir):
    answer = "Paris is the capital of France, and it has been for a very long time indeed."
    async with running_app(tmp_path, tiny_model_dir, reply=Scenario.reply(answer, chunks=5, delay_s=0.4)) as world:
        asked = await world.mention("C1", "what is the capital of France?")
        history = await world.finished(Place("slack", "T1", "C1", asked["ts"]), "U1")

        [reply] = world.replies("C1", asked["ts"])  # in a thread under the mention
        assert reply["text"] == answer
        texts = [e["text"] for e in reply["edits"]]
        assert len(texts) >= 2 and all(t.endswith(MARKER) for t in texts[:-1])  # placeholder, then growing text
        assert [(m.role, m.content) for m in history] == [("user", "what is the capital of France?"),
                                                          ("assistant", answer)]
        figures = report("streaming", world, [asked])
        assert figures["429s"] == 0 and figures["placeholder_ms_median"] < 1000


async def test_twenty_concurrent_conversations_get_no_429(tmp_path, tiny_model_dir):
    # chat.update at Slack's Tier 3 (50 a minute for the workspace), chat.postMessage 1 a second per channel.
    reply = Scenario.reply(None, chunks=4, delay_s=0.2)
    async with running_app(tmp_path, tiny_model_dir, reply=reply, worker_concurrency=20) as world:
        users = [(f"U{100 + n}", f"C{100 + n}") for n in range(20)]
        for user, _ in users:
            world.fake.add_user(user, f"user-{user}")
        asked = await asyncio.gather(*(world.mention(channel, f"hello number {n}", user)
                                       for n, (user, channel) in enumerate(users)))
        await asyncio.gather(*(world.finished(Place("slack", "T1", channel, a["ts"]), user)
                               for (user, channel), a in zip(users, asked)))

        for n, ((user, channel), a) in enumerate(zip(users, asked)):
            assert [m["text"] for m in world.replies(channel, a["ts"])] == [f"(fake OpenAI) You said: hello number {n}"]
        figures = report("20 concurrent", world, asked)
        assert world.fake.rate_limited_count == 0 and figures["messages"] == 20


def long_reply_with_code() -> str:
    prose = "This paragraph explains the next piece of code in plain words, so that the reply reads naturally. "
    block = "\n".join(f"def step_{n}(value):\n    return value * {n} + 1  # one small step" for n in range(45))
    return "\n\n".join([prose * 3, f"```python\n{block}\n```", prose * 5, f"```\n{block[:1500]}\n```", prose * 6]).strip()


async def test_a_long_reply_with_code_is_split_with_balanced_fences(tmp_path, tiny_model_dir):
    text = long_reply_with_code()
    assert 5500 < len(text) < 6500
    async with running_app(tmp_path, tiny_model_dir, reply=Scenario.reply(text, chunks=30, delay_s=0.02)) as world:
        asked = await world.mention("C1", "show me the code")
        history = await world.finished(Place("slack", "T1", "C1", asked["ts"]), "U1")

        parts = [m["text"] for m in world.replies("C1", asked["ts"])]
        assert len(parts) >= 2 and all(len(part) <= 3500 for part in parts)
        assert all(unclosed_fence(part) is None for part in parts)
        assert join_parts(parts) == text == history[-1].content
        report("6,000-char reply", world, [asked])
        assert world.fake.rate_limited_count == 0


async def test_broadcasts_and_mentions_in_model_output_ping_nobody(tmp_path, tiny_model_dir):
    answer = "Heads up <!channel>, <!here> and <!everyone>: cc <@U1> and <!subteam^S123|oncall>. Also @channel."
    async with running_app(tmp_path, tiny_model_dir, reply=Scenario.reply(answer, chunks=3, delay_s=0.3)) as world:
        asked = await world.mention("C1", "ping everybody please")
        await world.finished(Place("slack", "T1", "C1", asked["ts"]), "U1")

        texts = api_texts(world.fake)
        assert len(texts) >= 2 and not any(live in text for text in texts for live in LIVE)
        [reply] = world.replies("C1", asked["ts"])
        assert reply["text"] == answer.replace("<", "&lt;")


async def test_where_it_answers_dm_thread_and_ask(tmp_path, tiny_model_dir):
    async with running_app(tmp_path, tiny_model_dir, reply=QUICK) as world:
        fake = world.fake
        # A DM needs no mention and is answered in the conversation itself.
        await world.message("D1", "a private question", channel_type="im")
        await world.finished(Place("slack", "T1", "D1", ""), "U1")
        assert len(world.replies("D1")) == 1

        # Plain chatter and threads the bot is not in are ignored; threads it answered in are followed.
        other = fake.record_user_message("C1", "someone else's thread")
        await world.message("C1", "just chatting")
        await world.message("C1", "a reply there", thread_ts=other["ts"])
        asked = await world.mention("C1", "start a thread")
        place = Place("slack", "T1", "C1", asked["ts"])
        await world.finished(place, "U1")
        await world.message("C1", "and a follow-up", thread_ts=asked["ts"])
        history = await world.finished(place, "U1", answers=2)
        assert [m.content for m in history if m.role == "user"] == ["start a thread", "and a follow-up"]
        assert world.replies("C1", other["ts"]) == [] and world.replies("C1") == []

        # /ask: acknowledged at once, answered in the channel under the quoted question.
        await world.command("/ask", "what is <!channel> attention?", user="U1", channel="C2")
        await world.finished(Place("slack", "T1", "C2", ""), "U1")
        [answer] = world.replies("C2")
        assert answer["text"].startswith(">what is &lt;!channel> attention?\n") and MARKER not in answer["text"]


async def test_a_redelivered_event_or_replayed_command_is_answered_once(tmp_path, tiny_model_dir):
    async with running_app(tmp_path, tiny_model_dir, reply=QUICK) as world:
        fake, memory = world.fake, world.service.memory
        asked = fake.record_user_message("C1", f"<@{fake.bot_user_id}> only once please")
        event = {"type": "app_mention", "user": "U1", "text": asked["text"], "ts": asked["ts"], "channel": "C1",
                 "event_ts": asked["ts"]}
        replies = [await fake.post_event(world.url, SECRET, event, event_id="EvONCE1")]
        thread, channel = Place("slack", "T1", "C1", asked["ts"]), Place("slack", "T1", "C2", "")
        await world.finished(thread, "U1")
        # Slack's retries of that delivery (its ack was late, say) and a replay within the signature window: acked
        # at once, and nothing else happens.
        replies += [await fake.post_event(world.url, SECRET, event, event_id="EvONCE1", retry_num=n) for n in (1, 2)]
        replies.append(await fake.post_event(world.url, SECRET, event, event_id="EvONCE1"))
        replies += [await fake.post_slash_command(world.url, SECRET, "/ask", "once more", "U1", "C2",
                                                  trigger_id="1700000000.once") for _ in range(2)]
        # New deliveries after them in the same places; a place's messages are answered in order, so once these
        # are answered a wrongly accepted repeat would have been too.
        await world.mention("C1", "a new question", thread_ts=asked["ts"])
        await world.command("/ask", "a new command", channel="C2")

        async def user_messages(place):
            history = await memory.history(place, "U1")
            answered = history and history[-1].role == "assistant" and "new" in history[-2].content
            return [m.content for m in history if m.role == "user"] if answered else None

        assert await eventually(lambda: user_messages(thread), timeout=20) == ["only once please", "a new question"]
        assert await eventually(lambda: user_messages(channel), timeout=20) == ["once more", "a new command"]
        assert all(reply.status == 200 and not reply.too_slow for reply in replies)
        assert len(world.replies("C1", asked["ts"])) == 2 and len(world.replies("C2")) == 2
        assert world.openai.chat_calls == 4


async def test_info_is_for_admins_and_ephemeral(tmp_path, tiny_model_dir):
    async with running_app(tmp_path, tiny_model_dir, admin_user_ids=["UADMIN"]) as world:
        for user in ("U2", "UADMIN", "UOWNER"):
            world.fake.add_user(user, user.lower())
        world.fake.users["UOWNER"]["is_owner"] = True

        for user in ("U2", "UADMIN", "UOWNER"):
            await world.command("/info", user=user)
        await eventually(lambda: len(world.fake.responses) == 3)
        answers = [r["json"] for r in world.fake.responses]
        assert sum(a["text"] == "Sorry, /info is for admins only." for a in answers) == 1
        assert sum("mode: local" in a["text"] and "model: tiny" in a["text"] for a in answers) == 2  # listed, owner
        assert all(a["response_type"] == "ephemeral" for a in answers)


async def test_forget_empties_only_the_callers_memory(tmp_path, tiny_model_dir):
    async with running_app(tmp_path, tiny_model_dir, reply=QUICK) as world:
        world.fake.add_user("U2", "bob")
        alice = await world.mention("C1", "remember me", user="U1")
        bob = await world.mention("C1", "remember me too", user="U2")
        await world.finished(Place("slack", "T1", "C1", alice["ts"]), "U1")
        await world.finished(Place("slack", "T1", "C1", bob["ts"]), "U2")

        await world.command("/forget", user="U1")
        [done] = await eventually(lambda: world.fake.responses)
        assert "forgotten" in done["json"]["text"] and done["json"]["response_type"] == "ephemeral"
        assert await world.service.memory.history(Place("slack", "T1", "C1", alice["ts"]), "U1") == []
        remaining = await world.service.memory.history(Place("slack", "T1", "C1", bob["ts"]), "U2")
        assert [m.content for m in remaining][0] == "remember me too"


async def test_forged_or_stale_requests_get_401_and_reach_no_worker(tmp_path, tiny_model_dir):
    async with running_app(tmp_path, tiny_model_dir, reply=QUICK) as world:
        submitted = []
        original_submit = world.service.dispatcher.submit

        async def spy(payload):
            submitted.append(payload)
            await original_submit(payload)

        world.service.dispatcher.submit = spy
        event = {"type": "app_mention", "user": "U1", "text": "<@UBOT> hi", "ts": "1700000000.000100", "channel": "C1"}
        replies = [
            await post_event(world.url, SECRET, event, forge=True),
            await post_event(world.url, SECRET, event, timestamp=time.time() - 600),
            await post_slash_command(world.url, "wrong-secret", "/ask", "hi", "U1", "C1"),
            await post_slash_command(world.url, SECRET, "/ask", "hi", "U1", "C1", timestamp=time.time() - 600),
            await post_slash_command(world.url, SECRET, "/forget", "", "U1", "C1", forge=True),
        ]
        assert [r.status for r in replies] == [401] * 5
        await asyncio.sleep(0.3)
        assert submitted == [] and world.fake.requests == []
        assert await world.service.memory.history(Place("slack", "T1", "C1", "1700000000.000100"), "U1") == []

        asked = await world.mention("C1", "a signed one")  # the same app answers a genuine request
        await world.finished(Place("slack", "T1", "C1", asked["ts"]), "U1")
        assert len(submitted) == 1


async def test_a_failure_reaches_the_user_as_a_short_apology(tmp_path, tiny_model_dir, caplog):
    async with running_app(tmp_path, tiny_model_dir) as world:
        async def broken(*args, **kwargs):
            raise RuntimeError("database exploded: internal detail")

        world.service.memory.history = world.service.memory.forget = broken
        asked = await world.mention("C1", "hello?")
        [apology] = await eventually(lambda: [m for m in world.replies("C1", asked["ts"]) if m["edits"]])
        assert apology["text"].startswith("Sorry, something went wrong")
        assert "exploded" not in apology["text"] and "database exploded" in caplog.text

        await world.command("/forget")  # a command that fails answers privately, just as politely
        [private] = await eventually(lambda: world.fake.responses)
        assert private["json"]["text"].startswith("Sorry, something went wrong")
        assert private["json"]["response_type"] == "ephemeral"


async def test_pioneer_slack_and_a_worker_as_processes_on_redis_and_postgres(redis_url, postgres_url, worker_env):
    async with FakeSlack() as fake:
        port = free_port()
        env = worker_env | {"DATABASE_URL": postgres_url, "SLACK_BOT_TOKEN": fake.token, "SLACK_SIGNING_SECRET": SECRET,
                            "SLACK_API_URL": fake.api_url, "SLACK_HOST": "127.0.0.1", "SLACK_PORT": str(port)}
        worker, front = start_worker(worker_env, "slack@test"), start_front_end(env, "slack")
        try:
            await asyncio.to_thread(wait_for_workers, redis_url, 1)
            await eventually(lambda: listening(port), timeout=60, interval=0.2)
            world = World(fake, None, f"http://127.0.0.1:{port}/slack/events", None)
            forged = await post_event(world.url, SECRET, {"type": "app_mention", "user": "U1", "text": "<@UBOT> hi",
                                                          "ts": "1700000000.000100", "channel": "C1"}, forge=True)
            assert forged.status == 401
            asked = fake.record_user_message("C1", f"<@{fake.bot_user_id}> good morning")
            event = {"type": "app_mention", "user": "U1", "text": asked["text"], "ts": asked["ts"], "channel": "C1",
                     "event_ts": asked["ts"]}
            event_id = f"Ev{uuid.uuid4().hex[:12].upper()}"  # new each run: Redis keeps delivery ids for an hour
            assert (await fake.post_event(world.url, SECRET, event, event_id=event_id)).status == 200
            async with Memory(postgres_url) as memory:
                history = await eventually(lambda: answered(memory, Place("slack", "T1", "C1", asked["ts"]), "U1"),
                                           timeout=30)
                assert await memory.history(Place("slack", "T1", "C1", "1700000000.000100"), "U1") == []
            # The reply is stored before the front-end's last edit lands: wait for the message to show it whole.
            await eventually(lambda: [r["text"] for r in world.replies("C1", asked["ts"])]
                             == [neutralise(shown(history[-1]))])
            [reply] = world.replies("C1", asked["ts"])
            assert reply["text"] == neutralise(shown(history[-1])) and history[-1].method == "local"
            assert MARKER not in reply["text"] and len(reply["edits"]) >= 1 and fake.rate_limited_count == 0
            report("processes", world, [asked])

            # Slack redelivers the event: acked, and answered no more (the delivery is recorded in Redis); the next
            # message in the thread, answered after it, is the only other one.
            retried = await fake.post_event(world.url, SECRET, event, event_id=event_id, retry_num=1)
            assert retried.status == 200 and not retried.too_slow
            await world.mention("C1", "and a new question", thread_ts=asked["ts"])
            async with Memory(postgres_url) as memory:
                history = await eventually(lambda: answered(memory, Place("slack", "T1", "C1", asked["ts"]), "U1", 2),
                                           timeout=30)
            assert [m.content for m in history if m.role == "user"] == ["good morning", "and a new question"]
            assert len(world.replies("C1", asked["ts"])) == 2
        finally:
            front_log = await asyncio.to_thread(stop, front)
            worker_log = await asyncio.to_thread(stop, worker)
    assert front.returncode == 0 and "Traceback" not in front_log, front_log
    assert "Traceback" not in worker_log, worker_log
    assert fake.token not in front_log and SECRET not in front_log


async def listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def answered(memory: Memory, place: Place, user_id: str, answers: int = 1):
    history = await memory.history(place, user_id)
    return history if sum(m.role == "assistant" for m in history) >= answers else None
