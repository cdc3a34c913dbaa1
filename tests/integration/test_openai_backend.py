"""OpenAIBackend with the real openai client against the local FakeOpenAI server."""

import asyncio
import logging
import socket
import time

import openai
import pytest

from tests.fakes.openai_server import FakeOpenAI, Scenario
from worker.openai_backend import BackendError, OpenAIBackend, Usage

KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
LOGGERS = ("openai", "httpx2", "httpcore2", "httpx", "httpcore", "worker", "aiohttp")


@pytest.fixture
async def fake():
    async with FakeOpenAI(expected_key=KEY) as server:
        yield server


@pytest.fixture
async def make_backend(fake):
    made = []

    def make(**overrides) -> OpenAIBackend:
        args = dict(api_key=KEY, base_url=fake.base_url, model="fake-model", timeout_s=2.0,
                    connect_timeout_s=1.0, max_retries=0, first_token_timeout_s=2.0)
        args.update(overrides)
        backend = OpenAIBackend(**args)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


async def failure_of(backend: OpenAIBackend) -> tuple[BackendError, float]:
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        await backend.complete(MESSAGES)
    return caught.value, time.monotonic() - started


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_streamed_reply_arrives_in_order_with_usage(fake, make_backend):
    text = "one two three four five six"
    fake.script(Scenario.reply(text, chunks=3, delay_s=0.02))
    deltas = []
    async with make_backend().stream(MESSAGES) as reply:
        async for delta in reply:
            deltas.append(delta)

    assert deltas == ["one two ", "three four ", "five six"]
    assert reply.text == text
    assert reply.finish_reason == "stop"
    assert reply.usage == Usage(prompt_tokens=4, completion_tokens=6)
    body = fake.chat_bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "fake-model" and body["messages"] == MESSAGES and body["max_tokens"] == 512


async def test_complete_returns_text_and_usage(fake, make_backend):
    fake.script(Scenario.reply("Hello there."))
    assert await make_backend().complete(MESSAGES) == ("Hello there.", Usage(4, 2))


async def test_steady_slow_stream_is_not_a_stall(fake, make_backend):
    fake.script(Scenario.reply("a b c d", chunks=4, delay_s=0.15))
    text, _ = await make_backend(timeout_s=0.5, first_token_timeout_s=0.5).complete(MESSAGES)
    assert text == "a b c d"


async def test_caller_can_stop_early_and_reuse_the_backend(fake, make_backend):
    backend = make_backend()
    fake.script(Scenario.reply("first second third", chunks=3), Scenario.reply("again"))
    async with backend.stream(MESSAGES) as reply:
        async for delta in reply:
            break
    assert delta == "first "
    assert await backend.complete(MESSAGES) == ("again", Usage(4, 1))


async def test_refused_stream_options_retried_once_without_then_remembered(fake, make_backend):
    fake.accept_stream_options = False
    backend = make_backend()
    fake.script(Scenario.reply("works anyway"), Scenario.reply("still works"))

    assert await backend.complete(MESSAGES) == ("works anyway", None)
    assert await backend.complete(MESSAGES) == ("still works", None)
    assert fake.chat_calls == 3
    assert ["stream_options" in body for body in fake.chat_bodies] == [True, False, False]


async def test_base_url_alone_is_configured_with_a_placeholder_key(fake, make_backend):
    fake.expected_key = None
    backend = make_backend(api_key=None)
    assert backend.configured
    fake.script(Scenario.reply("hi"))
    assert (await backend.complete(MESSAGES))[0] == "hi"
    assert fake.requests[0].has_authorization


@pytest.mark.parametrize("scenario, kind", [
    (Scenario.rate_limited(retry_after=7), "rate_limited"),
    (Scenario.server_error(500), "server_error"),
    (Scenario.server_error(503), "server_error"),
    (Scenario.unauthorized(), "auth"),
    (Scenario.http_error(400), "bad_request"),
    (Scenario.malformed(), "bad_stream"),
    (Scenario.broken(after_chunks=1), "bad_stream"),
    (Scenario.error_event(after_chunks=1), "server_error"),
], ids=lambda value: value if isinstance(value, str) else value.mode)
async def test_failures_map_to_a_kind_with_a_safe_message(fake, make_backend, scenario, kind):
    fake.script(scenario)
    error, elapsed = await failure_of(make_backend())

    assert error.kind == kind
    assert elapsed < 1.0
    assert fake.chat_calls == 1
    for secret in (KEY, "http", str(fake.port), "Traceback", "Error code"):
        assert secret not in error.user_message
    if kind == "rate_limited":
        assert error.retry_after == 7
        assert "7 s" in error.user_message


async def test_wrong_key_is_auth(fake, make_backend):
    error, _ = await failure_of(make_backend(api_key="sk-wrong"))
    assert error.kind == "auth"


async def test_no_first_token_times_out_within_bound(fake, make_backend):
    fake.script(Scenario.hang(30))
    error, elapsed = await failure_of(make_backend(first_token_timeout_s=0.4, timeout_s=10, max_retries=2))
    assert error.kind == "timeout"
    assert elapsed < 3 * 0.4


async def test_http_read_timeout_is_timeout(fake, make_backend):
    fake.script(Scenario.hang(30))
    error, elapsed = await failure_of(make_backend(timeout_s=0.3, first_token_timeout_s=5))
    assert error.kind == "timeout"
    assert elapsed < 3 * 0.3


async def test_stalled_stream_times_out_after_first_text(fake, make_backend):
    fake.script(Scenario.stall(after_chunks=1, seconds=30))
    backend = make_backend(timeout_s=0.4, first_token_timeout_s=5)
    received = []
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        async with backend.stream(MESSAGES) as reply:
            async for delta in reply:
                received.append(delta)
    assert caught.value.kind == "timeout"
    assert received and time.monotonic() - started < 3 * 0.4


async def test_unreachable_server_is_connection():
    backend = OpenAIBackend(KEY, f"http://127.0.0.1:{closed_port()}/v1", "m", connect_timeout_s=0.5, max_retries=0)
    try:
        error, elapsed = await failure_of(backend)
    finally:
        await backend.aclose()
    assert error.kind == "connection"
    assert elapsed < 1.5


async def test_retries_recover_from_a_transient_error(fake, make_backend):
    fake.script(Scenario.server_error(503, retry_after=0.05), Scenario.reply("recovered"))
    assert (await make_backend(max_retries=1).complete(MESSAGES))[0] == "recovered"
    assert fake.chat_calls == 2


@pytest.mark.parametrize("max_retries", [0, 1, 2])
async def test_configured_retries_are_honoured(fake, make_backend, max_retries):
    fake.script(*[Scenario.server_error(500, retry_after=0.05)] * 5)
    error, _ = await failure_of(make_backend(max_retries=max_retries))
    assert error.kind == "server_error"
    assert fake.chat_calls == max_retries + 1


async def test_rate_limit_retried_then_reported_with_retry_after(fake, make_backend):
    fake.script(Scenario.rate_limited(retry_after=0.1), Scenario.rate_limited(retry_after=0.1))
    error, elapsed = await failure_of(make_backend(max_retries=1))
    assert error.kind == "rate_limited"
    assert error.retry_after == pytest.approx(0.1)
    assert fake.chat_calls == 2 and elapsed >= 0.1


async def test_key_never_in_describe_errors_or_logs(fake, make_backend, caplog):
    for name in ("", *LOGGERS):
        caplog.set_level(logging.DEBUG, logger=name)
    backend = make_backend(max_retries=1)
    fake.script(Scenario.reply("fine"), Scenario.server_error(500, retry_after=0.01), Scenario.reply("ok"),
                Scenario.rate_limited(0.01), Scenario.rate_limited(0.01), Scenario.broken(), Scenario.malformed())
    await backend.complete(MESSAGES)
    await backend.complete(MESSAGES)
    errors = [await failure_of(backend) for _ in range(3)]
    errors.append(await failure_of(make_backend(api_key=KEY + "-wrong")))

    assert any(record.name.startswith("openai") for record in caplog.records), "openai debug logs not captured"
    assert any(record.name == "worker.openai_backend" for record in caplog.records)
    for record in caplog.records:
        assert KEY not in record.getMessage(), record.name
    assert KEY not in caplog.text
    for error, _ in errors:
        assert KEY not in str(error) and KEY not in error.user_message
    described = backend.describe()
    assert described == {"base_url_host": f"127.0.0.1:{fake.port}", "model": "fake-model", "configured": True}
    assert KEY not in repr(described) and KEY not in repr(backend)
    assert all(KEY not in str(request.headers) for request in fake.requests)


def test_describe_hides_credentials_in_the_base_url():
    backend = OpenAIBackend(KEY, "https://user:hunter2@llm.example.com:8443/v1", "llama3")
    assert backend.describe() == {"base_url_host": "llm.example.com:8443", "model": "llama3", "configured": True}


async def test_no_key_and_no_base_url_is_not_configured_without_network(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-environment")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")

    def refuse(*args, **kwargs):
        raise AssertionError("network or client use attempted")

    monkeypatch.setattr(openai, "AsyncOpenAI", refuse)
    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)

    backend = OpenAIBackend(api_key=None, base_url=None, model="gpt-4o-mini")
    assert not backend.configured
    assert backend.describe() == {"base_url_host": "api.openai.com", "model": "gpt-4o-mini", "configured": False}
    with pytest.raises(BackendError) as caught:
        async for _ in backend.stream(MESSAGES):
            pass
    assert caught.value.kind == "not_configured"
    with pytest.raises(BackendError):
        await backend.complete(MESSAGES)
    await backend.aclose()
