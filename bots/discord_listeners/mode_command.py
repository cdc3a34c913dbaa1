"""/mode (admins only, ephemeral): answer with the local model, OpenAI, or whichever is confident."""

import discord
from discord import app_commands

from worker.orchestrator import MODES

from ..discord_io import is_admin, respond


def register(bot) -> None:
    @bot.tree.command(name="mode", description="Choose how Pioneer answers (admins only)")
    @app_commands.describe(mode="local model, OpenAI, or hybrid (local when confident)")
    @app_commands.choices(mode=[app_commands.Choice(name=mode, value=mode) for mode in MODES])
    async def mode(interaction: discord.Interaction, mode: app_commands.Choice[str]):
        text = await bot.core.set_mode(str(interaction.user.id), mode.value, is_admin=is_admin(bot.core, interaction))
        await respond(interaction, text)
