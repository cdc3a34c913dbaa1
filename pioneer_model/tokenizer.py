"""Byte-level BPE tokenizer with a chat format and a streaming-safe decoder."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT]  # ids 0..6 in a trained tokenizer
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

# Fallbacks for tokenizers trained elsewhere (GPT-2 has only <|endoftext|>).
PAD_CANDIDATES = [PAD, "<|pad|>", "[PAD]"]
BOS_CANDIDATES = [BOS, "<s>", "<|startoftext|>", "[CLS]", "<|endoftext|>"]
EOS_CANDIDATES = [EOS, "</s>", "<|endoftext|>", "<|im_end|>", "[SEP]"]


@lru_cache(maxsize=1)
def byte_level_char_to_byte() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 byte values, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    """Thin wrapper over a `tokenizers` tokenizer: special ids, chat format, token counting."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        self.pad_id = self._first_id(PAD_CANDIDATES)
        self.bos_id = self._first_id(BOS_CANDIDATES)
        self.eos_id = self._first_id(EOS_CANDIDATES)
        if self.eos_id is None:
            raise ValueError("tokenizer has no end-of-sequence token (tried " + ", ".join(EOS_CANDIDATES) + ")")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        if self.bos_id is None:
            self.bos_id = self.eos_id
        self.role_ids = {role: backend.token_to_id(tok) for role, tok in ROLE_TOKENS.items()}
        self.has_chat_tokens = all(i is not None for i in self.role_ids.values())
        self.is_byte_level = (json.loads(backend.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
        self.added_tokens = backend.get_added_tokens_decoder()
        self.special_ids = {i for i, token in self.added_tokens.items() if token.special}
        contents = sorted((t.content for t in self.added_tokens.values()), key=len, reverse=True)
        self.added_pattern = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        backend.encode_special_tokens = True  # text is text: a user typing "<eos>" gets no control token

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> "Tokenizer":
        backend = HFTokenizer(models.BPE(unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path) -> None:
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _first_id(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            token_id = self.backend.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text to ids. Special-token strings typed by a user stay plain text unless allow_special."""
        if not allow_special or self.added_pattern is None:
            return self.backend.encode(text, add_special_tokens=False).ids
        ids = []
        for i, piece in enumerate(self.added_pattern.split(text)):
            if i % 2:
                ids.append(self.backend.token_to_id(piece))
            elif piece:
                ids.extend(self.backend.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode_chat(self, messages, add_generation_prompt: bool = True, return_mask: bool = False):
        """Messages ([(role, text)] or [{"role", "content"}]) to ids; with return_mask also a per-token
        flag that is True on the assistant's reply tokens and the <eos> that closes each reply."""
        ids: list[int] = []
        mask: list[bool] = []

        def add(token_ids, trained=False):
            ids.extend(token_ids)
            mask.extend([trained] * len(token_ids))

        turns = [normalize_message(m) for m in messages]
        if self.has_chat_tokens:
            add([self.bos_id])
            for role, text in turns:
                add([self.role_ids[role]])
                add(self.encode(text), trained=role == "assistant")
                add([self.eos_id], trained=role == "assistant")
            if add_generation_prompt:
                add([self.role_ids["assistant"]])
        else:  # plain-text template for tokenizers without role tokens
            for role, text in turns:
                name = PLAIN_ROLE_NAMES[role]
                if role == "assistant":
                    add(self.encode(f"{name}:"))
                    add(self.encode(" " + text), trained=True)
                    add([self.eos_id], trained=True)
                    add(self.encode("\n"))
                else:
                    add(self.encode(f"{name}: {text}\n"))
            if add_generation_prompt:
                add(self.encode(PLAIN_ROLE_NAMES["assistant"] + ":"))
        return (ids, mask) if return_mask else ids

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """Raw bytes of one token (byte-level tokenizers only)."""
        added = self.added_tokens.get(token_id)
        if added is not None:
            return b"" if added.special and skip_special_tokens else added.content.encode()
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        char_to_byte = byte_level_char_to_byte()
        return bytes(char_to_byte[c] for c in token)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def normalize_message(message) -> tuple[str, str]:
    if isinstance(message, dict):
        role, text = message.get("role"), message.get("content")
    else:
        role, text = message
    if role not in ROLE_TOKENS:
        raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
    if not isinstance(text, str):
        raise TypeError(f"chat message content must be a string, got {type(text).__name__}")
    return role, text


class StreamDecoder:
    """Turns ids fed one at a time into text, emitting only complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending = b""  # byte-level: bytes of an unfinished character
        self.ids: list[int] = []  # other tokenizers: all ids so far, decoded whole; the new suffix is emitted
        self.emitted = ""

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly "")."""
        if self.tokenizer.is_byte_level:
            self.pending += self.tokenizer.token_bytes(token_id, self.skip_special_tokens)
            cut = complete_utf8_prefix_length(self.pending)
            text, self.pending = self.pending[:cut].decode("utf-8", errors="replace"), self.pending[cut:]
            return text
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        if text.endswith("\ufffd") or len(text) <= len(self.emitted):
            return ""
        new_text = text[len(self.emitted):]
        self.emitted = text
        return new_text

    def flush(self) -> str:
        """Text still held back at the end of a stream (broken bytes become U+FFFD)."""
        if self.tokenizer.is_byte_level:
            text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
            return text
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        new_text = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.ids, self.emitted = [], ""
        return new_text


def complete_utf8_prefix_length(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0b1100_0000 == 0b1000_0000:  # continuation byte: keep looking for the lead byte
            continue
        needed = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1  # from the lead byte
        return len(data) if back >= needed else len(data) - back
    return len(data)
