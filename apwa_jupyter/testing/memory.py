"""The kernel's memory while a block runs: the resident size before, at its peak, and now.

Scale tests and benchmarks (10 million rows must not cost the kernel a gigabyte) read it the
same way: a thread samples the process's RSS every `interval` seconds between entering and
leaving the block, and `peak` also counts the size at the moment it is read.
"""

from __future__ import annotations

import gc
import threading
from types import TracebackType

MIB = 2**20


class PeakRss:
    """`with PeakRss() as memory: ...`, then `memory.before`, `memory.peak`, `memory.growth_mib`."""

    def __init__(self, interval: float = 0.05):
        import psutil  # a test and bench dependency, not the package's

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="apwa-rss", daemon=True)
        self.before = 0
        self._highest = 0

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.before = self._highest = self.now()
        self._sampler.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._sampler.join()

    def now(self) -> int:
        """The resident size at this moment, in bytes."""
        return int(self._process.memory_info().rss)

    @property
    def peak(self) -> int:
        """The highest resident size seen so far (bytes), this moment included."""
        self._highest = max(self._highest, self.now())
        return self._highest

    @property
    def growth_mib(self) -> float:
        """The peak above the size before the block, in MiB."""
        return (self.peak - self.before) / MIB

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._highest = max(self._highest, self.now())
