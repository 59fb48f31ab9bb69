"""The shared prefix of a request: where it ends, how it is counted, how it is marked."""

from __future__ import annotations

from apwa_jupyter.costs import chars_over_4
from apwa_jupyter.prompt_cache import (
    PrefixMark,
    common_prefix,
    message_text,
    prefix_mark,
    prompt_counts,
    shared_chars,
    with_cache_marker,
)

ROW = 'Label the input\'s "text".\n\nInput:\n<data>\n{"text": "a kettle"}\n</data>'
REDUCE = "Summarise chapter <data>B.2</data>.\n\nInputs (2 items):\n<data>\n1\n2\n</data>"


def test_the_shared_part_ends_where_the_first_data_begins():
    assert ROW[: shared_chars(ROW)].endswith("Input:\n<data>\n")
    assert REDUCE[: shared_chars(REDUCE)] == "Summarise chapter "  # a group key filled inline
    assert shared_chars("Task a: say hello") == 0


def test_counts_and_marker_keep_the_bytes():
    messages = [
        {"role": "system", "content": "rules " * 50},
        {"role": "user", "content": ROW},
    ]
    mark = prefix_mark(messages)
    assert mark == PrefixMark(1, shared_chars(ROW))
    shared, total = prompt_counts(messages, mark, chars_over_4)
    assert shared == chars_over_4("rules " * 50) + chars_over_4(ROW[: mark.chars])
    assert total == chars_over_4("rules " * 50) + chars_over_4(ROW)
    marked = with_cache_marker(messages, mark)
    assert messages[1]["content"] == ROW  # the caller's messages are not changed
    assert message_text(marked[1]["content"]) == ROW
    assert marked[1]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert with_cache_marker(messages, None) is messages


def test_common_prefix():
    assert common_prefix("abcdef", "abcxyz") == 3
    assert common_prefix("", "abc") == 0 and common_prefix("same", "same") == 4
