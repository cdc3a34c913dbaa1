"""A direct message to Pioneer: every one is answered, no mention needed."""

from ..slack_io import strip_mention


async def is_direct_message(event) -> bool:
    return event.get("channel_type") == "im" and not event.get("subtype") and not event.get("bot_id")


def register(app, front) -> None:
    @app.event("message", matchers=[is_direct_message])
    async def answer_direct_message(event, context):
        await front.reply(team_id=context.team_id or "", channel=event["channel"], user_id=event["user"],
                          text=strip_mention(event.get("text"), context.bot_user_id),
                          thread_ts=event.get("thread_ts"))
