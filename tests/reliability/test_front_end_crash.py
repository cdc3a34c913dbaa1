"""A front-end SIGKILLed mid-edit (real processes): on restart it finishes the reply, or marks it interrupted."""

import asyncio

from bots.recovery import INTERRUPTED_NOTE
from bots.slack_io import PLACEHOLDER
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.fakes.slack_server import FakeSlack
from tests.helpers import eventually, free_port
from tests.integration.test_slack import SECRET, World, listening
from tests.reliability.stack import front_end, pioneer_env, sql_rows, stop_all, wait_for_workers, worker

REPLY = "Redelivered replies replace the half they interrupted, so every user sees one whole answer in one message."
SLOW = Scenario.reply(REPLY, chunks=12, delay_s=0.4)  # about five seconds: time to kill something mid-reply


async def test_a_front_end_killed_mid_edit_finishes_or_marks_its_replies_on_restart(
        tmp_path, tiny_model_dir, redis_server, database_url):
    async with FakeSlack() as slack, FakeOpenAI(default=SLOW) as openai:
        port = free_port()
        common = dict(attention_mode="openai", openai_base_url=openai.base_url, openai_api_key="sk-test",
                      openai_max_retries=0)
        worker_env = pioneer_env(tiny_model_dir, redis_server.url, tmp_path, **common)
        front_env = pioneer_env(tiny_model_dir, redis_server.url, tmp_path, **common, database_url=database_url,
                                slack_bot_token=slack.token, slack_signing_secret=SECRET, slack_api_url=slack.api_url,
                                slack_port=port, reply_timeout_s=4)
        world = World(slack, None, f"http://127.0.0.1:{port}/slack/events", None)
        answering = worker(worker_env, "w1", tmp_path)
        front = front_end(front_env, "slack", tmp_path, "slack-1")
        processes = [answering, front]
        try:
            await asyncio.to_thread(wait_for_workers, redis_server.url, 1)
            await eventually(lambda: listening(port), timeout=60, interval=0.2)

            # 1. The front-end dies mid-edit; the worker finishes; the restarted front-end finishes the message.
            finished = await world.mention("C1", "first question")
            reply = await eventually(lambda: half_shown(world, finished), timeout=30)
            front.kill()
            await eventually(lambda: redis_server.client().keys("pioneer:reply:*:done"), timeout=30)
            assert reply["text"].endswith("▌")  # left half-written by the dead process
            front = front_end(front_env, "slack", tmp_path, "slack-2")
            processes.append(front)
            await eventually(lambda: reply["text"] == REPLY, timeout=60, interval=0.1)
            await eventually(lambda: a_reply_is(database_url, "complete"), timeout=30, interval=0.2)

            # 2. The front-end and the worker die; nothing finishes the reply: marked interrupted on restart.
            await eventually(lambda: listening(port), timeout=60, interval=0.2)
            cut_off = await world.mention("C1", "second question")
            second = await eventually(lambda: half_shown(world, cut_off), timeout=30)
            front.kill()
            answering.kill()
            front = front_end(front_env, "slack", tmp_path, "slack-3")
            processes.append(front)
            await eventually(lambda: second["text"].endswith(INTERRUPTED_NOTE), timeout=60, interval=0.1)
            await eventually(lambda: a_reply_is(database_url, "interrupted"), timeout=30, interval=0.2)  # then the row
        finally:
            await asyncio.to_thread(stop_all, processes)

    assert [m["text"] for m in world.replies("C1", finished["ts"])] == [REPLY]  # one message, finished in place
    [interrupted] = world.replies("C1", cut_off["ts"])
    shown = interrupted["text"].removesuffix("\n" + INTERRUPTED_NOTE)
    assert shown and REPLY.startswith(shown) and slack.rate_limited_count == 0
    rows = sql_rows(database_url, "SELECT role, status, content FROM messages ORDER BY id")
    assert rows == [("user", "complete", "first question"), ("assistant", "complete", REPLY),
                    ("user", "complete", "second question"), ("assistant", "interrupted", shown)]
    for process in processes[2:]:
        assert "Traceback" not in process.log(), process.log()


async def a_reply_is(database_url: str, status: str) -> bool:
    query = "SELECT count(*) FROM messages WHERE role = 'assistant' AND status = %s"
    return (await asyncio.to_thread(sql_rows, database_url, query, status))[0][0] == 1


def half_shown(world: World, asked: dict) -> dict | None:
    """The bot's reply to `asked` once it shows some words but not all of them."""
    replies = world.replies("C1", asked["ts"])
    if replies and replies[0]["text"] not in (PLACEHOLDER, REPLY) and replies[0]["text"].endswith("▌"):
        return replies[0]
    return None
