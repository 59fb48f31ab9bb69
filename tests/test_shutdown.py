"""A kernel with Ray attached exits promptly and quietly when it is asked to shut down.

Before: ipykernel's shutdown signals the kernel's child processes (Ray's) with growing sleeps for
as long as any is left, so the kernel took ~35 s to exit after papermill/nbconvert, and
jupyter_client's SIGTERM made Ray print a stack dump into the user's terminal.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

# ipykernel's own start-up notice about its transport; anything else on stderr is a failure.
IPYKERNEL_NOTICE = "[IPKernelApp] WARNING | Kernel is running over TCP without encryption"


@pytest.mark.slow
def test_kernel_with_ray_exits_within_5s_of_shutdown_request_with_nothing_on_stderr(tmp_path):
    import psutil
    from jupyter_client.manager import KernelManager

    stderr_path = tmp_path / "kernel.stderr"
    manager = KernelManager(kernel_name="python3")
    with open(stderr_path, "w") as stderr:
        manager.start_kernel(stderr=stderr, stdout=stderr)
    client = manager.client()
    client.start_channels()
    children: list[int] = []
    try:
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(
            "%load_ext apwa_jupyter\n%apwa cluster start", timeout=180, output_hook=lambda m: None
        )
        assert reply["content"]["status"] == "ok"
        process = manager.provisioner.process  # type: ignore[attr-defined]
        children = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
        assert children, "Ray should have started processes under the kernel"
        began = time.monotonic()
        client.shutdown()  # the shutdown_request papermill, nbconvert and JupyterLab send
        while process.poll() is None and time.monotonic() - began < 5:
            time.sleep(0.05)
        exited_after = time.monotonic() - began
        assert process.poll() is not None, "kernel still running 5 s after shutdown_request"
        assert exited_after < 5
        lines = [
            line
            for line in stderr_path.read_text().splitlines()
            if line.strip() and not line.startswith(IPYKERNEL_NOTICE)
        ]
        assert lines == []
        time.sleep(0.5)
        left = [pid for pid in children if _alive(pid)]
        assert left == [], f"Ray processes left behind: {left}"
    finally:
        client.stop_channels()
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
        for pid in children:  # only what this kernel started, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
