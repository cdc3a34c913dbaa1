"""Split a long reply into message-sized parts without breaking code blocks, and join them back."""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

MIN_LIMIT = 50
# Only short fence lines count as fences, so that closing and reopening one always leaves room
# for text in a part of MIN_LIMIT characters.
MAX_FENCE_LINE = 24
MAX_FENCE_RUN = 8

PARAGRAPH, LINE, SPACE, WORD, BROKEN = range(5)

_FENCE_LINE = re.compile(r"[ \t]*(?P<run>(?P<char>[`~])(?P=char){2,})(?P<info>.*)", re.DOTALL)
_ADDED_CLOSING = re.compile(r"\n(`{3,}|~{3,})\Z")


@dataclass(frozen=True)
class Fence:
    """An open code fence: its marker run (```, ~~~, ````) and its info string (the language)."""

    run: str
    info: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.strip() else ""

    @property
    def opening(self) -> str:
        return f"{self.run}{self.info}\n"

    @property
    def closing(self) -> str:
        return f"\n{self.run}"


def _opening_fence(line: str) -> Fence | None:
    if len(line) > MAX_FENCE_LINE:
        return None
    match = _FENCE_LINE.fullmatch(line)
    if not match or len(match["run"]) > MAX_FENCE_RUN:
        return None
    if match["char"] == "`" and "`" in match["info"]:
        return None  # ```inline``` on one line is not a fence
    return Fence(match["run"], match["info"].rstrip())


def _closes(line: str, fence: Fence) -> bool:
    if len(line) > MAX_FENCE_LINE:
        return False
    match = _FENCE_LINE.fullmatch(line)
    return bool(
        match
        and match["char"] == fence.run[0]
        and len(fence.run) <= len(match["run"]) <= MAX_FENCE_RUN
        and not match["info"].strip()
    )


def _after_line(fence: Fence | None, line: str) -> Fence | None:
    """The fence open after a line, given the one open before it."""
    if fence is None:
        return _opening_fence(line)
    return None if _closes(line, fence) else fence


class _Layout:
    """The lines of a text, which of them are fence lines, and which fence is open before each."""

    def __init__(self, text: str):
        self.text = text
        self.newlines = [match.start() for match in re.finditer("\n", text)]
        self.fence_before: list[Fence | None] = []
        self.is_fence: list[bool] = []
        fence = None
        start = 0
        for end in [*self.newlines, len(text)]:
            self.fence_before.append(fence)
            after = _after_line(fence, text[start:end])
            self.is_fence.append(after is not fence)
            fence, start = after, end + 1
        self.fence_at_end = fence

    def line_of(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos)

    def line_start(self, line: int) -> int:
        return self.newlines[line - 1] + 1 if line else 0

    def line_end(self, line: int) -> int:
        return self.newlines[line] if line < len(self.newlines) else len(self.text)

    def fence_at(self, pos: int) -> Fence | None:
        """The fence open after the complete lines before pos (a line still being cut does not count)."""
        return self.fence_before[self.line_of(pos)]

    def looks_like_fence(self, start: int, end: int, fence: Fence | None) -> bool:
        if end - start > MAX_FENCE_LINE:
            return False
        piece = self.text[start:end]
        return _closes(piece, fence) if fence else _opening_fence(piece) is not None

    def render(self, start: int, end: int) -> str:
        opening = self.fence_at(start)
        closing = self.fence_at(end) if end < len(self.text) else None
        return (opening.opening if opening else "") + self.text[start:end] + (closing.closing if closing else "")


def _boundary(layout: _Layout, cut: int) -> int:
    text = layout.text
    before = text[cut - 1]
    if before == "\n":
        ended = layout.line_of(cut - 1)
        return PARAGRAPH if not text[layout.line_start(ended) : cut - 1].strip() else LINE
    if before.isspace() and not text[cut].isspace():
        return SPACE
    return WORD


def _decodes(layout: _Layout, start: int, cut: int) -> bool:
    """Whether join_parts reads this part's end correctly: a real closing fence ending exactly at a
    cut, in a part that needs no added closing, would look like an added one."""
    text = layout.text
    if layout.fence_at(cut) or text[cut - 1] not in "`~":
        return True
    run_start = cut - 1
    while run_start > start and text[run_start - 1] == text[cut - 1]:
        run_start -= 1
    newline = run_start - 1
    if cut - run_start < 3 or newline < start or text[newline] != "\n":
        return True
    fence = layout.fence_at(newline)
    return not (fence and fence.run == text[run_start:cut])


def _keeps_fences_whole(layout: _Layout, start: int, cut: int, growing: bool) -> bool:
    """Never cut inside a fence line, nor where a piece of a cut line would read as a fence line."""
    line = layout.line_of(cut)
    line_start, line_end = layout.line_start(line), layout.line_end(line)
    if cut == line_start:
        return True
    if layout.is_fence[line]:
        return False
    if growing and line == len(layout.newlines):
        # The last line may still become a fence line, or leave a short piece that reads as one.
        if line_end - line_start <= MAX_FENCE_LINE or line_end - cut <= MAX_FENCE_LINE:
            return False
    fence = layout.fence_before[line]
    return not (
        layout.looks_like_fence(max(start, line_start), cut, fence)
        or layout.looks_like_fence(cut, line_end, fence)
    )


def _judge(layout: _Layout, start: int, cut: int, room: int, growing: bool) -> int | None:
    """The kind of boundary a cut would be; BROKEN when it would split a fence line; None when the
    part would not fit or join_parts could not undo it."""
    closing = layout.fence_at(cut)
    if cut - start + (len(closing.closing) if closing else 0) > room or not _decodes(layout, start, cut):
        return None
    if not _keeps_fences_whole(layout, start, cut, growing):
        return BROKEN
    return _boundary(layout, cut)


def _find_cut(layout: _Layout, start: int, limit: int, growing: bool) -> int | None:
    """Pick the end of the part beginning at start: the highest paragraph boundary in the second
    half of the room, else a line boundary there, else a space there, else the highest of any of
    those, else a cut inside a word."""
    opening = layout.fence_at(start)
    room = limit - (len(opening.opening) if opening else 0)
    if not growing and len(layout.text) - start <= room:
        return None
    half = start + room // 2
    best: dict[int, int] = {}
    cut = min(start + room, len(layout.text) - 1)
    while cut > start:
        if cut < half and best.keys() & {PARAGRAPH, LINE, SPACE}:
            break
        if SPACE in best or best.get(LINE, -1) >= half:
            # Only line boundaries can still win: jump from line start to line start.
            cut = layout.line_start(layout.line_of(cut))
            if cut <= start:
                break
        kind = _judge(layout, start, cut, room, growing)
        if kind == PARAGRAPH and cut >= half:
            return cut
        if kind is not None:
            best.setdefault(kind, cut)
        cut -= 1
    for kind in (LINE, SPACE):
        if best.get(kind, -1) >= half:
            return best[kind]
    natural = [best[kind] for kind in (PARAGRAPH, LINE, SPACE) if kind in best]
    if natural:
        return max(natural)
    if WORD in best:
        return best[WORD]
    return None if growing else best.get(BROKEN)


def split_message(text: str, limit: int, *, start: int = 0) -> list[str]:
    """Split text into parts of at most limit characters, preferring paragraph, then line, then word
    boundaries. A code fence open at a cut is closed at the end of that part ("\\n```") and reopened
    with its language at the start of the next ("```python\\n"); join_parts undoes this exactly.

    start: continue after an earlier cut at that position (text[:start] was already sent)."""
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT} characters, got {limit}")
    if start >= len(text):
        return []
    layout = _Layout(text)
    parts = []
    while (cut := _find_cut(layout, start, limit, growing=False)) is not None:
        parts.append(layout.render(start, cut))
        start = cut
    parts.append(layout.render(start, len(text)))
    return parts


def next_cut(text: str, start: int, limit: int, *, growing: bool = False) -> int | None:
    """Where the part beginning at start should end; None when the rest fits in one part.

    growing: text is a reply still streaming in; only cut where later text cannot change the
    decision, and answer None when no such place exists yet."""
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT} characters, got {limit}")
    return _find_cut(_Layout(text), start, limit, growing)


def render_part(text: str, start: int, end: int) -> str:
    """text[start:end] as one message: reopen a fence open at start, close one open at end."""
    return _Layout(text).render(start, end)


def unclosed_fence(text: str) -> Fence | None:
    """The fence still open at the end of text, if any."""
    return _Layout(text).fence_at_end


class _FenceReader:
    """Follows the fences of a text fed piece by piece; a line counts once its newline arrives."""

    def __init__(self, fence: Fence | None = None, partial: str = ""):
        self.fence, self.partial = fence, partial

    def fed(self, piece: str) -> _FenceReader:
        *lines, partial = (self.partial + piece).split("\n")
        fence = self.fence
        for line in lines:
            fence = _after_line(fence, line)
        return _FenceReader(fence, partial[: MAX_FENCE_LINE + 1])  # a longer line is never a fence


def join_parts(parts: list[str]) -> str:
    """Undo split_message: drop the fences it added and concatenate the parts."""
    pieces = []
    reader = _FenceReader()
    for index, part in enumerate(parts):
        if opening := reader.fence:
            if not part.startswith(opening.opening):
                raise ValueError(f"part {index} should reopen the fence with {opening.opening!r}")
            part = part[len(opening.opening) :]
        added = _ADDED_CLOSING.search(part) if index < len(parts) - 1 else None
        if added:
            fence = reader.fed(part[: added.start()]).fence
            if fence and fence.run == added[1]:
                part = part[: added.start()]
        pieces.append(part)
        reader = reader.fed(part)
    return "".join(pieces)
