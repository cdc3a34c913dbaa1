"""/forget: delete everything Pioneer remembers about the caller (ephemeral confirmation)."""

import discord

from ..discord_io import respond


def register(bot) -> None:
    @bot.tree.command(name="forget", description="Make Pioneer forget your conversations")
    async def forget(interaction: discord.Interaction):
        await interaction.response.defer(ephemeral=True, thinking=True)
        await respond(interaction, await bot.core.forget("discord", str(interaction.user.id)))
