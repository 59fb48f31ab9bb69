"""Executors run subtasks: in this process (asyncio) or on a Ray cluster (async actor pool)."""

from .base import Executor, RetryPolicy

__all__ = ["Executor", "RetryPolicy", "make_executor"]


def make_executor(kind: str = "ray", **options: object) -> Executor:
    """Build an executor by name: "ray" (default) or "local"."""
    if kind == "local":
        from .local import LocalExecutor

        return LocalExecutor(**options)  # type: ignore[arg-type]
    if kind == "ray":
        from .ray import RayExecutor

        return RayExecutor(**options)  # type: ignore[arg-type]
    raise ValueError(f"executor {kind!r} is not known. Available: 'ray', 'local'")
