"""The front-ends' platform glue: 429s become RateLimited, and Slack markup in replies pings nobody."""

from types import SimpleNamespace

import discord
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bots import discord_io, slack_io
from bots.edits import RateLimited


async def failing(error):
    raise error


def slack_error(status: int, error: str, headers: dict) -> SlackApiError:
    response = AsyncSlackResponse(client=None, http_verb="POST", api_url="chat.update", req_args={},
                                  data={"ok": False, "error": error}, headers=headers, status_code=status)
    return SlackApiError(error, response)


async def test_discord_429s_become_rate_limited_and_other_errors_pass_through():
    response = SimpleNamespace(status=429, reason="Too Many Requests", headers={"Retry-After": "2.5"})
    with pytest.raises(RateLimited) as limited:
        await discord_io.guarded(failing(discord.HTTPException(response, {"message": "slow down", "code": 0})))
    assert limited.value.retry_after == 2.5
    with pytest.raises(RateLimited) as limited:
        await discord_io.guarded(failing(discord.RateLimited(40.0)))
    assert limited.value.retry_after == 40.0
    forbidden = SimpleNamespace(status=403, reason="Forbidden", headers={})
    with pytest.raises(discord.Forbidden):
        await discord_io.guarded(failing(discord.Forbidden(forbidden, {"message": "no", "code": 50013})))


async def test_slack_ratelimited_becomes_rate_limited_and_other_errors_pass_through():
    with pytest.raises(RateLimited) as limited:
        await slack_io.guarded(failing(slack_error(429, "ratelimited", {"Retry-After": "7"})))
    assert limited.value.retry_after == 7.0
    with pytest.raises(SlackApiError):
        await slack_io.guarded(failing(slack_error(200, "msg_too_long", {})))


@pytest.mark.parametrize("text, shown", [
    ("<!channel> <!here> <!everyone>", "&lt;!channel> &lt;!here> &lt;!everyone>"),
    ("cc <@U123> and <!subteam^S1|team> in <#C1>", "cc &lt;@U123> and &lt;!subteam^S1|team> in &lt;#C1>"),
    ("a link <https://example.com|here> and 1 < 2", "a link <https://example.com|here> and 1 < 2"),
    ("```\nif a<b: pass\n```", "```\nif a<b: pass\n```"),
])
def test_slack_replies_show_markup_instead_of_pinging(text, shown):
    assert slack_io.neutralise(text) == shown


def test_slack_text_stays_within_the_update_limit():
    assert len(slack_io.neutralise("<!here>" * 700)) <= slack_io.MAX_TEXT


def test_the_bots_own_mention_is_stripped():
    assert slack_io.strip_mention("<@UBOT> what's up, <@U1>?", "UBOT") == "what's up, <@U1>?"
    assert slack_io.strip_mention("<@UBOT|pioneer>  hi", "UBOT") == "hi"
