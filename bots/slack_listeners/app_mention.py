"""@Pioneer in a channel: answer in a thread under the mention (or in the thread it came from)."""

from ..slack_io import strip_mention


def register(app, front) -> None:
    @app.event("app_mention")
    async def answer_mention(event, context):
        if event.get("bot_id"):
            return
        await front.reply(team_id=context.team_id or "", channel=event["channel"], user_id=event["user"],
                          text=strip_mention(event.get("text"), context.bot_user_id),
                          thread_ts=event.get("thread_ts") or event["ts"])
