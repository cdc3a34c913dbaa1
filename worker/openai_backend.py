"""Streams chat replies from the OpenAI API or any OpenAI-compatible server (Ollama, vLLM)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai

log = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "no-key"  # Ollama and vLLM accept any key, but the client insists on one

USER_MESSAGES = {
    "not_configured": "Sorry, I can't answer that one right now: my helper service isn't set up.",
    "timeout": "Sorry, that took too long. Please try again in a moment.",
    "rate_limited": "I'm getting a lot of questions right now. Please try again in a moment.",
    "server_error": "Sorry, my helper service ran into a problem. Please try again shortly.",
    "connection": "Sorry, I couldn't reach my helper service. Please try again shortly.",
    "bad_stream": "Sorry, my answer got cut off. Please ask again.",
    "auth": "Sorry, I can't use my helper service right now (access was refused).",
    "bad_request": "Sorry, I couldn't answer that. Try a shorter or simpler message.",
}


class BackendError(Exception):
    """Any failure of the backend; `user_message` is safe to show in a chat."""

    def __init__(self, kind: str, user_message: str | None = None, retry_after: float | None = None):
        if kind not in USER_MESSAGES:
            raise ValueError(f"unknown BackendError kind {kind!r}")
        self.kind = kind
        self.user_message = user_message or USER_MESSAGES[kind]
        self.retry_after = retry_after
        super().__init__(f"{kind}: {self.user_message}")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


class ReplyStream:
    """One streamed reply: iterate it for text deltas, then read `text`, `usage` and `finish_reason`.

    Use `async with backend.stream(messages) as reply:` so the connection is released even when the
    caller stops early. `usage` stays None when the server does not report it.
    """

    def __init__(self, backend: OpenAIBackend, messages: list[dict]):
        self._backend = backend
        self._messages = messages
        self._deltas: AsyncIterator[str] | None = None
        self._parts: list[str] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def __aiter__(self) -> AsyncIterator[str]:
        if self._deltas is None:
            self._deltas = self._backend._generate(self._messages, self)
        return self._deltas

    async def aclose(self) -> None:
        if self._deltas is not None:
            await self._deltas.aclose()

    async def __aenter__(self) -> ReplyStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class OpenAIBackend:
    """Chat completions through openai.AsyncOpenAI, with every failure raised as a BackendError.

    timeout_s is the longest silence allowed once the reply has started (also the HTTP read timeout);
    first_token_timeout_s bounds the wait for the first text, retries included.
    """

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None,
        model: str,
        timeout_s: float = 30,
        connect_timeout_s: float = 5,
        max_retries: int = 1,
        first_token_timeout_s: float = 15,
        max_tokens: int = 512,
        temperature: float = 0.7,
    ):
        self.base_url = base_url or OFFICIAL_BASE_URL
        self.model = model
        self.timeout_s = timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._configured = bool(api_key or base_url)
        self._send_stream_options = True  # dropped once a server is seen to refuse it
        self._client: openai.AsyncOpenAI | None = None
        if self._configured:
            self._client = openai.AsyncOpenAI(
                api_key=api_key or PLACEHOLDER_KEY,
                base_url=self.base_url,
                max_retries=max_retries,
                timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            )

    @property
    def configured(self) -> bool:
        return self._configured

    @property
    def _is_official_api(self) -> bool:
        return urlsplit(self.base_url).hostname == "api.openai.com"

    def describe(self) -> dict:
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return {"base_url_host": host, "model": self.model, "configured": self.configured}

    def stream(self, messages: list[dict]) -> ReplyStream:
        """Start a reply; nothing is sent until it is iterated."""
        return ReplyStream(self, messages)

    async def complete(self, messages: list[dict]) -> tuple[str, Usage | None]:
        async with self.stream(messages) as reply:
            async for _ in reply:
                pass
        return reply.text, reply.usage

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def _generate(self, messages: list[dict], reply: ReplyStream) -> AsyncIterator[str]:
        if self._client is None:
            raise BackendError("not_configured")
        loop = asyncio.get_running_loop()
        first_token_deadline = loop.time() + self.first_token_timeout_s
        chunks = None
        try:
            chunks = await self._guard(self._open(messages), first_token_deadline, started=False)
            iterator = aiter(chunks)
            while True:
                deadline = loop.time() + self.timeout_s if reply._parts else first_token_deadline
                chunk = await self._guard(anext(iterator, None), deadline, started=True)
                if chunk is None:
                    break
                try:
                    text = self._absorb(chunk, reply)
                except Exception as err:  # a chunk that does not have the expected shape
                    raise self._fail("bad_stream", f"odd chunk ({type(err).__name__})") from err
                if text:
                    reply._parts.append(text)
                    yield text
            if reply.finish_reason is None:
                raise self._fail("bad_stream", "stream ended before the reply was finished")
        finally:
            if chunks is not None:
                await chunks.close()

    async def _open(self, messages: list[dict]) -> openai.AsyncStream:
        limit = "max_completion_tokens" if self._is_official_api else "max_tokens"
        params = {"model": self.model, "messages": messages, "stream": True,
                  "temperature": self.temperature, limit: self.max_tokens}
        create = self._client.chat.completions.create
        if not self._send_stream_options:
            return await create(**params)
        try:
            return await create(**params, stream_options={"include_usage": True})
        except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
            if not _mentions_stream_options(err):
                raise
            log.info("Server refused stream_options (HTTP %s); retrying once without", err.status_code)
        chunks = await create(**params)
        self._send_stream_options = False
        return chunks

    @staticmethod
    def _absorb(chunk: object, reply: ReplyStream) -> str:
        """Record usage and finish reason from one chunk; return its text."""
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            reply.usage = Usage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        text = ""
        for choice in getattr(chunk, "choices", None) or []:
            if choice.index != 0:
                continue
            if choice.finish_reason:
                reply.finish_reason = choice.finish_reason
            if choice.delta is not None and choice.delta.content:
                text += choice.delta.content
        return text

    async def _guard(self, step, deadline: float, started: bool):
        """Await one step of a request under a deadline, turning every failure into a BackendError."""
        try:
            async with asyncio.timeout_at(deadline):
                return await step
        except BackendError:
            raise
        except TimeoutError as err:
            what = "stream stalled" if started else "no first token in time"
            raise self._fail("timeout", what) from err
        except openai.APITimeoutError as err:
            raise self._fail("timeout", "HTTP timeout") from err
        except openai.APIConnectionError as err:
            kind = "bad_stream" if started else "connection"
            raise self._fail(kind, self._describe_error(err)) from err
        except openai.RateLimitError as err:
            retry_after = _retry_after(err.response.headers)
            raise self._fail("rate_limited", self._describe_error(err), retry_after) from err
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise self._fail("auth", self._describe_error(err)) from err
        except openai.APIStatusError as err:
            kind = "server_error" if err.status_code >= 500 else "bad_request"
            raise self._fail(kind, self._describe_error(err)) from err
        except openai.APIResponseValidationError as err:
            raise self._fail("bad_stream", self._describe_error(err)) from err
        except openai.APIError as err:  # an error event inside the stream
            raise self._fail("server_error", self._describe_error(err)) from err
        except Exception as err:  # undecodable or unexpected data from the server
            raise self._fail("bad_stream", type(err).__name__) from err

    def _fail(self, kind: str, detail: str, retry_after: float | None = None) -> BackendError:
        log.warning("OpenAI-compatible backend failed (%s, model %s at %s): %s",
                    kind, self.model, self.describe()["base_url_host"], detail)
        user_message = None
        if kind == "rate_limited" and retry_after:
            user_message = f"I'm getting a lot of questions right now. Please try again in {math.ceil(retry_after)} s."
        return BackendError(kind, user_message, retry_after)

    def _describe_error(self, err: openai.APIError) -> str:
        status = getattr(err, "status_code", None)
        detail = f"{type(err).__name__}" + (f" HTTP {status}" if status else "")
        message = err.message or ""
        key = getattr(self._client, "api_key", None)
        if isinstance(key, str) and key:
            message = message.replace(key, "[key]")
        message = message[:300]
        return f"{detail}: {message}" if message else detail


def _mentions_stream_options(err: openai.APIStatusError) -> bool:
    text = f"{err.message} {err.body}".lower()
    return "stream_options" in text or "stream options" in text


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait, from retry-after-ms or Retry-After (seconds or HTTP date)."""
    for name, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None
