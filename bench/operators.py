"""Issue #21's three targets for the operators that choose and pair rows: filter, rank, join.

    python bench/operators.py                      # all three, writes bench/results/operators.json
    python bench/operators.py --only join          # one of them (the others are kept)
    python bench/operators.py --only offline_embeddings   # the bundled embedding model only

Each section runs in a fresh interpreter (so kernel RSS is what a new kernel would see), with the
plan given (the manager is not asked), through `Session.plan` + `Run.start` and the real `openai`
client against the fake server on 127.0.0.1; calls are counted at the server.

- filter: 10,000,000 rows, a prefilter that keeps 2 in 5 and a condition asked of those, at
  L = 0.2 s and C = 64; seconds from Run to the first request, and the kernel's RSS growth (peak,
  sampled every 50 ms, over the frame already built) until the run, cancelled after 2 s of
  requests, has settled. Target: under 5 s and under 1 GB.
- rank: k = 10 of 10,000 rows on the seeded task of tests/test_rank_stage.py (coarse noisy
  scores, exact comparisons known to the server); calls, and whether the top 10 is exact.
  Target: at most 1.3 n calls, the exact top 10.
- join: 1,000 x 1,000 on the seeded task of tests/test_join_stage.py (700 planted pairs among
  decoys, trigram embeddings); calls and recall of the planted pairs, also at top_k 1 and 3.
  Target: recall >= 0.9 with at most 20,000 calls (2 % of the pairs).
- offline_embeddings (bench/results/offline_embeddings.json): the bundled all-MiniLM-L6-v2's
  load time, texts per second (2,000 company names; 300 sixty-word texts; three times each,
  best, median and worst) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "operators.json"
sys.path.insert(0, str(ROOT))  # the seeded tasks live with their tests


def session(server: Any, **endpoint: Any) -> Any:
    from apwa_jupyter.capabilities import CapabilityRegistry
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.session import Session

    return Session(
        endpoint=EndpointConfig(base_url=server.base_url, model="fake-model", **endpoint),
        executor=LocalExecutor(concurrency=64),
        registry=CapabilityRegistry(),
        cache_dir=tempfile.mkdtemp(prefix="apwa-operators-store-"),
    )


def filter_section() -> dict[str, Any]:
    """10M rows: first request and kernel RSS growth (the method of tests/test_filter_stage.py)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from apwa_jupyter.testing import FakeOpenAIServer, Reply
    from apwa_jupyter.testing.memory import PeakRss

    rows = 10_000_000
    frame = pd.DataFrame(
        {
            "text": pa.array([f"row {i}" for i in range(rows)], pa.large_string()).to_pandas(),
            "stars": np.arange(rows, dtype=np.int64) % 5 + 1,
        }
    )
    stage = {
        "id": "broken",
        "kind": "filter",
        "source": "reviews",
        "instruction": "Is {text} about a broken product?",
        "outputs": [{"name": "keep", "type": "boolean", "description": "", "choices": []}],
        "prefilter": [{"column": "stars", "op": "<=", "value": 2}],
        "batch_size": 1,
        "tools": [],
        "depends_on": [],
    }
    plan = {"summary": "filter", "stages": [stage], "output": "broken"}
    with FakeOpenAIServer(lambda body: Reply.json({"keep": True}), latency=0.2) as server:
        apwa = session(server)
        with PeakRss() as memory:
            planned = apwa.plan("filter {reviews}", {"reviews": frame}, plan=plan).wait(300)
            first = threading.Event()
            planned.subscribe(lambda e: e.kind == "subtask_started" and first.set())
            began = time.perf_counter()
            planned.start()
            first.wait(300)
            first_request_s = time.perf_counter() - began
            time.sleep(2)
            planned.cancel()
            planned.wait(600)
        counts = planned.outcomes["broken"].counts
        return {
            "rows": rows,
            "first_request_s": round(first_request_s, 2),
            "rss_growth_mb": round(memory.growth_mib),
            "prefilter_removed": counts.prefilter_removed,
            "calls_before_cancel": server.count,
            "state": planned.state,
        }


def rank_section() -> dict[str, Any]:
    """k = 10 of 10,000 on the seeded task of tests/test_rank_stage.py."""
    from apwa_jupyter.testing import FakeOpenAIServer
    from tests.test_rank_stage import Judge, plan_of, rank_stage

    n, k = 10_000, 10
    judge = Judge(n)
    with FakeOpenAIServer(judge) as server:
        planned = session(server).plan(
            "rank {items}", {"items": judge.frame()}, plan=plan_of(rank_stage(k))
        )
        planned = planned.wait(60)
        began = time.perf_counter()
        planned.start().wait(1800)
        counts = planned.outcomes["top"].counts
        return {
            "n": n,
            "k": k,
            "calls": server.count,
            "exact_top_k": planned.result.index.tolist() == judge.truth(k),
            "comparisons": counts.comparisons,
            "rounds": counts.rounds,
            "seconds": round(time.perf_counter() - began, 1),
            "state": planned.status,
        }


def join_section() -> dict[str, Any]:
    """1,000 x 1,000 on the seeded task of tests/test_join_stage.py."""
    from apwa_jupyter.testing import FakeOpenAIServer
    from tests.test_join_stage import Truth, join_stage, plan_of

    truth = Truth(1_000, 1_000)
    tables = {"left": truth.left(), "right": truth.right()}
    by_top_k = {}
    for top_k in (1, 3):  # what fewer candidates would have cost in recall
        with FakeOpenAIServer(truth) as server:
            apwa = session(server, embedding_model="fake-embed")
            plan = plan_of(join_stage(top_k=top_k))
            smaller = apwa.plan("join {left} with {right}", tables, plan=plan).wait(60)
            smaller.start().wait(1800)
            kept = set(smaller.result.index)
            recall = round(len(kept & truth.pairs) / len(truth.pairs), 4)
            by_top_k[str(top_k)] = {"calls": server.count, "recall": recall}
    with FakeOpenAIServer(truth) as server:
        apwa = session(server, embedding_model="fake-embed")
        planned = apwa.plan("join {left} with {right}", tables, plan=plan_of(join_stage()))
        planned = planned.wait(60)
        estimated = planned.stage_subtasks()["pairs"]
        began = time.perf_counter()
        planned.start().wait(1800)
        found = set(planned.result.index)
        counts = planned.outcomes["pairs"].counts
        by_top_k[str(counts.top_k)] = {
            "calls": server.count,
            "recall": round(len(found & truth.pairs) / len(truth.pairs), 4),
        }
        return {
            "left": 1_000,
            "right": 1_000,
            "calls": server.count,
            "recall": round(len(found & truth.pairs) / len(truth.pairs), 4),
            "planted_pairs": len(truth.pairs),
            "pairs_kept": counts.kept,
            "false_pairs_kept": len(found - truth.pairs),
            "top_k": counts.top_k,
            "candidates": counts.candidates,
            "estimated_calls": estimated,
            "embedding_requests": server.embedding_requests,
            "by_top_k": by_top_k,
            "seconds": round(time.perf_counter() - began, 1),
            "state": planned.status,
        }


def offline_embeddings_section() -> dict[str, Any]:
    """The bundled all-MiniLM-L6-v2 (models/minilm.py): load time, texts a second, memory."""
    import resource

    import numpy as np

    from apwa_jupyter.models.minilm import _bert, embed_locally
    from tests.test_join_stage import Truth

    began = time.perf_counter()
    _bert()
    loaded = time.perf_counter() - began
    truth = Truth(1_000, 1_000)
    rng = np.random.default_rng(0)
    words = [
        "delivery",
        "late",
        "broken",
        "kettle",
        "refund",
        "great",
        "sound",
        "battery",
        "order",
        "support",
        "price",
    ]
    record: dict[str, Any] = {"model": "all-MiniLM-L6-v2", "load_s": round(loaded, 2)}
    for name, texts in (
        ("company_names", truth.left_names + truth.right_names),
        ("sixty_words", [" ".join(rng.choice(words, 60)) for _ in range(300)]),
    ):
        embed_locally(texts[:64])  # warm
        rates = []
        for _ in range(3):  # a shared machine: the spread says as much as the best
            began = time.perf_counter()
            embed_locally(texts)
            rates.append(len(texts) / (time.perf_counter() - began))
        record[name] = {
            "texts": len(texts),
            "texts_per_s_best": round(max(rates), 1),
            "texts_per_s_median": round(float(np.median(rates)), 1),
            "texts_per_s_worst": round(min(rates), 1),
        }
    record["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    record["load_average"] = round(os.getloadavg()[0], 2)
    return record


SECTIONS = {"filter": filter_section, "rank": rank_section, "join": join_section}
# Measured by the same script, written beside operators.json (whose keys are the three).
EXTRA = {"offline_embeddings": offline_embeddings_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SECTIONS | EXTRA), help="run one section")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: one section, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps((SECTIONS | EXTRA)[args.one]()))
        return
    for name in [args.only] if args.only else [*SECTIONS, *EXTRA]:
        path = RESULTS if name in SECTIONS else RESULTS.with_name(f"{name}.json")
        results = json.loads(path.read_text()) if path.exists() and name in SECTIONS else {}
        began = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT
        )
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        record = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name} ({time.perf_counter() - began:.0f} s): {json.dumps(record)}")
        if name in SECTIONS:
            results[name] = record
        path.write_text(json.dumps(results if name in SECTIONS else record, indent=2) + "\n")


if __name__ == "__main__":
    main()
