"""A failed slash command tells the user so, politely; the details go to the log."""

import contextlib
import logging

import discord
from discord import app_commands

from ..discord_io import SORRY, respond

log = logging.getLogger(__name__)


def register(bot) -> None:
    @bot.tree.error
    async def on_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError):
        name = interaction.command.name if interaction.command else "?"
        log.error("/%s failed for user %s", name, interaction.user.id, exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            await respond(interaction, SORRY)
