"""/ask: acknowledge at once, then answer in the channel with the question quoted above the reply."""

from ..core import clean_output
from ..slack_io import neutralise

QUOTED_CHARS = 200


def register(app, front) -> None:
    @app.command("/ask")
    async def ask(ack, command, respond):
        question = clean_output(command.get("text") or "").strip()  # it is quoted: no NUL, no override
        if not question:
            await ack("Ask me something, e.g. `/ask what is attention in a transformer?`")
            return
        await ack()
        quoted = question if len(question) <= QUOTED_CHARS else question[: QUOTED_CHARS - 1] + "…"
        await front.reply(team_id=command.get("team_id", ""), channel=command["channel_id"],
                          user_id=command["user_id"], text=question, lead=f">{neutralise(quoted)}\n",
                          respond=respond)
