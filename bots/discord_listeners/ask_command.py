"""/ask: answer a question in the channel, streaming into the command's deferred response."""

import discord
from discord import app_commands

from ..core import Incoming
from ..discord_io import MESSAGE_LIMIT, InteractionSink, place_of


def register(bot) -> None:
    @bot.tree.command(name="ask", description="Ask Pioneer a question")
    @app_commands.describe(question="What you want to ask")
    async def ask(interaction: discord.Interaction, question: str):
        await interaction.response.defer(thinking=True)
        incoming = Incoming(place_of(interaction.channel, interaction.guild), str(interaction.user.id), question,
                            display_name=interaction.user.display_name)
        await bot.core.answer(incoming, InteractionSink(interaction), MESSAGE_LIMIT,
                              budget=bot.budget, scope=interaction.channel_id)
