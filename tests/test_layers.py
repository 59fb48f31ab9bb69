"""The package's layers: imports point down, never up, and no two modules import each other.

Every import counts, including those inside functions and under `if TYPE_CHECKING:`: a circle
hidden in a function body is still a circle in the design. A failure names both modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "apwa_jupyter"

# Bottom to top. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "leaf modules",
        {
            "errors",
            "confidence",
            "encoding",
            "prompt_syntax",
            "prompt_cache",
            "config",
            "events",
            "ratelimit",
            "engine",
            "store",
            "store_frames",
            "testing",
            "testing.fake_server",
            "testing.cascade_models",
            "testing.memory",
        },
    ),
    (
        "models",
        {
            "models",
            "models.base",
            "models.scripted",
            "models.openai_chat",
            "models.embedded",
            "models.replay",
            "models.pool",
            "models.embeddings",
            "models.minilm",
            "steps",
        },
    ),
    (
        "tables, plans, costs",
        {
            "tables",
            "plans",
            "plan_fixes",
            "costs",
            "capabilities",
            "aggregate",
            "sampling",
            "evaluation",
        },
    ),
    ("templates", {"templates", "lookups"}),
    ("worker", {"worker"}),
    (
        "executors",
        {
            "executors",
            "executors.base",
            "executors.local",
            "executors.rows",
            "executors.ray",
            "executors.ray.actor",
            "executors.ray.cluster",
            "executors.ray.executor",
            "executors.ray.view",
        },
    ),
    ("execution and manager", {"manager"}),  # + every execution.* module, added below
    ("runs", {"runs", "results", "run_setup"}),
    ("session", {"session", "documents"}),
    (
        "notebook",
        {
            "",
            "magics",
            "parsers",
            "namespace",
            "widget",
            "inspect_panel",
            "display",
            "runs_comm",
            "demo",
        },
    ),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Package modules that `name` (at `path`) imports anywhere in its source.

    `from . import x` imports the submodule x (not the package's own `__init__`, which is
    already loaded); `from .m import y` imports m, and m.y when y is a submodule.
    """
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    package = here if is_package else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("apwa_jupyter"):
                target = node.module.removeprefix("apwa_jupyter").lstrip(".")
            else:
                continue
            submodules = {f"{target}.{alias.name}".lstrip(".") for alias in node.names}
            submodules &= modules
            if len(submodules) < len(node.names):  # some names are the module's own
                found.add(target)
            found |= submodules
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("apwa_jupyter"):
                    found.add(alias.name.removeprefix("apwa_jupyter").lstrip("."))
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "labextension" not in p.parts}
    return {
        name: {t for t in _imports(path, name, set(paths)) if t in paths and t != name}
        for name, path in paths.items()
    }


def _layer_of() -> dict[str, int]:
    layers = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
    execution = next(i for i, (title, _) in enumerate(LAYERS) if title.startswith("execution"))
    for module in _graph():
        if module == "execution" or module.startswith("execution."):
            layers[module] = execution
    return layers


def _title(module: str) -> str:
    return module or "apwa_jupyter (the package)"


def test_every_module_has_a_layer():
    layers = _layer_of()
    missing = sorted(_title(m) for m in _graph() if m not in layers)
    assert not missing, f"modules with no layer in tests/test_layers.py LAYERS: {missing}"


def test_no_module_imports_a_layer_above_its_own():
    layers = _layer_of()
    upward = [
        f"{_title(module)} ({LAYERS[layers[module]][0]}) imports {_title(target)} "
        f"({LAYERS[layers[target]][0]}), a layer above it"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if module in layers and target in layers and layers[target] > layers[module]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    circles: list[str] = []
    for start in sorted(graph):
        # A path back to `start` through modules that sort after it names each circle once.
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            module, path = stack.pop()
            for target in sorted(graph[module]):
                if target == start:
                    circles.append(" -> ".join(_title(m) for m in [*path, start]))
                elif target > start and target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks are not vacuous: a planted circle and an upward import are both reported."""
    fake = tmp_path / "apwa_jupyter"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "errors.py").write_text("from .runs import Run\n")
    (fake / "runs.py").write_text("def f():\n    from . import errors\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert graph["errors"] == {"runs"} and graph["runs"] == {"errors"}
    try:
        test_no_import_circles()
    except AssertionError as exc:
        assert "errors -> runs -> errors" in str(exc)
    else:
        raise AssertionError("a planted circle was not found")
    try:
        test_no_module_imports_a_layer_above_its_own()
    except AssertionError as exc:
        assert "errors (leaf modules) imports runs (runs), a layer above it" in str(exc)
    else:
        raise AssertionError("a planted upward import was not found")


def test_only_the_ray_executor_imports_ray_and_the_core_no_notebook_libraries():
    notebook = LAYERS[-1][1]
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "labextension" in path.parts:
            continue
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            roots = []
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots = [node.module.split(".")[0]]
            for root in roots:
                if root == "ray" and name.split(".")[:2] != ["executors", "ray"]:
                    offenders.append(f"{_title(name)} imports ray")
                if root in ("IPython", "ipywidgets") and name not in notebook:
                    offenders.append(f"{_title(name)} (core) imports {root}")
    assert not offenders, offenders
