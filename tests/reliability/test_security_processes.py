"""Security checks on real processes: no secret in any log line at DEBUG, and a worker that refuses pickles.

Each test has a redis-server of its own (the `redis_server` fixture), so its queue and registry are nobody else's.
"""

import asyncio
import os
import time
import uuid

from kombu import Connection, Exchange, Queue

from bots.memory import migrate
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.fakes.slack_server import FakeSlack
from tests.helpers import eventually, free_port, start_front_end, start_worker, stop, wait_for_workers
from tests.integration.test_slack import listening
from worker.dispatch import CeleryDispatcher
from worker.streams import RedisStreamBus

SECRETS = {  # distinctive fakes, each in its platform's real format
    "DISCORD_TOKEN": "MTE4NzY1NDMyMTA5ODc2NTQzMg.GxYz12.DistinctFakeDiscordTokenAbCdEf0123",
    "SLACK_BOT_TOKEN": "xoxb-1111111111-2222222222-DistinctFakeSlackBotToken",
    "SLACK_SIGNING_SECRET": "5f2b8c0e9d1a4b3c8e7f6a5d4c3b2a19",
    "OPENAI_API_KEY": "sk-proj-DistinctFakeOpenAIKey-0123456789abcdef",
}


def process_env(tmp_path, model_dir, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ATTENTION_", "DATABASE_"))}
    return env | {"REDIS_URL": redis_url, "MODEL_PATH": str(model_dir), "PIONEER_DATA_DIR": str(tmp_path),
                  "MAX_NEW_TOKENS": "8", "PYTHONUNBUFFERED": "1", "METRICS_PORT": "0", "LOG_LEVEL": "INFO"} | extra


async def mention(slack: FakeSlack, url: str, channel: str, text: str) -> dict:
    asked = slack.record_user_message(channel, f"<@{slack.bot_user_id}> {text}")
    event = {"type": "app_mention", "user": "U1", "text": asked["text"], "ts": asked["ts"], "channel": channel}
    assert (await slack.post_event(url, SECRETS["SLACK_SIGNING_SECRET"], event)).status == 200
    return asked


def redis_contents(client) -> list[str]:
    """Every key of a Redis database with its value, as text."""
    readers = {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
               "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1), "stream": client.xrange}
    return [f"{key!r} {readers.get(client.type(key).decode(), lambda k: None)(key)!r}" for key in client.scan_iter()]


def leaks(text: str) -> list[str]:
    """Which secrets appear in text, whole or as a recognisable piece (the distinctive middle of each)."""
    return [name for name, value in SECRETS.items() if value in text or value[8:28] in text]


async def test_no_token_or_key_in_any_log_line_redis_entry_or_info_at_debug(tmp_path, tiny_model_dir, redis_server,
                                                                            database_url):
    await migrate(database_url)  # here, so that the two front-ends do not both create the tables
    async with FakeOpenAI(default=Scenario.reply(None, chunks=3), expected_key=SECRETS["OPENAI_API_KEY"]) as openai, \
            FakeDiscord(token=SECRETS["DISCORD_TOKEN"]) as discord, \
            FakeSlack(token=SECRETS["SLACK_BOT_TOKEN"]) as slack:
        port = free_port()
        env = process_env(tmp_path, tiny_model_dir, redis_server.url, **SECRETS, LOG_LEVEL="DEBUG",
                          OPENAI_BASE_URL=openai.base_url, ATTENTION_MODE="openai",
                          ADMIN_USER_IDS=f"U1,{discord.user['id']}", DISCORD_API_BASE=discord.api_base,
                          DISCORD_GATEWAY_URL=discord.gateway_url, SLACK_API_URL=slack.api_url,
                          SLACK_HOST="127.0.0.1", SLACK_PORT=str(port))
        worker = start_worker(env, "secrets@test")
        fronts = [start_front_end(env | {"DATABASE_URL": database_url}, name) for name in ("discord", "slack")]
        try:
            await asyncio.to_thread(wait_for_workers, redis_server.url, 1)
            await eventually(lambda: discord.sessions and discord.global_commands, timeout=60)
            await eventually(lambda: listening(port), timeout=60, interval=0.2)
            url, secret = f"http://127.0.0.1:{port}/slack/events", SECRETS["SLACK_SIGNING_SECRET"]
            openai.script(Scenario.unauthorized())  # a failure is logged too
            failed = await mention(slack, url, "C1", "first, a failure")
            await eventually(lambda: any("access was refused" in m["text"] for m in slack.messages_in("C1")
                                         if m["thread_ts"] == failed["ts"]), timeout=30)
            await mention(slack, url, "C2", "then a proper answer please")
            await discord.send_message_create(discord.channel_id, f"<@{discord.bot_user['id']}> hello from discord")
            forged = await slack.post_event(url, "wrong-secret", {"type": "app_mention", "user": "U1",
                                                                   "text": "<@UBOT> hi", "ts": "1.1", "channel": "C1"})
            assert forged.status == 401
            assert (await slack.post_slash_command(url, secret, "/info", "", "U1", "C1")).status == 200
            info = await discord.send_interaction("info")
            await eventually(lambda: slack.responses and info["original_message_id"]
                             and "mode:" in discord.message(info["original_message_id"])["content"], timeout=30)
            await eventually(lambda: any("You said" in m["text"] for m in slack.messages_in("C2")), timeout=30)
            await eventually(lambda: [m for m in discord.messages_in(discord.channel_id)
                                      if m["author"]["id"] == discord.bot_user["id"] and "You said" in m["content"]],
                             timeout=30)
            shown = [slack.responses[0]["json"]["text"], discord.message(info["original_message_id"])["content"]]
            assert all("mode: openai" in text for text in shown)
            stored = redis_contents(redis_server.client())
            assert any("pioneer:workers:" in entry for entry in stored)  # the worker's registry entry is there
        finally:
            logs = [await asyncio.to_thread(stop, p) for p in fronts] + [await asyncio.to_thread(stop, worker)]
    assert all(" DEBUG " in log for log in logs), [log[-2000:] for log in logs]  # DEBUG was really on
    redacted = sum(line.count("[redacted]") for line in "\n".join(logs).splitlines() if "slack_sdk" in line)
    assert redacted >= 3  # slack_sdk logs its Authorization header at DEBUG: those lines were there, and redacted
    assert leaks("\n".join(logs)) == [], "a secret reached a log line"
    assert leaks("\n".join(stored)) == [] and leaks("\n".join(shown)) == []
    bot_text = [m["content"] for msgs in discord.messages.values() for m in msgs] + [
        m["text"] for msgs in slack.messages.values() for m in msgs]
    assert leaks("\n".join(bot_text)) == []
    print(f"\nMETRICS secrets: {sum(len(log.splitlines()) for log in logs)} log lines at DEBUG from 3 processes "
          f"({redacted} redacted), {len(stored)} Redis keys, 2 /info outputs: no secret")


class RunsCodeWhenUnpickled:
    """Unpickling this creates `path`: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


async def test_a_worker_refuses_a_pickled_task_and_runs_nothing(tmp_path, tiny_model_dir, redis_server):
    marker = tmp_path / "unpickled"
    worker = start_worker(process_env(tmp_path, tiny_model_dir, redis_server.url), "pickle@test")
    try:
        await asyncio.to_thread(wait_for_workers, redis_server.url, 1)
        task_id = uuid.uuid4().hex
        exchange = Exchange("pioneer", type="direct")
        with Connection(redis_server.url) as connection:  # a Celery protocol-2 message, body pickled
            connection.Producer().publish(
                ((RunsCodeWhenUnpickled(marker),), {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                        "chord": None}),
                exchange=exchange, routing_key="pioneer", serializer="pickle", correlation_id=task_id,
                declare=[Queue("pioneer", exchange, routing_key="pioneer")],
                headers={"lang": "py", "task": "pioneer.answer", "id": task_id, "root_id": task_id,
                         "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                         "argsrepr": "(payload,)", "kwargsrepr": "{}", "origin": "attacker"})
        # A proper JSON task behind it is answered: the worker was up and took the queue in order.
        dispatcher, bus = CeleryDispatcher(redis_server.url), RedisStreamBus(redis_server.url)
        request_id = uuid.uuid4().hex
        await dispatcher.submit({"request_id": request_id, "mode": "local", "enqueued_at": time.time(),
                                 "messages": [{"role": "user", "content": "hello"}]})
        events = [event async for event in bus.read(request_id, timeout_s=30)]
        assert events[-1].kind == "final"
        await dispatcher.close()
        bus.close()
        client = redis_server.client()  # both messages gone for good: one acknowledged, one discarded
        await eventually(lambda: client.llen("pioneer") == 0 and client.hlen("unacked") == 0)
    finally:
        log = await asyncio.to_thread(stop, worker)
    assert "Refusing to deserialize untrusted content of type pickle" in log, log[-3000:]
    assert not marker.exists()
    received = [line for line in log.splitlines() if "Task pioneer.answer[" in line and "received" in line]
    assert len(received) == 1 and request_id in received[0]  # only the JSON task reached the task code
