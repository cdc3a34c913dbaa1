"""Load through the whole stack: many users talking to `pioneer discord` (a process) against the fake Discord,
answered by `pioneer worker` processes over Redis, remembered in PostgreSQL. Shared by tests/reliability/test_load.py
and benchmarks/load.py."""

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.discord_server import FakeDiscord
from tests.helpers import eventually
from tests.reliability.stack import front_end, pioneer_env, sql_rows, stop_all, wait_for_workers, worker

MARKER = "▌"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


@dataclass
class Sent:
    """One user message and what became of it."""

    user: dict
    channel_id: str
    text: str
    message_id: str = ""
    sent_at: float = 0.0
    answered_at: float | None = None
    reply: str | None = None


@dataclass
class LoadReport:
    messages: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    lost: int
    duplicates: int
    rate_limited: int
    out_of_order: int
    not_stored: int

    def figures(self) -> dict:
        return {"messages": self.messages, "seconds": round(self.seconds, 1),
                "messages_per_s": round(self.messages / self.seconds, 2),
                "latency_ms_p50": round(percentile(self.latencies_ms, 50)),
                "latency_ms_p95": round(percentile(self.latencies_ms, 95)),
                "latency_ms_p99": round(percentile(self.latencies_ms, 99)),
                "losses": self.lost, "duplicates": self.duplicates, "rate_limited_429s": self.rate_limited,
                "out_of_order": self.out_of_order, "not_stored": self.not_stored}


def conversations(fake: FakeDiscord, users: int, places: int, per_user: int) -> list[tuple[dict, str]]:
    """(user, channel) pairs: each of `users` users talks in `per_user` of `places` channels."""
    channels = [fake.channel_id] + [fake.add_channel(f"room-{n}") for n in range(1, places)]
    people = [fake.add_user(f"user{n}") for n in range(users)]
    return [(person, channels[(n + k * places // max(1, per_user)) % places])
            for n, person in enumerate(people) for k in range(per_user)]


async def talk(fake: FakeDiscord, user: dict, channel_id: str, texts: list[str], timeout_s: float) -> list[Sent]:
    """One conversation: each message after the reply to the one before it has finished, as people chat."""
    bot_id = fake.bot_user["id"]
    sent = []
    for text in texts:
        message = Sent(user, channel_id, text, sent_at=time.monotonic())
        record = await fake.send_message_create(channel_id, f"<@{bot_id}> {text}", author=user)
        message.message_id = record["id"]
        sent.append(message)
        try:
            reply = await eventually(lambda: final_reply(fake, message), timeout=timeout_s, interval=0.05)
        except TimeoutError:
            break  # lost: the rest of this conversation would wait on it
        message.answered_at, message.reply = time.monotonic(), reply["content"]
    return sent


def final_reply(fake: FakeDiscord, message: Sent) -> dict | None:
    for reply in replies_to(fake, message):
        if not reply["content"].endswith(MARKER):
            return reply
    return None


def replies_to(fake: FakeDiscord, message: Sent) -> list[dict]:
    return [m for m in fake.messages.get(message.channel_id, ())
            if m["author"]["id"] == fake.bot_user["id"]
            and str((m["message_reference"] or {}).get("message_id")) == message.message_id]


async def run_load(fake: FakeDiscord, database_url: str, *, users: int, places: int, per_user: int,
                   per_conversation: int, timeout_s: float = 60) -> LoadReport:
    """users x per_user conversations of per_conversation messages each, all at once; then count."""
    pairs = conversations(fake, users, places, per_user)
    rate_limited_before = fake.rate_limited_count
    started = time.monotonic()
    talks = await asyncio.gather(*(
        talk(fake, user, channel, [f"{user['username']} in {channel[-4:]} says hello number {k}"
                                   for k in range(per_conversation)], timeout_s)
        for user, channel in pairs))
    seconds = time.monotonic() - started
    await asyncio.sleep(1.0)  # anything late, such as a second reply, shows now

    sent = [message for conversation in talks for message in conversation]
    expected = len(pairs) * per_conversation
    answered = [m for m in sent if m.reply is not None]
    duplicates = sum(max(0, len(replies_to(fake, m)) - 1) for m in sent)
    stored = stored_conversations(database_url)
    not_stored, out_of_order = 0, 0
    for (user, channel), conversation in zip(pairs, talks):
        rows = stored.get((user["id"], channel), [])
        said = [(role, content) for role, content in rows if role == "user"]
        replies = [content for role, content in rows if role == "assistant"]
        out_of_order += [content for _, content in said] != [m.text for m in conversation]
        out_of_order += [role for role, _ in rows] != ["user", "assistant"] * (len(rows) // 2)
        not_stored += sum(1 for m in conversation if m.reply is not None) - len(replies)
        duplicates += max(0, len(replies) - len(conversation))
        shown = [m.reply for m in conversation if m.reply is not None]
        out_of_order += shown != replies[: len(shown)]  # what each user saw is what was stored, in order
    return LoadReport(messages=expected, seconds=seconds,
                      latencies_ms=[(m.answered_at - m.sent_at) * 1000 for m in answered],
                      lost=expected - len(answered), duplicates=duplicates,
                      rate_limited=fake.rate_limited_count - rate_limited_before,
                      out_of_order=out_of_order, not_stored=max(0, not_stored))


def stored_conversations(database_url: str) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(user id, channel) -> [(role, content)] of complete messages, in order."""
    rows = sql_rows(database_url, """
        SELECT u.platform_user_id, c.channel_id, m.role, m.content FROM messages m
        JOIN conversations c ON c.id = m.conversation_id JOIN users u ON u.id = c.user_id
        WHERE m.status = 'complete' ORDER BY m.id""")
    stored: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for user_id, channel_id, role, content in rows:
        stored.setdefault((user_id, channel_id), []).append((role, re.sub(r"<@\d+>\s*", "", content)))
    return stored


@contextlib.asynccontextmanager
async def discord_stack(log_dir: Path, model_dir: Path, redis_url: str, database_url: str, *, workers: int = 2,
                        worker_concurrency: int = 8, **settings):
    """The fake Discord, `pioneer worker` x workers and `pioneer discord`, all started; yields the fake and the
    processes."""
    async with FakeDiscord(with_thread=False) as fake:
        env = pioneer_env(model_dir, redis_url, log_dir, attention_mode="local", **settings)
        front_env = env | {"DATABASE_URL": database_url, "DISCORD_TOKEN": fake.token,
                           "DISCORD_API_BASE": fake.api_base, "DISCORD_GATEWAY_URL": fake.gateway_url}
        processes = [worker(env, f"load{n}", log_dir, worker_concurrency) for n in range(workers)]
        try:
            processes.append(front_end(front_env, "discord", log_dir))
            await asyncio.to_thread(wait_for_workers, redis_url, workers)
            await eventually(lambda: fake.sessions and fake.global_commands, timeout=90, interval=0.1)
            yield fake, processes
        finally:
            await asyncio.to_thread(stop_all, processes)
