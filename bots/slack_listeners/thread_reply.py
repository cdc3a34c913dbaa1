"""A reply in a thread Pioneer started (or answered in): answered without a mention.

Messages that mention Pioneer arrive as app_mention too and are answered there; every other message
event is acknowledged and ignored here, so that bolt does not log it as unhandled."""

from ..slack_io import strip_mention


def register(app, front) -> None:
    async def is_reply_in_my_thread(event, context) -> bool:
        if event.get("subtype") or event.get("bot_id") or not event.get("thread_ts"):
            return False
        if context.bot_user_id and f"<@{context.bot_user_id}" in (event.get("text") or ""):
            return False
        return (event.get("parent_user_id") == context.bot_user_id
                or front.started_thread(event["channel"], event["thread_ts"]))

    @app.event("message", matchers=[is_reply_in_my_thread])
    async def answer_thread_reply(event, context):
        await front.reply(team_id=context.team_id or "", channel=event["channel"], user_id=event["user"],
                          text=strip_mention(event.get("text"), context.bot_user_id), thread_ts=event["thread_ts"])

    @app.event("message")
    async def ignore_other_messages():
        pass
