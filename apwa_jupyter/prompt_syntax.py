"""The `{name}` syntax of prompts and stage instructions: the one rule, used everywhere.

In a `%%apwa` prompt `{name}` names a table (or a value) in the notebook; in a stage's
instruction `{column}` is filled from the subtask's own row. Both follow this rule: a name is an
identifier in single braces, and doubled braces (`{{x}}`) are literal text, never a reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable

REFERENCE = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


def find_references(text: str) -> list[str]:
    """`{name}` references in the text, in order, without duplicates ({{x}} is literal)."""
    seen: list[str] = []
    for name in REFERENCE.findall(text):
        if name not in seen:
            seen.append(name)
    return seen


def referenced(text: str) -> set[str]:
    """The set of names the text references."""
    return set(REFERENCE.findall(text))


def fill(text: str, value_of: Callable[[str], str | None]) -> str:
    """Replace each `{name}` by `value_of(name)`; a reference it returns None for stays as written."""

    def one(match: re.Match[str]) -> str:
        value = value_of(match.group(1))
        return match.group(0) if value is None else value

    return REFERENCE.sub(one, text)
