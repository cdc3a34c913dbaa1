"""429 storms from the chat platforms: limits far tighter than ours; the bot backs off and every final edit lands."""

import asyncio
import time

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.openai_server import Scenario
from tests.fakes.slack_server import FakeSlack
from tests.integration.test_discord import running_bot
from tests.integration.test_slack import running_app

STREAMED = Scenario.reply(None, chunks=6, delay_s=0.25)  # an echo in six pieces, about 1.5 s
CONVERSATIONS = 4


def answer_to(n: int) -> str:
    return f"(fake OpenAI) You said: question number {n}, asked while the platform is refusing edits"


async def test_slack_update_storm_backs_off_and_every_final_update_lands(tmp_path, tiny_model_dir):
    # chat.update: 2 at once, then one every 2 s for the workspace (Slack's Tier 3 is 50 a minute).
    fake = FakeSlack(update_limit=(2, 4.0))
    async with running_app(tmp_path, tiny_model_dir, reply=STREAMED, fake=fake, worker_concurrency=8) as world:
        started = time.monotonic()
        asked = await asyncio.gather(*(world.mention(f"C{n}", answer_to(n).removeprefix("(fake OpenAI) You said: "))
                                       for n in range(CONVERSATIONS)))
        finals = {n: answer_to(n) for n in range(CONVERSATIONS)}
        await fake.wait_for(lambda: all(shown(world, f"C{n}", asked[n]) == finals[n] for n in finals), timeout=60)
        elapsed = time.monotonic() - started

    updates = fake.requests_to("chat.update")
    refused = [r for r in updates if r["status"] == 429]
    print(f"\nMETRICS slack 429 storm: {len(refused)} x 429 of {len(updates)} updates; "
          f"{CONVERSATIONS} final updates landed in {elapsed:.1f} s")
    assert refused, "the storm did not happen"
    for refusal in refused:  # after a 429, nothing more is sent to the workspace until Retry-After has passed
        retry_after = 1.0  # the fake's Retry-After is the wait rounded up to whole seconds, at least 1
        too_soon = [r for r in updates if refusal["time"] + 0.15 < r["time"] < refusal["time"] + retry_after - 0.15]
        assert not too_soon
    assert len(refused) <= 2 * CONVERSATIONS


def shown(world, channel: str, asked: dict) -> str | None:
    replies = world.replies(channel, asked["ts"])
    return replies[0]["text"] if replies else None


async def test_discord_edit_storm_backs_off_and_every_final_edit_lands(tmp_path, tiny_model_dir):
    # Two edits and two sends per 4 s in the channel, and no rate-limit headers to plan by (Discord allows 5 per 5 s).
    fake = FakeDiscord(advertise_rate_limits=False, edit_limit=(2, 4.0), create_limit=(2, 4.0), with_thread=False)
    users = [fake.add_user(f"user{n}") for n in range(CONVERSATIONS)]
    async with running_bot(tmp_path, tiny_model_dir, reply=STREAMED, fake=fake, worker_concurrency=8) as world:
        started = time.monotonic()
        asked = await asyncio.gather(*(world.mention(fake.channel_id, answer_to(n).removeprefix(
            "(fake OpenAI) You said: "), user) for n, user in enumerate(users)))
        finals = {a["id"]: answer_to(n) for n, a in enumerate(asked)}

        def all_final():
            replies = {str((m["message_reference"] or {}).get("message_id")): m["content"]
                       for m in world.replies(fake.channel_id)}
            return all(replies.get(asked_id) == text for asked_id, text in finals.items())

        await fake.wait_for(all_final, timeout=90)
        elapsed = time.monotonic() - started
        for n, user in enumerate(users):
            [*_, reply] = await world.finished(world.place(fake.channel_id), user)
            assert reply.content == answer_to(n)

    calls = fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")
    calls += fake.requests_to("POST", r"/channels/\d+/messages")
    print(f"\nMETRICS discord 429 storm: {fake.rate_limited_count} x 429 of {len(calls)} sends and edits; "
          f"{CONVERSATIONS} final edits landed in {elapsed:.1f} s")
    assert fake.rate_limited_count > 0, "the storm did not happen"
    assert len(world.replies(fake.channel_id)) == CONVERSATIONS  # one message each: no reply posted twice
    assert fake.rate_limited_count <= 3 * CONVERSATIONS
