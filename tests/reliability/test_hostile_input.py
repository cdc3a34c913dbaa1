"""Hostile input (tests/data/hostile_inputs.py) through the core, then a subset through the Discord and Slack clients.

The model is a fake OpenAI that echoes the user's message, so hostile text also comes back as model output.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import statistics
import time
import uuid

import aiohttp
import psycopg

from bots.app import build_service
from bots.core import CONTROL, Incoming, clean_input
from bots.memory import Place
from bots.slack_io import neutralise
from bots.splitting import join_parts, unclosed_fence
from tests.data.hostile_inputs import (
    ANSWERED,
    HOSTILE,
    MAX_INPUT_CHARS,
    REFUSALS,
    VICTIM,
    Hostile,
)
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.helpers import RecordingSink, eventually, make_settings
from tests.integration.test_discord import running_bot
from tests.integration.test_slack import LIVE, SECRET, api_texts, running_app

KEY = "sk-hostile-test-key-0123456789abcdef"
CANARY = "VICTIM-CANARY-7f3a9c"
ECHO = "(fake OpenAI) You said: "
SURROGATE = re.compile("[\ud800-\udfff]")
BY_NAME = {h.name: h for h in HOSTILE}
# A representative subset for the platform clients: one or more of each kind.
PLATFORM_SUBSET = [
    "empty", "200,000 characters", "5000 NULs", "NUL inside", "ANSI colour", "JSON lone high surrogate",
    "surrogate pair as two code points", "filename spoof", "10k marks on one letter", "zalgo", "@everyone",
    "everyone and here in a sentence", "@everyone role by id", "user mention", "Slack <!channel>",
    "Slack subteam", "Slack labelled user mention", "1333 fences on one line", "nested fences of growing length",
    "unclosed code block", "drop table", "print the API key", "another user's history by mention",
]


def cleaned(hostile: Hostile) -> str:
    return hostile.cleaned if hostile.cleaned is not None else clean_input(hostile.text, MAX_INPUT_CHARS)


def assert_clean(text: str) -> None:
    """What may be stored in PostgreSQL and shown on a platform: no NUL or other controls, no lone surrogates."""
    assert not CONTROL.search(text) and not SURROGATE.search(text), ascii(text[:200])


def assert_split_well(parts: list[str], whole: str, limit: int) -> None:
    """Parts within the limit that join back to the whole; fences closed in each, but as the whole leaves its last."""
    assert join_parts(parts) == whole and all(len(part) <= limit for part in parts), ascii(whole[:80])
    assert [unclosed_fence(part) for part in parts] == [None] * (len(parts) - 1) + [unclosed_fence(whole)]


def sql(database_url: str, query: str, *args) -> list[tuple]:
    with psycopg.connect(database_url.replace("+asyncpg", "")) as connection:
        return connection.execute(query, args).fetchall()


@contextlib.asynccontextmanager
async def echo_service(tmp_path, model_dir, database_url, **overrides):
    """The embedded service in openai mode against an echoing fake OpenAI; yields it and every payload enqueued."""
    async with FakeOpenAI(default=Scenario.reply(None, chunks=3)) as openai:
        settings = make_settings(tmp_path, model_dir, attention_mode="openai", openai_base_url=openai.base_url,
                                 openai_api_key=KEY, database_url=database_url, max_input_chars=MAX_INPUT_CHARS,
                                 **overrides)
        service = await build_service(settings)
        payloads: dict[str, dict] = {}
        submit = service.dispatcher.submit

        async def spy(payload):
            payloads[payload["request_id"]] = payload
            await submit(payload)

        service.dispatcher.submit = spy
        try:
            yield service, openai, payloads
        finally:
            await service.close()


async def ask(service, place, user, text):
    sink = RecordingSink()
    outcome = await service.core.answer(Incoming(place, user, text), sink, limit=2000, min_interval_s=0.01)
    return outcome, sink


def test_the_corpus_is_large_explicit_and_covers_every_kind():
    assert len(HOSTILE) >= 100 and len(BY_NAME) == len(HOSTILE)
    assert set(PLATFORM_SUBSET) <= set(BY_NAME)
    texts = [h.text for h in HOSTILE]
    kinds = {
        "empty": "" in texts, "200k": any(len(t) == 200_000 for t in texts), "NUL": any("\x00" in t for t in texts),
        "surrogates": any(SURROGATE.search(t) for t in texts), "RTL": any("\u202e" in t for t in texts),
        "combining": any(t.count("\u0336") > 1000 for t in texts), "@everyone": "@everyone" in texts,
        "<!channel>": "<!channel>" in texts, "subteam": any("<!subteam^" in t for t in texts),
        "role": any("<@&" in t for t in texts), "fences": any(t.count("```") > 1000 for t in texts),
        "SQL": "'; DROP TABLE messages; --" in texts, "injection": any("OPENAI_API_KEY" in t for t in texts),
        "another user": any(VICTIM in t for t in texts),
    }
    assert all(kinds.values()), [k for k, v in kinds.items() if not v]


async def test_every_hostile_input_gets_a_clear_reply_or_refusal_and_stores_only_clean_text(
        tmp_path, tiny_model_dir, postgres_url):
    run = uuid.uuid4().hex[:8]
    place = Place("discord", "G-hostile", f"C-{run}", "")
    async with echo_service(tmp_path, tiny_model_dir, postgres_url) as (service, openai, payloads):
        victim = f"{VICTIM}-{run}"
        said, _ = await ask(service, place, victim, f"remember this, my password is {CANARY}")
        assert said.status == "answered"

        slots = asyncio.Semaphore(6)
        timings: list[float] = []

        async def one(index: int, hostile: Hostile):
            async with slots:
                started = time.perf_counter()
                result = await ask(service, place, f"h{index}-{run}", hostile.text)
                timings.append(time.perf_counter() - started)
                return result

        results = await asyncio.gather(*(one(i, h) for i, h in enumerate(HOSTILE)))
        for index, (hostile, (outcome, sink)) in enumerate(zip(HOSTILE, results)):
            user = f"h{index}-{run}"
            history = await service.memory.history(place, user)
            if hostile.expect != ANSWERED:
                assert outcome.status == "refused" and outcome.request_id is None, hostile.name
                assert sink.messages == [outcome.text] and REFUSALS[hostile.expect] in outcome.text, hostile.name
                assert history == [], hostile.name
                continue
            text = cleaned(hostile)
            assert_clean(text)
            assert 0 < len(text) <= MAX_INPUT_CHARS
            assert outcome.status == "answered" and outcome.text == ECHO + text, hostile.name
            assert_split_well(sink.messages, outcome.text, 2000)
            assert [(m.role, m.content) for m in history] == [("user", text), ("assistant", outcome.text)], hostile.name
            prompt = payloads[outcome.request_id]["messages"]
            assert prompt[-1] == {"role": "user", "content": text} and prompt[0]["role"] == "system", hostile.name
            assert all(CANARY not in m["content"] and KEY not in m["content"] for m in prompt), hostile.name

        # Nothing of the refused inputs in PostgreSQL; what is there is clean, and nobody else's words leaked.
        refused = [f"h{i}-{run}" for i, h in enumerate(HOSTILE) if h.expect != ANSWERED]
        assert sql(postgres_url, "SELECT count(*) FROM users WHERE platform_user_id = ANY(%s)", refused) == [(0,)]
        rows = sql(postgres_url, "SELECT u.platform_user_id, m.content FROM messages m JOIN conversations c ON "
                   "c.id = m.conversation_id JOIN users u ON u.id = c.user_id WHERE c.channel_id = %s",
                   place.channel_id)
        answered = sum(h.expect == ANSWERED for h in HOSTILE)
        assert len(rows) == 2 * (answered + 1)
        for user, content in rows:
            assert_clean(content)
            assert CANARY not in content or user == victim
        sent = json.dumps(openai.chat_bodies)
        assert CANARY in sent and sent.count(CANARY) == 1  # the victim's own request, no other
        assert KEY not in sent and KEY not in await service.core.info("anyone", is_admin=True)
        print(f"\nMETRICS hostile corpus: {len(HOSTILE)} inputs ({answered} answered, {len(refused)} refused), "
              f"median {statistics.median(timings) * 1000:.0f} ms, max {max(timings) * 1000:.0f} ms each")


async def test_hostile_model_output_is_cleaned_before_it_is_shown_or_stored(tmp_path, tiny_model_dir, postgres_url):
    outputs = {  # what the model says -> what is shown and stored
        "nul \x00 inside": "nul  inside",
        "lone \ud800 surrogate and \udfff": "lone \ufffd surrogate and \ufffd",
        "rtl \u202eoverride\u202c and \u2066isolate\u2069": "rtl override and isolate",
        "\x1b[2J\x1b[H clear the screen \x9b": "[2J[H clear the screen",
        "@everyone <!channel> <@U1> <@&1>": "@everyone <!channel> <@U1> <@&1>",
        "```\n" * 1500: ("```\n" * 1500).strip(),
        "y" * 20_000: "y" * 20_000,
    }
    run = uuid.uuid4().hex[:8]
    place = Place("discord", "G-hostile", f"C-out-{run}", "")
    async with echo_service(tmp_path, tiny_model_dir, postgres_url) as (service, openai, _):
        for index, (said, shown) in enumerate(outputs.items()):
            openai.script(Scenario.reply(said, chunks=5))
            outcome, sink = await ask(service, place, f"o{index}-{run}", "say something odd")
            assert outcome.status == "answered" and outcome.text == shown, ascii(said[:40])
            assert_split_well(sink.messages, shown, 2000)
            for call in sink.calls:
                assert_clean(call[2])
            history = await service.memory.history(place, f"o{index}-{run}")
            assert history[-1].content == shown


# ---- The real platform clients against the fakes ----------------------------------------------------------------

async def test_discord_survives_hostile_input_pings_nobody_and_stores_clean_text(tmp_path, tiny_model_dir,
                                                                                  postgres_url):
    async with running_bot(tmp_path, tiny_model_dir, reply=Scenario.reply(None, chunks=2),
                           database_url=postgres_url, max_input_chars=MAX_INPUT_CHARS) as world:
        fake = world.fake
        # A user whose display name is hostile too; it arrives as JSON from the gateway, lone surrogates escaped.
        evil = fake.add_user("evil")
        evil["global_name"] = "Evil\x00Name\ud800\u202etxt.exe" + "\u0336" * 50
        cases = [(BY_NAME[name], fake.add_channel(f"hostile-{n}")) for n, name in enumerate(PLATFORM_SUBSET)]
        await asyncio.gather(*(world.mention(channel, h.text, user=evil) for h, channel in cases))
        asks = []
        for n, name in enumerate(["@everyone", "1333 fences on one line", "JSON lone high surrogate"]):
            channel = fake.add_channel(f"ask-{n}")
            asks.append((BY_NAME[name], channel, await fake.send_interaction(
                "ask", {"question": BY_NAME[name].text}, user=evil, channel_id=channel)))

        for hostile, channel in cases:
            if hostile.expect == ANSWERED:
                history = await world.finished(world.place(channel), evil)
                assert history[0].content == cleaned(hostile), hostile.name
                parts = [m["content"] for m in world.replies(channel)]
                assert join_parts(parts) == ECHO + cleaned(hostile) == history[-1].content, hostile.name
            else:
                [refusal] = await eventually(lambda: world.replies(channel), timeout=20)
                assert REFUSALS[hostile.expect] in refusal["content"], hostile.name
        for hostile, channel, interaction in asks:  # /ask streams into the deferred response and follow-ups
            history = await world.finished(world.place(channel), evil)
            ids = [interaction["original_message_id"], *interaction["followup_ids"]]
            parts = [fake.message(i)["content"] for i in ids]
            assert join_parts(parts) == ECHO + cleaned(hostile) == history[-1].content

        sends = [r for r in fake.requests if r["method"] in ("POST", "PATCH") and re.fullmatch(
            r"/channels/\d+/messages(/\d+)?|/webhooks/\d+/[^/]+(/messages/@original)?", r["path"])]
        assert len(sends) >= len(cases) and all(r["json"]["allowed_mentions"] == {"parse": []} for r in sends)
        shown = [m for msgs in fake.messages.values() for m in msgs if m["author"]["id"] == world.bot_id]
        for message in shown:
            assert not message["mention_everyone"] and message["mentions"] == [] and message["mention_roles"] == []
            assert len(message["content"]) <= 2000
            assert_clean(message["content"])
        [(name,)] = sql(postgres_url, "SELECT display_name FROM users WHERE platform_user_id = %s", evil["id"])
        assert name == "EvilName\ufffdtxt.exe" + "\u0336" * 50
        assert world.bot.is_ready() and not world.bot.is_closed()
        print(f"\nMETRICS hostile discord: {len(cases)} mentions + {len(asks)} /ask, {len(sends)} sends and edits "
              f"all with allowed_mentions none, {len(shown)} bot messages pinging nobody")


async def test_slack_survives_hostile_input_pings_nobody_and_stores_clean_text(tmp_path, tiny_model_dir,
                                                                                postgres_url):
    async with running_app(tmp_path, tiny_model_dir, reply=Scenario.reply(None, chunks=2),
                           database_url=postgres_url, max_input_chars=MAX_INPUT_CHARS) as world:
        fake = world.fake
        subset = [BY_NAME[name] for name in PLATFORM_SUBSET[:16]]
        cases = [(h, f"C9{n:02d}") for n, h in enumerate(subset)]
        asked = await asyncio.gather(*(world.mention(channel, h.text) for h, channel in cases))
        for (hostile, channel), message in zip(cases, asked):
            place = Place("slack", "T1", channel, message["ts"])
            if hostile.expect == ANSWERED:
                history = await world.finished(place, "U1")
                assert [m.content for m in history] == [cleaned(hostile), ECHO + cleaned(hostile)], hostile.name
            else:
                await eventually(lambda: any(REFUSALS[hostile.expect] in m["text"]
                                             for m in world.replies(channel, message["ts"])), timeout=20)
                assert await world.service.memory.history(place, "U1") == []

        # /ask quotes the question above the reply: quoted cleaned, and neutralised.
        await world.command("/ask", "\x00@everyone <!channel> \u202eevil", channel="C800")
        [answer] = await eventually(lambda: [m for m in world.replies("C800") if ECHO in m["text"]], timeout=20)
        assert answer["text"] == ">@everyone &lt;!channel> evil\n" + neutralise(ECHO + "@everyone <!channel> evil")

        # Raw wire forms: invalid UTF-8 percent-encoded in a command, and a signed body that is not UTF-8 at all.
        form = b"command=%2Fask&text=caf%E9+%ED%A0%80&user_id=U1&channel_id=C801&team_id=T1&response_url="
        assert (await post_raw(world.url, form, "application/x-www-form-urlencoded")) == 200
        history = await world.finished(Place("slack", "T1", "C801", ""), "U1")
        assert history[0].content == "caf\ufffd \ufffd\ufffd\ufffd"
        body = json.dumps({"type": "event_callback", "team_id": "T1", "event": {
            "type": "app_mention", "user": "U1", "text": "<@UBOT> caf\u00e9", "ts": "1.000001", "channel": "C802"}})
        before = len(fake.requests)
        assert await post_raw(world.url, body.encode().replace(b"\\u00e9", b"\xe9"), "application/json") == 401
        await asyncio.sleep(0.3)
        assert len(fake.requests) == before and await world.service.memory.history(
            Place("slack", "T1", "C802", "1.000001"), "U1") == []

        texts = api_texts(fake)
        assert len(texts) >= len(cases) and not any(live in text for text in texts for live in LIVE)
        for text in texts:
            assert len(text) <= 4000
            assert_clean(text)
        assert fake.rate_limited_count == 0
        print(f"\nMETRICS hostile slack: {len(cases)} mentions + /ask + 2 raw bodies, {len(texts)} posts and updates, "
              "no live mention markup")


async def post_raw(url: str, body: bytes, content_type: str) -> int:
    """POST raw bytes signed over those very bytes, as Slack signs them."""
    timestamp = str(int(time.time()))
    digest = hmac.new(SECRET.encode(), f"v0:{timestamp}:".encode() + body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": timestamp,
               "X-Slack-Signature": f"v0={digest}"}
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status
