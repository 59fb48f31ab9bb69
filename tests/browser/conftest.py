"""A throwaway JupyterLab server and a headless Debian Chromium page driving it.

The server runs `python -m jupyterlab` on 127.0.0.1 with a token, its own config, runtime and
root folders, the "Jupyter news" pop-up disabled, and this checkout's built labextension found
first on JUPYTER_PATH (so the test sees the build in apwa_jupyter/labextension, however the
package was installed). Never `playwright install`: Chromium comes from Debian's package.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .lab_page import ARTIFACTS, REPO, Notebook7Page, NotebookPage

BUILT_LABEXTENSION = REPO / "apwa_jupyter" / "labextension"
LABEXTENSION_NAME = "apwa-jupyter-labextension"
CHROMIUM = Path(os.environ.get("APWA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _unavailable(reason: str) -> None:
    """Skip for a developer without Chromium; fail in CI (APWA_REQUIRE_ALL=1): never a silent pass."""
    if os.environ.get("APWA_REQUIRE_ALL") == "1":
        pytest.fail(f"browser test prerequisite missing: {reason}")
    pytest.skip(reason)


def _require_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        _unavailable(f"pip install playwright ({name} missing)")
        raise


@dataclass
class LabServer:
    """A running JupyterLab: where to reach it and where its files live."""

    base_url: str
    token: str
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, path: str) -> str:
        """An absolute URL with the token, e.g. ``url("lab/tree/x.ipynb")``."""
        separator = "&" if "?" in path else "?"
        return f"{self.base_url}{path}{separator}token={self.token}"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log, for failure messages."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(server: LabServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the Jupyter server exited early:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url("api/status"), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the Jupyter server did not answer in {timeout} s:\n{server.log_tail()}")


@pytest.fixture(scope="package")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """Start JupyterLab for the browser tests; stop it (by its own pid) afterwards."""
    yield from _jupyter_server(tmp_path_factory, "jupyterlab", "LabApp")


@pytest.fixture(scope="package")
def notebook7_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """The same, as Jupyter Notebook 7 (the classic-style single-document interface)."""
    yield from _jupyter_server(tmp_path_factory, "notebook", "JupyterNotebookApp")


def _jupyter_server(
    tmp_path_factory: pytest.TempPathFactory, module: str, app: str
) -> Iterator[LabServer]:
    _require_module("playwright.sync_api")
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} missing: apt-get update && apt-get install -y chromium")
    if not (BUILT_LABEXTENSION / "package.json").exists():
        _unavailable("labextension not built: cd labextension && jlpm install && jlpm build:prod")

    base = tmp_path_factory.mktemp(module)
    config, runtime, root, data = (base / name for name in ("config", "runtime", "root", "data"))
    for folder in (config, runtime, root, data / "labextensions"):
        folder.mkdir(parents=True)
    (data / "labextensions" / LABEXTENSION_NAME).symlink_to(BUILT_LABEXTENSION)
    (config / "labconfig").mkdir()
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTER_PATH": os.pathsep.join(filter(None, [str(data), os.environ.get("JUPYTER_PATH")])),
        "JUPYTER_PLATFORM_DIRS": "1",
        # The kernels' own result store: never the user's per-user one, never another run's.
        "APWA_CACHE_DIR": str(tmp_path_factory.mktemp("apwa-store")),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    token = secrets.token_hex(16)
    port = _free_port()
    log_path = base / f"{module}.log"
    command = [
        sys.executable,
        "-m",
        module,
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--{app}.expose_app_in_browser=True",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = LabServer(f"http://127.0.0.1:{port}/", token, root, process, log_path)
    try:
        _wait_until_up(server, timeout=60)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / log_path.name)


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through Python Playwright.

    Package scope, not session: Playwright's sync API keeps an event loop running in the main
    thread while it is open, and every later `asyncio.run` in the suite would fail.
    """
    sync_api = _require_module("playwright.sync_api")
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} missing: apt-get update && apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page; its console errors are saved next to the screenshots."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"{request.node.name}.console.txt").write_text("\n".join(console))
        context.close()


@pytest.fixture(params=["jupyterlab", "notebook7"])
def client(request: pytest.FixtureRequest) -> tuple[str, LabServer, type[NotebookPage], str]:
    """(name, server, page class, URL path of a notebook): the test runs in JupyterLab and in
    Notebook 7, the two clients with the runs panel and the plan widget."""
    if request.param == "jupyterlab":
        return "lab", request.getfixturevalue("lab_server"), NotebookPage, "lab/tree/"
    return "nb7", request.getfixturevalue("notebook7_server"), Notebook7Page, "notebooks/"
