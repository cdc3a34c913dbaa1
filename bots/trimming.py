"""Fit a conversation into a token budget by dropping its oldest exchanges."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Turn = tuple[str, str]  # (role, content)


def _exchanges(messages: Sequence[Turn]) -> list[list[Turn]]:
    """Split history into exchanges: a user message and every reply up to the next user message.

    Replies before the first user message belong to no exchange and are left out.
    """
    exchanges: list[list[Turn]] = []
    for role, content in messages:
        if role == "user":
            exchanges.append([(role, content)])
        elif exchanges:
            exchanges[-1].append((role, content))
    return exchanges


def trim_history(
    system_prompt: str | None,
    messages: Sequence[Turn],
    new_message: str,
    budget_tokens: int,
    count_tokens: Callable[[str], int],
    per_message_overhead: int = 4,
) -> list[Turn]:
    """Return [system] + the newest history that fits + the new user message.

    Each message costs count_tokens(content) + per_message_overhead. Whole exchanges (a user
    message with its replies) are dropped oldest first, so the kept history is a suffix of
    `messages` that starts with a user message. The system prompt (when not None or empty) and
    the new message are always kept: if they alone exceed the budget the result is over budget,
    and it is the caller's job to refuse such input (MAX_INPUT_CHARS) before asking for a reply.
    """

    def cost(content: str) -> int:
        return count_tokens(content) + per_message_overhead

    head: list[Turn] = [("system", system_prompt)] if system_prompt else []
    tail: list[Turn] = [("user", new_message)]
    left = budget_tokens - sum(cost(content) for _, content in head + tail)

    kept: list[list[Turn]] = []
    for exchange in reversed(_exchanges(messages)):
        exchange_cost = sum(cost(content) for _, content in exchange)
        if exchange_cost > left:
            break
        kept.append(exchange)
        left -= exchange_cost

    history = [turn for exchange in reversed(kept) for turn in exchange]
    return head + history + tail
