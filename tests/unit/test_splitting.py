"""Splitting long replies into chat-sized parts without breaking code blocks."""

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bots.splitting import join_parts, next_cut, render_part, split_message, unclosed_fence

FENCE_LINE = re.compile(r"(`{3,}|~{3,})(\S*)[ \t]*")
ADDED_CLOSING = re.compile(r"\n(`{3,}|~{3,})\Z")
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- generated replies: prose, long words, code blocks with and without a language -------------

word_chars = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,!?:;()'\"-_*#/éüß中文字😀🚀"))
vocabulary = "a the reply streams edits Pioneer naïve café 東京 données 😀 🚀 x=1 f(x) **bold** _it_ `code` #tag".split()
common_words = st.sampled_from(vocabulary)
words = st.one_of(common_words, common_words, st.text(word_chars, min_size=1, max_size=9))
long_words = st.builds(lambda word, times: word * times, words, st.integers(5, 120))
prose_lines = st.lists(st.one_of(words, words, words, long_words), min_size=1, max_size=14).flatmap(
    lambda ws: st.sampled_from([" ", "  ", "\t"]).map(lambda gap: gap.join(ws))
)
paragraphs = st.lists(prose_lines, min_size=1, max_size=4).map("\n".join)

code_chars = st.sampled_from(list("abcxyz0123456789 =+-*/()[]{}<>:;,.'\"#_`\t中😀"))
code_samples = ["    return total", "def f(x):", "x = `y` + 1  # 中文", "\tif a < b: pass", "}", "    ", "// 😀 done"]
code_lines = st.one_of(
    st.just(""),
    st.sampled_from(code_samples),
    st.sampled_from(code_samples),
    st.text(code_chars, max_size=60),
    st.builds(lambda s, times: s * times, st.text(code_chars, min_size=1, max_size=8), st.integers(10, 150)),
).filter(lambda line: "``" not in line and not line.startswith("~"))
languages = st.sampled_from(["", "python", "py", "js", "c++", "objective-c", "typescriptreact", "rust"])
fence_runs = st.sampled_from(["```", "```", "```", "~~~", "````"])


@st.composite
def code_blocks(draw, terminated=True):
    run, language = draw(fence_runs), draw(languages)
    body = draw(st.lists(code_lines, max_size=16))
    block = f"{run}{language}\n" + "".join(line + "\n" for line in body)
    return block + run if terminated else block


@st.composite
def replies(draw):
    blocks = draw(st.lists(st.one_of(paragraphs, paragraphs, code_blocks()), min_size=1, max_size=7))
    if draw(st.booleans()):
        blocks.append(draw(code_blocks(terminated=False)))
    gap = st.sampled_from(["\n\n", "\n", "\n\n\n", " \n\n"])
    gaps = draw(st.lists(gap, min_size=len(blocks), max_size=len(blocks)))
    text = "".join(block + gap for block, gap in zip(blocks, gaps))
    return text if draw(st.booleans()) else text.rstrip("\n")


limits = st.one_of(st.integers(50, 200), st.integers(50, 4000))

# ---- an independent reading of fences, for the generated replies (no fence markers in code) ----


def fence_lines(part: str) -> list[re.Match]:
    return [m for line in part.split("\n") if (m := FENCE_LINE.fullmatch(line))]


def last_opening_line(part: str) -> str:
    opened = None
    for match in fence_lines(part):
        opened = match[0].rstrip() if opened is None else None
    assert opened is not None
    return opened


def check_parts(text: str, limit: int, parts: list[str]) -> None:
    assert all(0 < len(part) <= limit for part in parts)
    assert join_parts(parts) == text


@PROPERTY_SETTINGS
@given(replies(), limits)
def test_generated_replies_split_into_balanced_parts_that_join_back(text, limit):
    parts = split_message(text, limit)
    check_parts(text, limit, parts)
    original_is_balanced = len(fence_lines(text)) % 2 == 0
    for index, part in enumerate(parts):
        is_last = index == len(parts) - 1
        assert len(fence_lines(part)) % 2 == 0 or (is_last and not original_is_balanced), part
        if not is_last and ADDED_CLOSING.search(part):
            # The fence this part had to close is reopened with the same marker and language.
            reopened = last_opening_line(part[: -len(ADDED_CLOSING.search(part)[0])])
            assert parts[index + 1].startswith(reopened + "\n")
            assert any(m[0] == reopened for m in fence_lines(text))


@PROPERTY_SETTINGS
@given(
    st.lists(
        st.one_of(
            st.sampled_from(list("ab `~\n\t é😀")),
            st.sampled_from(["```", "~~~", "```py\n", "\n```\n", "\n\n"]),
            st.text(),
        ),
        max_size=600,
    ).map("".join),
    limits,
)
def test_any_text_splits_within_limit_and_joins_back(text, limit):
    parts = split_message(text, limit)
    check_parts(text, limit, parts)
    assert all(unclosed_fence(part) is None for part in parts[:-1])
    if parts:
        assert (unclosed_fence(parts[-1]) is None) == (unclosed_fence(text) is None)


@PROPERTY_SETTINGS
@given(
    st.lists(st.sampled_from(["`", "~", "\n", " ", "a", "```", "~~~~", "py", "`" * 8]), max_size=400).map("".join),
    st.integers(50, 120),
)
def test_fence_heavy_text_at_small_limits(text, limit):
    parts = split_message(text, limit)
    check_parts(text, limit, parts)
    assert all(unclosed_fence(part) is None for part in parts[:-1])


# ---- examples ---------------------------------------------------------------------------------


def long_reply(seed: int = 7) -> str:
    rng = random.Random(seed)
    vocabulary = "the model streams a reply and edits the message while tokens arrive quickly".split()

    def prose(chars: int) -> str:
        lines, line = [], []
        while sum(map(len, lines)) + len(" ".join(line)) < chars:
            line.append(rng.choice(vocabulary))
            if len(line) > 14:
                lines.append(" ".join(line))
                line = []
        return "\n".join([*lines, " ".join(line)])

    def python_block(lines: int) -> str:
        body = "\n".join(f"    total += value_{i} * {i}  # step {i}" for i in range(lines))
        return f"```python\ndef compute():\n    total = 0\n{body}\n    return total\n```"

    sections = [prose(700), python_block(12), prose(500), python_block(70), prose(600), python_block(25)]
    sections.append(prose(900))
    text = "\n\n".join(sections)
    assert 5500 <= len(text) <= 7000 and text.count("```python") == 3
    return text


@pytest.mark.parametrize("limit", [2000, 3500])
def test_six_thousand_characters_with_python_blocks(limit):
    text = long_reply()
    parts = split_message(text, limit)
    assert len(parts) >= 2
    check_parts(text, limit, parts)
    for index, part in enumerate(parts):
        assert len(fence_lines(part)) % 2 == 0
        if index and parts[index - 1].endswith("\n```"):
            assert part.startswith("```python\n")


def test_a_code_block_longer_than_the_limit_is_closed_and_reopened_with_its_language():
    code = "\n".join(f"print({i})" for i in range(400))
    text = f"Here you go:\n\n```python\n{code}\n```\n\nThat prints the numbers."
    parts = split_message(text, 2000)
    check_parts(text, 2000, parts)
    middle = parts[1:-1]
    assert middle and all(p.startswith("```python\n") and p.endswith("\n```") for p in middle)
    assert parts[0].endswith("\n```") and parts[0].count("```python\n") == 1


def test_prefers_paragraph_boundaries_over_lines_and_spaces():
    first = "\n".join(["word " * 30] * 8)  # about 1,200 characters of lines
    second = "\n".join(["more " * 30] * 8)
    parts = split_message(first + "\n\n" + second, 2000)
    assert parts == [first + "\n\n", second]


def test_prefers_line_boundaries_over_spaces_and_spaces_over_cutting_words():
    lines = "\n".join(["alpha beta gamma delta"] * 100)
    assert all(part.endswith("\n") for part in split_message(lines, 500)[:-1])
    sentence = " ".join(["supercalifragilistic"] * 100)
    assert all(part.endswith(" ") for part in split_message(sentence, 500)[:-1])


def test_a_word_longer_than_the_limit_is_cut():
    assert split_message("x" * 5000, 2000) == ["x" * 2000, "x" * 2000, "x" * 1000]


def test_unterminated_fence_at_the_end_stays_open_in_the_last_part_only():
    text = "Start:\n```js\n" + "let x = 1;\n" * 300
    parts = split_message(text, 1000)
    check_parts(text, 1000, parts)
    assert all(unclosed_fence(part) is None for part in parts[:-1])
    assert parts[-1].startswith("```js\n") and unclosed_fence(parts[-1]).language == "js"


def test_tilde_and_long_fences_are_reopened_with_their_own_marker():
    text = "~~~ruby\n" + "puts 1\n" * 100 + "~~~\n\n````\n" + "```not a fence```\n" * 60 + "````"
    parts = split_message(text, 300)
    check_parts(text, 300, parts)
    assert any(part.startswith("~~~ruby\n") for part in parts[1:])
    assert any(part.startswith("````\n") for part in parts[1:])


def test_one_line_triple_backticks_are_not_fences():
    text = "Use ```x``` inline.\n" + "```inline```\n" * 200
    parts = split_message(text, 500)
    check_parts(text, 500, parts)
    assert all(not part.startswith("```\n") for part in parts)


def test_short_texts_are_unchanged_and_empty_text_has_no_parts():
    assert split_message("hello\n```py\nx\n", 2000) == ["hello\n```py\nx\n"]
    assert split_message("", 2000) == []
    with pytest.raises(ValueError):
        split_message("hello", 49)


def test_streaming_cuts_are_stable_and_continue_with_start():
    text = long_reply(3)
    cut = next_cut(text[:2500], 0, 2000, growing=True)
    assert cut is not None and cut == next_cut(text[:2600], 0, 2000, growing=True)
    parts = [render_part(text, 0, cut), *split_message(text, 2000, start=cut)]
    check_parts(text, 2000, parts)


def test_growing_text_never_cuts_inside_a_line_that_may_still_become_a_fence():
    text = "a" * 1990 + "\n``"
    assert next_cut(text, 0, 1993, growing=True) == 1991


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies(), st.integers(50, 600), st.lists(st.integers(1, 400), min_size=1, max_size=40))
def test_cuts_made_while_streaming_stay_valid_once_the_text_is_complete(text, limit, chunk_sizes):
    parts, start, end = [], 0, 0
    for size in chunk_sizes:  # freeze parts the way the streamer does, on each prefix as it arrives
        end = min(len(text), end + size)
        while len(render_part(text[:end], start, end)) > limit:
            cut = next_cut(text[:end], start, limit, growing=True)
            if cut is None:
                break
            parts.append(render_part(text[:end], start, cut))
            start = cut
    parts += split_message(text, limit, start=start)
    check_parts(text, limit, parts)
    original_is_balanced = len(fence_lines(text)) % 2 == 0
    for index, part in enumerate(parts):
        assert len(fence_lines(part)) % 2 == 0 or (index == len(parts) - 1 and not original_is_balanced)
