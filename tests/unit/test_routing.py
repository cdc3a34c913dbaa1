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


def test_calibration_is_monotone_and_round_trips(tmp_path):
    # Raw confidence 0.1..0.9; adequacy mostly rises with it, with one dip that must be pooled away.
    samples = [(0.1, False), (0.15, False), (0.2, True), (0.25, False), (0.5, True), (0.55, True),
               (0.6, False), (0.65, True), (0.8, True), (0.85, True), (0.9, True), (0.95, True)]
    calibration = Calibration.fit(samples, bins=6)
    assert calibration.adequate == sorted(calibration.adequate)
    assert calibration(0.0) == 0.0 and calibration(0.22) == 0.5
    assert calibration(0.52) == calibration(0.62) == 0.75  # 1.0 then 0.5 pooled: 3 of 4 adequate
    assert calibration(0.99) == 1.0
    assert all(0.0 <= calibration(x / 100) <= 1.0 for x in range(101))
    calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(tmp_path / "calibration.json") == calibration
    assert Calibration.load(tmp_path / "missing.json") is None
    assert Calibration([], [])(0.42) == 0.42  # uncalibrated: raw confidence passes through
