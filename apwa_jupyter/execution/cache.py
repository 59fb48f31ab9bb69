"""The result store as one stage sees it: a key per subtask, lookups, and writes as answers come."""

from __future__ import annotations

from typing import Any

from ..store import StoredAnswer
from ..templates import StageContext
from ..worker import SubtaskResult
from .keys import input_fingerprint, stage_template_key, subtask_key
from .spec import ExecutionSpec


class StageCache:
    """Keys, lookups and writes for the subtasks of one stage (see `keys` for what a key covers)."""

    def __init__(self, spec: ExecutionSpec, ctx: StageContext, batch_size: int, endpoint: str):
        """The cache of one stage whose workers `endpoint` answers."""
        self.store = spec.store
        self.read = spec.cache == "use"
        self.endpoint = endpoint
        self.template = stage_template_key(ctx, batch_size)

    @classmethod
    def open(
        cls, spec: ExecutionSpec, stage: Any, ctx: StageContext, batch_size: int
    ) -> StageCache | None:
        """The stage's cache, or None when the run does not use the store."""
        endpoint = spec.endpoint_id_of(stage)
        if spec.store is None or spec.cache == "off" or not endpoint:
            return None
        return cls(spec, ctx, batch_size, endpoint)

    def keys(self, inputs: list[Any]) -> list[str]:
        """One store key per subtask input."""
        return [subtask_key(self.endpoint, self.template, input_fingerprint(v)) for v in inputs]

    def lookup(self, keys: list[str]) -> dict[int, StoredAnswer]:
        """Stored answers by subtask position (nothing when refreshing)."""
        if not self.read or self.store is None:
            return {}
        found = self.store.get_many(keys)
        return {i: found[k] for i, k in enumerate(keys) if k in found}

    def save(self, key: str, result: SubtaskResult, run_id: str) -> None:
        """Store a successful answer (the store refuses partial ones)."""
        if self.store is None:
            return
        self.store.put(
            key,
            StoredAnswer(
                outputs=list(result.outputs or []),
                run_id=run_id,
                prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
            ),
        )
