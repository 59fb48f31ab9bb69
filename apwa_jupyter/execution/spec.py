"""What execution is given: the run's plan, tables and settings, frozen, and nothing to write back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..capabilities import CapabilityRegistry
from ..config import EndpointConfig
from ..costs import Budget, CostMeter
from ..models.base import ChatModel
from ..plans import Plan
from ..tables import DataTable
from ..templates import MAX_INPUT_CHARS

if TYPE_CHECKING:
    from ..store import ResultStore
    from .batch_api import BatchSettings
    from .cascade import Cascade

CacheMode = Literal["use", "refresh", "off"]


@dataclass(frozen=True)
class ExecutionSpec:
    """Everything execution needs from a run, and nothing it could write back into.

    `store` is the result store and `cache` how to use it: "use" reads and writes, "refresh"
    only writes (fresh answers replace stored ones), "off" neither; `endpoint_id` names the model
    that answers (`keys.endpoint_id`); without one (an in-process model) nothing is stored.
    A `budget` stops the run before the next subtasks would pass it; the `meter` counts what
    finished subtasks cost.
    """

    run_id: str
    plan: Plan
    tables: Mapping[str, DataTable]
    registry: CapabilityRegistry
    worker_model: EndpointConfig | ChatModel
    concurrency: int | None = None
    max_tokens: int = 1024
    keep_transcripts: bool = True
    max_input_chars: int = MAX_INPUT_CHARS
    store: ResultStore | None = None
    cache: CacheMode = "use"
    endpoint_id: str | None = None
    budget: Budget | None = None
    meter: CostMeter | None = None
    # The roster: named models a stage may run on (`Stage.model`), and their store identities.
    models: Mapping[str, EndpointConfig | ChatModel] = field(default_factory=dict)
    model_ids: Mapping[str, str] = field(default_factory=dict)
    # The map stages that run as a cascade (cascade.py: a cheap model, then a strong one), by id.
    cascades: Mapping[str, Cascade] = field(default_factory=dict)
    # Stages whose answers carry the model's confidence (a cascade's cheap step, by stage id).
    confidence_stages: frozenset[str] = frozenset()
    # Send the map stages without tools to the provider's Batch API (batch.py); None: live.
    batch: BatchSettings | None = None

    def model_of(self, stage: Any) -> EndpointConfig | ChatModel:
        """The model a stage's workers talk to: its roster entry, else the run's default."""
        return self.models[stage.model] if stage.model else self.worker_model

    def endpoint_id_of(self, stage: Any) -> str | None:
        """Who answers a stage, for its store keys (None: an in-process model, not stored)."""
        return self.model_ids.get(stage.model) if stage.model else self.endpoint_id
