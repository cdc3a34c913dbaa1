"""Tokenizer: byte-level round trips, special tokens, chat format, streaming decode."""

import pytest

from pioneer_model.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer

CORPUS = [
    "Hello, how are you today?",
    "I am fine, thank you! And you?",
    "Tell me a joke about computers.",
    "Why did the computer go to the doctor? It had a virus.",
    "naïve café, über cool — 日本語 and emoji 🙂",
] * 20

SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\nlines\r\n\n",
    "héllo wörld, ça va? 日本語のテキスト",
    "emoji 🙂👍🏽🇫🇷 and zwj 👩‍💻",
    "<eos> typed by a user <|assistant|>",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    """A byte-level BPE whose only special token is GPT-2's <|endoftext|>, saved and loaded as a user's file."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    backend.save(str(path))
    return Tokenizer.from_file(path)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 300
    assert tok.has_chat_tokens


def test_typed_special_strings_stay_text(tok):
    ids = tok.encode("<eos>")
    assert tok.eos_id not in ids
    assert tok.encode("<eos>", allow_special=True) == [tok.eos_id]
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id], skip_special_tokens=False) == "<bos>hi<eos>"


def test_count_tokens(tok):
    assert tok.count_tokens("Hello, how are you today?") == len(tok.encode("Hello, how are you today?"))
    assert tok.count_tokens("") == 0


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.encode(SAMPLES[3]) == tok.encode(SAMPLES[3])
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 2, 300)


def test_chat_format(tok):
    messages = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]
    ids = tok.encode_chat(messages)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<bos><|system|>Be brief.<eos><|user|>Hi<eos><|assistant|>Hello!<eos><|user|>Bye<eos><|assistant|>"
    )
    as_dicts = [{"role": r, "content": c} for r, c in messages]
    assert tok.encode_chat(as_dicts) == ids
    assert tok.encode_chat(messages, add_generation_prompt=False) == ids[:-1]


def test_chat_mask_covers_reply_and_its_eos(tok):
    ids, mask = tok.encode_chat([("user", "Hi"), ("assistant", "Hello there!")], add_generation_prompt=False,
                                return_mask=True)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("Hello there!") + [tok.eos_id]


def test_chat_rejects_unknown_role(tok):
    with pytest.raises(ValueError, match="role"):
        tok.encode_chat([("robot", "hi")])


def test_gpt2_style_tokenizer_uses_plain_template(gpt2_style):
    eot = gpt2_style.token_to_id("<|endoftext|>")
    assert gpt2_style.eos_id == gpt2_style.pad_id == gpt2_style.bos_id == eot
    assert not gpt2_style.has_chat_tokens
    ids, mask = gpt2_style.encode_chat([("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
                                       return_mask=True)
    assert gpt2_style.decode(ids, skip_special_tokens=False) == (
        "User: Hi\nAssistant: Hello!<|endoftext|>\nUser: Bye\nAssistant:"
    )
    assert gpt2_style.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == " Hello!<|endoftext|>"


def stream(tok, ids, **kwargs):
    decoder = StreamDecoder(tok, **kwargs)
    chunks = [decoder.add(i) for i in ids]
    return chunks, decoder.flush()


def test_stream_decoder_never_splits_characters(tok):
    text = "日本語 🙂👍🏽 café"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # several multi-byte characters are spread over byte tokens
    chunks, rest = stream(tok, ids)
    assert "".join(chunks) + rest == text
    assert rest == ""
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks  # some ids completed no character and were held back


def test_stream_decoder_specials_and_flush(tok):
    ids = [tok.bos_id, *tok.encode("hi 🙂"), tok.eos_id]
    assert "".join(stream(tok, ids)[0]) == "hi 🙂"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "<bos>hi 🙂<eos>"
    emoji = tok.encode("🙂")
    chunks, rest = stream(tok, emoji[:-1])  # stream cut off mid-character
    assert "".join(chunks) == "" and rest == "\ufffd" * len(rest) and rest


def test_stream_decoder_on_gpt2_style(gpt2_style):
    text = "naïve 🙂 ok"
    chunks, rest = stream(gpt2_style, gpt2_style.encode(text))
    assert "".join(chunks) + rest == text


def test_stream_decoder_non_byte_level(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200,
                                                                   special_tokens=["[UNK]", "[PAD]", "[SEP]"]))
    tok = Tokenizer(backend)
    assert tok.eos_id == backend.token_to_id("[SEP]") and not tok.is_byte_level
    text = "tell me a joke about computers"
    chunks, rest = stream(tok, tok.encode(text))
    assert "".join(chunks) + rest == tok.decode(tok.encode(text))
