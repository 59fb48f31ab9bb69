"""The benchmark endpoint: the project's fake OpenAI server, scripted, in a process of its own.

Planning requests get a fixed one-stage plan over table `t` (column `text`): a map, or with
`--stage replicate` three replicas per row and a vote; worker requests get `{"n_chars": 1}`. Running the server in its own process keeps its event loop off the GIL of
the driver being measured.

    python bench/fakeserver.py --latency 1 --limit 256    # prints its base URL, serves forever
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from apwa_jupyter.testing.fake_server import FakeOpenAIServer, Reply, is_manager_request

TABLE = "t"
COLUMN = "text"
OUTPUT = "n_chars"
INSTRUCTION = "Count the characters of {text}."
PROMPT = "For every row of {t}, count the characters of its text."


def map_plan(kind: str = "map") -> dict[str, Any]:
    """The one-stage plan every benchmark run executes (the manager's wire form).

    `kind="replicate"` asks three replicas of every row and a majority vote: three calls a row.
    """
    stage: dict[str, Any] = {
        "id": "label",
        "kind": "map",
        "source": TABLE,
        "batch_size": 1,
        "instruction": INSTRUCTION,
        "tools": [],
        "depends_on": [],
        "outputs": [{"name": OUTPUT, "type": "integer", "description": "", "choices": []}],
    }
    if kind == "replicate":
        del stage["batch_size"]
        stage |= {"kind": "replicate", "replicas": 3, "aggregate": "vote"}
    return {"summary": "count characters per row", "stages": [stage], "output": "label"}


WORKER_REPLY = Reply.json({OUTPUT: 1})


def responder(kind: str = "map") -> Any:
    """The scripted plan for the manager, a fixed valid answer for every worker."""
    plan_reply = Reply.json(map_plan(kind))

    def respond(body: dict[str, Any]) -> Reply:
        return plan_reply if is_manager_request(body) else WORKER_REPLY

    return respond


respond = responder()


class ServerProcess:
    """`with ServerProcess(latency=1, limit=256) as url:` runs the endpoint in a child process."""

    def __init__(self, latency: float, limit: int | None = None, stage: str = "map"):
        self.latency = latency
        self.limit = limit
        self.stage = stage
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    @property
    def pid(self) -> int | None:
        """Process id of the server (for CPU accounting)."""
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> str:
        cmd = [sys.executable, str(Path(__file__)), "--latency", str(self.latency)]
        cmd += ["--stage", self.stage]
        if self.limit:
            cmd += ["--limit", str(self.limit)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError(f"benchmark server did not start: {self.base_url!r}")
        return self.base_url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def main() -> None:
    """Serve until killed, printing the base URL first."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--stage", choices=["map", "replicate"], default="map")
    args = parser.parse_args()
    server = FakeOpenAIServer(
        responder(args.stage), latency=args.latency, limit=args.limit, record=False
    )
    server.start()
    print(server.base_url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
