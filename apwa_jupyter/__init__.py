"""APWA in the notebook: a manager LLM plans, parallel LLM workers run on Ray, results are DataFrames.

`%load_ext apwa_jupyter` registers the `%%apwa` magic. Importing this package is cheap on purpose:
ray, openai and ipywidgets are imported only when a run needs them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public names resolved on first access (PEP 562), so `import apwa_jupyter` stays fast.
_LAZY = {
    "run": "apwa_jupyter.session",
    "plan": "apwa_jupyter.session",
    "Session": "apwa_jupyter.session",
    "Run": "apwa_jupyter.runs",
    "Plan": "apwa_jupyter.plans",
    "DataTable": "apwa_jupyter.tables",
    "capability": "apwa_jupyter.capabilities",
    "CapabilityRegistry": "apwa_jupyter.capabilities",
    "EndpointConfig": "apwa_jupyter.config",
    "files": "apwa_jupyter.documents",
    "chunks": "apwa_jupyter.documents",
    "count_tokens": "apwa_jupyter.documents",
}

__all__ = [*_LAZY, "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'apwa_jupyter' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the prebuilt JupyterLab extension lives (for `jupyter labextension develop`)."""
    return [{"src": "labextension", "dest": "apwa-jupyter-labextension"}]


def load_ipython_extension(ipython: Any) -> None:
    """Register the `%apwa` / `%%apwa` magics (imports neither ray nor openai)."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Stop this kernel's runs and the embedded model, if any."""
    from .magics import unload

    unload(ipython)
