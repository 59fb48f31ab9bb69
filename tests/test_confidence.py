"""A row's confidence read off the token log-probabilities of the answer that wrote it."""

from __future__ import annotations

import json
import math

import pytest

from apwa_jupyter.confidence import answer_confidence, batch_confidences


def tokens(content: str, sure: dict[str, float]) -> list[tuple[str, float]]:
    """`content` split so each listed value (in its quotes, in order) is one token at log(p)."""
    out, at = [], 0
    for value, p in sure.items():
        start = content.index(value, at)
        out += [(content[at:start], 0.0), (value, math.log(p))]
        at = start + len(value)
    return [t for t in [*out, (content[at:], 0.0)] if t[0]]


def test_the_least_sure_field_is_the_rows_confidence():
    content = json.dumps({"colour": "red", "size": 12, "ok": True})
    logprobs = tokens(content, {"red": 0.9, "12": 0.6, "true": 0.8})
    fields = ["colour", "size", "ok"]
    assert answer_confidence(
        content, logprobs, {"colour": "red", "size": 12, "ok": True}, fields
    ) == pytest.approx(0.6)


def test_a_value_is_matched_whole_never_as_the_start_of_a_longer_one():
    content = json.dumps({"note": "reddish", "colour": "red", "n": 123, "m": 12})
    logprobs = tokens(content, {"reddish": 0.1, '"red"': 0.9, "123": 0.2, " 12": 0.7})
    assert answer_confidence(content, logprobs, {"colour": "red"}, ["colour"]) == pytest.approx(0.9)
    assert answer_confidence(content, logprobs, {"m": 12}, ["m"]) == pytest.approx(0.7)


def test_no_confidence_when_the_tokens_do_not_spell_the_answer_or_a_value_is_missing():
    content = json.dumps({"colour": "red"})
    assert answer_confidence(content, [("{}", 0.0)], {"colour": "red"}, ["colour"]) is None
    assert answer_confidence(content, None, {"colour": "red"}, ["colour"]) is None
    logprobs = tokens(content, {"red": 0.9})
    assert answer_confidence(content, logprobs, {"colour": "blue"}, ["colour"]) is None


def test_each_row_of_a_batch_is_read_inside_its_own_object_whatever_the_order():
    results = [
        {"row": 3, "colour": "red"},
        {"row": 1, "colour": "blue", "why": 'not "red" {really}'},
        {"row": 2, "colour": "red"},
    ]
    content = json.dumps({"results": results})
    # row 3's "red" at 0.9, row 1's "blue" at 0.5, row 2's "red" at 0.4 (the text in row 1's
    # string holds a "red" and braces: neither counts for any row)
    spans, at = [], 0
    for value, p in (('"red"', 0.9), ('"blue"', 0.5), ("red", 0.3), ('"red"', 0.4)):
        start = content.index(value, at)
        spans += [(content[at:start], 0.0), (value, math.log(p))]
        at = start + len(value)
    logprobs = [*spans, (content[at:], 0.0)]
    answers = [{"colour": "blue"}, {"colour": "red"}, {"colour": "red"}]
    found = batch_confidences(content, logprobs, answers, ["colour"])
    assert found == [pytest.approx(0.5), pytest.approx(0.4), pytest.approx(0.9)]


def test_a_row_answered_twice_or_not_at_all_in_a_batch_has_no_confidence():
    content = json.dumps(
        {"results": [{"row": 1, "colour": "red"}, {"row": 1, "colour": "red"}, {"row": 9}]}
    )
    logprobs = tokens(content, {"red": 0.9})
    found = batch_confidences(content, logprobs, [{"colour": "red"}, {"colour": "red"}], ["colour"])
    assert found == [None, None]
