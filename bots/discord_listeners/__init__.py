"""Discord listeners, one job per module; register() wires them all to a PioneerBot."""

from . import ask_command, errors, forget_command, info_command, messages, mode_command


def register(bot) -> None:
    for listener in (messages, ask_command, info_command, forget_command, mode_command, errors):
        listener.register(bot)
