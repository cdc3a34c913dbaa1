"""A local Slack Web API (with its rate limits) for slack-sdk, and signed-request helpers for driving a bolt app."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import math
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
from aiohttp import web

MAX_TEXT_LENGTH = 4000
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_HEADER_TEXT = 150
ACK_WINDOW = 3.0
RESPONSE_URL_USES = 5
RESPONSE_URL_TTL = 30 * 60
REQUEST_PARAMS = web.RequestKey("request_params", dict)
CHANNEL_ID = re.compile(r"^[CDGU][A-Z0-9]+$")


class TokenBucket:
    """`burst` requests at once, refilled at `burst / refill_seconds` per second, per key."""

    def __init__(self, burst: int, refill_seconds: float):
        self.burst = burst
        self.rate = burst / refill_seconds
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Take a token; returns 0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate


@dataclass
class SlackReply:
    """What a bolt app answered to a request sent as Slack."""

    status: int
    body: str
    headers: dict[str, str]
    elapsed: float

    @property
    def too_slow(self) -> bool:
        """Slack shows the user a timeout when the ack takes longer than 3 seconds."""
        return self.elapsed > ACK_WINDOW


def sign_request(secret: str, body: str | bytes, ts: float | None = None) -> dict[str, str]:
    """The headers Slack adds to a request carrying `body`, signed with the app's signing secret."""
    timestamp = str(int(time.time() if ts is None else ts))
    text = body.decode() if isinstance(body, bytes) else body
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:{text}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": f"v0={digest}"}


async def post_signed(
    url: str,
    secret: str,
    body: str,
    content_type: str,
    *,
    timestamp: float | None = None,
    forge: bool = False,
    extra_headers: dict[str, str] | None = None,
) -> SlackReply:
    """POST `body` to a bolt endpoint as Slack would; `forge` corrupts the signature, `timestamp` can be stale."""
    headers = {"Content-Type": content_type, **sign_request(secret, body, timestamp), **(extra_headers or {})}
    if forge:
        headers["X-Slack-Signature"] = "v0=" + "0" * 64
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body.encode(), headers=headers) as response:
            text = await response.text()
            return SlackReply(response.status, text, dict(response.headers), time.monotonic() - started)


async def post_slash_command(
    url: str,
    secret: str,
    command: str,
    text: str,
    user_id: str,
    channel_id: str,
    *,
    team_id: str = "T1",
    response_url: str = "",
    trigger_id: str | None = None,
    timestamp: float | None = None,
    forge: bool = False,
) -> SlackReply:
    """Send a slash command to a bolt app's HTTP endpoint, signed like Slack signs it."""
    fields = {
        "token": "legacy-verification-token", "team_id": team_id, "team_domain": "pioneer-test",
        "channel_id": channel_id, "channel_name": "general", "user_id": user_id, "user_name": "tester",
        "command": command, "text": text, "api_app_id": "A1", "is_enterprise_install": "false",
        "response_url": response_url, "trigger_id": trigger_id or f"{int(time.time())}.{secrets.token_hex(8)}",
    }
    body = urllib.parse.urlencode(fields)
    return await post_signed(
        url, secret, body, "application/x-www-form-urlencoded", timestamp=timestamp, forge=forge
    )


async def post_event(
    url: str,
    secret: str,
    event: dict,
    *,
    team_id: str = "T1",
    bot_user_id: str = "UBOT",
    timestamp: float | None = None,
    forge: bool = False,
    retry_num: int | None = None,
    event_id: str | None = None,
) -> SlackReply:
    """Send an Events API callback wrapping `event` to a bolt app, signed like Slack signs it (a redelivery keeps
    the first delivery's event_id, and says which retry it is in retry_num)."""
    envelope = {
        "token": "legacy-verification-token", "team_id": team_id, "api_app_id": "A1", "event": event,
        "type": "event_callback", "event_id": event_id or "Ev" + secrets.token_hex(6).upper(),
        "event_time": int(time.time()),
        "authorizations": [
            {"team_id": team_id, "user_id": bot_user_id, "is_bot": True, "is_enterprise_install": False}
        ],
        "is_ext_shared_channel": False,
    }
    retry_headers = {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"} if retry_num else None
    return await post_signed(
        url, secret, json.dumps(envelope), "application/json",
        timestamp=timestamp, forge=forge, extra_headers=retry_headers,
    )


def _ok(**fields: Any) -> web.Response:
    return web.json_response({"ok": True, **fields})


def _fail(error: str, status: int = 200, **fields: Any) -> web.Response:
    return web.json_response({"ok": False, "error": error, **fields}, status=status)


class FakeSlack:
    """Slack's Web API under `api_url` and response_url endpoints, on 127.0.0.1."""

    def __init__(
        self,
        *,
        token: str = "xoxb-fake-bot-token",
        team_id: str = "T1",
        update_limit: tuple[int, float] = (50, 60.0),
        post_limit: tuple[int, float] = (3, 3.0),
        max_text_length: int = MAX_TEXT_LENGTH,
    ):
        self.token = token
        self.team_id = team_id
        self.bot_user_id, self.bot_id = "UBOT", "BBOT"
        self.update_bucket = TokenBucket(*update_limit)
        self.post_bucket = TokenBucket(*post_limit)
        self.max_text_length = max_text_length
        self.users: dict[str, dict] = {}
        self.add_user("U1", "tester")
        self.add_user(self.bot_user_id, "pioneer", is_bot=True)

        self.messages: dict[str, list[dict]] = {}
        self.ephemerals: list[dict] = []
        self.responses: list[dict] = []
        self.requests: list[dict] = []
        self.rate_limited_count = 0
        self._response_urls: dict[str, dict] = {}
        self._ts_counter = itertools.count(1)

        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ----- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record_middleware])
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{response_id}", self._response_url)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSlack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
        """Poll `predicate` until it returns something truthy, and return that; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(interval)

    # ----- world and stored state ------------------------------------------------------------

    def add_user(self, user_id: str, name: str, *, is_bot: bool = False, tz: str = "UTC") -> dict:
        self.users[user_id] = {
            "id": user_id, "team_id": self.team_id, "name": name, "real_name": name.title(), "deleted": False,
            "is_bot": is_bot, "is_admin": False, "tz": tz, "tz_offset": 0,
            "profile": {"display_name": name, "real_name": name.title(), "image_48": ""},
        }
        return self.users[user_id]

    def new_response_url(self) -> str:
        response_id = secrets.token_hex(8)
        self._response_urls[response_id] = {"uses": 0, "created": time.monotonic()}
        return f"{self.base_url}/response/{response_id}"

    def next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts_counter):06d}"

    def messages_in(self, channel: str, *, include_deleted: bool = False) -> list[dict]:
        return [m for m in self.messages.get(channel, []) if include_deleted or not m["deleted"]]

    def message(self, channel: str, ts: str) -> dict | None:
        return next((m for m in self.messages.get(channel, []) if m["ts"] == ts), None)

    def requests_to(self, method: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method]

    def record_user_message(self, channel: str, text: str, *, user: str = "U1", thread_ts: str | None = None) -> dict:
        """Store a message a person wrote (for history/replies); deliver the matching event with post_event."""
        return self._store(channel, text, user=user, thread_ts=thread_ts, blocks=None, bot_id=None)

    def _store(
        self, channel: str, text: str, *, user: str, thread_ts: str | None, blocks: Any, bot_id: str | None
    ) -> dict:
        record = {
            "ts": self.next_ts(), "channel": channel, "text": text, "thread_ts": thread_ts, "blocks": blocks,
            "user": user, "bot_id": bot_id, "edits": [], "deleted": False, "time": time.monotonic(),
        }
        self.messages.setdefault(channel, []).append(record)
        return record

    @staticmethod
    def message_payload(record: dict) -> dict:
        payload = {"type": "message", "ts": record["ts"], "user": record["user"], "text": record["text"]}
        if record["bot_id"]:
            payload["bot_id"] = record["bot_id"]
        if record["thread_ts"]:
            payload["thread_ts"] = record["thread_ts"]
        if record["blocks"]:
            payload["blocks"] = record["blocks"]
        if record["edits"]:
            payload["edited"] = {"user": record["user"], "ts": record["edits"][-1]["ts"]}
        return payload

    # ----- plumbing --------------------------------------------------------------------------

    @web.middleware
    async def _record_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        params = await self._params(request)
        request[REQUEST_PARAMS] = params
        entry = {
            "method": request.match_info.get("method") or request.path, "http_method": request.method,
            "params": params, "time": time.monotonic(), "status": None,
        }
        self.requests.append(entry)
        response = await handler(request)
        entry["status"] = response.status
        if response.status == 429:
            self.rate_limited_count += 1
        return response

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json() or {})
        elif request.method == "POST":
            params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        for key in ("blocks", "attachments"):
            if isinstance(params.get(key), str):
                try:
                    params[key] = json.loads(params[key])
                except ValueError:
                    pass
        return params

    def _auth_error(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else request[REQUEST_PARAMS].get("token")
        if not token:
            return _fail("not_authed")
        return None if token == self.token else _fail("invalid_auth")

    def _rate_limited(self, bucket: TokenBucket, key: str) -> web.Response | None:
        wait = bucket.take(key)
        if not wait:
            return None
        headers = {"Retry-After": str(math.ceil(wait))}
        return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers=headers)

    def _content_error(self, params: dict) -> web.Response | None:
        text, blocks = params.get("text"), params.get("blocks")
        if not text and not blocks and not params.get("attachments"):
            return _fail("no_text")
        if text and len(text) > self.max_text_length:
            return _fail("msg_too_long")
        if blocks is not None:
            problem = self._blocks_problem(blocks)
            if problem:
                return _fail("invalid_blocks", errors=[problem])
        return None

    @staticmethod
    def _blocks_problem(blocks: Any) -> str | None:
        if not isinstance(blocks, list) or not all(isinstance(b, dict) and "type" in b for b in blocks):
            return "blocks must be a list of objects with a type"
        if len(blocks) > MAX_BLOCKS:
            return f"no more than {MAX_BLOCKS} items allowed [json-pointer:/blocks]"
        for index, block in enumerate(blocks):
            text = (block.get("text") or {}).get("text", "") if isinstance(block.get("text"), dict) else ""
            limit = MAX_HEADER_TEXT if block["type"] == "header" else MAX_SECTION_TEXT
            if len(text) > limit:
                return f"must be less than {limit + 1} characters [json-pointer:/blocks/{index}/text/text]"
        return None

    def _channel_error(self, channel: Any) -> web.Response | None:
        return None if isinstance(channel, str) and CHANNEL_ID.match(channel) else _fail("channel_not_found")

    # ----- Web API ---------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        handlers = {
            "auth.test": self._auth_test, "chat.postMessage": self._post_message, "chat.update": self._update,
            "chat.postEphemeral": self._post_ephemeral, "chat.delete": self._delete,
            "conversations.history": self._history, "conversations.replies": self._replies,
            "users.info": self._users_info,
        }
        handler = handlers.get(request.match_info["method"])
        if handler is None:
            return _fail("unknown_method", status=404)
        if failed := self._auth_error(request):
            return failed
        return await handler(request[REQUEST_PARAMS])

    async def _auth_test(self, params: dict) -> web.Response:
        return _ok(
            url="https://pioneer-test.slack.com/", team="Pioneer Test", user="pioneer", team_id=self.team_id,
            user_id=self.bot_user_id, bot_id=self.bot_id, is_enterprise_install=False,
        )

    async def _post_message(self, params: dict) -> web.Response:
        channel = params.get("channel")
        if failed := self._channel_error(channel) or self._rate_limited(self.post_bucket, channel):
            return failed
        if failed := self._content_error(params):
            return failed
        thread_ts = params.get("thread_ts") or None
        record = self._store(
            channel, params.get("text") or "", user=self.bot_user_id, thread_ts=thread_ts,
            blocks=params.get("blocks"), bot_id=self.bot_id,
        )
        return _ok(channel=channel, ts=record["ts"], message=self.message_payload(record))

    async def _update(self, params: dict) -> web.Response:
        channel, ts = params.get("channel"), params.get("ts")
        if failed := self._channel_error(channel) or self._rate_limited(self.update_bucket, self.team_id):
            return failed
        if failed := self._content_error(params):
            return failed
        record = self.message(channel, ts)
        if record is None or record["deleted"]:
            return _fail("message_not_found")
        if record["user"] != self.bot_user_id:
            return _fail("cant_update_message")
        if "text" in params:
            record["text"] = params["text"]
        if "blocks" in params:
            record["blocks"] = params["blocks"]
        edit = {"text": record["text"], "blocks": record["blocks"], "time": time.monotonic(), "ts": self.next_ts()}
        record["edits"].append(edit)
        return _ok(channel=channel, ts=ts, text=record["text"], message=self.message_payload(record))

    async def _post_ephemeral(self, params: dict) -> web.Response:
        channel, user = params.get("channel"), params.get("user")
        if failed := self._channel_error(channel):
            return failed
        if user not in self.users:
            return _fail("user_not_in_channel")
        if failed := self._content_error(params):
            return failed
        ts = self.next_ts()
        self.ephemerals.append({
            "ts": ts, "channel": channel, "user": user, "text": params.get("text") or "",
            "blocks": params.get("blocks"), "thread_ts": params.get("thread_ts"),
        })
        return _ok(message_ts=ts)

    async def _delete(self, params: dict) -> web.Response:
        channel, ts = params.get("channel"), params.get("ts")
        record = self.message(channel, ts) if isinstance(channel, str) else None
        if record is None or record["deleted"]:
            return _fail("message_not_found")
        if record["user"] != self.bot_user_id:
            return _fail("cant_delete_message")
        record["deleted"] = True
        return _ok(channel=channel, ts=ts)

    async def _history(self, params: dict) -> web.Response:
        channel = params.get("channel")
        if failed := self._channel_error(channel):
            return failed
        limit = int(params.get("limit") or 100)
        top_level = [m for m in self.messages_in(channel) if m["thread_ts"] in (None, m["ts"])]
        newest_first = list(reversed(top_level))[:limit]
        return _ok(messages=[self.message_payload(m) for m in newest_first], has_more=False)

    async def _replies(self, params: dict) -> web.Response:
        channel, ts = params.get("channel"), params.get("ts")
        if failed := self._channel_error(channel):
            return failed
        parent = self.message(channel, ts)
        if parent is None:
            return _fail("thread_not_found")
        thread = [parent] + [m for m in self.messages_in(channel) if m["thread_ts"] == ts and m["ts"] != ts]
        limit = int(params.get("limit") or 1000)
        return _ok(messages=[self.message_payload(m) for m in thread[:limit]], has_more=False)

    async def _users_info(self, params: dict) -> web.Response:
        user = self.users.get(params.get("user", ""))
        return _ok(user=user) if user else _fail("user_not_found")

    # ----- response_url ----------------------------------------------------------------------

    async def _response_url(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        state = self._response_urls.get(response_id)
        if state is None or time.monotonic() - state["created"] > RESPONSE_URL_TTL:
            return web.Response(status=404, text="expired_url")
        if state["uses"] >= RESPONSE_URL_USES:
            return web.Response(status=404, text="used_url")
        body = request[REQUEST_PARAMS]
        text = body.get("text") or ""
        if len(text) > self.max_text_length:
            return web.Response(status=400, text="msg_too_long")
        state["uses"] += 1
        self.responses.append({"id": response_id, "json": body, "time": time.monotonic()})
        return web.Response(text="ok")

    # ----- the other direction: requests to a bolt app, signed as Slack --------------------

    async def post_slash_command(
        self, url: str, secret: str, command: str, text: str, user_id: str = "U1", channel_id: str = "C1", **kwargs: Any
    ) -> SlackReply:
        """post_slash_command with this workspace's team id and a fresh response_url served here."""
        kwargs.setdefault("team_id", self.team_id)
        kwargs.setdefault("response_url", self.new_response_url())
        return await post_slash_command(url, secret, command, text, user_id, channel_id, **kwargs)

    async def post_event(self, url: str, secret: str, event: dict, **kwargs: Any) -> SlackReply:
        """post_event with this workspace's team id and bot user."""
        kwargs.setdefault("team_id", self.team_id)
        kwargs.setdefault("bot_user_id", self.bot_user_id)
        return await post_event(url, secret, event, **kwargs)
