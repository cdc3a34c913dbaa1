"""The Discord front-end end to end: the real discord.py client against the fake Discord, over the network."""

import asyncio
import contextlib
import statistics
from dataclasses import dataclass

import discord
import discord.gateway
import discord.http

from bots.app import Service, build_service
from bots.discord_bot import PioneerBot, use_endpoints
from bots.memory import Memory, Place
from bots.splitting import join_parts, unclosed_fence
from tests.fakes.discord_server import ADMINISTRATOR, MESSAGE_FLAG_EPHEMERAL, FakeDiscord
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.helpers import eventually, make_settings, shown, start_front_end, start_worker, stop, wait_for_workers

MARKER = "▌"
QUICK = Scenario.reply(None, chunks=1)  # an echo, for tests about where and whether the bot answers


@dataclass
class World:
    fake: FakeDiscord
    bot: PioneerBot
    service: Service
    openai: FakeOpenAI | None

    @property
    def bot_id(self) -> str:
        return self.fake.bot_user["id"]

    def place(self, channel_id: str, thread_id: str = "", guild: bool = True) -> Place:
        return Place("discord", self.fake.guild_id if guild else "", channel_id, thread_id)

    async def mention(self, channel_id: str, text: str, user: dict | None = None) -> dict:
        return await self.fake.send_message_create(channel_id, f"<@{self.bot_id}> {text}", author=user)

    def replies(self, channel_id: str) -> list[dict]:
        return [m for m in self.fake.messages_in(channel_id) if m["author"]["id"] == self.bot_id]

    async def finished(self, place: Place, user: dict, answers: int = 1):
        """Wait until `answers` replies to `user` are stored in memory (they are stored after the final edit)."""

        async def stored():
            history = await self.service.memory.history(place, user["id"])
            return history if sum(m.role == "assistant" for m in history) >= answers else None

        return await eventually(stored, timeout=20, interval=0.05)


@contextlib.asynccontextmanager
async def running_bot(tmp_path, model_dir, *, reply: Scenario | None = None, fake: FakeDiscord | None = None,
                      **overrides):
    """Fake Discord (and a fake OpenAI when `reply` is given), the embedded service, and a PioneerBot logged in."""
    saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    async with contextlib.AsyncExitStack() as stack:
        fake = await stack.enter_async_context(fake or FakeDiscord())
        openai = None
        if reply is not None:
            openai = await stack.enter_async_context(FakeOpenAI(default=reply))
            overrides |= dict(attention_mode="openai", openai_base_url=openai.base_url, openai_api_key="sk-test-key")
        settings = make_settings(tmp_path, model_dir, discord_api_base=fake.api_base,
                                 discord_gateway_url=fake.gateway_url, **overrides)
        use_endpoints(settings)
        service = await build_service(settings)
        stack.push_async_callback(service.close)
        bot = PioneerBot(service.core, guild_ready_timeout=0.05)
        task = asyncio.create_task(bot.start(fake.token))
        try:
            await asyncio.wait_for(bot.wait_until_ready(), 10)
            yield World(fake, bot, service, openai)
        finally:
            await bot.close()
            await asyncio.wait_for(task, 5)
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved


def report(name: str, world: World, user_messages: list[dict]) -> dict:
    """Edits per message, 429s and the latency from each user message to the first visible reply text."""
    fake = world.fake
    bot_messages = [m for msgs in fake.messages.values() for m in msgs if m["author"]["id"] == world.bot_id]
    latencies = []
    for asked in user_messages:
        answers = [m for m in fake.messages_in(asked["channel_id"])
                   if m["author"]["id"] == world.bot_id and str((m["message_reference"] or {}).get("message_id")) == asked["id"]]
        latencies.append((answers[0]["created_at"] - asked["created_at"]) * 1000)
    figures = {
        "messages": len(bot_messages),
        "edits_per_message": statistics.mean(len(m["edits"]) for m in bot_messages),
        "max_edits": max(len(m["edits"]) for m in bot_messages),
        "429s": fake.rate_limited_count,
        "first_text_ms_median": statistics.median(latencies) if latencies else None,
        "first_text_ms_max": max(latencies) if latencies else None,
    }
    print(f"\nMETRICS discord {name}: {figures}")
    return figures


async def test_mention_streams_a_reply_by_editing_and_remembers_it(tmp_path, tiny_model_dir):
    answer = "Paris is the capital of France, and it has been for a very long time indeed."
    async with running_bot(tmp_path, tiny_model_dir, reply=Scenario.reply(answer, chunks=5, delay_s=0.3)) as world:
        fake = world.fake
        asked = await world.mention(fake.channel_id, "what is the capital of France?")
        history = await world.finished(world.place(fake.channel_id), fake.user)

        [reply] = world.replies(fake.channel_id)
        assert reply["content"] == answer
        assert str(reply["message_reference"]["message_id"]) == asked["id"]
        assert len(reply["edits"]) >= 2  # posted with the first words, then grew by edits
        assert all(e["content"].endswith(MARKER) for e in reply["edits"][:-1])
        assert [(m.role, m.content) for m in history] == [("user", "what is the capital of France?"),
                                                          ("assistant", answer)]
        assert world.openai.chat_bodies[-1]["messages"][-1]["content"] == "what is the capital of France?"
        assert fake.requests_to("POST", rf"/channels/{fake.channel_id}/typing")
        figures = report("streaming", world, [asked])
        assert figures["429s"] == 0 and figures["first_text_ms_median"] < 2000


async def test_twenty_concurrent_conversations_get_no_429(tmp_path, tiny_model_dir):
    # Two conversations per channel share that channel's budget; discord.py is told nothing about limits.
    fake = FakeDiscord(advertise_rate_limits=False, with_thread=False)
    channels = [fake.channel_id] + [fake.add_channel(f"room-{n}") for n in range(9)]
    users = [fake.add_user(f"user{n}") for n in range(20)]
    reply = Scenario.reply(None, chunks=5, delay_s=0.25)
    async with running_bot(tmp_path, tiny_model_dir, reply=reply, fake=fake, worker_concurrency=20) as world:
        asked = await asyncio.gather(*(world.mention(channels[n % 10], f"hello number {n}", user)
                                       for n, user in enumerate(users)))
        await asyncio.gather(*(world.finished(world.place(channels[n % 10]), user) for n, user in enumerate(users)))

        for n, user in enumerate(users):
            mine = [m for m in world.replies(channels[n % 10])
                    if str((m["message_reference"] or {}).get("message_id")) == asked[n]["id"]]
            assert mine and mine[0]["content"] == f"(fake OpenAI) You said: hello number {n}"
        figures = report("20 concurrent", world, asked)
        assert fake.rate_limited_count == 0
        assert figures["messages"] == 20


def long_reply_with_code() -> str:
    prose = "This paragraph explains the next piece of code in plain words, so that the reply reads naturally. "
    block = "\n".join(f"def step_{n}(value):\n    return value * {n} + 1  # one small step" for n in range(45))
    text = "\n\n".join([prose * 3, f"```python\n{block}\n```", prose * 5, f"```\n{block[:1500]}\n```", prose * 6]).strip()
    assert 5500 < len(text) < 6500
    return text


async def test_a_long_reply_with_code_is_split_with_balanced_fences(tmp_path, tiny_model_dir):
    text = long_reply_with_code()
    async with running_bot(tmp_path, tiny_model_dir, reply=Scenario.reply(text, chunks=30, delay_s=0.02)) as world:
        fake = world.fake
        asked = await world.mention(fake.channel_id, "show me the code")
        history = await world.finished(world.place(fake.channel_id), fake.user)

        parts = [m["content"] for m in world.replies(fake.channel_id)]
        assert len(parts) >= 4
        assert all(len(part) <= 2000 for part in parts)
        assert all(unclosed_fence(part) is None for part in parts)
        assert join_parts(parts) == text == history[-1].content
        report("6,000-char reply", world, [asked])
        assert fake.rate_limited_count == 0


async def test_everyone_in_model_output_pings_nobody(tmp_path, tiny_model_dir):
    answer = "Hey @everyone and @here, look: <@400000000000000001> was mentioned."
    async with running_bot(tmp_path, tiny_model_dir, reply=Scenario.reply(answer, chunks=3, delay_s=0.3)) as world:
        fake = world.fake
        await world.mention(fake.channel_id, "ping everybody please")
        await world.finished(world.place(fake.channel_id), fake.user)

        assert world.bot.allowed_mentions.to_dict() == {"parse": []}
        sends = fake.requests_to("POST", r"/channels/\d+/messages") + fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")
        assert len(sends) >= 2 and all(r["json"]["allowed_mentions"] == {"parse": []} for r in sends)
        [reply] = world.replies(fake.channel_id)
        assert reply["content"] == answer
        assert not reply["mention_everyone"] and reply["mentions"] == [] and reply["mention_roles"] == []


async def test_where_it_answers_dm_thread_and_mentions_only(tmp_path, tiny_model_dir):
    async with running_bot(tmp_path, tiny_model_dir, reply=QUICK) as world:
        fake = world.fake
        other_bot = fake.add_user("otherbot", bot=True)
        # Ignored: plain chatter in a channel, another bot's mention, and a thread the bot is not in.
        await fake.send_message_create(fake.channel_id, "just chatting")
        await world.mention(fake.channel_id, "bots talking", user=other_bot)
        await fake.send_message_create(fake.thread_id, "anyone here?")
        await world.mention(fake.channel_id, "hello")
        await world.finished(world.place(fake.channel_id), fake.user)
        assert len(world.replies(fake.channel_id)) == 1 and world.replies(fake.thread_id) == []

        # A thread: answered when mentioned, and from then on without a mention.
        await world.mention(fake.thread_id, "in a thread")
        thread_place = world.place(fake.channel_id, fake.thread_id)
        await world.finished(thread_place, fake.user)
        await fake.send_message_create(fake.thread_id, "and a follow-up")
        history = await world.finished(thread_place, fake.user, answers=2)
        assert [m.content for m in history if m.role == "user"] == ["in a thread", "and a follow-up"]

        # A DM needs no mention; its memory is its own.
        dm = fake.dm_channel()
        await fake.send_message_create(dm, "a private question")
        dm_history = await world.finished(world.place(dm, guild=False), fake.user)
        assert dm_history[0].content == "a private question"
        assert all(r["json"]["allowed_mentions"] == {"parse": []}
                   for r in fake.requests_to("POST", r"/channels/\d+/messages"))


async def test_info_and_mode_are_for_admins_and_ephemeral(tmp_path, tiny_model_dir):
    async with running_bot(tmp_path, tiny_model_dir, admin_user_ids=["400000000000000001"]) as world:
        fake = world.fake
        listed = {c["name"] for c in fake.global_commands}
        assert {"ask", "info", "forget", "mode"} <= listed
        member, listed_admin = fake.add_user("member"), fake.user

        refused = await fake.send_interaction("info", user=member)
        guild_admin = await fake.send_interaction("info", user=member, permissions=ADMINISTRATOR)
        by_id = await fake.send_interaction("info", user=listed_admin)
        await eventually(lambda: all(fake.message(i["original_message_id"] or 0) and
                                     "mode:" in fake.message(i["original_message_id"])["content"]
                                     for i in (guild_admin, by_id)))
        shown = {name: fake.message(i["original_message_id"]) for name, i in
                 (("refused", refused), ("guild admin", guild_admin), ("listed", by_id))}
        assert shown["refused"]["content"] == "Sorry, /info is for admins only."
        assert "mode: local" in shown["listed"]["content"] and "model: tiny" in shown["guild admin"]["content"]
        assert all(m["flags"] & MESSAGE_FLAG_EPHEMERAL for m in shown.values())
        assert all(i["responses"][0]["elapsed"] < 3 for i in (refused, guild_admin, by_id))

        denied = await fake.send_interaction("mode", {"mode": "openai"}, user=member)
        allowed = await fake.send_interaction("mode", {"mode": "hybrid"}, user=member, permissions=ADMINISTRATOR)
        await eventually(lambda: denied["original_message_id"] and allowed["original_message_id"])
        assert "only admins" in fake.message(denied["original_message_id"])["content"]
        assert fake.message(allowed["original_message_id"])["content"] == "Mode set to hybrid."
        assert world.service.core.mode == "hybrid"


async def test_forget_empties_only_the_callers_memory(tmp_path, tiny_model_dir):
    async with running_bot(tmp_path, tiny_model_dir, reply=QUICK) as world:
        fake = world.fake
        alice, bob = fake.add_user("alice"), fake.add_user("bob")
        channel = world.place(fake.channel_id)
        await world.mention(fake.channel_id, "remember me", user=alice)
        await world.mention(fake.channel_id, "remember me too", user=bob)
        await fake.send_message_create(fake.dm_channel(alice), "a secret", author=alice)
        await world.finished(channel, alice)
        await world.finished(channel, bob)
        await world.finished(world.place(fake.dm_channel(alice), guild=False), alice)

        done = await fake.send_interaction("forget", user=alice)
        await eventually(lambda: done["original_message_id"] and "forgotten" in fake.message(done["original_message_id"])["content"])
        assert fake.message(done["original_message_id"])["flags"] & MESSAGE_FLAG_EPHEMERAL
        assert await world.service.memory.history(channel, alice["id"]) == []
        assert await world.service.memory.history(world.place(fake.dm_channel(alice), guild=False), alice["id"]) == []
        assert [m.content for m in await world.service.memory.history(channel, bob["id"])][0] == "remember me too"


async def test_ask_command_defers_then_streams_into_the_response(tmp_path, tiny_model_dir):
    answer = "Slash commands answer in the deferred response, which then grows by edits."
    async with running_bot(tmp_path, tiny_model_dir, reply=Scenario.reply(answer, chunks=4, delay_s=0.4)) as world:
        fake = world.fake
        asked = await fake.send_interaction("ask", {"question": "how do commands answer?"})
        await world.finished(world.place(fake.channel_id), fake.user)

        assert asked["responses"][0]["type"] == 5 and asked["responses"][0]["elapsed"] < 3
        original = fake.message(asked["original_message_id"])
        assert original["content"] == answer and not original["flags"] & MESSAGE_FLAG_EPHEMERAL
        assert len(original["edits"]) >= 2 and fake.rate_limited_count == 0


async def test_a_failure_reaches_the_user_as_a_short_apology(tmp_path, tiny_model_dir, caplog):
    async with running_bot(tmp_path, tiny_model_dir) as world:
        fake = world.fake

        async def broken(*args, **kwargs):
            raise RuntimeError("database exploded: internal detail")

        world.service.memory.history = world.service.memory.forget = broken
        await world.mention(fake.channel_id, "hello?")
        await eventually(lambda: world.replies(fake.channel_id))
        [apology] = world.replies(fake.channel_id)
        assert apology["content"].startswith("Sorry, something went wrong")
        assert "exploded" not in apology["content"] and "Traceback" not in apology["content"]
        assert "database exploded" in caplog.text

        failed = await fake.send_interaction("forget")  # a failed command answers privately, just as politely
        await eventually(lambda: "Sorry" in (fake.message(failed["original_message_id"] or 0) or {}).get("content", ""))
        assert fake.message(failed["original_message_id"])["flags"] & MESSAGE_FLAG_EPHEMERAL


async def test_rate_limited_user_is_told_to_wait(tmp_path, tiny_model_dir):
    async with running_bot(tmp_path, tiny_model_dir, reply=QUICK, rate_limit_per_minute=1) as world:
        fake = world.fake
        await world.mention(fake.channel_id, "first")
        await world.finished(world.place(fake.channel_id), fake.user)
        await world.mention(fake.channel_id, "second")
        await eventually(lambda: len(world.replies(fake.channel_id)) == 2)
        assert "faster than I can answer" in world.replies(fake.channel_id)[-1]["content"]


async def test_pioneer_discord_and_a_worker_as_processes_on_redis_and_postgres(redis_url, postgres_url, worker_env):
    async with FakeDiscord() as fake:
        env = worker_env | {"DATABASE_URL": postgres_url, "DISCORD_TOKEN": fake.token,
                            "DISCORD_API_BASE": fake.api_base, "DISCORD_GATEWAY_URL": fake.gateway_url}
        worker, front = start_worker(worker_env, "discord@test"), start_front_end(env, "discord")
        try:
            await asyncio.to_thread(wait_for_workers, redis_url, 1)
            await eventually(lambda: fake.sessions and fake.global_commands, timeout=60)
            asked = await fake.send_message_create(fake.channel_id, f"<@{fake.bot_user['id']}> good morning")
            async with Memory(postgres_url) as memory:
                history = await eventually(lambda: answered(memory, Place("discord", fake.guild_id, fake.channel_id),
                                                            fake.user["id"]), timeout=30)
            # The reply is stored before the front-end's last edit lands: wait for the message to show it whole.
            await eventually(lambda: [m["content"] for m in fake.messages_in(fake.channel_id)
                                      if m["author"]["id"] == fake.bot_user["id"]] == [shown(history[-1])])
            [reply] = [m for m in fake.messages_in(fake.channel_id) if m["author"]["id"] == fake.bot_user["id"]]
            assert reply["content"] == shown(history[-1]) and history[-1].method == "local"
            assert MARKER not in reply["content"] and len(reply["edits"]) >= 1 and fake.rate_limited_count == 0
            print(f"\nMETRICS discord processes: first text {(reply['created_at'] - asked['created_at']) * 1000:.0f} ms, "
                  f"{len(reply['edits'])} edit(s), {fake.rate_limited_count} 429s")
        finally:
            front_log = await asyncio.to_thread(stop, front)
            worker_log = await asyncio.to_thread(stop, worker)
    assert front.returncode == 0 and "Traceback" not in front_log, front_log
    assert "Traceback" not in worker_log, worker_log
    assert fake.token not in front_log


async def answered(memory: Memory, place: Place, user_id: str):
    history = await memory.history(place, user_id)
    return history if any(m.role == "assistant" for m in history) else None
