"""Answer chat messages: mentions in channels, every DM, and follow-ups in threads the bot is part of."""

import contextlib
import logging
import re

import discord

from ..core import Incoming
from ..discord_io import MESSAGE_LIMIT, NO_MENTIONS, SORRY, ChannelSink, place_of, typing_in

log = logging.getLogger(__name__)


def register(bot) -> None:
    @bot.event
    async def on_message(message: discord.Message):
        text = text_for_me(bot, message)
        if text is not None:
            await answer(bot, message, text)


def text_for_me(bot, message: discord.Message) -> str | None:
    """The message's text without the bot's mention, or None when the bot should stay quiet."""
    if message.author.bot:  # other bots, and this bot's own messages
        return None
    role = message.guild.self_role if message.guild else None
    mentioned = bot.user in message.mentions or (role is not None and role in message.role_mentions)
    if not (mentioned or message.guild is None or in_my_thread(bot, message.channel)):
        return None
    text = re.sub(rf"<@!?{bot.user.id}>", "", message.content)
    if role is not None:
        text = text.replace(role.mention, "")
    return text.strip()


def in_my_thread(bot, channel) -> bool:
    if not isinstance(channel, discord.Thread):
        return False
    return channel.owner_id == bot.user.id or channel.me is not None or channel.id in bot.joined_threads


async def answer(bot, message: discord.Message, text: str) -> None:
    channel = message.channel
    incoming = Incoming(place_of(channel, message.guild), str(message.author.id), text,
                        display_name=message.author.display_name)
    if isinstance(channel, discord.Thread):
        bot.joined_threads.add(channel.id)  # answering in a thread joins it, before the reply is stored
    try:
        async with typing_in(channel):
            await bot.core.answer(incoming, ChannelSink(channel, reply_to=message), MESSAGE_LIMIT,
                                  budget=bot.budget, scope=channel.id)
    except Exception:
        log.exception("could not answer message %s in channel %s", message.id, channel.id)
        with contextlib.suppress(discord.HTTPException):
            await channel.send(SORRY, allowed_mentions=NO_MENTIONS)
