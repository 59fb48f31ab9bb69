"""What a run is made with: its options and its setup, fixed when the run is created.

The session builds one `RunSetup` per request; the Run keeps it (`run.setup`), so a run of the
whole table after a sample (`Session.run_all`) is made from the very same request.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .execution import CacheMode

if TYPE_CHECKING:
    from .capabilities import CapabilityRegistry
    from .config import EndpointConfig
    from .costs import Budget
    from .execution.batch_api import BatchSettings
    from .execution.cascade import Cascade
    from .executors.base import Executor
    from .sampling import Sample
    from .store import ResultStore
    from .tables import DataTable


class FollowUps(Protocol):
    """Runs that follow from a run (the session makes them: they need its endpoint and store)."""

    def run_all(self, run: Any) -> Any:
        """The run's plan on the whole tables (after a sample)."""
        ...

    def try_sample(self, run: Any, sample: Any = 10) -> Any:
        """The run's plan as it stands on a sample, started at once (no manager call)."""
        ...

    def judge(
        self,
        run: Any,
        criterion: str,
        sample: int = 50,
        model: str | None = None,
        budget: str | None = None,
    ) -> Any:
        """A judge model's scores of a sample of the run's answers."""
        ...


@dataclass
class RunOptions:
    """Knobs of one run; `concurrency=None` leaves the executor's own setting in force."""

    concurrency: int | None = None
    max_tokens: int = 1024
    keep_transcripts: bool = True
    out: str | None = None
    max_input_chars: int | None = None  # None: the worker's default input budget
    # The result store: "use" (read and write), "refresh" (fresh answers, written), "off".
    cache: CacheMode = "use"


@dataclass(frozen=True)
class RunSetup:
    """What a Run is made with: the request, what it may use, and how it reaches the engine.

    `store` is the result store (None: nothing is read or written), `budget` what the run may
    spend; `submit` and `call_soon` hand work to the engine loop; `executor_factory` gives the
    session's executor when the run starts (Ray starts only then).
    """

    prompt: str
    tables: dict[str, DataTable]
    registry: CapabilityRegistry
    options: RunOptions
    executor_factory: Callable[[], Executor]
    submit: Callable[[Any], Future[Any]]
    call_soon: Callable[[Callable[[], Any]], None]
    budget: Budget | None = None
    store: ResultStore | None = None
    cell_id: str | None = None
    dry_run: bool = False
    sample: Sample | None = None  # run on a sample of the tables the stages read (sampling.py)
    parent: str | None = None  # the sample run whose plan this whole run carries out
    follow_ups: FollowUps | None = None  # the session: runs that follow from this one
    # Named models a stage may run on (`Stage.model`), besides the default worker model.
    models: dict[str, EndpointConfig] = field(default_factory=dict)
    cascade: Cascade | None = None  # eligible map stages run cheap-then-strong (cascade.py)
    batch: BatchSettings | None = None  # map stages without tools go to the Batch API (batch.py)
    # (--record FILE, --replay FILE): the named models are recorded or replayed with the run's own.
    recording: tuple[str | None, str | None] = (None, None)
