"""/info (admins only, ephemeral): mode, model, device, cache, queue and latency."""

import discord

from ..discord_io import is_admin, respond


def register(bot) -> None:
    @bot.tree.command(name="info", description="Show Pioneer's status (admins only)")
    async def info(interaction: discord.Interaction):
        user_id = str(interaction.user.id)
        if not is_admin(bot.core, interaction):
            await respond(interaction, await bot.core.info(user_id))
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        await respond(interaction, await bot.core.info(user_id, is_admin=True))
