"""Cascades: achieved agreement, share sent to the strong model, and cost against all-strong.

    python bench/cascades.py                  # 4,000 rows, targets 0.90 and 0.95
    python bench/cascades.py --rows 10000

Two OpenAI-compatible test servers on 127.0.0.1 play the models (scripted per row from a seeded
truth, as in tests/test_cascade.py): the strong model is always right; the cheap one is right on
85 % of rows and, when wrong, either guesses per sample ("informative": its samples disagree, so
its confidence says something) or repeats one wrong answer ("useless": its confidence is 1 on
every row). Each is played twice: with the cheap endpoint's token log-probabilities (one call a
row; its confidence is the probability it gave the answer's tokens: 0.75-1 when right, 0.3-0.7
when wrong for "informative", 0.99 always for "useless") and with the agreement of 3 samples
(three calls a row). Each runs at one row a call and at the rows a call chosen by tokens (the
plan leaves `batch_size` out; execution/batch_size.py): batched, the cheap step reads each row's
confidence inside the row's own object of the answer, and the strong step batches too (the
samples of the agreement cascade stay one row a call). The runs go through `Session.run` with `cascade="default,strong"` and the local
executor. Money is priced with two real price-table entries (the cheap model as gpt-4o-mini, the
strong as gpt-4o); the servers count tokens as characters / 4 of the messages. Writes
bench/results/cascades.json as {"cases": [{"cheap", "target", "achieved", "strong_share",
"cost_ratio", ...}], "million_rows": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing.cascade_models import PLAN, ColourModel, truth
from apwa_jupyter.testing.fake_server import FakeOpenAIServer, Reply, is_manager_request

RESULTS = Path(__file__).parent / "results" / "cascades.json"


def case(kind: str, target: float, rows: int, confidence: str, batched: bool) -> dict[str, Any]:
    """One cascade run against fresh servers and a fresh store."""
    cheap_model, strong_model = ColourModel(kind, seed=5), ColourModel("strong", seed=5)
    unsized = json.loads(json.dumps(PLAN))
    unsized["stages"][0]["batch_size"] = None  # chosen by tokens

    def responder(body: dict[str, Any]) -> Reply:
        if batched and is_manager_request(body):
            return Reply.json(unsized)
        return cheap_model(body)

    with FakeOpenAIServer(responder) as cheap, FakeOpenAIServer(strong_model) as strong:
        session = Session(
            endpoint=EndpointConfig(
                base_url=cheap.base_url, model="gpt-4o-mini", logprobs=confidence == "logprobs"
            ),
            endpoints={"strong": EndpointConfig(base_url=strong.base_url, model="gpt-4o")},
            executor=LocalExecutor(concurrency=64),
            cache_dir=tempfile.mkdtemp(prefix="apwa-cascade-bench-"),
        )
        frame = pd.DataFrame({"text": [f"item {i}" for i in range(rows)]})
        began = time.perf_counter()
        run = session.run(
            "Colour of {items}", {"items": frame}, cascade="default,strong", target=target
        )
        seconds = time.perf_counter() - began
        report = run.cascade()
        rows_a_call = run.plan.stage("label").batch_size
        achieved = float((run.result["colour"] == frame["text"].map(truth)).mean())
        session.shutdown()
    return {
        "cheap": kind,
        "confidence": report["confidence"],
        "rows_a_call": rows_a_call,
        "target": target,
        "achieved": round(achieved, 4),
        "strong_share": round(report["strong_share"], 4),
        "cost_ratio": round(report["cost_usd"] / report["all_strong_usd"], 4),
        "threshold": report["threshold"],
        "agreement_on_calibration": round(report["agreement"], 4),
        "agreement_bound": round(report["agreement_bound"], 4),
        "cost_usd": report["cost_usd"],
        "all_strong_usd": report["all_strong_usd"],
        "cheap_calls": cheap_model.calls,
        "strong_calls": strong_model.calls,
        "rows": rows,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    """Run every case, write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    args = parser.parse_args()
    cases = [
        case(kind, target, args.rows, confidence, batched)
        for batched in (False, True)
        for confidence in ("logprobs", "agreement")
        for kind in ("informative", "useless")
        for target in (0.90, 0.95)
    ]

    def at_095(confidence: str, batched: bool) -> dict[str, Any]:
        return next(
            c
            for c in cases
            if (c["cheap"], c["target"], c["confidence"]) == ("informative", 0.95, confidence)
            and (c["rows_a_call"] > 1) == batched
        )

    one, many = at_095("logprobs", False), at_095("logprobs", True)
    samples = at_095("agreement", False)

    def usd(c: dict[str, Any], figure: str) -> float:
        return round(c[figure] / c["rows"] * 1_000_000, 2)

    million = {
        "rows": 1_000_000,
        "all_strong_usd": usd(one, "all_strong_usd"),
        "cascade_usd_at_0.95": usd(one, "cost_usd"),
        "samples_cascade_usd_at_0.95": usd(samples, "cost_usd"),
        "rows_a_call_chosen": many["rows_a_call"],
        "all_strong_batched_usd": usd(many, "all_strong_usd"),
        "cascade_batched_usd_at_0.95": usd(many, "cost_usd"),
        "priced_as": "cheap gpt-4o-mini, strong gpt-4o (built-in prices), tokens as the test "
        "server counts them (characters / 4 of the messages)",
    }
    RESULTS.write_text(json.dumps({"cases": cases, "million_rows": million}, indent=1))
    print(
        f"{'confidence':<10} {'rows':>4} {'cheap':<12} {'target':>6} {'achieved':>8} "
        f"{'strong':>7} {'cost':>6} {'USD':>8}"
    )
    for c in cases:
        print(
            f"{c['confidence']:<10} {c['rows_a_call']:>4} {c['cheap']:<12} {c['target']:>6} "
            f"{c['achieved']:>8.3f} {c['strong_share']:>7.1%} {c['cost_ratio']:>6.1%} "
            f"{c['cost_usd']:>8.4f}"
        )
    print(json.dumps(million))


if __name__ == "__main__":
    main()
