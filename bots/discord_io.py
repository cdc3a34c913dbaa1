"""Discord I/O for the listeners: message sinks, the per-channel budget, typing, places and the admin check."""

import asyncio
import contextlib

import discord

from .edits import RateBudget, RateLimited
from .memory import PendingReply, Place
from .recovery import Resumed

MESSAGE_LIMIT = 2000
NO_MENTIONS = discord.AllowedMentions.none()
SORRY = "Sorry, something went wrong on my side. Please try again in a moment."
ORIGINAL = "original"  # the sink's reference to an interaction's original (deferred) response
TYPING_REFRESH_S = 8.0  # Discord shows "typing" for 10 s per trigger


def channel_budget() -> RateBudget:
    """Discord allows about 5 message sends and 5 edits per channel every 5 s; we count both in one
    window, with half a second of slack for requests that arrive later than they were granted."""
    return RateBudget(5, 5.5)


async def guarded(call):
    """Await a discord.py call; a 429 that discord.py did not absorb becomes RateLimited."""
    try:
        return await call
    except discord.RateLimited as exc:
        raise RateLimited(exc.retry_after) from exc
    except discord.HTTPException as exc:
        if exc.status == 429:
            raise RateLimited(_retry_after(exc)) from exc
        raise


def _retry_after(exc: discord.HTTPException) -> float:
    try:
        return float(exc.response.headers.get("Retry-After", 1.0))
    except (AttributeError, TypeError, ValueError):
        return 1.0


class ChannelSink:
    """A reply in a channel, DM or thread: the first part answers the user's message."""

    def __init__(self, channel: discord.abc.Messageable, reply_to: discord.Message | None = None):
        self.channel, self.reply_to = channel, reply_to
        self.posted: list[discord.Message] = []

    async def post(self, text: str) -> discord.Message:
        reference = None
        if self.reply_to is not None and not self.posted:
            reference = self.reply_to.to_reference(fail_if_not_exists=False)
        message = await guarded(self.channel.send(text, reference=reference, allowed_mentions=NO_MENTIONS))
        self.posted.append(message)
        return message

    async def edit(self, ref: discord.Message, text: str) -> None:
        await guarded(ref.edit(content=text, allowed_mentions=NO_MENTIONS))

    def locate(self) -> dict | None:
        """Where this reply is shown, for a restarted front-end (see resume)."""
        if not self.posted:
            return None
        return {"channel_id": str(self.channel.id), "message_ids": [str(message.id) for message in self.posted]}


async def resume(client: discord.Client, budget: RateBudget, pending: PendingReply) -> Resumed:
    """Where a reply left pending at the last stop is shown (ConversationCore.recover). A reply with no message
    yet (a slash command's, or one cut off before its first words) continues in a new message in its place."""
    location = pending.platform_message_ref or {}
    channel_id = int(location.get("channel_id") or pending.place.thread_id or pending.place.channel_id)
    channel = client.get_partial_messageable(channel_id)
    sink = ChannelSink(channel)
    sink.posted = [channel.get_partial_message(int(m)) for m in location.get("message_ids", [])]
    return Resumed(sink, list(sink.posted), MESSAGE_LIMIT, budget=budget, scope=channel_id)


class InteractionSink:
    """A slash command's reply: the deferred response is the first part, follow-ups the rest."""

    def __init__(self, interaction: discord.Interaction):
        self.interaction = interaction
        self.original_used = False

    async def post(self, text: str):
        if not self.original_used:
            await guarded(self.interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS))
            self.original_used = True
            return ORIGINAL
        return await guarded(self.interaction.followup.send(text, wait=True, allowed_mentions=NO_MENTIONS))

    async def edit(self, ref, text: str) -> None:
        if ref == ORIGINAL:
            await guarded(self.interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS))
        else:
            await guarded(ref.edit(content=text, allowed_mentions=NO_MENTIONS))


@contextlib.asynccontextmanager
async def typing_in(channel: discord.abc.Messageable):
    """Show "typing…" until the block ends; a failed trigger is not worth failing the reply for."""

    async def keep_typing():
        while True:
            with contextlib.suppress(discord.HTTPException):
                await channel.typing()
            await asyncio.sleep(TYPING_REFRESH_S)

    task = asyncio.create_task(keep_typing())
    try:
        yield
    finally:
        task.cancel()


def place_of(channel, guild: discord.Guild | None) -> Place:
    """Memory is kept per guild, channel and thread; a DM is its own channel."""
    workspace = str(guild.id) if guild else ""
    if isinstance(channel, discord.Thread):
        return Place("discord", workspace, str(channel.parent_id), str(channel.id))
    return Place("discord", workspace, str(channel.id), "")


def is_admin(core, interaction: discord.Interaction) -> bool:
    """ADMIN_USER_IDS, or the Administrator permission in the guild the command came from."""
    if core.is_admin(str(interaction.user.id)):
        return True
    return interaction.guild_id is not None and interaction.permissions.administrator


async def respond(interaction: discord.Interaction, text: str) -> None:
    """Answer a command: fill in its deferred response, or send an ephemeral one if none was made."""
    text = text[:MESSAGE_LIMIT]
    if interaction.response.is_done():
        await interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
