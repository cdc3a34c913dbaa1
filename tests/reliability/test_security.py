"""Security checks in one process: admin commands, memory isolation, /forget, Slack signatures, rate limits, pickle."""

import asyncio
import hashlib
import hmac
import io
import json
import re
import time
import uuid

import aiohttp

from bots.console import Console
from bots.core import Incoming
from bots.memory import Place
from tests.fakes.discord_server import ADMINISTRATOR, MESSAGE_FLAG_EPHEMERAL
from tests.fakes.openai_server import Scenario
from tests.fakes.slack_server import post_event, post_slash_command
from tests.helpers import REPO, RecordingSink, eventually
from tests.integration.test_discord import running_bot
from tests.integration.test_slack import SECRET, running_app
from tests.reliability.test_hostile_input import ECHO, KEY, echo_service, sql
from worker.celery_app import make_celery

QUICK = Scenario.reply(None, chunks=1)
MANAGE_GUILD_AND_MESSAGES = (1 << 5) | (1 << 13)  # moderator rights, not Administrator
INFO_LINES = ("mode:", "workers online", "queue depth", "openai model")
RATE_LIMITED = re.compile(r"You're sending messages faster than I can answer\. Please wait (\d+) s\.")


def spy_on_submit(service) -> list[dict]:
    """Every payload the core enqueues, in order."""
    seen, submit = [], service.dispatcher.submit

    async def spy(payload):
        seen.append(payload)
        await submit(payload)

    service.dispatcher.submit = spy
    return seen


# ---- Admin commands ---------------------------------------------------------------------------------------------

async def test_discord_admin_commands_refuse_members_moderators_and_dms(tmp_path, tiny_model_dir):
    async with running_bot(tmp_path, tiny_model_dir, reply=QUICK, admin_user_ids=["400000000000000001"]) as world:
        fake, core = world.fake, world.service.core
        member = fake.add_user("member")
        dm = fake.dm_channel(member)
        tries = [
            await fake.send_interaction("info", user=member),
            await fake.send_interaction("info", user=member, permissions=MANAGE_GUILD_AND_MESSAGES),
            await fake.send_interaction("info", user=member, channel_id=dm),
            await fake.send_interaction("mode", {"mode": "hybrid"}, user=member),
            await fake.send_interaction("mode", {"mode": "hybrid"}, user=member, permissions=MANAGE_GUILD_AND_MESSAGES),
            await fake.send_interaction("mode", {"mode": "hybrid"}, user=member, channel_id=dm),
        ]
        await eventually(lambda: all(t["original_message_id"] for t in tries))
        refusals = [fake.message(t["original_message_id"]) for t in tries]
        assert [r["content"] for r in refusals] == ["Sorry, /info is for admins only."] * 3 + [
            "Sorry, only admins can change the mode."] * 3
        assert all(r["flags"] & MESSAGE_FLAG_EPHEMERAL for r in refusals) and core.mode == "openai"

        # The same words as chat are just chat: answered by the model, nothing changed, nothing revealed.
        for text in ("/mode hybrid", "/info"):
            await world.mention(fake.channel_id, text, user=member)
        history = await world.finished(world.place(fake.channel_id), member, answers=2)
        assert sorted(m.content for m in history if m.role == "assistant") == [ECHO + "/info", ECHO + "/mode hybrid"]
        assert core.mode == "openai"

        allowed = await fake.send_interaction("mode", {"mode": "hybrid"})  # the listed admin: the path is live
        await eventually(lambda: allowed["original_message_id"])
        assert fake.message(allowed["original_message_id"])["content"] == "Mode set to hybrid."
        assert core.mode == "hybrid"
        shown = await fake.send_interaction("info", user=member, permissions=ADMINISTRATOR)
        await eventually(lambda: shown["original_message_id"]
                         and "mode:" in fake.message(shown["original_message_id"])["content"])
        assert "sk-test-key" not in fake.message(shown["original_message_id"])["content"]


async def test_slack_info_is_admin_only_and_slack_has_no_mode_command(tmp_path, tiny_model_dir):
    async with running_app(tmp_path, tiny_model_dir, reply=QUICK, admin_user_ids=["UADMIN"]) as world:
        fake, core = world.fake, world.service.core
        for user in ("U2", "UADMIN"):
            fake.add_user(user, user.lower())
        await world.command("/info", user="U2")
        [refused] = await eventually(lambda: fake.responses)
        assert refused["json"]["text"] == "Sorry, /info is for admins only."
        assert refused["json"]["response_type"] == "ephemeral"

        unknown = await fake.post_slash_command(world.url, SECRET, "/mode", "hybrid", "U2", "C1")
        assert unknown.status == 404 and core.mode == "openai"
        for text in ("/mode hybrid", "/info"):
            await world.message("D2", text, user="U2", channel_type="im")
        history = await world.finished(Place("slack", "T1", "D2", ""), "U2", answers=2)
        assert sorted(m.content for m in history if m.role == "assistant") == [ECHO + "/info", ECHO + "/mode hybrid"]
        assert core.mode == "openai" and len(fake.responses) == 1

        await world.command("/info", user="UADMIN")  # a listed admin sees it: the path is live
        shown = (await eventually(lambda: fake.responses[1:]))[0]["json"]["text"]
        assert all(line in shown for line in INFO_LINES)
        assert "sk-test-key" not in shown and fake.token not in shown and SECRET not in shown


async def test_console_mode_is_for_the_local_operator_only(tmp_path, tiny_model_dir):
    async with echo_service(tmp_path, tiny_model_dir, None) as (service, _, _):
        console = Console(service.core, user_id="operator", out=io.StringIO())
        assert await console.handle("/mode hybrid", live=False) == "Mode set to hybrid."
        info = await console.handle("/info", live=False)
        assert "mode: hybrid" in info and KEY not in info
        # The console reads only its own terminal; no platform message reaches Console.handle.
        front_ends = [p for p in (REPO / "bots").rglob("*.py") if "Console(" in p.read_text()]
        assert [p.relative_to(REPO).as_posix() for p in front_ends] == ["bots/cli.py"]


# ---- Memory isolation and /forget ------------------------------------------------------------------------------

async def test_no_users_memory_reaches_another_users_or_another_places_prompt(tmp_path, tiny_model_dir, postgres_url):
    run = uuid.uuid4().hex[:6]
    places = [Place("discord", "G1", f"C-{run}", ""), Place("discord", "G1", f"C-{run}", "thread-1"),
              Place("discord", "", f"DM-{run}", ""), Place("slack", "T1", f"C-{run}", ""),
              Place("slack", "T1", f"C-{run}", "1700000000.000100")]
    users = [f"alice-{run}", f"bob-{run}", f"carol-{run}"]  # the same ids on both platforms
    async with echo_service(tmp_path, tiny_model_dir, postgres_url, history_token_budget=4000) as (service, _, _):
        seen = spy_on_submit(service)
        owner: dict[str, tuple] = {}

        async def say(user, p, n):
            canary = f"canary:{user}:{p}:{n}"
            outcome = await service.core.answer(Incoming(places[p], user, f"remember {canary}"), RecordingSink(), 2000,
                                                min_interval_s=0.01)
            owner[outcome.request_id] = (user, p)

        for n in range(3):  # three rounds, every user in every place at once
            await asyncio.gather(*(say(u, p, n) for u in users for p in range(len(places))))
        assert len(seen) == len(owner) == 3 * len(users) * len(places)
        for payload in seen:
            user, p = owner[payload["request_id"]]
            prompt = " ".join(m["content"] for m in payload["messages"])
            mentioned = set(re.findall(r"canary:([^:]+):(\d+):\d+", prompt))
            assert mentioned == {(user, str(p))}, (user, places[p], mentioned)
        # Not vacuous: the last round's prompts do carry the user's own earlier messages from that place.
        last = [p for p in seen if len(p["messages"]) >= 6]
        assert len(last) == len(users) * len(places)


async def test_forget_leaves_no_row_in_any_table_even_with_a_reply_in_flight(tmp_path, tiny_model_dir, postgres_url):
    run = uuid.uuid4().hex[:6]
    alice, bob = f"alice-{run}", f"bob-{run}"
    channel = Place("discord", "G1", f"C-{run}", "")
    places = [channel, Place("discord", "G1", f"C-{run}", "thread"), Place("discord", "", f"DM-{run}", "")]
    async with echo_service(tmp_path, tiny_model_dir, postgres_url) as (service, openai, _):
        core, memory = service.core, service.memory

        async def say(user, place, text):
            return await core.answer(Incoming(place, user, text, display_name=f"{user}-name"), RecordingSink(), 2000,
                                     min_interval_s=0.01)

        for n, place in enumerate(places):
            await say(alice, place, f"alice-secret-{run}-{n}")
        await say(bob, channel, f"bob-words-{run}")
        await say(alice, Place("slack", "T1", f"C-{run}", ""), f"alice-on-slack-{run}")  # another platform's alice
        await memory.set_system_prompt(channel, alice, f"alice-prompt-{run}")
        await memory.set_mode(places[2], alice, "local")
        await memory.record_usage("discord", alice, None, "openai", 10, 5)
        await memory.begin_reply(places[1], alice, f"pending-{run}")  # a reply a crash left unfinished
        [(alice_pk,)] = sql(postgres_url, "SELECT id FROM users WHERE platform = 'discord' AND platform_user_id = %s",
                            alice)

        openai.script(Scenario.reply(f"alice-reply-{run} streaming slowly", chunks=6, delay_s=0.15))
        in_flight = asyncio.create_task(say(alice, channel, f"alice-secret-{run}-late"))
        await eventually(lambda: openai.chat_calls >= 6)
        assert await core.forget("discord", alice) == "Done: I've forgotten our conversations."
        late = await in_flight
        assert late.status == "answered" and late.text.startswith(f"alice-reply-{run}")  # shown, then kept nowhere

        tables = [t for (t,) in sql(postgres_url, "SELECT table_name FROM information_schema.tables WHERE "
                                    "table_schema = 'public' AND table_name <> 'alembic_version'")]
        assert {"users", "conversations", "messages", "usage"} <= set(tables)
        for table in tables:
            rows = [json.loads(r) for (r,) in sql(postgres_url, f'SELECT row_to_json(t)::text FROM "{table}" t')]
            text = json.dumps(rows)
            assert f"alice-secret-{run}" not in text and f"alice-prompt-{run}" not in text, table
            assert f"alice-reply-{run}" not in text and f"pending-{run}" not in text, table
            assert not [r for r in rows if r.get("user_id") == alice_pk or (table == "users" and r["id"] == alice_pk)]
        assert sql(postgres_url, "SELECT count(*) FROM users WHERE platform_user_id = %s", alice) == [(1,)]  # Slack's
        assert [m.content for m in await memory.history(channel, bob)][0] == f"bob-words-{run}"
        assert await memory.history(Place("slack", "T1", f"C-{run}", ""), alice) != []
        assert await core.forget("discord", alice) == "I had nothing stored about you."


# ---- Slack request signatures ----------------------------------------------------------------------------------

def signed(body: str, ts: float | None = None, secret: str = SECRET) -> dict[str, str]:
    timestamp = str(int(time.time() if ts is None else ts))
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": f"v0={digest}"}


async def post(url: str, body: str, headers: dict, content_type: str = "application/json") -> int:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body.encode(), headers={"Content-Type": content_type, **headers}) as response:
        return response.status


async def test_slack_requests_with_bad_missing_or_replayed_signatures_do_nothing(tmp_path, tiny_model_dir):
    async with running_app(tmp_path, tiny_model_dir, reply=QUICK) as world:
        submitted = spy_on_submit(world.service)
        asked = await world.mention("C1", "remember me")  # a genuine request first: the spy and the app are live
        await world.finished(Place("slack", "T1", "C1", asked["ts"]), "U1")
        calls_before, stats_before = len(world.fake.requests), await world.service.memory.stats()
        event = json.dumps({"type": "event_callback", "team_id": "T1", "event": {
            "type": "app_mention", "user": "U1", "text": "<@UBOT> hi", "ts": "1700000000.000100", "channel": "C1"}})
        other = event.replace("hi", "forged")
        now = time.time()
        cases = {
            "no headers": {},
            "no signature": {"X-Slack-Request-Timestamp": signed(event)["X-Slack-Request-Timestamp"]},
            "no timestamp": {"X-Slack-Signature": signed(event)["X-Slack-Signature"]},
            "empty signature": signed(event) | {"X-Slack-Signature": ""},
            "zero signature": signed(event) | {"X-Slack-Signature": "v0=" + "0" * 64},
            "v1 scheme": signed(event) | {"X-Slack-Signature": "v1=" + signed(event)["X-Slack-Signature"][3:]},
            "wrong secret": signed(event, secret="not-the-secret"),
            "signature of another body": signed(other),
            "replayed after 5 min": signed(event, now - 301),
            "replayed after an hour": signed(event, now - 3600),
            "from the future": signed(event, now + 360),  # a margin: the cases before it take seconds on a slow machine
            "timestamp not a number": {**signed(event), "X-Slack-Request-Timestamp": "soon"},
        }
        statuses = {name: await post(world.url, event, headers) for name, headers in cases.items()}
        commands = [
            await post_slash_command(world.url, "not-the-secret", "/ask", "hi", "U1", "C1"),
            await post_slash_command(world.url, SECRET, "/ask", "hi", "U1", "C1", timestamp=now - 301),
            await post_slash_command(world.url, SECRET, "/forget", "", "U1", "C1", forge=True),
            await post_slash_command(world.url, SECRET, "/info", "", "U1", "C1", timestamp=now + 3600),
            await post_event(world.url, SECRET, json.loads(event)["event"], retry_num=1, forge=True),
        ]
        assert statuses == dict.fromkeys(cases, 401)
        assert [c.status for c in commands] == [401] * len(commands)
        await asyncio.sleep(0.3)
        assert len(submitted) == 1 and len(world.fake.requests) == calls_before and world.fake.responses == []
        assert await world.service.memory.stats() == stats_before  # the forged /forget deleted nothing either
        assert len(await world.service.memory.history(Place("slack", "T1", "C1", asked["ts"]), "U1")) == 2


# ---- Rate limits ----------------------------------------------------------------------------------------------

async def test_rate_limit_holds_under_fifty_concurrent_messages(tmp_path, tiny_model_dir, postgres_url):
    run = uuid.uuid4().hex[:6]
    place, spammer, other = Place("discord", "G1", f"C-{run}", ""), f"spammer-{run}", f"other-{run}"
    async with echo_service(tmp_path, tiny_model_dir, postgres_url, rate_limit_per_minute=5) as (service, _, _):
        seen = spy_on_submit(service)

        async def say(user, n, platform="discord"):
            sink = RecordingSink()
            where = Place(platform, place.workspace_id, place.channel_id)
            outcome = await service.core.answer(Incoming(where, user, f"message {n}"), sink, 2000, min_interval_s=0.01)
            return outcome, sink

        started = time.perf_counter()
        results = await asyncio.gather(*(say(spammer, n) for n in range(50)), *(say(other, n) for n in range(5)),
                                       *(say(spammer, n, "slack") for n in range(5)))
        elapsed = time.perf_counter() - started
        flood, others, slack = results[:50], results[50:55], results[55:]
        answered = [o for o, _ in flood if o.status == "answered"]
        refused = [(o, s) for o, s in flood if o.status != "answered"]
        assert len(answered) == 5 and len(refused) == 45
        for outcome, sink in refused:
            wait = RATE_LIMITED.fullmatch(outcome.text)
            assert outcome.status == "refused" and wait and 1 <= int(wait[1]) <= 60 and sink.messages == [outcome.text]
        assert all(o.status == "answered" for o, _ in others + slack)  # limits are per user and per platform
        assert len(seen) == 15  # only answered messages reach a worker
        history = await service.memory.history(place, spammer)
        assert sum(m.role == "user" for m in history) == 5  # refused messages are not stored
        print(f"\nMETRICS rate limit: 50 concurrent from one user at 5/min -> {len(answered)} answered, "
              f"{len(refused)} told to wait; 60 messages in {elapsed:.2f} s")


# ---- Nothing from Redis or the network is unpickled -------------------------------------------------------------

def test_celery_accepts_json_only():
    from worker.celery_app import app

    for conf in (make_celery("redis://127.0.0.1:6379/0").conf, app.conf):
        assert conf.accept_content == ["json"]
        assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
        assert conf.result_accept_content in (None, ["json"])


UNSAFE = re.compile(
    r"\bimport (c?pickle|dill|cloudpickle|shelve|marshal|joblib)\b|\bfrom (c?pickle|dill|cloudpickle|shelve|marshal"
    r"|joblib) import|\bpickle\.|\bdill\.|\bmarshal\.loads?|\bjoblib\.load|yaml\.unsafe_load|yaml\.load\((?![^)]*Safe"
    r"Loader)|allow_pickle\s*=\s*True|x-python-serialize|serializer\s*=\s*[\"']pickle|accept_content[^\n]*pickle")
TORCH_LOAD = re.compile(r"torch\.load\(((?:[^()]|\([^()]*\))*)\)")
ALLOWED = {"tests/reliability/test_security.py", "tests/reliability/test_security_processes.py"}  # they test refusal


def test_no_pickle_or_unsafe_torch_load_in_the_code():
    sources = [p for folder in ("bots", "worker", "pioneer_model", "migrations", "benchmarks", "examples", "tests")
               for p in (REPO / folder).rglob("*.py")]
    assert len(sources) > 50
    found = []
    for path in sources:
        name, text = path.relative_to(REPO).as_posix(), path.read_text()
        if name in ALLOWED:
            continue
        found += [f"{name}: {m[0]}" for m in UNSAFE.finditer(text)]
        found += [f"{name}: {m[0]}" for m in TORCH_LOAD.finditer(text) if "weights_only=True" not in m[1]]
    assert found == []
    assert UNSAFE.search("import pickle") and UNSAFE.search("yaml.load(f)") and not UNSAFE.search("yaml.safe_load(f)")
    assert [m[1] for m in TORCH_LOAD.finditer("torch.load(p, map_location=dict(a=1))")] == ["p, map_location=dict(a=1)"]

