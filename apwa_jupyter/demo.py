"""Execute a notebook end to end in a real kernel and report what it produced.

    python -m apwa_jupyter.demo notebooks/quickstart.ipynb notebooks/quickstart.out.ipynb

Used by scripts/demo.sh and the test suite. Exits non-zero when a cell fails; prints each cell's
text output so a terminal user sees the result without opening the notebook.
"""

from __future__ import annotations

import sys
import time


def execute(path: str, out_path: str | None = None, timeout: int = 900) -> object:
    """Run every cell with nbclient in a python3 kernel; return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.util import run_sync

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": "."}}
    )
    with client.setup_kernel():
        try:
            client.execute(cleanup_kc=False)
        except BaseException:
            # A failed or timed-out cell: show what the cells before it printed (the run's
            # progress, the plan), which the error alone does not, and keep the partial notebook.
            for i, text in enumerate(text_outputs(notebook)):
                if text.strip():
                    print(
                        f"--- cell {i + 1} (before the error) ---\n{text.rstrip()}", file=sys.stderr
                    )
            if out_path:
                nbformat.write(notebook, out_path)
            raise
        # Stop Ray and the embedded model before the kernel is asked to exit: left to the
        # interpreter's exit, Ray's driver shutdown stalls inside ipykernel until SIGTERM.
        assert client.kc is not None
        run_sync(client.kc.execute_interactive)(  # type: ignore[attr-defined]
            "%unload_ext apwa_jupyter", timeout=60, store_history=False
        )
    if out_path:
        nbformat.write(notebook, out_path)
    return notebook


def text_outputs(notebook: object) -> list[str]:
    """Each code cell's text/plain and stream output, in order."""
    texts = []
    for cell in notebook.cells:  # type: ignore[attr-defined]
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "data" in output:
                parts.append(output["data"].get("text/plain", ""))
        texts.append("".join(parts))
    return texts


def main() -> None:
    """Command line entry point."""
    source = sys.argv[1] if len(sys.argv) > 1 else "notebooks/quickstart.ipynb"
    target = sys.argv[2] if len(sys.argv) > 2 else None
    began = time.perf_counter()
    notebook = execute(source, target)
    for i, text in enumerate(text_outputs(notebook)):
        if text.strip():
            print(f"--- cell {i + 1} ---\n{text.rstrip()}")
    print(
        f"\nexecuted {source} in {time.perf_counter() - began:.1f}s"
        + (f" -> {target}" if target else "")
    )


if __name__ == "__main__":
    main()
