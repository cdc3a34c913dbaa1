"""Corpus loading, error messages, held-out split, and chat-formatted training examples with loss masks."""

import pytest

from pioneer_model.data import (IGNORE_INDEX, ChatDataset, CorpusError, Pair, augment_pairs, collate, deduplicate,
                                load_chatterbot_pairs, load_jsonl_pairs, load_pairs, load_yaml_pairs,
                                prompt_variants, small_talk_pairs, split_held_out)
from pioneer_model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chatterbot():
    return load_chatterbot_pairs()


@pytest.fixture(scope="module")
def tok(chatterbot):
    return Tokenizer.train((t for p in chatterbot[:500] for t in (p.prompt, p.reply)), vocab_size=1000)


def test_chatterbot_pairs(chatterbot):
    assert len(chatterbot) > 2000
    assert all(isinstance(p.prompt, str) and isinstance(p.reply, str) for p in chatterbot)
    assert any(p.prompt == "Tell me a joke" for p in chatterbot)
    assert len(deduplicate(chatterbot)) > 1000


def test_multi_turn_conversation_keeps_history(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("conversations:\n- - a\n  - b\n  - c\n  - d\n- - x\n  - y\n")
    pairs = load_yaml_pairs(path)
    assert [(p.history, p.prompt, p.reply) for p in pairs] == [
        ([], "a", "b"), (["a"], "b", "c"), (["a", "b"], "c", "d"), ([], "x", "y")]
    assert pairs[2].messages() == [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    assert pairs[2].messages(max_history_turns=1) == [("assistant", "b"), ("user", "c"), ("assistant", "d")]
    assert pairs[2].messages(max_history_turns=0) == [("user", "c"), ("assistant", "d")]


def test_jsonl_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "hi", "reply": "hello"}\n\n{"prompt": "and?", "reply": "so", "history": ["x", "y"]}\n')
    assert load_jsonl_pairs(path) == [Pair("hi", "hello"), Pair("and?", "so", ["x", "y"])]
    assert load_pairs(path) == load_jsonl_pairs(path)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "reply": ', "invalid JSON"),
    ('{"prompt": "hi"}', "missing key(s) 'reply'"),
    ('{"prompt": "hi", "reply": 3}', "'reply' must be a string"),
    ('{"prompt": "hi", "reply": "yo", "history": "x"}', "'history' must be a list of strings"),
    ('["hi", "yo"]', "expected an object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "reply": "fine"}\n' + line + "\n")
    with pytest.raises(CorpusError) as error:
        load_jsonl_pairs(path)
    assert f"{path}:2:" in str(error.value)
    assert message in str(error.value)


def test_empty_corpus_errors(tmp_path):
    for name, text in [("empty.jsonl", "\n\n"), ("empty.yml", ""), ("empty2.yml", "conversations: []\n")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(CorpusError, match="empty corpus"):
            load_pairs(path)
    (tmp_path / "no_corpus").mkdir()
    with pytest.raises(CorpusError, match="no conversation pairs"):
        load_pairs(tmp_path / "no_corpus")


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("conversations:\n- - hi\n  - hello\n- - ok\n  - [nested, list]\n")
    with pytest.raises(CorpusError, match=f"{path}:5: a message must be text"):
        load_yaml_pairs(path)
    path.write_text("conversations:\n- - hi\n  - 'unclosed\n")
    with pytest.raises(CorpusError, match=f"{path}:\\d+: invalid YAML"):
        load_yaml_pairs(path)
    path.write_text("- prompt: hi\n  reply: hello\n- prompt: yo\n")
    with pytest.raises(CorpusError, match=f"{path}:3: missing key"):
        load_yaml_pairs(path)
    path.write_text("- prompt: hi\n  reply: hello\n")
    assert load_yaml_pairs(path) == [Pair("hi", "hello")]


def test_split_is_deterministic_and_keeps_prompts_apart(chatterbot):
    train, held = split_held_out(chatterbot, 0.1, seed=0)
    assert (train, held) == split_held_out(chatterbot, 0.1, seed=0)
    assert split_held_out(chatterbot, 0.1, seed=1)[1] != held
    assert len(train) + len(held) == len(chatterbot)
    assert 0.08 * len(chatterbot) < len(held) < 0.12 * len(chatterbot)
    assert not {p.prompt.lower() for p in train} & {p.prompt.lower() for p in held}
    assert split_held_out(chatterbot, 0.0) == (chatterbot, [])


def test_prompt_variants_and_augmentation():
    assert prompt_variants("Tell me a joke") == ["Tell me a joke", "Tell me a joke!", "tell me a joke",
                                                 "tell me a joke!"]
    assert "how are you?" in prompt_variants("How are you?")
    pairs = [Pair("How are you?", "Fine.")]
    augmented = augment_pairs(pairs, variants_per_pair=2)
    assert augmented[0] == pairs[0] and len(augmented) == 3
    assert all(p.reply == "Fine." for p in augmented)


def test_small_talk_pairs():
    pairs = small_talk_pairs()
    assert len(pairs) > 50
    assert any("Pioneer" in p.reply for p in pairs)


def test_loss_mask_covers_only_the_reply(tok):
    pair = Pair("How are you?", "I am fine.", history=["Hello", "Hi"])
    example = ChatDataset([pair], tok, max_length=64)[0]
    ids, targets = example["input_ids"], example["targets"]
    assert len(ids) == len(targets)
    trained = [t for t in targets if t != IGNORE_INDEX]
    assert trained == tok.encode("I am fine.") + [tok.eos_id]
    full = tok.encode_chat(pair.messages(), add_generation_prompt=False)
    assert ids == full[:-1] and targets[-1] == tok.eos_id
    # The first trained target is predicted from the <|assistant|> token.
    first = next(i for i, t in enumerate(targets) if t != IGNORE_INDEX)
    assert ids[first] == tok.token_to_id("<|assistant|>")


def test_truncation_keeps_the_end(tok):
    pair = Pair("word " * 100, "short reply")
    example = ChatDataset([pair], tok, max_length=16)[0]
    assert len(example["input_ids"]) == 16
    assert [t for t in example["targets"] if t != IGNORE_INDEX] == tok.encode("short reply") + [tok.eos_id]


def test_collate_pads(tok):
    data = ChatDataset([Pair("hi", "hello"), Pair("how are you today?", "fine, thanks a lot")], tok)
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].shape == batch["targets"].shape
    short = len(data[0]["input_ids"])
    assert (batch["input_ids"][0, short:] == tok.pad_id).all()
    assert (batch["targets"][0, short:] == IGNORE_INDEX).all()


def test_encoder_decoder_examples(tok):
    data = ChatDataset([Pair("hi", "hello"), Pair("how are you today?", "fine")], tok, encoder_decoder=True)
    example = data[0]
    assert example["decoder_input_ids"][0] == tok.bos_id
    assert example["targets"] == tok.encode("hello") + [tok.eos_id]
    assert example["src_ids"][-1] == tok.token_to_id("<|assistant|>")
    batch = collate([data[0], data[1]], tok.pad_id)
    assert batch["src_padding_mask"].dtype.is_floating_point is False
    assert batch["src_padding_mask"].sum(1).tolist() == [len(data[0]["src_ids"]), len(data[1]["src_ids"])]
    assert batch["decoder_input_ids"].shape == batch["targets"].shape
