"""A local OpenAI-compatible chat server with scriptable failures, for tests and the console demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

REPLY = "reply"
RATE_LIMITED = "rate_limited"
HTTP_ERROR = "http_error"
HANG = "hang"
STALL = "stall"
MALFORMED = "malformed"
BROKEN = "broken"
ERROR_EVENT = "error_event"
UNAUTHORIZED = "unauthorized"


@dataclass
class Scenario:
    """How the server answers one chat request; build one with the class methods."""

    mode: str = REPLY
    text: str | None = None  # None: echo the last user message
    chunks: int = 4
    delay_s: float = 0.0  # pause before each streamed chunk
    status: int = 500
    retry_after: float | None = None
    hang_s: float = 60.0
    after_chunks: int = 1  # chunks sent before a broken stream, an error event or a stall

    @classmethod
    def reply(cls, text: str | None = None, chunks: int = 4, delay_s: float = 0.0) -> Scenario:
        return cls(REPLY, text=text, chunks=chunks, delay_s=delay_s)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0) -> Scenario:
        return cls(RATE_LIMITED, status=429, retry_after=retry_after)

    @classmethod
    def http_error(cls, status: int, retry_after: float | None = None) -> Scenario:
        return cls(HTTP_ERROR, status=status, retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500, retry_after: float | None = None) -> Scenario:
        return cls.http_error(status, retry_after)

    @classmethod
    def hang(cls, seconds: float = 60.0) -> Scenario:
        """No response headers at all for `seconds`."""
        return cls(HANG, hang_s=seconds)

    @classmethod
    def stall(cls, after_chunks: int = 1, seconds: float = 60.0) -> Scenario:
        """Start streaming, then go silent for `seconds` without closing."""
        return cls(STALL, after_chunks=after_chunks, hang_s=seconds)

    @classmethod
    def malformed(cls) -> Scenario:
        return cls(MALFORMED)

    @classmethod
    def broken(cls, after_chunks: int = 1) -> Scenario:
        return cls(BROKEN, after_chunks=after_chunks)

    @classmethod
    def error_event(cls, after_chunks: int = 1) -> Scenario:
        return cls(ERROR_EVENT, after_chunks=after_chunks)

    @classmethod
    def unauthorized(cls) -> Scenario:
        return cls(UNAUTHORIZED, status=401)


@dataclass
class RecordedRequest:
    """One request as the server saw it; the Authorization value is never kept."""

    method: str
    path: str
    headers: dict[str, str]
    has_authorization: bool
    body: Any = None


@dataclass
class FakeOpenAI:
    """aiohttp server speaking the OpenAI chat-completions wire format on 127.0.0.1."""

    model: str = "fake-model"
    default: Scenario = field(default_factory=Scenario)  # used when the queue is empty
    expected_key: str | None = None  # when set, other keys get 401
    accept_stream_options: bool = True  # False: 400 on stream_options, like some compatible servers
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self.scenarios: deque[Scenario] = deque()
        self.requests: list[RecordedRequest] = []
        self.chat_calls = 0
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # -- scripting -------------------------------------------------------

    def script(self, *scenarios: Scenario) -> None:
        """Queue scenarios for the next chat requests, one each, in order."""
        self.scenarios.extend(scenarios)

    def reset(self) -> None:
        self.scenarios.clear()
        self.requests.clear()
        self.chat_calls = 0

    @property
    def chat_bodies(self) -> list[Any]:
        return [r.body for r in self.requests if r.path.endswith("/chat/completions")]

    # -- lifecycle -------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=0.5)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- handlers --------------------------------------------------------

    async def _record(self, request: web.Request) -> RecordedRequest:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        body = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        record = RecordedRequest(request.method, request.path, headers, "Authorization" in request.headers, body)
        self.requests.append(record)
        return record

    def _key_rejected(self, request: web.Request) -> bool:
        return self.expected_key is not None and request.headers.get("Authorization") != f"Bearer {self.expected_key}"

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self._key_rejected(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "pioneer-fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        record = await self._record(request)
        self.chat_calls += 1
        body = record.body if isinstance(record.body, dict) else {}
        # Refusals that come from the server's own rules do not use up a scripted scenario.
        if self._key_rejected(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if not isinstance(body.get("messages"), list) or not body.get("model"):
            return _error(400, "'messages' and 'model' are required.", "invalid_request_error")
        if "stream_options" in body and not self.accept_stream_options:
            return _error(400, "Unrecognized request argument supplied: stream_options", "invalid_request_error")

        scenario = self.scenarios.popleft() if self.scenarios else self.default
        if scenario.mode == UNAUTHORIZED:
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if scenario.mode == RATE_LIMITED:
            return _error(429, "Rate limit reached.", "requests", "rate_limit_exceeded", scenario.retry_after)
        if scenario.mode == HTTP_ERROR:
            kind = "server_error" if scenario.status >= 500 else "invalid_request_error"
            return _error(scenario.status, f"Scripted HTTP {scenario.status}.", kind, None, scenario.retry_after)
        if scenario.mode == HANG:
            await self._sleep(scenario.hang_s)
            return _error(504, "Gave up hanging.", "server_error")

        text = scenario.text if scenario.text is not None else _echo(body["messages"])
        if body.get("stream"):
            try:
                return await self._stream(request, body, scenario, text)
            except ConnectionResetError:  # the client went away mid-stream
                return web.Response(status=499)
        if scenario.mode != REPLY:
            return _error(500, f"Scenario {scenario.mode!r} needs stream=True.", "server_error")
        await self._sleep(scenario.delay_s)
        message = {"role": "assistant", "content": text}
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": _usage(body["messages"], text),
        })

    async def _stream(self, request: web.Request, body: dict, scenario: Scenario, text: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        model = body["model"]
        pieces = _split(text, scenario.chunks)
        if scenario.mode in (BROKEN, ERROR_EVENT, STALL):
            pieces = pieces[: scenario.after_chunks]

        await _send(response, _chunk(model, {"role": "assistant", "content": ""}))
        for piece in pieces:
            await self._sleep(scenario.delay_s)
            await _send(response, _chunk(model, {"content": piece}))

        if scenario.mode == STALL:
            await self._sleep(scenario.hang_s)
        if scenario.mode == BROKEN:
            request.transport.abort()  # closed before [DONE] and before the chunked terminator
            return response
        if scenario.mode == ERROR_EVENT:
            error = {"message": "The model crashed mid-reply.", "type": "server_error", "code": None}
            await _send(response, json.dumps({"error": error}))
            await response.write_eof()
            return response
        if scenario.mode == MALFORMED:
            await response.write(b"this line is not server-sent events\n\n")
            await _send(response, '{"id": "chatcmpl-fake", "choices": [ {not json')

        await _send(response, _chunk(model, {}, finish_reason="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = json.loads(_chunk(model, {}))
            usage_chunk.update(choices=[], usage=_usage(body["messages"], text))
            await _send(response, json.dumps(usage_chunk))
        await _send(response, "[DONE]")
        await response.write_eof()
        return response

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            try:
                await asyncio.wait_for(self._stopping.wait(), seconds)
            except asyncio.TimeoutError:
                pass


def _error(status: int, message: str, kind: str, code: str | None = None,
           retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(payload, status=status, headers=headers)


async def _send(response: web.StreamResponse, data: str) -> None:
    await response.write(f"data: {data}\n\n".encode())


def _chunk(model: str, delta: dict, finish_reason: str | None = None) -> str:
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })


def _split(text: str, parts: int) -> list[str]:
    """Split text at word boundaries into at most `parts` non-empty pieces that join back to it."""
    words = re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    parts = max(1, min(parts, len(words)))
    size, extra = divmod(len(words), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append("".join(words[start:end]))
        start = end
    return pieces


def _echo(messages: list) -> str:
    user_texts = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    last = user_texts[-1] if user_texts and isinstance(user_texts[-1], str) else ""
    return f"(fake OpenAI) You said: {last}"


def _usage(messages: list, text: str) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
    completion = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _serve(port: int, text: str | None, delay_s: float) -> None:
    fake = FakeOpenAI(port=port, default=Scenario.reply(text, chunks=8, delay_s=delay_s))
    await fake.start()
    print(f"Fake OpenAI server on {fake.base_url} (model {fake.model!r}); Ctrl-C to stop.", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--text", default=None, help="fixed reply text (default: echo the user)")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between streamed chunks")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.text, args.delay))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
