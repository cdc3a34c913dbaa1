"""The console front-end over the embedded service: what a terminal and a script see."""

import io

from bots.app import build_service
from bots.console import Console
from bots.core import GUESS_NOT_CONFIGURED
from bots.memory import Place
from tests.helpers import make_settings

NOTE = "\n\n_(" + GUESS_NOT_CONFIGURED + ")_"


async def test_console_shows_each_reply_once_with_its_guess_note(tmp_path, tiny_model_dir):
    # Hybrid with no OpenAI backend and a threshold no reply reaches: every reply is the local model's guess.
    service = await build_service(make_settings(tmp_path, tiny_model_dir, attention_mode="hybrid",
                                                hybrid_mode_threshold=1.0))
    try:
        terminal = io.StringIO()
        console = Console(service.core, user_id="alice", out=terminal)
        shown = await console.handle("hello there", live=True)
        history = await service.memory.history(Place("console", "", "terminal", ""), "alice")
        reply = history[-1].content
        assert shown == reply + NOTE and history[-1].role == "assistant"  # memory keeps the reply alone
        assert terminal.getvalue() == "pioneer> " + reply + NOTE + "\n"  # grown in place, never repeated

        scripted = io.StringIO()
        await Console(service.core, user_id="bob", out=scripted).run(io.StringIO("hello there\n/mode local\n"))
        lines = scripted.getvalue()
        assert lines.startswith(reply + NOTE + "\n") and lines.count(reply) == 1
        assert "Mode set to local." in lines
    finally:
        await service.close()
