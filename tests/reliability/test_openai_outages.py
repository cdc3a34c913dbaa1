"""OpenAI failing in every way it does: hybrid mode answers with the local model instead, within a bound."""

import time

import pytest

from bots.app import build_service
from bots.core import GUESS_UNAVAILABLE, Incoming
from bots.memory import Place
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.helpers import RecordingSink, make_settings

TIMEOUT_S = 2.0  # OPENAI_TIMEOUT_S: the longest wait for a first token, and the longest silence after it
BOUND_S = TIMEOUT_S + 3.0  # the whole reply, fallback included, on a busy 2-core machine
PLACE = Place("discord", "G1", "C1", "")
OPENAI_TEXT = "Words from the API that a failure cuts short before they are all sent."


@pytest.fixture
async def hybrid(tmp_path, tiny_model_dir):
    """The embedded service in hybrid mode, preferring OpenAI always (threshold 1.0), and the fake OpenAI."""
    async with FakeOpenAI(default=Scenario.reply(OPENAI_TEXT)) as openai:
        settings = make_settings(tmp_path, tiny_model_dir, attention_mode="hybrid", hybrid_mode_threshold=1.0,
                                 openai_base_url=openai.base_url, openai_api_key="sk-test", openai_max_retries=1,
                                 openai_timeout_s=TIMEOUT_S)
        service = await build_service(settings)
        try:
            yield service, openai
        finally:
            await service.close()


async def ask(service, user: str, text: str = "hello there"):
    sink = RecordingSink()
    started = time.monotonic()
    outcome = await service.core.answer(Incoming(PLACE, user, text), sink, 2000, min_interval_s=0.05)
    return outcome, sink, time.monotonic() - started


@pytest.mark.parametrize("name, failure", [
    ("no response at all", [Scenario.hang(60)]),
    ("429 with Retry-After: 30", [Scenario.rate_limited(retry_after=30)]),
    ("429 twice", [Scenario.rate_limited(retry_after=0.1)] * 2),
    ("500 then 503", [Scenario.server_error(500), Scenario.server_error(503)]),
    ("stream broken before any text", [Scenario.broken(after_chunks=0)]),
    ("stream broken mid-reply", [Scenario.broken(after_chunks=2)]),
    ("stream stalled mid-reply", [Scenario.stall(after_chunks=2, seconds=60)]),
    ("error event mid-reply", [Scenario.error_event(after_chunks=2)]),
    ("malformed stream", [Scenario.malformed()]),
])
async def test_hybrid_falls_back_to_the_local_model_within_the_bound(hybrid, name, failure):
    service, openai = hybrid
    service.core.mode = "local"
    local, _, _ = await ask(service, "reference")  # what the local model says to the same prompt
    service.core.mode = "hybrid"

    openai.script(*failure)
    outcome, sink, elapsed = await ask(service, "user")

    print(f"\nMETRICS openai {name}: local fallback after {elapsed:.2f} s")
    assert outcome.status == "answered" and outcome.method == "local" and outcome.text == local.text
    assert elapsed < BOUND_S
    # API text gone; the local reply is marked as a guess (memory keeps the reply alone)
    assert [kind for kind, *_ in sink.calls].count("post") == 1
    assert sink.messages == [local.text + "\n\n_(" + GUESS_UNAVAILABLE + ")_"]
    history = await service.memory.history(PLACE, "user")
    assert [(m.role, m.method) for m in history] == [("user", None), ("assistant", "local")]
    assert history[-1].content == local.text
    assert not openai.scenarios  # the failure was met as scripted (first try and any retry)


async def test_openai_answers_when_it_works(hybrid):
    service, openai = hybrid
    outcome, sink, _ = await ask(service, "user")
    assert (outcome.method, outcome.text, sink.messages) == ("openai", OPENAI_TEXT, [OPENAI_TEXT])
