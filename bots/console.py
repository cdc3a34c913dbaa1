"""The console front-end, `pioneer chat`: a terminal chat through the same core, queue and stream."""

import asyncio
import getpass
import sys
import threading

from .core import Incoming
from .memory import Place

HELP = "Commands: /info, /forget, /mode local|openai|hybrid, /help, /quit"


class TerminalSink:
    """Shows a reply growing in place: new text is appended; a rewrite starts a fresh line."""

    def __init__(self, out, live: bool):
        self.out, self.live = out, live
        self.shown: dict[int, str] = {}
        self.final: list[str] = []

    async def post(self, text: str) -> int:
        ref = len(self.shown)
        self.shown[ref] = ""
        await self.edit(ref, text)
        return ref

    async def edit(self, ref: int, text: str) -> None:
        if not self.live:
            self.shown[ref] = text
            return
        shown = self.shown[ref]
        if text.startswith(shown):
            self.out.write(text[len(shown):])
        else:
            self.out.write("\n" + text)
        self.out.flush()
        self.shown[ref] = text


class LineReader:
    """Lines of a file read in a daemon thread, so a blocked read never holds up the exit."""

    def __init__(self, stream):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.stopped = False
        threading.Thread(target=self._read, args=(stream,), name="console-stdin", daemon=True).start()

    def _read(self, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, line)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, "")  # the end, after every line read
        except RuntimeError:  # the loop closed first: the console has already finished
            pass

    def stop(self) -> None:
        """Lines not yet taken are dropped and next() says the input ended. Call it on the loop's thread."""
        self.stopped = True
        self.queue.put_nowait("")

    async def next(self) -> str:
        """The next line, or "" at the end."""
        line = await self.queue.get()
        return "" if self.stopped else line


class Console:
    def __init__(self, core, *, user_id: str | None = None, out=sys.stdout):
        self.core, self.out = core, out
        self.user_id = user_id or getpass.getuser()
        self.place = Place("console", "", "terminal", "")
        self._lines: LineReader | None = None
        self._stopped = False

    def stop(self) -> None:
        """Stop reading (on SIGTERM): the reply in progress is finished, then run() returns."""
        self._stopped = True
        if self._lines is not None:
            self._lines.stop()

    async def handle(self, line: str, live: bool) -> str | None:
        """Answer one line; returns the reply text (None to quit)."""
        command, _, argument = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return None
        if command == "/help":
            return HELP
        if command == "/info":
            return await self.core.info(self.user_id, is_admin=True)
        if command == "/forget":
            return await self.core.forget("console", self.user_id)
        if command == "/mode":
            return await self.core.set_mode(self.user_id, argument or "?", is_admin=True)
        sink = TerminalSink(self.out, live)
        if live:
            self.out.write("pioneer> ")
        outcome = await self.core.answer(Incoming(self.place, self.user_id, line), sink, limit=1_000_000,
                                         min_interval_s=0.03)
        if live:
            final = outcome.shown
            if not sink.shown or list(sink.shown.values())[-1] != final:
                self.out.write("\n" + final)
            self.out.write("\n")
            self.out.flush()
        return outcome.shown

    async def run(self, stdin=sys.stdin) -> None:
        live = stdin.isatty()
        if live:
            self.out.write(f"Pioneer, in {self.core.mode} mode. {HELP}\n")
        lines = self._lines = LineReader(stdin)
        while not self._stopped:
            if live:
                self.out.write("you> ")
                self.out.flush()
            line = await lines.next()
            if not line:
                break
            if not line.strip() and not live:
                continue
            reply = await self.handle(line.rstrip("\n"), live)
            if reply is None:
                break
            if not live or line.startswith("/"):
                self.out.write(reply + "\n")
                self.out.flush()
