"""Slack I/O for the listeners: the message sink, neutralised mentions, budgets, and answering into Slack."""

import contextlib
import logging
import re
from dataclasses import dataclass, field

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from .core import ConversationCore, Incoming
from .edits import RateBudget, RateLimited
from .memory import PendingReply, Place
from .recovery import Resumed

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 3500  # split replies here; Slack refuses updates past about 4,000 characters
MAX_TEXT = 4000
MAX_THREADS_KEPT = 10_000
MIN_EDIT_INTERVAL_S = 1.5  # chat.update is scarce (Tier 3), so intermediate edits are spaced out
PLACEHOLDER = "_Thinking…_"
SORRY = "Sorry, something went wrong on my side. Please try again in a moment."
NOT_IN_CHANNEL = "I can't post in this channel. Invite me with `/invite @Pioneer`, or ask me in a DM."
# <!channel>, <!here>, <!everyone>, <!subteam^…>, <@U…> and <#C…> are live markup; "&lt;" shows a plain "<".
LIVE_MARKUP = re.compile(r"<(?=[!@#])")


def neutralise(text: str) -> str:
    """Text that pings nobody: mention and broadcast markup is shown, not acted on."""
    text = LIVE_MARKUP.sub("&lt;", text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def update_budget() -> RateBudget:
    """chat.update is Tier 3, about 50 a minute per workspace; a second of slack for network jitter."""
    return RateBudget(50, 61.0)


def post_pacer() -> RateBudget:
    """chat.postMessage: about one a second per channel."""
    return RateBudget(1, 1.0)


async def guarded(call):
    """Await a Web API call; a 429 ("ratelimited") becomes RateLimited with its Retry-After."""
    try:
        return await call
    except SlackApiError as exc:
        if exc.response.status_code == 429 or exc.response.get("error") == "ratelimited":
            raise RateLimited(float(exc.response.headers.get("Retry-After", 1))) from exc
        raise


class SlackSink:
    """A reply in a channel, DM or thread. open() posts a placeholder at once; the reply's first
    part then replaces it by chat.update, and further parts are new messages."""

    def __init__(self, client: AsyncWebClient, pacer: RateBudget, channel: str, *, thread_ts: str | None = None,
                 lead: str = ""):
        self.client, self.pacer, self.channel, self.thread_ts = client, pacer, channel, thread_ts
        self.lead = lead  # shown above the first part, e.g. the question of a slash command
        self.placeholder_ts: str | None = None
        self.first_ts: str | None = None
        self.posted: list[str] = []  # ts of every message of this reply, the placeholder first

    async def open(self) -> None:
        self.placeholder_ts = await self._post(self.lead + PLACEHOLDER)

    def locate(self) -> dict | None:
        """Where this reply is shown, for a restarted front-end (see adopt)."""
        if not self.posted:
            return None
        return {"channel": self.channel, "thread_ts": self.thread_ts, "ts": list(self.posted), "lead": self.lead}

    def adopt(self, location: dict) -> list[str]:
        """Take over the messages of a reply shown before a restart; returns their refs, oldest first."""
        self.posted = list(location.get("ts") or [])
        self.placeholder_ts = self.first_ts = self.posted[0] if self.posted else None
        return list(self.posted)

    async def post(self, text: str) -> str:
        if self.first_ts is None and self.placeholder_ts is not None:
            await self.edit(self.placeholder_ts, text, first=True)
            self.first_ts = self.placeholder_ts
            return self.first_ts
        ts = await self._post((self.lead if self.first_ts is None else "") + text)
        self.first_ts = self.first_ts or ts
        return ts

    async def edit(self, ref: str, text: str, first: bool = False) -> None:
        lead = self.lead if first or ref == self.first_ts else ""
        await guarded(self.client.chat_update(channel=self.channel, ts=ref, text=neutralise(lead + text)))

    async def apologise(self, text: str = SORRY) -> None:
        """Best effort: replace the placeholder, or post, a short apology."""
        with contextlib.suppress(SlackApiError, RateLimited):
            if self.placeholder_ts and self.first_ts is None:
                await self.edit(self.placeholder_ts, text, first=True)
            else:
                await self._post(text)

    async def _post(self, text: str) -> str:
        await self.pacer.acquire(self.channel)
        response = await guarded(self.client.chat_postMessage(
            channel=self.channel, text=neutralise(text), thread_ts=self.thread_ts,
            unfurl_links=False, unfurl_media=False))
        self.posted.append(response["ts"])
        return response["ts"]


@dataclass
class SlackFrontEnd:
    """What every Slack listener shares: the core, the Web API client, the budgets, and the threads
    the bot has replied in (it keeps answering there without a mention)."""

    core: ConversationCore
    client: AsyncWebClient
    updates: RateBudget = field(default_factory=update_budget)
    posts: RateBudget = field(default_factory=post_pacer)
    threads: dict[tuple[str, str], None] = field(default_factory=dict)  # insertion-ordered, oldest first

    async def reply(self, *, team_id: str, channel: str, user_id: str, text: str, thread_ts: str | None = None,
                    lead: str = "", respond=None) -> None:
        """Answer `text` in Slack: placeholder first, then the streamed reply. Failures are logged and
        reach the user as a short apology (through `respond`, the slash command's response_url, if given)."""
        sink = SlackSink(self.client, self.posts, channel, thread_ts=thread_ts, lead=lead)
        incoming = Incoming(Place("slack", team_id, channel, thread_ts or ""), user_id, text)
        try:
            await sink.open()
            if thread_ts:
                self.remember_thread(channel, thread_ts)
            await self.core.answer(incoming, sink, MESSAGE_LIMIT, budget=self.updates, scope=team_id,
                                   min_interval_s=MIN_EDIT_INTERVAL_S)
        except Exception as exc:
            log.exception("could not answer user %s in channel %s", user_id, channel)
            not_in_channel = isinstance(exc, SlackApiError) and exc.response.get("error") in (
                "not_in_channel", "channel_not_found")
            if respond is not None:
                with contextlib.suppress(Exception):
                    await respond(text=NOT_IN_CHANNEL if not_in_channel else SORRY, response_type="ephemeral")
            elif not not_in_channel:
                await sink.apologise()

    async def resume(self, pending: PendingReply) -> Resumed:
        """Where a reply left pending at the last stop is shown (ConversationCore.recover)."""
        location = pending.platform_message_ref or {}
        channel = location.get("channel") or pending.place.channel_id
        thread_ts = location.get("thread_ts", pending.place.thread_id or None)
        sink = SlackSink(self.client, self.posts, channel, thread_ts=thread_ts, lead=location.get("lead", ""))
        return Resumed(sink, sink.adopt(location), MESSAGE_LIMIT, budget=self.updates,
                       scope=pending.place.workspace_id, min_interval_s=MIN_EDIT_INTERVAL_S)

    def remember_thread(self, channel: str, thread_ts: str) -> None:
        self.threads[(channel, thread_ts)] = None
        if len(self.threads) > MAX_THREADS_KEPT:
            del self.threads[next(iter(self.threads))]

    def started_thread(self, channel: str, thread_ts: str | None) -> bool:
        return thread_ts is not None and (channel, thread_ts) in self.threads


@contextlib.asynccontextmanager
async def apologising(respond, what: str):
    """Run a slash command's work; a failure is logged and answered with a private apology."""
    try:
        yield
    except Exception:
        log.exception("%s failed", what)
        with contextlib.suppress(Exception):
            await respond(text=SORRY, response_type="ephemeral")


def strip_mention(text: str | None, bot_user_id: str | None) -> str:
    """The user's text without the bot's own <@U…> mention."""
    text = text or ""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>", "", text)
    return text.strip()
