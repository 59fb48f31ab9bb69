"""Typed steps of a worker's transcript (the smolagents `memory.py` idea).

The conversation sent to the model is rebuilt from these steps rather than glued from strings, so
what a user inspects after a run is exactly what the model saw and said.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .models.base import ChatResponse, Usage


@dataclass(frozen=True)
class TaskStep:
    """The worker's brief: system rules, worked example turns (if any), its own input."""

    system: str
    user: str
    examples: tuple[dict[str, Any], ...] = ()

    def to_messages(self) -> list[dict[str, Any]]:
        """The opening messages."""
        return [
            {"role": "system", "content": self.system},
            *self.examples,
            {"role": "user", "content": self.user},
        ]


@dataclass(frozen=True)
class ModelStep:
    """One model response (text and/or tool calls), exactly as it came back."""

    response: ChatResponse

    def to_messages(self) -> list[dict[str, Any]]:
        """The assistant message, in OpenAI form."""
        message: dict[str, Any] = {"role": "assistant", "content": self.response.content}
        if self.response.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in self.response.tool_calls
            ]
        return [message]


@dataclass(frozen=True)
class ToolStep:
    """A tool call's result, as the model will read it."""

    call_id: str
    name: str
    arguments: str
    result: str

    def to_messages(self) -> list[dict[str, Any]]:
        """The tool message answering the call."""
        return [{"role": "tool", "tool_call_id": self.call_id, "content": self.result}]


@dataclass(frozen=True)
class CorrectionStep:
    """Feedback after an invalid answer: what was wrong and what to send instead."""

    problem: str

    def to_messages(self) -> list[dict[str, Any]]:
        """A user message asking for a corrected answer."""
        return [
            {
                "role": "user",
                "content": f"That answer was invalid: {self.problem}\n"
                "Reply with only the corrected JSON object.",
            }
        ]


@dataclass(frozen=True)
class FinalStep:
    """The validated answer: one output dict per input row."""

    outputs: list[dict[str, Any]]

    def to_messages(self) -> list[dict[str, Any]]:
        """Nothing more is sent after the final answer."""
        return []


@dataclass(frozen=True)
class ScoreStep:
    """A choice field answered by likelihood instead of generation (`choice_scoring="logprobs"`).

    Kept so that a user sees the value was scored, not written: each allowed choice's
    log-probability for this input, the calibration subtracted (a content-free input's scores,
    or the batch's mean), and the tokens the scoring requests cost.
    """

    field: str
    scores: dict[str, float]
    choice: str
    calibration: str = "none"  # "none", "content_free" or "batch"
    adjustment: dict[str, float] | None = None  # what was subtracted per choice
    usage: Usage = dataclasses.field(default_factory=Usage)
    row: int | None = None  # the row's number in a batched subtask

    def to_messages(self) -> list[dict[str, Any]]:
        """Scoring sends its own one-token requests; nothing joins the conversation."""
        return []

    def describe(self) -> str:
        """One line: field, each choice's score (and adjustment), the pick."""
        parts = []
        for choice, score in sorted(self.scores.items(), key=lambda item: -item[1]):
            text = f"{choice} {score:.2f}"
            if self.adjustment is not None and choice in self.adjustment:
                adjusted = self.adjustment[choice]  # subtracted: a negative one was added
                text += f" (-{adjusted:.2f})" if adjusted >= 0 else f" (+{-adjusted:.2f})"
            parts.append(text)
        where = f" row {self.row}" if self.row is not None else ""
        return (
            f"[scored {self.field}{where}, calibration {self.calibration}] "
            f"{', '.join(parts)} -> {self.choice}"
        )


Step = TaskStep | ModelStep | ToolStep | CorrectionStep | ScoreStep | FinalStep


def transcript_text(steps: list[Step]) -> str:
    """A readable transcript for people inspecting one subtask."""
    lines = []
    for step in steps:
        if isinstance(step, TaskStep):
            lines.append(f"[task] {step.user}")
        elif isinstance(step, ModelStep):
            calls = ", ".join(f"{c.name}({c.arguments})" for c in step.response.tool_calls)
            lines.append(f"[model] {step.response.content or ''}{' -> ' + calls if calls else ''}")
        elif isinstance(step, ToolStep):
            lines.append(f"[tool {step.name}] {step.result}")
        elif isinstance(step, CorrectionStep):
            lines.append(f"[correction] {step.problem}")
        elif isinstance(step, ScoreStep):
            lines.append(step.describe())
        else:
            lines.append(f"[final] {json.dumps(step.outputs, default=str)}")
    return "\n".join(lines)
