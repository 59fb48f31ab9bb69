"""One background event loop per process where planning and execution happen.

The notebook's own loop must stay free (a cell that waits on workers would freeze the kernel), and
`asyncio.run` cannot be nested inside a kernel. So runs live on a daemon thread with its own loop;
callers get `concurrent.futures.Future`s and can wait on them, interruptibly, or not at all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class EngineLoop:
    """An asyncio loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="apwa-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule a coroutine on the engine loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, callback: Callable[[], Any]) -> None:
        """Run a plain callback on the engine loop (e.g. setting an asyncio.Event safely)."""
        self.loop.call_soon_threadsafe(callback)

    @property
    def in_engine_thread(self) -> bool:
        """True when called from the engine's own thread."""
        return threading.current_thread() is self._thread


_engine: EngineLoop | None = None
_lock = threading.Lock()


def get_engine() -> EngineLoop:
    """The process-wide engine loop, started on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = EngineLoop()
        return _engine
