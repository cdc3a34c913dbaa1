"""Slack listeners, one job per module; register() wires them all to a bolt AsyncApp."""

from . import app_mention, ask_command, direct_message, errors, forget_command, info_command, repeats, thread_reply


def register(app, front) -> None:
    repeats.register(app, front)  # first: a repeated delivery reaches no listener
    # Order matters for "message" events: bolt runs the first listener whose matchers accept one.
    for listener in (app_mention, direct_message, thread_reply, ask_command, info_command, forget_command, errors):
        listener.register(app, front)
