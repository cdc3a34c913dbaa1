"""/forget: delete everything Pioneer remembers about the caller (ephemeral confirmation)."""

from ..slack_io import apologising


def register(app, front) -> None:
    @app.command("/forget")
    async def forget(ack, command, respond):
        await ack()
        async with apologising(respond, "/forget"):
            await respond(text=await front.core.forget("slack", command["user_id"]), response_type="ephemeral")
