"""Proves the fake Discord and Slack servers work with the real discord.py, slack-sdk and slack-bolt clients."""

import asyncio
import contextlib
import time

import aiohttp
import discord
import discord.gateway
import discord.http
import pytest
from aiohttp import web
from discord import app_commands
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient
from slack_sdk.web.async_client import AsyncWebClient

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.slack_server import FakeSlack, post_event, post_slash_command, sign_request

SIGNING_SECRET = "shh-signing-secret"


@pytest.fixture
def restore_discord_globals():
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE = base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway


@contextlib.asynccontextmanager
async def discord_client(fake: FakeDiscord, client: discord.Client | None = None):
    """A real discord.Client logged in to `fake`, READY, closed on exit."""
    client = client or discord.Client(intents=_intents(), guild_ready_timeout=0.05)
    with fake.patched_discord_py():
        task = asyncio.create_task(client.start(fake.token))
        try:
            await asyncio.wait_for(client.wait_until_ready(), 5)
            yield client
        finally:
            await client.close()
            await asyncio.wait_for(task, 5)


def _intents() -> discord.Intents:
    intents = discord.Intents.default()
    intents.message_content = True
    return intents


def _collector(client: discord.Client, sink: list):
    """An on_message handler that keeps messages from anyone but the bot."""

    async def on_message(message: discord.Message):
        if message.author != client.user:
            sink.append(message)

    return on_message


@pytest.fixture
async def fake_discord(restore_discord_globals):
    fake = FakeDiscord(edit_limit=(3, 1.0), create_limit=(3, 1.0))
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_slack():
    fake = FakeSlack(update_limit=(3, 60.0), post_limit=(2, 1.0))
    await fake.start()
    yield fake
    await fake.stop()


# ----- Discord --------------------------------------------------------------------------------


async def test_discord_client_logs_in_and_sees_the_guild(fake_discord):
    async with discord_client(fake_discord) as client:
        guild = client.get_guild(int(fake_discord.guild_id))
        assert client.user.id == int(fake_discord.bot_user["id"])
        assert guild is not None and guild.name == "Pioneer Test Guild"
        assert guild.get_channel(int(fake_discord.channel_id)).name == "general"
        assert guild.get_thread(int(fake_discord.thread_id)) is not None
        assert guild.me.guild_permissions.send_messages


async def test_discord_on_message_then_send_and_edit(fake_discord):
    received: list[discord.Message] = []
    client = discord.Client(intents=_intents(), guild_ready_timeout=0.05)
    client.event(_collector(client, received))
    async with discord_client(fake_discord, client):
        await fake_discord.send_message_create(fake_discord.channel_id, "hello bot")
        await fake_discord.wait_for(lambda: received)
        message = received[0]
        assert message.content == "hello bot" and message.guild.id == int(fake_discord.guild_id)

        reply = await message.channel.send("thinking...", allowed_mentions=discord.AllowedMentions.none())
        await reply.edit(content="the answer")

    stored = fake_discord.message(reply.id)
    assert stored["content"] == "the answer"
    assert [e["content"] for e in stored["edits"]] == ["the answer"]
    assert stored["allowed_mentions"] == {"parse": []}
    assert fake_discord.requests_to("PATCH", rf"/channels/{fake_discord.channel_id}/messages/\d+")[0]["status"] == 200


async def test_discord_dm_message_reaches_on_message(fake_discord):
    received: list[discord.Message] = []
    client = discord.Client(intents=_intents(), guild_ready_timeout=0.05)
    client.event(_collector(client, received))
    async with discord_client(fake_discord, client):
        dm_id = fake_discord.dm_channel()
        await fake_discord.send_message_create(dm_id, "psst")
        await fake_discord.wait_for(lambda: received)
        assert received[0].guild is None and isinstance(received[0].channel, discord.DMChannel)
        await received[0].channel.send("hi in private")
    assert fake_discord.messages_in(dm_id)[-1]["content"] == "hi in private"


async def test_discord_content_is_hidden_without_the_message_content_intent(fake_discord):
    received: list[discord.Message] = []
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    client.event(_collector(client, received))
    async with discord_client(fake_discord, client):
        await fake_discord.send_message_create(fake_discord.channel_id, "secret")
        await fake_discord.send_message_create(
            fake_discord.channel_id, f"<@{fake_discord.bot_user['id']}> hi", mentions=[fake_discord.bot_user]
        )
        await fake_discord.wait_for(lambda: len(received) == 2)
    assert received[0].content == ""
    assert received[1].content.endswith("hi")


async def test_discord_edit_burst_gets_429s_and_discord_py_retries_until_all_land(restore_discord_globals):
    # Without X-RateLimit headers discord.py cannot pace itself, so the server's 429s are what slow it down.
    async with FakeDiscord(edit_limit=(3, 1.0), advertise_rate_limits=False) as fake:
        async with discord_client(fake) as client:
            message = await client.get_channel(int(fake.channel_id)).send("0")
            started = time.monotonic()
            for n in range(1, 8):
                await message.edit(content=str(n))
            elapsed = time.monotonic() - started
        assert [e["content"] for e in fake.message(message.id)["edits"]] == [str(n) for n in range(1, 8)]
        limited = [r for r in fake.requests if r["status"] == 429]
        assert fake.rate_limited_count == len(limited) >= 1
        assert all(r["method"] == "PATCH" for r in limited)
        assert elapsed >= 1.0  # 7 edits at 3 per second cannot land sooner


async def test_discord_py_paces_itself_by_the_advertised_rate_limit_headers(fake_discord):
    async with discord_client(fake_discord) as client:
        message = await client.get_channel(int(fake_discord.channel_id)).send("0")
        started = time.monotonic()
        await asyncio.gather(*(message.edit(content=str(n)) for n in range(1, 8)))
        elapsed = time.monotonic() - started
    assert len(fake_discord.message(message.id)["edits"]) == 7
    assert elapsed >= 1.0
    assert all(r["method"] == "PATCH" for r in fake_discord.requests if r["status"] == 429)


async def test_two_processes_sharing_a_token_collide_on_the_edit_limit(fake_discord):
    # A worker process with its own HTTP client cannot see the bot's rate-limit buckets.
    async with discord_client(fake_discord) as client:
        message = await client.get_channel(int(fake_discord.channel_id)).send("0")

        async def bot_edits():
            for n in range(3):
                await message.edit(content=f"bot {n}")

        # discord.py holds the caller of the edit that exhausts the bucket until it resets, so run it aside.
        bot_task = asyncio.create_task(bot_edits())
        await fake_discord.wait_for(lambda: len(fake_discord.message(message.id)["edits"]) == 3)
        worker = discord.http.HTTPClient(asyncio.get_running_loop())
        try:
            with fake_discord.patched_discord_py():
                await worker.static_login(fake_discord.token)
                route = discord.http.Route(
                    "PATCH", "/channels/{channel_id}/messages/{message_id}",
                    channel_id=message.channel.id, message_id=message.id,
                )
                await worker.request(route, json={"content": "worker"})
        finally:
            await worker.close()
        await bot_task
    assert fake_discord.rate_limited_count == 1
    assert fake_discord.message(message.id)["content"] == "worker"


async def test_discord_rejects_content_over_2000_chars(fake_discord):
    async with discord_client(fake_discord) as client:
        channel = client.get_channel(int(fake_discord.channel_id))
        with pytest.raises(discord.HTTPException) as raised:
            await channel.send("x" * 2001)
        assert raised.value.code == 50035 and raised.value.status == 400
        await channel.send("x" * 2000)
    assert [len(m["content"]) for m in fake_discord.messages_in(fake_discord.channel_id)] == [2000]


async def test_discord_interaction_reaches_the_command_tree_and_its_response_is_recorded(fake_discord):
    client = discord.Client(intents=_intents(), guild_ready_timeout=0.05)
    tree = app_commands.CommandTree(client)
    asked: list[str] = []

    @tree.command(name="ask", description="Ask Pioneer")
    async def ask(interaction: discord.Interaction, question: str):
        asked.append(question)
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content=f"answer to {question}")
        await interaction.followup.send("more")

    async with discord_client(fake_discord, client):
        synced = await tree.sync()
        assert [c.name for c in synced] == ["ask"] and synced[0].id
        interaction = await fake_discord.send_interaction("ask", {"question": "why?"})
        await fake_discord.wait_for(lambda: len(interaction["followup_ids"]) == 1)

    assert asked == ["why?"]
    assert interaction["responses"][0]["type"] == 5 and interaction["responses"][0]["elapsed"] < 3
    original = fake_discord.message(interaction["original_message_id"])
    assert original["content"] == "answer to why?" and not original["flags"] & (1 << 7)
    assert fake_discord.message(interaction["followup_ids"][0])["content"] == "more"


async def test_discord_late_interaction_response_is_unknown_interaction(restore_discord_globals):
    async with FakeDiscord(interaction_window=0.1) as fake:
        client = discord.Client(intents=_intents(), guild_ready_timeout=0.05)
        tree = app_commands.CommandTree(client)
        errors: list[Exception] = []

        @tree.command(name="slow", description="Answers too late")
        async def slow(interaction: discord.Interaction):
            await asyncio.sleep(0.2)
            try:
                await interaction.response.send_message("too late")
            except discord.NotFound as error:
                errors.append(error)

        async with discord_client(fake, client):
            await fake.send_interaction("slow")
            await fake.wait_for(lambda: errors)
        assert errors[0].code == 10062


async def test_discord_bad_token_fails_login(restore_discord_globals):
    async with FakeDiscord() as fake:
        client = discord.Client(intents=_intents())
        with fake.patched_discord_py(), pytest.raises(discord.LoginFailure):
            await client.login("wrong-token")
        await client.close()


async def test_discord_patched_globals_are_restored(fake_discord):
    with fake_discord.patched_discord_py():
        assert discord.http.Route.BASE == fake_discord.api_base
    assert discord.http.Route.BASE == "https://discord.com/api/v10"


# ----- Slack ----------------------------------------------------------------------------------


async def test_slack_async_client_posts_and_updates(fake_slack):
    client = AsyncWebClient(token=fake_slack.token, base_url=fake_slack.api_url)
    posted = await client.chat_postMessage(channel="C1", text="hello", thread_ts=None)
    updated = await client.chat_update(channel="C1", ts=posted["ts"], text="hello, world")
    assert updated["ok"] and updated["text"] == "hello, world"
    stored = fake_slack.message("C1", posted["ts"])
    assert stored["text"] == "hello, world" and [e["text"] for e in stored["edits"]] == ["hello, world"]


async def test_slack_sync_client_sees_msg_too_long_and_ratelimited(fake_slack):
    client = WebClient(token=fake_slack.token, base_url=fake_slack.api_url)
    with pytest.raises(SlackApiError) as too_long:
        await asyncio.to_thread(client.chat_postMessage, channel="C1", text="x" * 4001)
    assert too_long.value.response["error"] == "msg_too_long"

    posted = await asyncio.to_thread(client.chat_postMessage, channel="C1", text="first")
    for n in range(3):
        await asyncio.to_thread(client.chat_update, channel="C1", ts=posted["ts"], text=str(n))
    with pytest.raises(SlackApiError) as limited:
        await asyncio.to_thread(client.chat_update, channel="C1", ts=posted["ts"], text="one too many")
    assert limited.value.response.status_code == 429
    assert limited.value.response["error"] == "ratelimited"
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    assert fake_slack.rate_limited_count == 1


async def test_slack_post_message_is_limited_per_channel(fake_slack):
    client = AsyncWebClient(token=fake_slack.token, base_url=fake_slack.api_url)
    await client.chat_postMessage(channel="C1", text="1")
    await client.chat_postMessage(channel="C1", text="2")
    with pytest.raises(SlackApiError) as limited:
        await client.chat_postMessage(channel="C1", text="3")
    assert limited.value.response.status_code == 429
    await client.chat_postMessage(channel="C2", text="another channel is fine")


async def test_slack_invalid_token(fake_slack):
    client = AsyncWebClient(token="xoxb-wrong", base_url=fake_slack.api_url)
    with pytest.raises(SlackApiError) as raised:
        await client.chat_postMessage(channel="C1", text="hi")
    assert raised.value.response["error"] == "invalid_auth"


@contextlib.asynccontextmanager
async def bolt_app_server(app: AsyncApp):
    """Serve a bolt AsyncApp on 127.0.0.1; yields its events URL."""
    runner = web.AppRunner(app.web_app(path="/slack/events"), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/slack/events"
    finally:
        await runner.cleanup()


async def test_bolt_app_acks_a_signed_slash_command_and_rejects_a_forged_one(fake_slack):
    client = AsyncWebClient(token=fake_slack.token, base_url=fake_slack.api_url)
    app = AsyncApp(signing_secret=SIGNING_SECRET, client=client)

    @app.command("/ask")
    async def ask(ack, respond, say, command):
        await ack("on it")
        await respond(f"answer to {command['text']}")
        await say("posted in channel")

    async with bolt_app_server(app) as url:
        reply = await fake_slack.post_slash_command(url, SIGNING_SECRET, "/ask", "why?", "U1", "C1")
        assert reply.status == 200 and "on it" in reply.body and not reply.too_slow
        await fake_slack.wait_for(lambda: fake_slack.responses and fake_slack.messages_in("C1"))

        forged = await post_slash_command(url, "not-the-secret", "/ask", "why?", "U1", "C1")
        stale = await post_slash_command(url, SIGNING_SECRET, "/ask", "why?", "U1", "C1", timestamp=time.time() - 600)
    assert forged.status == 401 and stale.status == 401
    assert fake_slack.responses[0]["json"]["text"] == "answer to why?"
    assert fake_slack.messages_in("C1")[0]["text"] == "posted in channel"


async def test_bolt_app_handles_a_signed_event(fake_slack):
    client = AsyncWebClient(token=fake_slack.token, base_url=fake_slack.api_url)
    app = AsyncApp(signing_secret=SIGNING_SECRET, client=client)

    @app.event("app_mention")
    async def mention(event, say):
        await say(text=f"you said {event['text']}", thread_ts=event["ts"])

    async with bolt_app_server(app) as url:
        event = {"type": "app_mention", "user": "U1", "text": "<@UBOT> hi", "ts": "1700000000.000100", "channel": "C1"}
        reply = await post_event(url, SIGNING_SECRET, event)
        assert reply.status == 200
        await fake_slack.wait_for(lambda: fake_slack.messages_in("C1"))
    posted = fake_slack.messages_in("C1")[0]
    assert posted["text"] == "you said <@UBOT> hi" and posted["thread_ts"] == "1700000000.000100"


def test_sign_request_matches_slack_sdk_verifier():
    from slack_sdk.signature import SignatureVerifier

    body = "command=%2Fask&text=hi"
    headers = sign_request(SIGNING_SECRET, body)
    assert SignatureVerifier(SIGNING_SECRET).is_valid_request(body, headers)


async def test_slack_response_url_allows_five_uses(fake_slack):
    url = fake_slack.new_response_url()
    async with aiohttp.ClientSession() as session:
        statuses = []
        for n in range(6):
            async with session.post(url, json={"text": str(n)}) as response:
                statuses.append(response.status)
    assert statuses == [200] * 5 + [404]
