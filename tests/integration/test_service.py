"""The service core end to end: embedded mode in one process, and real `pioneer worker` processes on Redis."""

import pytest
import redis

from bots.app import build_service
from bots.core import GUESS_NOT_CONFIGURED, GUESS_UNAVAILABLE, Incoming
from bots.memory import Place
from tests.fakes.openai_server import FakeOpenAI, Scenario
from tests.helpers import RecordingSink, make_settings, start_worker, stop, wait_for_workers
PLACE = Place("console", "", "terminal", "")


async def ask(service, text, user="u1", place=PLACE):
    sink = RecordingSink()
    outcome = await service.core.answer(Incoming(place, user, text), sink, limit=2000, min_interval_s=0.01)
    return outcome, sink


async def test_embedded_local_reply_streams_and_is_stored(tmp_path, tiny_model_dir):
    service = await build_service(make_settings(tmp_path, tiny_model_dir))
    try:
        outcome, sink = await ask(service, "hello there")
        assert outcome.status == "answered" and outcome.method == "local"
        assert 0.0 <= outcome.confidence <= 1.0
        assert sink.messages[-1] == outcome.text and outcome.text
        history = await service.memory.history(PLACE, "u1")
        assert [(m.role, m.method) for m in history] == [("user", None), ("assistant", "local")]
        assert history[1].content == outcome.text
        usage = await service.memory.usage_of("console", "u1")
        assert [(u["method"], u["completion_tokens"] > 0) for u in usage] == [("local", True)]
        again, _ = await ask(service, "hello there", user="u2")
        assert again.text == outcome.text  # greedy and cached: the same prompt gives the same reply
        info = await service.core.info_dict()
        assert info["mode"] == "local" and "hit rate" in info["cache"]
    finally:
        await service.close()


async def test_hybrid_uses_openai_when_local_is_unsure_and_falls_back_when_it_fails(tmp_path, tiny_model_dir):
    async with FakeOpenAI() as fake:
        settings = make_settings(tmp_path, tiny_model_dir, attention_mode="hybrid", hybrid_mode_threshold=1.0,
                                 openai_base_url=fake.base_url, openai_api_key="sk-test-secret-value")
        service = await build_service(settings)
        try:
            fake.script(Scenario.reply("Hello from the API, friend.", chunks=4))
            outcome, sink = await ask(service, "hello there")
            assert (outcome.method, outcome.text) == ("openai", "Hello from the API, friend.")
            fake.script(Scenario.server_error(500), Scenario.server_error(503))  # first try and its retry
            outcome, sink = await ask(service, "how are you?")
            assert outcome.status == "answered" and outcome.method == "local"
            # The user is told the reply is the small model's guess; memory keeps the reply alone.
            assert sink.messages[-1] == outcome.text + "\n\n_(" + GUESS_UNAVAILABLE + ")_"
            history = await service.memory.history(PLACE, "u1")
            assert [m.method for m in history if m.role == "assistant"] == ["openai", "local"]
            assert history[-1].content == outcome.text
        finally:
            await service.close()


async def test_hybrid_without_openai_answers_locally_and_says_when_it_guesses(tmp_path, tiny_model_dir):
    service = await build_service(make_settings(tmp_path, tiny_model_dir, attention_mode="hybrid",
                                                hybrid_mode_threshold=1.0))
    try:
        outcome, sink = await ask(service, "hello there")
        assert outcome.status == "answered" and outcome.method == "local"
        assert sink.messages[-1] == outcome.text + "\n\n_(" + GUESS_NOT_CONFIGURED + ")_"
    finally:
        await service.close()
    confident = await build_service(make_settings(tmp_path / "confident", tiny_model_dir, attention_mode="hybrid",
                                                  hybrid_mode_threshold=0.0))
    try:
        outcome, sink = await ask(confident, "hello there")
        assert outcome.method == "local" and sink.messages[-1] == outcome.text  # confident: no note
    finally:
        await confident.close()


async def test_openai_mode_without_a_key_says_so_and_loses_nothing(tmp_path, tiny_model_dir):
    service = await build_service(make_settings(tmp_path, tiny_model_dir, attention_mode="openai"))
    try:
        outcome, sink = await ask(service, "hello")
        assert outcome.status == "failed" and "not configured" in outcome.text
        assert sink.messages[-1] == outcome.text
        history = await service.memory.history(PLACE, "u1")
        assert [m.content for m in history] == ["hello"]  # the user's message is kept
    finally:
        await service.close()


@pytest.mark.parametrize("text, expected", [
    ("", "didn't get any text"),
    ("   \n\t ", "didn't get any text"),
    ("\x00\x01\x02", "didn't get any text"),
    ("x" * 5000, "too long"),
])
async def test_bad_input_gets_a_clear_message_and_nothing_stored(tmp_path, tiny_model_dir, text, expected):
    service = await build_service(make_settings(tmp_path, tiny_model_dir, max_input_chars=4000))
    try:
        outcome, sink = await ask(service, text)
        assert outcome.status == "refused" and expected in sink.messages[-1]
        assert await service.memory.history(PLACE, "u1") == []
    finally:
        await service.close()


async def test_invalid_mode_and_admin_checks(tmp_path, tiny_model_dir):
    service = await build_service(make_settings(tmp_path, tiny_model_dir, admin_user_ids=["boss"]))
    try:
        assert "only admins" in await service.core.set_mode("someone", "openai")
        assert "Unknown mode" in await service.core.set_mode("boss", "turbo")
        assert await service.core.set_mode("boss", "hybrid") == "Mode set to hybrid."
        assert "admins only" in await service.core.info("someone")
        assert "mode: hybrid" in await service.core.info("boss")
    finally:
        await service.close()


async def test_memory_is_trimmed_and_kept_per_user(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path, tiny_model_dir, history_token_budget=60)
    service = await build_service(settings)
    try:
        seen = []
        original_submit = service.dispatcher.submit

        async def spy(payload):
            seen.append(payload)
            await original_submit(payload)

        service.dispatcher.submit = spy
        for i in range(6):
            await ask(service, f"message number {i} from alice", user="alice")
        await ask(service, "bob's secret is pineapple", user="bob")
        last = seen[-2]["messages"]
        assert last[0]["role"] == "system" and last[-1]["content"] == "message number 5 from alice"
        assert sum(service.core.count_tokens(m["content"]) + 4 for m in last) <= 60
        assert len(last) < 12  # older pairs were dropped
        assert all("pineapple" not in m["content"] for p in seen[:-1] for m in p["messages"])
        assert [m["role"] for m in seen[-1]["messages"]] == ["system", "user"]
        assert "forgotten" in await service.core.forget("console", "alice")
        assert await service.memory.history(PLACE, "alice") == []
        assert len(await service.memory.history(PLACE, "bob")) == 2
    finally:
        await service.close()


# ---- Real worker processes on Redis -------------------------------------------------------------------------

async def test_real_workers_answer_every_mode_and_share_the_cache(tmp_path, tiny_model_dir, redis_url, postgres_url,
                                                                  worker_env):
    workers = [start_worker(worker_env, f"w{i}@test") for i in range(2)]
    try:
        wait_for_workers(redis_url, 2)
        settings = make_settings(tmp_path, tiny_model_dir, redis_url=redis_url, database_url=postgres_url)
        service = await build_service(settings)
        try:
            local, sink = await ask(service, "good morning")
            assert local.status == "answered" and local.method == "local"
            assert len(sink.calls) >= 2  # posted, then edited as chunks arrived

            # The same prompt again, answered by whichever worker: the Redis cache makes it a hit.
            cache = redis.Redis.from_url(redis_url)
            hits_before = int(cache.hget("pioneer:cache:default:stats", "hits") or 0)
            texts = []
            for i in range(4):  # new users: the same prompt (a user's own history would change it)
                again, _ = await ask(service, "good morning", user=f"u-cache-{i}")
                texts.append(again.text)
            # The reply is cached once it has been streamed, so at least the last three are hits, whichever
            # worker took them, and they are the cached text.
            assert int(cache.hget("pioneer:cache:default:stats", "hits") or 0) >= hits_before + 3
            assert texts[1] == texts[2] == texts[3]

            service.core.mode = "openai"  # workers have no OpenAI settings: a clear message, nothing lost
            failed, _ = await ask(service, "hello")
            assert failed.status == "failed" and "not configured" in failed.text
            info = await service.core.info_dict()
            assert info["workers online"] == 2 and info["model"] == "tiny"
            stored = await service.memory.history(PLACE, "u1")
            assert [m.role for m in stored] == ["user", "assistant", "user"]

            # Two more front-ends on the same Redis share each user's rate limit (2 a minute here).
            limited = [await build_service(make_settings(tmp_path, tiny_model_dir, redis_url=redis_url,
                                                         database_url=postgres_url, rate_limit_per_minute=2))
                       for _ in range(2)]
            try:
                outcomes = [(await ask(limited[n % 2], f"message {n}", user="u-limited"))[0] for n in range(3)]
                assert [o.status for o in outcomes] == ["answered", "answered", "refused"]
                assert "faster than I can answer" in outcomes[2].text
            finally:
                for front_end in limited:
                    await front_end.close()
        finally:
            await service.close()
    finally:
        logs = [stop(w) for w in workers]
    assert all("Traceback" not in log for log in logs), logs
