"""`pioneer discord`: the Discord front-end, a thin client over the conversation core.

Gateway intents: guilds, guild messages and direct messages, plus message content, which is
privileged: turn it on under Bot > Privileged Gateway Intents in the Developer Portal, or the bot
sees empty text except in DMs and in messages that mention it.
"""

import asyncio
import functools
import logging
import sys

import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands

from . import discord_listeners
from .discord_io import NO_MENTIONS, channel_budget, resume
from .shutdown import until_stopped

log = logging.getLogger(__name__)


def intents() -> discord.Intents:
    chosen = discord.Intents.none()
    chosen.guilds = chosen.guild_messages = chosen.dm_messages = True
    chosen.message_content = True
    return chosen


class PioneerBot(discord.Client):
    """The Discord client: listeners from bots.discord_listeners, replies through `core`."""

    def __init__(self, core, *, recover: bool = False, **options):
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # no voice here
        super().__init__(intents=intents(), allowed_mentions=NO_MENTIONS, **options)
        self.core = core
        self.tree = app_commands.CommandTree(self)
        self.budget = channel_budget()  # shared by every reply in a channel
        self.joined_threads: set[int] = set()
        self.recover_on_start = recover  # finish the replies cut off at the last stop, once connected
        self.recovery: asyncio.Task | None = None
        discord_listeners.register(self)

    async def setup_hook(self) -> None:
        await self.tree.sync()
        if self.recover_on_start:
            self.recovery = asyncio.create_task(self.recover_replies())

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s (%s) in %d guild(s)", self.user, self.user.id, len(self.guilds))

    async def recover_replies(self) -> None:
        """Once connected: finish, or mark interrupted, the replies cut off at the last stop."""
        await self.wait_until_ready()
        await self.core.recover("discord", functools.partial(resume, self, self.budget))

    async def close(self) -> None:
        if self.recovery is not None:
            self.recovery.cancel()  # what it did not get to stays pending, for the next start
        await super().close()


def use_endpoints(settings) -> None:
    """DISCORD_API_BASE and DISCORD_GATEWAY_URL: a Discord-compatible server, or a local fake in tests."""
    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


async def run(settings) -> None:
    """Run until SIGINT/SIGTERM, then let the replies in progress finish before disconnecting."""
    from .app import build_service

    use_endpoints(settings)
    service = await build_service(settings)
    bot = PioneerBot(service.core, recover=True)
    connection = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
    stopped = asyncio.create_task(until_stopped())
    try:
        done, _ = await asyncio.wait({connection, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if connection in done:
            connection.result()  # raises why the connection ended (a bad token, a missing intent)
    finally:
        stopped.cancel()
        await service.drain(settings.drain_timeout_s)
        await bot.close()
        await service.close()


def main(settings) -> None:
    if settings.discord_token is None:
        sys.exit("pioneer discord needs DISCORD_TOKEN (the bot token from the Discord Developer Portal).")
    try:
        asyncio.run(run(settings))
    except discord.LoginFailure:
        sys.exit("Discord refused DISCORD_TOKEN: check the bot token.")
    except discord.PrivilegedIntentsRequired:
        sys.exit("Turn on the Message Content intent for this bot in the Discord Developer Portal.")
