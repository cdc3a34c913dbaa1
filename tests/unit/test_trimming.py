"""Properties of trim_history: within budget, order kept, system kept, whole exchanges only."""

from hypothesis import given, settings
from hypothesis import strategies as st

from bots.trimming import trim_history


def count_words(text: str) -> int:
    return len(text.split())


def cost(turns, overhead: int) -> int:
    return sum(count_words(content) + overhead for _, content in turns)


contents = st.text(alphabet="ab ", max_size=24)
histories = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), contents), max_size=14)


@settings(max_examples=300, deadline=None)
@given(
    system_prompt=st.one_of(st.none(), contents),
    messages=histories,
    new_message=contents,
    budget=st.integers(min_value=0, max_value=120),
    overhead=st.integers(min_value=0, max_value=6),
)
def test_trim_history_properties(system_prompt, messages, new_message, budget, overhead):
    result = trim_history(system_prompt, messages, new_message, budget, count_words, overhead)

    head = [("system", system_prompt)] if system_prompt else []
    assert result[: len(head)] == head
    assert result[-1] == ("user", new_message)

    kept = result[len(head):-1]
    start = len(messages) - len(kept)
    assert kept == messages[start:], "history must be a suffix, in order"
    assert not kept or kept[0][0] == "user", "never starts with a reply whose question was dropped"

    fixed = cost(head, overhead) + cost([("user", new_message)], overhead)
    if fixed <= budget:
        assert cost(result, overhead) <= budget

    older_users = [i for i in range(start) if messages[i][0] == "user"]
    if older_users:
        next_exchange = messages[older_users[-1]:start]
        assert cost(result, overhead) + cost(next_exchange, overhead) > budget, \
            "an older exchange that fits was dropped"


def test_drops_oldest_pairs_first():
    history = [("user", "one"), ("assistant", "uno"), ("user", "two"), ("assistant", "dos")]
    result = trim_history("be nice", history, "three", budget_tokens=5,
                          count_tokens=count_words, per_message_overhead=0)
    assert result == [("system", "be nice"), ("user", "two"), ("assistant", "dos"),
                      ("user", "three")]


def test_never_keeps_half_a_pair():
    history = [("user", "a b c"), ("assistant", "d e f g h")]
    result = trim_history(None, history, "x", budget_tokens=5, count_tokens=count_words,
                          per_message_overhead=0)
    assert result == [("user", "x")]


def test_orphan_reply_at_start_is_dropped():
    history = [("assistant", "welcome"), ("user", "hi"), ("assistant", "hello")]
    result = trim_history(None, history, "bye", budget_tokens=100, count_tokens=count_words)
    assert result == [("user", "hi"), ("assistant", "hello"), ("user", "bye")]


def test_unanswered_user_message_is_a_whole_exchange():
    history = [("user", "first"), ("user", "second"), ("assistant", "reply")]
    result = trim_history(None, history, "third", budget_tokens=3, count_tokens=count_words,
                          per_message_overhead=0)
    assert result == [("user", "second"), ("assistant", "reply"), ("user", "third")]


def test_system_and_new_message_kept_even_over_budget():
    history = [("user", "old"), ("assistant", "reply")]
    long_message = "word " * 50
    result = trim_history("system", history, long_message, budget_tokens=10,
                          count_tokens=count_words)
    assert result == [("system", "system"), ("user", long_message)]


def test_empty_system_prompt_is_left_out():
    result = trim_history("", [], "hi", budget_tokens=100, count_tokens=count_words)
    assert result == [("user", "hi")]
