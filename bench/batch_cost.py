"""Live against --batch for a 100,000-row labelling run, at list prices (issue #20).

    python bench/batch_cost.py    # a few seconds; bench/results/batch_cost.json

The task is bench/tokens.py's (a sentiment and a product category per short review), planned
for 100,000 rows on gpt-4o-mini at one row a call and at the rows a call chosen by tokens. The
figures are the run's own estimate before Run (`Run.cost_estimate`, the tokens its workers would
send, priced from the built-in table), live and at the Batch API's price (`--batch`). It is
above what bench/tokens.py measured at the test server ($4.17 per 100k rows live at one row a
call), because that server counts the messages only, and the estimate also counts the response
schema and chat formatting a provider bills.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing import FakeOpenAIServer
from bench.tokens import CONTEXT, MODEL, answer, plan, reviews

OUT = Path(__file__).parent / "results" / "batch_cost.json"
ROWS = 100_000


def main() -> None:
    """Estimate both ways at both batch sizes; write and print the table."""
    frame = reviews(ROWS)
    cases = []
    with FakeOpenAIServer(answer) as server:
        session = Session(
            endpoint=EndpointConfig(base_url=server.base_url, model=MODEL, context_tokens=CONTEXT),
            executor=LocalExecutor(concurrency=8),
            cache_dir=tempfile.mkdtemp(prefix="apwa-batch-cost-"),
        )
        for batch_size in (1, None):
            for batch in (False, True):
                run = session.plan(
                    "Label {reviews}", {"reviews": frame}, plan=plan(batch_size), batch=batch
                ).wait()
                found = run.cost_estimate()
                assert found is not None and found.money is not None, run.status
                stage = run.plan.stage("label")
                cases.append(
                    {
                        "rows_a_call": stage.batch_size,
                        "mode": "batch" if batch else "live",
                        "calls": found.calls,
                        "usd_low": round(found.money.low, 2),
                        "usd": round(found.money.expected, 2),
                        "usd_high": round(found.money.high, 2),
                    }
                )
                run.cancel()
        session.shutdown()
    result = {"rows": ROWS, "model": MODEL, "cases": cases}
    OUT.write_text(json.dumps(result, indent=1))
    print(f"{'rows a call':>11} {'mode':>5} {'calls':>8} {'USD (range)':>22}")
    for c in cases:
        print(
            f"{c['rows_a_call']:>11} {c['mode']:>5} {c['calls']:>8,} "
            f"{c['usd']:>8.2f} ({c['usd_low']:.2f}-{c['usd_high']:.2f})"
        )


if __name__ == "__main__":
    main()
