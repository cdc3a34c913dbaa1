"""/info (admins only, ephemeral): mode, model, device, cache, queue and latency."""

import logging

from slack_sdk.errors import SlackApiError

from ..slack_io import apologising

log = logging.getLogger(__name__)


def register(app, front) -> None:
    @app.command("/info")
    async def info(ack, command, respond, client):
        await ack()
        async with apologising(respond, "/info"):
            user_id = command["user_id"]
            admin = front.core.is_admin(user_id) or await is_workspace_admin(client, user_id)
            text = await front.core.info(user_id, is_admin=admin)
            await respond(text=f"```\n{text}\n```" if admin else text, response_type="ephemeral")


async def is_workspace_admin(client, user_id: str) -> bool:
    try:
        user = (await client.users_info(user=user_id))["user"]
    except SlackApiError as exc:
        log.warning("users.info failed for %s: %s", user_id, exc.response.get("error"))
        return False
    return bool(user.get("is_admin") or user.get("is_owner"))
