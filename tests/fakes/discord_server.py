"""A local Discord (REST API and gateway) for tests that run the real discord.py, enforcing Discord's limits."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import math
import re
import secrets
import time
from collections import deque
from typing import Any, Callable, Iterator

from aiohttp import WSMsgType, web

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
MAX_CONTENT_LENGTH = 2000
MAX_EMBEDS = 10
MAX_EMBED_TOTAL_CHARS = 6000
INTERACTION_TOKEN_TTL = 15 * 60
ATTACHMENT_SIZE_LIMIT = 8 * 1024 * 1024

INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

MEMBER_PERMISSIONS = (
    (1 << 6)  # add reactions
    | (1 << 10)  # view channel
    | (1 << 11)  # send messages
    | (1 << 14)  # embed links
    | (1 << 15)  # attach files
    | (1 << 16)  # read message history
    | (1 << 26)  # change nickname
    | (1 << 31)  # use application commands
    | (1 << 35)  # create public threads
    | (1 << 38)  # send messages in threads
)
ADMINISTRATOR = 1 << 3

REQUEST_BODY = web.RequestKey("request_body", object)
CHANNEL_TEXT, CHANNEL_DM, CHANNEL_PUBLIC_THREAD = 0, 1, 11
MESSAGE_FLAG_EPHEMERAL, MESSAGE_FLAG_LOADING = 1 << 6, 1 << 7
CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE = 4, 5

OPTION_TYPES = {bool: 5, int: 4, float: 10, str: 3}
COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
USER_MENTION = re.compile(r"<@!?(\d+)>")
ROLE_MENTION = re.compile(r"<@&(\d+)>")


def _iso(ts: float | None = None) -> str:
    return datetime.datetime.fromtimestamp(ts or time.time(), datetime.timezone.utc).isoformat()


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json": discord.py only decodes bodies with that content type.
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", "Via": "1.1 google", **(headers or {})},
    )


def _error(status: int, code: int, message: str, errors: dict | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message, "code": code}
    if errors:
        body["errors"] = errors
    return _json_response(body, status)


def _form_error(field: str, error_code: str, message: str) -> web.Response:
    errors = {field: {"_errors": [{"code": error_code, "message": message}]}}
    return _error(400, 50035, "Invalid Form Body", errors)


class SlidingWindowLimiter:
    """At most `limit` requests in any `period` seconds, counted per key."""

    def __init__(self, limit: int, period: float, bucket: str):
        self.limit, self.period, self.bucket = limit, period, bucket
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str) -> tuple[bool, int, float]:
        """Count a request if allowed; returns (allowed, remaining, seconds until a slot frees)."""
        now = time.monotonic()
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.period:
            hits.popleft()
        allowed = len(hits) < self.limit
        if allowed:
            hits.append(now)
        reset_after = hits[0] + self.period - now if hits else self.period
        return allowed, self.limit - len(hits), max(reset_after, 0.001)


class _GatewaySession:
    """One identified gateway session; survives a dropped socket so the client can RESUME it."""

    def __init__(self, ws: web.WebSocketResponse, intents: int):
        self.ws = ws
        self.session_id = secrets.token_hex(16)
        self.intents = intents
        self.sequence = 0
        self.sent: list[dict] = []
        self.lock = asyncio.Lock()


class FakeDiscord:
    """Discord's REST API under `api_base` and its gateway under `gateway_url`, on 127.0.0.1."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        edit_limit: tuple[int, float] = (5, 5.0),
        create_limit: tuple[int, float] = (5, 5.0),
        advertise_rate_limits: bool = True,
        interaction_window: float = 3.0,
        echo_own_messages: bool = True,
        allowed_privileged_intents: int = PRIVILEGED_INTENTS,
        with_thread: bool = True,
    ):
        self.token = token
        self.edit_limiter = SlidingWindowLimiter(*edit_limit, bucket="fake-message-edit")
        self.create_limiter = SlidingWindowLimiter(*create_limit, bucket="fake-message-create")
        self.advertise_rate_limits = advertise_rate_limits
        self.interaction_window = interaction_window
        self.echo_own_messages = echo_own_messages
        self.allowed_privileged_intents = allowed_privileged_intents

        self._ids = itertools.count(1)
        self.application_id = "100000000000000001"
        self.bot_user = self._user(self.application_id, "Pioneer", bot=True)
        self.user = self._user("400000000000000001", "tester")
        self.users: dict[str, dict] = {u["id"]: u for u in (self.bot_user, self.user)}

        self.guild_id = "200000000000000001"
        self.roles: dict[str, dict] = {}
        self.members: dict[str, dict] = {}
        self.channels: dict[str, dict] = {}
        self.add_role("@everyone", MEMBER_PERMISSIONS, role_id=self.guild_id)
        self.bot_role_id = self.add_role("Pioneer", MEMBER_PERMISSIONS, managed=True)
        self.add_member(self.bot_user, roles=[self.bot_role_id])
        self.add_member(self.user)
        self.channel_id = self.add_channel("general", channel_id="300000000000000001")
        self.thread_id = self.add_thread("pioneer-thread", self.channel_id) if with_thread else None

        self.messages: dict[str, list[dict]] = {}
        self.requests: list[dict] = []
        self.rate_limited_count = 0
        self.interactions: dict[str, dict] = {}
        self.global_commands: list[dict] = []
        self.guild_commands: dict[str, list[dict]] = {}
        self.sessions: dict[str, _GatewaySession] = {}

        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ----- lifecycle -------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gw"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record_middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gw", self._gateway)
        self._add_rest_routes(app.router)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            if not session.ws.closed:
                await session.ws.close(code=1001)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def patched_discord_py(self) -> Iterator[None]:
        """Point discord.py's REST base and default gateway here, restoring both afterwards."""
        import discord.gateway
        import discord.http
        import yarl

        old_base, old_gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            discord.http.Route.BASE = old_base
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

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

    # ----- world setup -----------------------------------------------------------------------

    def snowflake(self) -> str:
        millis = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((millis << 22) | (next(self._ids) & 0x3FFFFF))

    @staticmethod
    def _user(user_id: str, name: str, bot: bool = False) -> dict:
        return {
            "id": user_id, "username": name, "global_name": name, "discriminator": "0",
            "avatar": None, "bot": bot, "public_flags": 0,
        }

    def add_user(self, name: str, *, bot: bool = False, member: bool = True, roles: list[str] = ()) -> dict:
        """A new user (by default also a guild member); returns its user object."""
        user = self._user(self.snowflake(), name, bot)
        self.users[user["id"]] = user
        if member:
            self.add_member(user, roles=list(roles))
        return user

    def add_role(self, name: str, permissions: int, *, role_id: str | None = None, managed: bool = False) -> str:
        role_id = role_id or self.snowflake()
        self.roles[role_id] = {
            "id": role_id, "name": name, "color": 0, "colors": {"primary_color": 0}, "hoist": False,
            "position": len(self.roles), "permissions": str(permissions), "managed": managed,
            "mentionable": False, "flags": 0, "icon": None, "unicode_emoji": None,
        }
        return role_id

    def add_member(self, user: dict, *, roles: list[str] = ()) -> None:
        self.users[user["id"]] = user
        self.members[user["id"]] = {
            "user": user, "roles": list(roles), "nick": None, "avatar": None, "joined_at": _iso(),
            "deaf": False, "mute": False, "flags": 0, "pending": False,
        }

    def member_permissions(self, user_id: str) -> int:
        member = self.members.get(str(user_id))
        role_ids = [self.guild_id] + (member["roles"] if member else [])
        perms = 0
        for role_id in role_ids:
            perms |= int(self.roles[role_id]["permissions"])
        return perms

    def add_channel(self, name: str, *, channel_id: str | None = None) -> str:
        channel_id = channel_id or self.snowflake()
        self.channels[channel_id] = {
            "id": channel_id, "type": CHANNEL_TEXT, "guild_id": self.guild_id, "name": name,
            "position": len(self.channels), "permission_overwrites": [], "parent_id": None,
            "topic": None, "nsfw": False, "last_message_id": None, "rate_limit_per_user": 0, "flags": 0,
        }
        return channel_id

    def add_thread(self, name: str, parent_id: str) -> str:
        thread_id = self.snowflake()
        self.channels[thread_id] = {
            "id": thread_id, "type": CHANNEL_PUBLIC_THREAD, "guild_id": self.guild_id, "name": name,
            "parent_id": str(parent_id), "owner_id": self.user["id"], "last_message_id": None,
            "message_count": 0, "member_count": 1, "rate_limit_per_user": 0, "flags": 0,
            "thread_metadata": {
                "archived": False, "auto_archive_duration": 1440, "archive_timestamp": _iso(), "locked": False,
            },
        }
        return thread_id

    def dm_channel(self, user: dict | None = None) -> str:
        """The id of the DM channel between the bot and `user` (default: the tester), created on first use."""
        user = user or self.user
        for channel in self.channels.values():
            if channel["type"] == CHANNEL_DM and channel["recipients"][0]["id"] == user["id"]:
                return channel["id"]
        channel_id = self.snowflake()
        self.users[user["id"]] = user
        self.channels[channel_id] = {
            "id": channel_id, "type": CHANNEL_DM, "recipients": [user], "last_message_id": None, "flags": 0,
        }
        return channel_id

    def guild_payload(self) -> dict:
        guild_channels = [c for c in self.channels.values() if c.get("guild_id") and c["type"] != CHANNEL_PUBLIC_THREAD]
        threads = [c for c in self.channels.values() if c["type"] == CHANNEL_PUBLIC_THREAD]
        return {
            "id": self.guild_id, "name": "Pioneer Test Guild", "icon": None, "splash": None,
            "discovery_splash": None, "owner_id": self.user["id"], "afk_channel_id": None, "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "roles": list(self.roles.values()), "emojis": [], "stickers": [], "features": [], "mfa_level": 0,
            "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
            "public_updates_channel_id": None, "vanity_url_code": None, "description": None, "banner": None,
            "premium_tier": 0, "premium_subscription_count": 0, "preferred_locale": "en-US", "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "joined_at": _iso(), "large": False, "unavailable": False,
            "member_count": len(self.members), "members": list(self.members.values()), "voice_states": [],
            "channels": guild_channels, "threads": threads, "presences": [], "stage_instances": [],
            "guild_scheduled_events": [], "soundboard_sounds": [], "max_members": 500000,
        }

    # ----- stored state ----------------------------------------------------------------------

    def messages_in(self, channel_id: int | str, *, include_deleted: bool = False) -> list[dict]:
        return [m for m in self.messages.get(str(channel_id), []) if include_deleted or not m["deleted"]]

    def message(self, message_id: int | str) -> dict | None:
        for channel_messages in self.messages.values():
            for record in channel_messages:
                if record["id"] == str(message_id):
                    return record
        return None

    def requests_to(self, method: str, path_pattern: str) -> list[dict]:
        """Logged requests whose method matches and whose path (under /api/v10) matches the regex."""
        pattern = re.compile(path_pattern)
        return [r for r in self.requests if r["method"] == method and pattern.fullmatch(r["path"])]

    def _store_message(self, channel_id: str, author: dict, body: dict, **extra: Any) -> dict:
        record = {
            "id": self.snowflake(), "channel_id": channel_id, "guild_id": self.channels[channel_id].get("guild_id"),
            "author": author, "content": body.get("content") or "", "embeds": body.get("embeds") or [],
            "attachments": [self._attachment(channel_id, f) for f in body.get("_attachments", [])],
            "allowed_mentions": body.get("allowed_mentions"),
            "message_reference": body.get("message_reference"), "flags": body.get("flags") or 0,
            "components": body.get("components") or [], "tts": bool(body.get("tts")), "nonce": body.get("nonce"),
            "created_at": time.time(), "edited_at": None, "edits": [], "reactions": [], "deleted": False,
            "mentions": [], "mention_roles": [], "mention_everyone": False, "interaction": None,
        }
        record.update(extra)
        self._resolve_mentions(record)
        self.messages.setdefault(channel_id, []).append(record)
        self.channels[channel_id]["last_message_id"] = record["id"]
        return record

    def _attachment(self, channel_id: str, upload: dict) -> dict:
        attachment_id = self.snowflake()
        url = f"http://127.0.0.1:{self.port}/attachments/{channel_id}/{attachment_id}/{upload['filename']}"
        return {"id": attachment_id, "filename": upload["filename"], "size": upload["size"], "url": url,
                "proxy_url": url}

    def _resolve_mentions(self, record: dict) -> None:
        """Who the message really pings, after allowed_mentions, as Discord computes it."""
        content, allowed = record["content"], record["allowed_mentions"]
        parse = {"users", "roles", "everyone"} if allowed is None else set(allowed.get("parse") or [])
        user_ids = USER_MENTION.findall(content)
        role_ids = ROLE_MENTION.findall(content)
        if "users" not in parse:
            user_ids = [u for u in user_ids if allowed and u in (allowed.get("users") or [])]
        if "roles" not in parse:
            role_ids = [r for r in role_ids if allowed and r in (allowed.get("roles") or [])]
        record["mentions"] = [self.users.get(u) or self._user(u, "unknown") for u in dict.fromkeys(user_ids)]
        record["mention_roles"] = [r for r in dict.fromkeys(role_ids) if r in self.roles]
        record["mention_everyone"] = "everyone" in parse and ("@everyone" in content or "@here" in content)

    def message_payload(self, record: dict, *, with_member: bool = False) -> dict:
        payload = {
            "id": record["id"], "channel_id": record["channel_id"], "author": record["author"],
            "content": record["content"], "timestamp": _iso(record["created_at"]),
            "edited_timestamp": _iso(record["edited_at"]) if record["edited_at"] else None,
            "tts": record["tts"], "mention_everyone": record["mention_everyone"], "mentions": record["mentions"],
            "mention_roles": record["mention_roles"], "attachments": record["attachments"],
            "embeds": record["embeds"], "pinned": False, "type": 19 if record["message_reference"] else 0,
            "flags": record["flags"], "components": record["components"],
        }
        if record["interaction"]:
            payload["type"] = 20
            payload["interaction_metadata"] = record["interaction"]
            payload["webhook_id"] = self.application_id
        if record["nonce"] is not None:
            payload["nonce"] = record["nonce"]
        if record["guild_id"]:
            payload["guild_id"] = record["guild_id"]
            if with_member and record["author"]["id"] in self.members:
                member = {k: v for k, v in self.members[record["author"]["id"]].items() if k != "user"}
                payload["member"] = member
        if record["message_reference"]:
            payload["message_reference"] = {"channel_id": record["channel_id"], **record["message_reference"]}
            referenced = self.message(record["message_reference"].get("message_id", 0))
            payload["referenced_message"] = self.message_payload(referenced) if referenced else None
        if record["reactions"]:
            counts: dict[str, int] = {}
            for _, emoji in record["reactions"]:
                counts[emoji] = counts.get(emoji, 0) + 1
            payload["reactions"] = [
                {"emoji": {"id": None, "name": e}, "count": n, "me": True, "burst_colors": [],
                 "count_details": {"burst": 0, "normal": n}, "me_burst": False, "burst_count": 0}
                for e, n in counts.items()
            ]
        return payload

    # ----- gateway ---------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        session: _GatewaySession | None = None
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            payload = json.loads(frame.data)
            op, data = payload.get("op"), payload.get("d")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:
                session = await self._identify(ws, data)
            elif op == 6:
                session = await self._resume(ws, data)
            elif op == 8 and session:
                members = list(self.members.values())
                chunk = {"guild_id": self.guild_id, "members": members, "chunk_index": 0, "chunk_count": 1}
                if data.get("nonce"):
                    chunk["nonce"] = data["nonce"]
                await self._send_event(session, "GUILD_MEMBERS_CHUNK", chunk)
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict) -> _GatewaySession | None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        intents = int(data.get("intents", 0))
        if intents & PRIVILEGED_INTENTS & ~self.allowed_privileged_intents:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return None
        session = _GatewaySession(ws, intents)
        self.sessions[session.session_id] = session
        ready = {
            "v": 10, "user": {**self.bot_user, "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": self.guild_id, "unavailable": True}], "session_id": session.session_id,
            "resume_gateway_url": self.gateway_url, "application": {"id": self.application_id, "flags": 0},
            "private_channels": [], "relationships": [], "user_settings": {}, "presences": [],
            "guild_join_requests": [], "geo_ordered_rtc_regions": [], "session_type": "normal",
        }
        await self._send_event(session, "READY", ready)
        if intents & INTENT_GUILDS:
            await self._send_event(session, "GUILD_CREATE", self.guild_payload())
        return session

    async def _resume(self, ws: web.WebSocketResponse, data: dict) -> _GatewaySession | None:
        session = self.sessions.get(data.get("session_id", ""))
        if session is None or data.get("token") != self.token:
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return None
        session.ws = ws
        async with session.lock:
            for sent in session.sent:
                if sent["s"] > (data.get("seq") or 0):
                    await ws.send_str(json.dumps(sent))
        await self._send_event(session, "RESUMED", {})
        return session

    async def _send_event(self, session: _GatewaySession, event: str, data: dict) -> None:
        async with session.lock:
            session.sequence += 1
            payload = {"op": 0, "t": event, "s": session.sequence, "d": data}
            session.sent.append(payload)
            if not session.ws.closed:
                await session.ws.send_str(json.dumps(payload))

    async def dispatch(self, event: str, data: dict, *, required_intent: int = 0) -> None:
        """Send a DISPATCH event to every session that asked for `required_intent`."""
        for session in list(self.sessions.values()):
            if session.intents & required_intent == required_intent:
                await self._send_event(session, event, data)

    async def drop_connections(self, code: int = 4000) -> None:
        """Close every gateway socket with a resumable close code, as Discord does during restarts."""
        for session in list(self.sessions.values()):
            if not session.ws.closed:
                await session.ws.close(code=code)

    async def _dispatch_message(self, event: str, record: dict) -> None:
        payload = self.message_payload(record, with_member=True)
        is_dm = record["guild_id"] is None
        intent = INTENT_DIRECT_MESSAGES if is_dm else INTENT_GUILD_MESSAGES
        content_visible = (
            is_dm
            or record["author"]["id"] == self.bot_user["id"]
            or any(m["id"] == self.bot_user["id"] for m in record["mentions"])
        )
        for session in list(self.sessions.values()):
            if not session.intents & intent:
                continue
            if content_visible or session.intents & INTENT_MESSAGE_CONTENT:
                await self._send_event(session, event, payload)
            else:
                hidden = {**payload, "content": "", "embeds": [], "attachments": [], "components": []}
                await self._send_event(session, event, hidden)

    async def send_message_create(
        self,
        channel_id: int | str,
        content: str,
        *,
        author: dict | None = None,
        mentions: list[dict] = (),
        guild_id: int | str | None = ...,
        message_reference: dict | None = None,
        embeds: list[dict] = (),
    ) -> dict:
        """A user posts a message: store it and dispatch MESSAGE_CREATE. Returns the stored record."""
        channel_id = str(channel_id)
        author = author or self.user
        self.users.setdefault(author["id"], author)
        body = {"content": content, "embeds": list(embeds), "message_reference": message_reference}
        record = self._store_message(channel_id, author, body)
        for user in mentions:
            if user["id"] not in {m["id"] for m in record["mentions"]}:
                record["mentions"].append(user)
        if guild_id is not ...:
            record["guild_id"] = None if guild_id is None else str(guild_id)
        await self._dispatch_message("MESSAGE_CREATE", record)
        return record

    async def send_interaction(
        self,
        name: str,
        options: dict[str, Any] | list[dict] | None = None,
        *,
        user: dict | None = None,
        permissions: int | None = None,
        channel_id: int | str | None = None,
        guild_id: int | str | None = ...,
    ) -> dict:
        """A user runs slash command `name`: dispatch INTERACTION_CREATE and return its record.

        `options` is either {name: value} (types inferred) or Discord's raw option list (for subcommands).
        `permissions` overrides the member's computed permissions. A DM channel means no guild.
        """
        user = user or self.user
        channel_id = str(channel_id or self.channel_id)
        channel = self.channels[channel_id]
        guild_id = channel.get("guild_id") if guild_id is ... else guild_id
        if isinstance(options, dict):
            options = [{"name": k, "type": OPTION_TYPES[type(v)], "value": v} for k, v in options.items()]
        command = self._find_command(name, guild_id)
        data: dict[str, Any] = {"id": command["id"] if command else self.snowflake(), "name": name, "type": 1}
        if options:
            data["options"] = options
        if command and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        interaction_id, token = self.snowflake(), "itoken-" + secrets.token_urlsafe(24)
        payload: dict[str, Any] = {
            "id": interaction_id, "application_id": self.application_id, "type": 2, "data": data,
            "channel_id": channel_id, "channel": channel, "token": token, "version": 1,
            "app_permissions": str(self.member_permissions(self.bot_user["id"])), "locale": "en-US",
            "entitlements": [], "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        }
        if guild_id:
            if user["id"] not in self.members:
                self.add_member(user)
            perms = self.member_permissions(user["id"]) if permissions is None else permissions
            member = {**self.members[user["id"]], "permissions": str(perms)}
            payload.update(
                guild_id=str(guild_id), member=member, guild_locale="en-US", context=0,
                guild={"id": str(guild_id), "locale": "en-US", "features": []},
                authorizing_integration_owners={"0": str(guild_id)},
            )
        else:
            payload.update(user=user, context=1, authorizing_integration_owners={"1": user["id"]})
        record = {
            "id": interaction_id, "token": token, "name": name, "options": options or [], "user": user,
            "channel_id": channel_id, "guild_id": str(guild_id) if guild_id else None, "payload": payload,
            "dispatched_at": time.monotonic(), "responses": [], "acknowledged": False,
            "original_message_id": None, "followup_ids": [],
        }
        self.interactions[interaction_id] = record
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

    def _find_command(self, name: str, guild_id: str | None) -> dict | None:
        candidates = self.guild_commands.get(str(guild_id), []) if guild_id else []
        for command in [*candidates, *self.global_commands]:
            if command["name"] == name:
                return command
        return None

    # ----- REST plumbing ---------------------------------------------------------------------

    @web.middleware
    async def _record_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path == "/gw":
            return await handler(request)
        body = await self._read_body(request)
        request[REQUEST_BODY] = body
        entry = {
            "method": request.method, "path": request.path.removeprefix(API_PREFIX),
            "query": dict(request.query), "json": body, "time": time.monotonic(), "status": None,
        }
        self.requests.append(entry)
        needs_auth = not request.path.startswith((f"{API_PREFIX}/webhooks/", f"{API_PREFIX}/interactions/"))
        if needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
            response: web.StreamResponse = _error(401, 0, "401: Unauthorized")
        else:
            try:
                response = await handler(request)
            except web.HTTPNotFound:
                response = _error(404, 0, "404: Not Found")
        entry["status"] = response.status
        if response.status == 429:
            self.rate_limited_count += 1
        return response

    @staticmethod
    async def _read_body(request: web.Request) -> Any:
        if request.content_type == "multipart/form-data":
            body: dict[str, Any] = {}
            attachments = []
            async for part in await request.multipart():
                if part.name == "payload_json":
                    body.update(json.loads(await part.text()))
                else:
                    data = await part.read()
                    attachments.append({"filename": part.filename, "size": len(data)})
            body["_attachments"] = attachments
            return body
        raw = await request.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _rate_limit(self, limiter: SlidingWindowLimiter, key: str) -> tuple[web.Response | None, dict]:
        """(429 response or None, rate-limit headers to add to a successful response)."""
        allowed, remaining, reset_after = limiter.hit(key)
        headers = {
            "X-RateLimit-Limit": str(limiter.limit), "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}", "X-RateLimit-Bucket": limiter.bucket,
        }
        if allowed:
            return None, headers if self.advertise_rate_limits else {}
        body = {"message": "You are being rate limited.", "retry_after": round(reset_after, 3), "global": False}
        headers.update({"Retry-After": str(math.ceil(reset_after)), "X-RateLimit-Scope": "user"})
        return _json_response(body, 429, headers), {}

    @staticmethod
    def _validate_message(body: dict, *, editing: bool = False) -> web.Response | None:
        content = body.get("content")
        if content is not None and len(content) > MAX_CONTENT_LENGTH:
            return _form_error("content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT_LENGTH} or fewer in length.")
        embeds = body.get("embeds") or []
        if len(embeds) > MAX_EMBEDS:
            return _form_error("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
        total = 0
        for embed in embeds:
            if len(embed.get("description") or "") > 4096:
                return _form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 4096 or fewer in length.")
            if len(embed.get("title") or "") > 256:
                return _form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 256 or fewer in length.")
            fields = embed.get("fields") or []
            total += len(embed.get("title") or "") + len(embed.get("description") or "")
            total += sum(len(f.get("name", "")) + len(f.get("value", "")) for f in fields)
        if total > MAX_EMBED_TOTAL_CHARS:
            return _form_error("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
        has_something = content or embeds or body.get("_attachments") or body.get("attachments")
        has_something = has_something or body.get("sticker_ids") or body.get("components") or body.get("poll")
        if not editing and not has_something:
            return _error(400, 50006, "Cannot send an empty message")
        return None

    def _channel_or_404(self, channel_id: str) -> web.Response | None:
        return None if channel_id in self.channels else _error(404, 10003, "Unknown Channel")

    def _message_or_404(self, channel_id: str, message_id: str) -> dict | web.Response:
        for record in self.messages.get(channel_id, []):
            if record["id"] == message_id and not record["deleted"]:
                return record
        return _error(404, 10008, "Unknown Message")

    def _add_rest_routes(self, router: web.UrlDispatcher) -> None:
        p = API_PREFIX
        router.add_get(f"{p}/users/@me", self._get_me)
        router.add_get(f"{p}/oauth2/applications/@me", self._get_application)
        router.add_get(f"{p}/gateway", self._get_gateway)
        router.add_get(f"{p}/gateway/bot", self._get_gateway)
        router.add_post(f"{p}/users/@me/channels", self._open_dm)
        router.add_get(p + "/channels/{channel_id}", self._get_channel)
        router.add_post(p + "/channels/{channel_id}/typing", self._typing)
        router.add_get(p + "/channels/{channel_id}/messages", self._list_messages)
        router.add_post(p + "/channels/{channel_id}/messages", self._create_message)
        router.add_get(p + "/channels/{channel_id}/messages/{message_id}", self._get_message)
        router.add_patch(p + "/channels/{channel_id}/messages/{message_id}", self._edit_message)
        router.add_delete(p + "/channels/{channel_id}/messages/{message_id}", self._delete_message)
        router.add_put(p + "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._react)
        router.add_get(p + "/applications/{app_id}/commands", self._get_commands)
        router.add_put(p + "/applications/{app_id}/commands", self._put_commands)
        router.add_get(p + "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands)
        router.add_put(p + "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands)
        router.add_post(p + "/interactions/{interaction_id}/{token}/callback", self._interaction_callback)
        router.add_post(p + "/webhooks/{app_id}/{token}", self._followup_create)
        router.add_get(p + "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_message_get)
        router.add_patch(p + "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_message_edit)
        router.add_delete(p + "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_message_delete)

    # ----- REST: identity and channels -------------------------------------------------------

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json_response({**self.bot_user, "verified": True, "mfa_enabled": False, "flags": 0})

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json_response({
            "id": self.application_id, "name": "Pioneer", "description": "", "icon": None,
            "bot_public": True, "bot_require_code_grant": False, "owner": self.user, "verify_key": "0" * 64,
            "flags": 0, "team": None, "summary": "", "rpc_origins": [], "bot": self.bot_user,
        })

    async def _get_gateway(self, request: web.Request) -> web.Response:
        limits = {"total": 1000, "remaining": 999, "reset_after": 86_400_000, "max_concurrency": 1}
        return _json_response({"url": self.gateway_url, "shards": 1, "session_start_limit": limits})

    async def _open_dm(self, request: web.Request) -> web.Response:
        recipient_id = str((request[REQUEST_BODY] or {}).get("recipient_id"))
        user = self.users.get(recipient_id)
        if user is None:
            return _error(400, 50033, "Invalid Recipient(s)")
        return _json_response(self.channels[self.dm_channel(user)])

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel_id = request.match_info["channel_id"]
        return self._channel_or_404(channel_id) or _json_response(self.channels[channel_id])

    async def _typing(self, request: web.Request) -> web.Response:
        return self._channel_or_404(request.match_info["channel_id"]) or web.Response(status=204)

    # ----- REST: messages --------------------------------------------------------------------

    async def _list_messages(self, request: web.Request) -> web.Response:
        channel_id = request.match_info["channel_id"]
        if missing := self._channel_or_404(channel_id):
            return missing
        limit = int(request.query.get("limit", 50))
        newest_first = list(reversed(self.messages_in(channel_id)))[:limit]
        return _json_response([self.message_payload(m) for m in newest_first])

    async def _create_message(self, request: web.Request) -> web.Response:
        channel_id = request.match_info["channel_id"]
        body = request[REQUEST_BODY] or {}
        if missing := self._channel_or_404(channel_id):
            return missing
        if invalid := self._validate_message(body):
            return invalid
        reference = body.get("message_reference")
        if reference and reference.get("fail_if_not_exists", True) and not self.message(reference.get("message_id", 0)):
            return _form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
        limited, headers = self._rate_limit(self.create_limiter, channel_id)
        if limited:
            return limited
        record = self._store_message(channel_id, self.bot_user, body)
        if self.echo_own_messages:
            await self._dispatch_message("MESSAGE_CREATE", record)
        return _json_response(self.message_payload(record), headers=headers)

    async def _get_message(self, request: web.Request) -> web.Response:
        found = self._message_or_404(request.match_info["channel_id"], request.match_info["message_id"])
        return found if isinstance(found, web.Response) else _json_response(self.message_payload(found))

    async def _edit_message(self, request: web.Request) -> web.Response:
        channel_id, message_id = request.match_info["channel_id"], request.match_info["message_id"]
        body = request[REQUEST_BODY] or {}
        found = self._message_or_404(channel_id, message_id)
        if isinstance(found, web.Response):
            return found
        if found["author"]["id"] != self.bot_user["id"]:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        return await self._apply_edit(found, body)

    async def _apply_edit(self, record: dict, body: dict) -> web.Response:
        if invalid := self._validate_message(body, editing=True):
            return invalid
        limited, headers = self._rate_limit(self.edit_limiter, record["channel_id"])
        if limited:
            return limited
        for key in ("content", "embeds", "allowed_mentions", "components"):
            if key in body:
                record[key] = body[key] if body[key] is not None else ([] if key != "content" else "")
        if "flags" in body and body["flags"] is not None:
            record["flags"] = body["flags"]
        record["flags"] &= ~MESSAGE_FLAG_LOADING
        record["edited_at"] = time.time()
        record["edits"].append({"content": record["content"], "embeds": record["embeds"], "at": time.monotonic()})
        self._resolve_mentions(record)
        if self.echo_own_messages and not record["flags"] & MESSAGE_FLAG_EPHEMERAL:
            await self._dispatch_message("MESSAGE_UPDATE", record)
        return _json_response(self.message_payload(record), headers=headers)

    async def _delete_message(self, request: web.Request) -> web.Response:
        channel_id, message_id = request.match_info["channel_id"], request.match_info["message_id"]
        found = self._message_or_404(channel_id, message_id)
        if isinstance(found, web.Response):
            return found
        return await self._apply_delete(found)

    async def _apply_delete(self, record: dict) -> web.Response:
        record["deleted"] = True
        event = {"id": record["id"], "channel_id": record["channel_id"]}
        if record["guild_id"]:
            event["guild_id"] = record["guild_id"]
        if self.echo_own_messages:
            intent = INTENT_GUILD_MESSAGES if record["guild_id"] else INTENT_DIRECT_MESSAGES
            await self.dispatch("MESSAGE_DELETE", event, required_intent=intent)
        return web.Response(status=204, headers={"Via": "1.1 google"})

    async def _react(self, request: web.Request) -> web.Response:
        found = self._message_or_404(request.match_info["channel_id"], request.match_info["message_id"])
        if isinstance(found, web.Response):
            return found
        found["reactions"].append((self.bot_user["id"], request.match_info["emoji"]))
        return web.Response(status=204)

    # ----- REST: application commands --------------------------------------------------------

    def _command_list(self, guild_id: str | None) -> list[dict]:
        return self.guild_commands.setdefault(guild_id, []) if guild_id else self.global_commands

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json_response(self._command_list(request.match_info.get("guild_id")))

    async def _put_commands(self, request: web.Request) -> web.Response:
        if request.match_info["app_id"] != self.application_id:
            return _error(403, 50001, "Missing Access")
        guild_id = request.match_info.get("guild_id")
        commands = request[REQUEST_BODY] or []
        if len(commands) > 100:
            return _form_error("_", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        existing = {c["name"]: c for c in self._command_list(guild_id)}
        stored = []
        for index, command in enumerate(commands):
            name = command.get("name", "")
            chat_input = command.get("type", 1) == 1
            if chat_input and (not COMMAND_NAME.match(name) or name != name.lower()):
                return _form_error(f"{index}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            if chat_input and not 1 <= len(command.get("description", "")) <= 100:
                message = "Must be between 1 and 100 in length."
                return _form_error(f"{index}.description", "BASE_TYPE_BAD_LENGTH", message)
            if len(command.get("options") or []) > 25:
                return _form_error(f"{index}.options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
            command_id = existing[name]["id"] if name in existing else self.snowflake()
            stored.append({
                "type": 1, "description": "", "options": [], "default_member_permissions": None, "nsfw": False,
                **command, "id": command_id, "application_id": self.application_id, "version": self.snowflake(),
                **({"guild_id": guild_id} if guild_id else {}),
            })
        if guild_id:
            self.guild_commands[guild_id] = stored
        else:
            self.global_commands = stored
        return _json_response(stored)

    # ----- REST: interactions and their webhooks ---------------------------------------------

    def _interaction_for_token(self, request: web.Request) -> dict | web.Response:
        if request.match_info["app_id"] != self.application_id:
            return _error(404, 10015, "Unknown Webhook")
        for record in self.interactions.values():
            if record["token"] == request.match_info["token"]:
                if time.monotonic() - record["dispatched_at"] > INTERACTION_TOKEN_TTL:
                    return _error(401, 50027, "Invalid Webhook Token")
                if not record["acknowledged"]:
                    return _error(404, 10015, "Unknown Webhook")
                return record
        return _error(404, 10015, "Unknown Webhook")

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        record = self.interactions.get(request.match_info["interaction_id"])
        body = request[REQUEST_BODY] or {}
        if record is None or record["token"] != request.match_info["token"]:
            return _error(404, 10062, "Unknown interaction")
        elapsed = time.monotonic() - record["dispatched_at"]
        record["responses"].append({"type": body.get("type"), "data": body.get("data"), "elapsed": elapsed})
        if elapsed > self.interaction_window:
            return _error(404, 10062, "Unknown interaction")
        if record["acknowledged"]:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        callback_type, data = body.get("type"), body.get("data") or {}
        message = None
        if callback_type == CALLBACK_MESSAGE:
            if invalid := self._validate_message(data):
                return invalid
            message = self._store_interaction_message(record, data)
        elif callback_type == CALLBACK_DEFERRED_MESSAGE:
            flags = (data.get("flags") or 0) | MESSAGE_FLAG_LOADING
            message = self._store_interaction_message(record, {"flags": flags})
        record["acknowledged"] = True
        if message:
            record["original_message_id"] = message["id"]
            if self.echo_own_messages and not message["flags"] & MESSAGE_FLAG_EPHEMERAL:
                await self._dispatch_message("MESSAGE_CREATE", message)
        if "with_response" not in request.query:
            return web.Response(status=204)
        summary: dict[str, Any] = {"id": record["id"], "type": 2}
        result: dict[str, Any] = {"interaction": summary}
        if message:
            summary.update(
                response_message_id=message["id"],
                response_message_loading=bool(message["flags"] & MESSAGE_FLAG_LOADING),
                response_message_ephemeral=bool(message["flags"] & MESSAGE_FLAG_EPHEMERAL),
            )
            result["resource"] = {"type": callback_type, "message": self.message_payload(message)}
        elif callback_type is not None:
            result["resource"] = {"type": callback_type}
        return _json_response(result)

    def _store_interaction_message(self, interaction: dict, body: dict) -> dict:
        metadata = {
            "id": interaction["id"], "type": 2, "name": interaction["name"], "user": interaction["user"],
            "authorizing_integration_owners": interaction["payload"]["authorizing_integration_owners"],
        }
        return self._store_message(interaction["channel_id"], self.bot_user, body, interaction=metadata)

    async def _followup_create(self, request: web.Request) -> web.Response:
        found = self._interaction_for_token(request)
        if isinstance(found, web.Response):
            return found
        body = request[REQUEST_BODY] or {}
        if invalid := self._validate_message(body):
            return invalid
        limited, headers = self._rate_limit(self.create_limiter, found["channel_id"])
        if limited:
            return limited
        record = self._store_interaction_message(found, body)
        found["followup_ids"].append(record["id"])
        if self.echo_own_messages and not record["flags"] & MESSAGE_FLAG_EPHEMERAL:
            await self._dispatch_message("MESSAGE_CREATE", record)
        if request.query.get("wait") in ("1", "true", "True"):
            return _json_response(self.message_payload(record), headers=headers)
        return web.Response(status=204)

    def _webhook_message(self, request: web.Request) -> dict | web.Response:
        found = self._interaction_for_token(request)
        if isinstance(found, web.Response):
            return found
        message_id = request.match_info["message_id"]
        if message_id == "@original":
            message_id = found["original_message_id"]
        elif message_id not in found["followup_ids"]:
            message_id = None
        if message_id is None:
            return _error(404, 10008, "Unknown Message")
        return self._message_or_404(found["channel_id"], message_id)

    async def _webhook_message_get(self, request: web.Request) -> web.Response:
        found = self._webhook_message(request)
        return found if isinstance(found, web.Response) else _json_response(self.message_payload(found))

    async def _webhook_message_edit(self, request: web.Request) -> web.Response:
        found = self._webhook_message(request)
        if isinstance(found, web.Response):
            return found
        return await self._apply_edit(found, request[REQUEST_BODY] or {})

    async def _webhook_message_delete(self, request: web.Request) -> web.Response:
        found = self._webhook_message(request)
        return found if isinstance(found, web.Response) else await self._apply_delete(found)
