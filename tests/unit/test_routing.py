"""The hybrid router's parts: the complexity screen, the calibration map, the adequacy judge and its data."""

import pytest

from pioneer_model.data import normalize_prompt
from pioneer_model.train import default_training_pairs
from worker.calibrate import ADEQUATE, is_adequate, load_rows
from worker.routing import Calibration, looks_complex

ROWS = load_rows()


def simple(topic: str) -> dict:
    return {"kind": "simple", "topic": topic}


def test_eval_set_is_unseen_in_training_and_has_both_splits():
    trained = {normalize_prompt(p.prompt) for p in default_training_pairs()}
    seen = [r["text"] for r in ROWS if normalize_prompt(r["text"]) in trained]
    assert seen == []
    for split in ("calibration", "held_out"):
        kinds = [r["kind"] for r in ROWS if r["split"] == split]
        assert kinds.count("simple") >= 40 and kinds.count("complex") >= 25
    assert {r["topic"] for r in ROWS if r["kind"] == "simple"} == set(ADEQUATE)


def test_complexity_screen_passes_simple_queries_and_stops_complex_ones():
    assert [r["text"] for r in ROWS if r["kind"] == "simple" and looks_complex(r["text"])] == []
    complex_rows = [r for r in ROWS if r["kind"] == "complex"]
    stopped = [r for r in complex_rows if looks_complex(r["text"])]
    assert len(stopped) >= 0.9 * len(complex_rows)
    assert looks_complex("def f(): return 1") == "code"
    assert looks_complex("What is 12 * 7?") == "math"
    assert looks_complex("hi? you there? hello?") == "multi-part"
    assert looks_complex("word " * 20) == "long"


@pytest.mark.parametrize("topic, reply", [
    ("greeting", "Hello! How are you today?"),
    ("greeting", "Good day to you too! How are you?"),
    ("wellbeing", "Very well, thank you. And you?"),
    ("wellbeing", "Okay"),
    ("name", "My name is Pioneer."),
    ("identity", "I am a chat bot called Pioneer."),
    ("creator", "I was built by the Pioneer team and trained on conversations like this one."),
    ("thanks", "Any time!"),
    ("thanks", "You're welcome!"),
    ("bye", "Bye! Come back any time."),
    ("likes", "I like all kinds of music, especially classical and jazz."),
    ("likes", "No, I don't eat."),
    ("joke", "Why did the robot go on holiday? It needed to recharge its batteries!"),
    ("feelings", "I don't feel emotions the way people do, but I do enjoy our chats."),
])
def test_judge_accepts_replies_in_kind(topic, reply):
    assert is_adequate(simple(topic), reply)


@pytest.mark.parametrize("topic, reply", [
    ("greeting", "You're welcome!"),  # "morning!" answered as if thanked
    ("greeting", "No problem at all."),
    ("creator", "I'm Pioneer, a chat bot that runs on a small transformer model."),  # says what, not who
    ("likes", "I was built by the Pioneer team and trained on conversations like this one."),
    ("likes", "I'm quite young: I was trained only recently."),
    ("wellbeing", "My name is Pioneer."),
    ("feelings", "I am a chat bot called Pioneer."),
    ("thanks", "Hello! How are you today?"),
    ("name", ""),
])
def test_judge_rejects_replies_that_miss_the_point(topic, reply):
    assert not is_adequate(simple(topic), reply)


def test_judge_never_calls_a_complex_reply_adequate():
    assert not is_adequate({"kind": "complex", "topic": "complex"}, "Hello! My name is Pioneer.")


def test_calibration_rises_with_confidence_and_matches_the_observed_share(tmp_path):
    # Adequacy rises with raw confidence: 1 in 4 adequate around 0.3, 2 in 4 around 0.6, all 8 around 0.95.
    samples = [(0.3, False), (0.28, False), (0.32, True), (0.31, False),
               (0.6, True), (0.62, False), (0.58, True), (0.61, False)] + [(0.95 + i / 200, True) for i in range(8)]
    calibration = Calibration.fit(samples)
    assert calibration.slope > 0
    scores = [calibration(x / 100) for x in range(1, 101)]
    assert scores == sorted(scores) and all(0.0 < s < 1.0 for s in scores)
    # Logistic regression matches the observed total: predicted shares sum to the number of adequate replies.
    assert sum(calibration(raw) for raw, _ in samples) == pytest.approx(sum(ok for _, ok in samples), abs=0.05)
    assert calibration(0.3) < 0.4 < calibration(0.6) < 0.8 < calibration(0.96)
    assert calibration.raw_for(calibration(0.7)) == pytest.approx(0.7)
    assert calibration(0.0) < 0.01  # an empty reply: raw confidence 0
    calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(tmp_path / "calibration.json") == calibration
    assert Calibration.load(tmp_path / "missing.json") is None
    (tmp_path / "old.json").write_text('{"edges": [0.0, 0.5], "adequate": [0.2, 0.9]}')
    assert Calibration.load(tmp_path / "old.json") is None  # an older format is fitted again, not misread


def test_calibration_refuses_data_it_cannot_fit():
    with pytest.raises(ValueError, match="both"):
        Calibration.fit([(0.9, True), (0.5, True)])
    with pytest.raises(ValueError, match="does not rise"):
        Calibration.fit([(0.9, False), (0.8, False), (0.3, True), (0.2, True)])


def test_reliability_table_and_routing_figures():
    from worker.calibrate import routing, table

    results = [{"kind": "simple", "skipped": None, "raw": raw, "adequate": ok}
               for raw, ok in [(0.3, False), (0.35, False), (0.6, True), (0.62, False), (0.97, True), (0.98, True)]]
    results.append({"kind": "complex", "skipped": "code"})
    calibration = Calibration.fit([(r["raw"], r["adequate"]) for r in results if r["skipped"] is None])
    rows = table(results, calibration)
    assert sum(r["queries"] for r in rows) == 6 and sum(r["adequate"] for r in rows) == 3
    assert [r["raw_from"] for r in rows] == sorted(r["raw_from"] for r in rows)
    top = rows[-1]
    assert top["queries"] == 2 and top["observed"] == 1.0 and top["raw_from"] <= 0.97
    figures = routing(results, calibration, 0.8)
    assert figures["simple"] == {"queries": 6, "answered_locally": 2, "share_local": 0.333, "adequate_when_local": 1.0}
    assert figures["complex"]["answered_locally"] == 0


def test_a_threshold_no_reply_can_reach_is_pointed_out(caplog):
    from bots.core import describe_threshold
    from worker.orchestrator import Orchestrator

    calibration = Calibration(slope=2.0, intercept=2.9)  # at best sigmoid(2.9) = 0.948
    reachable = Orchestrator(lambda: None, None, mode="hybrid", threshold=0.9, calibration=calibration)
    assert "HYBRID_MODE_THRESHOLD" not in caplog.text
    assert describe_threshold(reachable.info()) == "0.9 (local replies score at most 0.95)"
    beyond = Orchestrator(lambda: None, None, mode="hybrid", threshold=0.97, calibration=calibration)
    assert "HYBRID_MODE_THRESHOLD 0.97 is above the highest confidence the calibrated model gives (0.95)" in caplog.text
    assert describe_threshold(beyond.info()).startswith("0.97, above the highest confidence a local reply gets (0.95)")
    assert describe_threshold({}) == "unknown"
