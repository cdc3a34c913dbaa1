"""Slack sends an event again when it thinks we missed it (X-Slack-Retry-Num), and a captured request passes the
signature check for five minutes: each event id and slash-command trigger id is answered once, repeats only acked."""

import logging

from slack_bolt.response import BoltResponse

log = logging.getLogger(__name__)


def delivery_key(body: dict) -> str | None:
    team = body.get("team_id") or (body.get("team") or {}).get("id") or ""
    if body.get("event_id"):
        return f"slack:{team}:event:{body['event_id']}"
    if body.get("command") and body.get("trigger_id"):
        return f"slack:{team}:command:{body['trigger_id']}"
    return None


def register(app, front) -> None:
    @app.middleware
    async def skip_repeats(body, next):  # noqa: A002 - bolt passes arguments by these names
        key = delivery_key(body)
        if key is not None and not await front.core.deliveries.first(key):
            log.info("ignored a repeated Slack delivery (%s)", key.rsplit(":", 2)[1])
            return BoltResponse(status=200, body="")
        return await next()
