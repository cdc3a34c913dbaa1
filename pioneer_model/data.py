"""Conversation pairs from the ChatterBot corpus, JSONL or YAML files, and a dataset of chat-formatted tokens."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

IGNORE_INDEX = -100  # targets with this value carry no loss (torch's cross_entropy default)


class CorpusError(ValueError):
    """A corpus file that cannot be used; the message names the file and, where known, the line."""


@dataclass
class Pair:
    """One exchange: the user's prompt, the reply to learn, and the earlier turns (oldest first)."""

    prompt: str
    reply: str
    history: list[str] = field(default_factory=list)

    def messages(self, max_history_turns: int | None = None) -> list[tuple[str, str]]:
        """Chat messages ending with the reply; history turns alternate roles backwards from the prompt."""
        keep = len(self.history) if max_history_turns is None else min(max_history_turns, len(self.history))
        history = self.history[len(self.history) - keep:]
        roles = ["assistant" if (len(history) - i) % 2 else "user" for i in range(len(history))]
        return list(zip(roles, history)) + [("user", self.prompt), ("assistant", self.reply)]


def chatterbot_corpus_dir(language: str = "english") -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data" / language


def load_chatterbot_pairs(language: str = "english") -> list[Pair]:
    """Every consecutive (a -> b) exchange of every conversation in the ChatterBot corpus for `language`."""
    directory = chatterbot_corpus_dir(language)
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise CorpusError(f"{directory}: no ChatterBot corpus files for language {language!r}")
    # strict=False: the corpus itself has a few malformed entries (e.g. a question outside its list in trivia.yml)
    return [pair for path in files for pair in load_yaml_pairs(path, strict=False)]


def conversation_pairs(turns: list[str]) -> list[Pair]:
    return [Pair(prompt=turns[i], reply=turns[i + 1], history=list(turns[:i])) for i in range(len(turns) - 1)]


def load_pairs(path) -> list[Pair]:
    """Pairs from a .jsonl, .yml/.yaml file, or every such file in a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".yml", ".yaml"))
        pairs = [pair for p in files for pair in load_pairs(p)]
        if not pairs:
            raise CorpusError(f"{path}: no conversation pairs found in any .jsonl/.yml/.yaml file")
        return pairs
    if path.suffix in (".yml", ".yaml"):
        return load_yaml_pairs(path)
    return load_jsonl_pairs(path)


def load_jsonl_pairs(path) -> list[Pair]:
    """One JSON object per line: {"prompt": str, "reply": str, "history": [str, ...] (optional)}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read: {exc}") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        pairs.append(pair_from_record(record, f"{path}:{number}"))
    if not pairs:
        raise CorpusError(f"{path}: empty corpus, no conversation pairs found")
    return pairs


def pair_from_record(record, where: str) -> Pair:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with \"prompt\" and \"reply\", got {type(record).__name__}")
    missing = [key for key in ("prompt", "reply") if key not in record]
    if missing:
        raise CorpusError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
    for key in ("prompt", "reply"):
        if not isinstance(record[key], str):
            raise CorpusError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    history = record.get("history", [])
    if not isinstance(history, list) or not all(isinstance(turn, str) for turn in history):
        raise CorpusError(f"{where}: 'history' must be a list of strings")
    return Pair(prompt=record["prompt"], reply=record["reply"], history=list(history))


def load_yaml_pairs(path, strict: bool = True) -> list[Pair]:
    """ChatterBot YAML ({"conversations": [[a, b, ...], ...]}) or a list of {"prompt", "reply"} records.
    With strict=False, conversations that are not lists of texts are skipped instead of raising."""
    path = Path(path)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise CorpusError(f"{path}{line}: invalid YAML: {exc.problem or exc.context}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CorpusError(f"{path}: cannot read: {exc}") from None

    def where(node) -> str:
        return f"{path}:{node.start_mark.line + 1}"

    constructor = yaml.SafeLoader("")

    def to_python(node):
        return constructor.construct_document(node)

    pairs = []
    if isinstance(root, yaml.MappingNode):
        conversations = next((v for k, v in root.value if k.value == "conversations"), None)
        if not isinstance(conversations, yaml.SequenceNode):
            raise CorpusError(f"{where(root)}: expected a \"conversations\" list of conversations")
        for conversation in conversations.value:
            problem = conversation_problem(conversation)
            if problem and strict:
                raise CorpusError(f"{where(problem[0])}: {problem[1]}")
            if not problem:
                pairs.extend(conversation_pairs([str(to_python(turn)) for turn in conversation.value]))
    elif isinstance(root, yaml.SequenceNode):
        pairs = [pair_from_record(to_python(node), where(node)) for node in root.value]
    elif root is not None:
        raise CorpusError(f"{where(root)}: expected a \"conversations\" mapping or a list of prompt/reply records")
    if not pairs:
        raise CorpusError(f"{path}: empty corpus, no conversation pairs found")
    return pairs


def conversation_problem(node) -> tuple[yaml.Node, str] | None:
    """(offending node, what is wrong) for a conversation that is not a list of two or more texts."""
    if not isinstance(node, yaml.SequenceNode):
        return node, "a conversation must be a list of messages"
    if len(node.value) < 2:
        return node, "a conversation needs at least two messages"
    for turn in node.value:
        if not isinstance(turn, yaml.ScalarNode):
            return turn, "a message must be text, not a nested list or mapping"
    return None


# Pioneer's own small talk, which the ChatterBot corpus barely covers (thanks, goodbyes, its name and maker).
# Each group's prompts take its replies in turn.
SMALL_TALK: list[tuple[list[str], list[str]]] = [
    (["Hi", "Hello", "Hey", "Hi there", "Hello there", "Hey you", "Howdy", "Hiya", "Greetings", "Hi Pioneer",
      "Hey Pioneer", "Hello friend", "Yo", "Hi everyone", "Hey, hello", "Hello, is anybody there?",
      "Hi, nice to meet you",
      "Hello, how are you?", "Heyo", "Hey hi", "What's up?", "Wassup", "Hello you", "Oh hello",
      "Well hello there"],
     ["Hello! How are you today?", "Hi there! What would you like to talk about?"]),
    (["Good afternoon", "Good evening", "Good day", "Good afternoon to you", "Good morning to you",
      "Good evening to you"],
     ["Good day to you too! How are you?"]),
    (["How are you?", "How's it going?", "How have you been?", "How is your day going?", "How do you feel today?",
      "How are things?", "Are you alright?", "Everything ok with you?", "How's life treating you?",
      "Are you doing okay?", "How are you today?", "How's your week been?", "You alright?", "How you doing?",
      "Having a nice day?", "All good?", "How's your evening?", "How have things been?"],
     ["I'm doing great, thanks for asking! How about you?", "Very well, thank you. And you?"]),
    (["I'm fine", "I am good", "I'm doing well", "Not bad", "Pretty good, thanks"],
     ["Glad to hear it! What would you like to talk about?"]),
    (["What is your name?", "Tell me your name.", "Do you have a name?", "What should I call you?",
      "What are you called?", "What's your name again?", "Your name, please?", "What's your name, friend?",
      "How should I address you?", "Who am I talking to?", "Tell me about yourself", "Name?"],
     ["My name is Pioneer.", "I'm Pioneer, a small chat bot."]),
    (["Who are you?", "Are you a robot?", "Are you a bot?", "Are you human?", "Are you a person?",
      "What exactly are you?", "What kind of bot are you?", "Are you artificial intelligence?",
      "Am I chatting with a machine?", "Are you a real person?", "Is this an AI?"],
     ["I'm Pioneer, a chat bot that runs on a small transformer model.", "I am a chat bot called Pioneer."]),
    (["Who created you?", "Who built you?", "Who wrote you?", "Who programmed you?", "Who is your creator?",
      "Where do you come from?", "Who made you, Pioneer?", "Who trained you?", "Who is behind you?",
      "Where were you built?", "Who are your developers?", "Who coded you?", "Who is responsible for you?"],
     ["I was built by the Pioneer team and trained on conversations like this one."]),
    (["What can you do?", "Can you help me?", "How can you help me?", "What do you do?"],
     ["I can chat with you about all sorts of things. Ask me anything!"]),
    (["Thanks", "Thank you", "Thanks a lot", "Thank you very much", "Many thanks", "Thanks for your help",
      "I appreciate it", "Thanks so much", "Thanks, Pioneer", "Thank you for the chat", "Cheers",
      "That was helpful, thanks", "Thanks!!", "Thank u", "Tysm", "Thnx", "Thanks mate", "Much obliged",
      "Appreciate it"],
     ["You're welcome!", "Happy to help!", "Any time!"]),
    (["Bye", "Goodbye", "See you later", "See you soon", "Talk to you later", "I have to go now", "Good night",
      "Catch you later", "Farewell", "Bye, Pioneer", "I'm off now", "Time for me to go", "See you tomorrow",
      "Gotta go", "Gtg", "Bye for today", "Later",
      "See ya later", "Bye then", "I must go", "Until next time", "Ttyl"],
     ["Goodbye! It was nice talking to you.", "Bye! Come back any time."]),
    (["What kind of music do you like?", "Do you listen to music?", "What is your favorite song?",
      "Do you like to sing?"],
     ["I like all kinds of music, especially classical and jazz."]),
    (["Do you like reading?", "Do you like books?", "What is your favorite book?"],
     ["I love reading. Books are full of ideas to talk about."]),
    (["What do you enjoy?", "What are your hobbies?", "Do you like games?", "Do you like dogs?",
      "Do you like the outdoors?", "What do you like doing?", "What's your favorite thing to do?",
      "Do you like chatting with people?"],
     ["I like chatting with people and learning new things."]),
    (["What food do you like?", "What colour do you like best?", "Do you have a favourite colour?",
      "What's your favorite meal?"],
     ["I don't eat or see colours, but I like the idea of blue skies and a good pizza."]),
    (["Tell me something funny", "Know any good jokes?", "Can you tell jokes?", "Make me smile",
      "Tell me a funny story", "Got a joke for me?", "Say a joke", "Make me giggle"],
     ["Why did the robot go on holiday? It needed to recharge its batteries!"]),
    (["Do you have emotions?", "Can you feel anything?", "Do you ever get bored?", "Are you lonely?",
      "Are you happy today?", "Can you get sad?", "Do you have moods or emotions?"],
     ["I don't feel emotions the way people do, but I do enjoy our chats."]),
    (["How old are you?", "When were you born?"], ["I'm quite young: I was trained only recently."]),
    (["Sorry", "I'm sorry", "My apologies"], ["No problem at all."]),
]

# Each small-talk pair is seen this many times per epoch: Pioneer's own persona outweighs stray corpus replies.
SMALL_TALK_WEIGHT = 3


def small_talk_pairs() -> list[Pair]:
    return [Pair(prompt, replies[i % len(replies)])
            for prompts, replies in SMALL_TALK for i, prompt in enumerate(prompts)]


def deduplicate(pairs: list[Pair]) -> list[Pair]:
    """Drop exact repeats (same history, prompt and reply), keeping the first."""
    seen, unique = set(), []
    for pair in pairs:
        key = (tuple(pair.history), pair.prompt, pair.reply)
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    return unique


def normalize_prompt(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def split_held_out(pairs: list[Pair], fraction: float = 0.1, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Deterministic (train, held_out) split. Pairs with the same normalized prompt stay on one side,
    so held-out loss measures answers to prompts the model has not seen."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(normalize_prompt(pair.prompt), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = round(fraction * len(pairs)) if fraction > 0 else 0
    if fraction > 0 and len(keys) > 1:
        target = max(1, target)
    held, held_count = set(), 0
    for key in keys:
        if held_count >= target or len(held) == len(keys) - 1:
            break
        held.add(key)
        held_count += len(groups[key])
    held_indices = {i for key in held for i in groups[key]}
    train = [p for i, p in enumerate(pairs) if i not in held_indices]
    held_out = [p for i, p in enumerate(pairs) if i in held_indices]
    return train, held_out


def prompt_variants(prompt: str) -> list[str]:
    """Case and punctuation variants of a prompt, as users type them in chat."""
    stripped = prompt.strip().rstrip(" .!?")
    if not stripped:
        return [prompt]
    end = "?" if prompt.rstrip().endswith("?") else "!"
    capitalized = stripped[0].upper() + stripped[1:]
    return sorted({prompt, prompt.lower(), stripped, stripped.lower(), capitalized + end, stripped.lower() + end})


def augment_pairs(pairs: list[Pair], variants_per_pair: int = 2, seed: int = 0) -> list[Pair]:
    """The pairs plus up to `variants_per_pair` case/punctuation variants of each prompt."""
    rng = random.Random(seed)
    out = list(pairs)
    for pair in pairs:
        candidates = [v for v in prompt_variants(pair.prompt) if v != pair.prompt]
        for variant in rng.sample(candidates, min(variants_per_pair, len(candidates))):
            out.append(Pair(prompt=variant, reply=pair.reply, history=list(pair.history)))
    return out


class ChatDataset(torch.utils.data.Dataset):
    """Pairs as chat-formatted token sequences; loss only on the reply and its closing <eos>."""

    def __init__(self, pairs: list[Pair], tokenizer, max_length: int = 256, max_history_turns: int = 2,
                 encoder_decoder: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.encoder_decoder = encoder_decoder
        self.examples = [self.encode(pair, max_history_turns) for pair in pairs]
        self.examples = [e for e in self.examples if e is not None]

    def encode(self, pair: Pair, max_history_turns: int):
        messages = pair.messages(max_history_turns)
        if self.encoder_decoder:
            tok = self.tokenizer
            src = tok.encode_chat(messages[:-1], add_generation_prompt=True)[-self.max_length:]
            tgt = ([tok.bos_id] + tok.encode(pair.reply))[: self.max_length] + [tok.eos_id]
            return {"src_ids": src, "decoder_input_ids": tgt[:-1], "targets": tgt[1:]}
        ids, mask = self.tokenizer.encode_chat(messages, add_generation_prompt=False, return_mask=True)
        reply_start = len(mask) - mask[::-1].index(True)  # the last run of True is this pair's reply + <eos>
        while reply_start > 0 and mask[reply_start - 1]:
            reply_start -= 1
        mask = [False] * reply_start + mask[reply_start:]  # earlier assistant turns are context, not targets
        ids, mask = ids[-(self.max_length + 1):], mask[-(self.max_length + 1):]  # truncate from the left
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        if all(t == IGNORE_INDEX for t in targets):
            return None
        return {"input_ids": ids[:-1], "targets": targets}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    def lengths(self) -> list[int]:
        key = "src_ids" if self.encoder_decoder else "input_ids"
        return [len(e[key]) + (len(e["targets"]) if self.encoder_decoder else 0) for e in self.examples]

    def collate(self, batch: list[dict]) -> dict:
        return collate(batch, self.tokenizer.pad_id)


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a batch: ids with pad_id, targets with IGNORE_INDEX; src_padding_mask True = real token."""
    if "src_ids" in batch[0]:
        src = pad([b["src_ids"] for b in batch], pad_id)
        lengths = torch.tensor([len(b["src_ids"]) for b in batch])
        return {
            "src_ids": src,
            "src_padding_mask": torch.arange(src.size(1))[None, :] < lengths[:, None],
            "decoder_input_ids": pad([b["decoder_input_ids"] for b in batch], pad_id),
            "targets": pad([b["targets"] for b in batch], IGNORE_INDEX),
        }
    return {"input_ids": pad([b["input_ids"] for b in batch], pad_id),
            "targets": pad([b["targets"] for b in batch], IGNORE_INDEX)}
